"""Every registered method through the same contract: 2 clients, 2 rounds of local training and FedAvg,
offline. State keys and shapes stay stable, metrics stay finite, payloads match the published formulas."""

import numpy as np
import pytest
import torch

from raycache.config import MethodConfig
from raycache.federation.aggregate import fedavg
from raycache.methods import METHODS, method_class
from raycache.methods.base import Task, state_nbytes

N, D, K = 3, 8, 2
PAYLOAD_FLOATS = {  # what one client sends per round, from each paper
    "zeroshot": 0,
    "cachefl": N * K * D,  # the cache keys: N*K x D
    "fedclip": 2 * (D * D + D),  # the attention adapter: two D x D layers with biases
}


def test_every_method_has_a_payload_formula():
    assert set(PAYLOAD_FLOATS) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(N, D)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    labels = np.repeat(np.arange(N), 10)
    feats = (W[labels] + 0.5 * rng.normal(size=(len(labels), D))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    method = method_class(name)(MethodConfig(name=name, shots=K), Task(list("abc"), W))
    state = method.init_state(feats, labels)
    shapes = {k: v.shape for k, v in state.items()}
    clients = [np.arange(0, 30, 2), np.arange(1, 30, 2)]
    for r in range(2):
        updates = []
        for c, idx in enumerate(clients):
            update, loss = method.local_train(state, torch.from_numpy(feats[idx]), torch.from_numpy(labels[idx]),
                                              seed=10 * r + c)
            assert np.isfinite(loss)
            assert {k: v.shape for k, v in update.items()} == shapes
            assert state_nbytes(update) == 4 * PAYLOAD_FLOATS[name]
            updates.append(update)
        state = fedavg(updates, [len(i) for i in clients])
        assert {k: v.shape for k, v in state.items()} == shapes
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
    logits = method.logits(state, torch.from_numpy(feats))
    assert logits.shape == (len(labels), N) and torch.isfinite(logits).all()


def test_local_steps_cover_each_sample_once_per_epoch_and_anneal():
    from raycache.methods.base import local_steps

    steps = list(local_steps(10, 4, 2, seed=0, lr=1.0, schedule="cosine"))
    assert len(steps) == 6 and steps[0][1] == 1.0 and steps[-1][1] < steps[1][1] < 1.0
    for epoch in (steps[:3], steps[3:]):
        assert sorted(torch.cat([b for b, _ in epoch]).tolist()) == list(range(10))
    assert [b for b, _ in local_steps(3, 8, 2, 0, 0.1, "constant")] == [None, None]  # full batch, no shuffle
    again = list(local_steps(10, 4, 2, seed=0, lr=1.0, schedule="cosine"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(steps, again))
