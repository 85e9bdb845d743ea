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
    rounds: int = 1  # federated rounds in the run (a schedule over the whole run needs its length)

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
    - `check(cfg, model, spec)`: what it needs from the model, checked before any compute;
    - `weighting`: how the server averages client updates unless `federation.weighting` says otherwise;
    - `trainer_rows(parts, labels, n_classes, cfg, seed)`: which training rows each trainer gets (the clients' own, or
      one pooled trainer for a centralised method);
    - `tune(state, inputs, labels)`: settings searched on the validation split after training (none).
    """

    name: ClassVar[str]
    role: ClassVar[Literal["federated", "local", "centralised"]] = "federated"
    uses_cache_init: ClassVar[bool] = False  # builds its state from K labelled examples per class
    defaults: ClassVar[dict] = {}  # reference settings for `method.*` keys left null
    eval_batch: ClassVar[int] = 4096  # inputs per forward pass when evaluating
    weighting: ClassVar[str] = "samples"  # FedAvg by sample count; "uniform" = 1 / clients

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

    @classmethod
    def trainer_rows(cls, parts: list[np.ndarray], labels: np.ndarray, n_classes: int, cfg,
                     seed: int) -> list[np.ndarray]:
        """Each trainer's rows of the training pool: one per client; a centralised method pools them, or
        with `cache_init: shots` holds K (seeded) shots per class of the pool, the rows its keys come from."""
        if cls.role != "centralised":
            return parts
        pooled = np.sort(np.concatenate(parts))
        if cfg.cache_init != "shots":
            return [pooled]
        from raycache.data.split import few_shot_rows
        from raycache.errors import UserError

        try:
            return [pooled[few_shot_rows(labels[pooled], n_classes, cfg.shots, seed)]]
        except ValueError as err:
            raise UserError(f"method.shots: {err} (K shots per class from the clients' training data)") from None

    def tune(self, state: State, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Inference settings searched on the validation split for a trained `state`; {} = none. What it
        returns is stored beside the state as 0-d arrays and `logits` reads it from there."""
        return {}

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
    def local_train(self, state: State, inputs: torch.Tensor, labels: torch.Tensor, seed: int,
                    memory: dict | None = None, round_idx: int = 1) -> tuple[State, float]:
        """One client's local update from `state` (the broadcast one, or its own for a `local` method) in
        round `round_idx` (1-based); returns (new state, mean training loss). `memory` is the client's
        private store that outlives the round (optimiser moments, with `method.persist_optimizer`): the
        method may read and fill it; it never leaves the client."""


def local_steps(n: int, batch_size: int, epochs: int, seed: int, lr: float, schedule: str, round_idx: int = 1,
                rounds: int = 1):
    """A client's local schedule: yields (minibatch indices, or None for one full batch; learning rate).
    Seeded shuffling each epoch. `cosine` anneals the rate over the client's steps in this round;
    `cosine_run` is one cosine over `rounds` rounds of such steps, of which this round is number `round_idx`
    (torch's CosineAnnealingLR with T_max = every step of the run, stepped once per batch)."""
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, n)
    per_round = epochs * math.ceil(n / bs)
    step, total = 0, per_round
    if schedule == "cosine_run":
        step, total = (round_idx - 1) * per_round, rounds * per_round
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if bs < n else None  # one full batch: order is moot
        for start in range(0, n, bs):
            rate = lr if schedule == "constant" else 0.5 * lr * (1 + math.cos(math.pi * step / total))
            yield (None if order is None else order[start:start + bs]), rate
            step += 1


def adam(params: dict[str, torch.Tensor], cfg, memory: dict | None, decoupled: bool = False,
         fused: bool = False) -> torch.optim.Optimizer:
    """Adam (or AdamW, `decoupled`) over `params` with the method's settings; with
    `cfg.persist_optimizer` and a client `memory`, the moments and step count it left last round are loaded
    (see `remember`), so the optimiser is the client's one optimiser across rounds."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(list(params.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
              **({"fused": True} if fused else {}))
    if cfg.persist_optimizer and memory:
        for name, p in params.items():
            if f"step/{name}" in memory:
                step = torch.tensor(float(np.asarray(memory[f"step/{name}"]).reshape(-1)[0]), dtype=torch.float32,
                                    device=p.device if fused else "cpu")
                opt.state[p] = {"step": step,
                                "exp_avg": torch.from_numpy(memory[f"exp_avg/{name}"]).to(p.device).clone(),
                                "exp_avg_sq": torch.from_numpy(memory[f"exp_avg_sq/{name}"]).to(p.device).clone()}
    return opt


def remember(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor], cfg, memory: dict | None) -> None:
    """Store `opt`'s per-parameter moments and step count in the client's `memory` (as float32 numpy
    arrays, so a checkpoint holds them like any state), when `cfg.persist_optimizer`."""
    if not cfg.persist_optimizer or memory is None:
        return
    for name, p in params.items():
        st = opt.state.get(p)
        if st:
            memory[f"step/{name}"] = np.asarray([float(st["step"])], dtype=np.float32)
            memory[f"exp_avg/{name}"] = st["exp_avg"].detach().cpu().numpy().copy()
            memory[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().cpu().numpy().copy()


def state_nbytes(state: State) -> int:
    """Exact bytes of the tensors in `state`."""
    return int(sum(a.nbytes for a in state.values()))


def state_params(state: State) -> int:
    return int(sum(a.size for a in state.values()))
