"""A run's inputs, made once per model and dataset and kept in the feature store (`encode`): every image's
features and, from them, the zero-shot accuracy on the test split; the cache's source (the server's hold-out,
the clients' few shots, or synthetic images); and the clients' images, for a method that trains through the
encoder. One encoder pool serves all of a run's encodes (`raycache.data.encoders`).

A sweep's driver makes the same inputs once for all its trials (`raycache.sweep.runner.shared_inputs`) and
hands them over keyed by `shared_key`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from raycache.data.cache_source import cache_examples
from raycache.models.clip import ModelSpec

if TYPE_CHECKING:
    from raycache.prepare import Prepared

ProgressCallback = Callable[[str, int, int], None]  # (what, done, total): long work as it advances


def work(progress: ProgressCallback | None, what: str) -> Callable[[int, int], None] | None:
    """`progress` bound to one piece of work: (done, total) -> progress(what, done, total)."""
    return None if progress is None else (lambda done, total: progress(what, done, total))


@dataclass
class Encoded:
    """What the encode stage made: the features, the cache's source, the inputs clients train on."""

    features: object  # raycache.data.features.Features
    cache: tuple[np.ndarray, np.ndarray]  # (features, labels) the initial state is built from
    inputs: Any  # features (np.ndarray), or ImageRows (decoded on demand) for a method that trains through the encoder
    zeroshot_accuracy: float


def shared_key(kind: str, prep: Prepared) -> str:
    """The key of a shared input: its kind ("features" or "pixels") and what it is made from."""
    return input_key(kind, prep.spec, prep.source)


def input_key(kind: str, spec: ModelSpec, source) -> str:
    from raycache.data.feature_store import feature_key

    return f"{kind}/{feature_key(spec, source)}"


def client_sizes(parts: list[np.ndarray]) -> dict[str, float]:
    """The spread of the clients' training-set sizes: min, median and max samples per client."""
    sizes = np.array([len(p) for p in parts])
    return {"client_size_min": float(sizes.min()), "client_size_median": float(np.median(sizes)),
            "client_size_max": float(sizes.max())}


def encode(prep: Prepared, run, stage: Callable[[str], None], shared: dict[str, np.ndarray],
           progress: ProgressCallback | None = None, encoders=None) -> Encoded:
    """Features once per model and dataset; zero-shot accuracy; the cache's source; pixels if trained on.
    One encoder pool serves the run's encodes (the features, the cache's keys): `encoders`, started early
    (`EarlyStart`), or else started by the first encode that finds the store without its features; stopped
    before the pixels' pipeline and the federation, whose tasks and actors need its CPUs."""
    from raycache.data.encoders import EncoderPool
    from raycache.data.features import Features, load_or_encode, load_rows
    from raycache.methods.zeroshot import zero_shot_predictions

    cfg, spec, source, splits, timings = prep.cfg, prep.spec, prep.source, prep.splits, prep.timings
    with encoders or EncoderPool(spec, cfg.runtime) as encoders:  # stopped before the pixels and the federation
        stage("encoding images (once per model and dataset)")
        t = time.perf_counter()
        features_shared = shared_key("features", prep) in shared
        y = source.labels
        f = None  # every image's features, where the method trains or evaluates on them
        if features_shared:
            feats = Features(shared[shared_key("features", prep)], 0, None)
            f = feats.features
        elif prep.encode_rows is not None:  # a method that trains through the encoder: see Prepared.encode_rows
            feats = load_rows(source, spec, cfg.runtime, prep.encode_rows, prep.transform,
                              work(progress, "encoding images"), encoders)
        else:
            feats = load_or_encode(source, spec, cfg.runtime, transform=prep.transform,
                                   progress=work(progress, "encoding images"), encoders=encoders)
            f = feats.features
        # prepare.pixel_feature_rows' order where only those rows were encoded
        test_f = f[splits.test] if f is not None else feats.features[:len(splits.test)]
        server_f = f[splits.server] if f is not None else feats.features[len(splits.test):]
        timings["time_encode_s"] = time.perf_counter() - t

        zs_pred = zero_shot_predictions(test_f, prep.task.text_weights)
        zeroshot_accuracy = float((zs_pred == y[splits.test]).mean())
        run.log_metrics({"zeroshot_accuracy": zeroshot_accuracy, "features_encoded": feats.encoded,
                         "distinct_images": len(y), "num_classes": len(source.class_names),
                         "samples_train": sum(len(p) for p in prep.parts), "samples_val": len(splits.val),
                         "samples_trained_on": sum(len(t) for t in prep.trainers),  # tip_adapter: its K shots
                         "samples_test": len(splits.test), "samples_server": len(splits.server),
                         "samples_client_test": sum(len(p) for p in prep.client_tests),
                         **client_sizes(prep.parts),
                         "features_shared": float(features_shared)})

        cache = (server_f, y[splits.server])  # the server's labelled hold-out
        if prep.uses_cache:
            stage(f"building the cache source ({cfg.method.cache_init})")
            t = time.perf_counter()
            cache_f, cache_y, cache_metrics = cache_examples(cfg, spec, source, splits, f, prep.synth_store,
                                                             splits.train[prep.trainers[0]],
                                                             work(progress, "generating synthetic images"),
                                                             prep.transform, encoders)
            cache = (cache_f, cache_y)
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
    return Encoded(feats, cache, inputs, zeroshot_accuracy)
