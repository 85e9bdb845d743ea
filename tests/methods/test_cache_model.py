import numpy as np
from raycache.methods.training import LocalRound
import pytest
import torch

from raycache.config import settings_for
from raycache.methods.base import Task, state_nbytes
from raycache.methods.cache_model import cache_logits, class_balanced_keys, one_hot_values
from raycache.methods.cachefl import CacheFL


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cache_logits_equal_the_formula():
    """logits = 100 f W^T + alpha exp(-beta (1 - f Fk^T)) L, computed element by element."""
    rng = np.random.default_rng(0)
    N, K, D, B = 3, 2, 5, 4
    f, W, Fk = unit(rng.normal(size=(B, D))), unit(rng.normal(size=(N, D))), unit(rng.normal(size=(N * K, D)))
    L = np.zeros((N * K, N))
    for i in range(N * K):
        L[i, i // K] = 1
    alpha, beta = 1.7, 5.5
    expected = np.zeros((B, N))
    for b in range(B):
        for n in range(N):
            expected[b, n] = 100 * f[b] @ W[n] + alpha * sum(
                np.exp(-beta * (1 - f[b] @ Fk[i])) * L[i, n] for i in range(N * K))
    got = cache_logits(torch.tensor(f), torch.tensor(W), torch.tensor(Fk), one_hot_values(N, K).double(),
                       alpha, beta)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert np.array_equal(one_hot_values(N, K).numpy(), L)


def test_class_balanced_keys_are_class_major():
    feats = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.array([1, 0, 1, 0, 2, 2])
    keys = class_balanced_keys(feats, labels, 3, 2)
    assert np.array_equal(keys, feats[[1, 3, 0, 2, 4, 5]])
    with pytest.raises(ValueError):
        class_balanced_keys(feats, labels, 3, 3)


def test_cachefl_local_training_fits_client_data():
    rng = np.random.default_rng(1)
    N, D, K = 4, 16, 2
    W = unit(rng.normal(size=(N, D))).astype(np.float32)
    centers = unit(rng.normal(size=(N, D)))
    labels = np.repeat(np.arange(N), 30)
    feats = unit(centers[labels] + 0.6 * rng.normal(size=(len(labels), D))).astype(np.float32)
    cfg = settings_for(shots=K, lr=1e-2, local_epochs=10, batch_size=32, alpha=5.0, beta=5.0)
    m = CacheFL(cfg, Task(list("abcd"), W))
    state = m.init_state(feats, labels)
    assert state["cache_keys"].shape == (N * K, D) and state_nbytes(state) == N * K * D * 4
    f, y = torch.from_numpy(feats), torch.from_numpy(labels)
    before = torch.nn.functional.cross_entropy(m.logits(state, f), y).item()
    new, loss = m.local_train(state, f, y, LocalRound(0))
    after = torch.nn.functional.cross_entropy(m.logits(new, f), y).item()
    assert after < before and np.isfinite(loss)
    assert new["cache_keys"].shape == state["cache_keys"].shape
    assert not np.shares_memory(new["cache_keys"], state["cache_keys"])  # the broadcast state is untouched
    again, _ = m.local_train(state, f, y, LocalRound(0))
    np.testing.assert_array_equal(again["cache_keys"], new["cache_keys"])  # seeded: reproducible
