"""The one local-training loop every trainable method uses: optimiser (torch's Adam, AdamW or SGD kernels),
learning-rate schedule, seeded minibatch sampling, FedProx's proximal term, and the client's optimiser
memory across rounds. A method supplies its trainable tensors and a batch loss; the loop does the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from raycache.lazy import lazy_module

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")
torch_adam = lazy_module("torch.optim.adam")  # the functional kernels, not the classes (see `Optimiser`)
torch_sgd = lazy_module("torch.optim.sgd")


@dataclass
class LocalRound:
    """What a client knows when it trains in a round: its seed for the round, the round number (1-based) and
    the run's length (for a schedule over the whole run), its private memory (optimiser moments; it never
    leaves the client) and the federation's FedProx weight."""

    seed: int
    round_idx: int = 1
    rounds: int = 1
    memory: dict = field(default_factory=dict)
    prox_mu: float = 0.0


def local_steps(n: int, batch_size: int, epochs: int, seed: int):
    """A client's minibatches: yields indices (None for one full batch), a seeded shuffle each epoch."""
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, n)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if bs < n else None  # one full batch: order is moot
        for start in range(0, n, bs):
            yield None if order is None else order[start:start + bs]


def lr_factor(schedule: str, step: int, total: int, warmup_steps: int = 0, warmup_factor: float = 1.0) -> float:
    """The learning rate at `step` (0-based) as a fraction of the base rate: `warmup_factor` for the first
    `warmup_steps`, then constant or a half cosine from 1 towards 0 over the remaining `total - warmup_steps`."""
    if step < warmup_steps:
        return warmup_factor
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span))


class Optimiser:
    """torch's Adam, AdamW or SGD over named tensors: the update of `torch.optim.Adam`/`AdamW`/`SGD`, through
    their public functional kernels (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`), with the per-parameter
    state those classes keep (`step`, `exp_avg`, `exp_avg_sq`, `momentum_buffer`) and a learning rate given
    to each step.

    Not the classes themselves: constructing any `torch.optim.Optimizer` imports torch's compiler stack
    (`torch._dynamo`, sympy, triton; about 150 MB in every process that trains, `benchmarks/README.md`), and
    the kernels need none of it."""

    def __init__(self, params: dict[str, torch.Tensor], cfg, fused: bool = False) -> None:
        self.params, self.cfg = params, cfg
        self.adam = cfg.optimizer != "sgd"
        self.fused = fused and self.adam  # the classes' `fused=True` (SGD was never asked for it)
        self.state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in params}

    def _adam_state(self, name: str, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[name]
        if not state:  # as `Adam._init_group` starts a parameter: the count on the CPU unless fused
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if self.fused else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def step(self, lr: float) -> None:
        cfg = self.cfg
        named = [(name, p) for name, p in self.params.items() if p.grad is not None]
        params, grads = [p for _, p in named], [p.grad for _, p in named]
        with torch.no_grad():
            if not self.adam:
                buffers = [self.state[name].get("momentum_buffer") for name, _ in named]
                torch_sgd.sgd(params, grads, buffers, weight_decay=cfg.weight_decay, momentum=cfg.momentum, lr=lr,
                              dampening=0.0, nesterov=False, maximize=False)
                if cfg.momentum != 0:
                    for (name, _), buf in zip(named, buffers):
                        self.state[name]["momentum_buffer"] = buf
                return
            states = [self._adam_state(name, p) for name, p in named]
            torch_adam.adam(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                            [s["step"] for s in states], fused=True if self.fused else None,
                            decoupled_weight_decay=cfg.optimizer == "adamw", amsgrad=False, beta1=cfg.betas[0],
                            beta2=cfg.betas[1], lr=lr, weight_decay=cfg.weight_decay, eps=cfg.eps, maximize=False)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def load(self, memory: dict) -> None:
        """Take up the per-parameter state (`<state key>/<param name>` arrays) `save` left in `memory`."""
        for key, value in memory.items():
            kind, name = key.split("/", 1)
            if name not in self.params:
                continue
            p = self.params[name]
            if kind == "step":  # a 0-d count; fused Adam wants it beside the parameter
                self.state[name][kind] = torch.tensor(float(np.asarray(value).reshape(-1)[0]), dtype=torch.float32,
                                                      device=p.device if self.fused else "cpu")
            else:
                self.state[name][kind] = torch.from_numpy(np.asarray(value)).to(p.device).clone()

    def save(self, memory: dict) -> None:
        """Store the per-parameter state in `memory` as float32 arrays (a checkpoint holds them as it holds
        states): `step/<name>`, `exp_avg/<name>`, `momentum_buffer/<name>`, ... The optimiser is discarded
        after its round, so a float32 CPU tensor is kept by a view of it, not copied (`load` copies it back
        into the next round's optimiser: the stored arrays never change)."""
        for name, state in self.state.items():
            for key, value in state.items():
                arr = value.detach().float().cpu().numpy()
                memory[f"{key}/{name}"] = arr.reshape(1) if arr.ndim == 0 else arr


def fit(params: dict[str, torch.Tensor], batch_loss: Callable[[torch.Tensor | None], torch.Tensor], n: int, cfg,
        ctx: LocalRound, fused: bool = False) -> float:
    """Train `params` (leaf tensors requiring grad) for `cfg.local_epochs` epochs over `n` samples;
    `batch_loss(idx)` is the mean loss of the minibatch `idx` (None = all `n`). Returns the mean training loss.

    The schedule is a factor of `cfg.lr` for each step of this round, or of the whole run (`cosine_run`, and any
    warm-up, which counts epochs of the run): round r's first step is step (r - 1) * steps-per-round.
    With `cfg.persist_optimizer` the optimiser continues from the state it left in `ctx.memory`. With
    `ctx.prox_mu` > 0 the loss gains FedProx's mu/2 * ||w - w_start||^2 (w_start: the state the round began
    from)."""
    opt = Optimiser(params, cfg, fused)
    if cfg.persist_optimizer and ctx.memory:
        opt.load(ctx.memory)
    per_epoch = math.ceil(n / min(cfg.batch_size, n))
    per_round = cfg.local_epochs * per_epoch
    run_wide = cfg.schedule == "cosine_run" or cfg.warmup_epochs > 0
    offset = (ctx.round_idx - 1) * per_round if run_wide else 0
    total = ctx.rounds * per_round if cfg.schedule == "cosine_run" else per_round
    warmup = cfg.warmup_epochs * per_epoch
    warm = cfg.warmup_lr / cfg.lr
    if cfg.schedule == "cosine":  # per round, after a run-wide warm-up
        def factor(step: int) -> float:
            return warm if offset + step < warmup else lr_factor("cosine", step, total)
    else:
        def factor(step: int) -> float:
            return lr_factor(cfg.schedule, offset + step, total, warmup, warm)
    anchor = {k: p.detach().clone() for k, p in params.items()} if ctx.prox_mu > 0 else None
    loss_sum, seen = 0.0, 0
    for step, idx in enumerate(local_steps(n, cfg.batch_size, cfg.local_epochs, ctx.seed)):
        loss = batch_loss(idx)
        size = n if idx is None else len(idx)
        loss_sum += loss.item() * size
        seen += size
        if anchor is not None:
            loss = loss + 0.5 * ctx.prox_mu * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
        opt.zero_grad()
        loss.backward()
        opt.step(cfg.lr * factor(step))  # what `torch.optim.lr_scheduler.LambdaLR(opt, factor)` would set
    if cfg.persist_optimizer:
        opt.save(ctx.memory)
    opt.zero_grad()  # the last step's gradients: as large as the params (a full model's too)
    return loss_sum / max(seen, 1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Symmetric CLIP loss between each image and its own class prompt's text feature (FedCLIP's)."""
    logits = scale * image @ text.T  # (B, B)
    target = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def image_text_loss(kind: str, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`ce`: cross-entropy of 100 * image @ text.T against the labels; `contrastive`: the CLIP loss between
    each image and its class's text embedding. Both on unit embeddings."""
    if kind == "contrastive":
        return contrastive_loss(image, text[labels])
    return F.cross_entropy(100.0 * image @ text.T, labels)


def take(inputs, idx):
    """A minibatch of `inputs` (a tensor, images decoded on demand, or a tuple of per-sample tensors) as
    tensors; None = all of it."""
    from raycache.data.pixels import materialize

    if idx is None:
        return materialize(inputs)
    if isinstance(inputs, tuple):
        return tuple(x[idx] for x in inputs)
    return materialize(inputs[idx])
