"""An ImageFolder directory: root/<class>/*.png|jpg|jpeg, classes in sorted order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from raycache.data.sources.base import Source
from raycache.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg"}


def load(cfg) -> Source:
    root = Path(cfg.dataset)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"data.dataset: {root} has no class folders (expected root/<class>/*.png|jpg)")
    paths: list[str] = []
    labels: list[int] = []
    h = hashlib.sha256()
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise UserError(f"data.dataset: class {name!r} in {root} has no images (.png/.jpg)")
        for p in files:
            if not os.access(p, os.R_OK):
                raise UserError(f"data.dataset: image {p} is not readable")
            st = p.stat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
            paths.append(str(p.resolve()))
            labels.append(label)

    def to_ray():
        import ray.data

        ds = ray.data.read_binary_files(paths, include_paths=True)
        return ds.rename_columns({"bytes": "image", "path": "key"})

    return Source(str(root), np.asarray(labels, dtype=np.int64), classes, f"folder-{h.hexdigest()[:16]}", to_ray)
