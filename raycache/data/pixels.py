"""Images for methods that train through the image encoder (`flora` on the vision tower, `fedavg_full`),
streamed rather than materialised.

`load_pixels` reads every image's encoded bytes once (through Ray Data, as the encoder does) into an
`ImageRows`: one uint8 buffer and its offsets, which the object store shares between the client hosts and the
server without copying. Rows are decoded and run through the model's eval transform only when a minibatch
is asked for (`ImageRows.tensor`), so a process holds the encoded dataset once and one batch of pixels at a
time: never the dataset as float pixels (0.6 MB per 224 px image: 42 GB for Fashion-MNIST's 70,000).
"""

from __future__ import annotations

import numpy as np

from raycache import heap
from raycache.data.sources.base import Source, decode_image


class ImageRows:
    """Rows of a dataset's images as encoded bytes, decoded on demand. Indexing with positions, a mask or a
    slice gives the selected rows (their bytes copied into a buffer of their own, as numpy's fancy indexing
    copies); `tensor()` decodes them into a (n, 3, H, W) float32 tensor on the rows' device."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, keys: np.ndarray, transform,
                 device: str = "cpu") -> None:
        self.data, self.offsets, self.keys = data, offsets, keys  # uint8 (bytes,), int64 (n + 1,), str (n,)
        self.transform, self.device = transform, device

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)

    def __getitem__(self, idx) -> "ImageRows":
        rows = np.arange(len(self))[idx]
        if np.ndim(rows) == 0:
            rows = np.asarray([rows])
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        data = np.empty(int(offsets[-1]), np.uint8)
        for k, (a, b) in enumerate(zip(starts, ends)):
            data[offsets[k]:offsets[k + 1]] = self.data[a:b]
        return ImageRows(data, offsets, self.keys[rows], self.transform, self.device)

    def to(self, device) -> "ImageRows":
        return ImageRows(self.data, self.offsets, self.keys, self.transform, str(device))

    def tensor(self):
        """The rows decoded and transformed: (n, 3, H, W) float32 on the rows' device."""
        import torch

        images = [self.transform(decode_image(self.data[self.offsets[i]:self.offsets[i + 1]].tobytes(),
                                              str(self.keys[i])))
                  for i in range(len(self))]
        return torch.stack(images).to(self.device)


def materialize(inputs):
    """A minibatch as the model takes it: `ImageRows` decoded, tensors (or tuples of them) as they are."""
    return inputs.tensor() if isinstance(inputs, ImageRows) else inputs


def to_device(inputs, device):
    """A client's rows on `device`: a tensor from a numpy array, or `ImageRows` that decode onto it."""
    import torch

    if isinstance(inputs, ImageRows):
        return inputs.to(device)
    return torch.from_numpy(np.ascontiguousarray(inputs)).to(device)


def compact(inputs):
    """Selected rows in memory of their own, ready for the object store."""
    return inputs if isinstance(inputs, ImageRows) else np.ascontiguousarray(inputs)


def _checked(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: the batch as it came, once every image in it has decoded (UserError naming one that
    does not)."""
    for img, key in zip(batch["image"], batch["key"]):
        decode_image(img, str(key))
    return batch


def load_pixels(source: Source, transform) -> ImageRows:
    """Every image of `source`, in its order, as encoded bytes that decode through `transform` on demand."""
    import ray.data

    from raycache.errors import find_user_error

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows line up with source.labels
    chunks, keys = [], []
    try:  # every image decoded once, in parallel tasks: a corrupt one is named now, not in a client's round
        for batch in source.to_ray().map_batches(_checked, batch_format="numpy").iter_batches(
                batch_size=None, batch_format="numpy"):
            for img, key in zip(batch["image"], batch["key"]):
                data = img.get("bytes") if isinstance(img, dict) else img
                chunks.append(np.frombuffer(data, np.uint8))
                keys.append(str(key))
    except Exception as err:  # a corrupt source is the user's to fix: one line naming it
        user = find_user_error(err)
        if user is not None:
            raise user from None
        raise
    if len(keys) != len(source.labels):
        raise RuntimeError(f"reading returned {len(keys)} images for {len(source.labels)}")
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    rows = ImageRows(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8), offsets, np.asarray(keys),
                     transform)
    del chunks, keys
    # every image's bytes and key came as Python objects of their own: for Fashion-MNIST's 70,000 images, 115 MB
    # of freed heap stayed resident in the driver for the rest of the run. Once per run: always worth a trim.
    heap.release()
    return rows
