"""`make quickstart` as a newcomer meets it: `raycache run experiments/quickstart.yaml` in a fresh folder
(its own Ray, its own MLflow store), then `raycache predict` on the run's test images."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raycache.config_file import load_config

from conftest import write_test_split

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments/quickstart.yaml"


@pytest.mark.slow  # about a minute: CI runs it (.ci/run)
def test_the_quickstart_fine_tunes_clearly_past_its_start_and_its_model_predicts(tmp_path, ray_session):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "raycache", "run", str(QUICKSTART)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["raycache", "predict"] and last[3] == "PATH...", proc.stdout[-2000:]
    run_id = last[2]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store a newcomer's cwd gets
    run = client.get_run(run_id)
    assert run.data.params["model.name"] == "effnet-lite0" and run.data.params["model.pretrained"] == "imagenet"
    m = run.data.metrics
    (round0,) = [p.value for p in client.get_metric_history(run_id, "accuracy") if p.step == 0]
    # The point of the quickstart: federated fine-tuning clearly beats both of its starts (measured: zero-shot
    # 0.12, the training-free cache 0.57, the selected round 0.76 on test)
    assert m["result_accuracy"] > m["zeroshot_accuracy"] + 0.4
    assert m["result_accuracy"] > round0 + 0.1
    assert m["best_round"] > 0

    # `raycache predict` on the run's own test images reproduces its logged test accuracy
    folder = tmp_path / "test-images"
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # digits' classes
    truth = {path: names[label] for path, label in write_test_split(load_config(str(QUICKSTART)), folder).items()}
    out = tmp_path / "predictions.csv"
    proc = subprocess.run([sys.executable, "-m", "raycache", "predict", run_id, str(folder), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = {r["path"]: r["class"] for r in csv.DictReader(out.open())}
    assert sorted(predicted) == sorted(truth)
    assert np.mean([predicted[p] == truth[p] for p in truth]) == m["result_accuracy"]
