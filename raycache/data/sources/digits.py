"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): offline, for tests and demos."""

from __future__ import annotations

import hashlib

import numpy as np

from raycache.data.sources.base import Source, from_table, png_bytes

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load(cfg) -> Source:
    import pyarrow as pa
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (n, 8, 8), 0..16 -> 0..255
    encoded = [png_bytes(img) for img in images]
    labels = digits.target.astype(np.int64)
    h = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    table = pa.table({"image": encoded, "key": [f"digits[{i}]" for i in range(len(encoded))]})

    def to_ray(rows=None, **read_args):  # in memory: no read tasks
        return from_table(table if rows is None else table.take(rows))

    return Source("digits", labels, list(CLASS_NAMES), f"digits-{h}", to_ray)
