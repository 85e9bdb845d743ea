"""The method contract. The round loop talks to every method through these few calls and never asks
which method it is.

State is a flat dict of float32 numpy arrays: exactly what a client sends (and the server broadcasts), so
payload sizes are the arrays' bytes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Task:
    """What every party knows about the task: the class names, their zero-shot text weights, and the model
    (enough to rebuild the encoder in any process, for methods that train through it)."""

    class_names: list[str]
    text_weights: np.ndarray  # (N, D) unit rows
    spec: Any = None  # raycache.models.clip.ModelSpec
    templates: tuple[str, ...] = ("a photo of a {}.",)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return int(self.text_weights.shape[1])


class Method(ABC):
    """A federated method. The runtime reads its declared traits, never its name:

    - `role`: `federated` (clients train from the broadcast state, the server averages), `local` (each
      client keeps and trains its own state; nothing is aggregated or uploaded) or `centralised` (one party
      trains on the union of the clients' data; an upper bound, nothing travels);
    - `uses_cache(cfg)`: builds its initial state from K labelled examples per class (`method.cache_init`);
    - `uses_pixels(cfg)`: trains through the image encoder, so it needs images, not stored features;
    - `reference(cfg)`: its reference settings for `method.*` keys left null;
    - `check(cfg, model, spec)`: what it needs from the model, checked before any compute.
    """

    name: ClassVar[str]
    role: ClassVar[Literal["federated", "local", "centralised"]] = "federated"
    uses_cache_init: ClassVar[bool] = False  # builds its state from K labelled examples per class
    defaults: ClassVar[dict] = {}  # reference settings for `method.*` keys left null
    eval_batch: ClassVar[int] = 4096  # inputs per forward pass when evaluating

    @classmethod
    def uses_cache(cls, cfg) -> bool:
        return cls.uses_cache_init

    @classmethod
    def uses_pixels(cls, cfg) -> bool:
        return False

    @classmethod
    def reference(cls, cfg) -> dict:
        return cls.defaults

    @classmethod
    def check(cls, cfg, model, spec) -> None:
        """Raise UserError when `model` (the open_clip model `spec` builds) lacks what this method needs."""

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
    def logits(self, state: State, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D) image features as `encode_image` returns them (raw, not normalised: each method normalises
        where its maths does), or (B, 3, H, W) images for a pixel method -> (B, N) class logits."""

    @abstractmethod
    def local_train(self, state: State, inputs: torch.Tensor, labels: torch.Tensor,
                    seed: int) -> tuple[State, float]:
        """One client's local update from `state` (the broadcast one, or its own for a `local` method);
        returns (new state, mean training loss)."""


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
