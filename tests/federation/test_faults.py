"""Client faults: injected dropout and stragglers as pure functions of (seed, round, client); a host actor
killed mid-round; too few clients failing the run clearly; the same metrics whatever the actor count."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raycache.config_file import load_config
from raycache.errors import RunFailed
from raycache.experiment import run_experiment
from raycache.federation.faults import delay, plan_faults

ROOT = Path(__file__).resolve().parents[2]
MODEL_METRICS = ("accuracy", "loss", "client_accuracy_mean", "client_accuracy_std", "comm_bytes_up",
                 "comm_bytes_down", "clients_sampled", "clients_succeeded", "clients_failed", "clients_dropped",
                 "clients_late")


def fed(**kw):
    return load_config(None, [f"federation.{k}={v}" for k, v in kw.items()]).federation


def test_fault_plan_is_a_function_of_seed_round_and_client():
    f = fed(dropout=0.3)
    clients = np.arange(2000)
    plan = plan_faults(clients, 7, 3, f)
    assert 0.25 < plan.dropped.mean() < 0.35 and not plan.late.any()
    # the same client draws the same fate whatever else is sampled with it (any actor, any subset)
    sub = clients[::7]
    assert np.array_equal(plan_faults(sub, 7, 3, f).dropped, plan.dropped[::7])
    assert not np.array_equal(plan_faults(clients, 7, 4, f).dropped, plan.dropped)  # a new draw each round
    assert not plan_faults(clients, 7, 3, fed()).dropped.any()  # no faults unless asked


def test_stragglers_miss_the_deadline_by_their_simulated_delay():
    f = load_config(None, ["federation.straggler.distribution=lognormal", "federation.straggler.median_s=1.0",
                           "federation.round_deadline_s=2.0"]).federation
    plan = plan_faults(np.arange(4000), 0, 1, f)
    assert abs(np.median(plan.delays) - 1.0) < 0.1
    assert np.array_equal(plan.late, plan.delays > 2.0)
    # lognormal sigma 1: P(delay > 2 x median) = P(Z > ln 2) ~ 0.244
    assert abs(plan.late.mean() - 0.244) < 0.03
    assert delay(0.5, "exponential", 3.0, 1.0) == pytest.approx(3.0)  # the median is the median


def test_a_straggler_distribution_needs_a_deadline(capsys):
    from raycache.cli import main

    code = main(["check", str(ROOT / "experiments/tiny.yaml"), "--set",
                 "federation.straggler.distribution=exponential"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "federation.round_deadline_s" in err[0], err


def quick(store, *extra):
    """The tiny config, 3 rounds, on the session's shared feature store (these tests are about the federation,
    not encoding: `tests/data/test_features.py` encodes into stores of its own)."""
    return load_config(str(ROOT / "experiments/tiny.yaml"), [
        "federation.rounds=3", f"runtime.cache_dir={store}", "tracking.experiment=faults", *extra])


def test_dropout_is_counted_and_metrics_do_not_depend_on_the_actor_count(feature_store, ray_session, mlflow_uri):
    runs = [run_experiment(quick(feature_store, "federation.dropout=0.3", f"runtime.client_actors={a}"))
            for a in (1, 2)]
    for m in runs[0].history:
        assert m["clients_dropped"] > 0 and m["clients_failed"] == 0
        assert m["clients_succeeded"] + m["clients_dropped"] == m["clients_sampled"]
    assert [{k: m[k] for k in MODEL_METRICS} for m in runs[0].history] == \
           [{k: m[k] for k in MODEL_METRICS} for m in runs[1].history]


def test_too_few_clients_fail_the_run_clearly(feature_store, ray_session, mlflow_uri):
    with pytest.raises(RunFailed, match=r"round 1: \d+ of 10 sampled clients reported, fewer than "
                                        r"federation.min_clients=10"):
        run_experiment(quick(feature_store, "federation.dropout=0.5", "federation.min_clients=10",
                             "tracking.run_name=too-few"))
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                             "attributes.run_name = 'too-few'")[0]
    assert run.info.status == "FAILED" and "federation.min_clients=10" in run.data.tags["failure_reason"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0]  # no round aggregated


def test_a_host_killed_mid_round_loses_its_clients_for_that_round_and_is_replaced(feature_store, ray_session, mlflow_uri):
    import ray

    killed = []

    def kill_a_host_soon(r, metrics):
        if r == 1:  # round 2 starts as soon as this returns; each host trains for about a second
            def kill():
                time.sleep(0.3)
                names = sorted(n for n in ray.util.list_named_actors() if n.startswith("raycache-host-"))
                ray.kill(ray.get_actor(names[0]), no_restart=False)
                killed.append(names[0])
            threading.Thread(target=kill, daemon=True).start()

    cfg = quick(feature_store, "method.local_epochs=300", "federation.rounds=4", "tracking.run_name=killed")
    summary = run_experiment(cfg, on_round=kill_a_host_soon)
    assert killed and summary.rounds == 4
    failed = [m["clients_failed"] for m in summary.history]
    assert failed[0] == 0 and sum(failed) >= 1, failed  # the killed host's clients, in the round it died
    assert summary.history[-1]["host_restarts"] >= 1
    last = summary.history[-1]
    assert last["clients_failed"] == 0 and last["clients_succeeded"] == last["clients_sampled"]  # replaced
    run = MlflowClient(mlflow_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"


def _server_killer(after_round: int, wait: bool = True):
    """An `on_round` callback that kills this run's server actor (as a lost node would) after `after_round`."""
    import ray

    before = set(ray.util.list_named_actors())
    killed = []

    def kill(r, metrics):
        if r != after_round:
            return
        name, = [n for n in ray.util.list_named_actors() if n.startswith("raycache-server-") and n not in before]
        server = ray.get_actor(name)
        ray.kill(server, no_restart=True)
        while wait:  # until it is gone: the next call must find it dead
            try:
                ray.get(server.info.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
        killed.append(name)

    return kill, killed


@pytest.fixture(scope="module")
def undisturbed(feature_store, ray_session, mlflow_uri):
    return run_experiment(quick(feature_store, "federation.rounds=4",
                                "tracking.run_name=undisturbed"))


@pytest.mark.parametrize("checkpoint, replayed", [
    (True, 0),  # from round 2's checkpoint
    pytest.param(False, 2, marks=pytest.mark.slow),  # from the start, replaying rounds 1 and 2 (CI runs it)
])
def test_a_lost_server_is_replaced_and_the_run_is_the_undisturbed_one(feature_store, undisturbed, mlflow_uri,
                                                                      checkpoint, replayed):
    """The server actor killed after round 2: the next call finds it gone, a new federation starts from round
    2's snapshot (the checkpoint; without checkpoints, from the start, replaying rounds 1 and 2), and the run
    ends as if nothing had happened: every round's metrics and the selected result equal an undisturbed
    run's, each round logged once."""
    clean = undisturbed
    client = MlflowClient(mlflow_uri)
    kill, killed = _server_killer(after_round=2)
    lost = run_experiment(quick(feature_store, "federation.rounds=4", f"federation.checkpoint={str(checkpoint).lower()}",
                                "tracking.run_name=server-lost"), on_round=kill)
    assert killed and lost.rounds == 4
    assert [{k: m[k] for k in MODEL_METRICS} for m in lost.history] == \
           [{k: m[k] for k in MODEL_METRICS} for m in clean.history]
    assert lost.selection == clean.selection and lost.selection
    run = client.get_run(lost.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["server_restarts"] == 1
    assert run.data.metrics["rounds_replayed"] == replayed
    assert [m.step for m in client.get_metric_history(lost.run_id, "accuracy")] == [0, 1, 2, 3, 4]


@pytest.mark.slow  # CI runs it (.ci/run)
def test_a_server_lost_before_its_hosts_memories_are_fetched_is_replaced(feature_store, ray_session, mlflow_uri,
                                                                         monkeypatch):
    """A checkpoint's client optimiser memories come from the hosts, through references the server hands the
    driver. The server killed right after it answered round 2's snapshot, before the driver fetched them:
    either the memories still arrive (small ones travel with the references) and the next round rebuilds
    the federation from this snapshot, or their fetch fails with the server and it is rebuilt from round
    1's, replaying round 2. Either way the run equals an undisturbed one, optimiser memories included
    (`persist_optimizer`: a lost or stale memory would change rounds 2 and 3)."""
    import ray

    from raycache.federation.runtime import Federation

    extra = ["method.persist_optimizer=true", "federation.rounds=3"]
    clean = run_experiment(quick(feature_store, *extra, "tracking.run_name=memory-clean"))
    call, killed = Federation._call, []

    def kill_after_snapshot(self, method, *args, **kwargs):
        out = call(self, method, *args, **kwargs)
        if method == "snapshot" and self.round == 2 and not killed:
            server = self.server
            ray.kill(server, no_restart=True)
            while True:  # until it is gone, with the objects it owns
                try:
                    ray.get(server.info.remote(), timeout=10)
                except ray.exceptions.RayActorError:
                    break
            killed.append(method)
        return out

    monkeypatch.setattr(Federation, "_call", kill_after_snapshot)
    lost = run_experiment(quick(feature_store, *extra, "tracking.run_name=memory-lost"))
    assert killed and lost.rounds == 3
    assert [{k: m[k] for k in MODEL_METRICS} for m in lost.history] == \
           [{k: m[k] for k in MODEL_METRICS} for m in clean.history]
    run = MlflowClient(mlflow_uri).get_run(lost.run_id)
    assert run.data.metrics["server_restarts"] == 1 and run.data.metrics["rounds_replayed"] in (0, 1)


@pytest.mark.slow  # CI runs it (.ci/run)
def test_a_server_lost_more_often_than_allowed_fails_the_run_in_one_line(feature_store, ray_session, mlflow_uri):
    kill, killed = _server_killer(after_round=1, wait=False)
    with pytest.raises(RunFailed, match=r"round \d: the server actor was lost .* federation.server_restarts=0 "
                                        r"replacements are used up; --resume continues the run"):
        run_experiment(quick(feature_store, "federation.server_restarts=0"), on_round=kill)
    assert killed


def _host_stopper(index: int, stopped: list[int]):
    """An `on_round` callback that, after round 1, stops host `index` with SIGSTOP (alive, silent: a hung
    process or a stalled node) and records its pid in `stopped`."""
    import os
    import signal

    import ray

    def stop(r, metrics):
        if r == 1:
            names = sorted(n for n in ray.util.list_named_actors() if n.startswith("raycache-host-"))
            pid = ray.get(ray.get_actor(names[index]).pid.remote())
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    return stop


def _run_with_a_stopped_host(cfg, index: int):
    """`cfg` run with host `index` stopped after round 1 (`_host_stopper`), under a watchdog: without a
    deadline the run would wait for ever, so the watchdog ends the wait and the test fails instead. The
    stopped process is killed whatever happened. Returns the run's summary once it asserts it was stopped."""
    from raycache.federation.supervision import AUTO_FLOOR_S

    stopped: list[int] = []
    watchdog = threading.Timer(AUTO_FLOOR_S + 150, _kill, [stopped])
    watchdog.start()
    try:
        summary = run_experiment(cfg, on_round=_host_stopper(index, stopped))
    finally:
        watchdog.cancel()
        _kill(stopped)
    assert stopped and summary.rounds == 3
    return summary


def _kill(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("deadline", [
    # client_timeout_s=0.5: 0.5 s per client on the host + 5 s (about 40 s here: CI runs it)
    pytest.param("explicit", marks=pytest.mark.slow),
    pytest.param("automatic", marks=pytest.mark.slow),  # the default: 30 s + 10x the measured rate x samples
])
def test_a_host_that_hangs_past_its_deadline_is_replaced(feature_store, ray_session, mlflow_uri, deadline):
    """A host that stops answering (SIGSTOP: alive, silent) holds its round past its deadline; the server
    gives up on its clients, kills it and starts a replacement, and the next round is whole again. With the
    default (automatic) deadline too: a hung host never blocks a run for ever. (Without looking ahead, so that
    round 2's training is asked of the host after it stopped: `test_a_host_that_hangs_...looked_ahead`.)"""
    from raycache.federation.supervision import AUTO_FACTOR, AUTO_FLOOR_S

    stopped = []
    extra = ["federation.client_timeout_s=0.5"] if deadline == "explicit" else []
    cfg = quick(feature_store, *extra, "data.clients=4", "federation.rounds=3", "tracking.run_name=hung",
                "runtime.look_ahead=false")
    try:
        summary = run_experiment(cfg, on_round=_host_stopper(0, stopped))
    finally:
        _kill(stopped)  # never leave a stopped process behind, whatever happened
    assert stopped and summary.rounds == 3
    first, hung, after = summary.history
    assert hung["clients_failed"] == 2 and hung["clients_succeeded"] == 2  # the stopped host's two clients
    if deadline == "explicit":
        assert hung["host_restarts"] == 1 and hung["round_seconds"] >= 0.5 * 2 + 5
    else:
        # round 1 measured the clients (a fraction of a second each): the limit is the floor plus a little,
        # far above any legitimate round here and far below for ever
        assert first["client_seconds"] < 30
        assert AUTO_FLOOR_S <= hung["round_seconds"] < AUTO_FLOOR_S + AUTO_FACTOR * 3 * first["client_seconds"] + 30
    assert after["clients_failed"] == 0 and after["clients_succeeded"] == 4  # the replacement serves them


@pytest.mark.slow  # waits out the automatic floor (30 s) of an evaluation deadline: CI runs it (.ci/run)
def test_a_host_that_hangs_while_evaluating_is_replaced_and_its_rows_are_evaluated_elsewhere(feature_store, ray_session,
                                                                                            mlflow_uri):
    """One client a round trains on host 0 (the assignment deals the largest first to host 0), so a stopped
    host 1 holds no training, only its share of the evaluation rows. Its evaluation misses the automatic
    deadline (measured from round 0's and round 1's evaluations); the server replaces it and evaluates its
    rows elsewhere: every round's metrics equal an undisturbed run's, and the run never waits for ever."""
    from raycache.federation.supervision import AUTO_FLOOR_S

    extra = ["federation.fraction=0.1", "federation.rounds=3", "federation.checkpoint=false"]
    clean = run_experiment(quick(feature_store, *extra, "tracking.run_name=eval-clean"))
    hung = _run_with_a_stopped_host(quick(feature_store, *extra, "tracking.run_name=eval-hung"), 1)
    learned = (*MODEL_METRICS, "val_accuracy")  # host 1's share holds the validation rows, which select
    assert [{k: m[k] for k in learned} for m in hung.history] == [{k: m[k] for k in learned} for m in clean.history]
    assert hung.selection == clean.selection
    first, second, third = hung.history
    assert second["clients_failed"] == 0  # host 1 trained no one: what it missed was the evaluation
    assert second["host_restarts"] == 0  # counted with the round's training, before its evaluation
    assert AUTO_FLOOR_S <= second["round_seconds"] < AUTO_FLOOR_S + 90
    assert third["host_restarts"] == 1 and third["round_seconds"] < AUTO_FLOOR_S  # its replacement answers


@pytest.mark.slow  # waits out the automatic floor (30 s) of an evaluation deadline: CI runs it (.ci/run)
def test_a_host_that_hangs_after_the_server_looked_ahead_is_replaced_and_the_next_round_asked_again(
        feature_store, ray_session, mlflow_uri):
    """Looking ahead, the server starts round r+1's training on the hosts right behind round r's evaluation.
    Host 1, stopped after round 1, has already trained round 2 (its call came before the callback), so round
    2 loses no client, but it misses its share of round 2's evaluation and is replaced; round 3's training,
    already sent to it, is sent again to its replacement: round 3 is whole and on time, and every round's
    metrics equal an undisturbed run's."""
    from raycache.federation.supervision import AUTO_FLOOR_S

    extra = ["data.clients=4", "federation.fraction=1.0", "federation.rounds=3", "federation.checkpoint=false",
             "runtime.look_ahead=true"]
    clean = run_experiment(quick(feature_store, *extra, "tracking.run_name=ahead-clean"))
    hung = _run_with_a_stopped_host(quick(feature_store, *extra, "tracking.run_name=ahead-hung"), 1)
    learned = (*MODEL_METRICS, "val_accuracy")
    assert [{k: m[k] for k in learned} for m in hung.history] == [{k: m[k] for k in learned} for m in clean.history]
    first, second, third = hung.history
    assert second["clients_failed"] == 0 and second["clients_succeeded"] == 4  # trained before it stopped
    assert AUTO_FLOOR_S <= second["round_seconds"] < AUTO_FLOOR_S + 90  # its evaluation waited out
    assert third["host_restarts"] == 1 and third["clients_succeeded"] == 4  # asked again of the replacement
    assert third["round_seconds"] < AUTO_FLOOR_S  # not waiting on the stopped host's copy of the call


@pytest.mark.slow  # waits out the automatic floor (30 s) of an evaluation deadline: CI runs it (.ci/run)
def test_a_personal_host_that_hangs_while_evaluating_is_replaced(feature_store, ray_session, mlflow_uri):
    """A personal flow (local_only: each client keeps its own cache on its home host) evaluates every client on
    its home host. One client trains a round, so the host that is not its home in round 2 holds only its
    clients' evaluation; stopped (SIGSTOP) after round 1, it misses the automatic evaluation deadline, is
    replaced, and its replacement (whose clients are back on the initial state) is asked again: the run goes
    on, never waits for ever, and what happened before is what an undisturbed run logs."""
    from raycache.federation.sampling import home_host, sample_clients
    from raycache.federation.supervision import AUTO_FLOOR_S

    extra = ["method.name=local_only", "per_method.local_only.cache_init=real", "per_method.local_only.lr=1.0e-5",
             "per_method.local_only.beta=100", "per_method.local_only.alpha=10", "data.clients=4",
             "federation.fraction=0.25", "federation.rounds=3", "federation.checkpoint=false"]
    cfg = quick(feature_store, *extra, "tracking.run_name=personal-clean")
    (client,) = sample_clients(4, 0.25, cfg.seed, 2)  # round 2's one client
    idle = 1 - home_host(int(client), cfg.runtime.client_actors)
    assert cfg.runtime.client_actors == 2
    clean = run_experiment(cfg)
    hung = _run_with_a_stopped_host(quick(feature_store, *extra, "tracking.run_name=personal-hung"), idle)
    learned = (*MODEL_METRICS, "val_accuracy")
    assert [{k: m[k] for k in learned} for m in hung.history[:1]] == \
           [{k: m[k] for k in learned} for m in clean.history[:1]]
    first, second, third = hung.history
    assert second["clients_failed"] == 0 and second["host_restarts"] == 0  # it missed only the evaluation
    assert AUTO_FLOOR_S <= second["round_seconds"] < AUTO_FLOOR_S + 90
    assert third["host_restarts"] == 1 and third["round_seconds"] < AUTO_FLOOR_S  # its replacement answers


def test_clients_past_the_timeout_are_dropped_and_the_round_fails_without_them(feature_store, ray_session, mlflow_uri):
    # every local training takes longer than a microsecond: each client times out, so nothing can be aggregated
    with pytest.raises(RunFailed, match=r"round 1: 0 of 10 sampled clients reported.*\(failed 10,"):
        run_experiment(quick(feature_store, "federation.client_timeout_s=0.000001"))


def test_a_diverged_update_names_its_client():
    from raycache.federation.host import _check_finite

    _check_finite({"keys": np.ones(3, np.float32)}, 4, 2)
    with pytest.raises(RunFailed, match=r"round 2: client 4's update 'keys' has NaN/inf"):
        _check_finite({"keys": np.array([1.0, np.nan], np.float32)}, 4, 2)
