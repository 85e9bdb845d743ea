"""Reference details of each method, each checked against an independent statement of the paper's or the
reference code's maths on asymmetric data (not against the code's own literals):

- FedCLIP's symmetric contrastive loss with two samples of one class in a batch (a one-sided loss differs);
- Tip-Adapter's alpha/beta search, brute-forced here over its grid;
- Tip-Adapter-F's one cosine schedule over the whole run, against torch's CosineAnnealingLR;
- persistent Adam moments (FLoRA's clients): two rounds with memory = one optimiser over both rounds;
- FLoRA's A/B averaging: A and B averaged separately, which is not the average of the products B A;
- FedCLIP's uniform aggregation against FedAvg's sample weights.
"""

from __future__ import annotations

from raycache.methods.training import LocalRound

import math

import numpy as np
import pytest
import torch

from raycache.config import settings_for
from raycache.federation.aggregate import fedavg
from raycache.methods.base import Task
from raycache.methods.training import local_steps
from raycache.data.split import few_shot_rows
from raycache.methods.cache_model import one_hot_values, search_alpha_beta
from raycache.methods.cachefl import CacheFL
from raycache.methods.fedclip import FedCLIP
from raycache.methods.training import contrastive_loss


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_is_clips_symmetric_loss_with_repeated_classes():
    """CLIP's loss over a batch: image i's positive is text i (its own class prompt, so two same-class samples
    share a text row); the loss is the mean of the image->text and text->image cross-entropies."""
    rng = np.random.default_rng(0)
    img = unit(rng.normal(size=(4, 5)))
    classes = unit(rng.normal(size=(3, 5)))
    y = np.array([0, 2, 0, 1])  # samples 0 and 2 share class 0: their text rows are equal
    txt = classes[y]
    s = 100.0 * img @ txt.T  # (B, B)

    def xent(rows):  # mean over i of -log softmax(rows[i])[i], written out in float64
        rows = rows - rows.max(axis=1, keepdims=True)
        return float(np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(rows)]))

    expected = 0.5 * (xent(s) + xent(s.T))
    got = contrastive_loss(torch.tensor(img), torch.tensor(txt)).item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert abs(got - xent(s)) > 1e-3  # a one-sided loss would be told apart on this batch


def _brute_force(f, W, K, L, y, scale, steps, current):
    """Tip-Adapter's search_hp, restated: beta outer, alpha inner, the first strictly better pair kept,
    starting from the pair the cache was trained with."""
    betas = [i * (scale[0] - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
    alphas = [i * (scale[1] - 0.1) / steps[1] + 0.1 for i in range(steps[1])]
    a0, b0 = current
    best = (float(((100 * f @ W.T + a0 * np.exp(-b0 * (1 - f @ K.T)) @ L).argmax(1) == y).mean()), a0, b0)
    for b in betas:
        for a in alphas:
            logits = 100 * f @ W.T + a * np.exp(-b * (1 - f @ K.T)) @ L
            acc = float((logits.argmax(1) == y).mean())
            if acc > best[0]:
                best = (acc, a, b)
    return best


def test_alpha_beta_search_finds_the_validation_optimum():
    rng = np.random.default_rng(3)
    n_cls, shots, dim = 4, 3, 8
    W = unit(rng.normal(size=(n_cls, dim)))  # zero-shot text rows, deliberately unrelated to the keys
    centres = unit(rng.normal(size=(n_cls, dim)))
    K = unit(np.repeat(centres, shots, axis=0) + 0.3 * rng.normal(size=(n_cls * shots, dim)))
    y = rng.integers(0, n_cls, size=60)
    f = unit(centres[y] + 0.6 * rng.normal(size=(60, dim)))
    L = one_hot_values(n_cls, shots).numpy().astype(np.float64)
    scale, steps = (9.0, 4.0), (15, 8)
    t = torch.tensor
    for current, chunk in [((0.0, 1.0), 7), ((50.0, 30.0), 4096)]:  # rows in chunks of 7: the same answer
        acc, a, b = _brute_force(f, W, K, L, y, scale, steps, current)
        alpha, beta, got_acc = search_alpha_beta(t(f), t(W), t(K), t(y), scale, steps, current, chunk=chunk)
        assert (alpha, beta) == pytest.approx((a, b)) and got_acc == pytest.approx(acc)
    zero_shot = float(((f @ W.T).argmax(1) == y).mean())
    acc, a, b = _brute_force(f, W, K, L, y, scale, steps, (0.0, 1.0))
    assert acc > zero_shot and (a, b) != (0.0, 1.0)  # the search is not vacuous on this data
    # a trained pair better than every grid point is kept: the grid only replaces it when it beats it
    W_bad = -unit(centres)  # zero-shot rows that point away: a large alpha (off the grid) is what works
    best_off_grid = _brute_force(f, W_bad, K, L, y, scale, steps, (200.0, 5.0))
    assert best_off_grid[1:] == (200.0, 5.0)  # this case exercises the keeping
    got = search_alpha_beta(t(f), t(W_bad), t(K), t(y), scale, steps, (200.0, 5.0))
    assert got == pytest.approx((best_off_grid[1], best_off_grid[2], best_off_grid[0]))


def test_cachefl_tune_returns_the_search_and_logits_use_it():
    rng = np.random.default_rng(4)
    W = unit(rng.normal(size=(3, 6))).astype(np.float32)
    feats = unit(rng.normal(size=(12, 6))).astype(np.float32)
    labels = np.repeat(np.arange(3), 4)
    m = CacheFL(settings_for("cachefl", shots=2, search_scale=(5.0, 4.0), search_step=(10, 10), alpha=0.0),
                Task(list("abc"), W))
    state = m.init_state(feats[[0, 1, 4, 5, 8, 9]], labels[[0, 1, 4, 5, 8, 9]])
    x, y = torch.from_numpy(feats * 7.0), torch.from_numpy(labels)  # raw features: tune normalises them
    tuned = m.tune(state, x, y)
    alpha, beta, _ = search_alpha_beta(torch.from_numpy(feats), m.text_weights, torch.from_numpy(state["cache_keys"]),
                                       y, (5.0, 4.0), (10, 10), (0.0, 1.0))
    assert tuned == pytest.approx({"alpha": alpha, "beta": beta})
    with_pair = {**state, **{k: np.asarray([v], np.float32) for k, v in tuned.items()}}
    other = CacheFL(m.cfg.model_copy(update={"alpha": tuned["alpha"], "beta": tuned["beta"]}), Task(list("abc"), W))
    torch.testing.assert_close(m.logits(with_pair, x), other.logits(state, x))
    off = CacheFL(m.cfg.model_copy(update={"search": False}), Task(list("abc"), W))
    assert off.tune(state, x, y) == {}


def _rates(rounds: int, n: int, **settings) -> list[float]:
    """The learning rate of every step the one training loop takes, read off the parameter: plain SGD on
    loss = p moves p by exactly the step's rate."""
    from raycache.methods.training import fit

    cfg = settings_for("cachefl", optimizer="sgd", momentum=0.0, weight_decay=0.0, **settings)
    p = torch.zeros(1, requires_grad=True)
    seen = []
    for r in range(1, rounds + 1):
        fit({"p": p}, lambda idx: (seen.append(p.item()), p.sum())[1], n, cfg, LocalRound(r, r, rounds))
    seen.append(p.item())
    return [a - b for a, b in zip(seen, seen[1:])]


def test_one_cosine_over_the_run_is_torchs_cosine_annealing():
    """Tip-Adapter-F: CosineAnnealingLR(T_max = epochs x batches), stepped every batch, over every round."""
    rounds, n, bs, epochs, lr = 3, 10, 4, 2, 0.5
    per_round = epochs * math.ceil(n / bs)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rounds * per_round)
    expected = []
    for _ in range(rounds * per_round):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    common = {"lr": lr, "batch_size": bs, "local_epochs": epochs}
    assert _rates(rounds, n, schedule="cosine_run", **common) == pytest.approx(expected, abs=1e-6)
    per_round_cosine = [0.5 * lr * (1 + math.cos(math.pi * s / per_round)) for s in range(per_round)]
    assert _rates(rounds, n, schedule="cosine", **common) == pytest.approx(per_round_cosine * rounds, abs=1e-6)


def test_coops_constant_warmup_then_one_cosine():
    """CoOp (Dassl's ConstantWarmupScheduler, WARMUP_EPOCH 1, WARMUP_CONS_LR 1e-5): the first epoch of the
    run at the constant warm-up rate, then a cosine from the base rate over the remaining steps."""
    rounds, n, bs, lr = 3, 8, 4, 0.002  # 2 steps per epoch, one epoch per round: 6 steps, 2 of warm-up
    got = _rates(rounds, n, lr=lr, batch_size=bs, schedule="cosine_run", warmup_epochs=1, warmup_lr=1e-5)
    cosine = [0.5 * lr * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert got == pytest.approx([1e-5, 1e-5, *cosine], abs=1e-7)


def _fedclip_data():
    rng = np.random.default_rng(5)
    W = unit(rng.normal(size=(3, 8))).astype(np.float32)
    y = np.repeat(np.arange(3), 10)
    x = (W[y] * 3 + rng.normal(size=(30, 8))).astype(np.float32)
    return Task(list("abc"), W), torch.from_numpy(x), torch.from_numpy(y)


def test_persistent_adam_is_one_optimiser_across_rounds():
    """FLoRA's clients build Adam once: two rounds with the client's memory give what one Adam, never
    re-created, gives over the same batches; without memory (FedCLIP's reference) round 2 starts fresh."""
    task, x, y = _fedclip_data()
    cfg = settings_for("fedclip", lr=1e-2, batch_size=8, persist_optimizer=True)
    m = FedCLIP(cfg, task)
    state0 = m.init_state(None, None)
    memory: dict = {}
    s1, _ = m.local_train(state0, x, y, LocalRound(1, round_idx=1, memory=memory))
    s2, _ = m.local_train(s1, x, y, LocalRound(2, round_idx=2, memory=memory))

    params = {k: torch.tensor(v, requires_grad=True) for k, v in state0.items()}  # the reference's one Adam
    opt = torch.optim.Adam(list(params.values()), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    from raycache.methods.fedclip import adapt

    for seed in (1, 2):
        for batch in local_steps(len(y), 8, 1, seed):
            loss = contrastive_loss(adapt(x[batch], params), m.text_weights[y[batch]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for k in state0:
        np.testing.assert_allclose(s2[k], params[k].detach().numpy(), rtol=1e-5, atol=1e-6)

    fresh = FedCLIP(cfg.model_copy(update={"persist_optimizer": False}), task)
    f1, _ = fresh.local_train(state0, x, y, LocalRound(1, round_idx=1, memory={}))
    np.testing.assert_allclose(f1["fc1.weight"], s1["fc1.weight"], rtol=1e-6)  # round 1 is the same
    f2, _ = fresh.local_train(f1, x, y, LocalRound(2, round_idx=2, memory={}))
    assert not np.allclose(f2["fc1.weight"], s2["fc1.weight"], atol=1e-6)  # round 2 is not


def test_lora_a_and_b_are_averaged_separately_which_is_not_the_average_of_ba():
    rng = np.random.default_rng(6)
    states = [{"lora_A": rng.normal(size=(2, 5)).astype(np.float32), "lora_B": rng.normal(size=(5, 2)).astype(np.float32)}
              for _ in range(3)]
    n = [10.0, 30.0, 60.0]
    merged = fedavg(states, n)
    w = np.array(n) / sum(n)
    mean_a = sum(wi * s["lora_A"].astype(np.float64) for wi, s in zip(w, states))
    mean_b = sum(wi * s["lora_B"].astype(np.float64) for wi, s in zip(w, states))
    np.testing.assert_allclose(merged["lora_A"], mean_a, rtol=1e-6)
    np.testing.assert_allclose(merged["lora_B"], mean_b, rtol=1e-6)
    mean_ba = sum(wi * (s["lora_B"].astype(np.float64) @ s["lora_A"]) for wi, s in zip(w, states))
    assert np.abs(merged["lora_B"] @ merged["lora_A"] - mean_ba).max() > 0.1  # the merged update is not mean(BA)


def test_few_shot_rows_are_k_per_class_seeded_and_class_major():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 2, 1, 0, 1, 2, 0])
    rows = few_shot_rows(labels, 3, 2, seed=7)
    assert len(set(rows)) == 6 and list(labels[rows]) == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(rows, few_shot_rows(labels, 3, 2, seed=7))
    assert any(not np.array_equal(rows, few_shot_rows(labels, 3, 2, seed=s)) for s in range(8, 20))
    with pytest.raises(ValueError, match="class 1 has 4 training samples, needs 5"):
        few_shot_rows(labels, 3, 5, seed=0)
