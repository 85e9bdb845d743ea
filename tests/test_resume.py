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
from raycache.resume import newest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXACT = ("accuracy", "loss", "client_accuracy_mean", "client_accuracy_std", "comm_bytes_up_total",
         "comm_bytes_down_total", "final_accuracy", "clients_succeeded", "val_accuracy", "best_round",
         "selected_accuracy", "result_accuracy", "result_round", "rounds_to_target", "bytes_to_target")


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_uninterrupted_result(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    args = [str(ROOT / "experiments/tiny.yaml"), "--set", "federation.rounds=5", "--set",
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
    # the newest complete round's checkpoint, mid-run (the run's link to it may lag: tracking.flush_seconds)
    ckpt = checkpoint.load(newest_checkpoint(None, killed.info.run_id, killed.data.tags["raycache.checkpoint"]))
    assert 2 <= ckpt.round < 5

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


@pytest.mark.parametrize("dies", ["after logging round 2", pytest.param(
    "between round 2's checkpoint and its metrics", marks=pytest.mark.slow)])
def test_a_personal_method_resumes_with_every_clients_own_state(feature_store, ray_session, mlflow_uri, monkeypatch,
                                                                capsys, dies):
    """local_only keeps one state per client on the hosts: a run that dies after round 2's checkpoint resumes
    from it with every client's own state and optimiser, ends exactly where an uninterrupted run ends, and
    has every round in its history exactly once, whether or not the dead driver had logged round 2. While a
    driver is alive (here: a process holding the run), --resume is refused."""
    import raycache.resume
    from raycache.config_file import load_config
    from raycache.experiment import run_experiment
    from raycache.resume import rounds_on_disk

    cfg_overrides = [
        "method.name=local_only", "per_method.local_only.cache_init=real", "per_method.local_only.lr=1.0e-5",
        "per_method.local_only.beta=100", "per_method.local_only.alpha=10", "data.clients=4",
        "runtime.client_actors=2", "federation.rounds=3", "federation.fraction=0.5",
        f"runtime.cache_dir={feature_store}", "tracking.experiment=resume-local",
        "tracking.flush_seconds=3600"]  # rounds after the first wait: the failing run writes them as it ends
    cfg = load_config(str(ROOT / "experiments/tiny.yaml"), cfg_overrides)
    whole = run_experiment(cfg)

    class Crash(Exception):
        pass

    def crash_at(round_idx):
        def crash(r, metrics):
            if r == round_idx:
                raise Crash("driver died")
        return crash

    real_save = raycache.resume.save_round

    def save_then_die(cfg, run, r, snapshot, meta):
        path = real_save(cfg, run, r, snapshot, meta)
        crash_at(2)(r, None)
        return path

    if dies.startswith("after"):  # round 3's callback: round 3 ran, round 2 is checkpointed and logged
        kwargs = {"on_round": crash_at(3)}
    else:
        monkeypatch.setattr(raycache.resume, "save_round", save_then_die)
        kwargs = {}
    with pytest.raises(Crash):
        run_experiment(cfg, **kwargs)
    monkeypatch.setattr(raycache.resume, "save_round", real_save)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("resume-local").experiment_id
    died = client.search_runs([exp], "attributes.status = 'FAILED'")[0]
    folder = Path(died.data.tags["raycache.checkpoint"]).parent
    assert max(rounds_on_disk(folder)) == 2
    # The run links a checkpoint with its round's metrics: a death between the two leaves round 2's file
    # unlinked (and its metrics unlogged), and the resume takes the newest file all the same.
    linked = died.data.tags["raycache.checkpoint_round"]
    assert linked == ("2" if dies.startswith("after") else "1"), linked
    if dies.startswith("after"):  # a driver that is still alive keeps its run: --resume is refused
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from raycache.config_file import load_config; from raycache.resume import "
            "hold_driver; lock = hold_driver(load_config(None, [sys.argv[1]]), sys.argv[2]); print('held', "
            "flush=True); time.sleep(120)"), f"runtime.cache_dir={feature_store}", died.info.run_id],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            from raycache.cli import main

            capsys.readouterr()  # what the runs above printed
            code = main(["run", str(ROOT / "experiments/tiny.yaml"), "--resume", died.info.run_id,
                         *[a for o in cfg_overrides for a in ("--set", o)]])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and f"run {died.info.run_id} is still being run by a live driver " \
                f"(pid {holder.pid} on " in err[0], err
        finally:
            holder.kill()
            holder.wait()
    resumed = run_experiment(cfg, resume=died.info.run_id)  # its driver is gone: resumed
    assert resumed.rounds == 1  # round 3
    for k in ("accuracy", "loss", "client_accuracy_mean", "val_accuracy", "comm_bytes_down"):
        logged = [(m.step, m.value) for m in client.get_metric_history(died.info.run_id, k)]
        steps = [step for step, _ in logged]
        assert len(steps) == len(set(steps)), (k, steps)  # each round once
        assert {st: v for st, v in logged if st >= 1} == {r + 1: m[k] for r, m in enumerate(whole.history)}, k
    assert resumed.selection["result_accuracy"] == whole.selection["result_accuracy"]
    # keep_checkpoints (default 1): the newest round's file and the best validation round's, no temp files
    best = int(resumed.selection["best_round"])
    assert set(rounds_on_disk(folder)) == {3} | ({best} if best > 0 else set())
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # three runs, about 40 s (CI's slow list runs this file)
def test_rounds_waiting_for_mlflow_when_the_driver_dies_are_logged_by_the_resume_each_once(
        feature_store, ray_session, mlflow_uri, monkeypatch):
    """With `tracking.flush_seconds`, rounds wait in their checkpoints to reach MLflow together. A driver that
    dies with rounds waiting and no chance to write them (kill -9: here, the run's closing write skipped)
    leaves them in its newest checkpoint, unlinked; the resume continues from that checkpoint, logs them,
    and the run ends with every round once, with the uninterrupted run's values."""
    from raycache.config_file import load_config
    from raycache.experiment import run_experiment
    from raycache.round_log import RoundLog

    cfg = load_config(str(ROOT / "experiments/tiny.yaml"), [
        "method.name=cachefl", "federation.rounds=5", "tracking.flush_seconds=3600",
        f"runtime.cache_dir={feature_store}", "tracking.experiment=resume-waiting"])
    whole = run_experiment(cfg)

    class Killed(Exception):
        pass

    def die(r, metrics):
        if r == 4:  # round 4 ran; rounds 1-3 are checkpointed, round 1 alone is logged (the first goes at once)
            raise Killed

    monkeypatch.setattr(RoundLog, "close", lambda self, error=None: None)
    with pytest.raises(Killed):
        run_experiment(cfg, on_round=die)
    monkeypatch.undo()
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("resume-waiting").experiment_id
    died = client.search_runs([exp], "attributes.status = 'FAILED'")[0]
    assert sorted(m.step for m in client.get_metric_history(died.info.run_id, "accuracy")) == [0, 1]
    assert died.data.tags["raycache.checkpoint_round"] == "1"

    resumed = run_experiment(cfg, resume=died.info.run_id)
    assert resumed.rounds == 2 and died.info.run_id == resumed.run_id  # rounds 4 and 5, from round 3's file
    for key in ("accuracy", "loss", "val_accuracy", "comm_bytes_up"):
        logged = [(m.step, m.value) for m in client.get_metric_history(died.info.run_id, key)]
        assert sorted(st for st, _ in logged) == ([0] if key in whole.initial else []) + [1, 2, 3, 4, 5], key
        assert {st: v for st, v in logged if st >= 1} == {r + 1: m[key] for r, m in enumerate(whole.history)}, key
    after = client.get_run(died.info.run_id)
    assert after.data.tags["raycache.resumed_from_round"] == "3" and after.data.tags["raycache.checkpoint_round"] == "5"
    assert resumed.selection["result_accuracy"] == whole.selection["result_accuracy"]
