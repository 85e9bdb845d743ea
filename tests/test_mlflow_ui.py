"""The comparison surface in a real browser: MLflow 3's UI shows raycache's experiments as model-training
experiments (the classic runs table, not the GenAI view's "Evaluation runs"), and a sweep's saved view shows
its trials nested under the parent with the swept keys as columns. Needs Debian's chromium (opt-in: slow)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(url: str, tmp_path) -> str:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chr'}",
                           "--virtual-time-budget=20000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180).stdout


def test_sweep_opens_as_a_training_experiment_with_swept_columns(tmp_path, monkeypatch):
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from raycache.sweep.runner import view_key
    from raycache.tracking import Run

    parent = Run("ui-test", "sweep-ui", tags={"raycache.kind": "sweep"})
    parent.save_view(view_key("sweep-ui"), "sweep sweep-ui", ["method.lr"], ["result_val_accuracy"])
    for lr in ("0.001", "0.01"):
        child = Run("ui-test", f"trial-{lr}", tags={"mlflow.parentRunId": parent.run_id, "raycache.method": "cachefl"})
        child.log_params({"method.lr": lr})
        child.log_metrics({"result_val_accuracy": float(lr) * 10})
        child.finish()
    parent.finish()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", uri, "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        hint = parent.ui_hint(view_key("sweep-ui"))
        page = hint.split("open http://127.0.0.1:5000/", 1)[1]
        dom = _dom(f"http://127.0.0.1:{port}/{page}", tmp_path)
        assert ">Runs</h2>" in dom and "Evaluation runs" not in dom  # the classic training view
        assert "method.lr" in dom and "result_val_accuracy" in dom  # the swept key and the metric as columns
        assert "sweep-ui" in dom  # the parent row (its trials nest under it)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert json.loads(parent.client.get_experiment(parent.experiment_id).tags[
        f"mlflow.sharedViewState.{view_key('sweep-ui')}"])["name"] == "sweep sweep-ui"
