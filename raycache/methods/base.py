"""The method contract. The round loop talks to every method through these few calls and never asks
which method it is.

State is a flat dict of float32 numpy arrays: exactly what a client sends (and the server broadcasts), so
payload sizes are the arrays' bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from raycache.federation.flows import FEDERATED, Flow
from raycache.lazy import lazy_module
from raycache.methods.settings import MethodSettings
from raycache.methods.training import LocalRound

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it

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
    """A federated method. The runtime reads its declarations, never its name:

    - `Settings`: its `method.<key>` settings, typed, with its reference defaults (`raycache.methods.settings`);
    - `flow`: what a round does with states (`raycache.federation.flows`: federated, personal or pooled);
    - `weighting`: how the server averages client updates unless `federation.weighting` says otherwise;
    - `uses_cache(settings)`: builds its initial state from K labelled examples per class (`cache_init`);
    - `uses_pixels(settings)`: trains through the image encoder, so it needs images, not stored features;
    - `check(settings, model, spec)`: what it needs from the model, checked before any compute;
    - `class_rows(settings, n_classes)`: which rows of its state belong to which class (for class-aware aggregation);
    - `tune(state, inputs, labels)`: settings searched on the validation split after training (none).

    A trainable method gives the one training loop (`raycache.methods.training.fit`) its tensors
    (`trainables`), its batch loss (`batch_loss`, on inputs `prepare` made once per client) and reads the
    result back (`export`); `local_train` is then the base's.
    """

    name: ClassVar[str]
    Settings: ClassVar[type] = MethodSettings
    flow: ClassVar[Flow] = FEDERATED
    eval_batch: ClassVar[int] = 4096  # inputs per forward pass when evaluating
    weighting: ClassVar[str] = "samples"  # FedAvg by sample count; "uniform" = 1 / clients
    fused_optimizer: ClassVar[bool] = False  # one fused kernel per step (worth it for small states)

    @classmethod
    def keeps_optimizer(cls, settings) -> bool:
        """Whether each client keeps optimiser memory across rounds (a checkpoint must carry it); a method
        that does not train has no optimiser."""
        return bool(getattr(settings.resolved(), "persist_optimizer", False))

    @classmethod
    def uses_cache(cls, settings) -> bool:
        return False

    @classmethod
    def uses_pixels(cls, settings) -> bool:
        return False

    @classmethod
    def check(cls, settings, model, spec) -> None:
        """Raise UserError when `model` (the open_clip model `spec` builds) lacks what this method needs."""

    @classmethod
    def class_rows(cls, settings, n_classes: int) -> dict[str, np.ndarray]:
        """{state key: (rows,) class of each row} for the parts of the state that are per-class rows; {} =
        none (class-aware aggregation does not apply)."""
        return {}

    def tune(self, state: State, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Inference settings searched on the validation split for a trained `state`; {} = none. What it
        returns is stored beside the state as 0-d arrays and `logits` reads it from there."""
        return {}

    def __init__(self, settings, task: Task) -> None:
        self.cfg = settings.resolved()  # the `method` config section, derived values folded in
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
        """The initial global state, from the server's own labelled hold-out (made on a client host for the
        server, which holds no torch)."""

    @abstractmethod
    def logits(self, state: State, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D) image features as `encode_image` returns them (raw, not normalised: each method normalises
        where its maths does), or (B, 3, H, W) images for a pixel method -> (B, N) class logits."""

    # -- training: the one loop, with the method's tensors and loss --
    def trainables(self, state: State) -> dict[str, torch.Tensor]:
        """The tensors local training updates, on `self.device`, requiring grad, initialised from `state`."""
        raise NotImplementedError(f"{self.name} does not train")

    def prepare(self, inputs: torch.Tensor):
        """Per-sample tensors the batch loss reads (a tensor or a tuple of them), made once per client."""
        return inputs

    def batch_loss(self, params: dict[str, torch.Tensor], inputs, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not train")

    def export(self, params: dict[str, torch.Tensor]) -> State:
        """The trained tensors as the state a client keeps or sends."""
        return {k: v.detach().cpu().numpy().copy() for k, v in params.items()}

    def local_train(self, state: State, inputs: torch.Tensor, labels: torch.Tensor,
                    ctx: LocalRound) -> tuple[State, float]:
        """One client's local update from `state` in round `ctx.round_idx`; returns (new state, mean training
        loss). `ctx.memory` is the client's private store across rounds: it never leaves the client."""
        from raycache.methods.training import fit, take

        params = self.trainables(state)
        x = self.prepare(inputs)
        loss = fit(params, lambda idx: self.batch_loss(params, take(x, idx), take(labels, idx)), len(labels),
                   self.cfg, ctx, self.fused_optimizer)
        return self.export(params), loss


class Frozen(Method):
    """A method that does not train (its state never moves): a round only measures its loss."""

    def local_train(self, state: State, inputs: torch.Tensor, labels: torch.Tensor,
                    ctx: LocalRound) -> tuple[State, float]:
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(self.logits(state, inputs), labels)
        return state, float(loss)


def state_nbytes(state: State) -> int:
    """Exact bytes of the tensors in `state`."""
    return int(sum(a.nbytes for a in state.values()))


def state_params(state: State) -> int:
    return int(sum(a.size for a in state.values()))
