"""FedAdagrad (Reddi et al. 2021): v = v + delta^2."""

from __future__ import annotations

from raycache.federation.strategies.base import State, Strategy
from raycache.federation.strategies.fedopt import fedopt


class FedAdagrad(Strategy):
    name = "fedadagrad"

    @staticmethod
    def step(x: State, mean: State, memory: State, cfg) -> tuple[State, State]:
        return fedopt(x, mean, memory, cfg.server_lr, cfg.beta1, cfg.tau, lambda v, d2: v + d2)
