"""A model's eval preprocessing up to its `ToTensor`, as plain steps that run on PIL alone.

The encode pipeline's decode tasks turn image bytes into the uint8 pixels the encoder scales and normalises
(`raycache.data.features`). Run as torchvision's `Compose`, that stage makes every decode worker import
torch, torchvision and open_clip: seconds of CPU at start-up, while the encoder actor imports the same on the
same cores, and about half a gigabyte per worker that stays up beside the federation. An eval transform
whose PIL stage is only resizes, centre crops and mode conversions (open_clip's for a square input, as every
CLIP has, or a squashing resize) is compiled here, where
torch is at hand, into tuples of plain values; `decode_block` runs them with PIL and numpy only. The steps
do what torchvision does on a PIL image, step for step, so the pixels are the same bytes (tested against
torchvision on images of nine shapes: landscape, portrait, padded, one pixel high). Any other step keeps the
torchvision path.

Tip-Adapter's augmented views (`augment_steps`) run here too, whatever the eval transform: they need only
the model's input size. Their random crops and flips are torchvision's, drawn from numpy's generator.

This module imports neither torch nor torchvision at the top: a decode worker that runs `decode_block`
never loads them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator

import numpy as np

from raycache.data.sources.base import decode_image

# ("resize", size tuple, max_size, PIL filter) | ("center_crop", height, width) | ("convert", mode), and the
# augmentation's random steps: ("random_resized_crop", height, width, scale, ratio, PIL filter) | ("hflip", p)
Step = tuple
MODES = ("RGB", "L")  # conversions whose output is 8-bit pixels, as `ToTensor` scales them
BICUBIC = 3  # PIL's Image.BICUBIC
# The augmented views' random stream: part of a stored feature's key, so that features drawn from another
# stream (torch's, before this module drew them) are never read back as these.
AUGMENT_STREAM = "numpy-pcg64"


def view_seed(seed: int, key: str) -> int:
    """The seed of one image's augmented views: a function of (seed, the image's key) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "little")


def compile_steps(pil_stage) -> tuple[Step, ...] | None:
    """The steps of a torchvision `Compose` that stops before its `ToTensor` (`split_at_tensor`'s PIL stage),
    or None if any step is not one `decode_block` runs as torchvision would. Runs where torch is loaded."""
    if pil_stage is None:
        return None
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_modes_mapping

    try:  # open_clip's mode conversion: a class in current releases, a function in older ones
        from open_clip import transform as oc
    except ImportError:
        oc = None
    convert_cls, rgb_fn = getattr(oc, "MaybeConvertMode", None), getattr(oc, "_convert_to_rgb", None)
    steps: list[Step] = []
    for t in pil_stage.transforms:
        if type(t) is T.Resize:
            size = (t.size,) if isinstance(t.size, int) else tuple(t.size)
            if len(size) not in (1, 2) or (t.max_size is not None and (len(size) != 1 or t.max_size <= size[0])):
                return None  # torchvision refuses it on every image: let it say so
            steps.append(("resize", size, t.max_size, int(pil_modes_mapping[t.interpolation])))
        elif type(t) is T.CenterCrop:
            steps.append(("center_crop", int(t.size[0]), int(t.size[1])))
        elif convert_cls is not None and type(t) is convert_cls and t.mode in MODES:
            steps.append(("convert", t.mode))
        elif rgb_fn is not None and t is rgb_fn:
            steps.append(("convert", "RGB"))
        else:
            return None
    return tuple(steps)


def as_steps(steps) -> tuple[Step, ...] | None:
    """Steps as `compile_steps` makes them (tuples all the way down), from a JSON round trip's lists."""
    def tupled(x):
        return tuple(tupled(v) for v in x) if isinstance(x, (list, tuple)) else x

    return None if steps is None else tupled(steps)


def resized_size(height: int, width: int, size: tuple[int, ...], max_size: int | None) -> tuple[int, int]:
    """(height, width) after torchvision's `Resize(size, max_size=max_size)`: `size` of one number sets the
    shorter edge (the longer one scaled and truncated, then capped at `max_size`), of two the (height, width)."""
    if len(size) == 2:
        return size[0], size[1]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(img, height: int, width: int):
    """torchvision's `CenterCrop` on a PIL image: zero-padded (left and top get the smaller half) where the
    image is smaller than the crop, then the centre cut out, offsets rounded half to even."""
    from PIL import ImageOps

    w, h = img.size
    if width > w or height > h:
        dw, dh = max(width - w, 0), max(height - h, 0)
        bands = len(img.getbands())
        img = ImageOps.expand(img, border=(dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2),
                              fill=0 if bands == 1 else (0,) * bands)
        w, h = img.size
        if (w, h) == (width, height):
            return img
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def augment_steps(size: tuple[int, int]) -> tuple[Step, ...]:
    """Tip-Adapter's cache augmentation (its reference's `train_tranform`): RandomResizedCrop to the model's
    input size, scale 0.5-1, torchvision's default aspect ratios 3/4-4/3, bicubic; a horizontal flip with
    p = 0.5. `ToTensor` and the model's `Normalize` follow in the encoder."""
    return (("random_resized_crop", size[0], size[1], (0.5, 1.0), (3 / 4, 4 / 3), BICUBIC), ("hflip", 0.5))


def crop_params(height: int, width: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop as torchvision's `RandomResizedCrop.get_params` draws it
    (area uniform in `scale` of the image's, log aspect ratio uniform in `ratio`; ten tries, then the centre
    crop clamped to `ratio`), from numpy's generator `rng` instead of torch's."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply(img, steps: tuple[Step, ...], rng: np.random.Generator | None = None):
    """One PIL image through the steps; the random ones (augmentation) draw from `rng`."""
    from PIL import Image

    for step in steps:
        if step[0] == "resize":
            _, size, max_size, resample = step
            h, w = resized_size(img.height, img.width, size, max_size)
            if (h, w) != (img.height, img.width):  # torchvision returns the image itself at its own size
                img = img.resize((w, h), resample)
        elif step[0] == "center_crop":
            img = center_crop(img, step[1], step[2])
        elif step[0] == "convert":
            img = img.convert(step[1])
        elif step[0] == "random_resized_crop":  # torchvision's resized_crop: crop, then resize unless equal
            _, height, width, scale, ratio, resample = step
            top, left, h, w = crop_params(img.height, img.width, scale, ratio, rng)
            img = img.crop((left, top, left + w, top + h))
            if (h, w) != (height, width):
                img = img.resize((width, height), resample)
        elif step[0] == "hflip":
            if rng.random() < step[1]:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            raise ValueError(f"unknown preprocessing step {step[0]!r}")
    return img


def to_chw(img) -> np.ndarray:
    """uint8 (C, H, W) of an 8-bit L or RGB image, as torchvision's `pil_to_tensor` lays it out."""
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def views_of(img, key: str, steps: tuple[Step, ...], views: int, seed: int) -> np.ndarray:
    """uint8 (views, C, H, W): `views` draws of the steps on one decoded image, from a stream seeded by (seed,
    the image's key) alone, so that an image's views depend on neither its batch nor its worker."""
    rng = np.random.default_rng(view_seed(seed, key))
    return np.stack([to_chw(apply(img, steps, rng)) for _ in range(views)])


def decode_block(block: dict[str, np.ndarray], steps: tuple[Step, ...], rows: int, views: int = 1,
                 seed: int = 0) -> Iterator[dict]:
    """Ray Data task, the encode pipeline's CPU stage without torch: image bytes in, at most `rows` images
    per output block of uint8 (B, views, C, H, W) pixels out, for the encoder's tensor stage."""
    n = len(block["key"])
    for at in range(0, n, rows):
        pixels = [views_of(decode_image(img, str(key)), str(key), steps, views, seed)
                  for img, key in zip(block["image"][at:at + rows], block["key"][at:at + rows])]
        yield {"pixels": np.stack(pixels)}
