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


def _is_text(typ) -> bool:
    import pyarrow as pa

    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or \
        getattr(pa.types, "is_string_view", lambda t: False)(typ)


def _checked_labels(table, path: str, column: str, first_path: str, first):
    """`table`'s label column as int64 or string, the same kind as the first file's: a label column must hold
    integers or class names, have no nulls, and be of one kind in every file of a folder."""
    import pyarrow as pa

    col = table.column(column)
    if pa.types.is_dictionary(col.type):  # e.g. a pandas categorical: its values are the labels
        col = col.cast(col.type.value_type)
    kind = "int" if pa.types.is_integer(col.type) else "str" if _is_text(col.type) else None
    if kind is None:
        raise UserError(f"data.dataset: column {column!r} of {path} must hold ints or class names, not {col.type}")
    if col.null_count:
        raise UserError(f"data.dataset: column {column!r} of {path} has {col.null_count} empty (null) labels")
    if first is not None:
        first_kind = "int" if pa.types.is_integer(first.column(column).type) else "str"
        if kind != first_kind:
            raise UserError(f"data.dataset: column {column!r} holds {col.type} in {path} but "
                            f"{first.column(column).type} in {first_path}; one folder's files must agree")
    if "class_name" in table.column_names:
        names = table.column("class_name")
        if names.null_count:
            raise UserError(f"data.dataset: column 'class_name' of {path} has empty (null) values")
        if pa.types.is_dictionary(names.type):
            names = names.cast(names.type.value_type)
        try:  # one type in every file (string, large_string, a categorical, numbers: all become strings)
            table = table.set_column(table.column_names.index("class_name"), "class_name", names.cast(pa.string()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise UserError(f"data.dataset: column 'class_name' of {path} must hold names, not {names.type}") \
                from None
    try:
        col = col.cast(pa.int64() if kind == "int" else pa.string())
    except pa.ArrowInvalid:  # uint64 beyond int64
        raise UserError(f"data.dataset: column {column!r} of {path} has labels too large for int64") from None
    return table.set_column(table.column_names.index(column), column, col)


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
            table = pq.read_table(f, columns=cols)
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"data.dataset: {f} is corrupt or truncated ({err})") from None
        if tables and ("class_name" in table.column_names) != ("class_name" in tables[0].column_names):
            has, lacks = (f, files[0]) if "class_name" in table.column_names else (files[0], f)
            raise UserError(f"data.dataset: {has} has a 'class_name' column and {lacks} has none; one folder's "
                            f"files must agree")
        table = _checked_labels(table, f, cfg.label_column, files[0], tables[0] if tables else None)
        if with_domains:
            dom = table.column(cfg.domain_column)
            if dom.null_count:
                raise UserError(f"data.dataset: column {cfg.domain_column!r} of {f} has {dom.null_count} empty "
                                f"(null) domains")
            table = table.set_column(table.column_names.index(cfg.domain_column), cfg.domain_column,
                                     dom.cast(pa.string()))
        tables.append(table)
        st = Path(f).stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{cfg.image_column}|{cfg.label_column}\n".encode())
    table = pa.concat_tables(tables, promote_options="default")
    raw = table.column(cfg.label_column).to_numpy(zero_copy_only=False)
    if raw.dtype.kind in "iu":
        labels = raw.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise UserError(f"data.dataset: {files[0]} has negative labels in column {cfg.label_column!r}")
        n = int(labels.max()) + 1 if len(labels) else 0
        if n > len(labels):  # a class index, not an id: 10**9 would otherwise name 10**9 classes
            raise UserError(f"data.dataset: column {cfg.label_column!r} has labels up to {n - 1} in {len(labels)} "
                            f"rows; integer labels are class indices 0..C-1 (or use class names)")
        names = [str(i) for i in range(n)]
        if "class_name" in table.column_names:
            named: dict[int, str] = {}
            for lab, name in zip(labels.tolist(), table.column("class_name").to_pylist()):
                if named.setdefault(lab, str(name)) != str(name):
                    raise UserError(f"data.dataset: label {lab} has two class names in column 'class_name' "
                                    f"({named[lab]!r} and {str(name)!r}) in {cfg.dataset}")
                names[lab] = str(name)
            from collections import Counter

            dupes = sorted(x for x, k in Counter(names).items() if k > 1)
            if dupes:
                raise UserError(f"data.dataset: class name {dupes[0]!r} is given to two labels in column "
                                f"'class_name' of {cfg.dataset}")
    else:  # strings (checked per file above)
        names, labels = np.unique(raw.astype(str), return_inverse=True)
        names, labels = [str(x) for x in names], labels.astype(np.int64)
    domains = domain_names = None
    if cfg.partition == "domain" or cfg.test_domain is not None:
        names_, inverse = np.unique(np.asarray(table.column(cfg.domain_column).to_pylist(), dtype=str),
                                    return_inverse=True)
        domain_names, domains = [str(x) for x in names_], inverse.astype(np.int64)
    image_column = cfg.image_column

    def to_ray(rows=None, **read_args):  # noqa: ARG001 (read_args: see below)
        import ray.data

        if rows is not None:  # a few rows (e.g. cache images): read the column here, take them
            import pyarrow as pa
            import pyarrow.parquet as pq

            parts = [pq.read_table(f, columns=[image_column]) for f in files]
            keys = [f"{f}[{i}]" for f, t in zip(files, parts) for i in range(t.num_rows)]
            picked = pa.concat_tables(parts).take(rows)
            return from_table(pa.table({"image": picked.column(image_column), "key": [keys[i] for i in rows]}))
        # The read is not fused into the decode stage (read_args are not passed on): a few large files make
        # a few read tasks, and a decode stage of its own decodes their blocks on all the CPUs.
        ds = ray.data.read_parquet(files, columns=[image_column], include_paths=True)
        return ds.rename_columns({image_column: "image", "path": "key"})

    return Source(str(cfg.dataset), labels, names, f"parquet-{h.hexdigest()[:16]}", to_ray, domains, domain_names)
