"""FedAvg as a fold: `add` client states weighted by sample count, `merge` partial sums, `mean` at the end.

Hosts fold their clients locally and the server merges one partial per host, so the server's memory does
not grow with the number of clients. Sums are float64 so the fold order barely matters.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


class WeightedSum:
    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.weight = 0.0

    def add(self, state: State, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"negative aggregation weight {weight}")
        for k, v in state.items():
            term = np.asarray(v, dtype=np.float64) * weight
            if k in self.sums:
                self.sums[k] += term
            else:
                self.sums[k] = term
        self.weight += weight

    def merge(self, other: "WeightedSum") -> None:
        for k, v in other.sums.items():
            if k in self.sums:
                self.sums[k] += v
            else:
                self.sums[k] = v.copy()
        self.weight += other.weight

    def mean(self) -> State:
        if self.weight <= 0:
            raise ValueError("nothing to aggregate: total client weight is 0")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.sums.items()}


def fedavg(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * state_i / sum_i w_i, key by key."""
    acc = WeightedSum()
    for s, w in zip(states, weights):
        acc.add(s, w)
    return acc.mean()
