"""A run's first stage: every check that needs no Ray and no training, and what follows from the config
alone (the split, the partition, each trainer's rows, the classes' text weights, which rows are encoded), as
one `Prepared` that the later stages (`raycache.experiment`) read. A user's mistake is raised here as its
one-line `UserError`, before any run is opened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from raycache.config import ExperimentConfig, check_cache_size
from raycache.data.cache_source import prepare_synthetic
from raycache.data.partition import class_counts, partition
from raycache.data.sources import open_source
from raycache.data.split import client_holdout, few_shot, predefined_split, stratified_split
from raycache.errors import UserError
from raycache.methods import method_class, weighting
from raycache.methods.base import Task
from raycache.models.clip import ModelSpec
from raycache.models.preflight import start_preflight


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
    # The only rows whose frozen features the run encodes (`pixel_feature_rows`), or None for every
    # row (unless a sweep's driver shared them: `inputs.encode`): a method that trains and evaluates through
    # the encoder on images, with no cache, uses features only for the zero-shot accuracy (test rows) and the
    # server's hold-out.
    encode_rows: np.ndarray | None
    timings: dict[str, float]


def prepare(cfg: ExperimentConfig, model_here: bool = False,
            meanwhile: Callable[[ExperimentConfig, ModelSpec, Any, Any], None] | None = None) -> Prepared:
    """Every check that needs no Ray and no training, in order; a user's mistake raises UserError here.
    `model_here`: build the model in this process, for a process that is reused (a sweep's driver and its
    trials: they pay the import once); else in a single-use one (`raycache.models.preflight`).
    `meanwhile(cfg, spec, source, rows)`: called once every check that needs no model has passed, while the
    model's single-use process works (a run starts Ray and its encoders then; `rows`: the only rows whose
    features the run encodes, or None for all); not called where the model is built in this process."""
    method = method_class(cfg.method.name)
    fed = cfg.federation  # the run logs concrete settings: derived values folded in, every null resolved
    cfg = cfg.model_copy(update={"method": cfg.method.resolved(), "federation": fed.model_copy(
        update={"weighting": weighting(fed, cfg.method.name)})})
    _check_federation(cfg, method)
    spec = ModelSpec.from_config(cfg.model)
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
                                  cfg.seed, val_fraction=0.0 if cfg.data.split_file else cfg.data.val_fraction)
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
    trainers = method.flow.trainer_rows(parts, train_labels, len(source.class_names), cfg.method, cfg.seed)
    uses_cache = method.uses_cache(cfg.method)
    synth_store = None
    if uses_cache:
        check_cache_size(cfg)
        if cfg.method.cache_init == "synthetic":
            synth_store = prepare_synthetic(cfg, source.class_names)
    if cfg.runtime.address:  # an unreachable cluster is the user's to fix: said before the model is built
        from raycache.ray_session import check_reachable

        check_reachable(cfg.runtime.address)
    uses_pixels = method.uses_pixels(cfg.method)
    encode_rows = pixel_feature_rows(splits) if uses_pixels and not uses_cache else None
    t = time.perf_counter()
    # The model's weights exist and fit the method (its own check), the classes' text weights, the image
    # transform: made where the model is built, a single-use process unless this one holds torch already.
    # time_text_s is its whole span, `meanwhile` included (a run's Ray start lies inside it).
    with start_preflight(spec, source.class_names, cfg.model.templates, method, cfg.method, here=model_here) as job:
        if meanwhile is not None and job.running:
            meanwhile(cfg, spec, source, encode_rows)
        made = job.result()
    task = Task(source.class_names, made.text_weights, spec, tuple(cfg.model.templates), cfg.federation.rounds)
    transform = made.transform
    return Prepared(cfg, spec, source, splits, parts, trainers, client_tests, counts, task, transform, synth_store,
                    uses_cache, uses_pixels, encode_rows, {"time_text_s": time.perf_counter() - t})


def _check_federation(cfg: ExperimentConfig, method) -> None:
    """What the federation section asks of the method's flow and state."""
    fed = cfg.federation
    flow = method.flow
    if not flow.aggregates and (fed.strategy != "fedavg" or fed.dp is not None):
        what = "federation.dp" if fed.dp is not None else f"federation.strategy: {fed.strategy}"
        raise UserError(f"{what} acts on the server's average of client updates, and {cfg.method.name} "
                        f"aggregates none (its flow is {flow.name})")
    if fed.strategy == "classwise":
        if not method.class_rows(cfg.method, 1):
            raise UserError(f"federation.strategy: classwise averages per-class rows of a cache; "
                            f"{cfg.method.name}'s state has none (use it with a cache method)")


def pixel_feature_rows(splits) -> np.ndarray:
    """The rows whose frozen features a method that trains on pixels uses: test (zero-shot accuracy), then
    the server's hold-out."""
    return np.concatenate([splits.test, splits.server])
