"""The training loop's optimiser is torch's Adam, AdamW and SGD: the same parameters, step for step, as
`torch.optim`'s classes under a `LambdaLR` of the same schedule, with their state carried between rounds
through `state_dict`; and, unlike those classes, it leaves torch's compiler stack unimported."""

import math
import subprocess
import sys

import pytest
import torch

from raycache.config import settings_for
from raycache.methods.training import LocalRound, fit, lr_factor

N, BATCH, EPOCHS, ROUNDS = 11, 4, 2, 3


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    w0 = torch.randn(5, 3, generator=g)
    b0 = torch.randn(3, generator=g) * 0.1
    return x, y, w0, b0


def _loss(params, x, y, idx):
    rows = slice(None) if idx is None else idx
    return torch.nn.functional.cross_entropy(x[rows] @ params["w"] + params["b"], y[rows])


def _reference(cfg, fused):
    """The same rounds with torch.optim's own classes: a fresh optimiser each round, given the last round's
    state by `load_state_dict` when it persists, and `LambdaLR` over the run-wide cosine."""
    from raycache.methods.training import local_steps

    x, y, w0, b0 = _data()
    params = {"w": w0.clone().requires_grad_(), "b": b0.clone().requires_grad_()}
    per_round = EPOCHS * math.ceil(N / BATCH)
    saved = None
    for r in range(1, ROUNDS + 1):
        tensors = list(params.values())
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(tensors, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            opt = cls(tensors, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      **({"fused": True} if fused else {}))
        if saved is not None:
            opt.load_state_dict(saved)
        offset = (r - 1) * per_round
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor("cosine", offset + s, ROUNDS * per_round))
        for idx in local_steps(N, BATCH, EPOCHS, seed=10 + r):
            opt.zero_grad(set_to_none=True)
            _loss(params, x, y, idx).backward()
            opt.step()
            sched.step()
        saved = opt.state_dict()
    return params


@pytest.mark.parametrize("optimizer,fused", [("adam", False), ("adamw", False), ("adamw", True), ("sgd", False)])
def test_the_loop_steps_as_torchs_optimiser_classes_do(optimizer, fused):
    cfg = settings_for("cachefl", optimizer=optimizer, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                       momentum=0.7, batch_size=BATCH, local_epochs=EPOCHS, schedule="cosine_run",
                       persist_optimizer=True)
    want = _reference(cfg, fused)
    x, y, w0, b0 = _data()
    params = {"w": w0.clone().requires_grad_(), "b": b0.clone().requires_grad_()}
    memory: dict = {}
    for r in range(1, ROUNDS + 1):
        fit(params, lambda idx: _loss(params, x, y, idx), N, cfg, LocalRound(10 + r, r, ROUNDS, memory), fused)
    for name in params:
        torch.testing.assert_close(params[name].detach(), want[name].detach(), rtol=0, atol=0)
    assert params["w"].grad is None  # the last step's gradients are let go
    moments = {"sgd": {"momentum_buffer"}}.get(optimizer, {"step", "exp_avg", "exp_avg_sq"})
    assert {key.split("/")[0] for key in memory} == moments
    if optimizer != "sgd":
        assert memory["step/w"][0] == ROUNDS * EPOCHS * math.ceil(N / BATCH)


def test_the_betas_reach_the_update():
    """Two Adam steps differ under other betas (the first step's bias correction hides them)."""
    x, y, w0, b0 = _data()
    out = []
    for betas in [(0.9, 0.999), (0.5, 0.6)]:
        cfg = settings_for("cachefl", optimizer="adam", lr=0.1, betas=betas, weight_decay=0.0, batch_size=N,
                           local_epochs=2, schedule="constant")
        params = {"w": w0.clone().requires_grad_(), "b": b0.clone().requires_grad_()}
        fit(params, lambda idx: _loss(params, x, y, idx), N, cfg, LocalRound(0))
        out.append(params["w"].detach())
    assert not torch.allclose(out[0], out[1])


def test_training_does_not_import_torchs_compiler_stack():
    """torch's optimiser classes import torch._dynamo (with sympy and triton, about 150 MB of every process
    that trains) when they are built; a client trained by the loop must not."""
    code = """
import sys
import torch
from raycache.config import settings_for
from raycache.methods.training import LocalRound, fit
for optimizer, fused in [("adamw", True), ("adam", False), ("sgd", False)]:
    cfg = settings_for("cachefl", optimizer=optimizer, batch_size=2, local_epochs=1, persist_optimizer=True)
    w = torch.zeros(3, requires_grad=True)
    fit({"w": w}, lambda idx: ((w - 1) ** 2).sum(), 4, cfg, LocalRound(0), fused)
    assert w.abs().sum() > 0
print(sorted(m for m in ("torch._dynamo", "sympy", "triton") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
