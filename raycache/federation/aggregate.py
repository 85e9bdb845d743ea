"""Weighted averaging as a fold: `add` client states, `merge` partial sums, `mean` at the end.

Hosts fold their clients locally and the server merges one partial per host, so the server's memory does
not grow with the number of clients. Sums are float64 so the fold order barely matters.

A client's weight is one number (its sample count, or 1) for every key, except for keys given per-row
weights (class-aware aggregation: row r of a cache weighs the client's samples of row r's class). A row no
client weighed takes the `fallback` state's row (the previous global state).
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


CHUNK = 1 << 20  # elements per step of `add_product`: an 8 MB float64 temporary, whatever the state's size


def add_product(out: np.ndarray, v: np.ndarray, w) -> None:
    """out += v * w in float64, in place, a block of rows at a time: a full model's update (hundreds of
    millions of values) is folded without a float64 copy of it and a temporary of the same size. Each element
    gets exactly the arithmetic of `out + float64(v) * w`, so the result is the same bits."""
    if out.ndim == 0 or out.size <= CHUNK:
        out += np.multiply(v, w, dtype=np.float64)
        return
    step = max(1, CHUNK // max(1, out.size // out.shape[0]))
    rows = np.ndim(w) > 0 and np.shape(w)[0] > 1  # per-row weights: slice them with the rows
    for i in range(0, out.shape[0], step):
        out[i:i + step] += np.multiply(v[i:i + step], w[i:i + step] if rows else w, dtype=np.float64)


class WeightedSum:
    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}  # per key: a 0-d total, or (rows,) totals
        self.weight = 0.0  # the total scalar weight (clients folded, by their weight)

    def add(self, state: State, weight: float, row_weights: dict[str, np.ndarray] | None = None) -> None:
        if weight < 0:
            raise ValueError(f"negative aggregation weight {weight}")
        rows = row_weights or {}
        for k, v in state.items():
            w = np.asarray(rows[k], np.float64) if k in rows else np.asarray(weight, np.float64)
            if (w < 0).any():
                raise ValueError(f"negative aggregation weight for {k!r}")
            v = np.asarray(v)
            wb = w.reshape(-1, *([1] * (v.ndim - 1))) if w.ndim else w
            if k in self.sums:
                add_product(self.sums[k], v, wb)
                self.weights[k] = self.weights[k] + w
            else:
                self.sums[k], self.weights[k] = np.asarray(np.multiply(v, wb, dtype=np.float64)), w.copy()
        self.weight += weight

    def merge(self, other: "WeightedSum") -> None:
        for k, v in other.sums.items():
            if k in self.sums:
                self.sums[k] += v
                self.weights[k] = self.weights[k] + other.weights[k]
            else:
                self.sums[k], self.weights[k] = v.copy(), other.weights[k].copy()
        self.weight += other.weight

    def mean(self, fallback: State | None = None) -> State:
        if not self.sums and self.weight <= 0:
            raise ValueError("nothing to aggregate: total client weight is 0")
        out = {}
        for k, s in self.sums.items():
            w = self.weights[k]
            if w.ndim == 0:
                if w <= 0:
                    raise ValueError(f"nothing to aggregate for {k!r}: total client weight is 0")
                out[k] = (s / w).astype(np.float32)
                continue
            held = w > 0
            if not held.all() and fallback is None:
                raise ValueError(f"rows of {k!r} that no client weighed, and no previous state to keep")
            shape = (-1, *([1] * (s.ndim - 1)))
            mean = s / np.where(held, w, 1.0).reshape(shape)
            if not held.all():
                mean = np.where(held.reshape(shape), mean, np.asarray(fallback[k], np.float64))
            out[k] = mean.astype(np.float32)
        return out


def fedavg(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * state_i / sum_i w_i, key by key."""
    acc = WeightedSum()
    for s, w in zip(states, weights):
        acc.add(s, w)
    return acc.mean()
