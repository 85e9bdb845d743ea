"""Data sources: a built-in name, or a path whose kind picks the reader. One line registers a source."""

from __future__ import annotations

from pathlib import Path

from raycache.data.sources import digits, huggingface, idx, imagefolder, parquet, split_file
from raycache.data.sources.base import Source
from raycache.errors import UserError

BUILTINS = {"digits": digits.load, "fashion_mnist": idx.fashion_mnist}


def open_source(cfg) -> Source:
    """`cfg` is the `data` config section. Class names come out as prompts want them (`class_names`)."""
    import dataclasses

    source = _open(cfg)
    names = class_names(source.class_names, getattr(cfg, "class_names", None))
    return source if names == source.class_names else dataclasses.replace(source, class_names=names)


def class_names(raw: list[str], spec: str | dict[str, str] | None) -> list[str]:
    """The names prompts use: `spec` as a file (one name per line in label order, or CoOp's "<dataset name>
    <name>" lines, e.g. ImageNet's "n01440764 tench") or a mapping from the dataset's names; otherwise, and for
    names the mapping leaves out, underscores become spaces."""
    if isinstance(spec, str):
        path = Path(spec)
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"data.class_names: cannot read {spec} ({getattr(err, 'strerror', None) or err})") from None
        keyed = dict(ln.split(maxsplit=1) for ln in lines if len(ln.split(maxsplit=1)) == 2)
        if len(keyed) == len(lines) and set(keyed) == set(raw):  # CoOp's ImageNet classnames.txt: "<folder> <name>"
            names = [keyed[n] for n in raw]
        elif len(lines) != len(raw):
            raise UserError(f"data.class_names: {spec} has {len(lines)} names, the dataset has {len(raw)} classes")
        else:
            names = lines
    else:
        mapping = spec or {}
        unknown = sorted(set(mapping) - set(raw))
        if unknown:
            raise UserError(f"data.class_names: {unknown[0]!r} is not a class of the dataset")
        names = [mapping.get(n, n.replace("_", " ")) for n in raw]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"data.class_names: two classes would both be called {dupes[0]!r}")
    return names


def _open(cfg) -> Source:
    if getattr(cfg, "split_file", None):
        if not Path(cfg.dataset).is_dir():
            raise UserError(f"data.dataset: {cfg.dataset!r} not found (with data.split_file it is the folder of "
                            f"images the split's paths are relative to)")
        return split_file.load(cfg)
    if cfg.dataset in BUILTINS:
        return BUILTINS[cfg.dataset](cfg)
    if cfg.dataset.startswith(huggingface.PREFIX) or huggingface.is_saved(Path(cfg.dataset)):
        return huggingface.load(cfg)
    path = Path(cfg.dataset)
    if not path.exists():
        raise UserError(f"data.dataset: {cfg.dataset!r} not found (expected {', '.join(BUILTINS)}, "
                        f"an ImageFolder directory, a folder of idx files or a .parquet file)")
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return parquet.load(cfg)
    if idx.is_idx_folder(path):
        return idx.load(cfg)
    if path.is_dir():
        return imagefolder.load(cfg)
    raise UserError(f"data.dataset: {cfg.dataset} is neither a directory nor a .parquet file")
