"""A contact sheet: one row per class, its first few images, the class name on the left."""

from __future__ import annotations

import io
from pathlib import Path


def contact_sheet(out: Path, classes: list[str], per_row: int = 8, cell: int = 64):
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from raycache.synth.store import shard_name

    label_w = 96
    sheet = Image.new("RGB", (label_w + per_row * cell, len(classes) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for label, name in enumerate(classes):
        path = Path(out) / shard_name(label)
        images = pq.read_table(path, columns=["image"]).column("image").to_pylist()[:per_row]
        draw.text((4, label * cell + cell // 2 - 6), name[:14], fill="black")
        for j, data in enumerate(images):
            tile = Image.open(io.BytesIO(data)).convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_w + j * cell, label * cell))
    return sheet
