"""Bad input of every kind a user can hand raycache (config values, sweep files, Parquet schemas, image files,
weights files): exit 2 and one line naming the key or the file, before any compute where it can be known
then, never a traceback and never a run that fails deep inside a library."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from raycache.cli import main
from raycache.config import DataConfig, ExperimentConfig
from raycache.config_file import build_config, load_config
from raycache.data.sources import open_source
from raycache.data.sources.base import png_bytes
from raycache.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "experiments/tiny.yaml")


def one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.mark.parametrize("override, expect", [
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
    ("synth.seed=-3", "synth.seed: Input should be greater than or equal to 0"),
    ("model.init_seed=-1", "model.init_seed: Input should be greater than or equal to 0"),
    ("model.templates=['a {} of {}']", "model.templates: template 'a {} of {}' must have exactly one '{}' slot"),
    ("model.templates=['{} {x}']", "model.templates: template '{} {x}' must have exactly one"),
    ("model.templates=['{} {']", "model.templates: template '{} {': Single '{' encountered"),
    ("model.templates=['a photo']", "model.templates: template 'a photo' has no '{}' slot"),
    ("synth.prompts=['{0} and {1}']", "synth.prompts: prompt '{0} and {1}' must have exactly one"),
    ("model.templates=['a {::}']", "model.templates: template 'a {::}': Unknown format code"),  # found by
    ("model.templates=['}}}}{:{}}']", "model.templates: template '}}}}{:{}}': Replacement index 1"),  # the fuzz
    ("synth.size=100", "synth.size: Input should be a multiple of 8"),
    ("method.betas=[1.0, 0.9]", "method.betas: each beta must be in [0, 1), got [1.0, 0.9]"),
    ("method.betas=[0.9]", "method.betas"),
])
def test_a_bad_value_is_named_in_one_line(capsys, override, expect):
    line = one_line(capsys, main(["check", QUICK, "--set", override]))
    assert expect in line, line


@pytest.mark.parametrize("how", ["yaml", "override"])
def test_betas_can_be_set_and_reach_the_optimiser(tmp_path, how):
    """The config carries them to the method's settings; the loop's optimiser steps with them
    (tests/methods/test_optimiser.py, against torch's Adam given the same betas)."""
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "fedclip", **({"betas": [0.8, 0.95]} if how == "yaml"
                                                                     else {})}}))
    cfg = load_config(path, ["method.betas=[0.8, 0.95]"] if how == "override" else [])
    assert cfg.method.betas == (0.8, 0.95)


def test_a_template_the_config_accepts_always_formats():
    """The statement the validator stands for: an accepted template is filled by `str.format` with the class
    name, and the name appears in the result (random templates over the characters that matter)."""

    @settings(max_examples=400, deadline=None)
    @given(st.text(alphabet="{}a 0x:!r>", max_size=10))
    def check(template):
        try:
            ExperimentConfig.model_validate({"model": {"templates": [template]}, "synth": {"prompts": [template]}})
        except ValueError:
            return
        assert "Zebra" in template.format("Zebra")

    check()


def _parquet(path: Path, labels, **extra) -> None:
    images = [png_bytes(np.full((4, 4), 30 * i % 255, np.uint8)) for i in range(len(labels))]
    pq.write_table(pa.table({"image": images, "label": labels, **extra}), path)


@pytest.mark.parametrize("files, expect", [
    ({"a": pa.array([0, 1], pa.int64()), "b": pa.array(["cat", "dog"])},
     "column 'label' holds string in {b} but int64 in {a}; one folder's files must agree"),
    ({"a": pa.array(["cat", None, "dog"])}, "column 'label' of {a} has 1 empty (null) labels"),
    ({"a": pa.array([0, None, 1], pa.int64())}, "column 'label' of {a} has 1 empty (null) labels"),
    ({"a": pa.array([0.5, 1.0])}, "column 'label' of {a} must hold ints or class names, not double"),
])
def test_a_parquet_folder_with_bad_labels_is_named(tmp_path, files, expect):
    paths = {}
    for name, labels in files.items():
        paths[name] = (tmp_path / f"{name}.parquet").resolve()
        _parquet(paths[name], labels)
    with pytest.raises(UserError) as err:
        open_source(DataConfig(dataset=str(tmp_path)))
    assert expect.format(**paths) in str(err.value), str(err.value)


def test_parquet_files_of_two_integer_widths_load_as_one_labelling(tmp_path):
    _parquet(tmp_path / "a.parquet", pa.array([0, 2], pa.int32()), class_name=["cat", "owl"])
    _parquet(tmp_path / "b.parquet", pa.array([1, 2], pa.int64()), class_name=["dog", "owl"])
    src = open_source(DataConfig(dataset=str(tmp_path)))
    assert src.labels.tolist() == [0, 2, 1, 2] and src.class_names == ["cat", "dog", "owl"]


def test_parquet_class_names_must_agree(tmp_path):
    _parquet(tmp_path / "a.parquet", pa.array([0, 1]), class_name=["cat", "dog"])
    _parquet(tmp_path / "b.parquet", pa.array([1]), class_name=["wolf"])
    with pytest.raises(UserError, match="label 1 has two class names in column 'class_name' \\('dog' and 'wolf'\\)"):
        open_source(DataConfig(dataset=str(tmp_path)))
    (tmp_path / "b.parquet").unlink()
    _parquet(tmp_path / "b.parquet", pa.array([1]))
    with pytest.raises(UserError, match="has a 'class_name' column and .*b.parquet has none"):
        open_source(DataConfig(dataset=str(tmp_path)))


def _sweep(tmp_path: Path, base: Path, **extra) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": str(base), "space": {"data.alpha": {"grid": [0.5]}},
                                    **extra}))
    return path


def test_a_sweep_base_that_is_not_yaml_is_one_line(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("data: {clients: 4\nmethod: [")
    line = one_line(capsys, main(["sweep", str(_sweep(tmp_path, base))]))
    assert f"{base.resolve()}: not valid YAML" in line, line


def test_a_sweep_base_with_relative_paths_means_them_where_the_sweep_was_started(tmp_path, monkeypatch):
    """Trials run in Tune's own working directories: the base's relative paths (weights, synthetic output,
    a local generator folder, the dataset, in the base and in the space) are resolved where `raycache sweep`
    runs, so the trial's config points at the same files from anywhere."""
    import torch

    from raycache.models.clip import ModelSpec, check_spec, load_clip
    from raycache.sweep.runner import trial_config
    from raycache.sweep.space import load_sweep

    work = tmp_path / "work"
    (work / "gen").mkdir(parents=True)
    model = load_clip(ModelSpec("tiny"))[0]
    torch.save(model.state_dict(), work / "w.pt")
    torch.save(model.state_dict(), work / "w2.pt")
    _parquet(work / "data.parquet", pa.array([0, 1]))
    base = work / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"pretrained": "w.pt"}, "synth": {"out": "synth", "generator": "gen"},
                                    "data": {"dataset": "data.parquet"}, "runtime": {"cache_dir": "store"}}))
    monkeypatch.chdir(work)
    sweep, tree = load_sweep(_sweep(work, base, space={"model.pretrained": {"grid": ["w2.pt"]}}))
    monkeypatch.chdir(tmp_path)  # a trial's working directory is elsewhere
    cfg = trial_config(tree, {"model.pretrained": sweep.space["model.pretrained"]["grid"][0]}, "t")
    assert cfg.model.pretrained == str(work / "w2.pt") and build_config(tree).model.pretrained == str(work / "w.pt")
    assert cfg.synth.out == str(work / "synth") and cfg.synth.generator == str(work / "gen")
    assert cfg.data.dataset == str(work / "data.parquet") and cfg.runtime.cache_dir == str(work / "store")
    check_spec(ModelSpec.from_config(cfg.model))  # the weights are found from here
    assert build_config({"model": {"pretrained": "laion2b_s34b_b79k"}}).model.pretrained == "laion2b_s34b_b79k"


@pytest.mark.parametrize("kind", ["corrupt safetensors", "pickled model"])
def test_bad_weights_files_are_one_line_before_a_run_opens(tmp_path, capsys, mlflow_uri, kind):
    import torch

    if kind == "corrupt safetensors":
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
        expect = f"model.pretrained: {weights} is not a valid .safetensors file"
    else:
        weights = tmp_path / "w.pt"
        torch.save(torch.nn.Linear(2, 2), weights)  # a whole pickled module, not a state dict
        expect = f"model.pretrained: {weights} holds a pickled object, not a state dict of tensors"
    line = one_line(capsys, main(["run", QUICK, "--set", f"model.pretrained={weights}",
                                  "--set", f"runtime.cache_dir={tmp_path}", "--set", "tracking.experiment=weights"]))
    assert expect in line, line
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_uri).get_experiment_by_name("weights") is None  # no run was opened


def test_a_decompression_bomb_is_named_not_decoded(ray_session, image_folder, tmp_path):
    """A small file that decodes to more pixels than PIL's guard allows (here 196 million, 1 bit each: a
    few kB on disk) is refused by name where it is read, in the encoding tasks."""
    from PIL import Image

    from raycache.config import RuntimeConfig
    from raycache.data.features import load_or_encode
    from raycache.models.clip import ModelSpec

    bomb = image_folder / "dog" / "007.png"
    Image.new("1", (14_000, 14_000)).save(bomb)
    assert bomb.stat().st_size < 200_000 and 14_000 ** 2 > 2 * Image.MAX_IMAGE_PIXELS
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "store"), encoder_batch_size=16)
    with pytest.raises(UserError, match=r"image .*dog/007\.png has more pixels than PIL's decompression-bomb"):
        load_or_encode(open_source(DataConfig(dataset=str(image_folder))), ModelSpec("tiny"), runtime)
