"""MLflow: one run per experiment, params flattened, per-round metrics at step=round, artifacts.

The tracking URI is `MLFLOW_TRACKING_URI` if set, else `sqlite:///<cwd>/mlflow.db`. A run that raises is
ended FAILED (KILLED on Ctrl-C) with the reason in the `failure_reason` tag, never left RUNNING.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# MLflow 3's UI opens an experiment in its GenAI view unless told otherwise. raycache's experiments are model
# training: the documented experiment kind says so, and every link raycache prints asks for the classic
# runs table (`workflowType=machine_learning`), which is what decides the view in MLflow 3.17's UI.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "workflowType=machine_learning"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@dataclass
class LoggedRun:
    status: str
    params: dict[str, str]
    tags: dict[str, str]


def logged_run(run_id: str) -> LoggedRun | None:
    """A run's status, params and tags as the store has them (None: no such run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException:
        return None
    return LoggedRun(run.info.status, dict(run.data.params), dict(run.data.tags))


class Run:
    def __init__(self, experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri()
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment_id(experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self.run_name = run.info.run_name

    @classmethod
    def reopen(cls, run_id: str) -> "Run":
        """An existing run, set RUNNING again (a resumed sweep's parent)."""
        from mlflow.tracking import MlflowClient

        self = cls.__new__(cls)
        self.uri = tracking_uri()
        self.client = MlflowClient(self.uri)
        run = self.client.get_run(run_id)
        self.run_id, self.run_name, self.experiment_id = run_id, run.info.run_name, run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        return self

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, tags=EXPERIMENT_KIND)
        except MlflowException:  # created meanwhile by a concurrent run (a sweep's trials)
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_image(self, image, name: str) -> None:
        self.client.log_image(self.run_id, image, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:5000])

    def finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self.client.set_terminated(self.run_id, "FINISHED")
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        reason = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
        try:
            self.client.set_tag(self.run_id, "failure_reason", reason[:5000])
        finally:
            self.client.set_terminated(self.run_id, status)

    def stop(self, reason: str) -> None:
        """End the run early but cleanly (not a failure): KILLED, with `stopped_by`."""
        try:
            self.client.set_tag(self.run_id, "stopped_by", reason)
        finally:
            self.client.set_terminated(self.run_id, "KILLED")

    def ui_hint(self, view: str | None = None) -> str:
        """How to open this run (or, with `view`, the experiment's runs table under that saved view)."""
        store = self.uri
        page = (f"#/experiments/{self.experiment_id}/runs?{UI_QUERY}&viewStateShareKey={view}" if view else
                f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{UI_QUERY}")
        return f"mlflow ui --backend-store-uri {store} --host 127.0.0.1   (or: make ui), then open http://127.0.0.1:5000/{page}"

    def save_view(self, key: str, name: str, params: list[str], metrics: list[str]) -> None:
        """A saved runs-table view of this run's experiment (MLflow's shared view state, an experiment tag):
        the given params and metrics as columns, best `metrics[0]` first."""
        import json

        now = int(time.time() * 1000)
        cols = ["attributes.`Run Name`", *(f"params.`{p}`" for p in params), *(f"metrics.`{m}`" for m in metrics)]
        state = {"selectedColumns": cols}
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(
            {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}))
