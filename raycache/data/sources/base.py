"""What every data source provides: labels known up front, image bytes streamed through Ray Data."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from raycache.errors import UserError


@dataclass
class Source:
    """A labelled image dataset.

    `labels[i]` and row `i` of `to_ray()` describe the same image: Ray Data runs with `preserve_order`,
    so features come back in this order. `to_ray()` yields an `image` column (encoded bytes) and a `key`
    column naming where each image came from, for error messages.

    `to_ray(rows=None, **read_args)`: `read_args` are Ray remote args for the tasks that read files (a
    source that reads many small files with `ray.data.read_*`); a map stage with the same remote args is
    fused into the read by Ray Data, so one task reads and decodes. In-memory sources have no read tasks,
    and a source of a few large files keeps its own read stage (fused, a file's images would decode in one
    task); both ignore them.
    """

    name: str
    labels: np.ndarray  # (n,) int64 in [0, len(class_names))
    class_names: list[str]
    fingerprint: str  # changes whenever any image or label changes
    to_ray: Callable[..., Any] = field(repr=False)  # to_ray(rows=None, **read_args): all images, or these rows
    domains: np.ndarray | None = None  # (n,) int64 into domain_names, for sources with a domain per image
    domain_names: list[str] | None = None
    splits: dict[str, np.ndarray] | None = None  # the source's own train / val / test positions, if it has them
    every_class: bool = field(default=True, repr=False)  # each class must have images (false: a subset)

    def __post_init__(self) -> None:
        if len(self.labels) == 0:
            raise UserError(f"data.dataset: {self.name} holds no images")
        if not self.every_class:
            return
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        empty = [self.class_names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise UserError(f"data.dataset: class {empty[0]!r} in {self.name} has no images")

    def subset(self, rows: np.ndarray) -> "Source":
        """The images at `rows`, in that order, as a source of their own (fingerprinted by the rows)."""
        import hashlib

        kept = np.asarray(rows, dtype=np.int64)
        digest = hashlib.sha256(kept.tobytes()).hexdigest()[:16]

        def to_ray(rows=None, **read):  # rows of the subset: rows of this source's kept rows
            return self.to_ray(kept if rows is None else kept[np.asarray(rows)], **read)

        return Source(f"{self.name}[{len(kept)} rows]", self.labels[kept], self.class_names,
                      f"{self.fingerprint}/rows-{digest}", to_ray,
                      None if self.domains is None else self.domains[kept], self.domain_names, every_class=False)


ROWS_PER_BLOCK = 64  # images per Ray Data block of an in-memory source: enough blocks to keep a pool busy


def from_table(table):
    """A Ray Dataset of an in-memory Arrow table, in blocks of `ROWS_PER_BLOCK` rows (zero-copy slices), so
    the decode tasks and encoder actors downstream get work in parallel instead of one block for all."""
    import ray.data

    step = ROWS_PER_BLOCK
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])


def decode_image(data: Any, key: str):
    """Encoded bytes (or a Hugging Face style {'bytes': ...} struct) -> RGB PIL image; UserError if corrupt."""
    from PIL import Image

    if isinstance(data, dict):
        data = data.get("bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise UserError(f"data.dataset: image {key} is empty or not encoded image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode fully now: a truncated file fails here, not later
        return img.convert("RGB")
    except Image.DecompressionBombError:  # PIL's guard against a small file that decodes to gigabytes
        raise UserError(f"data.dataset: image {key} has more pixels than PIL's decompression-bomb limit "
                        f"({2 * Image.MAX_IMAGE_PIXELS:,}); it may be malicious, or resize it") from None
    except Exception as err:  # noqa: BLE001 (a malformed file makes PIL's decoders raise anything:
        # UnidentifiedImageError, OSError, ValueError, SyntaxError, and TypeError, IndexError or struct.error
        # from a corrupt TIFF tag, found by the fuzz test)
        raise UserError(f"data.dataset: cannot decode image {key}: {str(err) or type(err).__name__}") from None


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
