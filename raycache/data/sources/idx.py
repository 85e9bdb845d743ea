"""MNIST-style idx files: a folder holding `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
`t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]` (Fashion-MNIST, MNIST, KMNIST share the
format). The built-in `fashion_mnist` reads Debian's `dataset-fashion-mnist` package (offline: 60,000 training
and 10,000 test images, 28x28 grey, 10 classes). The dataset's own train/test split is kept; validation is
carved from its training split (`data.val_fraction`).

The idx format (LeCun's): a big-endian header of two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions, then one big-endian uint32 per dimension, then the data in row-major order.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from raycache.data.sources.base import Source, from_table
from raycache.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
PARTS = {"train": "train", "test": "t10k"}


def _find(root: Path, stem: str) -> Path | None:
    return next((p for p in (root / f"{stem}.gz", root / stem) if p.is_file()), None)


def is_idx_folder(root: Path) -> bool:
    return root.is_dir() and _find(root, "train-images-idx3-ubyte") is not None


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array an idx file holds; UserError naming the file when it is not one."""
    try:
        data = (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")).read()
    except (OSError, EOFError) as err:
        raise UserError(f"data.dataset: cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"data.dataset: {path} is not an idx file of unsigned bytes")
    ndim = data[3]
    head = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != head + int(np.prod(shape)):
        raise UserError(f"data.dataset: {path} holds {len(data) - head} bytes of data for shape {shape}")
    return np.frombuffer(data, np.uint8, offset=head).reshape(shape)


def pgm_bytes(image: np.ndarray) -> bytes:
    """An (H, W) uint8 image as binary PGM bytes: a 15-byte header and the pixels, readable by PIL, and made
    70,000 times in a fraction of a second (PNG-encoding Fashion-MNIST takes seconds)."""
    h, w = image.shape
    return b"P5\n%d %d\n255\n" % (w, h) + image.tobytes()


def load(cfg, root: Path | None = None, class_names: list[str] | None = None) -> Source:
    root = Path(cfg.dataset) if root is None else root
    images, labels, splits, at = [], [], {}, 0
    h = hashlib.sha256()
    for split, prefix in PARTS.items():
        img_path = _find(root, f"{prefix}-images-idx3-ubyte")
        lab_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        if img_path is None or lab_path is None:
            missing = f"{prefix}-{'images-idx3' if img_path is None else 'labels-idx1'}-ubyte[.gz]"
            raise UserError(f"data.dataset: {root} has no {missing}")
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"data.dataset: {img_path} ({x.shape}) and {lab_path} ({y.shape}) do not pair up")
        splits[split] = np.arange(at, at + len(y), dtype=np.int64)
        at += len(y)
        images.append(x)
        labels.append(y.astype(np.int64))
        h.update(x.tobytes())
        h.update(y.tobytes())
    x, y = np.concatenate(images), np.concatenate(labels)
    n_classes = int(y.max()) + 1
    names = class_names if class_names is not None and len(class_names) == n_classes else \
        [str(c) for c in range(n_classes)]
    keys = [f"{root.name}[{s}][{i}]" for s in PARTS for i in range(len(splits[s]))]

    def to_ray(rows=None, **read_args):  # in memory: no read tasks
        import pyarrow as pa

        picked = np.arange(len(y)) if rows is None else np.asarray(rows)
        return from_table(pa.table({"image": [pgm_bytes(x[i]) for i in picked], "key": [keys[i] for i in picked]}))

    return Source(str(root), y, names, f"idx-{h.hexdigest()[:16]}", to_ray, splits=splits)


def fashion_mnist(cfg) -> Source:
    if not is_idx_folder(DEBIAN_FASHION_MNIST):
        raise UserError(f"data.dataset: fashion_mnist reads {DEBIAN_FASHION_MNIST}, which is missing: install "
                        f"Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or set "
                        f"data.dataset to a folder of the four idx files")
    return load(cfg, DEBIAN_FASHION_MNIST, FASHION_CLASSES)
