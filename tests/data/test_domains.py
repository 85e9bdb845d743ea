"""Domain sources and the domain partition (feature shift), and the leave-one-domain-out split."""

from pathlib import Path

import numpy as np
import pytest

from raycache.config import DataConfig
from raycache.data.partition import partition
from raycache.data.sources import open_source
from raycache.data.split import stratified_split
from raycache.errors import UserError


def domain_folder(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    from PIL import Image

    for domain, classes in counts.items():
        for cls, n in classes.items():
            (root / domain / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / domain / cls / f"{i}.png")
    return root


def test_imagefolder_by_domain_reads_two_levels(tmp_path):
    root = domain_folder(tmp_path, {"art": {"dog": 3, "cat": 2}, "photo": {"dog": 4}})
    src = open_source(DataConfig(dataset=str(root), partition="domain", clients=2))
    assert src.class_names == ["cat", "dog"] and src.domain_names == ["art", "photo"]
    assert src.labels.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert src.domains.tolist() == [0] * 5 + [1] * 4
    flat = open_source(DataConfig(dataset=str(root)))  # without domains: the domains read as classes
    assert flat.class_names == ["art", "photo"] and flat.domains is None


def test_domain_partition_is_one_client_per_domain():
    domains = np.array([2, 0, 0, 1, 2, 1, 0])
    labels = np.zeros(7, np.int64)
    parts = partition(labels, DataConfig(partition="domain", clients=3), 0, domains)
    assert [p.tolist() for p in parts] == [[1, 2, 6], [3, 5], [0, 4]]
    with pytest.raises(UserError, match=r"^data.clients: .* there are 3; set data.clients=3"):
        partition(labels, DataConfig(partition="domain", clients=4), 0, domains)
    with pytest.raises(UserError, match=r"^data.partition: domain needs a source with domains"):
        partition(labels, DataConfig(partition="domain", clients=3), 0, None)


def test_leave_one_domain_out_tests_on_exactly_that_domain():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    domains = np.repeat([0, 1, 2], 4)
    s = stratified_split(labels, ["a", "b"], 0.2, 1, seed=0, test_mask=domains == 2)
    assert s.test.tolist() == [8, 9, 10, 11]
    assert sorted(s.train.tolist() + s.server.tolist()) == list(range(8))
    assert len(s.server) == 2 and np.bincount(labels[s.server]).tolist() == [1, 1]


def test_parquet_domain_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycache.data.sources.base import png_bytes

    img = png_bytes(np.zeros((4, 4, 3), np.uint8))
    pq.write_table(pa.table({"image": [img] * 4, "label": [0, 1, 0, 1], "site": ["b", "a", "a", "b"]}),
                   tmp_path / "d.parquet")
    src = open_source(DataConfig(dataset=str(tmp_path / "d.parquet"), partition="domain", clients=2,
                                 domain_column="site"))
    assert src.domain_names == ["a", "b"] and src.domains.tolist() == [1, 0, 0, 1]
    with pytest.raises(UserError, match=r"has no column 'domain' for data.partition: domain"):
        open_source(DataConfig(dataset=str(tmp_path / "d.parquet"), partition="domain", clients=2))
