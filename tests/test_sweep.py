"""Sweeps: the space is checked before anything runs, and a real Ray Tune sweep nests one MLflow run per
trial under one parent, records a failing trial as FAILED and goes on."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raycache.cli import main

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, space: dict, **extra) -> Path:
    body = {"name": extra.pop("name", "s"), "base": str(ROOT / "experiments/tiny.yaml"),
            "set": ["federation.rounds=1", "data.clients=4", "runtime.client_actors=1", "runtime.client_cpus=0.95",
                    "tracking.experiment=sweep-test", f"runtime.cache_dir={tmp_path / 'store'}"],
            "space": space, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def sweep_children(mlflow_uri: str, name: str):
    """(parent run, its child runs) of the sweep `name` in the tests' experiment."""
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("sweep-test")
    parent = [r for r in client.search_runs([exp.experiment_id], "tags.`raycache.kind` = 'sweep'")
              if r.info.run_name == name][0]
    return parent, client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


@pytest.mark.parametrize("space, expect", [
    ({"data.clinets": {"grid": [2]}}, "space.data.clinets: unknown config key (did you mean data.clients?)"),
    ({"data.alpha": {"grid": []}}, "space.data.alpha: empty grid"),
    ({"data.clients": {"uniform": [2, 5]}}, "space.data.clients: uniform draws floats, which data.clients does "
                                             "not take"),
    ({"method.name": {"choice": ["cachefl", "nope"]}}, "space.method.name: 'nope' does not fit (method.name: "
                                                        "unknown method 'nope'"),
    ({"method.lr": {"loguniform": [0, 1]}}, "space.method.lr: loguniform needs low > 0"),
    ({"data.alpha": {"grid": [0.1], "choice": [1]}}, "space.data.alpha: give exactly one search type"),
])
def test_bad_space_is_one_line_exit_2(tmp_path, capsys, space, expect):
    code = main(["sweep", str(sweep_file(tmp_path, space))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


@pytest.mark.parametrize("metric", ["accuracy", "selected_accuracy", "local_accuracy_mean", "result_accuracy"])
def test_a_test_metric_is_refused_unless_allowed(tmp_path, capsys, metric):
    path = sweep_file(tmp_path, {"data.alpha": {"grid": [0.5]}}, metric=metric)
    code = main(["sweep", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"metric: {metric!r} is measured on test data" in err[0], err
    from raycache.sweep.space import load_sweep

    allowed = sweep_file(tmp_path, {"data.alpha": {"grid": [0.5]}}, metric=metric, allow_test_selection=True)
    assert load_sweep(allowed)[0].metric == metric  # knowingly: accepted
    assert load_sweep(sweep_file(tmp_path, {"data.alpha": {"grid": [0.5]}}))[0].metric == "val_accuracy"


def test_a_trial_larger_than_the_cluster_is_refused(tmp_path, capsys, ray_session, mlflow_uri):
    path = sweep_file(tmp_path, {"data.alpha": {"grid": [0.5]}})
    code = main(["sweep", str(path), "--set", "runtime.client_actors=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: runtime.client_actors: one trial needs 2.86 CPUs"), err


@pytest.mark.slow
def test_sweep_nests_trials_under_a_parent_and_survives_a_failing_trial(tmp_path, capsys, ray_session, mlflow_uri):
    # data.clients=5000 passes the type check but cannot be partitioned: that trial fails, the others run
    path = sweep_file(tmp_path, {"data.alpha": {"grid": [0.1, 1.0]}, "data.clients": {"grid": [4, 5000]}},
                      name="nested", max_concurrent=2)
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("sweep-test")
    parent, children = sweep_children(mlflow_uri, "nested")
    assert len(children) == 4
    by_params = {tuple(sorted(json.loads(c.data.tags["raycache.sweep_params"]).items())): c for c in children}
    for alpha in (0.1, 1.0):
        ok = by_params[(("data.alpha", alpha), ("data.clients", 4))]
        assert ok.info.status == "FINISHED" and ok.data.params["data.alpha"] == str(alpha)
        assert [m.step for m in client.get_metric_history(ok.info.run_id, "accuracy")] == [0, 1]
        bad = by_params[(("data.alpha", alpha), ("data.clients", 5000))]
        assert bad.info.status == "FAILED" and "5000 clients but only" in bad.data.tags["failure_reason"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["trials_failed"] == 2
    # validation selects: the best trial has the highest validation accuracy at its selected round; its test
    # accuracy is reported beside it, never used to choose
    finished = [c for c in children if c.info.status == "FINISHED"]
    top = max(c.data.metrics["result_val_accuracy"] for c in finished)
    best = next(c for c in finished if c.info.run_id == parent.data.tags["best_run_id"])
    assert best.data.metrics["result_val_accuracy"] == top  # ties: any of the best
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["result_val_accuracy"]
    assert parent.data.metrics["best_test_accuracy"] == best.data.metrics["result_accuracy"]
    assert "best_accuracy" not in parent.data.metrics
    for c in finished:  # the selected round is the earliest with the highest val_accuracy; result = that round
        val = [m.value for m in sorted(client.get_metric_history(c.info.run_id, "val_accuracy"), key=lambda m: m.step)]
        test = [m.value for m in sorted(client.get_metric_history(c.info.run_id, "accuracy"), key=lambda m: m.step)]
        assert c.data.metrics["best_round"] == val.index(max(val))
        # the result is that round's state (with alpha and beta then searched on validation: cachefl)
        before_search = c.data.metrics.get("presearch_accuracy", c.data.metrics["result_accuracy"])
        assert c.data.metrics["selected_accuracy"] == test[val.index(max(val))] == before_search
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "heatmap.png"} <= artifacts
    # the MLflow UI: a model-training experiment, and a saved view with the swept keys as columns
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.sweep_nested"])
    columns = json.loads(view["state"])["selectedColumns"]
    assert {"params.`data.alpha`", "params.`data.clients`", "metrics.`result_val_accuracy`",
            "metrics.`result_accuracy`"} <= set(columns)
    assert "workflowType=machine_learning&viewStateShareKey=sweep_nested" in out
    table = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    header = Path(table).read_text().splitlines()[0].split(",")
    assert header[3:5] == ["val_accuracy", "test_accuracy"]
    assert "best:" in out
    # the features were encoded once, by the driver, and every trial read them from the object store
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert all(c.data.metrics["features_encoded"] == 0 and c.data.metrics["features_shared"] == 1 for c in finished)
    # running the same sweep again without --resume would mix two sweeps: refused
    assert main(["sweep", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sweep_of_a_method_that_trains_on_pixels_encodes_its_rows_up_front(tmp_path, ray_session, mlflow_uri):
    """Trials of a pixel method need frozen features of the test and server rows only: the driver encodes
    those before any trial starts (an encoder pool inside a trial's placement group could never be placed),
    and every trial reads them from the store."""
    path = sweep_file(tmp_path, {"method.lr": {"grid": [1.0e-3, 1.0e-2]}}, name="pixels")
    body = yaml.safe_load(path.read_text())
    body["set"] += ["method.name=flora", "per_method.flora.lora_targets=[vision.attn.q_proj]"]
    path.write_text(yaml.safe_dump(body))
    assert main(["sweep", str(path)]) == 0
    _, children = sweep_children(mlflow_uri, "pixels")
    assert len(children) == 2
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.metrics["features_encoded"] == 0 and c.data.metrics["time_pixels_s"] > 0


@pytest.mark.slow
def test_warm_trials_reuse_processes_and_compute_what_a_run_alone_does(tmp_path, ray_session, mlflow_uri):
    """One trial at a time: the second trial runs in the first one's Tune process with its server and host
    actors, re-initialised; its rounds are those of the same config run on its own, metric for metric."""
    from raycache.experiment import run_experiment
    from raycache.sweep.runner import run_sweep, trial_config
    from raycache.sweep.space import load_sweep

    path = sweep_file(tmp_path, {"data.alpha": {"grid": [0.1, 1.0]}}, name="warm", max_concurrent=1)
    sweep, base = load_sweep(path, ["federation.rounds=2"])
    ended = []  # the CLI's progress: (trials ended, trials) as each trial ends
    result = run_sweep(sweep, base, on_trial=lambda done, total: ended.append((done, total)))
    assert ended == [(1, 2), (2, 2)]
    client = MlflowClient(mlflow_uri)
    runs = sorted((client.get_run(t["run_id"]) for t in result.trials), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.metrics["actors_reused"] for r in runs] == [0, 2]  # the server and the one host
    second = runs[1]
    params = json.loads(second.data.tags["raycache.sweep_params"])
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Tune trial's process: the driver-side sums (the cache keys) then
    try:                      # add up in the same order, to the last bit
        alone = run_experiment(trial_config(base, params, "alone"))
    finally:
        torch.set_num_threads(threads)

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    for key in ("accuracy", "val_accuracy", "loss", "client_accuracy_mean", "result_accuracy"):
        assert history(second.info.run_id, key) == history(alone.run_id, key), key
    assert history(alone.run_id, "accuracy")[-1][0] == 2


def _kill_trial_process_after(client, name: str, round_idx: int, killed: list, timeout: float = 300) -> None:
    """Watch MLflow until a trial of sweep `name` has checkpointed `round_idx`, then SIGKILL its Tune trial
    process (a lost process, as a node failure would leave it); record the run id in `killed`."""
    import os
    import signal
    import time

    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name("sweep-test")
        runs = client.search_runs([exp.experiment_id], f"tags.`raycache.trial` LIKE '{name}-%'") if exp else []
        for run in runs:
            if int(run.data.tags.get("raycache.checkpoint_round", -1)) >= round_idx:
                for proc in psutil.process_iter(["cmdline"]):  # Ray titles it `ray::ImplicitFunc...`
                    if any("ImplicitFunc" in part for part in proc.info["cmdline"] or []):
                        os.kill(proc.pid, signal.SIGKILL)
                killed.append(run.info.run_id)
                return
        time.sleep(0.1)


@pytest.mark.slow
def test_a_trial_whose_process_dies_is_retried_from_its_last_round_or_failed_with_why(tmp_path, ray_session,
                                                                                     mlflow_uri):
    import threading

    from raycache.sweep.runner import run_sweep
    from raycache.sweep.space import load_sweep

    client = MlflowClient(mlflow_uri)
    slow_rounds = ["federation.rounds=6", "method.local_epochs=40"]  # rounds long enough to kill one mid-run
    for name, retries in (("retried", 1), ("lost", 0)):
        path = sweep_file(tmp_path, {"data.alpha": {"grid": [0.5]}}, name=name, max_concurrent=1,
                          max_failures=retries)
        sweep, base = load_sweep(path, slow_rounds)
        killed: list[str] = []
        killer = threading.Thread(target=_kill_trial_process_after, args=(client, name, 2, killed))
        killer.start()
        result = run_sweep(sweep, base)
        killer.join()
        assert killed, "the trial ended before it could be killed"
        (trial,) = result.trials
        run = client.get_run(killed[0])
        if retries:  # retried in a new process: the same MLflow run continued from its checkpoint
            assert trial["status"] == "FINISHED" and trial["run_id"] == killed[0]
            assert int(run.data.tags["raycache.resumed_from_round"]) >= 2
            history = client.get_metric_history(killed[0], "accuracy")
            assert sorted({m.step for m in history}) == list(range(7))  # no round lost
            by_step: dict[int, set] = {}
            for m in history:  # a round logged just before the kill, then replayed: the same value
                by_step.setdefault(m.step, set()).add(m.value)
            assert all(len(v) == 1 for v in by_step.values())
        else:  # no retry left: FAILED with the reason, not labelled as stopped by the scheduler
            assert run.info.status == "FAILED" and "stopped_by" not in run.data.tags
            assert "died" in run.data.tags["failure_reason"].lower() or "actor" in run.data.tags["failure_reason"]


@pytest.mark.slow
def test_asha_stops_a_weak_trial_by_round(tmp_path, ray_session, mlflow_uri):
    """Trials run one at a time, the strong one first: ASHA (halving at round 1) must stop the weak one
    (zero-shot, which does not learn) after its first round, and let the strong one run every round."""
    from raycache.sweep.runner import run_sweep
    from raycache.sweep.space import load_sweep

    path = sweep_file(tmp_path, {"method.name": {"grid": ["cachefl", "zeroshot"]}}, name="asha", scheduler="asha",
                      grace_rounds=1, reduction_factor=2, max_concurrent=1)
    sweep, base = load_sweep(path, ["federation.rounds=3"])
    result = run_sweep(sweep, base)
    client = MlflowClient(mlflow_uri)
    by_method = {t["params"]["method.name"]: t for t in result.trials}
    strong, weak = by_method["cachefl"], by_method["zeroshot"]
    assert strong["status"] == "FINISHED"
    assert [m.step for m in client.get_metric_history(strong["run_id"], "accuracy")] == [0, 1, 2, 3]
    weak_run = client.get_run(weak["run_id"])
    reason = weak_run.data.tags.get("failure_reason")
    assert weak_run.info.status == "KILLED" and weak_run.data.tags["stopped_by"] == "scheduler", reason
    # stopped on its round-1 report, which was on record before Tune saw it (`callback_after_write`)
    assert [m.step for m in client.get_metric_history(weak["run_id"], "accuracy")] == [0, 1]
    assert result.best["run_id"] == strong["run_id"]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path, mlflow_uri):
    import os
    import signal
    import subprocess
    import sys
    import time

    # six trials: warm trials take seconds each, and the Ctrl-C must land while some are still to run
    grid = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
    path = sweep_file(tmp_path, {"data.alpha": {"grid": grid}}, name="resumable", max_concurrent=1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    cmd = [sys.executable, "-m", "raycache", "sweep", str(path)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = MlflowClient(mlflow_uri)

    def children(status=None):
        exp = client.get_experiment_by_name("sweep-test")
        if exp is None:
            return []
        parents = [r for r in client.search_runs([exp.experiment_id], "tags.`raycache.kind` = 'sweep'")
                   if r.info.run_name == "resumable"]
        if not parents:
            return []
        runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        return [r for r in runs if status is None or r.info.status == status]

    try:
        deadline = time.time() + 300
        while not children("FINISHED") and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        assert children("FINISHED"), proc.stdout.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGINT)  # the user presses Ctrl-C mid-sweep
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before = {r.data.tags["raycache.trial"]: r.info.run_id for r in children("FINISHED")}
    assert 1 <= len(done_before) < len(grid)
    resumed = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished = children("FINISHED")
    trials = {r.data.tags["raycache.trial"] for r in finished}
    assert len(trials) == len(grid)  # every grid point finished once in the end
    for trial, run_id in done_before.items():  # finished trials were not run again
        assert [r.info.run_id for r in finished if r.data.tags["raycache.trial"] == trial] == [run_id]
    exp = client.get_experiment_by_name("sweep-test")
    parent = [r for r in client.search_runs([exp.experiment_id], "tags.`raycache.kind` = 'sweep'")
              if r.info.run_name == "resumable"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"  # the same parent, finished on resume
    assert parent[0].data.metrics["trials"] == len(grid) and parent[0].data.metrics["trials_finished"] == len(grid)


def test_a_validation_metric_without_a_validation_split_is_refused(tmp_path, capsys):
    path = sweep_file(tmp_path, {"data.val_fraction": {"grid": [0.1, 0.0]}})
    code = main(["sweep", str(path), "--set", "federation.selection=final"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "metric: 'val_accuracy' needs a validation split" in err[0], err


@pytest.mark.parametrize("loose", ["folder", "file"])
def test_resume_refuses_a_sweep_folder_others_can_write(tmp_path, capsys, loose):
    """--resume unpickles Tune's state from the sweep's folder: it is restored only when no other user
    could have written it (refused before Ray starts)."""
    import os

    path = sweep_file(tmp_path, {"data.alpha": {"grid": [0.5]}})
    folder = tmp_path / "store" / "sweeps" / "s"
    folder.mkdir(parents=True)
    (folder / "raycache_sweep.json").write_text(json.dumps({"parent_run_id": "x"}))
    state = folder / "tuner.pkl"
    state.write_bytes(b"not a pickle anyone should load")
    os.chmod(folder if loose == "folder" else state, 0o777 if loose == "folder" else 0o666)
    code = main(["sweep", str(path), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()[1:]  # after the sweep's heading
    target = folder if loose == "folder" else state
    assert code == 2 and len(err) == 1 and f"error: --resume: {target} can be written by other users" in err[0], err
