"""One federated experiment, top to bottom: check inputs, split and partition, encode once, train, log.

Everything that can be checked without compute (config, model name, dataset, splits, partition) is checked
before the MLflow run starts; anything that fails after is recorded on the run as FAILED with the reason.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from raycache.config import ExperimentConfig, check_cache_size

from raycache.config_file import dump_config
from raycache.data.cache_source import cache_examples, prepare_synthetic
from raycache.data.partition import class_counts, partition
from raycache.data.sources import open_source
from raycache.data.split import client_holdout, few_shot, predefined_split, stratified_split
from raycache.errors import StopRun, UserError
from raycache.methods import method_class, weighting, with_defaults
from raycache.models.clip import ModelSpec, check_spec

RoundCallback = Callable[[int, dict[str, float]], None]


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


def client_sizes(parts: list[np.ndarray]) -> dict[str, float]:
    """The spread of the clients' training-set sizes: min, median and max samples per client."""
    sizes = np.array([len(p) for p in parts])
    return {"client_size_min": float(sizes.min()), "client_size_median": float(np.median(sizes)),
            "client_size_max": float(sizes.max())}


@dataclass
class Prepared:
    """Everything checked and derived before any compute: what `_run` needs to train and log."""

    cfg: ExperimentConfig
    spec: ModelSpec
    source: object  # raycache.data.sources.Source
    splits: object  # raycache.data.split.Splits
    parts: list[np.ndarray]  # each client's training positions in splits.train
    trainers: list[np.ndarray]  # each trainer's positions in splits.train (the method's `trainer_rows`)
    client_tests: list[np.ndarray]  # each client's own held-out positions in splits.train (data.client_test_fraction)
    counts: np.ndarray  # (clients, classes)
    task: object  # raycache.methods.base.Task
    transform: object  # the model's eval image transform (for methods that train on pixels)
    synth_store: object | None
    uses_cache: bool
    uses_pixels: bool
    timings: dict[str, float]


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Every check that needs no Ray and no training, in order; a user's mistake raises UserError here."""
    method = method_class(cfg.method.name)
    fed = cfg.federation  # the run logs concrete settings: the method's reference fills every null
    cfg = cfg.model_copy(update={"method": with_defaults(cfg.method), "federation": fed.model_copy(
        update={"weighting": weighting(fed, cfg.method.name)})})
    if cfg.method.cache_init == "shots" and method.role != "centralised":
        raise UserError(f"method.cache_init: shots puts the clients' own images in the cache, which only a "
                        f"centralised method may do; {cfg.method.name} is {method.role}")
    spec = ModelSpec.from_config(cfg.model)
    check_spec(spec)
    source = open_source(cfg.data)
    test_mask = None
    if cfg.data.test_domain is not None:
        names = source.domain_names or []
        if cfg.data.test_domain not in names:
            raise UserError(f"data.test_domain: {cfg.data.test_domain!r} is not a domain of {source.name} "
                            f"(domains: {', '.join(names) or 'none'})")
        test_mask = source.domains == names.index(cfg.data.test_domain)
    # The split depends on data.* and the seed only, never on the method: every method sees the same clients.
    if source.splits is not None and test_mask is None:  # the dataset's own splits (a CoOp split file)
        splits = predefined_split(source.labels, source.class_names, source.splits, cfg.data.server_per_class,
                                  cfg.seed)
        if len(splits.val) == 0 and cfg.federation.selection == "best_val":
            raise UserError(f"data.dataset: {source.name} has no validation split, which federation.selection: "
                            f"best_val selects on; use selection: final")
    else:
        splits = stratified_split(source.labels, source.class_names, cfg.data.test_fraction,
                                  cfg.data.server_per_class, cfg.seed, test_mask, val_fraction=cfg.data.val_fraction)
    if cfg.data.shots_per_class is not None:
        splits = few_shot(splits, source.labels, len(source.class_names), cfg.data.shots_per_class, cfg.seed)
    train_labels = source.labels[splits.train]
    train_domains = None if source.domains is None else source.domains[splits.train]
    parts = partition(train_labels, cfg.data, cfg.seed, train_domains)
    parts, client_tests = client_holdout(parts, train_labels, cfg.data.client_test_fraction, cfg.seed)
    counts = class_counts(parts, train_labels, len(source.class_names))
    trainers = method.trainer_rows(parts, train_labels, len(source.class_names), cfg.method, cfg.seed)
    uses_cache = method.uses_cache(cfg.method)
    synth_store = None
    if uses_cache:
        check_cache_size(cfg)
        if cfg.method.cache_init == "synthetic":
            synth_store = prepare_synthetic(cfg, source.class_names)
    t = time.perf_counter()
    task, model, transform = _text_task(spec, source.class_names, cfg.model.templates,  # loads the weights
                                        cfg.federation.rounds)
    method.check(cfg.method, model, spec)  # what the method needs from the model, before any compute
    if cfg.runtime.address:  # an unreachable cluster is the user's to fix, before a run is opened
        from raycache.federation.runtime import check_reachable

        check_reachable(cfg.runtime.address)
    return Prepared(cfg, spec, source, splits, parts, trainers, client_tests, counts, task, transform, synth_store, uses_cache,
                    method.uses_pixels(cfg.method), {"time_text_s": time.perf_counter() - t})


def run_experiment(cfg: ExperimentConfig, on_round: RoundCallback | None = None,
                   on_stage: Callable[[str], None] | None = None, tags: dict[str, str] | None = None,
                   shared: dict[str, np.ndarray] | None = None, resume: str | None = None,
                   audit: bool = False) -> Summary:
    """One experiment as one MLflow run; `tags` are added to it (a sweep's trial: its parent run id).

    `resume`: the id of a run whose driver died: it continues, in the same MLflow run, from that run's last
    checkpoint (written after every round). `audit`: record every client message (`Summary.messages`).

    `shared`: inputs another process already made, keyed by `shared_key` (a sweep's driver puts its
    features and preprocessed images in the object store once; every trial reads them from there)."""
    stage = on_stage or (lambda s: None)
    prep = prepare(cfg)  # cheap checks first: a user's mistake must not cost a Ray start or leave a run behind

    from raycache.tracking import Run

    if resume is not None:
        ckpt = _resumable(prep.cfg, resume)
        run = Run.reopen(resume)
    else:
        ckpt = None
        run = Run(prep.cfg.tracking.experiment, prep.cfg.tracking.run_name,
                  tags={"raycache.method": prep.cfg.method.name, **(tags or {})})
    try:
        summary = _run(prep, run, on_round, stage, shared or {}, ckpt, audit)
    except BaseException as err:
        from raycache.errors import find_run_failure, find_user_error

        run.finish(find_run_failure(err) or find_user_error(err) or err)  # the reason, not Ray's wrapper
        raise
    if summary.stopped_by is not None:
        run.stop(summary.stopped_by)
    else:
        run.finish()
    return summary


def _text_task(spec: ModelSpec, class_names: list[str], templates: list[str], rounds: int = 1):
    from raycache.methods.base import Task
    from raycache.models.clip import load_clip
    from raycache.models.text import text_classifier

    model, transform, tokenizer = load_clip(spec)
    task = Task(class_names, text_classifier(model, tokenizer, class_names, templates), spec, tuple(templates),
                rounds)
    return task, model, transform


CHECKPOINT_TAG = "raycache.checkpoint"


def checkpoint_path(cfg: ExperimentConfig, run_id: str):
    from pathlib import Path

    return (Path(cfg.runtime.cache_dir) / "checkpoints" / run_id / "latest.safetensors").resolve()


def _resumable(cfg: ExperimentConfig, run_id: str):
    """The checkpoint to resume `run_id` from, after checking that the run can be resumed with `cfg`."""
    from pathlib import Path

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from raycache.federation import checkpoint
    from raycache.tracking import tracking_uri

    try:
        old = MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException:
        raise UserError(f"--resume: no MLflow run {run_id!r} in {tracking_uri()}") from None
    if old.info.status == "FINISHED":
        raise UserError(f"--resume: run {run_id} already finished")
    for key, value in cfg.flat().items():  # the same experiment, or the result would be neither run
        logged = old.data.params.get(key)
        if logged is not None and logged != str(value)[:6000] and not key.startswith("tracking."):
            raise UserError(f"--resume: {key}={value!r} differs from the run's {key}={logged!r}; resume with "
                            f"the run's config")
    path = old.data.tags.get(CHECKPOINT_TAG)
    if path is None:
        raise UserError(f"--resume: run {run_id} has no checkpoint (it stopped before its first round ended, "
                        f"or ran with federation.checkpoint=false)")
    ckpt = checkpoint.load(Path(path))
    if "selection" not in ckpt.snapshot:  # its split had no validation set: resuming would change its data
        raise UserError(f"--resume: run {run_id} predates validation-based selection (its checkpoint has no "
                        f"selection record); start it again")
    return ckpt


def shared_key(kind: str, prep: Prepared) -> str:
    """The key of a shared input: its kind ("features" or "pixels") and what it is made from."""
    from raycache.data.features import feature_key

    return f"{kind}/{feature_key(prep.spec, prep.source)}"


def _run(prep: Prepared, run, on_round: RoundCallback | None, stage: Callable[[str], None],
         shared: dict[str, np.ndarray], ckpt=None, audit: bool = False) -> Summary:
    from raycache.data.features import Features, load_or_encode
    from raycache.federation.evaluate import predict
    from raycache.federation.runtime import Federation, check_fits, ensure_ray
    from raycache.methods.zeroshot import ZeroShot

    cfg, spec, source, splits, task, timings = prep.cfg, prep.spec, prep.source, prep.splits, prep.task, prep.timings
    if ckpt is None:  # a resumed run has these already
        run.log_params(cfg.flat())
        run.log_text(dump_config(cfg), "config.yaml")
        run.log_text(partition_table(prep.counts, source.class_names), "partition.csv")

    stage("starting Ray")
    t = time.perf_counter()
    ensure_ray(cfg.runtime)
    if cfg.runtime.address is None:  # a local Ray never grows; a cluster's autoscaler may add nodes to fit
        rt = cfg.runtime
        check_fits("runtime.client", min(rt.client_actors, cfg.data.clients), rt.client_cpus, rt.client_gpus)
        check_fits("runtime.encoder", rt.encoder_actors, rt.encoder_cpus, rt.encoder_gpus)
        if prep.synth_store is not None:
            check_fits("synth.num", cfg.synth.actors, cfg.synth.num_cpus, cfg.synth.num_gpus)
    timings["time_ray_start_s"] = time.perf_counter() - t

    stage("encoding images (once per model and dataset)")
    t = time.perf_counter()
    features_shared = shared_key("features", prep) in shared
    if features_shared:
        feats = Features(shared[shared_key("features", prep)], 0, None)
    else:
        feats = load_or_encode(source, spec, cfg.runtime)
    timings["time_encode_s"] = time.perf_counter() - t

    f, y = feats.features, source.labels
    zs_pred = predict(lambda x: ZeroShot(cfg.method, task).logits({}, x), f[splits.test])
    zeroshot_accuracy = float((zs_pred == y[splits.test]).mean())
    run.log_metrics({"zeroshot_accuracy": zeroshot_accuracy, "features_encoded": feats.encoded,
                     "distinct_images": len(y), "num_classes": len(source.class_names),
                     "samples_train": sum(len(p) for p in prep.parts), "samples_val": len(splits.val),
                     "samples_trained_on": sum(len(t) for t in prep.trainers),  # tip_adapter: its K shots
                     "samples_test": len(splits.test), "samples_server": len(splits.server),
                     "samples_client_test": sum(len(p) for p in prep.client_tests),
                     **client_sizes(prep.parts),
                     "features_shared": float(features_shared)})

    cache_f, cache_y = f[splits.server], y[splits.server]  # the server's labelled hold-out
    if prep.uses_cache:
        stage(f"building the cache source ({cfg.method.cache_init})")
        t = time.perf_counter()
        cache_f, cache_y, cache_metrics = cache_examples(cfg, spec, source, splits, f, prep.synth_store,
                                                         splits.train[prep.trainers[0]])
        run.log_metrics(cache_metrics)
        timings["time_cache_source_s"] = time.perf_counter() - t

    inputs = f
    if prep.uses_pixels:  # the method trains through the image encoder: clients get images, not features
        from raycache.data.pixels import load_pixels

        stage("preprocessing images for in-actor encoding")
        t = time.perf_counter()
        inputs = shared.get(shared_key("pixels", prep))
        if inputs is None:
            inputs = load_pixels(source, prep.transform)
        timings["time_pixels_s"] = time.perf_counter() - t

    stage("starting client actors")
    t = time.perf_counter()
    train = (np.ascontiguousarray(inputs[splits.train]), np.ascontiguousarray(y[splits.train]))
    evals = _eval_sets(inputs, y, splits, prep.client_tests)
    parts = prep.trainers
    history: list[dict[str, float]] = []
    messages: list[dict] = []
    stopped_by = None
    first = 1 if ckpt is None else ckpt.round + 1
    totals = {"up": 0.0, "down": 0.0} if ckpt is None else {"up": ckpt.meta["up"], "down": ckpt.meta["down"]}
    last = None if ckpt is None else ckpt.meta["last"]
    with Federation(cfg, task, train, parts, evals, (cache_f, cache_y), prep.counts, audit=audit) as fed:
        run.log_metrics({**fed.info(), "client_nodes": len(set(fed.nodes))})  # nodes the client actors span
        if ckpt is None:
            run.log_metrics(fed.start(), step=0)
        else:
            fed.restore(ckpt.snapshot)
            run.set_tags({"raycache.resumed_from_round": ckpt.round})
        timings["time_actors_s"] = time.perf_counter() - t
        stage("training")
        t = time.perf_counter()
        for r in range(first, cfg.federation.rounds + 1):
            metrics = fed.run_round(r)
            run.log_metrics(metrics, step=r)
            history.append(metrics)
            totals["up"] += metrics["comm_bytes_up"]
            totals["down"] += metrics["comm_bytes_down"]
            last = metrics
            if audit:
                messages += [{**m, "round": r} for m in fed.audit_log()]
            if on_round:
                try:
                    on_round(r, metrics)
                except StopRun as stop:  # e.g. a sweep's scheduler stopped this trial: end cleanly
                    stopped_by = stop.reason
                    break
            if cfg.federation.checkpoint:
                _checkpoint(cfg, run, r, fed.snapshot(), {**totals, "last": last, "seed": cfg.seed,
                                                          "method": cfg.method.name})
        timings["time_rounds_s"] = time.perf_counter() - t
        try:
            result = fed.result(cfg.federation.selection)
        except Exception:  # noqa: BLE001
            if stopped_by is None:
                raise
            # A trial its scheduler stopped may lose its actors to Tune's clean-up before it assembles a
            # result: it ends as stopped (KILLED, with the reason), with its rounds logged and no result.
            result = None
    run.log_metrics(timings)
    run.log_metrics({"comm_bytes_up_total": totals["up"], "comm_bytes_down_total": totals["down"],
                     "final_accuracy": last["accuracy"], **(result["metrics"] if result else {})})
    if result is not None:
        _save_result(cfg, run, result)
    return Summary(run.run_id, run.experiment_id, run.ui_hint(), cfg.method.name, zeroshot_accuracy,
                   last, len(history), totals["up"], totals["down"], timings, feats.encoded, len(y), history,
                   stopped_by, messages, result["metrics"] if result else {})


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


RESULT_TAG = "raycache.result_checkpoint"


def _save_result(cfg: ExperimentConfig, run, result: dict) -> None:
    """The run's result (the state `federation.selection` chose) as `final.safetensors` beside the round
    checkpoints, linked from the run."""
    from raycache.federation import checkpoint

    path = checkpoint_path(cfg, run.run_id).with_name("final.safetensors")
    checkpoint.save(path, result["round"], result["snapshot"],
                    {"selection": cfg.federation.selection, "method": cfg.method.name, "seed": cfg.seed})
    run.set_tags({RESULT_TAG: str(path), "raycache.selection": cfg.federation.selection,
                  "raycache.result_round": result["round"]})


def _checkpoint(cfg: ExperimentConfig, run, round_idx: int, snapshot: dict, meta: dict) -> None:
    """Write this round's checkpoint (atomically, replacing the last) and link it from the run."""
    from raycache.federation import checkpoint

    path = checkpoint.save(checkpoint_path(cfg, run.run_id), round_idx, snapshot, meta)
    run.set_tags({CHECKPOINT_TAG: str(path), "raycache.checkpoint_round": round_idx})
