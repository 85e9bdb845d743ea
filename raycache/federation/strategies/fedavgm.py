"""FedAvgM (Hsu et al. 2019): server momentum on the pseudo-gradient delta = mean - x:
m = momentum * m + delta;  x = x + server_lr * m."""

from __future__ import annotations

import numpy as np

from raycache.federation.strategies.base import State, Strategy, as_state, pseudo_gradient


def fedavgm(x: State, mean: State, m: State, server_lr: float, momentum: float) -> tuple[State, State]:
    delta = pseudo_gradient(x, mean)
    m_next = {k: momentum * np.asarray(m.get(f"m/{k}", 0.0), np.float64) + delta[k] for k in x}
    return (as_state({k: np.asarray(x[k], np.float64) + server_lr * m_next[k] for k in x}),
            as_state({f"m/{k}": v for k, v in m_next.items()}))


class FedAvgM(Strategy):
    name = "fedavgm"

    @staticmethod
    def step(x: State, mean: State, memory: State, cfg) -> tuple[State, State]:
        return fedavgm(x, mean, memory, cfg.server_lr, cfg.server_momentum)
