"""Inputs beyond the experiment config, fuzzed: sweep files, Parquet label schemas and image bytes. Whatever
they hold, raycache either accepts them with a meaning it can state, or refuses them with one `UserError`
line naming the file or key; never another exception from inside a library."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from raycache.config import DataConfig
from raycache.data.sources import open_source
from raycache.data.sources.base import decode_image, png_bytes
from raycache.errors import UserError
from raycache.sweep.space import SEARCH_TYPES, SweepConfig, load_sweep

ROOT = Path(__file__).resolve().parents[1]


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["cachefl", "val_accuracy", "asha", "fifo", "max", "../x"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=2)),
                      max_leaves=5)
config_keys = st.sampled_from(["data.alpha", "data.clients", "method.lr", "method.name", "seed", "model.templates",
                               "federation.rounds", "data.val_fraction", "nope.key", "data"])
spaces = st.dictionaries(config_keys, st.one_of(
    st.dictionaries(st.sampled_from([*SEARCH_TYPES, "grid ", "other"]), st.lists(scalars, max_size=3), max_size=2),
    values), max_size=3)


def refused_in_one_line(err: UserError) -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text, text


@fuzz(150)
@given(fields=st.dictionaries(st.sampled_from([*SweepConfig.model_fields, "extra"]), values, max_size=5),
       space=st.one_of(spaces, values), overrides=st.lists(st.sampled_from(
           ["data.alpha=0.3", "data.alpha=-1", "method.lr=x", "bad", "=1", "federation.rounds=1"]), max_size=2))
def test_random_sweep_files(tmp_path, fields, space, overrides):
    body = {"name": "s", "base": str(ROOT / "experiments/tiny.yaml"), **fields, "space": space}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    try:
        sweep, tree = load_sweep(path, overrides)
    except UserError as err:
        refused_in_one_line(err)
        event("refused")
        return
    event("accepted")
    assert sweep.space and isinstance(tree, dict)  # accepted: a sweep with a space over a valid base


LABEL_TYPES = {"int8": pa.int8(), "int32": pa.int32(), "int64": pa.int64(), "uint16": pa.uint16(),
               "uint64": pa.uint64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string(),
               "large_string": pa.large_string(), "dictionary": pa.dictionary(pa.int8(), pa.string())}
label_values = st.one_of(st.none(), st.integers(-2, 6), st.sampled_from(["cat", "dog", "owl", "", "None"]),
                         st.just(2**63 + 5))


def _label_array(kind: str, raw: list):
    typ = LABEL_TYPES[kind]
    if kind == "dictionary":
        return pa.array([None if v is None else str(v) for v in raw], pa.string()).dictionary_encode()
    if kind == "bool":
        return pa.array([None if v is None else bool(v) for v in raw], typ)
    conv = (lambda v: str(v)) if "string" in kind else (lambda v: float(v)) if kind == "float" else int
    try:
        return pa.array([None if v is None else conv(v) for v in raw], typ)
    except (ValueError, OverflowError, pa.ArrowInvalid):
        return None


@fuzz(80)
@given(files=st.lists(st.tuples(st.sampled_from(sorted(LABEL_TYPES)), st.lists(label_values, min_size=1, max_size=6),
                                st.booleans()), min_size=1, max_size=3))
def test_random_parquet_label_schemas(tmp_path, files):
    """Accepted: every row gets an int64 label in [0, classes), the same name for the same raw label
    wherever it appears, and every class has a row. Refused: one line."""
    folder = tmp_path / "pq"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    raws = []
    for i, (kind, raw, with_names) in enumerate(files):
        labels = _label_array(kind, raw)
        if labels is None:
            return
        cols = {"image": [png_bytes(np.zeros((2, 2), np.uint8))] * len(raw), "label": labels}
        if with_names:
            cols["class_name"] = [f"c{v}" for v in raw]
        pq.write_table(pa.table(cols), folder / f"{i}.parquet")
        raws += raw
    try:
        src = open_source(DataConfig(dataset=str(folder)))
    except UserError as err:
        refused_in_one_line(err)
        event("refused")
        return
    event("accepted")
    assert src.labels.dtype == np.int64 and len(src.labels) == len(raws)
    assert src.labels.min() >= 0 and src.labels.max() < len(src.class_names)
    assert np.bincount(src.labels, minlength=len(src.class_names)).min() > 0
    assert None not in raws  # a null label is refused, never a class named "None"
    assert "None" not in src.class_names or "None" in raws
    by_raw: dict = {}
    for raw, lab in zip(raws, src.labels.tolist()):
        assert by_raw.setdefault(str(raw), lab) == lab  # one raw label, one class


def _encoded(kind: str) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    buf = io.BytesIO()
    img.save(buf, format=kind)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_mutated_image_files(kind):
    """Truncated, bit-flipped and spliced files of each format decode to an RGB image or are named."""
    good = _encoded(kind)

    @fuzz(120)
    @given(st.data())
    def check(data):
        raw = bytearray(good)
        how = data.draw(st.sampled_from(["cut", "flip", "splice", "random"]))
        if how == "cut":
            raw = raw[:data.draw(st.integers(0, len(raw)))]
        elif how == "flip":
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "splice":
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = data.draw(st.binary(max_size=32))
        else:
            raw = bytearray(data.draw(st.binary(max_size=64)))
        try:
            img = decode_image(bytes(raw), "x.img")
        except UserError as err:
            refused_in_one_line(err)
            assert "x.img" in str(err)
            return
        assert img.mode == "RGB" and min(img.size) >= 1

    check()


def test_a_tiff_whose_tag_the_fuzz_corrupted_is_named():
    """The case the fuzz test found: one flipped bit in a TIFF's tag area made PIL raise TypeError (a
    rational where an integer belongs), which escaped as a traceback."""
    raw = bytearray(_encoded("TIFF"))
    raw[72] ^= 1
    with pytest.raises(UserError, match="cannot decode image x.tif"):
        decode_image(bytes(raw), "x.tif")
