"""The server-strategy contract. After the clients' states are averaged (by sample count, uniformly, or per
class), the strategy turns the average into the next global state, pure: `step(global, mean, memory, cfg)`
returns the new global state and the server's optimiser memory (checkpointed with the run)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

State = dict[str, np.ndarray]


class Strategy:
    name: ClassVar[str]
    per_class: ClassVar[bool] = False  # the average weighs each class's rows by the clients' samples of it

    @staticmethod
    def step(x: State, mean: State, memory: State, cfg) -> tuple[State, State]:
        """(next global state, next server memory) from the global state `x` the round started from and
        the clients' average `mean`; `cfg` is the federation section (server_lr, betas, ...)."""
        raise NotImplementedError


def pseudo_gradient(x: State, mean: State) -> State:
    """Reddi et al.'s delta: the clients' average minus the global state, per key (float64)."""
    return {k: np.asarray(mean[k], np.float64) - np.asarray(x[k], np.float64) for k in x}


def as_state(d: dict[str, np.ndarray]) -> State:
    return {k: np.asarray(v, dtype=np.float32) for k, v in d.items()}
