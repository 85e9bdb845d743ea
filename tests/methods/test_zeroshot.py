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


def test_the_drivers_numpy_zero_shot_predicts_what_the_method_predicts():
    """The driver (no torch) reports zero-shot accuracy with `zero_shot_predictions`; it must be the argmax of
    the method's own logits, on raw features of uneven norms and more rows than one chunk."""
    from raycache.methods.zeroshot import zero_shot_predictions

    rng = np.random.default_rng(1)
    W = rng.normal(size=(7, 16)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    f = (rng.normal(size=(300, 16)) * rng.uniform(0.1, 20, size=(300, 1))).astype(np.float32)
    method = ZeroShot(settings_for("zeroshot"), Task(list("abcdefg"), W))
    expected = method.logits({}, torch.from_numpy(f)).argmax(dim=1).numpy()
    got = zero_shot_predictions(f, W, chunk=64)
    assert got.dtype == np.int64 and len(set(got)) > 3  # not one class for all
    np.testing.assert_array_equal(got, expected)
