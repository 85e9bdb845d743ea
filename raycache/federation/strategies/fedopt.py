"""The adaptive server optimisers of Reddi et al., Adaptive Federated Optimization (ICLR 2021), Algorithm 2:
with delta = mean - x,

    m = beta1 * m + (1 - beta1) * delta
    v = second_moment(v, delta^2)          (FedAdagrad, FedAdam or FedYogi)
    x = x + server_lr * m / (sqrt(v) + tau)

m starts at 0 and v at tau^2 (the paper's v_{-1} >= tau^2); no bias correction, as in the paper."""

from __future__ import annotations

from typing import Callable

import numpy as np

from raycache.federation.strategies.base import State, as_state, pseudo_gradient


def fedopt(x: State, mean: State, memory: State, server_lr: float, beta1: float, tau: float,
           second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[State, State]:
    delta = pseudo_gradient(x, mean)
    out, mem = {}, {}
    for k in x:
        m = beta1 * np.asarray(memory.get(f"m/{k}", 0.0), np.float64) + (1 - beta1) * delta[k]
        v_prev = np.asarray(memory[f"v/{k}"], np.float64) if f"v/{k}" in memory else np.full_like(delta[k], tau ** 2)
        v = second_moment(v_prev, delta[k] ** 2)
        out[k] = np.asarray(x[k], np.float64) + server_lr * m / (np.sqrt(v) + tau)
        mem[f"m/{k}"], mem[f"v/{k}"] = m, v
    return as_state(out), as_state(mem)
