"""Where a cache method's K labelled examples per class come from (`method.cache_init`):

- `synthetic`: a class-balanced set made by a text-to-image model (CacheFL); generated first if missing;
- `real`: the server's labelled hold-out split of the dataset;
- `random`: random unit vectors (a control: what the cache is worth without its keys' content).
"""

from __future__ import annotations

import numpy as np

from raycache.errors import UserError


def prepare_synthetic(cfg, class_names: list[str]):
    """Input checks for a synthetic cache, before any compute; returns the synth store."""
    from raycache.synth.generate import prepare, resolve_classes

    classes = resolve_classes(cfg.synth, class_names)
    if classes != class_names:
        raise UserError(f"synth.classes: {classes} differ from the dataset's classes {class_names}; "
                        f"a synthetic cache needs the same classes in the same order")
    return prepare(cfg.synth, classes, cfg.runtime.cache_dir)


def cache_examples(cfg, spec, source, splits, feats: np.ndarray, store=None) -> tuple[np.ndarray, np.ndarray,
                                                                                      dict]:
    """(features, labels, metrics) of the examples the server builds its cache from."""
    kind = cfg.method.cache_init
    if kind == "real":
        return feats[splits.server], source.labels[splits.server], {}
    n_classes, k = len(source.class_names), cfg.method.shots
    if kind == "random":
        rng = np.random.default_rng([cfg.seed, 0xCA])
        f = rng.normal(size=(n_classes * k, feats.shape[1])).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), np.repeat(np.arange(n_classes), k), {}
    from raycache.config import DataConfig
    from raycache.data.features import load_or_encode
    from raycache.data.sources import open_source
    from raycache.synth.generate import fill

    result = fill(store or prepare_synthetic(cfg, source.class_names), cfg.synth)
    synthetic = open_source(DataConfig(dataset=str(result.out)))
    encoded = load_or_encode(synthetic, spec, cfg.runtime)
    return encoded.features, synthetic.labels, {"synth_images": result.images,
                                                "synth_images_generated": result.generated,
                                                "synth_seconds": result.seconds,
                                                "synth_features_encoded": encoded.encoded}
