"""Every shipped experiment config loads and validates; each paper config names data that runs once the
user provides it (shown on a small stand-in of the same layout)."""

from pathlib import Path

import numpy as np
import pytest

from raycache.config_file import load_config
from raycache.errors import UserError
from raycache.experiment import prepare
from raycache.methods import method_class
from raycache.models.clip import ModelSpec, check_spec

CONFIGS = sorted(p for p in Path("experiments").rglob("*.yaml") if "sweeps" not in p.parts)
SWEEPS = sorted(Path("experiments/sweeps").glob("*.yaml"))
PAPER = [p for p in CONFIGS if "paper" in p.parts]


def test_the_three_papers_settings_ship():
    names = {p.relative_to("experiments/paper").as_posix() for p in PAPER}
    assert len([n for n in names if n.startswith("cachefl/")]) == 11  # Tip-Adapter's 11 datasets
    assert {f"fedclip/pacs_{d}.yaml" for d in ("art_painting", "cartoon", "photo", "sketch")} <= names
    assert "flora/reference.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_validates(path):
    cfg = load_config(path)
    check_spec(ModelSpec.from_config(cfg.model))  # a real open_clip architecture and tag (no download)
    method_class(cfg.method.name)  # a registered method


@pytest.mark.parametrize("path", SWEEPS, ids=str)
def test_sweep_file_validates(path):
    from raycache.sweep.space import load_sweep

    sweep, base = load_sweep(path)
    assert sweep.space and base


def test_the_mission_sweep_is_the_mission():
    from raycache.sweep.space import grid_points, load_sweep

    sweep, _ = load_sweep("experiments/sweeps/mission.yaml")
    points = grid_points(sweep.space)
    assert len(points) == 27
    assert {p["data.clients"] for p in points} == {10, 50, 100} and {p["method.shots"] for p in points} == {1, 4, 16}
    assert {p["data.alpha"] for p in points} == {0.1, 0.5, 1.0}


def test_paper_settings_are_the_published_ones():
    pets = load_config("experiments/paper/cachefl/oxford_pets.yaml")
    assert (pets.method.shots, pets.method.alpha, pets.method.beta, pets.model.name) == (16, 1.17, 1.0, "RN50")
    assert len(load_config("experiments/paper/cachefl/imagenet.yaml").model.templates) == 7
    pacs = load_config("experiments/paper/fedclip/pacs_sketch.yaml")
    assert (pacs.data.partition, pacs.data.test_domain, pacs.data.clients) == ("domain", "sketch", 3)
    flora = load_config("experiments/paper/flora/reference.yaml")
    assert (flora.data.clients, flora.federation.rounds, flora.method.lora_rank) == (10, 50, 2)
    assert (flora.method.lora_alpha, flora.method.lora_scaling) == (32, "reference")  # s = alpha, whatever r
    assert flora.method.persist_optimizer and flora.federation.selection == "best_val"
    assert (pacs.federation.rounds, pacs.federation.weighting, pacs.model.templates) == (200, "uniform",
                                                                                           ["a picture of a {}"])
    assert (pacs.data.val_fraction, pacs.data.client_test_fraction) == (0.2, 0.25)  # 60/20/20 per domain
    assert flora.method.lora_targets == ["text.attn.out_proj"]


@pytest.mark.parametrize("path", PAPER, ids=str)
def test_paper_config_without_its_data_names_the_missing_folder(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    cfg = load_config(_abs(path))
    with pytest.raises(UserError, match=f"^data.dataset: '{cfg.data.dataset}' not found"):
        prepare(cfg)


def _abs(path: Path) -> Path:
    return Path(__file__).resolve().parents[1] / path


def pacs_like(root: Path) -> Path:
    """2 classes in 4 domains, 6 images each, each domain with its own brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, domain in enumerate(["art_painting", "cartoon", "photo", "sketch"]):
        for c, cls in enumerate(["dog", "horse"]):
            (root / domain / cls).mkdir(parents=True)
            for i in range(6):
                arr = np.clip(30 * d + 100 * c + rng.integers(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / domain / cls / f"{i}.png")
    return root


def test_fedclip_pacs_config_runs_leave_one_domain_out(tmp_path, ray_session, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from raycache.experiment import run_experiment

    root = pacs_like(tmp_path / "pacs")
    cfg = load_config(_abs(Path("experiments/paper/fedclip/pacs_sketch.yaml")), [
        f"data.dataset={root}", "model.name=tiny", "model.pretrained=null", "federation.rounds=1",
        f"runtime.cache_dir={tmp_path / 'store'}", "runtime.client_actors=1", "tracking.experiment=paper-test"])
    summary = run_experiment(cfg)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["samples_test"] == 12  # exactly the held-out sketch domain
    # about 60/20/20 as in the reference: of the 36 training-domain images, round(0.2 x 18) = 4 per class
    # validate, and a quarter of each client's remaining images is its own local test set
    assert m["samples_val"] == 8 and m["samples_train"] + m["samples_client_test"] == 36 - 8
    assert 6 <= m["samples_client_test"] <= 9
    rows = np.loadtxt(client.download_artifacts(summary.run_id, "partition.csv"), delimiter=",", skiprows=1)
    assert rows.shape == (3, 2 + 2) and rows[:, -1].sum() == m["samples_train"]  # one client per remaining domain
    assert 0 <= m["local_accuracy_mean"] <= 1 and "val_accuracy" in m and "best_round" in m


def test_local_test_sets_come_from_each_clients_own_domain(tmp_path):
    root = pacs_like(tmp_path / "pacs")
    cfg = load_config(_abs(Path("experiments/paper/fedclip/pacs_sketch.yaml")), [
        f"data.dataset={root}", "model.name=tiny", "model.pretrained=null"])
    prep = prepare(cfg)
    domains = prep.source.domains[prep.splits.train]
    labels = prep.source.labels[prep.splits.train]
    for k, (train, test) in enumerate(zip(prep.parts, prep.client_tests)):
        assert len(test) >= 2 and len(np.intersect1d(train, test)) == 0
        assert len(set(domains[train])) == 1 and set(domains[test]) == set(domains[train])  # its own domain
        assert set(labels[test]) == {0, 1}  # stratified within the client: both classes held out
    held = np.concatenate(prep.client_tests)
    assert len(np.intersect1d(prep.splits.train[held], prep.splits.val)) == 0  # never the validation split
    assert len(np.intersect1d(prep.splits.train[held], prep.splits.test)) == 0


def test_a_cachefl_paper_config_reads_coops_layout(tmp_path, monkeypatch):
    """experiments/paper/cachefl/ points at CoOp's layout (image root + split_zhou_*.json): on a stand-in of
    that layout the config's own paths give exactly the file's splits and class names."""
    import json

    from conftest import write_png

    cfg = load_config(_abs(Path("experiments/paper/cachefl/oxford_pets.yaml")))
    root, split_file = tmp_path / cfg.data.dataset, tmp_path / cfg.data.split_file
    rng = np.random.default_rng(0)
    split = {}
    for name, n in (("train", 20), ("val", 2), ("test", 3)):
        split[name] = []
        for label, cls in enumerate(["abyssinian", "american_bulldog"]):
            for i in range(n):
                write_png(root / f"{cls}_{name}_{i}.jpg", rng)
                split[name].append([f"{cls}_{name}_{i}.jpg", label, cls])
    split_file.write_text(json.dumps(split))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_abs(Path("experiments/paper/cachefl/oxford_pets.yaml")),
                      ["model.name=tiny", "model.pretrained=null", "synth.generator=tiny"])
    prep = prepare(cfg)
    assert prep.source.class_names == ["abyssinian", "american bulldog"]
    assert (len(prep.splits.train), len(prep.splits.val), len(prep.splits.test)) == (40, 4, 6)
