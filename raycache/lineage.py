"""What a run read, as MLflow dataset inputs: the training rows its clients hold, the validation rows that
select, the test rows that report, and the synthetic set a cache's keys came from. Each has a digest of its
exact rows (the source's fingerprint, which changes with any image or label, and the row indices), so two
runs on different data, or on different splits of the same data, are told apart in the UI."""

from __future__ import annotations

import hashlib

import numpy as np

from raycache.tracking import DatasetRecord


def digest(fingerprint: str, rows: np.ndarray) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def split_records(source, dataset: str, splits) -> list[DatasetRecord]:
    """The train / validation / test splits of `source` (read from `dataset`: a path or a built-in name)."""
    out = []
    for context, rows in (("training", splits.train), ("validation", splits.val), ("test", splits.test)):
        if len(rows):
            out.append(DatasetRecord(f"{source.name}/{context}", digest(source.fingerprint, rows), dataset,
                                     len(rows), context))
    return out


def synthetic_record(store) -> DatasetRecord:
    """The synthetic set a cache's keys came from: its folder, the digest of its settings (generator, prompts,
    seed, steps, ...: what decides every image)."""
    from raycache.synth.plan import fingerprint

    s = store.settings
    return DatasetRecord(f"synthetic/{s['generator']}", fingerprint(s), str(store.out),
                         len(s["classes"]) * s["per_class"], "cache")
