"""The driver's round loop: round r+1 runs on the actors while the driver writes round r's checkpoint and
metrics, and what it writes for round r is round r's."""

from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from raycache.config_file import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_rounds_checkpoint_holds_that_round_while_the_next_round_runs(feature_store, ray_session, mlflow_uri,
                                                                         monkeypatch):
    """Each round's checkpoint is written after the next round was started (the writing overlaps its work),
    yet holds the state after its own round: round 2's checkpoint of a 3-round run equals the last checkpoint
    of the same run stopped after 2 rounds (a snapshot taken once round 3 had started would hold round 3's
    state, since the server answers calls in order). Round 3, the last, starts nothing. Every round's
    metrics are logged once."""
    import raycache.resume
    from raycache.experiment import run_experiment
    from raycache.federation import checkpoint
    from raycache.federation.runtime import Federation

    def cfg(rounds: int, name: str):
        return load_config(str(ROOT / "experiments/tiny.yaml"), [
            f"federation.rounds={rounds}", "method.name=cachefl", "federation.keep_checkpoints=3",
            f"runtime.cache_dir={feature_store}", "tracking.experiment=round-loop", f"tracking.run_name={name}"])

    two = run_experiment(cfg(2, "two"))
    client = MlflowClient(mlflow_uri)
    after_two = checkpoint.load(Path(client.get_run(two.run_id).data.tags["raycache.checkpoint"]))
    assert after_two.round == 2  # the last round's: nothing ran after it

    started: list[int] = []
    submit = Federation.submit_round

    def recording_submit(self, round_idx):
        submit(self, round_idx)
        started.append(round_idx)

    at_save: dict[int, list[int]] = {}
    save = raycache.resume.save_round

    def recording_save(cfg, run, r, snapshot, meta):
        at_save[r] = list(started)
        return save(cfg, run, r, snapshot, meta)

    monkeypatch.setattr(Federation, "submit_round", recording_submit)
    monkeypatch.setattr(raycache.resume, "save_round", recording_save)
    three = run_experiment(cfg(3, "three"))
    assert at_save == {1: [2], 2: [2, 3], 3: [2, 3]}  # round r+1 started before round r was written

    folder = Path(client.get_run(three.run_id).data.tags["raycache.checkpoint"]).parent
    second = checkpoint.load(folder / "round-00002.safetensors")
    assert second.round == 2 and second.meta["last"] == three.history[1]
    for key, value in after_two.snapshot["state"].items():
        assert np.array_equal(second.snapshot["state"][key], value), key
    third = checkpoint.load(folder / "round-00003.safetensors")
    assert any(not np.array_equal(third.snapshot["state"][k], v) for k, v in after_two.snapshot["state"].items())
    steps = [m.step for m in client.get_metric_history(three.run_id, "accuracy")]
    assert steps == [0, 1, 2, 3]


def test_a_callback_after_write_sees_its_round_on_record_and_nothing_started(feature_store, ray_session, mlflow_uri,
                                                                             monkeypatch):
    """A sweep's trial reports to Tune, which may end its process inside the report: with
    `callback_after_write`, each round's callback finds that round checkpointed and logged, and the next
    round not yet started (a scheduler that stops the trial there wastes no round). The sweep's trials run
    so (`tests/test_sweep.py`: a trial ASHA stops has exactly the rounds it reported)."""
    from raycache.experiment import run_experiment
    from raycache.federation.runtime import Federation

    started: list[int] = []
    submit = Federation.submit_round

    def recording_submit(self, round_idx):
        submit(self, round_idx)
        started.append(round_idx)

    monkeypatch.setattr(Federation, "submit_round", recording_submit)
    client = MlflowClient(mlflow_uri)
    seen: dict[int, tuple] = {}

    def on_round(r, metrics):
        run = client.search_runs([client.get_experiment_by_name("round-loop").experiment_id],
                                 "attributes.run_name = 'durable'")[0]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")]
        seen[r] = (list(started), steps, run.data.tags.get("raycache.checkpoint_round"))

    cfg = load_config(str(ROOT / "experiments/tiny.yaml"), [
        "federation.rounds=3", "method.name=cachefl", f"runtime.cache_dir={feature_store}",
        "tracking.experiment=round-loop", "tracking.run_name=durable"])
    run_experiment(cfg, on_round=on_round, callback_after_write=True)
    assert seen == {1: ([], [0, 1], "1"), 2: ([2], [0, 1, 2], "2"), 3: ([2, 3], [0, 1, 2, 3], "3")}


def test_looking_ahead_starts_the_next_rounds_training_before_the_driver_asks_and_changes_no_result(
        feature_store, ray_session, mlflow_uri):
    """With `runtime.look_ahead`, the client actors start round r+1's training right behind round r's
    evaluation: while the driver is still in round 1's callback (held there 1 s), both hosts have started
    round 2 (Ray's task events: every round so far, against round 1's alone when the server waits to be
    asked). Every logged metric but the timings, the validation-selected round and the result are the same
    either way: the round started early is the round the driver would have asked for."""
    import time

    import ray

    from raycache.experiment import run_experiment

    hosts = 2
    runs, started = {}, {}
    for ahead in (False, True):
        cfg = load_config(str(ROOT / "experiments/tiny.yaml"), [
            "federation.rounds=3", "method.name=cachefl", f"runtime.cache_dir={feature_store}",
            f"runtime.client_actors={hosts}", f"runtime.look_ahead={str(ahead).lower()}",
            "tracking.experiment=round-loop", f"tracking.run_name=ahead-{ahead}"])
        window = {"begun": time.time()}

        def on_round(r, metrics, window=window):
            if r == 1:
                time.sleep(1.0)  # the driver is busy: round 2 has not been asked for
                window["left"] = time.time()
            if r == 3:
                time.sleep(2.0)  # the hosts report their task events each second, unless killed first

        runs[ahead] = run_experiment(cfg, on_round=on_round)
        assert runs[ahead].history[0]["clients_succeeded"] >= hosts  # a round gives every host clients
        deadline = time.time() + 30  # task events reach the GCS within a second or so
        while True:
            trains = [e for e in ray.timeline() if e.get("ph") == "X" and e["name"] == "train"
                      and e["ts"] / 1e6 > window["begun"]]
            if len(trains) >= 3 * hosts or time.time() > deadline:
                break
            time.sleep(0.5)
        assert len(trains) == 3 * hosts
        started[ahead] = sum(e["ts"] / 1e6 < window["left"] for e in trains)
    assert started == {False: hosts, True: 2 * hosts}

    def learned(summary):
        return [{k: v for k, v in m.items() if not any(w in k for w in ("seconds", "memory", "time"))}
                for m in summary.history]

    assert learned(runs[True]) == learned(runs[False])
    assert runs[True].selection == runs[False].selection
    assert runs[True].initial == runs[False].initial
