import numpy as np
import pytest

from raycache.federation.aggregate import Scaled, WeightedSum, fedavg
from raycache.federation.evaluate import client_accuracy, per_class_accuracy
from raycache.federation.sampling import client_seed, sample_clients


def test_fedavg_weights_by_sample_count():
    a = {"k": np.array([1.0, 0.0], np.float32), "b": np.array([2.0], np.float32)}
    b = {"k": np.array([0.0, 1.0], np.float32), "b": np.array([4.0], np.float32)}
    out = fedavg([a, b], [3, 1])
    np.testing.assert_allclose(out["k"], [0.75, 0.25])
    np.testing.assert_allclose(out["b"], [2.5])
    assert out["k"].dtype == np.float32


def test_partial_sums_merge_to_the_same_average():
    rng = np.random.default_rng(0)
    states = [{"k": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(7)]
    weights = rng.integers(1, 50, 7).astype(float)
    left, right = WeightedSum(), WeightedSum()
    for i, (s, w) in enumerate(zip(states, weights)):
        (left if i < 3 else right).add(s, w)
    left.merge(right)
    expected = sum(w * s["k"].astype(np.float64) for s, w in zip(states, weights)) / weights.sum()
    np.testing.assert_allclose(left.mean()["k"], expected, rtol=1e-6)
    np.testing.assert_array_equal(left.mean()["k"], fedavg(states, list(weights))["k"])


def test_aggregating_nothing_fails_loudly():
    with pytest.raises(ValueError, match="nothing to aggregate"):
        WeightedSum().mean()
    with pytest.raises(ValueError):
        WeightedSum().add({"k": np.zeros(1)}, -1)


def test_client_sampling():
    assert list(sample_clients(5, 1.0, 0, 1)) == [0, 1, 2, 3, 4]
    s = sample_clients(100, 0.1, 0, 1)
    assert len(s) == 10 and len(set(s)) == 10 and list(s) == sorted(s)
    assert np.array_equal(s, sample_clients(100, 0.1, 0, 1))
    assert not np.array_equal(s, sample_clients(100, 0.1, 0, 2))
    assert len(sample_clients(3, 0.01, 0, 1)) == 1
    assert client_seed(0, 1, 2) == client_seed(0, 1, 2) != client_seed(0, 1, 3)


def test_client_accuracy_is_the_label_mix_of_per_class_accuracy():
    pred = np.array([0, 0, 1, 0, 2, 2])
    labels = np.array([0, 0, 1, 1, 2, 2])
    per_class = per_class_accuracy(pred, labels, 3)
    np.testing.assert_allclose(per_class, [1.0, 0.5, 1.0])
    counts = np.array([[10, 0, 0], [0, 5, 5], [1, 1, 2]])
    np.testing.assert_allclose(client_accuracy(counts, per_class), [1.0, 0.75, (1 + 0.5 + 2) / 4])


def test_folding_in_blocks_gives_the_plain_float64_sum_bit_for_bit(monkeypatch):
    """`add` folds big states a block of rows at a time; every element still gets float64(v) * w added in
    client order, so the sum equals the plain formula exactly, per-row weights included."""
    import raycache.federation.aggregate as agg

    monkeypatch.setattr(agg, "CHUNK", 7)  # blocks of 2 rows of (50, 3), 7 elements of (11,)
    rng = np.random.default_rng(1)
    states = [{"m": rng.normal(size=(50, 3)).astype(np.float32), "v": rng.normal(size=11).astype(np.float32),
               "s": np.float32(rng.normal())} for _ in range(4)]
    weights = [3.0, 1.0, 7.0, 2.0]
    rows = [rng.integers(0, 5, 50).astype(float) + 0.5 for _ in range(4)]
    fold = WeightedSum()
    for st, w, r in zip(states, weights, rows):
        fold.add(st, w, {"m": r})
    for key in ("m", "v", "s"):
        expected = np.zeros_like(np.asarray(states[0][key]), np.float64)
        for st, w, r in zip(states, weights, rows):
            wk = r[:, None] if key == "m" else w
            expected = expected + np.asarray(st[key]).astype(np.float64) * wk
        np.testing.assert_array_equal(fold.total(key), expected)


def test_folding_a_big_update_needs_no_float64_copy_of_it():
    """Full model updates (here 4M values, 16 MB in float32) are added into a running float64 sum (32 MB, the
    sum itself) with a bounded temporary, not a float64 copy of each update plus a product of the same size
    (64 MB more)."""
    import tracemalloc

    update = {"w": np.ones(4 << 20, np.float32)}
    fold = WeightedSum()
    tracemalloc.start()
    try:
        fold.add(update, 1.0)
        fold.add(update, 2.0)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current >= 32 * 2**20  # the float64 sum
    assert peak < 32 * 2**20 + 12 * 2**20, peak  # and one block's float64 temporary (8 MB), not 64 MB more
    assert fold.total("w")[0] == 3.0 and fold.total("w").dtype == np.float64


def _read_only(fold: WeightedSum) -> WeightedSum:
    """`fold` as a host's partial arrives on the server: its arrays read-only (views of Ray's object store)."""
    for v in fold.sums.values():
        for a in (v.v, v.w) if isinstance(v, Scaled) else (v,):
            a.flags.writeable = False
    return fold


def test_merged_mean_in_blocks_is_the_plain_formula_bit_for_bit(monkeypatch):
    """Partial sums merged from three hosts (read-only, as Ray hands them over) and averaged a block of rows
    at a time equal `(s_0 + s_1 + s_2) / w` in float64, cast to float32, exactly: scalar weights, per-row
    weights, and rows no client weighed (which keep the previous global rows)."""
    import raycache.federation.aggregate as agg

    monkeypatch.setattr(agg, "CHUNK", 7)
    rng = np.random.default_rng(2)
    prev = {"m": rng.normal(size=(50, 3)).astype(np.float32)}
    hosts, sums, row_w = [], {"m": [], "v": [], "s": []}, []
    for _ in range(3):
        fold = WeightedSum()
        for _ in range(2):
            st = {"m": rng.normal(size=(50, 3)).astype(np.float32), "v": rng.normal(size=11).astype(np.float32),
                  "s": np.float32(rng.normal())}
            r = rng.integers(0, 3, 50).astype(float) * (np.arange(50) % 10 != 0)  # rows 0, 10, ...: weight 0
            fold.add(st, float(rng.integers(1, 9)), {"m": r})
        sums["m"].append(fold.total("m").copy())
        sums["v"].append(fold.total("v").copy())
        sums["s"].append(fold.total("s").copy())
        row_w.append(fold.weights["m"])
        hosts.append(_read_only(fold))
    total = WeightedSum()
    for fold in hosts:
        total.merge(fold)
    out = total.mean(fallback=prev)
    weight = sum(f.weight for f in hosts)
    w = row_w[0] + row_w[1] + row_w[2]
    m = (sums["m"][0] + sums["m"][1] + sums["m"][2]) / np.where(w > 0, w, 1.0)[:, None]
    expected_m = np.where((w > 0)[:, None], m, prev["m"].astype(np.float64)).astype(np.float32)
    assert (w == 0).any() and (w > 0).any()
    np.testing.assert_array_equal(out["m"], expected_m)
    np.testing.assert_array_equal(out["v"], ((sums["v"][0] + sums["v"][1] + sums["v"][2]) / weight).astype(np.float32))
    np.testing.assert_array_equal(out["s"], ((sums["s"][0] + sums["s"][1] + sums["s"][2]) / weight).astype(np.float32))
    assert out["s"].shape == () and out["m"].dtype == np.float32


def test_merging_host_partials_needs_no_float64_copy_of_the_sum():
    """The server merges two hosts' partial sums of a full model (here 4M values, one client each) and
    averages them holding the float32 result (16 MB) and two blocks (8 MB each: the running block and the
    next client's product), not a float64 copy of the sum (32 MB) plus its quotient (32 MB more)."""
    import tracemalloc

    hosts = []
    for w in (1.0, 3.0):
        fold = WeightedSum()
        fold.add({"w": np.full(4 << 20, w, np.float32)}, w)
        hosts.append(_read_only(fold))
    tracemalloc.start()
    try:
        total = WeightedSum()
        for fold in hosts:
            total.merge(fold)
        out = total.mean()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20 + 2 * 8 * 2**20 + 2**20, peak  # the float32 result and two blocks
    assert out["w"][0] == np.float32((1.0 + 9.0) / 4.0)


def test_a_fold_adds_its_own_clients_before_it_merges():
    """A merged fold keeps the other folds' sums by reference and adds its own first: adding a client after
    a merge, or merging a fold that has merged others, is refused rather than averaged wrongly; a fold
    changed after it was merged does not change the merge's keys."""
    one = WeightedSum()
    one.add({"k": np.array([1.0])}, 1.0)
    total = WeightedSum()
    total.add({"k": np.array([5.0])}, 1.0)
    total.merge(one)
    assert total.mean()["k"][0] == np.float32(3.0)  # (5 + 1) / 2: its own client, then the merged fold
    with pytest.raises(ValueError, match="before it merges"):
        total.add({"k": np.array([3.0])}, 1.0)
    with pytest.raises(ValueError, match="merged others"):
        WeightedSum().merge(total)
    one.add({"j": np.array([9.0])}, 1.0)  # changed afterwards: a key the merge never weighed
    assert set(total.mean()) == {"k"}


def test_a_one_client_fold_sends_its_float32_update_and_averages_to_the_same_bits(monkeypatch):
    """A host given one client (a full model's round with few clients) holds that client's float32 arrays
    and weight, not a float64 product twice their size: nothing is allocated when it is added, and it
    pickles (as Ray sends it to the server) to about the update's float32 bytes. Merged with folds of several
    clients, in any position, the mean is still `(s_0 + s_1 + ...) / w` in float64 exactly, per-row weights
    and rows no client weighed included."""
    import pickle
    import tracemalloc

    import raycache.federation.aggregate as agg

    big = {"w": np.ones(1 << 20, np.float32)}
    fold = WeightedSum()
    tracemalloc.start()
    try:
        fold.add(big, 3.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak  # a float64 product would be 8 MB
    assert len(pickle.dumps(fold, protocol=5)) < 4 * 2**20 + 2**16  # the float32 update (4 MB), not 8 MB
    np.testing.assert_array_equal(fold.total("w"), np.full(1 << 20, 3.0))

    monkeypatch.setattr(agg, "CHUNK", 7)
    rng = np.random.default_rng(5)
    prev = {"m": rng.normal(size=(20, 3)).astype(np.float32)}
    folds, addends, row_w = [], {"m": [], "s": []}, []
    for clients in (1, 3, 1):  # a one-client fold first, between and after folds of several
        fold = WeightedSum()
        for _ in range(clients):
            st = {"m": rng.normal(size=(20, 3)).astype(np.float32), "s": np.float32(rng.normal())}
            w = float(rng.integers(1, 9))
            r = rng.integers(0, 3, 20).astype(float) * (np.arange(20) % 7 != 0)  # rows 0, 7, 14: weight 0
            fold.add(st, w, {"m": r})
            addends["m"].append(st["m"].astype(np.float64) * r[:, None])
            addends["s"].append(np.float64(st["s"]) * w)
        row_w.append(fold.weights["m"])
        folds.append(_read_only(pickle.loads(pickle.dumps(fold, protocol=5))))
    assert isinstance(folds[0].sums["m"], Scaled) and not isinstance(folds[1].sums["m"], Scaled)
    total = WeightedSum()
    for fold in folds:
        total.merge(fold)
    out = total.mean(fallback=prev)
    # the plain formula: each fold's own sum in client order, then the folds' sums in merge order
    fold_m = [addends["m"][0], addends["m"][1] + addends["m"][2] + addends["m"][3], addends["m"][4]]
    fold_s = [addends["s"][0], addends["s"][1] + addends["s"][2] + addends["s"][3], addends["s"][4]]
    w = row_w[0] + row_w[1] + row_w[2]
    m = (fold_m[0] + fold_m[1] + fold_m[2]) / np.where(w > 0, w, 1.0)[:, None]
    assert (w == 0).any()
    np.testing.assert_array_equal(out["m"], np.where((w > 0)[:, None], m, prev["m"].astype(np.float64))
                                  .astype(np.float32))
    np.testing.assert_array_equal(out["s"], np.float32((fold_s[0] + fold_s[1] + fold_s[2]) / total.weight))
