import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycache.config import DataConfig
from raycache.data.sources import open_source
from raycache.data.sources.base import decode_image, png_bytes
from raycache.errors import UserError


def test_digits_builtin():
    src = open_source(DataConfig(dataset="digits"))
    assert len(src.labels) == 1797 and len(src.class_names) == 10
    assert np.array_equal(np.bincount(src.labels) > 170, np.ones(10, bool))


def test_digits_are_scikit_learns_without_importing_it():
    """The driver reads scikit-learn's bundled file itself: the same images and labels as `load_digits`
    (which the test imports), and a fresh interpreter that opens the source has no scikit-learn."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from raycache.data.sources.digits import digits_arrays

    images, labels = digits_arrays()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(labels, ref.target)
    code = ("import sys; from raycache.config import DataConfig; from raycache.data.sources import open_source; "
            "s = open_source(DataConfig(dataset='digits')); print(len(s.labels), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1797", "False"]


def test_image_folder(image_folder):
    src = open_source(DataConfig(dataset=str(image_folder)))
    assert src.class_names == ["cat", "dog", "owl"]
    assert np.array_equal(np.bincount(src.labels), [24, 24, 24])
    before = src.fingerprint
    (image_folder / "cat" / "000.png").write_bytes(png_bytes(np.zeros((5, 5), np.uint8)))
    assert open_source(DataConfig(dataset=str(image_folder))).fingerprint != before


def test_parquet_with_int_and_string_labels(tmp_path):
    imgs = [png_bytes(np.full((6, 6), i * 20, np.uint8)) for i in range(6)]
    pq.write_table(pa.table({"image": imgs, "label": [0, 1, 2, 0, 1, 2], "class_name": list("abcabc")}),
                   tmp_path / "a.parquet")
    src = open_source(DataConfig(dataset=str(tmp_path / "a.parquet")))
    assert src.class_names == ["a", "b", "c"] and list(src.labels) == [0, 1, 2, 0, 1, 2]
    pq.write_table(pa.table({"img": imgs, "y": ["owl", "cat"] * 3}), tmp_path / "b.parquet")
    src = open_source(DataConfig(dataset=str(tmp_path / "b.parquet"), image_column="img", label_column="y"))
    assert src.class_names == ["cat", "owl"] and list(src.labels) == [1, 0] * 3


def test_bad_sources_name_the_problem(tmp_path, image_folder):
    with pytest.raises(UserError, match="not found"):
        open_source(DataConfig(dataset=str(tmp_path / "nope")))
    (image_folder / "empty").mkdir()
    with pytest.raises(UserError, match="class 'empty' .* has no images"):
        open_source(DataConfig(dataset=str(image_folder)))
    pq.write_table(pa.table({"pixels": [b"x"], "label": [0]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match="no column 'image'"):
        open_source(DataConfig(dataset=str(tmp_path / "c.parquet")))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="broken.parquet"):
        open_source(DataConfig(dataset=str(tmp_path / "broken.parquet")))


def test_decode_rejects_corrupt_and_truncated_images():
    good = png_bytes(np.zeros((8, 8), np.uint8))
    assert decode_image(good, "ok").size == (8, 8)
    with pytest.raises(UserError, match="cannot decode image x.png"):
        decode_image(b"not an image", "x.png")
    with pytest.raises(UserError, match="y.png"):
        decode_image(good[: len(good) // 2], "y.png")
    with pytest.raises(UserError, match="empty"):
        decode_image(b"", "z.png")
