"""A Parquet file (or a folder of them) with an image-bytes column and a label column.

Labels may be integers (class names from an optional `class_name` column, else the numbers) or strings
(classes in sorted order). This is also the format `raycache synth` writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from raycache.data.sources.base import Source, from_table
from raycache.errors import UserError


def _files(root: Path) -> list[str]:
    if root.is_dir() and (root / "_PLAN.json").is_file() and not (root / "_COMPLETE.json").is_file():
        raise UserError(f"data.dataset: {root} is an unfinished synthetic set; rerun `raycache synth` to "
                        f"complete it")
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if not files:
        raise UserError(f"data.dataset: {root} holds no .parquet files")
    return [str(f.resolve()) for f in files]


def load(cfg) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _files(Path(cfg.dataset))
    h = hashlib.sha256()
    tables = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"data.dataset: {f} is not a readable Parquet file ({err})") from None
        for col in (cfg.image_column, cfg.label_column):
            if col not in schema.names:
                raise UserError(f"data.dataset: {f} has no column {col!r} (columns: {', '.join(schema.names)}); "
                                f"set data.image_column / data.label_column")
        with_domains = cfg.partition == "domain" or cfg.test_domain is not None
        if with_domains and cfg.domain_column not in schema.names:
            raise UserError(f"data.dataset: {f} has no column {cfg.domain_column!r} for data.partition: domain "
                            f"(columns: {', '.join(schema.names)}); set data.domain_column")
        cols = [cfg.label_column] + (["class_name"] if "class_name" in schema.names else [])
        cols += [cfg.domain_column] if with_domains else []
        try:
            tables.append(pq.read_table(f, columns=cols))
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"data.dataset: {f} is corrupt or truncated ({err})") from None
        st = Path(f).stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{cfg.image_column}|{cfg.label_column}\n".encode())
    table = pa.concat_tables(tables, promote_options="default")
    raw = table.column(cfg.label_column).to_numpy(zero_copy_only=False)
    if raw.dtype.kind in "iu":
        labels = raw.astype(np.int64)
        n = int(labels.max()) + 1 if len(labels) else 0
        names = [str(i) for i in range(n)]
        if "class_name" in table.column_names:
            for lab, name in zip(labels, table.column("class_name").to_pylist()):
                names[lab] = str(name)
        if len(labels) and labels.min() < 0:
            raise UserError(f"data.dataset: {files[0]} has negative labels in column {cfg.label_column!r}")
    elif raw.dtype.kind in "OUS":
        names, labels = np.unique(raw.astype(str), return_inverse=True)
        names, labels = [str(x) for x in names], labels.astype(np.int64)
    else:
        raise UserError(f"data.dataset: column {cfg.label_column!r} must hold ints or class names, "
                        f"not {raw.dtype}")
    domains = domain_names = None
    if cfg.partition == "domain" or cfg.test_domain is not None:
        names_, inverse = np.unique(np.asarray(table.column(cfg.domain_column).to_pylist(), dtype=str),
                                    return_inverse=True)
        domain_names, domains = [str(x) for x in names_], inverse.astype(np.int64)
    image_column = cfg.image_column

    def to_ray(rows=None):
        import ray.data

        if rows is not None:  # a few rows (e.g. cache images): read the column here, take them
            import pyarrow as pa
            import pyarrow.parquet as pq

            parts = [pq.read_table(f, columns=[image_column]) for f in files]
            keys = [f"{f}[{i}]" for f, t in zip(files, parts) for i in range(t.num_rows)]
            picked = pa.concat_tables(parts).take(rows)
            return from_table(pa.table({"image": picked.column(image_column), "key": [keys[i] for i in rows]}))
        ds = ray.data.read_parquet(files, columns=[image_column], include_paths=True)
        return ds.rename_columns({image_column: "image", "path": "key"})

    return Source(str(cfg.dataset), labels, names, f"parquet-{h.hexdigest()[:16]}", to_ray, domains, domain_names)
