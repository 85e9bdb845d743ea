"""The method contract. The round loop talks to every method through these few calls and never asks
which method it is.

State is a flat dict of float32 numpy arrays: exactly what a client sends (and the server broadcasts), so
payload sizes are the arrays' bytes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Task:
    """What every party knows about the task: the class names and their zero-shot text weights."""

    class_names: list[str]
    text_weights: np.ndarray  # (N, D) unit rows

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return int(self.text_weights.shape[1])


class Method(ABC):
    name: ClassVar[str]
    uses_cache_init: ClassVar[bool] = False  # builds its state from K labelled examples per class
    defaults: ClassVar[dict] = {}  # reference settings for `method.*` keys left null

    def __init__(self, cfg, task: Task) -> None:
        from raycache.methods import with_defaults

        self.cfg = with_defaults(cfg)  # the `method` config section, nulls resolved
        self.task = task
        self.text_weights = torch.from_numpy(np.ascontiguousarray(task.text_weights, dtype=np.float32))
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "Method":
        """Where local training runs (a client actor's GPU, if it has one). States stay numpy on the host."""
        self.device = torch.device(device)
        self.text_weights = self.text_weights.to(self.device)
        return self

    @abstractmethod
    def init_state(self, server_features: np.ndarray, server_labels: np.ndarray) -> State:
        """The initial global state, built on the server from its own labelled hold-out."""

    @abstractmethod
    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        """(B, D) unit features -> (B, N) class logits under `state`."""

    @abstractmethod
    def local_train(self, state: State, features: torch.Tensor, labels: torch.Tensor,
                    seed: int) -> tuple[State, float]:
        """One client's local update from the broadcast `state`; returns (new state, mean training loss)."""


def local_steps(n: int, batch_size: int, epochs: int, seed: int, lr: float, schedule: str):
    """A client's local schedule: yields (minibatch indices, or None for one full batch; learning rate).
    Seeded shuffling each epoch; `cosine` anneals the rate over all of the client's steps in the round."""
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, n)
    total = epochs * math.ceil(n / bs)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if bs < n else None  # one full batch: order is moot
        for start in range(0, n, bs):
            rate = 0.5 * lr * (1 + math.cos(math.pi * step / total)) if schedule == "cosine" else lr
            yield (None if order is None else order[start:start + bs]), rate
            step += 1


def state_nbytes(state: State) -> int:
    """Exact bytes of the tensors in `state`."""
    return int(sum(a.nbytes for a in state.values()))


def state_params(state: State) -> int:
    return int(sum(a.size for a in state.values()))
