"""FedYogi (Reddi et al. 2021): v = v - (1 - beta2) * delta^2 * sign(v - delta^2)."""

from __future__ import annotations

import numpy as np

from raycache.federation.strategies.base import State, Strategy
from raycache.federation.strategies.fedopt import fedopt


class FedYogi(Strategy):
    name = "fedyogi"

    @staticmethod
    def step(x: State, mean: State, memory: State, cfg) -> tuple[State, State]:
        b2 = cfg.beta2
        return fedopt(x, mean, memory, cfg.server_lr, cfg.beta1, cfg.tau,
                      lambda v, d2: v - (1 - b2) * d2 * np.sign(v - d2))
