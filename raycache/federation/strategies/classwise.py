"""Class-aware cache aggregation (CacheFL's natural improvement, ../shared/METHODS.md): each class's key rows
are averaged over the clients with weights n_{k,c} / sum_k n_{k,c} (client k's samples of class c), so a
client without class c does not dilute class c's keys; a class no reporting client holds keeps the previous
global rows. The per-row weighting happens in the fold (`WeightedSum` with row weights); the average it
produces is the next global state."""

from __future__ import annotations

from raycache.federation.strategies.base import State, Strategy


class Classwise(Strategy):
    name = "classwise"
    per_class = True

    @staticmethod
    def step(x: State, mean: State, memory: State, cfg) -> tuple[State, State]:
        return dict(mean), memory
