"""Server strategies against their papers' formulas (written out here, per coordinate, on asymmetric data),
the class-aware fold, FedProx's client term, and client-level DP's clipping, noise and accounting."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raycache.federation.aggregate import WeightedSum
from raycache.federation.strategies import STRATEGIES, strategy_class

CFG = SimpleNamespace(server_lr=0.3, server_momentum=0.7, beta1=0.8, beta2=0.95, tau=0.01)


def _rounds():
    """A global state and three rounds of client averages, each key its own shape and scale."""
    rng = np.random.default_rng(3)
    x0 = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32) * 4}
    means = [{k: (v + rng.normal(size=v.shape) * (i + 1)).astype(np.float32) for k, v in x0.items()}
             for i in range(3)]
    return x0, means


def _reference(name: str, x0, means):
    """Reddi et al. (Algorithm 2) and Hsu et al., scalar by scalar: x, m, v as plain Python floats."""
    out = {}
    for k in x0:
        xs = []
        for j, x in enumerate(np.asarray(x0[k], np.float64).ravel()):
            m, v = 0.0, CFG.tau ** 2
            for mean in means:
                d = float(np.asarray(mean[k], np.float64).ravel()[j]) - x
                if name == "fedavgm":
                    m = CFG.server_momentum * m + d
                    x = x + CFG.server_lr * m
                    continue
                m = CFG.beta1 * m + (1 - CFG.beta1) * d
                if name == "fedadagrad":
                    v = v + d * d
                elif name == "fedadam":
                    v = CFG.beta2 * v + (1 - CFG.beta2) * d * d
                else:  # fedyogi
                    v = v - (1 - CFG.beta2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
                x = x + CFG.server_lr * m / (math.sqrt(v) + CFG.tau)
            xs.append(x)
        out[k] = np.array(xs).reshape(np.shape(x0[k]))
    return out


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_server_optimisers_follow_their_papers(name):
    x0, means = _rounds()
    strategy = strategy_class(name)
    x, memory = x0, {}
    for mean in means:
        x, memory = strategy.step(x, mean, memory, CFG)
    want = _reference(name, x0, means)
    for k in x0:
        assert x[k].dtype == np.float32 and x[k].shape == x0[k].shape
        np.testing.assert_allclose(x[k], want[k], rtol=1e-5, atol=1e-5)
    assert all(np.isfinite(v).all() for v in memory.values())


def test_fedavg_and_classwise_take_the_average():
    x0, (mean, *_) = _rounds()
    for name in ("fedavg", "classwise"):
        x, memory = strategy_class(name).step(x0, mean, {}, CFG)
        assert memory == {} and all(np.array_equal(x[k], mean[k]) for k in x0)
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "classwise"}


def test_fedavgm_with_lr_one_and_no_momentum_is_fedavg():
    x0, means = _rounds()
    x, _ = strategy_class("fedavgm").step(x0, means[0], {}, SimpleNamespace(server_lr=1.0, server_momentum=0.0))
    for k in x0:
        np.testing.assert_allclose(x[k], means[0][k], rtol=1e-6)


def test_classwise_fold_weighs_each_class_rows_by_that_class_count():
    """METHODS.md, class-aware aggregation: class c's rows averaged with n_{k,c} / sum_k n_{k,c}; a class no
    client holds keeps the previous global rows; keys outside the per-class rows are averaged by samples."""
    rng = np.random.default_rng(0)
    n_classes, shots, d = 3, 2, 4
    row_class = np.repeat(np.arange(n_classes), shots)
    prev = {"keys": rng.normal(size=(6, d)).astype(np.float32), "other": rng.normal(size=3).astype(np.float32)}
    clients = [{"keys": rng.normal(size=(6, d)).astype(np.float32), "other": rng.normal(size=3).astype(np.float32)}
               for _ in range(3)]
    counts = np.array([[5, 0, 0], [1, 3, 0], [0, 9, 0]])  # nobody holds class 2
    folds = [WeightedSum(), WeightedSum()]  # two hosts, merged: the fold order must not matter
    for i, (state, c) in enumerate(zip(clients, counts)):
        folds[i % 2].add(state, float(c.sum()), {"keys": c[row_class].astype(float)})
    folds[0].merge(folds[1])
    got = folds[0].mean(fallback=prev)
    for r in range(6):
        c = row_class[r]
        if counts[:, c].sum() == 0:
            np.testing.assert_array_equal(got["keys"][r], prev["keys"][r])
            continue
        want = sum(counts[k, c] * clients[k]["keys"][r].astype(np.float64) for k in range(3)) / counts[:, c].sum()
        np.testing.assert_allclose(got["keys"][r], want, rtol=1e-6)
    sizes = counts.sum(1)
    want_other = sum(sizes[k] * clients[k]["other"].astype(np.float64) for k in range(3)) / sizes.sum()
    np.testing.assert_allclose(got["other"], want_other, rtol=1e-6)
    with pytest.raises(ValueError, match="no client weighed"):
        folds[0].mean()


def test_fedprox_adds_mu_over_two_squared_distance_to_the_start():
    """Li et al.: the client minimises loss + mu/2 ||w - w_global||^2; with plain SGD on a zero loss the term
    alone pulls w back to w_global by lr * mu * (w - w_global) each step."""
    from raycache.config import settings_for
    from raycache.methods.training import LocalRound, fit

    cfg = settings_for("cachefl", optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.1, batch_size=4,
                       local_epochs=1, schedule="constant")
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    start = w.detach().clone()
    seen = []

    def loss(idx):  # a loss whose gradient is 1 per coordinate: w drifts from the start
        seen.append(w.detach().clone())
        return w.sum()

    fit({"w": w}, loss, 12, cfg, LocalRound(0, prox_mu=2.0))  # 3 steps
    want = start.clone()
    for _ in range(3):
        want = want - 0.1 * (1.0 + 2.0 * (want - start))
    torch.testing.assert_close(w.detach(), want)
    plain = torch.tensor([1.0, -2.0], requires_grad=True)
    fit({"w": plain}, lambda idx: plain.sum(), 12, cfg, LocalRound(0))
    torch.testing.assert_close(plain.detach(), start - 0.3)


def test_dp_clips_the_whole_update_and_noises_the_average():
    from raycache.federation.privacy import add_noise, clip_update, noise_std, update_norm

    rng = np.random.default_rng(1)
    ref = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    big = {k: v + 10 * rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()}
    small = {k: v + 1e-3 for k, v in ref.items()}
    clipped = clip_update(big, ref, 0.5)
    assert update_norm(clipped, ref) == pytest.approx(0.5, rel=1e-4)  # the bound holds over every key together
    direction = np.concatenate([(big[k] - ref[k]).ravel() for k in ref])
    kept = np.concatenate([(clipped[k] - ref[k]).ravel() for k in ref])
    np.testing.assert_allclose(kept, direction * 0.5 / np.linalg.norm(direction), rtol=1e-3, atol=1e-6)
    for k in ref:  # an update inside the bound is untouched
        np.testing.assert_allclose(clip_update(small, ref, 0.5)[k], small[k], rtol=1e-6)
    assert noise_std(1.3, 0.5, 10) == pytest.approx(1.3 * 0.5 / 10)  # z S / m
    zeros = {"w": np.zeros(200_000, np.float32)}
    noisy = add_noise(zeros, 0.2, np.random.default_rng(0))["w"]
    assert abs(noisy.std() - 0.2) < 0.002 and abs(noisy.mean()) < 0.002


def test_dp_epsilon_grows_with_rounds_and_is_opacus_rdp_for_the_sampling_rate():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from raycache.federation.privacy import epsilon

    eps = [epsilon(1.1, 0.1, r, 1e-5) for r in (1, 5, 20, 100)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' default orders
    rdp = compute_rdp(q=0.1, noise_multiplier=1.1, steps=20, orders=orders)
    want, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert eps[2] == pytest.approx(want, rel=1e-6)
    assert epsilon(1.1, 1.0, 20, 1e-5) > eps[2]  # every client every round spends more than sampling 10%
