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
from raycache.experiment import prepare, run_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(ray_session, mlflow_uri, tmp_path_factory):
    """The quickstart (two rounds) and its test images written out as files, with their labels."""
    store = tmp_path_factory.mktemp("serving")
    cfg = load_config(str(ROOT / "experiments/quickstart.yaml"), [
        "federation.rounds=2", "tracking.experiment=serving", f"runtime.cache_dir={store / 'cache'}"])
    summary = run_experiment(cfg)
    prep = prepare(cfg)
    rows = prep.source.to_ray().take_all()
    folder = store / "test-images"
    folder.mkdir()
    labels = {}
    for i in prep.splits.test:
        path = folder / f"{i:05d}.png"
        path.write_bytes(rows[i]["image"])
        labels[str(path)] = int(prep.source.labels[i])
    return summary, labels, mlflow_uri


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
