"""MLflow: one run per experiment, params flattened, per-round metrics at step=round, artifacts.

The tracking URI is `MLFLOW_TRACKING_URI` if set, else `sqlite:///<cwd>/mlflow.db`. A run that raises is
ended FAILED (KILLED on Ctrl-C) with the reason in the `failure_reason` tag, never left RUNNING.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# MLflow 3's UI opens an experiment in its GenAI view unless told otherwise. raycache's experiments are model
# training: the documented experiment kind says so, and every link raycache prints asks for the classic
# runs table (`workflowType=machine_learning`), which is what decides the view in MLflow 3.17's UI.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "workflowType=machine_learning"


MAX_BATCH_METRICS = 1000  # MLflow's limit on the metrics of one batch


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_SECRET = ("pass", "pwd", "token", "secret", "key", "credential", "auth", "signature")


def masked(uri: str) -> str:
    """`uri` as raycache prints it: a password in its user part and secret-looking query values (password,
    token, api key, signature, ...) replaced by `***`. The unmasked URI never reaches a terminal or a log."""
    import re
    from urllib.parse import parse_qsl, urlencode, urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return "***"
    # The password runs from the first ':' after the user to the last '@' (SQLAlchemy takes '/', '?' and
    # '#' unencoded in it, which urlsplit would read as the start of the path): mask all of it. A URI
    # without credentials whose query holds an '@' is masked too much, never too little.
    out = re.sub(r"^([A-Za-z][\w+.-]*://[^:/@?#]*):.*@", r"\1:***@", uri, flags=re.S)
    if out != uri:
        parts = urlsplit(out)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if any(s in k.lower() for s in _SECRET) else v) for k, v in pairs], safe="*")
        if query != parts.query:
            out = out.replace("?" + parts.query, "?" + query, 1)
    return out


@dataclass(frozen=True)
class RunRecord:
    """One stored run as the rest of raycache reads it (no MLflow types leave this module)."""
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each
    tags: dict[str, str]
    start_time: int  # ms since the epoch
    end_time: int | None

    @property
    def wall_seconds(self) -> float:
        return ((self.end_time or self.start_time) - self.start_time) / 1000

    @classmethod
    def of(cls, run) -> "RunRecord":
        return cls(run.info.run_id, run.info.run_name, run.info.status, dict(run.data.params),
                   dict(run.data.metrics), dict(run.data.tags), run.info.start_time, run.info.end_time)


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri or tracking_uri())


def search(experiment: str, filter_string: str = "", client=None) -> list[RunRecord] | None:
    """The runs of `experiment` matching an MLflow filter (None: no such experiment)."""
    client = client or _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return search_in(client, exp.experiment_id, filter_string)


def search_in(client, experiment_id: str, filter_string: str) -> list[RunRecord]:
    return [RunRecord.of(r) for r in client.search_runs([experiment_id], filter_string, max_results=10_000)]


def history(run_id: str, key: str, client=None) -> list[tuple[int, float]]:
    """Every logged value of one metric as (step, value), by step."""
    return sorted((m.step, m.value) for m in (client or _client()).get_metric_history(run_id, key))


def logged_run(run_id: str) -> RunRecord | None:
    """A run as the store has it (None: no such run)."""
    from mlflow.exceptions import MlflowException

    try:
        return RunRecord.of(_client().get_run(run_id))
    except MlflowException:
        return None


def _set_tag(client, run_id: str, key: str, value: str) -> None:
    """Set a tag that two writers may set at once. MLflow's SQL store adds a new tag by SELECT, then INSERT,
    so two writers of the same new tag (a stopped trial closing its run while the sweep's summary closes it
    for it) can both INSERT, and the later one fails on the unique key (seen on CI). Tried again, it finds the
    row and updates it."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_tag(run_id, key, value)
    except MlflowException:
        client.set_tag(run_id, key, value)


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset a run read, as MLflow records it: `context` is training, validation, test, cache, ..."""

    name: str
    digest: str  # changes whenever its rows change
    source: str  # where it was read from (a path, a built-in dataset's name)
    rows: int
    context: str


class Run:
    def __init__(self, experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> None:
        self.uri = tracking_uri()
        self.client = _client(self.uri)
        self.experiment_id = self._experiment_id(experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self.run_name = run.info.run_name

    @classmethod
    def reopen(cls, run_id: str) -> "Run":
        """An existing run, set RUNNING again (a resumed sweep's parent)."""
        self = cls.__new__(cls)
        self.uri = tracking_uri()
        self.client = _client(self.uri)
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
        self.log_rounds([(step, int(time.time() * 1000), metrics)], {})

    def log_rounds(self, rounds: list[tuple[int, int, dict[str, float]]], tags: dict[str, str]) -> None:
        """Several rounds' metrics, each `(step, timestamp in ms, metrics)`, and `tags`, in one call (MLflow's
        client cuts it into batches within its limits)."""
        from mlflow.entities import Metric, RunTag

        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for step, ts, metrics in rounds
                                                    for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_image(self, image, name: str) -> None:
        self.client.log_image(self.run_id, image, name)

    def log_figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def children(self) -> list[RunRecord]:
        """The runs whose parent is this run (a sweep's trials)."""
        return search_in(self.client, self.experiment_id, f"tags.`mlflow.parentRunId` = '{self.run_id}'")

    def end_child(self, run_id: str, reason: str) -> RunRecord:
        """End a child left RUNNING (a trial its scheduler stopped) as KILLED with `stopped_by`."""
        _set_tag(self.client, run_id, "stopped_by", reason)
        self.client.set_terminated(run_id, "KILLED")
        return RunRecord.of(self.client.get_run(run_id))

    def fail_child(self, run_id: str, error: BaseException) -> RunRecord:
        """End a child left RUNNING by a trial that died (its process or node lost) as FAILED, with why."""
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        _set_tag(self.client, run_id, "failure_reason", reason[:5000])
        self.client.set_terminated(run_id, "FAILED")
        return RunRecord.of(self.client.get_run(run_id))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            _set_tag(self.client, self.run_id, k, str(v)[:5000])

    def finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self.client.set_terminated(self.run_id, "FINISHED")
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        reason = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
        try:
            _set_tag(self.client, self.run_id, "failure_reason", reason[:5000])
        finally:
            self.client.set_terminated(self.run_id, status)

    def log_datasets(self, datasets: list["DatasetRecord"]) -> None:
        """Record what the run read as MLflow dataset inputs (the run page's Datasets, with their context)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d.name, d.digest, "local", json.dumps({"uri": d.source}),
                                       profile=json.dumps({"num_rows": d.rows})),
                               [InputTag("mlflow.data.context", d.context)]) for d in datasets]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def register_model(self, uri: str, name: str) -> int:
        """Register the model at `uri` under `name` in MLflow's model registry; returns its version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:  # registered before: this is its next version
            pass
        version = self.client.create_model_version(name, uri, run_id=self.run_id)
        return int(version.version)

    def log_pyfunc_model(self, artifact: str, data: Path, loader_module: str, requirements: list[str],
                         params: dict[str, int]) -> str:
        """Log an MLflow model of the `pyfunc` flavour as this run's `artifact` folder: its data folder `data`,
        loaded by `loader_module._load_pyfunc` (nothing pickled), with `params` (name: default, integers)
        declared so that MLflow passes them to `predict`. Returns the model's URI."""
        import tempfile

        import mlflow.pyfunc
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import ParamSchema, ParamSpec

        signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec(k, "long", v)
                                                                   for k, v in params.items()]))
        import warnings

        with tempfile.TemporaryDirectory(prefix="raycache-model-") as tmp, warnings.catch_warnings():
            # images are paths or bytes: no input example makes sense, and MLflow would print its advice
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            out = Path(tmp) / artifact
            mlflow.pyfunc.save_model(str(out), loader_module=loader_module, data_path=str(data),
                                     pip_requirements=requirements, signature=signature)
            self.client.log_artifacts(self.run_id, str(out), artifact)
        return f"runs:/{self.run_id}/{artifact}"

    def stop(self, reason: str) -> None:
        """End the run early but cleanly (not a failure): KILLED, with `stopped_by`."""
        try:
            _set_tag(self.client, self.run_id, "stopped_by", reason)
        finally:
            self.client.set_terminated(self.run_id, "KILLED")

    def ui_hint(self, view: str | None = None) -> str:
        """How to open this run (or, with `view`, the experiment's runs table under that saved view)."""
        page = (f"#/experiments/{self.experiment_id}/runs?{UI_QUERY}&viewStateShareKey={view}" if view else
                f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{UI_QUERY}")
        # A store with credentials is named by the variable that holds it, never printed (masked or not).
        if masked(self.uri) != self.uri:  # `raycache ui` keeps the URI off the command line
            return f"raycache ui   (the store in $MLFLOW_TRACKING_URI), then open http://127.0.0.1:5000/{page}"
        return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1   (or: make ui), then open http://127.0.0.1:5000/{page}"

    def save_view(self, key: str, name: str, params: list[str], metrics: list[str]) -> None:
        """A saved runs-table view of this run's experiment (MLflow's shared view state, an experiment tag):
        the given params and metrics as columns, best `metrics[0]` first."""
        import json

        now = int(time.time() * 1000)
        cols = ["attributes.`Run Name`", *(f"params.`{p}`" for p in params), *(f"metrics.`{m}`" for m in metrics)]
        state = {"selectedColumns": cols}
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(
            {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}))


_QUIET_DOWNLOADS = threading.Lock()


def load_pyfunc(uri: str):
    """The object an MLflow pyfunc model's loader returned (`get_raw_model`), loaded from `uri`; a store or
    model that cannot be read raises LookupError with MLflow's first line."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    with _QUIET_DOWNLOADS:  # one loader at a time changes and restores the variable
        quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a few small files: no download bar
        try:
            return mlflow.pyfunc.load_model(uri).get_raw_model()
        except (MlflowException, OSError) as err:
            raise LookupError(str(err).splitlines()[0][:160] if str(err) else type(err).__name__) from None
        finally:
            if quiet is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
