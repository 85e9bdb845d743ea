"""Local-only, Tip-Adapter and the centralised cache: what their roles mean for training, state and evaluation.
The client host is a plain class, exercised here in process (the runtime makes it a Ray actor)."""

from raycache.methods.training import LocalRound
import numpy as np

from raycache.federation.evaluate import EvalSets
import pytest
import torch

from raycache.config import settings_for
from raycache.federation.host import ClientHost
from raycache.federation.sampling import client_seed
from raycache.methods.base import Task
from raycache.methods.cache_model import cache_logits, one_hot_values
from raycache.methods.tip_adapter import TipAdapter

N, K, D = 3, 2, 8


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    W = unit(rng.normal(size=(N, D)))
    labels = np.repeat(np.arange(N), 8)
    feats = unit(W[labels] + 0.7 * rng.normal(size=(len(labels), D)))
    return Task(list("abc"), W), feats, labels


@pytest.mark.parametrize("local_model, keys", [("cache", {"cache_keys"}),
                                               ("adapter", {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})])
def test_local_only_clients_keep_their_own_state_and_send_nothing(data, local_model, keys):
    task, feats, labels = data
    cfg = settings_for("local_only", shots=K, local_model=local_model, lr=1e-2, local_epochs=3)
    clients = {0: np.arange(0, 24, 2), 1: np.arange(1, 24, 2), 2: np.arange(0, 6)}
    from raycache.methods.local_only import LocalOnly

    host = ClientHost(LocalOnly, cfg, task, (feats, labels), clients, seed=0,
                      evals=EvalSets((feats, labels)))
    init = host.method.init_state(feats, labels)
    assert set(init) == keys
    report = host.train(init, [0, 1], round_idx=1)
    assert report.bytes_up == 0 and report.partial.weight == 0  # no update leaves a client
    assert [m.fields() for m in report.messages] == [["client", "samples", "loss", "seconds"]] * 2
    assert set(host.states) == {0, 1}  # client 2 was not sampled: no state of its own yet
    s0, s1 = host.states[0], host.states[1]
    assert any(not np.array_equal(s0[k], s1[k]) for k in keys)  # trained on different data
    host.train(init, [0], round_idx=2)  # the broadcast `init` is ignored: client 0 continues its own state
    x0, y0 = torch.from_numpy(feats[clients[0]]), torch.from_numpy(labels[clients[0]])
    cont, _ = host.method.local_train(s0, x0, y0, LocalRound(client_seed(0, 2, 0)))
    assert all(np.array_equal(host.states[0][k], cont[k]) for k in keys)
    assert all(np.array_equal(host.states[1][k], s1[k]) for k in keys)  # untouched when not sampled
    preds = host.evaluate(init)["test"]
    assert set(preds) == {0, 1, 2}
    want = host.method.logits(init, torch.from_numpy(feats)).argmax(1).numpy()
    np.testing.assert_array_equal(preds[2], want)  # an untrained client predicts with the initial state


def test_training_free_tip_adapter_is_the_cache_formula_and_never_moves(data):
    task, feats, labels = data
    method = TipAdapter(settings_for("tip_adapter", shots=K, training_free=True, alpha=2.0, beta=3.0), task)
    state = method.init_state(feats, labels)
    new, loss = method.local_train(state, torch.from_numpy(feats), torch.from_numpy(labels), LocalRound(0))
    np.testing.assert_array_equal(new["cache_keys"], state["cache_keys"])
    f, W, Fk = feats.astype(np.float64), task.text_weights.astype(np.float64), state["cache_keys"].astype(np.float64)
    L = one_hot_values(N, K).numpy()
    expected = 100 * f @ W.T + 2.0 * np.exp(-3.0 * (1 - f @ Fk.T)) @ L  # Tip-Adapter, written out
    np.testing.assert_allclose(method.logits(state, torch.from_numpy(feats)).numpy(), expected, rtol=1e-4, atol=1e-3)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(expected), torch.from_numpy(labels))
    assert loss == pytest.approx(float(ce), rel=1e-4)


def test_tip_adapter_trains_on_k_shots_per_class_and_the_centralised_cache_on_everything():
    """Tip-Adapter as its paper means it: one trainer holding K (seeded) shots per class of the clients'
    pooled training data, the same shots its `cache_init: shots` keys come from; `centralised_cache` is the
    pooled-data ceiling."""
    from raycache.methods.centralised_cache import CentralisedCache

    labels = np.repeat(np.arange(3), 10)
    parts = [np.arange(0, 30, 3), np.arange(1, 30, 3), np.arange(2, 30, 3)]
    cfg = settings_for("tip_adapter", shots=4)  # cache_init: shots, its reference
    (rows,) = TipAdapter.flow.trainer_rows(parts, labels, 3, cfg, seed=0)
    assert len(rows) == 12 and np.bincount(labels[rows]).tolist() == [4, 4, 4] and len(set(rows)) == 12
    (again,) = TipAdapter.flow.trainer_rows(parts, labels, 3, cfg, seed=0)
    np.testing.assert_array_equal(rows, again)
    (pooled,) = CentralisedCache.flow.trainer_rows(parts, labels, 3, settings_for("centralised_cache"), seed=0)
    np.testing.assert_array_equal(pooled, np.arange(30))
    from raycache.errors import UserError

    with pytest.raises(UserError, match="^method.shots: class 0 has 10 training samples, needs 11"):
        TipAdapter.flow.trainer_rows(parts, labels, 3, cfg.model_copy(update={"shots": 11}), seed=0)


def test_shots_in_the_cache_are_refused_for_a_federated_method():
    from raycache.config_file import load_config
    from raycache.errors import UserError
    with pytest.raises(UserError, match="method.cache_init: shots puts the clients' own images in the cache"):
        load_config(None, ["method.name=cachefl", "method.cache_init=shots", "model.name=tiny"])


def test_tip_adapter_f_fine_tunes_the_keys_on_its_data(data):
    task, feats, labels = data
    method = TipAdapter(settings_for("tip_adapter", shots=K, alpha=2.0, beta=3.0, local_epochs=20), task)
    state = method.init_state(feats, labels)
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)
    new, _ = method.local_train(state, x, y, LocalRound(0))
    assert not np.array_equal(new["cache_keys"], state["cache_keys"])
    keys0 = torch.from_numpy(state["cache_keys"])
    before = torch.nn.functional.cross_entropy(
        cache_logits(x, torch.from_numpy(task.text_weights), keys0, one_hot_values(N, K), 2.0, 3.0), y)
    after = torch.nn.functional.cross_entropy(method.logits(new, x), y)
    assert after < before
    assert TipAdapter.flow.pooled and TipAdapter.uses_cache(method.cfg)
