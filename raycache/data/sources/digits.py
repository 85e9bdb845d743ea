"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): offline, for tests and demos."""

from __future__ import annotations

import hashlib

import numpy as np

from raycache.data.sources.base import Source, from_table, png_bytes

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 8, 8) float 0..16, labels (n,)): scikit-learn's bundled `digits.csv.gz` read as its
    `load_digits` reads it, without importing scikit-learn (67 MB in the driver, which needs only these
    1,797 rows); through `load_digits` if the file is not where that version keeps it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load(cfg) -> Source:
    images, target = digits_arrays()
    images = (images * (255.0 / 16.0)).round().astype(np.uint8)  # (n, 8, 8), 0..16 -> 0..255
    labels = target.astype(np.int64)
    h = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    made = []  # the images as PNG files, made at the first read: opening the source is then only its labels
    # (a sweep's trial opens it, and reads the features its driver encoded, never the images; PNG-encoding
    # 1,797 images takes about 0.3 s)

    def to_ray(rows=None, **read_args):  # in memory: no read tasks
        if not made:
            import pyarrow as pa

            made.append(pa.table({"image": [png_bytes(img) for img in images],
                                  "key": [f"digits[{i}]" for i in range(len(images))]}))
        table = made[0]
        return from_table(table if rows is None else table.take(rows))

    return Source("digits", labels, list(CLASS_NAMES), f"digits-{h}", to_ray)
