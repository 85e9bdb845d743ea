"""The feature store: encoded features on disk, keyed by a fingerprint of (model weights, dataset, views),
written shard by shard as they arrive and read back whole in the source's order. It is a cache: a missing,
damaged or unwritable store means the features are encoded again, never a failed run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from raycache.data.pil_stage import AUGMENT_STREAM
from raycache.data.sources.base import Source
from raycache.models.clip import ModelSpec

FEATURE_FORMAT = "raw-v2"  # v1 stored unit-normalised rows; raw rows are a different store


def feature_key(spec: ModelSpec, source: Source, views: int = 1, seed: int = 0) -> str:
    aug = "" if views == 1 else f"|views{views}-seed{seed}-{AUGMENT_STREAM}"
    return hashlib.sha256(f"{FEATURE_FORMAT}|{spec.fingerprint()}|{source.fingerprint}{aug}".encode()).hexdigest()[:24]


def has_entry(store: Path, key: str) -> bool:
    """Whether the store holds an entry for `key` (not read: `read_store` may still find it damaged)."""
    return (store / key / INDEX).is_file() or (store / f"{key}.safetensors").is_file()


def read_store(store: Path, key: str, n: int) -> np.ndarray | None:
    """The stored features of `key` as one (n, D) array in the source's order, or None when the store lacks
    them whole (missing, damaged, or another length: the store is a cache, so they are encoded again)."""
    from safetensors.numpy import load_file

    folder, legacy = store / key, store / f"{key}.safetensors"
    try:
        if (folder / INDEX).is_file():
            index = json.loads((folder / INDEX).read_text())
            out = np.empty((index["n"], index["dim"]), np.float32)
            at = 0
            for name, rows in index["shards"]:
                out[at:at + rows] = load_file(str(folder / name))["features"]
                at += rows
            feats = out if at == index["n"] else None
        elif legacy.is_file():  # the single-file store of earlier versions: the same rows
            feats = load_file(str(legacy))["features"]
        else:
            return None
    except Exception:  # noqa: BLE001 (a damaged store, e.g. a full disk: it is a cache, re-encode)
        return None
    if feats is None or feats.shape[0] != n or not np.isfinite(feats).all():
        return None
    return feats


INDEX = "index.json"


class ShardWriter:
    """Writes features as they arrive, one safetensors shard per block, into a temporary folder of this
    writer's own (`raycache.storage.temp_path`) that becomes `<store>/<key>` only when every row is written
    (its `index.json` lists the shards in order); a failed or interrupted encode leaves nothing behind that a
    reader would take for features.

    The store is a cache: when it cannot be written (a full disk, a read-only folder) the writer says so in
    one line on stderr, drops what it wrote and stops writing, and the run goes on with the features it
    holds in memory (they are encoded again next time)."""

    def __init__(self, store: Path, key: str, meta: dict[str, str]) -> None:
        from raycache.storage import temp_path

        self.store, self.path, self.meta = store, store / key, meta
        self.tmp = temp_path(self.path)
        self.shards: list[tuple[str, int]] = []
        self.dim = 0  # feature width, from the first shard written
        self.failed: str | None = None  # why the store could not be written (then nothing more is tried)

    def _fail(self, err: BaseException, where: Path) -> None:
        import shutil
        import sys

        from raycache.storage import cause

        self.failed = f"{where}: {cause(err)}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        print(f"raycache: cannot store features in {where} ({cause(err)}); the run goes on with them in memory "
              f"(they will be encoded again next time)", file=sys.stderr)

    def __enter__(self) -> "ShardWriter":
        from raycache.storage import remove_stale

        try:
            self.store.mkdir(parents=True, exist_ok=True)
            remove_stale(self.store)  # folders of writers that died on this host
            self.tmp.mkdir()
        except OSError as err:
            self._fail(err, self.store)
        return self

    def write(self, feats: np.ndarray) -> None:
        from safetensors.numpy import save_file

        if self.failed is not None:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        try:
            save_file({"features": np.ascontiguousarray(feats)}, str(self.tmp / name), metadata=self.meta)
        except Exception as err:  # noqa: BLE001 (OSError, or safetensors' own error on a full disk)
            self._fail(err, self.tmp / name)
            return
        self.shards.append((name, len(feats)))
        self.dim = feats.shape[1]

    @property
    def stored(self) -> Path | None:
        """Where the features were stored (None when the store could not be written)."""
        return None if self.failed else self.path

    def __exit__(self, kind, err, tb) -> None:
        import shutil

        if kind is not None or self.failed is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        n = sum(rows for _, rows in self.shards)
        try:
            (self.tmp / INDEX).write_text(json.dumps({"n": n, "dim": self.dim, "shards": self.shards, **self.meta}))
            try:
                os.replace(self.tmp, self.path)  # atomic: a reader sees the whole folder or none
            except OSError:  # another run stored the same features meanwhile: theirs are the same rows
                if not (self.path / INDEX).is_file():
                    raise
                shutil.rmtree(self.tmp, ignore_errors=True)
        except OSError as err:
            self._fail(err, self.path)
