"""Zero-shot CLIP: logits are 100 f W^T, nothing trains, nothing is sent."""

from raycache.methods.training import LocalRound
import numpy as np
import torch

from raycache.config import settings_for
from raycache.methods.base import Task
from raycache.methods.zeroshot import ZeroShot


def test_zero_shot_logits_and_a_training_step_that_changes_nothing():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 6)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    f = rng.normal(size=(5, 6)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    method = ZeroShot(settings_for("zeroshot"), Task(list("abcd"), W))
    state = method.init_state(f, np.zeros(5, np.int64))
    assert state == {}
    np.testing.assert_allclose(method.logits(state, torch.from_numpy(f)).numpy(), 100 * f @ W.T, rtol=1e-5)
    y = torch.tensor([0, 1, 2, 3, 0])
    new, loss = method.local_train(state, torch.from_numpy(f), y, LocalRound(0))
    assert new == {}
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(100 * f @ W.T), y)
    assert abs(loss - float(expected)) < 1e-4
