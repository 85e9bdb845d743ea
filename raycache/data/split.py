"""Seeded, stratified split of a labelled dataset into train (for clients), test and a server hold-out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycache.errors import UserError


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # indices partitioned over clients
    test: np.ndarray  # global test split
    server: np.ndarray  # server-side labelled hold-out, `server_per_class` per class, class-major order


def stratified_split(labels: np.ndarray, class_names: list[str], test_fraction: float, server_per_class: int,
                     seed: int, test_mask: np.ndarray | None = None) -> Splits:
    """Per class: shuffle, take round(test_fraction * n) (at least 1) for test, then `server_per_class`
    for the server, the rest for training. Deterministic in `seed`.

    With `test_mask` (leave-one-domain-out) the test set is exactly the masked samples, and the server and
    training splits are drawn from the rest."""
    rng = np.random.default_rng([seed, 0x5B1])
    train, test, server = [], [], []
    if test_mask is not None:
        test.append(np.flatnonzero(test_mask))
    for c, name in enumerate(class_names):
        pool = (labels == c) if test_mask is None else (labels == c) & ~test_mask
        idx = rng.permutation(np.flatnonzero(pool))
        n_test = 0 if test_mask is not None else max(1, int(round(test_fraction * len(idx))))
        need = n_test + server_per_class + 1  # at least one image per class left for the clients
        if len(idx) < need:
            raise UserError(f"data.dataset: class {name!r} has {len(idx)} images outside the test set; needs at "
                            f"least {need} (test {n_test} + data.server_per_class {server_per_class} + 1 for "
                            f"training)")
        test.append(idx[:n_test])
        server.append(idx[n_test:n_test + server_per_class])
        train.append(idx[n_test + server_per_class:])
    return Splits(np.sort(np.concatenate(train)), np.sort(np.concatenate(test)), np.concatenate(server))
