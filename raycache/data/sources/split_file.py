"""A CoOp / Dassl split file over an image root: `data.split_file` names `split_zhou_<Dataset>.json`, whose
`train`, `val` and `test` lists hold `[path relative to data.dataset, label, class name]`. Tip-Adapter, CoOp,
PromptFL and most CLIP federated papers load their 11 datasets this way; the source keeps exactly those
splits and class names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from raycache.data.sources.base import Source
from raycache.errors import UserError

SPLITS = ("train", "val", "test")


def load(cfg) -> Source:
    path, root = Path(cfg.split_file), Path(cfg.dataset)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"data.split_file: cannot read {path} ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"data.split_file: {path} is not JSON") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in ("train", "test")):
        raise UserError(f"data.split_file: {path} needs 'train' and 'test' lists (and 'val') of "
                        f"[path, label, class name]")
    paths: list[str] = []
    labels: list[int] = []
    names: dict[int, str] = {}
    positions: dict[str, np.ndarray] = {}
    h = hashlib.sha256(f"{root.resolve()}|".encode())
    for split in SPLITS:
        start = len(paths)
        for i, item in enumerate(data.get(split) or []):
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
                raise UserError(f"data.split_file: {split}[{i}] in {path} is not [path, label, class name]")
            rel, label, name = item[0], item[1], str(item[2])
            if names.setdefault(label, name) != name:
                raise UserError(f"data.split_file: label {label} is called both {names[label]!r} and {name!r}")
            file = root / rel
            try:
                st = file.stat()
            except OSError:
                raise UserError(f"data.split_file: {split}[{i}] names {file}, which does not exist "
                                f"(is data.dataset the image root?)") from None
            h.update(f"{split}|{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            paths.append(str(file.resolve()))
            labels.append(label)
        positions[split] = np.arange(start, len(paths), dtype=np.int64)
    if not len(positions["train"]) or not len(positions["test"]):
        raise UserError(f"data.split_file: {path} has an empty 'train' or 'test' list")
    n = max(names) + 1
    missing = sorted(set(range(n)) - set(names))
    if missing:
        raise UserError(f"data.split_file: labels run to {n - 1} but label {missing[0]} never occurs in {path}")

    def to_ray(rows=None, **read_args):
        import ray.data

        ds = ray.data.read_binary_files(paths if rows is None else [paths[i] for i in rows], include_paths=True,
                                        ray_remote_args=read_args)
        return ds.rename_columns({"bytes": "image", "path": "key"}, **read_args)

    return Source(f"{root} ({path.name})", np.asarray(labels, dtype=np.int64), [names[c] for c in range(n)],
                  f"split-{h.hexdigest()[:16]}", to_ray, splits=positions)
