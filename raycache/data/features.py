"""Encode once: CLIP image features for every image of a dataset, computed by Ray Data decode tasks feeding
an encoder pool (`raycache.data.encoders`) and kept in the feature store (`raycache.data.feature_store`)
under a fingerprint of (model weights, dataset), so rounds, epochs and later runs reuse them.

The encoder actors take `num_cpus` / `num_gpus` from config; fractional GPUs let several share one device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np

from raycache.data import pil_stage
from raycache.data.encoders import EncoderPool, block_pieces
from raycache.data.transforms import augment_size, split_at_tensor, to_pixels
from raycache.data.feature_store import ShardWriter, feature_key, read_store
from raycache.data.sources.base import Source, decode_image
from raycache.errors import UserError
from raycache.models.clip import ModelSpec


def decode_views(batch: dict[str, np.ndarray], transform) -> dict[str, np.ndarray]:
    """Encoded image bytes in, (B, 1, C, H, W) pixels out, through the eval transform as torchvision runs it
    (the pipeline's CPU stage for a transform `pil_stage` does not compile, and the serving path's). Pixels
    leave as uint8, to be scaled and normalised by the encoder (`split_at_tensor`), or, for a transform that
    cannot be split or a batch holding an image that is not 8-bit, as the transform's whole float32 output,
    ready for the model."""
    import torch

    front, tensor_stage = split_at_tensor(transform)  # the PIL stage, the tensor stage
    out = []
    for img, key in zip(batch["image"], batch["key"]):
        img = decode_image(img, str(key))
        out.append((transform(img) if front is None else to_pixels(img, front))[None])
    if front is not None and any(o.dtype != torch.uint8 for o in out):  # finish the transform here
        out = [tensor_stage(o.float().div(255) if o.dtype == torch.uint8 else o) for o in out]
    return {"pixels": torch.stack(out).numpy()}


def decode_block(block: dict[str, np.ndarray], transform, rows: int):
    """Ray Data task over one whole block as the source reads it: `decode_views` on at most `rows` images at
    a time, each slice yielded as its own output block. Taking whole blocks (no `batch_size`) lets Ray Data
    fuse this stage into the read (one task reads, decodes and preprocesses; no hop through the object store
    in between), and slicing keeps each output block to one encoder batch however large the source's
    blocks are (a parquet row group can hold thousands of images)."""
    n = len(block["key"])
    for at in range(0, n, rows):
        yield decode_views({k: v[at:at + rows] for k, v in block.items()}, transform)


@dataclass(frozen=True)
class Features:
    features: np.ndarray  # (n, D) float32, raw encode_image output, in the source's order
    encoded: int  # images the encoder actors pushed through the model in this call (0 when read from the store)
    path: Path | None  # None: handed over in memory (a sweep's object store), not read from the store


def load_or_encode(source: Source, spec: ModelSpec, runtime, views: int = 1, seed: int = 0,
                  transform=None, progress: Callable[[int, int], None] | None = None,
                  encoders: EncoderPool | None = None) -> Features:
    """Features for every image of `source` under `spec` (with `views` > 1: the mean raw feature of that many
    augmented views per image, seeded by `seed`); encodes only if the store lacks them. `transform`: the
    model's eval preprocessing, if the caller has it (else it is built here). `progress(done, total)` is
    called as blocks of features arrive (images). `encoders`: the caller's pool (a run's, started once for
    all its encodes), used if it fits `spec` and `runtime`; else it is stopped (two pools on a local Ray
    could hold the CPUs the decode tasks need) and a pool is started for this call."""
    key = feature_key(spec, source, views, seed)
    store = Path(runtime.cache_dir) / "features"
    feats = read_store(store, key, len(source.labels))
    if feats is not None:
        return Features(feats, 0, store / key)
    if transform is None:
        from raycache.models.clip import load_clip

        transform = load_clip(spec)[1]
    meta = {"model": json.dumps(spec.__dict__), "dataset": source.fingerprint}
    with ShardWriter(store, key, meta) as writer:
        if encoders is not None and encoders.fits(spec, runtime):
            feats, encoded = _encode(source, runtime, transform, views, seed, writer, encoders, progress)
        else:
            if encoders is not None:  # its actors' CPUs are this pool's to take (its next encode restarts it)
                encoders.close()
            with EncoderPool(spec, runtime) as own:
                feats, encoded = _encode(source, runtime, transform, views, seed, writer, own, progress)
    return Features(feats, encoded, writer.stored)


def load_rows(source: Source, spec: ModelSpec, runtime, rows: np.ndarray, transform=None,
              progress: Callable[[int, int], None] | None = None, encoders: EncoderPool | None = None) -> Features:
    """Features of `source`'s `rows` only, in that order: sliced from the whole dataset's stored features
    when a run left them, else encoded for those rows alone (a subset with a store entry of its own)."""
    store = Path(runtime.cache_dir) / "features"
    whole = read_store(store, feature_key(spec, source), len(source.labels))
    if whole is not None:
        return Features(whole[rows], 0, store / feature_key(spec, source))
    return load_or_encode(source.subset(rows), spec, runtime, transform=transform, progress=progress,
                          encoders=encoders)


def decoded(source: Source, runtime, transform, rows: int, views: int = 1, seed: int = 0):
    """The pipeline's CPU stage: `source`'s images as blocks of at most `rows` decoded, preprocessed images
    (`decode_task`). The source's read gets the stage's remote args, so that Ray Data fuses the read into
    it: a read operator of its own gets a sliver of the CPUs from Ray Data's resource budget and paces the
    whole pipeline (one or two read tasks at a time beside 15 decode tasks, on a 16-core machine). Ray
    Data's default retries a lost task for ever: here `runtime.encode_retries` times."""
    stage = {"num_cpus": runtime.decode_cpus, "max_retries": runtime.encode_retries}
    fn, kwargs = decode_task(transform, rows, views, seed)
    return source.to_ray(**stage).map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="numpy",
                                              **stage)


def decode_task(transform, rows: int, views: int = 1, seed: int = 0) -> tuple[Callable, dict]:
    """(function, keyword arguments) of the decode stage's task: the eval transform's PIL stage compiled to
    plain steps, or Tip-Adapter's augmentation (`views` > 1), run by `pil_stage.decode_block`, so that the
    decode workers never load torch; `decode_block` with the transform itself for an eval transform that
    does not compile."""
    if views > 1:
        return pil_stage.decode_block, {"steps": pil_stage.augment_steps(augment_size(transform)), "rows": rows,
                                        "views": views, "seed": seed}
    # a transform made in another process brings its steps; compiling one here imports torch
    steps = (transform.pil_steps if hasattr(transform, "pil_steps")
             else pil_stage.compile_steps(split_at_tensor(transform)[0]))
    if steps is not None:
        return pil_stage.decode_block, {"steps": steps, "rows": rows}
    return decode_block, {"transform": transform, "rows": rows}


def _encode(source: Source, runtime, transform, views: int, seed: int, writer: ShardWriter, pool: EncoderPool,
            progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """`decoded`'s tasks (CPU) decode and preprocess, `pool`'s actors run the model; blocks stream through
    both in the source's order, and each block of features is written as a shard and copied into one
    preallocated array as it arrives (the dataset is held once)."""
    import ray.data

    pool.start()  # before the pipeline plans and decodes: the actors build their model meanwhile
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # blocks reach the pool in the source's order
    batch = max(1, runtime.encoder_batch_size // views)  # images x views per forward pass
    n = len(source.labels)
    out, at, calls = None, 0, 0
    try:
        ds = decoded(source, runtime, transform, batch, views, seed)
        for block in pool.map(block_pieces(ds.iter_internal_ref_bundles()), transform, views):
            feats = block["features"].astype(np.float32, copy=False)
            if out is None:
                out = np.empty((n, feats.shape[1]), np.float32)
            if at + len(feats) > n:
                raise RuntimeError(f"encoder returned more than {n} rows for {n} images")
            if not np.isfinite(feats).all():
                bad = at + int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
                raise UserError(f"data.dataset: image {bad} of {source.name} encodes to NaN/inf features")
            out[at:at + len(feats)] = feats
            at += len(feats)
            calls += int(block["encoder_images"].sum())
            writer.write(feats)
            if progress is not None:
                progress(at, n)
    except Exception as err:  # Ray wraps the actor's exception; surface a user's mistake as one line
        from raycache.errors import find_user_error

        pool.close()  # its queued blocks dropped, its actors' restarts spent: the next encode starts it afresh
        user = find_user_error(err)
        if user is not None:
            raise user from None
        raise
    if at != n:
        raise RuntimeError(f"encoder returned {at} rows for {n} images")
    return out, calls
