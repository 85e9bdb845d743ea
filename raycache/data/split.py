"""Seeded, stratified splits of a labelled dataset: the global test and validation splits, the server's
labelled hold-out and the training pool the partitioner spreads over clients; and, after partitioning, each
client's own held-out test samples.

Splits depend on `data.*` and the seed only, never on the method: every method sees the same clients and is
scored on the same samples. Validation selects (rounds, hyperparameters, trials); test only reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycache.errors import UserError


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # indices partitioned over clients
    test: np.ndarray  # global test split: reported, never used to select
    server: np.ndarray  # server-side labelled hold-out, `server_per_class` per class, class-major order
    val: np.ndarray  # global validation split: what rounds, settings and trials are selected on


def _share(fraction: float, n: int) -> int:
    """round(fraction * n), at least 1 when the fraction is positive."""
    return 0 if fraction <= 0 else max(1, int(round(fraction * n)))


def stratified_split(labels: np.ndarray, class_names: list[str], test_fraction: float, server_per_class: int,
                     seed: int, test_mask: np.ndarray | None = None, val_fraction: float = 0.0) -> Splits:
    """Per class: shuffle, take round(test_fraction * n) (at least 1) for test, round(val_fraction * n) (at
    least 1 when positive) for validation, then `server_per_class` for the server, the rest for training.
    Deterministic in `seed`.

    With `test_mask` (leave-one-domain-out) the test set is exactly the masked samples, and the validation,
    server and training splits are drawn from the rest (validation then comes from the training domains)."""
    rng = np.random.default_rng([seed, 0x5B1])
    train, test, server, val = [], [], [], []
    if test_mask is not None:
        test.append(np.flatnonzero(test_mask))
    for c, name in enumerate(class_names):
        pool = (labels == c) if test_mask is None else (labels == c) & ~test_mask
        idx = rng.permutation(np.flatnonzero(pool))
        n_test = 0 if test_mask is not None else _share(test_fraction, len(idx))
        n_val = _share(val_fraction, len(idx))
        need = n_test + n_val + server_per_class + 1  # at least one image per class left for the clients
        if len(idx) < need:
            where = "outside the test domain" if test_mask is not None else "in all"
            raise UserError(f"data.dataset: class {name!r} has {len(idx)} images {where}; needs at least {need} "
                            f"(data.test_fraction {n_test} + data.val_fraction {n_val} + data.server_per_class "
                            f"{server_per_class} + 1 for training)")
        test.append(idx[:n_test])
        val.append(idx[n_test:n_test + n_val])
        server.append(idx[n_test + n_val:n_test + n_val + server_per_class])
        train.append(idx[n_test + n_val + server_per_class:])
    return Splits(np.sort(np.concatenate(train)), np.sort(np.concatenate(test)), np.concatenate(server),
                  np.sort(np.concatenate(val)).astype(np.int64))


def predefined_split(labels: np.ndarray, class_names: list[str], named: dict[str, np.ndarray], server_per_class: int,
                     seed: int, val_fraction: float = 0.0) -> Splits:
    """A source's own splits (a CoOp split file, a dataset's train/validation/test): its test and validation
    as they are; from its training split, `server_per_class` per class (seeded) for the server, the rest for
    the clients. A source with no validation split of its own (Fashion-MNIST's train/test) gives up
    round(val_fraction * n) (at least 1 when positive) of each class of its training split instead, seeded."""
    rng = np.random.default_rng([seed, 0x5B1])
    pool = named["train"]
    own_val = named.get("val")
    carve = own_val is None or len(own_val) == 0
    train, server, val = [], [], []
    for c, name in enumerate(class_names):
        idx = rng.permutation(pool[labels[pool] == c])
        n_val = _share(val_fraction, len(idx)) if carve else 0
        if len(idx) < n_val + server_per_class + 1:
            raise UserError(f"data.dataset: class {name!r} has {len(idx)} training images; needs at least "
                            f"{n_val + server_per_class + 1} ({n_val} for validation, data.server_per_class "
                            f"{server_per_class} and 1 for training)")
        val.append(idx[:n_val])
        server.append(idx[n_val:n_val + server_per_class])
        train.append(idx[n_val + server_per_class:])
    val_rows = np.concatenate(val) if carve else own_val
    return Splits(np.sort(np.concatenate(train)), np.sort(named["test"]), np.concatenate(server),
                  np.sort(val_rows).astype(np.int64))


def few_shot_rows(labels: np.ndarray, n_classes: int, shots: int, seed: int) -> np.ndarray:
    """K positions per class drawn without replacement (seeded), class-major: CoOp's and Tip-Adapter's
    few-shot sample of a training split. ValueError naming the class when one has fewer than K."""
    rng = np.random.default_rng([seed, 0x5407])
    rows = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} training samples, needs {shots}")
        rows.append(np.sort(rng.choice(idx, size=shots, replace=False)))
    return np.concatenate(rows).astype(np.int64)


def few_shot(splits: Splits, labels: np.ndarray, n_classes: int, shots: int, seed: int) -> Splits:
    """Keep K training samples per class (seeded; CoOp's few-shot protocol), before partitioning."""
    from dataclasses import replace

    pool = splits.train
    try:
        rows = few_shot_rows(labels[pool], n_classes, shots, seed)
    except ValueError as err:
        raise UserError(f"data.shots_per_class: {err}") from None
    return replace(splits, train=np.sort(pool[rows]))


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `counts` that sum to `total` (largest-remainder rounding)."""
    exact = counts * (total / max(int(counts.sum()), 1))
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:total - int(out.sum())]] += 1
    return out


def client_holdout(parts: list[np.ndarray], labels: np.ndarray, fraction: float,
                   seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out round(fraction * n_k) of each client's own samples as its local test set, stratified by class
    within the client (largest-remainder shares); returns (training parts, test parts), positions in the same
    index space as `parts`. A client too small to keep at least one sample on each side is the user's to fix:
    UserError naming it (before any Ray start or MLflow run)."""
    if fraction <= 0:
        return parts, [np.zeros(0, np.int64) for _ in parts]
    rng = np.random.default_rng([seed, 0xC7])
    trains, tests = [], []
    for k, part in enumerate(parts):
        n = len(part)
        m = int(round(fraction * n))
        if m < 1 or n - m < 1:
            raise UserError(f"data.client_test_fraction: client {k} has {n} samples; {fraction:g} of them leaves "
                            f"{m} to test and {n - m} to train (each needs at least 1): lower the fraction or use "
                            f"fewer data.clients")
        classes, counts = np.unique(labels[part], return_counts=True)
        take = _largest_remainder(counts, m)
        held = [rng.permutation(part[labels[part] == c])[:t] for c, t in zip(classes, take)]
        test = np.sort(np.concatenate(held)).astype(np.int64)
        tests.append(test)
        trains.append(np.setdiff1d(part, test).astype(np.int64))
    return trains, tests
