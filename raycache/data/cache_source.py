"""Where a cache method's K labelled examples per class come from (`method.cache_init`):

- `synthetic`: a class-balanced set made by a text-to-image model (CacheFL); generated first if missing;
- `real`: the server's labelled hold-out split of the dataset;
- `shots`: K per class drawn from the training pool (Tip-Adapter's few-shot cache; the rows the one
  centralised trainer holds);
- `random`: random unit vectors (a control: what the cache is worth without its keys' content).

Image keys are Tip-Adapter's: each is the mean raw feature of `method.augment_views` augmented views of its
image (encoded once, stored under the views and the seed), which the method normalises.
"""

from __future__ import annotations

import numpy as np

from raycache.errors import UserError
from raycache.methods.cache_model import class_balanced_rows


def prepare_synthetic(cfg, class_names: list[str]):
    """Input checks for a synthetic cache, before any compute; returns the synth store."""
    from raycache.synth.generate import prepare, resolve_classes

    classes = resolve_classes(cfg.synth, class_names)
    if classes != class_names:
        raise UserError(f"synth.classes: {classes} differ from the dataset's classes {class_names}; "
                        f"a synthetic cache needs the same classes in the same order")
    return prepare(cfg.synth, classes, cfg.runtime.cache_dir)


def cache_examples(cfg, spec, source, splits, feats: np.ndarray, store=None,
                   shot_rows: np.ndarray | None = None, progress=None,
                   transform=None, encoders=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features, labels, metrics): K examples per class, class-major, that the server builds its cache from.
    `shot_rows`: the source rows the centralised trainer holds (for `cache_init: shots`). `progress(done,
    total)`: synthetic images made so far, as they arrive. `transform`: the model's eval preprocessing, for
    images that must be encoded (else built where needed). `encoders`: the run's encoder pool
    (`data.encoders.EncoderPool`), for those images; stopped while the generator's actors run, which may
    need its CPUs or GPU."""
    kind = cfg.method.cache_init
    n_classes, k = len(source.class_names), cfg.method.shots
    if kind == "random":
        rng = np.random.default_rng([cfg.seed, 0xCA])
        f = rng.normal(size=(n_classes * k, feats.shape[1])).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), np.repeat(np.arange(n_classes), k), {}
    if kind in ("real", "shots"):
        pool = splits.server if kind == "real" else shot_rows
        rows = pool[class_balanced_rows(source.labels[pool], n_classes, k)]
        keys, metrics = _keys(source, rows, feats[rows], spec, cfg, transform, encoders)
        return keys, source.labels[rows], metrics
    from raycache.config import DataConfig
    from raycache.data.features import load_or_encode
    from raycache.data.sources import open_source
    from raycache.synth.generate import fill

    store = store or prepare_synthetic(cfg, source.class_names)
    on_images = None
    if progress is not None:
        total, done = len(store.settings["classes"]) * store.settings["per_class"], [0]

        def on_images(n: int) -> None:
            done[0] += n
            progress(done[0], total)
    if encoders is not None:
        encoders.close()  # started again at its next encode
    result = fill(store, cfg.synth, on_images)
    synthetic = open_source(DataConfig(dataset=str(result.out)))
    rows = class_balanced_rows(synthetic.labels, n_classes, k)
    plain, metrics = None, {}
    if cfg.method.augment_views == 1:
        encoded = load_or_encode(synthetic, spec, cfg.runtime, transform=transform, encoders=encoders)
        plain, metrics = encoded.features[rows], {"synth_features_encoded": encoded.encoded}
    keys, more = _keys(synthetic, rows, plain, spec, cfg, transform, encoders)
    metrics.update(more)
    return keys, synthetic.labels[rows], {"synth_images": result.images, "synth_images_generated": result.generated,
                                          "synth_seconds": result.seconds, **metrics}


def _keys(source, rows: np.ndarray, plain: np.ndarray | None, spec, cfg, transform=None,
          encoders=None) -> tuple[np.ndarray, dict]:
    """The raw key features of `source`'s images at `rows`: `plain` (their stored centre-crop features) with
    one view, else the mean of `method.augment_views` augmented views, encoded once and stored."""
    views = cfg.method.augment_views
    if views == 1:
        return plain, {}
    from raycache.data.features import load_or_encode

    encoded = load_or_encode(source.subset(rows), spec, cfg.runtime, views=views, seed=cfg.seed,
                             transform=transform, encoders=encoders)
    return encoded.features, {"cache_views_encoded": encoded.encoded}
