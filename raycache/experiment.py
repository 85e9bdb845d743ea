"""One federated experiment, as named stages read top to bottom (`run_experiment`):

    prepare   check every input and derive the split, partition and text task (no Ray, no run yet):
              `raycache.prepare`
    open      the MLflow run (a new one, or a resumed one with its checkpoint)
    log       the config, the partition and the data's sizes
    encode    image features once per model and dataset (and the cache's source, and pixels if trained on):
              `raycache.inputs`
    federate  the rounds, each checkpointed; the selected result
    finish    the result file and the run's end metrics

Everything that can be checked without compute is checked before the run opens; anything that fails after is
recorded on the run as FAILED with the reason. MLflow itself is `raycache.tracking`; checkpoints and resume
are `raycache.resume`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from raycache.config import ExperimentConfig
from raycache.config_file import dump_config
from raycache.inputs import Encoded, ProgressCallback, encode, input_key
from raycache.prepare import Prepared, prepare
from raycache.round_loop import RoundCallback, Rounds, run_rounds

@dataclass
class Summary:
    run_id: str
    experiment_id: str
    ui_hint: str
    method: str
    zeroshot_accuracy: float
    final: dict[str, float]
    rounds: int
    comm_bytes_up: float
    comm_bytes_down: float
    timings: dict[str, float]
    encoded: int
    distinct_images: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by: str | None = None  # the reason a callback ended the run before its last round
    messages: list[dict] = field(default_factory=list)  # every client message, when run with `audit`
    selection: dict[str, float] = field(default_factory=dict)  # best_round, selected_accuracy, result_*, ...
    model_uri: str | None = None  # the result as an MLflow model (None: the run stopped before it had one)
    initial: dict[str, float] = field(default_factory=dict)  # round 0: the initial state, before training

    @property
    def comm_bytes(self) -> float:
        return self.comm_bytes_up + self.comm_bytes_down


def partition_table(counts: np.ndarray, class_names: list[str]) -> str:
    """CSV of per-client, per-class sample counts."""
    buf = io.StringIO()
    buf.write("client," + ",".join(class_names) + ",total\n")
    for c, row in enumerate(counts):
        buf.write(f"{c}," + ",".join(str(int(x)) for x in row) + f",{int(row.sum())}\n")
    return buf.getvalue()


def run_experiment(cfg: ExperimentConfig, on_round: RoundCallback | None = None,
                   on_stage: Callable[[str], None] | None = None, tags: dict[str, str] | None = None,
                   shared: dict[str, np.ndarray] | None = None, resume: str | None = None,
                   audit: bool = False, warm: bool = False, on_progress: ProgressCallback | None = None,
                   model_here: bool = False, callback_after_write: bool = False) -> Summary:
    """One experiment as one MLflow run; `tags` are added to it (a sweep's trial: its parent run id).

    `on_round(round, metrics)`: called as each round ends, before the next round starts and before this
    round's checkpoint and metrics are written (they are written while the next round runs); it may raise
    `StopRun` to end the run after this round, which is then still checkpointed and logged (with
    `runtime.look_ahead`, the client actors have begun the next round's training by then: a stop discards
    it). With `callback_after_write`, it is called once its round is checkpointed and logged, and nothing of
    the next round starts before it returns: for a caller whose process may end inside the callback (a Tune
    trial that its scheduler stops), so that every round it was told of is on record and none is wasted.

    `resume`: the id of a run whose driver died: it continues, in the same MLflow run, from that run's last
    checkpoint (written after every round). `audit`: record every client message (`Summary.messages`).

    `shared`: inputs another process already made, keyed by `inputs.shared_key` (a sweep's driver puts its
    features and preprocessed images in the object store once; every trial reads them from there).
    `warm`: take the federation's actors from this process's warm pool and give them back after (a sweep's
    trials, whose process Tune reuses). `model_here`: build the model's preflight in this process, not a
    single-use one (a reused process: a sweep's trials). `on_progress(what, done, total)`: encoding and
    synthetic generation as they advance."""
    stage = on_stage or (lambda s: None)
    from raycache.ray_session import EarlyStart, release_data_actors
    from raycache.resume import hold_driver

    # cheap checks first: a user's mistake must not leave a run behind, nor cost a Ray start unless only the
    # model's single-use process finds it (Ray and the encoders start beside it, once every other check passed)
    early = EarlyStart(stage, lambda spec, source: input_key("features", spec, source) in (shared or {}))
    lock = None
    try:
        prep = prepare(cfg, model_here, early)
        early.record(prep.timings)
        lock = hold_driver(cfg, resume) if resume is not None else None  # one live driver per run
        run, ckpt = open_run(prep, tags, resume)
    except BaseException:
        early.close()
        if lock is not None:
            lock.close()
        raise
    try:
        try:
            lock = lock or hold_driver(cfg, run.run_id)
            if ckpt is None:  # a resumed run has these already
                log_inputs(prep, run)
            start_ray(prep, stage)
            try:
                encoded = encode(prep, run, stage, shared or {}, on_progress, early.encoders)
            finally:  # the run's Ray Data pipelines are over, done or failed
                release_data_actors()
            summary = federate(prep, encoded, run, on_round, stage, ckpt, audit, warm, callback_after_write)
        except BaseException as err:
            from raycache.errors import find_run_failure, find_user_error

            run.finish(find_run_failure(err) or find_user_error(err) or err)  # the reason, not Ray's wrapper
            raise
        if summary.stopped_by is not None:
            run.stop(summary.stopped_by)
        else:
            run.finish()
    finally:  # let go only once the run is ended: a --resume in between would find it still RUNNING
        early.close()  # if it failed before its encode did
        if lock is not None:
            lock.close()
    return summary


def open_run(prep: Prepared, tags: dict[str, str] | None, resume: str | None):
    """(the MLflow run, the checkpoint to continue from or None)."""
    from raycache.resume import resumable
    from raycache.tracking import Run

    if resume is not None:
        ckpt = resumable(prep.cfg, resume)
        return Run.reopen(resume), ckpt
    return Run(prep.cfg.tracking.experiment, prep.cfg.tracking.run_name,
               tags={"raycache.method": prep.cfg.method.name, **(tags or {})}), None


def log_inputs(prep: Prepared, run) -> None:
    from raycache.lineage import split_records, synthetic_record

    records = split_records(prep.source, prep.cfg.data.dataset, prep.splits)
    if prep.synth_store is not None:
        records.append(synthetic_record(prep.synth_store))
    run.log_datasets(records)
    run.log_params(prep.cfg.flat())
    run.log_text(dump_config(prep.cfg), "config.yaml")
    run.log_text(partition_table(prep.counts, prep.source.class_names), "partition.csv")


def start_ray(prep: Prepared, stage: Callable[[str], None]) -> None:
    """Join or start Ray; on a local Ray, every actor pool must fit."""
    from raycache.ray_session import check_fits, ensure_ray

    cfg = prep.cfg
    t = time.perf_counter()
    ensure_ray(cfg.runtime)  # started already beside the model's preflight (`EarlyStart`)
    if cfg.runtime.address is None:  # a local Ray never grows; a cluster's autoscaler may add nodes to fit
        rt = cfg.runtime
        check_fits("runtime.client", min(rt.client_actors, cfg.data.clients), rt.client_cpus, rt.client_gpus)
        check_fits("runtime.encoder", rt.encoder_actors, 0.0, rt.encoder_gpus)  # CPUs: encoders.encoder_plan
        if prep.synth_store is not None:
            check_fits("synth.num", cfg.synth.actors, cfg.synth.num_cpus, cfg.synth.num_gpus)
    prep.timings["time_ray_start_s"] = prep.timings.get("time_ray_start_s", 0.0) + time.perf_counter() - t


def federate(prep: Prepared, enc: Encoded, run, on_round: RoundCallback | None, stage: Callable[[str], None],
             ckpt=None, audit: bool = False, warm: bool = False, callback_after_write: bool = False) -> Summary:
    """The federation's actors, the rounds (each logged and checkpointed), the selected result, logged."""
    from raycache.data.pixels import compact
    from raycache.federation.runtime import Federation
    from raycache.resume import log_checkpointed_rounds
    from raycache.round_log import RoundLog

    cfg, splits, timings = prep.cfg, prep.splits, prep.timings
    y = prep.source.labels
    stage("starting client actors")
    t = time.perf_counter()
    train = (compact(enc.inputs[splits.train]), np.ascontiguousarray(y[splits.train]))
    evals = _eval_sets(enc.inputs, y, splits, prep.client_tests)
    first = 1 if ckpt is None else ckpt.round + 1
    done = Rounds({"up": 0.0, "down": 0.0}, None) if ckpt is None else \
        Rounds({"up": ckpt.meta["up"], "down": ckpt.meta["down"]}, ckpt.meta["last"])
    # A caller told of each round after it is written may end inside the callback (a Tune trial its scheduler
    # stops): no round starts before it returns, so none is wasted (and concurrent trials fill the CPUs).
    with Federation(cfg, prep.task, train, prep.trainers, evals, enc.cache, prep.counts, audit=audit,
                    warm=warm, look_ahead=not callback_after_write) as fed:
        run.log_metrics({**fed.info(), "client_nodes": len(set(fed.nodes)),  # nodes the client actors span
                         "client_gpu_devices": fed.gpu_devices,  # GPUs they span (fractions share one)
                         "actors_reused": fed.reused})  # taken from a warm pool (a sweep's earlier trial)
        if ckpt is None:
            initial = fed.start()
            run.log_metrics(initial, step=0)
        else:
            initial = ckpt.meta.get("initial", {})
            fed.restore(ckpt.snapshot, ckpt.round, ckpt.path)
            ckpt.snapshot = {}  # on the server now, and in its file: a full model's arrays are not held here too
            log_checkpointed_rounds(run, ckpt)
            run.set_tags({"raycache.resumed_from_round": ckpt.round})
        timings["time_actors_s"] = time.perf_counter() - t
        stage("training")
        t = time.perf_counter()
        # Rounds written at once: a sweep's trial reports each to Tune as it is on record; without checkpoints,
        # nothing but the driver would hold a waiting round. What waits is written as the block ends, raised or not.
        at_once = callback_after_write or not cfg.federation.checkpoint
        with RoundLog(run, 0.0 if at_once else cfg.tracking.flush_seconds) as log:
            run_rounds(cfg, fed, log, first, done, initial, on_round, audit, callback_after_write)
        timings["time_rounds_s"] = time.perf_counter() - t
        try:
            result = fed.result(cfg.federation.selection)
        except Exception:  # noqa: BLE001
            if done.stopped_by is None:
                raise
            # A trial its scheduler stopped may lose its actors to Tune's clean-up before it assembles a
            # result: it ends as stopped (KILLED, with the reason), with its rounds logged and no result.
            result = None
    totals, last = done.totals, done.last
    run.log_metrics(timings)
    run.log_metrics({"server_restarts": fed.server_restarts,  # lost server actors replaced ...
                     "rounds_replayed": fed.rounds_replayed,  # ... and the rounds they ran again
                     "comm_bytes_up_total": totals["up"], "comm_bytes_down_total": totals["down"],
                     "final_accuracy": last["accuracy"], **(result["metrics"] if result else {})})
    uri = None
    if result is not None:
        from raycache.serving import publish

        stage("logging the result as an MLflow model")
        uri = publish(cfg, run, prep.task, result)
    return Summary(run.run_id, run.experiment_id, run.ui_hint(), cfg.method.name, enc.zeroshot_accuracy,
                   last, len(done.history), totals["up"], totals["down"], timings, enc.features.encoded, len(y),
                   done.history, done.stopped_by, done.messages, result["metrics"] if result else {}, uri, initial)


def _eval_sets(inputs: np.ndarray, labels: np.ndarray, splits, client_tests: list[np.ndarray]):
    """The test split (reported), the validation split (selected on) and the clients' own held-out samples
    (rows of the training pool, with their owners)."""
    from raycache.federation.evaluate import EvalSets

    val = (inputs[splits.val], labels[splits.val]) if len(splits.val) else None
    client = None
    if any(len(t) for t in client_tests):
        rows = splits.train[np.concatenate(client_tests)]
        owner = np.concatenate([np.full(len(t), k, np.int64) for k, t in enumerate(client_tests)])
        client = (inputs[rows], labels[rows], owner)
    return EvalSets((inputs[splits.test], labels[splits.test]), val, client)
