"""Partitioners: `fn(labels, cfg, rng, domains) -> list of index arrays`, one per client. One line registers
one."""

from __future__ import annotations

import numpy as np

from raycache.data.partition import dirichlet, domain, iid, shards
from raycache.errors import UserError

PARTITIONERS = {
    "dirichlet": dirichlet.partition,
    "iid": iid.partition,
    "shards": shards.partition,
    "domain": domain.partition,
}


def partition(labels: np.ndarray, cfg, seed: int, domains: np.ndarray | None = None) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 over `cfg.clients` clients; every position lands on exactly one,
    and every client gets at least one. `cfg` is the `data` config section; `domains` the samples'
    domains, for sources that have them."""
    if cfg.clients > len(labels):
        raise UserError(f"data.clients: {cfg.clients} clients but only {len(labels)} training samples")
    rng = np.random.default_rng([seed, 0xC1])
    parts = PARTITIONERS[cfg.partition](labels, cfg, rng, domains)
    return [np.sort(p).astype(np.int64) for p in parts]


def class_counts(parts: list[np.ndarray], labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(clients, classes) matrix of sample counts."""
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])


def fill_empty(parts: list[list[int]] | list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Give every empty client one sample taken from the currently largest client (keeps the skew)."""
    parts = [list(p) for p in parts]
    for i in range(len(parts)):
        if not parts[i]:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            parts[i].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.asarray(p, dtype=np.int64) for p in parts]
