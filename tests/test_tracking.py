"""The MLflow run record under concurrent writers."""

from __future__ import annotations

import threading


def test_a_trial_and_its_sweep_closing_the_same_run_at_once_both_succeed(tmp_path, monkeypatch):
    """A trial that ASHA stops closes its own run (KILLED, stopped_by) while the sweep's summary may close it
    for it. MLflow's SQL store adds a new tag by SELECT then INSERT, so the two writers raced on the unique key
    (CI failed with IntegrityError). Many runs closed from two threads at once must all end KILLED by the
    scheduler, with neither writer failing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from raycache.tracking import Run, logged_run

    parent = Run("race", "sweep")
    errors: list[BaseException] = []
    for i in range(40):
        child = Run("race", f"trial-{i}", tags={"mlflow.parentRunId": parent.run_id})
        gate = threading.Barrier(2)

        def write(close) -> None:
            gate.wait()
            try:
                close()
            except BaseException as err:  # noqa: BLE001 - collected and asserted on below
                errors.append(err)

        writers = [threading.Thread(target=write, args=(lambda: child.stop("scheduler"),)),
                   threading.Thread(target=write, args=(lambda: parent.end_child(child.run_id, "scheduler"),))]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        run = logged_run(child.run_id)
        assert run.status == "KILLED" and run.tags["stopped_by"] == "scheduler"
    assert not errors, errors[:3]
