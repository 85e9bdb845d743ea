import numpy as np
import pytest

from raycache.data.split import client_holdout, stratified_split
from raycache.errors import UserError


def test_split_is_disjoint_complete_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [50, 60, 70, 80])
    names = list("abcd")
    s = stratified_split(labels, names, 0.2, 5, seed=0, val_fraction=0.1)
    parts = [s.train, s.test, s.server, s.val]
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))  # disjoint and covering
    assert np.array_equal(np.bincount(labels[s.server]), [5, 5, 5, 5])
    assert np.array_equal(np.bincount(labels[s.test]), [10, 12, 14, 16])  # round(0.2 n) per class
    assert np.array_equal(np.bincount(labels[s.val]), [5, 6, 7, 8])  # round(0.1 n) per class
    again = stratified_split(labels, names, 0.2, 5, seed=0, val_fraction=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, [again.train, again.test, again.server, again.val]))
    other = stratified_split(labels, names, 0.2, 5, seed=1, val_fraction=0.1)
    assert not np.array_equal(s.test, other.test) and not np.array_equal(s.val, other.val)
    # adding a validation split leaves the test split exactly as it was
    assert np.array_equal(stratified_split(labels, names, 0.2, 5, seed=0).test, s.test)
    assert len(stratified_split(labels, names, 0.2, 5, seed=0).val) == 0


def test_too_small_class_names_the_class_and_the_keys():
    labels = np.array([0] * 30 + [1] * 5)
    with pytest.raises(UserError, match=r"class 'b' has 5 images in all; needs at least 6 \(data.test_fraction 1 "
                                        r"\+ data.val_fraction 1 \+ data.server_per_class 3 \+ 1 for training\)"):
        stratified_split(labels, ["a", "b"], 0.2, 3, seed=0, val_fraction=0.1)


def test_leave_one_domain_out_validates_on_the_training_domains():
    labels = np.tile([0, 1], 12)
    domains = np.repeat([0, 1, 2], 8)
    s = stratified_split(labels, ["a", "b"], 0.2, 1, seed=0, test_mask=domains == 2, val_fraction=0.25)
    assert s.test.tolist() == list(range(16, 24))
    assert set(domains[s.val]) <= {0, 1} and np.bincount(labels[s.val]).tolist() == [2, 2]
    assert sorted(np.concatenate([s.train, s.server, s.val]).tolist()) == list(range(16))


def test_client_holdout_is_per_client_stratified_disjoint_and_covering():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    parts = [np.arange(0, 120), np.arange(120, 180), np.arange(180, 200)]
    train, test = client_holdout(parts, labels, 0.25, seed=0)
    for part, tr, te in zip(parts, train, test):
        assert np.array_equal(np.sort(np.concatenate([tr, te])), part)  # a client's own samples, split in two
        assert len(np.intersect1d(tr, te)) == 0
        assert len(te) == round(0.25 * len(part))
        # stratified: each class's share of the test set is within one sample of its share of the client
        have = np.bincount(labels[part], minlength=3) * 0.25
        assert np.all(np.abs(np.bincount(labels[te], minlength=3) - have) < 1.0)
    again = client_holdout(parts, labels, 0.25, seed=0)[1]
    assert all(np.array_equal(a, b) for a, b in zip(test, again))
    none = client_holdout(parts, labels, 0.0, seed=0)
    assert none[0] is parts and all(len(t) == 0 for t in none[1])


def test_a_client_too_small_for_a_local_test_set_is_named():
    parts = [np.arange(10), np.arange(10, 12)]
    with pytest.raises(UserError, match=r"^data.client_test_fraction: client 1 has 2 samples; 0.2 of them leaves 0 "
                                        r"to test"):
        client_holdout(parts, np.zeros(12, np.int64), 0.2, seed=0)
