"""Method registry: one line per method, `name -> "module:Class"`, imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raycache.methods.base import Method

METHODS: dict[str, str] = {
    "zeroshot": "raycache.methods.zeroshot:ZeroShot",
    "cachefl": "raycache.methods.cachefl:CacheFL",
}


def method_class(name: str) -> type["Method"]:
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
