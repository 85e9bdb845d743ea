"""A model's eval preprocessing up to its `ToTensor`, as plain steps that run on PIL alone.

The encode pipeline's decode tasks turn image bytes into the uint8 pixels the encoder scales and normalises
(`raycache.data.features`). Run as torchvision's `Compose`, that stage makes every decode worker import
torch, torchvision and open_clip: seconds of CPU at start-up, while the encoder actor imports the same on the
same cores, and about half a gigabyte per worker that stays up beside the federation. An eval transform
whose PIL stage is only resizes, centre crops and mode conversions (open_clip's is) is compiled here, where
torch is at hand, into tuples of plain values; `decode_block` runs them with PIL and numpy only. The steps
do what torchvision does on a PIL image, step for step, so the pixels are the same bytes (tested against
torchvision on images of every shape). Any other step, or augmented views, keeps the torchvision path.

This module imports neither torch nor torchvision at the top: a decode worker that runs `decode_block`
never loads them.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from raycache.data.sources.base import decode_image

Step = tuple  # ("resize", size list, max_size, PIL filter) | ("center_crop", height, width) | ("convert", mode)
MODES = ("RGB", "L")  # conversions whose output is 8-bit pixels, as `ToTensor` scales them


def compile_steps(pil_stage) -> tuple[Step, ...] | None:
    """The steps of a torchvision `Compose` that stops before its `ToTensor` (`split_at_tensor`'s PIL stage),
    or None if any step is not one `decode_block` runs as torchvision would. Runs where torch is loaded."""
    if pil_stage is None:
        return None
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_modes_mapping

    convert_types: tuple = ()
    try:  # open_clip's mode conversion: a class in current releases, a function in older ones
        from open_clip import transform as oc

        convert_types = tuple(getattr(oc, name) for name in ("MaybeConvertMode",) if hasattr(oc, name))
        rgb_fn = getattr(oc, "_convert_to_rgb", None)
    except ImportError:
        rgb_fn = None
    steps: list[Step] = []
    for t in pil_stage.transforms:
        if type(t) is T.Resize:
            size = [t.size] if isinstance(t.size, int) else list(t.size)
            if len(size) not in (1, 2) or (t.max_size is not None and len(size) != 1):
                return None
            steps.append(("resize", size, t.max_size, int(pil_modes_mapping[t.interpolation])))
        elif type(t) is T.CenterCrop:
            steps.append(("center_crop", int(t.size[0]), int(t.size[1])))
        elif convert_types and type(t) in convert_types and getattr(t, "mode", None) in MODES:
            steps.append(("convert", t.mode))
        elif rgb_fn is not None and t is rgb_fn:
            steps.append(("convert", "RGB"))
        else:
            return None
    return tuple(steps)


def resized_size(height: int, width: int, size: list[int], max_size: int | None) -> tuple[int, int]:
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


def apply(img, steps: tuple[Step, ...]):
    """One PIL image through the compiled steps."""
    for step in steps:
        if step[0] == "resize":
            _, size, max_size, resample = step
            h, w = resized_size(img.height, img.width, size, max_size)
            if (h, w) != (img.height, img.width):  # torchvision returns the image itself at its own size
                img = img.resize((w, h), resample)
        elif step[0] == "center_crop":
            img = center_crop(img, step[1], step[2])
        else:
            img = img.convert(step[1])
    return img


def to_chw(img) -> np.ndarray:
    """uint8 (C, H, W) of an 8-bit L or RGB image, as torchvision's `pil_to_tensor` lays it out."""
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_block(block: dict[str, np.ndarray], steps: tuple[Step, ...], rows: int) -> Iterator[dict]:
    """Ray Data task, the encode pipeline's CPU stage without torch: image bytes in, at most `rows` images
    per output block of uint8 (B, 1, C, H, W) pixels out (one view each), for the encoder's tensor stage."""
    n = len(block["key"])
    for at in range(0, n, rows):
        pixels = [to_chw(apply(decode_image(img, str(key)), steps))
                  for img, key in zip(block["image"][at:at + rows], block["key"][at:at + rows])]
        yield {"pixels": np.stack(pixels)[:, None]}
