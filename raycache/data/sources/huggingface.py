"""Hugging Face `datasets`: a folder written by `save_to_disk` (a Dataset or a DatasetDict), or `hf:<repo id>`
(`hf:<repo id>:<config>`) loaded through the `datasets` cache. The image column (`data.image_column`, else
the first `Image` feature) and the label column's `ClassLabel` names make the source; a DatasetDict's own
train / validation / test splits are kept as they are.

Offline: with `HF_HUB_OFFLINE=1` (as on machines without network) only what the cache already holds loads,
and a missing download is one line naming the dataset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from raycache.data.sources.base import Source, from_table
from raycache.errors import UserError

PREFIX = "hf:"
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def is_saved(path: Path) -> bool:
    """A folder `save_to_disk` wrote: a DatasetDict's dataset_dict.json, or a Dataset's state.json."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _open(cfg):
    import datasets

    datasets.disable_progress_bars()
    if cfg.dataset.startswith(PREFIX):
        repo, _, config = cfg.dataset[len(PREFIX):].partition(":")
        try:
            return datasets.load_dataset(repo, config or None)
        except Exception as err:  # noqa: BLE001 (offline misses, unknown repos: all one line for the user)
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"data.dataset: cannot load {cfg.dataset} from the Hugging Face cache or hub "
                            f"({first})") from None
    try:
        return datasets.load_from_disk(cfg.dataset)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"data.dataset: {cfg.dataset} is not a readable save_to_disk folder "
                        f"({type(err).__name__})") from None


def load(cfg) -> Source:
    import datasets

    loaded = _open(cfg)
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"all": loaded}
    first = next(iter(parts.values()))
    features = first.features
    image_col = cfg.image_column if cfg.image_column in features else next(
        (k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise UserError(f"data.image_column: {cfg.dataset} has no column {cfg.image_column!r} and no Image feature "
                        f"(columns: {', '.join(features)})")
    label = features.get(cfg.label_column)
    if not isinstance(label, datasets.ClassLabel):
        raise UserError(f"data.label_column: {cfg.dataset}'s column {cfg.label_column!r} is not a ClassLabel "
                        f"(columns: {', '.join(features)})")
    images, labels, keys, positions = [], [], [], {}
    h = hashlib.sha256(cfg.dataset.encode())
    for name, ds in parts.items():
        if ds.features.get(cfg.label_column) != label:
            raise UserError(f"data.label_column: split {name!r} of {cfg.dataset} has other class names")
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        start = len(labels)
        for i, (img, y) in enumerate(zip(ds[image_col], ds[cfg.label_column])):
            data = img.get("bytes") if isinstance(img, dict) else None
            if data is None and isinstance(img, dict) and img.get("path"):
                data = Path(img["path"]).read_bytes()
            images.append(data)
            labels.append(y)
            keys.append(f"{cfg.dataset}[{name}][{i}]")
        bad = [y for y in labels[start:] if not 0 <= y < label.num_classes]
        if bad:
            raise UserError(f"data.label_column: split {name!r} of {cfg.dataset} has label {bad[0]} outside its "
                            f"{label.num_classes} classes (an unlabelled split?); save the labelled splits only")
        h.update(f"{name}|{ds._fingerprint}\n".encode())
        if name in SPLIT_NAMES:
            positions[SPLIT_NAMES[name]] = np.arange(start, len(labels), dtype=np.int64)
    splits = positions if {"train", "test"} <= set(positions) else None

    def to_ray(rows=None, **read_args):  # in memory: no read tasks
        import pyarrow as pa

        picked = range(len(images)) if rows is None else rows
        return from_table(pa.table({"image": [images[i] for i in picked], "key": [keys[i] for i in picked]}))

    return Source(cfg.dataset, np.asarray(labels, dtype=np.int64), list(label.names), f"hf-{h.hexdigest()[:16]}",
                  to_ray, splits=splits)
