"""MNIST-style idx folders (Fashion-MNIST's format) as a source: the files' pixels and labels, the dataset's
own train/test split, validation carved from its training split."""

import gzip
import struct

import numpy as np
import pytest

from raycache.config import DataConfig
from raycache.data.sources import idx, open_source
from raycache.data.sources.base import decode_image
from raycache.data.split import predefined_split
from raycache.errors import UserError


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """LeCun's idx layout, written from its description: 0, 0, type 0x08 (ubyte), ndim, big-endian uint32
    dims, then the bytes."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(3)
    parts = {}
    for prefix, n, compress in (("train", 60, True), ("t10k", 20, False)):
        x = rng.integers(0, 256, (n, 5, 7), dtype=np.uint8)  # not square: rows and columns must not swap
        y = np.arange(n) % 3
        write_idx(tmp_path / (f"{prefix}-images-idx3-ubyte" + (".gz" if compress else "")), x, compress)
        write_idx(tmp_path / (f"{prefix}-labels-idx1-ubyte" + (".gz" if compress else "")), y, compress)
        parts[prefix] = (x, y)
    return tmp_path, parts


def test_an_idx_folder_reads_as_its_pixels_labels_and_split(ray_session, idx_folder):
    root, parts = idx_folder
    source = open_source(DataConfig(dataset=str(root)))
    x = np.concatenate([parts["train"][0], parts["t10k"][0]])
    y = np.concatenate([parts["train"][1], parts["t10k"][1]])
    np.testing.assert_array_equal(source.labels, y)
    np.testing.assert_array_equal(source.splits["train"], np.arange(60))
    np.testing.assert_array_equal(source.splits["test"], np.arange(60, 80))
    assert source.class_names == ["0", "1", "2"]
    rows = source.to_ray().take_all()
    assert len(rows) == 80
    for i in (0, 7, 59, 60, 79):
        img = np.asarray(decode_image(rows[i]["image"], rows[i]["key"]))  # RGB, (H, W, 3)
        assert img.shape == (5, 7, 3)
        for channel in range(3):
            np.testing.assert_array_equal(img[..., channel], x[i])
    picked = source.to_ray([61, 2]).take_all()
    assert [r["key"] for r in picked] == [rows[61]["key"], rows[2]["key"]]


def test_a_file_that_is_not_idx_is_named(idx_folder):
    root, _ = idx_folder
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")  # type 0x0D: float
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte is not an idx file of unsigned bytes"):
        open_source(DataConfig(dataset=str(root)))
    (root / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 30]) + bytes(20))  # 30 said, 20 there
    with pytest.raises(UserError, match=r"holds 20 bytes of data for shape \(30,\)"):
        open_source(DataConfig(dataset=str(root)))
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="has no t10k-labels-idx1-ubyte"):
        open_source(DataConfig(dataset=str(root)))


def test_validation_is_carved_from_the_training_split_when_a_dataset_has_none():
    labels = np.array([0, 1] * 50 + [0, 1] * 10)  # 100 training rows (50 per class), 20 test rows
    named = {"train": np.arange(100), "test": np.arange(100, 120)}
    s = predefined_split(labels, ["a", "b"], named, server_per_class=2, seed=0, val_fraction=0.2)
    np.testing.assert_array_equal(s.test, np.arange(100, 120))
    assert np.bincount(labels[s.val]).tolist() == [10, 10]  # 0.2 of each class's 50
    assert np.bincount(labels[s.server]).tolist() == [2, 2]
    together = np.concatenate([s.train, s.val, s.server])
    assert sorted(together.tolist()) == list(range(100))  # a partition of the training split, test untouched
    again = predefined_split(labels, ["a", "b"], named, server_per_class=2, seed=0, val_fraction=0.2)
    np.testing.assert_array_equal(again.val, s.val)
    other = predefined_split(labels, ["a", "b"], named, server_per_class=2, seed=1, val_fraction=0.2)
    assert not np.array_equal(other.val, s.val)
    own = predefined_split(labels, ["a", "b"], {**named, "val": np.arange(90, 100)}, 2, 0, val_fraction=0.2)
    np.testing.assert_array_equal(own.val, np.arange(90, 100))  # a dataset's own validation split stands


@pytest.mark.skipif(not idx.is_idx_folder(idx.DEBIAN_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_the_debian_fashion_mnist_package():
    source = open_source(DataConfig(dataset="fashion_mnist"))
    assert len(source.labels) == 70_000 and len(source.splits["test"]) == 10_000
    # Fashion-MNIST's published facts: 6,000 training and 1,000 test images per class; the first training
    # image is an ankle boot
    assert np.bincount(source.labels[source.splits["train"]]).tolist() == [6000] * 10
    assert np.bincount(source.labels[source.splits["test"]]).tolist() == [1000] * 10
    assert source.class_names[source.labels[0]] == "ankle boot"
