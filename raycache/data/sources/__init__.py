"""Data sources: a built-in name, or a path whose kind picks the reader. One line registers a source."""

from __future__ import annotations

from pathlib import Path

from raycache.data.sources import digits, imagefolder, parquet
from raycache.data.sources.base import Source
from raycache.errors import UserError

BUILTINS = {"digits": digits.load}


def open_source(cfg) -> Source:
    """`cfg` is the `data` config section."""
    if cfg.dataset in BUILTINS:
        return BUILTINS[cfg.dataset](cfg)
    path = Path(cfg.dataset)
    if not path.exists():
        raise UserError(f"data.dataset: {cfg.dataset!r} not found (expected {', '.join(BUILTINS)}, "
                        f"an ImageFolder directory or a .parquet file)")
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return parquet.load(cfg)
    if path.is_dir():
        return imagefolder.load(cfg)
    raise UserError(f"data.dataset: {cfg.dataset} is neither a directory nor a .parquet file")
