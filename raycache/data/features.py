"""Encode once: CLIP image features for every image of a dataset, computed by a Ray Data actor pool and
persisted on disk under a fingerprint of (model weights, dataset), so rounds, epochs and later runs reuse them.

The encoder actors take `num_cpus` / `num_gpus` from config; fractional GPUs let several share one device.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycache.data.sources.base import Source, decode_image
from raycache.errors import UserError
from raycache.models.clip import ModelSpec


class ImageEncoder:
    """Ray Data callable class: one model per actor, batches of encoded images in, features out.

    Features are the raw `encode_image` output (not normalised): FedCLIP's adapter reads them as they come
    from CLIP (its reference normalises only after the adapter); every other method normalises them itself."""

    def __init__(self, spec: ModelSpec, use_gpu: bool, views: int = 1, seed: int = 0) -> None:
        import torch

        from raycache.models.clip import load_clip

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.preprocess, _ = load_clip(spec, device=self.device)
        self.views, self.seed = views, seed
        self.augment = augmentation(self.preprocess) if views > 1 else None

    def _pixels(self, img, key: str):
        """(views, 3, H, W): the eval crop, or `views` augmented views drawn from a stream seeded by (seed,
        the image's key), so an image's views do not depend on its batch or its actor."""
        import torch

        if self.augment is None:
            return self.preprocess(img)[None]
        gen_seed = int.from_bytes(hashlib.sha256(f"{self.seed}|{key}".encode()).digest()[:8], "little")
        torch.manual_seed(gen_seed)
        return torch.stack([self.augment(img) for _ in range(self.views)])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = torch.cat([self._pixels(decode_image(img, str(key)), str(key))
                            for img, key in zip(batch["image"], batch["key"])])  # (B * views, 3, H, W)
        with torch.no_grad():
            feats = self.model.encode_image(pixels.to(self.device)).float()  # (B * views, D), raw
            # Tip-Adapter's cache key: the mean of the views' raw features (normalised by the method)
            feats = feats.reshape(len(batch["key"]), -1, feats.shape[-1]).mean(dim=1)  # (B, D)
        # The encoder's own count of images it pushed through the model, on the batch's first row: the
        # driver's sum is the number of encoder calls, checked against the number of distinct images.
        calls = np.zeros(len(feats), dtype=np.int64)
        calls[0] = pixels.shape[0]  # every view counts as an encoder call
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


def augmentation(preprocess):
    """Tip-Adapter's cache augmentation on top of the model's own normalisation: RandomResizedCrop to the
    model's input size (scale 0.5-1, bicubic) and a horizontal flip with p = 0.5."""
    from torchvision import transforms as T

    size = input_size(preprocess)
    if size is None:
        raise UserError("method.augment_views: the model's preprocessing has no crop or resize to take the "
                        "input size from; use method.augment_views: 1")
    normalize = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(p=0.5), T.ToTensor(), normalize])


FEATURE_FORMAT = "raw-v2"  # v1 stored unit-normalised rows; raw rows are a different store


def feature_key(spec: ModelSpec, source: Source, views: int = 1, seed: int = 0) -> str:
    aug = "" if views == 1 else f"|views{views}-seed{seed}"
    return hashlib.sha256(f"{FEATURE_FORMAT}|{spec.fingerprint()}|{source.fingerprint}{aug}".encode()).hexdigest()[:24]


def load_or_encode(source: Source, spec: ModelSpec, runtime, views: int = 1, seed: int = 0) -> Features:
    """Features for every image of `source` under `spec` (with `views` > 1: the mean raw feature of that many
    augmented views per image, seeded by `seed`); encodes only if the store lacks them."""
    from safetensors.numpy import load_file, save_file

    store = Path(runtime.cache_dir) / "features"
    path = store / f"{feature_key(spec, source, views, seed)}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))["features"]
        except Exception:  # noqa: BLE001 (a damaged store file, e.g. a full disk: it is a cache, re-encode)
            feats = None
        if feats is not None and feats.shape[0] == len(source.labels) and np.isfinite(feats).all():
            return Features(feats, 0, path)
    feats, encoded = _encode(source, spec, runtime, views, seed)
    try:
        store.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        meta = {"model": json.dumps(spec.__dict__), "dataset": source.fingerprint, "n": str(len(feats))}
        save_file({"features": feats}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    except OSError as err:
        raise UserError(f"runtime.cache_dir: cannot write features to {store} ({err.strerror})") from None
    return Features(feats, encoded, path)


def _encode(source: Source, spec: ModelSpec, runtime, views: int = 1, seed: int = 0) -> tuple[np.ndarray, int]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # features line up with source.labels
    ds = source.to_ray().map_batches(
        ImageEncoder,
        fn_constructor_kwargs={"spec": spec, "use_gpu": runtime.encoder_gpus > 0, "views": views, "seed": seed},
        batch_size=max(1, runtime.encoder_batch_size // views),  # images x views per forward pass
        batch_format="numpy",
        num_cpus=runtime.encoder_cpus,
        num_gpus=runtime.encoder_gpus,
        compute=ray.data.ActorPoolStrategy(size=runtime.encoder_actors),
        max_restarts=0,  # a failed encoder fails the encode (nothing half-written); no restart warning
    )
    try:
        chunks, calls = [], 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            chunks.append(batch["features"])
            calls += int(batch["encoder_images"].sum())
    except Exception as err:  # Ray wraps the actor's exception; surface a user's mistake as one line
        from raycache.errors import find_user_error

        user = find_user_error(err)
        if user is not None:
            raise user from None
        raise
    feats = np.concatenate(chunks).astype(np.float32, copy=False)
    if feats.shape[0] != len(source.labels):
        raise RuntimeError(f"encoder returned {feats.shape[0]} rows for {len(source.labels)} images")
    if not np.isfinite(feats).all():
        bad = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise UserError(f"data.dataset: image {bad} of {source.name} encodes to NaN/inf features")
    return feats, calls
