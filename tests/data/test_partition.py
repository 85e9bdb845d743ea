import numpy as np
import pytest

from raycache.config import DataConfig
from raycache.data.partition import class_counts, partition
from raycache.errors import UserError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 10 balanced classes


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


@pytest.mark.parametrize("kind", ["dirichlet", "iid", "shards"])
@pytest.mark.parametrize("clients", [1, 7, 100])
def test_every_sample_on_exactly_one_client(kind, clients):
    parts = partition(LABELS, cfg(partition=kind, clients=clients, alpha=0.1), seed=1)
    assert len(parts) == clients
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and np.array_equal(np.sort(joined), np.arange(len(LABELS)))


@pytest.mark.parametrize("kind", ["dirichlet", "iid", "shards"])
def test_deterministic_per_seed(kind):
    c = cfg(partition=kind, clients=20, alpha=0.3)
    a, b, other = partition(LABELS, c, 5), partition(LABELS, c, 5), partition(LABELS, c, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))


def mean_label_entropy(parts) -> float:
    counts = class_counts(parts, LABELS, 10).astype(float)
    p = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(-(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    ent = [np.mean([mean_label_entropy(partition(LABELS, cfg(clients=20, alpha=a), s)) for s in range(5)])
           for a in (0.05, 0.5, 5.0, 100.0)]
    assert ent[0] < ent[1] < ent[2] < ent[3]
    assert ent[3] > 0.95 * np.log(10)  # alpha 100 is about IID
    assert ent[0] < 0.5 * np.log(10)  # alpha 0.05 is strongly skewed


def test_iid_is_balanced():
    sizes = [len(p) for p in partition(LABELS, cfg(partition="iid", clients=8), 0)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("clients, k", [(10, 2), (7, 3), (30, 1)])
def test_shards_hold_at_most_k_classes_even_with_unequal_classes(clients, k):
    labels = np.repeat(np.arange(10), [30, 170, 55, 80, 101, 99, 140, 60, 45, 120])
    parts = partition(labels, cfg(partition="shards", clients=clients, shards_per_client=k), 3)
    assert all(1 <= len(np.unique(labels[p])) <= k for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_more_clients_than_samples_is_a_user_error():
    with pytest.raises(UserError, match="data.clients"):
        partition(LABELS[:5], cfg(clients=6), 0)


def test_min_partition_size_redraws_until_every_client_has_enough():
    """Flower Datasets' semantics: the whole Dirichlet draw is repeated until the smallest client holds at
    least `min_partition_size`; impossible asks end in one line naming the setting."""
    from raycache.errors import UserError

    labels = np.repeat(np.arange(10), 100)  # 1,000 samples
    for seed in (3, 4, 5):
        loose = partition(labels, DataConfig(clients=40, alpha=0.3), seed)
        assert min(len(p) for p in loose) < 5  # a single draw leaves clients with a handful
        parts = partition(labels, DataConfig(clients=40, alpha=0.3, min_partition_size=8), seed)
        assert min(len(p) for p in parts) >= 8
        assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    with pytest.raises(UserError, match=r"^data.min_partition_size: 30 samples per client not reached in 100 "):
        partition(labels, DataConfig(clients=40, alpha=0.3, min_partition_size=30), 0)


def test_self_balancing_caps_clients_at_the_mean_share():
    labels = np.repeat(np.arange(20), 50)  # 1,000 samples, mean share 100 for 10 clients
    plain = partition(labels, DataConfig(clients=10, alpha=0.1), 1)
    balanced = partition(labels, DataConfig(clients=10, alpha=0.1, self_balancing=True), 1)
    assert sorted(np.concatenate(balanced).tolist()) == list(range(1000))
    # a client stops receiving once over the mean, so it overshoots by at most one class's samples (50)
    assert max(len(p) for p in balanced) <= 100 + 50 < max(len(p) for p in plain)
