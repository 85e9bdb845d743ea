"""The model's image transform, split where the work is done: its PIL stage (resize, crop, to uint8 pixels)
runs in the decode tasks, its tensor stage (scaling to [0, 1], `Normalize`) where the model runs; the input
size that the augmented views are cropped to; Tip-Adapter's augmented views' tensor stage."""

from __future__ import annotations

from raycache.errors import UserError


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
