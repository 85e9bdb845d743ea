import numpy as np
from raycache.methods.training import LocalRound
import pytest
import torch

from raycache.config import settings_for
from raycache.methods.base import Task, state_nbytes, state_params
from raycache.methods.fedclip import FedCLIP, adapt


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_adapter_equals_the_formula_on_raw_features():
    """The reference feeds the raw encode_image output to the adapter and normalises only a * f."""
    rng = np.random.default_rng(0)
    D = 6
    f = rng.normal(size=(3, D)) * np.array([[0.5], [3.0], [20.0]])  # raw: rows of very different norms
    p = {"fc1.weight": rng.normal(size=(D, D)), "fc1.bias": rng.normal(size=D),
         "fc2.weight": rng.normal(size=(D, D)), "fc2.bias": rng.normal(size=D)}
    h = np.tanh(f @ p["fc1.weight"].T + p["fc1.bias"])
    z = h @ p["fc2.weight"].T + p["fc2.bias"]
    a = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = unit(a * f)
    params = {k: torch.tensor(v) for k, v in p.items()}
    got = adapt(torch.tensor(f), params)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    # fed unit features instead, the attention differs: the scale of the input reaches the adapter
    assert not np.allclose(adapt(torch.tensor(unit(f)), params).numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("loss", ["contrastive", "ce"])
def test_fedclip_payload_and_training(loss):
    rng = np.random.default_rng(1)
    N, D = 4, 16
    W = unit(rng.normal(size=(N, D))).astype(np.float32)
    labels = np.repeat(np.arange(N), 16)
    feats = unit(W[labels] * 0.3 + rng.normal(size=(len(labels), D))).astype(np.float32)
    m = FedCLIP(settings_for("fedclip", lr=1e-2, local_epochs=5, loss=loss), Task(list("abcd"), W))
    state = m.init_state(feats, labels)
    assert state_params(state) == 2 * (D * D + D) and state_nbytes(state) == 2 * (D * D + D) * 4
    f, y = torch.from_numpy(feats), torch.from_numpy(labels)
    before = torch.nn.functional.cross_entropy(m.logits(state, f), y).item()
    new, train_loss = m.local_train(state, f, y, LocalRound(0))
    after = torch.nn.functional.cross_entropy(m.logits(new, f), y).item()
    assert after < before and np.isfinite(train_loss)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
