"""The datasets the CLIP few-shot and federated literature uses, offline: CoOp / Dassl split files, class
names as prompts want them, Hugging Face `save_to_disk` folders, and CoOp's few-shot sampling. Each dataset
is built by the test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raycache.config import DataConfig

from raycache.config_file import load_config
from raycache.data.sources import open_source
from raycache.errors import UserError
from conftest import write_png

CLASSES = ["ankle_boot", "n01440764", "sea_lion"]


def _coop(tmp_path, per_split=(6, 2, 3)):
    """An image root with a split_zhou-style JSON: each split lists [relative path, label, class name]."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    split = {}
    for name, n in zip(("train", "val", "test"), per_split):
        items = []
        for label, cls in enumerate(CLASSES):
            for i in range(n):
                rel = f"{cls}/{name}_{i}.png"
                write_png(root / rel, rng, value=40 + 60 * label)
                items.append([rel, label, cls.replace("n01440764", "tench")])
        split[name] = items
    path = tmp_path / "split_zhou_Toy.json"
    path.write_text(json.dumps(split))
    return root, path, split


def test_a_coop_split_file_gives_exactly_its_splits_and_class_names(tmp_path, ray_session):
    from raycache.experiment import prepare

    root, path, split = _coop(tmp_path)
    src = open_source(DataConfig(dataset=str(root), split_file=str(path)))
    assert src.class_names == ["ankle boot", "tench", "sea lion"]  # the file's names, underscores as spaces
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 18, "val": 6, "test": 9}
    cfg = load_config(None, [f"data.dataset={root}", f"data.split_file={path}", "data.server_per_class=1",
                             "data.clients=2", "method.name=zeroshot", "model.name=tiny"])
    prep = prepare(cfg)
    keys = np.array([p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in _paths(src)])
    assert sorted(keys[prep.splits.test]) == sorted(rel for rel, _, _ in split["test"])
    assert sorted(keys[prep.splits.val]) == sorted(rel for rel, _, _ in split["val"])
    train_and_server = np.concatenate([prep.splits.train, prep.splits.server])
    assert sorted(keys[train_and_server]) == sorted(rel for rel, _, _ in split["train"])
    assert len(prep.splits.server) == 3  # one per class, from the training split only


def _paths(src):
    return [r["key"] for r in src.to_ray().take_all()]


def test_shots_per_class_takes_k_of_each_class_from_the_training_split(tmp_path):
    from raycache.experiment import prepare

    root, path, _ = _coop(tmp_path)
    base = [f"data.dataset={root}", f"data.split_file={path}", "data.server_per_class=0", "data.clients=2",
            "data.partition=iid", "method.name=zeroshot", "model.name=tiny"]
    prep = prepare(load_config(None, base + ["data.shots_per_class=4"]))
    labels = prep.source.labels
    assert np.bincount(labels[prep.splits.train]).tolist() == [4, 4, 4]
    assert set(prep.splits.train) <= set(prep.source.splits["train"])
    assert sum(len(p) for p in prep.parts) == 12  # the few shots are what the clients share out
    again = prepare(load_config(None, base + ["data.shots_per_class=4"]))
    np.testing.assert_array_equal(again.splits.train, prep.splits.train)  # seeded
    other = prepare(load_config(None, base + ["data.shots_per_class=4", "seed=1"]))
    assert not np.array_equal(other.splits.train, prep.splits.train)
    with pytest.raises(UserError, match=r"^data.shots_per_class: class 0 has 6 training samples, needs 7"):
        prepare(load_config(None, base + ["data.shots_per_class=7"]))


def test_bad_split_files_are_one_line(tmp_path):
    root, path, split = _coop(tmp_path)
    bad = tmp_path / "bad.json"
    for content, match in [("{", "is not JSON"), (json.dumps({"train": []}), "needs 'train' and 'test' lists"),
                           (json.dumps({**split, "test": [["x.png", 0]]}), r"test\[0\] .* is not \[path, label"),
                           (json.dumps({**split, "test": [["missing.png", 0, "ankle_boot"]]}), "does not exist"),
                           (json.dumps({**split, "test": [[split["test"][0][0], 0, "shoe"]]}),
                            "label 0 is called both 'ankle_boot' and 'shoe'")]:
        bad.write_text(content)
        with pytest.raises(UserError, match=match) as info:
            open_source(DataConfig(dataset=str(root), split_file=str(bad)))
        assert str(info.value).startswith("data.split_file: ") and "\n" not in str(info.value)


def test_class_names_from_a_file_or_a_mapping(tmp_path, image_folder):
    assert open_source(DataConfig(dataset=str(image_folder))).class_names == ["cat", "dog", "owl"]
    names = tmp_path / "names.txt"
    names.write_text("house cat\n\ndomestic dog\nbarn owl\n")
    assert open_source(DataConfig(dataset=str(image_folder), class_names=str(names))).class_names == \
        ["house cat", "domestic dog", "barn owl"]
    mapped = open_source(DataConfig(dataset=str(image_folder), class_names={"owl": "great_horned owl"}))
    assert mapped.class_names == ["cat", "dog", "great_horned owl"]  # a mapped name is taken as written
    names.write_text("owl barn owl\ncat house cat\ndog domestic dog\n")  # CoOp's ImageNet "<folder> <name>"
    assert open_source(DataConfig(dataset=str(image_folder), class_names=str(names))).class_names == \
        ["house cat", "domestic dog", "barn owl"]
    names.write_text("one\ntwo\n")
    with pytest.raises(UserError, match=r"^data.class_names: .*names.txt has 2 names, the dataset has 3 classes$"):
        open_source(DataConfig(dataset=str(image_folder), class_names=str(names)))
    with pytest.raises(UserError, match=r"^data.class_names: 'bat' is not a class of the dataset$"):
        open_source(DataConfig(dataset=str(image_folder), class_names={"bat": "bat"}))
    with pytest.raises(UserError, match=r"^data.class_names: two classes would both be called 'dog'$"):
        open_source(DataConfig(dataset=str(image_folder), class_names={"cat": "dog"}))
    with pytest.raises(UserError, match=r"^data.class_names: cannot read .*nope.txt"):
        open_source(DataConfig(dataset=str(image_folder), class_names=str(tmp_path / "nope.txt")))


def test_prompts_and_the_synthetic_set_use_the_same_names(tmp_path, image_folder):
    from raycache.experiment import prepare

    (image_folder / "owl").rename(image_folder / "snowy_owl")
    cfg = load_config(None, [f"data.dataset={image_folder}", "method.name=cachefl", "model.name=tiny",
                             "synth.generator=tiny", "synth.per_class=2", "method.shots=2", "data.clients=2",
                             f"runtime.cache_dir={tmp_path / 'cache'}"])
    prep = prepare(cfg)
    assert prep.task.class_names == ["cat", "dog", "snowy owl"]
    assert prep.synth_store.settings["classes"] == ["cat", "dog", "snowy owl"]  # the prompts' names too


def _hf_dataset(tmp_path, as_dict: bool):
    import datasets

    rng = np.random.default_rng(1)
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})

    def rows(n):
        from raycache.data.sources.base import png_bytes

        labels = np.repeat(np.arange(3), n)
        return {"img": [{"bytes": png_bytes(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)), "path": None}
                        for _ in labels], "label": labels.tolist()}

    if as_dict:
        ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(5), features=feats),
                                   "validation": datasets.Dataset.from_dict(rows(2), features=feats),
                                   "test": datasets.Dataset.from_dict(rows(3), features=feats)})
    else:
        ds = datasets.Dataset.from_dict(rows(8), features=feats)
    out = tmp_path / ("dict" if as_dict else "single")
    ds.save_to_disk(str(out))
    return out


@pytest.mark.parametrize("as_dict", [True, False])
def test_a_save_to_disk_folder_is_a_source(tmp_path, as_dict, ray_session):
    path = _hf_dataset(tmp_path, as_dict)
    src = open_source(DataConfig(dataset=str(path)))
    assert src.class_names == ["ankle boot", "n01440764", "sea lion"]  # ClassLabel names, as prompts want them
    if as_dict:
        assert {k: len(v) for k, v in src.splits.items()} == {"train": 15, "val": 6, "test": 9}
        np.testing.assert_array_equal(src.labels[src.splits["val"]], np.repeat(np.arange(3), 2))
    else:
        assert src.splits is None and len(src.labels) == 24  # one split: raycache draws its own
    from raycache.data.sources.base import decode_image

    first = src.to_ray().take(2)
    assert decode_image(first[0]["image"], first[0]["key"]).size == (10, 10)
    assert open_source(DataConfig(dataset=str(path))).fingerprint == src.fingerprint


def test_a_save_to_disk_folder_needs_an_image_and_a_class_label(tmp_path):
    import datasets

    out = tmp_path / "plain"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(out))
    with pytest.raises(UserError, match=r"^data.image_column: .* has no column 'image' and no Image feature"):
        open_source(DataConfig(dataset=str(out)))


def test_hf_ids_load_through_the_cache_and_a_miss_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"^data.dataset: cannot load hf:nobody/no-such-set from the Hugging Face "
                                        r"cache or hub") as info:
        open_source(DataConfig(dataset="hf:nobody/no-such-set"))
    assert "\n" not in str(info.value)
