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
from raycache.data.feature_store import ShardWriter, feature_key, read_store
from raycache.data.sources.base import Source, decode_image
from raycache.errors import UserError
from raycache.models.clip import ModelSpec


def split_at_tensor(transform):
    """(PIL stage, tensor stage) of a torchvision `Compose` that turns its PIL image into a tensor with
    `ToTensor`: the PIL stage (resize, crop, RGB) ends in uint8 pixels, which cross the object store a quarter
    the size of float32 ones; the tensor stage (`ToTensor`'s scaling to [0, 1] and what follows, e.g.
    `Normalize`) runs batched where the model runs. (None, None) for any other transform."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    at = next((i for i, t in enumerate(steps or []) if isinstance(t, T.ToTensor)), None)
    if at is None:
        return None, None
    return T.Compose(steps[:at]), T.Compose(steps[at + 1:])


def to_pixels(img, front) -> "torch.Tensor":
    """One image through the PIL stage `front`: uint8 (C, H, W) for an 8-bit L or RGB image (what `ToTensor` scales
    by 1/255), else `ToTensor`'s own float output (other modes are not scaled the same way)."""
    from torchvision.transforms import functional as TF

    img = front(img)
    return TF.pil_to_tensor(img) if img.mode in ("L", "RGB") else TF.to_tensor(img)


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


class ImageEncoder:
    """The pipeline's model stage (held by an `encoders.EncoderActor`, or by a served model): one model,
    (B, views, 3, H, W) pixels in, (B, D) features out (the mean over the views). It only runs the model and
    the transform's tensor stage (uint8 pixels scaled to [0, 1] and normalised on the actor's device, exactly
    as `ToTensor` and `Normalize` would): decoding and the PIL work happen in `decode_block` tasks upstream,
    so the actor's CPUs (or its GPU) never wait on PIL.

    Features are the raw `encode_image` output (not normalised): FedCLIP's adapter reads them as they come
    from CLIP (its reference normalises only after the adapter); every other method normalises them itself."""

    def __init__(self, spec: ModelSpec, use_gpu: bool, threads: int = 1, transform=None, model=None,
                 views: int = 1) -> None:
        """`model`: the CLIP of `spec`, already loaded on this process (a served model's), else loaded here.
        `transform`: the model's eval preprocessing, whose tensor stage runs here (the augmentation's, for
        `views` > 1: decoded in the same way upstream)."""
        import torch

        from raycache.models.clip import load_clip

        import warnings

        torch.set_num_threads(max(1, threads))  # Ray would set one thread per reserved CPU
        # blocks arrive read-only from the object store; the model only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_clip(spec, device=self.device)[0] if model is None else model.to(self.device)
        self.set_stage(transform, views)

    def set_stage(self, transform, views: int = 1) -> None:
        """The tensor stage of `transform` (the augmentation's, for `views` > 1) runs from now on."""
        self.tensor_stage = None
        if transform is not None:
            self.tensor_stage = augmented_tensor_stage(transform) if views > 1 else split_at_tensor(transform)[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = torch.from_numpy(batch["pixels"])  # (B, V, 3, H, W)
        b, v = pixels.shape[:2]
        with torch.no_grad():
            x = pixels.flatten(0, 1).to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:  # the PIL stage's output: ToTensor's scaling, then the rest (Normalize)
                # divided by a tensor, not a Python number: CUDA turns x / 255 into x * (1 / 255)
                x = self.tensor_stage(x.float().div(torch.tensor(255.0, device=x.device)))
            feats = self.model.encode_image(x).float()  # (B * V, D), raw
            # Tip-Adapter's cache key: the mean of the views' raw features (normalised by the method)
            feats = feats.reshape(b, v, -1).mean(dim=1)  # (B, D)
        # The encoder's own count of images it pushed through the model, on the batch's first row: the
        # driver's sum is the number of encoder calls, checked against the number of distinct images.
        calls = np.zeros(b, dtype=np.int64)
        calls[0] = b * v  # every view counts as an encoder call
        return {"features": feats.cpu().numpy(), "encoder_images": calls}


@dataclass(frozen=True)
class Features:
    features: np.ndarray  # (n, D) float32, raw encode_image output, in the source's order
    encoded: int  # images the encoder actors pushed through the model in this call (0 when read from the store)
    path: Path | None  # None: handed over in memory (a sweep's object store), not read from the store


def input_size(preprocess):
    """The model's input size, from its eval preprocessing (its last crop or resize); None if it has none."""
    from torchvision import transforms as T

    sizes = [t.size for t in preprocess.transforms if isinstance(t, (T.CenterCrop, T.Resize))]
    return sizes[-1] if sizes else None


def augment_size(preprocess) -> tuple[int, int]:
    """The augmented views' crop size, the model's input size: as a transform made in another process brings
    it (no torch here), else read from the transform."""
    size = getattr(preprocess, "input_size", None)
    if size is None:
        size = input_size(preprocess)
    if size is None:
        raise UserError("method.augment_views: the model's preprocessing has no crop or resize to take the "
                        "input size from; use method.augment_views: 1")
    return (size, size) if isinstance(size, int) else (size[0], size[-1])


def augmented_tensor_stage(preprocess):
    """What the encoder does to augmented views' uint8 pixels: `ToTensor`'s scaling (applied by the caller)
    and the model's own `Normalize`, as Tip-Adapter's reference follows its crop and flip."""
    from torchvision import transforms as T

    return T.Compose([next(t for t in preprocess.transforms if isinstance(t, T.Normalize))])


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


def encoder_plan(runtime) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor) of the encoder pool, sized so that a read/decode
    task always fits beside it.

    On a local Ray the pool and the stage that feeds it share a fixed set of CPUs: a pool that took them all
    would leave the read and decode tasks waiting for ever (two 1-CPU actors on 2 CPUs once did). A pool that
    does not fit beside one task of `max(1, decode_cpus)` CPUs (a read that is not fused into the decode
    stage, e.g. parquet's, takes 1) is sized down, said in one line on stderr, and refused when not even
    one actor fits. Ray's CPUs are a reservation, not a thread count: the actors' torch threads share the
    local Ray's CPUs (decoding is light beside the model), unless `runtime.encoder_threads` says otherwise.
    On a cluster the autoscaler adds nodes, so the configured pool stands, with ceil(encoder_cpus) threads
    per actor."""
    import math
    import sys

    import ray

    actors, cpus = runtime.encoder_actors, runtime.encoder_cpus
    if runtime.address is not None:
        return actors, cpus, runtime.encoder_threads or max(1, math.ceil(cpus))
    have = ray.cluster_resources().get("CPU", 0.0)
    stage = max(1.0, runtime.decode_cpus)
    spare = have - stage
    if cpus > spare + 1e-9:
        raise UserError(f"runtime.encoder_cpus: an encoder actor with {cpus:g} CPU beside a read/decode task "
                        f"({stage:g} CPU) does not fit this Ray's {have:g} CPUs")
    fit = int((spare + 1e-9) // cpus) if cpus > 0 else actors
    if fit < actors:
        print(f"raycache: runtime.encoder_actors={actors} x {cpus:g} CPU leave no CPU for reading and decoding "
              f"on this Ray's {have:g} CPUs; encoding with {fit}", file=sys.stderr)
        actors = fit
    return actors, cpus, runtime.encoder_threads or max(1, int(have) // actors)


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
