"""Preprocessed images for methods that train through the image encoder (`flora` on the vision tower,
`fedavg_full`): every image of a source decoded and run through the model's eval transform by a Ray Data
map, then held as one (n, 3, H, W) float32 array that the client hosts share through the object store."""

from __future__ import annotations

import numpy as np

from raycache.data.sources.base import Source, decode_image


def preprocess(batch: dict[str, np.ndarray], transform) -> dict[str, np.ndarray]:
    """Ray Data task: encoded image bytes in, (B, 3, H, W) float32 pixels out."""
    import torch

    pixels = torch.stack([transform(decode_image(img, str(key))) for img, key in zip(batch["image"], batch["key"])])
    return {"pixels": pixels.numpy()}


def load_pixels(source: Source, transform, batch_size: int = 256) -> np.ndarray:
    """(n, 3, H, W) float32 pixels of every image of `source`, in its order."""
    import ray.data

    from raycache.errors import find_user_error

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows line up with source.labels
    ds = source.to_ray().map_batches(preprocess, fn_kwargs={"transform": transform}, batch_size=batch_size,
                                     batch_format="numpy")
    try:
        pixels = np.concatenate([b["pixels"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    except Exception as err:  # a corrupt image is the user's to fix: one line naming it
        user = find_user_error(err)
        if user is not None:
            raise user from None
        raise
    if len(pixels) != len(source.labels):
        raise RuntimeError(f"preprocessing returned {len(pixels)} images for {len(source.labels)}")
    return pixels.astype(np.float32, copy=False)
