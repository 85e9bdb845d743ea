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


def add(log, round_idx, metrics, tags=None):
    log.add(log.stamp(round_idx, metrics), tags)


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_rounds_wait_until_the_interval_has_passed_then_go_together_with_the_newest_link(mlflow_uri):
    client, clock = MlflowClient(mlflow_uri), Clock()
    run = Run("round-log")
    log = RoundLog(run, every=1.0, clock=clock)
    add(log, 1, {"accuracy": 0.1, "loss": 2.0}, {"raycache.checkpoint_round": "1"})
    assert steps(client, run.run_id, "accuracy") == [1]  # the first round goes at once
    clock.now += 0.4
    add(log, 2, {"accuracy": 0.2, "loss": 1.5}, {"raycache.checkpoint_round": "2"})
    clock.now += 0.4
    add(log, 3, {"accuracy": 0.3, "loss": 1.0}, {"raycache.checkpoint_round": "3"})
    assert steps(client, run.run_id, "accuracy") == [1]  # 0.8 s since the last write: they wait
    assert [r for r, _, _ in log.unlogged(log.stamp(4, {"accuracy": 0.4}))] == [2, 3, 4]  # round 4's checkpoint
    assert client.get_run(run.run_id).data.tags["raycache.checkpoint_round"] == "1"
    clock.now += 0.3
    add(log, 4, {"accuracy": 0.4, "loss": 0.5}, {"raycache.checkpoint_round": "4"})
    history = {m.step: m.value for m in client.get_metric_history(run.run_id, "loss")}
    assert history == {1: 2.0, 2: 1.5, 3: 1.0, 4: 0.5}
    times = [m.timestamp for m in sorted(client.get_metric_history(run.run_id, "loss"), key=lambda m: m.step)]
    assert times == sorted(times)  # each round keeps the time it ended
    assert client.get_run(run.run_id).data.tags["raycache.checkpoint_round"] == "4"
    clock.now += 0.1
    add(log, 5, {"accuracy": 0.5, "loss": 0.25})
    log.close()  # the run's end writes what waits
    assert steps(client, run.run_id, "loss") == [1, 2, 3, 4, 5]


def test_every_zero_writes_each_round_and_a_full_batch_goes_before_its_time(mlflow_uri):
    client, clock = MlflowClient(mlflow_uri), Clock()
    run = Run("round-log")
    log = RoundLog(run, every=0.0, clock=clock)
    for r in (1, 2):
        add(log, r, {"accuracy": r / 10})
        assert steps(client, run.run_id, "accuracy") == list(range(1, r + 1))
    # 700 metrics a round: round 2 waits, round 3 takes what waits past MLflow's 1,000 a batch, and both go
    # (in two batches) an hour early
    wide = Run("round-log")
    log = RoundLog(wide, every=3600.0, clock=clock)
    add(log, 1, {f"m{i}": float(i) for i in range(700)})
    add(log, 2, {f"m{i}": float(i) for i in range(700)})
    assert len(log.waiting) == 1 and steps(client, wide.run_id, "m0") == [1]
    add(log, 3, {f"m{i}": float(i) for i in range(700)})
    assert not log.waiting
    assert steps(client, wide.run_id, "m0") == steps(client, wide.run_id, "m699") == [1, 2, 3]


def test_a_failing_write_while_the_run_fails_is_said_in_one_line_not_raised_over_the_error(mlflow_uri, capsys):
    clock = Clock()
    run = Run("round-log")
    log = RoundLog(run, every=3600.0, clock=clock)
    add(log, 1, {"accuracy": 0.1})
    add(log, 2, {"accuracy": 0.2})
    MlflowClient(mlflow_uri).delete_run(run.run_id)  # the store refuses writes to a deleted run
    log.close(RuntimeError("the round failed"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raycache: could not log rounds [2] to MLflow"), err


def test_a_resume_logs_what_its_checkpoint_carries_that_the_run_lacks_key_by_key(mlflow_uri, tmp_path):
    """A write cut short (a driver killed inside MLflow's batches) can leave part of a round logged: the
    resume adds the rest, each metric once, and links the checkpoint it resumes from."""
    from raycache.federation.checkpoint import Checkpoint
    from raycache.resume import log_checkpointed_rounds

    client = MlflowClient(mlflow_uri)
    run = Run("round-log")
    run.log_rounds([(1, 1000, {"accuracy": 0.1, "loss": 2.0}), (2, 2000, {"accuracy": 0.2})], {})
    ckpt = Checkpoint(3, {}, {"unlogged": [[2, 2000, {"accuracy": 0.2, "loss": 1.5}],
                                           [3, 3000, {"accuracy": 0.3, "loss": 1.0}]]}, tmp_path / "round-00003.x")
    log_checkpointed_rounds(run, ckpt)
    for key, want in (("accuracy", {1: 0.1, 2: 0.2, 3: 0.3}), ("loss", {1: 2.0, 2: 1.5, 3: 1.0})):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.run_id, key)]
        assert sorted(logged) == sorted(want.items()), key  # each step once
    tags = client.get_run(run.run_id).data.tags
    assert tags["raycache.checkpoint_round"] == "3" and tags["raycache.checkpoint"].endswith("round-00003.x")
