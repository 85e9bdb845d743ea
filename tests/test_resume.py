"""A run whose driver is killed (kill -9) mid-run resumes from its last checkpoint, in the same MLflow run,
and ends with exactly the metrics of an uninterrupted run with the same seed (CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow.tracking import MlflowClient

from raycache.federation import checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXACT = ("accuracy", "loss", "client_accuracy_mean", "client_accuracy_std", "comm_bytes_up_total",
         "comm_bytes_down_total", "final_accuracy", "clients_succeeded", "val_accuracy", "best_round",
         "selected_accuracy", "result_accuracy", "result_round", "rounds_to_target", "bytes_to_target")


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_uninterrupted_result(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    args = [str(ROOT / "experiments/quickstart.yaml"), "--set", "federation.rounds=5", "--set",
            "method.local_epochs=150", "--set", f"runtime.cache_dir={tmp_path / 'store'}", "--set",
            "tracking.experiment=resume", "--set", "federation.target_accuracy=0.3",
            "--set", "method.persist_optimizer=true"]  # the clients' Adam moments must resume exactly too
    cmd = [sys.executable, "-m", "raycache", "run", *args]
    client = MlflowClient(uri)

    def run_named(name):
        exp = client.get_experiment_by_name("resume")
        runs = [] if exp is None else client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
        return runs[0] if runs else None

    proc = subprocess.Popen(cmd + ["--set", "tracking.run_name=killed"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            run = run_named("killed")
            if run is not None and int(run.data.tags.get("raycache.checkpoint_round", 0)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, with no chance to clean up
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = run_named("killed")
    assert killed.info.status == "RUNNING"  # nobody ended it: the driver died
    ckpt = checkpoint.load(Path(killed.data.tags["raycache.checkpoint"]))
    assert 2 <= ckpt.round < 5  # a complete round's checkpoint, mid-run

    resumed = subprocess.run(cmd + ["--resume", killed.info.run_id], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = subprocess.run(cmd + ["--set", "tracking.run_name=whole"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]

    after, reference = client.get_run(killed.info.run_id), run_named("whole")
    assert after.info.status == "FINISHED" and after.data.tags["raycache.resumed_from_round"] == str(ckpt.round)
    for key in EXACT:
        assert after.data.metrics[key] == reference.data.metrics[key], key
    # every round is in the one run, each with the uninterrupted run's value
    hist = {m.step: m.value for m in client.get_metric_history(after.info.run_id, "accuracy")}
    ref = {m.step: m.value for m in client.get_metric_history(reference.info.run_id, "accuracy")}
    assert hist == ref and sorted(ref) == [0, 1, 2, 3, 4, 5]
    # the selected result (the best validation round's state, kept across the kill) is the same state
    from safetensors.numpy import load_file

    mine, theirs = (load_file(r.data.tags["raycache.result_checkpoint"]) for r in (after, reference))
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in mine)

    # resuming a finished run is refused, with one line
    again = subprocess.run(cmd + ["--resume", killed.info.run_id], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].endswith("already finished")


def test_a_personal_method_resumes_with_every_clients_own_state(tmp_path, ray_session, mlflow_uri):
    """local_only keeps one state per client on the hosts: a run that dies after round 2 (before that round's
    checkpoint) resumes from round 1's with every client's own state and optimiser, and ends exactly where
    an uninterrupted run ends."""
    from raycache.config_file import load_config
    from raycache.experiment import run_experiment

    cfg = load_config(str(ROOT / "experiments/quickstart.yaml"), [
        "method.name=local_only", "per_method.local_only.cache_init=real", "per_method.local_only.lr=1.0e-5",
        "per_method.local_only.beta=100", "per_method.local_only.alpha=10", "data.clients=4",
        "runtime.client_actors=2", "federation.rounds=3", "federation.fraction=0.5",
        f"runtime.cache_dir={tmp_path / 'store'}", "tracking.experiment=resume-local"])
    whole = run_experiment(cfg)

    class Crash(Exception):
        pass

    def crash(r, metrics):
        if r == 2:
            raise Crash("driver died")

    with pytest.raises(Crash):
        run_experiment(cfg, on_round=crash)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("resume-local").experiment_id
    died = client.search_runs([exp], "attributes.status = 'FAILED'")[0]
    assert died.data.tags["raycache.checkpoint_round"] == "1"
    resumed = run_experiment(cfg, resume=died.info.run_id)
    assert resumed.rounds == 2  # rounds 2 and 3
    for k in ("accuracy", "loss", "client_accuracy_mean", "val_accuracy", "comm_bytes_down"):
        assert [m[k] for m in resumed.history] == [m[k] for m in whole.history[1:]], k
    assert resumed.selection["result_accuracy"] == whole.selection["result_accuracy"]
