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
