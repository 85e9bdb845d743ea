"""FedAvg (McMahan et al. 2017): the clients' average is the next global state."""

from __future__ import annotations

from raycache.federation.strategies.base import State, Strategy


class FedAvg(Strategy):
    name = "fedavg"

    @staticmethod
    def step(x: State, mean: State, memory: State, cfg) -> tuple[State, State]:
        return dict(mean), memory
