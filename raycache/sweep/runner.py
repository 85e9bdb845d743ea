"""Run a sweep on Ray Tune: one full federated experiment per trial, a nested MLflow run per trial under
one parent run per sweep, and resume of an interrupted sweep.

- Shared inputs are made once, before any trial: the driver encodes the features (and preprocesses the
  images, for methods that train on pixels) and puts them in the object store once; every trial reads
  that copy, so no trial re-encodes or re-reads.
- Each trial reserves its client actors with a placement group (Tune captures the actors a trial starts
  into its group), so concurrent trials never oversubscribe the cluster.
- Each trial reports every round through `tune.report`, so ASHA can stop weak trials by round.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raycache.config import ExperimentConfig

from raycache.config_file import absolute_paths, apply_override, build_config
from raycache.resume import CHECKPOINT_TAG
from raycache.errors import StopRun, UserError
from raycache.sweep.space import SweepConfig, grid_points, tune_space

PARENT_FILE = "raycache_sweep.json"


def trial_config(base: dict, params: dict[str, Any], run_name: str) -> ExperimentConfig:
    tree = copy.deepcopy(base)
    for key, value in params.items():
        apply_override(tree, key, value)
    apply_override(tree, "tracking.run_name", run_name)
    return build_config(tree)


def trial_resources(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: its driver, then one bundle per client actor."""
    rt = cfg.runtime
    host = {"CPU": rt.client_cpus, **({"GPU": rt.client_gpus} if rt.client_gpus else {})}
    return [{"CPU": 0.01}] + [dict(host) for _ in range(min(rt.client_actors, cfg.data.clients))]


def _trial(params: dict[str, Any], base: dict, parent_run_id: str, uri: str, shared: dict[str, np.ndarray],
           warm: bool = True) -> None:
    from ray import tune

    from raycache.experiment import run_experiment

    os.environ["MLFLOW_TRACKING_URI"] = uri
    name = tune.get_context().get_trial_name()
    tags = {"mlflow.parentRunId": parent_run_id, "raycache.trial": name, "raycache.sweep_params": json.dumps(params)}

    rounds = int(params.get("federation.rounds", build_config(base).federation.rounds))
    done, unfinished = _trial_runs(base, name, parent_run_id)
    if done is not None:  # finished before the sweep was interrupted, but Tune had not recorded it yet
        tune.report({**done.metrics, "round": rounds})
        return
    # a retried trial (its process or node was lost) continues its own run from its last checkpoint
    resume = unfinished.run_id if unfinished is not None and CHECKPOINT_TAG in unfinished.tags else None

    # Reported once the round is checkpointed and logged (`callback_after_write`): Tune may end this process
    # inside the report (its scheduler stopped the trial), and every round it was told of must be on record.
    def report(round_idx: int, metrics: dict[str, float]) -> None:
        if round_idx == rounds:  # reported once the run is closed: Tune ends the trial on its last report
            return
        try:
            tune.report({**metrics, "round": round_idx})
        except SystemExit:  # Tune's way of stopping a trial: its scheduler stopped it
            raise StopRun("scheduler") from None

    try:
        summary = run_experiment(trial_config(base, params, name), on_round=report, tags=tags, shared=shared,
                                 warm=warm, resume=resume, model_here=True, callback_after_write=True)
        if summary.stopped_by is None:
            tune.report({**summary.final, **summary.selection, "round": rounds})
    except Exception as err:
        _record_early_failure(err, name, base, tags)
        raise


def _trial_runs(base: dict, name: str, parent_run_id: str):
    """(this trial's FINISHED run, its latest unfinished one) under this sweep's parent, each or None. MLflow,
    not Tune's state, says whether a trial is done (Tune saves its state now and then; a trial can finish in
    between); an unfinished run is what a retry continues."""
    from raycache.tracking import search

    experiment = base.get("tracking", {}).get("experiment", "raycache")
    runs = search(experiment, f"tags.`raycache.trial` = '{name}' and tags.`mlflow.parentRunId` = "
                              f"'{parent_run_id}'") or []
    done = [r for r in runs if r.status == "FINISHED"]
    rest = sorted((r for r in runs if r.status in ("RUNNING", "FAILED")), key=lambda r: r.start_time)
    return (done[0] if done else None), (rest[-1] if rest else None)


def _record_early_failure(err: Exception, name: str, base: dict, tags: dict[str, str]) -> None:
    """A trial that failed before its experiment opened an MLflow run (e.g. 5,000 clients for 1,400
    samples) still gets a FAILED child run with the reason, so the parent shows every trial."""
    from raycache.tracking import Run, search

    experiment = base.get("tracking", {}).get("experiment", "raycache")
    if search(experiment, f"tags.`raycache.trial` = '{name}' and "
                          f"tags.`mlflow.parentRunId` = '{tags['mlflow.parentRunId']}'"):
        return  # the experiment's own run already records the failure
    run = Run(experiment, name, tags=tags)
    run.finish(err)


def view_key(name: str) -> str:
    """The saved-view key of a sweep in its experiment (MLflow allows only word characters there)."""
    import re

    return "sweep_" + re.sub(r"\W", "_", name)


@dataclass
class SweepResult:
    parent_run_id: str
    trials: list[dict[str, Any]]  # params, status, final metric, run id
    best: dict[str, Any] | None
    ui_hint: str = ""  # how to open the sweep's runs table in the MLflow UI


# Keys whose values change what the shared inputs are: the model and dataset (features), the method
# settings that decide whether a trial trains on pixels, and what a cache's keys are made from (the split,
# the shots, the synthetic set, the augmented views).
_INPUT_KEYS = ("name", "lora_targets", "towers", "shots", "cache_init", "augment_views", "local_model")
_INPUT_SECTIONS = ("model.", "data.", "synth.")


def shared_inputs(base: dict, sweep: SweepConfig, base_prep) -> dict[str, np.ndarray]:
    """Made once, in the driver, for every model/dataset/method the trials can use (`base_prep`: the base
    config, already prepared): the features, and preprocessed images where a method trains on pixels. The
    runner hands them to Tune with `tune.with_parameters`, which puts them in the object store once; every
    trial reads that one copy (zero-copy) instead of re-encoding or re-reading.

    A cache method's keys (the synthetic set, the augmented views of the key images) are made here too and
    land in the on-disk store, where each trial finds them: a trial holds only its own placement group, so
    an encoder or generator pool started inside it could never be placed."""
    from raycache.data.encoders import EncoderPool
    from raycache.experiment import prepare
    from raycache.ray_session import ensure_ray, release_data_actors

    keys = [k for k, spec in sweep.space.items() if ("grid" in spec or "choice" in spec)
            and (k.startswith(_INPUT_SECTIONS) or k == "seed" or k.split(".")[-1] in _INPUT_KEYS)]
    combos = grid_points({k: {"grid": next(iter(sweep.space[k].values()))} for k in keys})
    shared: dict[str, np.ndarray] = {}
    encoders = None  # one pool while the model and its settings stay the same: its start-up is paid once
    try:
        for combo in combos:
            try:
                prep = prepare(trial_config(base, combo, "encode"), model_here=True) if combo else base_prep
            except UserError:  # that trial fails on its own, with its reason on its run; the rest go on
                continue
            ensure_ray(prep.cfg.runtime)
            if encoders is None or not encoders.fits(prep.spec, prep.cfg.runtime):
                if encoders is not None:
                    encoders.close()
                encoders = EncoderPool(prep.spec, prep.cfg.runtime)  # started by its first encode
            _share_inputs(prep, shared, encoders)
    finally:
        if encoders is not None:
            encoders.close()
    release_data_actors()  # the trials read what was encoded here: no pipeline of this process follows
    return shared


def _share_inputs(prep, shared: dict[str, np.ndarray], encoders) -> None:
    """One combination's inputs into `shared` (or the store), encoded by `encoders`."""
    from raycache.data.cache_source import cache_examples
    from raycache.data.features import load_or_encode, load_rows
    from raycache.data.pixels import load_pixels
    from raycache.inputs import shared_key

    if prep.encode_rows is not None:  # its trials read these rows' features from the store, not encode them
        load_rows(prep.source, prep.spec, prep.cfg.runtime, prep.encode_rows, prep.transform, encoders=encoders)
    elif shared_key("features", prep) not in shared:
        shared[shared_key("features", prep)] = load_or_encode(prep.source, prep.spec, prep.cfg.runtime,
                                                              transform=prep.transform, encoders=encoders).features
    if prep.uses_pixels and shared_key("pixels", prep) not in shared:
        encoders.close()  # the decode tasks get every CPU (a later encode starts it again)
        shared[shared_key("pixels", prep)] = load_pixels(prep.source, prep.transform)
    if prep.uses_cache:
        try:
            cache_examples(prep.cfg, prep.spec, prep.source, prep.splits, shared[shared_key("features", prep)],
                           prep.synth_store, prep.splits.train[prep.trainers[0]], transform=prep.transform,
                           encoders=encoders)
        except (UserError, ValueError):  # that trial fails on its own, with its reason on its run
            pass


def run_sweep(sweep: SweepConfig, base: dict, resume: bool = False, address: str | None = None,
              on_trial: Callable[[int, int], None] | None = None) -> SweepResult:
    """Run (or `resume`) a sweep; `on_trial(ended, total)` is called as its trials end."""
    from raycache.sweep.progress import LISTENERS, TrialCounter

    if on_trial is not None:
        LISTENERS[sweep.name] = on_trial
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's verbose=0 then prints nothing: the CLI reports
    import ray
    from ray import tune

    from raycache.tracking import Run, tracking_uri

    base = absolute_paths(base)  # load_sweep made them absolute; a caller's own tree too
    if address is not None:
        apply_override(base, "runtime.address", address)
    cfg = build_config(base)
    storage = Path(cfg.runtime.cache_dir) / "sweeps"
    folder = storage / sweep.name
    state_file = folder / PARENT_FILE
    if resume and not state_file.is_file():
        raise UserError(f"--resume: no sweep {sweep.name!r} to resume under {storage}")
    if resume:  # Tune's restore unpickles the folder's state: only from a folder no one else can write
        from raycache.storage import check_private

        check_private(folder, "--resume")
    if not resume and folder.exists():
        raise UserError(f"name: sweep {sweep.name!r} already exists under {storage}; pass --resume to continue it "
                        f"or choose another name")
    from raycache.experiment import prepare
    from raycache.ray_session import ensure_ray

    base_prep = prepare(cfg, model_here=True)  # the base's own mistakes fail before Ray starts
    ensure_ray(cfg.runtime)
    bundles = trial_resources(cfg)
    need = sum(b.get("CPU", 0) for b in bundles)
    have = ray.cluster_resources().get("CPU", 0)
    if cfg.runtime.address is None and need > have + 1e-9:
        raise UserError(f"runtime.client_actors: one trial needs {need:g} CPUs (its driver plus "
                        f"{len(bundles) - 1} client actors x {cfg.runtime.client_cpus:g}), the cluster has {have:g}")
    shared = shared_inputs(base, sweep, base_prep)

    uri = tracking_uri()
    if resume:
        parent = Run.reopen(json.loads(state_file.read_text())["parent_run_id"])
    else:
        parent = Run(cfg.tracking.experiment, sweep.name, tags={"raycache.kind": "sweep"})
        parent.log_params({"sweep." + k: json.dumps(v) for k, v in sweep.space.items()})
        parent.log_params({"sweep.scheduler": sweep.scheduler, "sweep.metric": sweep.metric,
                           "sweep.num_samples": sweep.num_samples, "sweep.grace_rounds": sweep.grace_rounds,
                           "sweep.reduction_factor": sweep.reduction_factor})
        folder.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"parent_run_id": parent.run_id}))
        # the UI's runs table for this sweep: the swept keys and the selection and test metrics as columns
        swept = list(sweep.space) + (["method.lr"] if "method.lr_scale" in sweep.space else [])  # lr_scale folds into lr
        parent.save_view(view_key(sweep.name), f"sweep {sweep.name}", swept,
                         [f"result_{sweep.metric}", "result_accuracy", "best_round"])
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, parent_run_id=parent.run_id, uri=uri, shared=shared,
                                 warm=sweep.warm_trials),
            tune.PlacementGroupFactory(bundles))
        if resume and tune.Tuner.can_restore(str(folder)):
            tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_errored=False,
                                       restart_errored=False, resume_unfinished=True)
        else:
            scheduler = None
            if sweep.scheduler == "asha":
                scheduler = tune.schedulers.ASHAScheduler(time_attr="round", max_t=cfg.federation.rounds,
                                                          grace_period=min(sweep.grace_rounds, cfg.federation.rounds),
                                                          reduction_factor=sweep.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=tune_space(sweep.space),
                tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                            num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent,
                                            reuse_actors=sweep.warm_trials,  # a trial's process and actors serve the next
                                            trial_name_creator=lambda t: f"{sweep.name}-{t.trial_id}",
                                            trial_dirname_creator=lambda t: f"{sweep.name}-{t.trial_id}"),
                run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=0,
                                          callbacks=[TrialCounter(sweep.name, sweep.num_samples *
                                                                  len(grid_points(sweep.space)))],
                                          failure_config=tune.FailureConfig(max_failures=sweep.max_failures,
                                                                            fail_fast=False)))
        grid = tuner.fit()
        errors = {Path(r.path).name: r.error for r in grid if r.error is not None}
        result = summarise(parent, sweep, errors)
    except BaseException as err:
        parent.finish(err)
        raise
    finally:
        LISTENERS.pop(sweep.name, None)
    parent.finish()
    return result


def summarise(parent, sweep: SweepConfig, errors: dict[str, BaseException] | None = None) -> SweepResult:
    """The parent's record of its children: a table, the best trial, a heatmap over the two most-swept keys.
    `errors`: the trials Tune ended with an error (after their retries), by name."""
    from raycache.sweep.summary import heatmap, trial_table

    trials = []
    for run in parent.children():
        if run.status == "RUNNING":  # its trial ended without closing the run
            error = (errors or {}).get(run.tags.get("raycache.trial", ""))
            run = (parent.fail_child(run.run_id, error) if error is not None  # its process died: it failed
                   else parent.end_child(run.run_id, "scheduler"))  # a scheduler (ASHA) stopped it
        params = json.loads(run.tags.get("raycache.sweep_params", "{}"))
        m = run.metrics
        # A trial's score is its metric at its selected round (`result_<metric>`, logged when the run ends);
        # a trial stopped early has only its last reported value. Its test accuracy goes beside it.
        trials.append({"trial": run.tags.get("raycache.trial", run.name), "run_id": run.run_id,
                       "status": run.status, "params": params,
                       "metric": m.get(f"result_{sweep.metric}", m.get(sweep.metric)),
                       "test_accuracy": m.get("result_accuracy", m.get("accuracy")),
                       "failure_reason": run.tags.get("failure_reason", ""), "start": run.start_time})
    # A trial interrupted and resumed has an earlier, unfinished run: keep its finished (or latest) one.
    latest: dict[str, dict[str, Any]] = {}
    for t in sorted(trials, key=lambda t: (t["status"] == "FINISHED", t["start"])):
        latest[t["trial"]] = t
    trials = sorted(latest.values(), key=lambda t: t["trial"])
    done = [t for t in trials if t["metric"] is not None and t["status"] == "FINISHED"]
    best = (max if sweep.mode == "max" else min)(done, key=lambda t: t["metric"]) if done else None
    parent.log_text(trial_table(trials, list(sweep.space), sweep.metric), "trials.csv")
    fig = heatmap(trials, sweep.space, sweep.metric)
    if fig is not None:
        parent.log_figure(fig, "heatmap.png")
    parent.log_metrics({"trials": len(trials), "trials_failed": sum(t["status"] == "FAILED" for t in trials),
                        "trials_finished": len(done)})
    if best is not None:
        parent.log_metrics({f"best_{sweep.metric}": best["metric"]})
        if best["test_accuracy"] is not None:  # reported beside the choice, never used to make it
            parent.log_metrics({"best_test_accuracy": best["test_accuracy"]})
        parent.set_tags({"best_run_id": best["run_id"], "best_trial": best["trial"],
                         "best_params": json.dumps(best["params"])})
    return SweepResult(parent.run_id, trials, best, parent.ui_hint(view_key(sweep.name)))
