"""Dirichlet label skew: each class's samples split over clients by proportions ~ Dir(alpha).

As Flower Datasets' DirichletPartitioner: with `min_partition_size` the whole partition is re-drawn until
every client holds at least that many samples (at most `MAX_DRAWS` draws, then the user is told which
setting to change); with `self_balancing`, a client already holding more than the mean share gets
proportion 0 for the classes drawn after that.
"""

from __future__ import annotations

import numpy as np

from raycache.errors import UserError

MAX_DRAWS = 100


def _draw(labels: np.ndarray, clients: int, alpha: float, balance: bool,
          rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(clients)]
    mean = len(labels) / clients
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(clients, alpha))  # (clients,)
        if balance:
            full = np.array([len(p) > mean for p in parts])
            if not full.all():
                props = np.where(full, 0.0, props)
                props /= props.sum()
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    return parts


def partition(labels: np.ndarray, cfg, rng: np.random.Generator,
              domains: np.ndarray | None = None) -> list[np.ndarray]:
    from raycache.data.partition import fill_empty

    need = cfg.min_partition_size
    for _ in range(MAX_DRAWS if need > 0 else 1):
        parts = _draw(labels, cfg.clients, cfg.alpha, cfg.self_balancing, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= need:
            break
    else:
        raise UserError(f"data.min_partition_size: {need} samples per client not reached in {MAX_DRAWS} Dirichlet "
                        f"draws ({cfg.clients} clients, {len(labels)} samples, alpha {cfg.alpha:g}; the last "
                        f"draw's smallest client had {smallest}); lower it, raise data.alpha or use fewer clients")
    return fill_empty(parts, rng)
