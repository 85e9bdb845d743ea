"""Dirichlet label skew: each class's samples split over clients by proportions ~ Dir(alpha)."""

from __future__ import annotations

import numpy as np


def partition(labels: np.ndarray, cfg, rng: np.random.Generator,
              domains: np.ndarray | None = None) -> list[np.ndarray]:
    from raycache.data.partition import fill_empty

    parts: list[list[int]] = [[] for _ in range(cfg.clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(cfg.clients, cfg.alpha))  # (clients,)
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    return fill_empty(parts, rng)
