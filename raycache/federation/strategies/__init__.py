"""Server strategies (`federation.strategy`): what the server does with the clients' averaged states. One
line per strategy, `name -> "module:Class"`, imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raycache.federation.strategies.base import Strategy

STRATEGIES: dict[str, str] = {
    "fedavg": "raycache.federation.strategies.fedavg:FedAvg",
    "fedavgm": "raycache.federation.strategies.fedavgm:FedAvgM",
    "fedadagrad": "raycache.federation.strategies.fedadagrad:FedAdagrad",
    "fedadam": "raycache.federation.strategies.fedadam:FedAdam",
    "fedyogi": "raycache.federation.strategies.fedyogi:FedYogi",
    "classwise": "raycache.federation.strategies.classwise:Classwise",
}


def strategy_class(name: str) -> type["Strategy"]:
    module, _, attr = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
