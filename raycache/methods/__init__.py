"""Method registry: one line per built-in method, `name -> "module:Class"`, imported only when used, plus
every method another installed package registers under the entry-point group `raycache.methods`
(`[project.entry-points."raycache.methods"] mymethod = "mypkg.module:MyMethod"`)."""

from __future__ import annotations

import functools
import importlib
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raycache.methods.base import Method

ENTRY_POINT_GROUP = "raycache.methods"

BUILTIN: dict[str, str] = {
    "zeroshot": "raycache.methods.zeroshot:ZeroShot",
    "cachefl": "raycache.methods.cachefl:CacheFL",
    "fedclip": "raycache.methods.fedclip:FedCLIP",
    "local_only": "raycache.methods.local_only:LocalOnly",
    "tip_adapter": "raycache.methods.tip_adapter:TipAdapter",
    "centralised_cache": "raycache.methods.centralised_cache:CentralisedCache",
    "flora": "raycache.methods.flora:FLoRA",
    "fedavg_full": "raycache.methods.fedavg_full:FedAvgFull",
    "linear_probe": "raycache.methods.linear_probe:LinearProbe",
    "promptfl": "raycache.methods.promptfl:PromptFL",
}


@functools.lru_cache(maxsize=8)
def _installed(path: tuple[str, ...]) -> dict[str, str]:
    """The entry points of the packages on `path` (scanned once per sys.path: a config check asks often)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def registry() -> dict[str, str]:
    """Every method by name: the built-in ones, then those of installed packages (a built-in name wins)."""
    return {**_installed(tuple(sys.path)), **BUILTIN}


def method_names() -> list[str]:
    return sorted(registry())


def method_class(name: str) -> type["Method"]:
    target = registry().get(name)
    if target is None:
        raise KeyError(f"unknown method {name!r}")
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if getattr(cls, "name", None) != name:
        raise TypeError(f"{target} registers as {name!r} but its name is {getattr(cls, 'name', None)!r}")
    return cls


def weighting(federation_cfg, method_name: str) -> str:
    """`federation.weighting`, or the method's reference when it is null (uniform under client-level DP,
    whose noise is calibrated to a uniform average)."""
    if federation_cfg.weighting:
        return federation_cfg.weighting
    if federation_cfg.dp is not None:
        return "uniform"
    return method_class(method_name).weighting
