"""An ImageFolder directory: root/<class>/*.png|jpg|jpeg, classes in sorted order.

With domains (`data.partition: domain` or `data.test_domain`), one more level comes first:
root/<domain>/<class>/*.png|jpg, as PACS, VLCS and Office-Home ship. The classes are the union over domains.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from raycache.data.sources.base import Source
from raycache.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg"}


def _subdirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def images_under(folder: Path) -> list[Path]:
    """The image files (by extension) anywhere under `folder`, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def load(cfg) -> Source:
    root = Path(cfg.dataset)
    with_domains = cfg.partition == "domain" or cfg.test_domain is not None
    if with_domains:
        domain_names = _subdirs(root)
        if not domain_names:
            raise UserError(f"data.dataset: {root} has no domain folders (expected root/<domain>/<class>/*.png "
                            f"for data.partition: domain)")
        groups = [(d, root / d) for d in domain_names]
        classes = sorted({c for d, folder in groups for c in _subdirs(folder)})
        if not classes:
            raise UserError(f"data.dataset: {root} has no class folders under its domains "
                            f"(expected root/<domain>/<class>/*.png)")
    else:
        domain_names, groups = None, [(None, root)]
        classes = _subdirs(root)
        if not classes:
            raise UserError(f"data.dataset: {root} has no class folders (expected root/<class>/*.png|jpg)")
    paths: list[str] = []
    labels: list[int] = []
    domains: list[int] = []
    h = hashlib.sha256()
    for d, (domain, folder) in enumerate(groups):
        for label, name in enumerate(classes):
            if not (folder / name).is_dir():
                continue  # a domain may lack a class; the class must exist somewhere (checked by Source)
            files = images_under(folder / name)
            if not files and domain is None:
                raise UserError(f"data.dataset: class {name!r} in {root} has no images (.png/.jpg)")
            for p in files:
                if not os.access(p, os.R_OK):
                    raise UserError(f"data.dataset: image {p} is not readable")
                st = p.stat()
                h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
                paths.append(str(p.resolve()))
                labels.append(label)
                domains.append(d)

    def to_ray(rows=None, **read_args):
        import ray.data

        ds = ray.data.read_binary_files(paths if rows is None else [paths[i] for i in rows], include_paths=True,
                                        ray_remote_args=read_args)
        return ds.rename_columns({"bytes": "image", "path": "key"}, **read_args)

    return Source(str(root), np.asarray(labels, dtype=np.int64), classes, f"folder-{h.hexdigest()[:16]}", to_ray,
                  np.asarray(domains, dtype=np.int64) if with_domains else None, domain_names)
