"""A finished run's result as an MLflow model: loaded through `mlflow.pyfunc` in a fresh process, used by
`raycache predict`, refused when its base weights changed."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raycache.config_file import load_config
from raycache.errors import UserError
from raycache.experiment import run_experiment

from conftest import write_test_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(e2e_run, mlflow_uri, tmp_path_factory):
    """The shared tiny-config run (`e2e_run`) and its test images written out as files, with their labels."""
    cfg, summary, _, _, _ = e2e_run
    return summary, write_test_split(cfg, tmp_path_factory.mktemp("serving") / "test-images"), mlflow_uri


def test_a_fresh_process_loads_the_model_through_pyfunc_and_reproduces_the_test_accuracy(finished, tmp_path):
    summary, labels, uri = finished
    script = tmp_path / "load.py"
    script.write_text(
        "import json, sys\n"
        "import mlflow.pyfunc, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(f'runs:/{sys.argv[1]}/model')\n"
        "labels = json.loads(open(sys.argv[2]).read())\n"
        "paths = sorted(labels)\n"
        "images = [open(p, 'rb').read() for p in paths[::2]] + paths[1::2]  # bytes and paths alike\n"
        "out = model.predict(pd.DataFrame({'image': images}))\n"
        "truth = [labels[p] for p in paths[::2] + paths[1::2]]\n"
        "print(json.dumps({'accuracy': float((out['label'].to_numpy() == truth).mean()),\n"
        "                  'classes': sorted(set(out['class'])), 'scores': [float(out['score'].min()),\n"
        "                  float(out['score'].max())]}))\n")
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    proc = subprocess.run([sys.executable, str(script), summary.run_id, str(tmp_path / "labels.json")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    run = MlflowClient(uri).get_run(summary.run_id)
    assert got["accuracy"] == run.data.metrics["result_accuracy"]  # the selected state's logged test accuracy
    assert got["accuracy"] > run.data.metrics["zeroshot_accuracy"] + 0.1  # it is the trained model
    assert set(got["classes"]) <= {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert 0 < got["scores"][0] <= got["scores"][1] <= 1
    assert run.data.tags["raycache.model"] == f"runs:/{summary.run_id}/model"


def test_raycache_predict_classifies_a_folder_and_reproduces_the_test_accuracy(finished, tmp_path, capsys):
    from raycache.cli import main

    summary, labels, uri = finished
    folder = Path(next(iter(labels))).parent
    out = tmp_path / "predictions.csv"
    assert main(["predict", summary.run_id, str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == sorted(labels)  # every image under the folder, once, in order
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    accuracy = np.mean([names.index(r["class"]) == labels[r["path"]] for r in rows])
    assert accuracy == MlflowClient(uri).get_run(summary.run_id).data.metrics["result_accuracy"]
    # without --out: one line per image, path, class and score
    two = sorted(labels)[:2]
    assert main(["predict", summary.run_id, *two]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == two
    for line, row in zip(lines, rows[:2]):
        assert line.split("\t")[1] == row["class"] and float(line.split("\t")[2]) == pytest.approx(
            float(row["score"]), abs=1e-4)


@pytest.mark.parametrize("args, expect", [
    (["not-a-run", "x.png"], "RUN_ID: 'not-a-run' is not an MLflow run id"),
    (["0" * 32, "{folder}"], "RUN_ID: no MLflow run 00000000000000000000000000000000"),
    (["{run}", "/nonexistent/cat.png"], "/nonexistent/cat.png: no such file or folder"),
    (["{run}", "{empty}"], "no .png, .jpg or .jpeg images under this folder"),
])
def test_bad_predict_input_is_one_line_exit_2(finished, tmp_path, capsys, args, expect):
    from raycache.cli import main

    summary, labels, _ = finished
    (tmp_path / "empty").mkdir()
    fill = {"run": summary.run_id, "folder": str(Path(next(iter(labels))).parent), "empty": str(tmp_path / "empty")}
    assert main(["predict", *[a.format(**fill) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err


def test_a_model_whose_base_weights_changed_is_refused_in_one_line(finished, tmp_path):
    """The base CLIP is referenced by fingerprint, not copied: weights that are not the run's are refused."""
    import mlflow.artifacts

    from raycache.serving import SPEC, Classifier

    summary, _, uri = finished
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{summary.run_id}/model", dst_path=str(tmp_path),
                                                     tracking_uri=uri))
    data = local / "data" / "data"
    Classifier(data)  # as logged: loads
    info = json.loads((data / SPEC).read_text())
    info["model"]["init_seed"] = 1  # other weights than the run's
    (data / SPEC).write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"model.pretrained: the weights at None are not the ones run "
                                        rf"{summary.run_id} trained on \(fingerprint"):
        Classifier(data)
    shutil.rmtree(local)


@pytest.mark.slow  # CI runs it (.ci/run)
def test_a_registered_self_contained_model_loads_by_name_without_its_weights_file(ray_session, mlflow_uri, finished,
                                                                                   tmp_path, capsys):
    """`--register NAME` makes the run's model a version of NAME in MLflow's model registry, and
    `models:/NAME/<version>` loads the same classifier as `runs:/<run id>/model`. With
    `tracking.copy_weights`, the model carries its local weights file: it loads and predicts the same after
    the file is gone."""
    from safetensors.torch import save_file

    from raycache.cli import main
    from raycache.models.clip import ModelSpec, load_clip
    from raycache.serving import read_images
    from raycache.tracking import load_pyfunc

    _, labels, _ = finished
    weights = tmp_path / "weights" / "tiny-7.safetensors"
    weights.parent.mkdir()
    model, _, _ = load_clip(ModelSpec("tiny", init_seed=7))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    code = main(["run", str(ROOT / "experiments/tiny.yaml"), "--register", "tiny-digits",
                 "--set", f"model.pretrained={weights}", "--set", "tracking.copy_weights=true",
                 "--set", "federation.rounds=1", "--set", "tracking.experiment=serving",
                 "--set", f"runtime.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert code == 0
    run_id = out.split("MLflow run ", 1)[1].split()[0]
    assert f"raycache predict {run_id} PATH..." in out and "registered as tiny-digits" in out
    versions = MlflowClient(mlflow_uri).search_model_versions("name='tiny-digits'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run_id)]
    images, keys = read_images(sorted(labels)[:20])
    by_run = load_pyfunc(f"runs:/{run_id}/model").scores(images, keys)
    np.testing.assert_array_equal(load_pyfunc("models:/tiny-digits/1").scores(images, keys), by_run)
    # the run used the file's weights (init seed 7), not the preset's seed-0 init
    assert not np.allclose(by_run, load_pyfunc(f"runs:/{finished[0].run_id}/model").scores(images, keys))
    weights.unlink()
    np.testing.assert_array_equal(load_pyfunc(f"runs:/{run_id}/model").scores(images, keys), by_run)
    capsys.readouterr()
    assert main(["check", str(ROOT / "experiments/tiny.yaml"), "--set", "tracking.register=a/b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking.register" in err[0], err


@pytest.mark.slow  # CI runs it (.ci/run)
def test_a_personal_run_predicts_with_the_client_it_is_told(ray_session, mlflow_uri, finished, tmp_path, capsys):
    """local_only keeps a state per client: predict needs --client, says whose state it used, and clients
    trained on different data predict differently (the result is round 1's states: `selection: final`; the
    best validation round may be round 0, where every client holds the initial state)."""
    from raycache.cli import main

    _, labels, _ = finished
    summary = run_experiment(load_config(str(ROOT / "experiments/tiny.yaml"), [
        "method.name=local_only", "federation.rounds=1", "federation.selection=final", "tracking.experiment=serving",
        f"runtime.cache_dir={tmp_path / 'cache'}"]))
    folder = str(Path(next(iter(labels))).parent)
    assert main(["predict", summary.run_id, folder]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose whose state predicts with --client N (0 to 9)" in err[0], err
    assert main(["predict", summary.run_id, folder, "--client", "10"]) == 2
    assert "--client: 10 is not a client of run" in capsys.readouterr().err
    from raycache.serving import read_images
    from raycache.tracking import load_pyfunc

    model = load_pyfunc(f"runs:/{summary.run_id}/model")
    images, keys = read_images(sorted(labels))
    for c in (3, 4):
        assert main(["predict", summary.run_id, folder, "--client", str(c), "--out", str(tmp_path / f"{c}.csv")]) == 0
        assert f"predicting with client {c}'s own state" in capsys.readouterr().err
        rows = list(csv.DictReader((tmp_path / f"{c}.csv").open()))
        scores = model.scores(images, keys, client=c)
        assert [r["class"] for r in rows] == [model.class_names[k] for k in scores.argmax(axis=1)]
        assert [float(r["score"]) for r in rows] == pytest.approx(scores.max(axis=1), abs=1e-6)
    # each client's own trained state (a little apart after one round of the tiny config's small steps)
    assert not np.allclose(model.scores(images, keys, client=3), model.scores(images, keys, client=4), atol=1e-7)
