"""Pathological shards (McMahan et al.): sort by label, cut into clients*k shards, k shards per client."""

from __future__ import annotations

import numpy as np


def partition(labels: np.ndarray, cfg, rng: np.random.Generator) -> list[np.ndarray]:
    from raycache.data.partition import fill_empty

    order = np.argsort(labels, kind="stable")
    n_shards = cfg.clients * cfg.shards_per_client
    shards = np.array_split(order, n_shards)
    assignment = rng.permutation(n_shards).reshape(cfg.clients, cfg.shards_per_client)
    return fill_empty([np.concatenate([shards[s] for s in row]) for row in assignment], rng)
