"""Unsafe input: weights and checkpoints load only through safe loaders; damaged files are named; servers the
project starts bind to loopback unless told otherwise."""

import re
from pathlib import Path

import numpy as np
import pytest

from raycache.errors import UserError
from raycache.federation import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "raycache").rglob("*.py"))


def test_no_unpickling_loader_in_the_package():
    """torch.load only with weights_only=True; no pickle/joblib/cloudpickle loads; no allow_pickle."""
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        for start in (m.end() for m in re.finditer(r"torch\.load\(", text)):
            depth, end = 1, start
            while depth:  # the call's whole argument list, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            if "weights_only=True" not in text[start:end]:
                offenders.append(f"{path.name}: torch.load({text[start:end]}")
        for pattern in (r"\bpickle\.loads?\(", r"\bjoblib\.load\(", r"cloudpickle\.loads?\(", r"allow_pickle\s*=\s*True",
                        r"weights_only\s*=\s*False"):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_checkpoints_round_trip_and_a_pickle_is_refused(tmp_path):
    import torch

    snap = {"state": {"keys": np.arange(6, dtype=np.float32).reshape(2, 3)}, "reached": np.array([True, False]),
            "clients": {3: {"keys": np.ones((2, 3), np.float32)}}}
    path = checkpoint.save(tmp_path / "c" / "latest.safetensors", 4, snap, {"up": 1.0})
    assert [p.name for p in path.parent.iterdir()] == ["latest.safetensors"]  # no temp file left behind
    back = checkpoint.load(path)
    assert back.round == 4 and back.meta == {"up": 1.0}
    assert np.array_equal(back.snapshot["state"]["keys"], snap["state"]["keys"])
    assert back.snapshot["reached"].tolist() == [True, False] and 3 in back.snapshot["clients"]
    assert "selection" not in back.snapshot  # an old-style checkpoint: resume refuses it (no selection record)
    # the selection record and the best round's state (a local method's per-client states and who held
    # the initial state then) round-trip too
    best = {"state": {"keys": np.full((2, 3), 7, np.float32)}, "clients": {5: {"keys": np.zeros((2, 3), np.float32)}},
            "reached": np.array([False, False])}
    record = {"target": 0.5, "best_round": 2, "best_val": 0.75}
    back = checkpoint.load(checkpoint.save(tmp_path / "c" / "latest.safetensors", 4,
                                           {**snap, "best": best, "selection": record}, {"up": 1.0}))
    assert back.snapshot["selection"] == record
    assert np.array_equal(back.snapshot["best"]["state"]["keys"], best["state"]["keys"])
    assert set(back.snapshot["best"]["clients"]) == {5} and back.snapshot["best"]["reached"].tolist() == [False, False]
    assert set(back.snapshot["clients"]) == {3} and back.snapshot["state"]["keys"][0, 1] == 1
    # the clients' private optimiser memories (keys with '/' in them) round-trip per client
    memory = {2: {"exp_avg/fc1.weight": np.ones((2, 2), np.float32), "step/fc1.weight": np.array([3], np.float32)},
              7: {"exp_avg/fc1.weight": np.zeros((2, 2), np.float32)}}
    back = checkpoint.load(checkpoint.save(tmp_path / "c" / "latest.safetensors", 4, {**snap, "memory": memory}, {}))
    assert set(back.snapshot["memory"]) == {2, 7} and set(back.snapshot["memory"][2]) == set(memory[2])
    assert back.snapshot["memory"][2]["step/fc1.weight"].tolist() == [3.0]
    server = {"m/cache_keys": np.full((2, 3), 0.5, np.float32), "v/cache_keys": np.ones((2, 3), np.float32)}
    back = checkpoint.load(checkpoint.save(tmp_path / "c" / "latest.safetensors", 4, {**snap, "strategy": server}, {}))
    assert set(back.snapshot["strategy"]) == set(server)  # the server optimiser's moments resume too
    assert np.array_equal(back.snapshot["strategy"]["m/cache_keys"], server["m/cache_keys"])
    evil = tmp_path / "evil.safetensors"
    torch.save({"state": snap["state"]}, evil)  # a pickle: must never be unpickled
    with pytest.raises(UserError, match="evil.safetensors is damaged or not a checkpoint"):
        checkpoint.load(evil)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="cut.safetensors"):
        checkpoint.load(cut)


def test_a_truncated_parquet_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycache.config import DataConfig
    from raycache.data.sources import open_source

    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"image": [b"x" * 100] * 50, "label": list(range(50))}), whole)
    (tmp_path / "half.parquet").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(UserError, match="half.parquet"):
        open_source(DataConfig(dataset=str(tmp_path / "half.parquet")))


def test_the_mlflow_ui_binds_loopback_by_default():
    from raycache.cli import _parser

    assert _parser().parse_args(["ui"]).host == "127.0.0.1"
