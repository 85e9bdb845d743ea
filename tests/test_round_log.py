"""Rounds reach MLflow together, at most once every `tracking.flush_seconds` (`raycache.round_log`), on a
real sqlite MLflow store: what waits is written whole, with each round's own step and time, within MLflow's
limit of 1,000 metrics a batch, and the newest checkpoint's link goes with it."""

from mlflow.tracking import MlflowClient

from raycache.round_log import RoundLog
from raycache.tracking import Run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_rounds_wait_until_the_interval_has_passed_then_go_together_with_the_newest_link(mlflow_uri):
    client, clock = MlflowClient(mlflow_uri), Clock()
    run = Run("round-log")
    log = RoundLog(run, every=1.0, clock=clock)
    log.add(1, {"accuracy": 0.1, "loss": 2.0}, {"raycache.checkpoint_round": "1"})
    assert steps(client, run.run_id, "accuracy") == [1]  # the first round goes at once
    clock.now += 0.4
    log.add(2, {"accuracy": 0.2, "loss": 1.5}, {"raycache.checkpoint_round": "2"})
    clock.now += 0.4
    log.add(3, {"accuracy": 0.3, "loss": 1.0}, {"raycache.checkpoint_round": "3"})
    assert steps(client, run.run_id, "accuracy") == [1]  # 0.8 s since the last write: they wait
    assert [r for r, _, _ in log.unlogged(4, {"accuracy": 0.4})] == [2, 3, 4]  # what round 4's checkpoint holds
    assert client.get_run(run.run_id).data.tags["raycache.checkpoint_round"] == "1"
    clock.now += 0.3
    log.add(4, {"accuracy": 0.4, "loss": 0.5}, {"raycache.checkpoint_round": "4"})
    history = {m.step: m.value for m in client.get_metric_history(run.run_id, "loss")}
    assert history == {1: 2.0, 2: 1.5, 3: 1.0, 4: 0.5}
    times = [m.timestamp for m in sorted(client.get_metric_history(run.run_id, "loss"), key=lambda m: m.step)]
    assert times == sorted(times)  # each round keeps the time it ended
    assert client.get_run(run.run_id).data.tags["raycache.checkpoint_round"] == "4"
    clock.now += 0.1
    log.add(5, {"accuracy": 0.5, "loss": 0.25})
    log.close()  # the run's end writes what waits
    assert steps(client, run.run_id, "loss") == [1, 2, 3, 4, 5]


def test_every_zero_writes_each_round_and_a_full_batch_goes_before_its_time(mlflow_uri):
    client, clock = MlflowClient(mlflow_uri), Clock()
    run = Run("round-log")
    log = RoundLog(run, every=0.0, clock=clock)
    for r in (1, 2):
        log.add(r, {"accuracy": r / 10})
        assert steps(client, run.run_id, "accuracy") == list(range(1, r + 1))
    # 700 metrics a round: round 2 waits, round 3 takes what waits past MLflow's 1,000 a batch, and both go
    # (in two batches) an hour early
    wide = Run("round-log")
    log = RoundLog(wide, every=3600.0, clock=clock)
    log.add(1, {f"m{i}": float(i) for i in range(700)})
    log.add(2, {f"m{i}": float(i) for i in range(700)})
    assert len(log.waiting) == 1 and steps(client, wide.run_id, "m0") == [1]
    log.add(3, {f"m{i}": float(i) for i in range(700)})
    assert not log.waiting
    assert steps(client, wide.run_id, "m0") == steps(client, wide.run_id, "m699") == [1, 2, 3]


def test_a_failing_write_while_the_run_fails_is_said_in_one_line_not_raised_over_the_error(mlflow_uri, capsys):
    clock = Clock()
    run = Run("round-log")
    log = RoundLog(run, every=3600.0, clock=clock)
    log.add(1, {"accuracy": 0.1})
    log.add(2, {"accuracy": 0.2})
    MlflowClient(mlflow_uri).delete_run(run.run_id)  # the store refuses writes to a deleted run
    log.close(RuntimeError("the round failed"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raycache: could not log rounds [2] to MLflow"), err
