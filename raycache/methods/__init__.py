"""Method registry: one line per method, `name -> "module:Class"`, imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raycache.methods.base import Method

METHODS: dict[str, str] = {
    "zeroshot": "raycache.methods.zeroshot:ZeroShot",
    "cachefl": "raycache.methods.cachefl:CacheFL",
    "fedclip": "raycache.methods.fedclip:FedCLIP",
    "local_only": "raycache.methods.local_only:LocalOnly",
    "tip_adapter": "raycache.methods.tip_adapter:TipAdapter",
    "centralised_cache": "raycache.methods.centralised_cache:CentralisedCache",
    "flora": "raycache.methods.flora:FLoRA",
    "fedavg_full": "raycache.methods.fedavg_full:FedAvgFull",
}


def method_class(name: str) -> type["Method"]:
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def weighting(federation_cfg, method_name: str) -> str:
    """`federation.weighting`, or the method's reference when it is null."""
    return federation_cfg.weighting or method_class(method_name).weighting


def with_defaults(method_cfg):
    """The `method` section with every null filled from the method's reference `defaults`, and `lr_scale`
    folded into `lr` (then 1: resolving twice changes nothing), so the run logs the rate it trains with."""
    defaults = method_class(method_cfg.name).reference(method_cfg)
    fill = {k: v for k, v in defaults.items() if getattr(method_cfg, k) is None}
    lr = fill.get("lr", method_cfg.lr)
    if method_cfg.lr_scale != 1.0:
        if lr is None:
            from raycache.errors import UserError

            raise UserError(f"method.lr_scale: {method_cfg.name} has no learning rate to scale")
        fill.update(lr=lr * method_cfg.lr_scale, lr_scale=1.0)
    return method_cfg.model_copy(update=fill) if fill else method_cfg
