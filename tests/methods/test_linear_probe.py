"""The linear probe (FLoRA's FedLC): a linear head with bias on unit image features, no logit scale,
initialised from the zero-shot classifier; only W and b travel."""

import numpy as np
import torch

from raycache.config import settings_for
from raycache.methods.base import Task
from raycache.methods.linear_probe import LinearProbe
from raycache.methods.training import LocalRound


def _task_and_data(seed=0, n_classes=4, d=6, n=40):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n_classes, d))
    W = (W / np.linalg.norm(W, axis=1, keepdims=True)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    x = (3 * rng.normal(size=(n, d)) + 2 * rng.normal(size=(n_classes, d))[y]).astype(np.float32)  # raw scale
    return Task(list("abcd"), W), torch.from_numpy(x), torch.from_numpy(y)


def test_logits_are_a_linear_head_on_unit_features_starting_from_zero_shot():
    task, x, _ = _task_and_data()
    m = LinearProbe(settings_for("linear_probe"), task)
    state = m.init_state(None, None)
    assert sum(v.size for v in state.values()) == 4 * (6 + 1)  # N (D + 1) floats travel
    np.testing.assert_array_equal(state["weight"], task.text_weights)
    rng = np.random.default_rng(1)
    state = {"weight": rng.normal(size=(4, 6)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
    f = x.numpy().astype(np.float64)
    want = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ state["weight"].T + state["bias"]  # no scale
    np.testing.assert_allclose(m.logits(state, x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_local_training_lowers_the_loss_and_moves_only_the_head():
    task, x, y = _task_and_data()
    m = LinearProbe(settings_for("linear_probe", lr=0.05, local_epochs=5, batch_size=8), task)
    state = m.init_state(None, None)
    before = torch.nn.functional.cross_entropy(m.logits(state, x), y).item()
    new, _ = m.local_train(state, x, y, LocalRound(0))
    assert set(new) == {"weight", "bias"} and not np.array_equal(new["bias"], state["bias"])
    assert torch.nn.functional.cross_entropy(m.logits(new, x), y).item() < before
