"""Pathological shards (McMahan et al.): each class is cut into shards, each client gets k shards, so a
client holds at most k classes.

Shards are cut within classes (never across a class boundary), in numbers proportional to class sizes.
If there are more classes than clients x k, every class still gets one shard and some clients get more
than k, so that every sample still lands on a client.
"""

from __future__ import annotations

import numpy as np


def _shards_per_class(sizes: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder split of `total` shards over classes, at least 1 and at most `size` per class."""
    quota = sizes / sizes.sum() * total
    n = np.clip(np.floor(quota).astype(int), 1, sizes)
    for c in np.argsort(-(quota - np.floor(quota))):
        if n.sum() >= total:
            break
        if n[c] < sizes[c]:
            n[c] += 1
    return n


def partition(labels: np.ndarray, cfg, rng: np.random.Generator,
              domains: np.ndarray | None = None) -> list[np.ndarray]:
    from raycache.data.partition import fill_empty

    classes = np.unique(labels)
    sizes = np.array([np.sum(labels == c) for c in classes])
    per_class = _shards_per_class(sizes, cfg.clients * cfg.shards_per_client)
    shards = [s for c, n in zip(classes, per_class)
              for s in np.array_split(rng.permutation(np.flatnonzero(labels == c)), n)]
    order = rng.permutation(len(shards))
    return fill_empty([np.concatenate([shards[s] for s in order[i::cfg.clients]] or [np.array([], int)])
                       for i in range(cfg.clients)], rng)
