"""Weighted averaging as a fold: `add` client states, `merge` partial sums, `mean` at the end.

Hosts fold their clients locally and the server merges one partial per host, so the server's memory does
not grow with the number of clients. Sums are float64 so the fold order barely matters; a fold of one client
keeps that client's float32 arrays and weight instead (`Scaled`), multiplied out where they are added.

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


class Scaled:
    """A lone client's contribution to a sum, `float64(v) * w`, kept as its two factors: a fold of one client
    (a host given one client of a full model in a round) then holds and sends the float32 update it already
    has, not a float64 product twice its size. Multiplied out only when a second addend arrives or, a block of
    rows at a time, in `WeightedSum.mean`; either way each element gets the same arithmetic, so the same bits."""

    __slots__ = ("v", "w")

    def __init__(self, v: np.ndarray, w: np.ndarray) -> None:
        self.v, self.w = v, w

    def __reduce__(self):  # pickled (to the server) as its two arrays
        return Scaled, (self.v, self.w)

    @property
    def shape(self) -> tuple[int, ...]:
        return np.shape(self.v)

    def rows(self, block: slice, out: np.ndarray | None = None) -> np.ndarray:
        """float64(v) * w for rows `block` of an at-least-1-d view (into `out`, if given)."""
        v = np.atleast_1d(self.v)[block]
        w = self.w[block] if np.ndim(self.w) and np.shape(self.w)[0] > 1 else self.w
        return np.multiply(v, w, dtype=np.float64, out=out)

    def full(self) -> np.ndarray:
        return np.asarray(np.multiply(self.v, self.w, dtype=np.float64))


class WeightedSum:
    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray | Scaled] = {}  # this fold's own sums (`add`): float64, or one Scaled
        self.parts: list[dict[str, np.ndarray | Scaled]] = []  # merged partial sums, by reference (`mean`)
        self.weights: dict[str, np.ndarray] = {}  # per key: a 0-d total, or (rows,) totals
        self.weight = 0.0  # the total scalar weight (clients folded, by their weight)

    def add(self, state: State, weight: float, row_weights: dict[str, np.ndarray] | None = None) -> None:
        """Fold in one client's state. A fold adds its own clients first, then merges others' folds. The
        first client's arrays are kept by reference (`Scaled`): they must not change afterwards."""
        if self.parts:
            raise ValueError("add a fold's own clients before it merges other folds")
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
                if isinstance(self.sums[k], Scaled):  # a second client: the running sum is float64 from now on
                    self.sums[k] = self.sums[k].full()
                add_product(self.sums[k], v, wb)
                self.weights[k] = self.weights[k] + w
            else:
                self.sums[k], self.weights[k] = Scaled(v, wb.copy()), w.copy()
        self.weight += weight

    def total(self, k: str) -> np.ndarray:
        """This fold's own float64 sum of `k` (multiplied out if it holds one client)."""
        s = self.sums[k]
        return s.full() if isinstance(s, Scaled) else s

    def merge(self, other: "WeightedSum") -> None:
        """Fold in another partial sum (a host's). Its sums are kept by reference and added block by block
        in `mean`: a host's partial arrives read-only from Ray's object store, and a float64 copy of a full
        model's sum to add into would double what the server holds. `other` must not change afterwards."""
        if other.parts:
            raise ValueError("cannot merge a fold that has itself merged others")
        for k, w in other.weights.items():
            self.weights[k] = self.weights[k] + w if k in self.weights else w.copy()
        self.parts.append(dict(other.sums))
        self.weight += other.weight

    def _addends(self, k: str) -> list[np.ndarray]:
        """The float64 sums of `k`, in fold order: this fold's own, then each merged part's."""
        return ([self.sums[k]] if k in self.sums else []) + [p[k] for p in self.parts if k in p]

    def mean(self, fallback: State | None = None) -> State:
        """sum / weight per key, as float32. Computed a block of rows at a time, so that neither the merged
        sum nor its quotient exists whole in float64; each element gets exactly the arithmetic of
        `(s_0 + s_1 + ...) / w`, in fold order, so the bits do not depend on the block size."""
        keys = list(dict.fromkeys([*self.sums, *(k for p in self.parts for k in p)]))
        if not keys and self.weight <= 0:
            raise ValueError("nothing to aggregate: total client weight is 0")
        out = {}
        for k in keys:
            w = self.weights[k]
            if w.ndim == 0 and w <= 0:
                raise ValueError(f"nothing to aggregate for {k!r}: total client weight is 0")
            held = w > 0
            if w.ndim and not held.all() and fallback is None:
                raise ValueError(f"rows of {k!r} that no client weighed, and no previous state to keep")
            addends = self._addends(k)
            shape = addends[0].shape
            parts = [a if isinstance(a, Scaled) else np.atleast_1d(a) for a in addends]
            result = np.empty(shape or (1,), np.float32)
            keep = np.atleast_1d(np.asarray(fallback[k])) if w.ndim and not held.all() else None
            step = max(1, CHUNK // max(1, result.size // max(1, result.shape[0])))
            block = np.empty((min(step, result.shape[0]), *result.shape[1:]), np.float64)  # reused
            spare = np.empty_like(block) if any(isinstance(a, Scaled) for a in parts[1:]) else None
            for i in range(0, result.shape[0], step):
                rows = slice(i, i + step)
                s = block[:len(result[rows])]
                for j, a in enumerate(parts):  # in fold order, into a writable block (parts may be read-only)
                    if j == 0:
                        a.rows(rows, out=s) if isinstance(a, Scaled) else np.copyto(s, a[rows])
                    else:
                        s += a.rows(rows, out=spare[:len(s)]) if isinstance(a, Scaled) else a[rows]
                if w.ndim == 0:
                    s /= w  # in place: the same quotient as s / w
                    result[rows] = s
                    continue
                bshape = (-1, *([1] * (s.ndim - 1)))
                s /= np.where(held[rows], w[rows], 1.0).reshape(bshape)
                if keep is not None:
                    s = np.where(held[rows].reshape(bshape), s, np.asarray(keep[rows], np.float64))
                result[rows] = s
            out[k] = result.reshape(shape)
        return out


def fedavg(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * state_i / sum_i w_i, key by key."""
    acc = WeightedSum()
    for s, w in zip(states, weights):
        acc.add(s, w)
    return acc.mean()
