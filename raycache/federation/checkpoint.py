"""Round checkpoints: the full server state in one safetensors file, written atomically and durably
(`raycache.storage.write_atomic`: the writer's own temp file, fsync, rename, fsync of the folder), read back
only through safetensors (no pickle, nothing executable).

Layout: tensors `global/<key>` (the global state), `client/<id>/<key>` (a local method's per-client states),
`reached` (which clients already hold the initial state) and the same under `best/` (the state at the best
validation round so far), `memory/<id>/<key>` (each client's private optimiser memory, when kept) and
`strategy/<key>` (the server optimiser's moments: FedAvgM, FedAdam, ...); the metadata holds the round, the seed, the method, running totals and the
selection record as JSON. Sampling, faults and local training draw from (seed, round, client), so
the round number is the whole RNG state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycache.errors import UserError
from raycache.storage import write_atomic

FORMAT = "raycache-checkpoint/1"


@dataclass
class Checkpoint:
    round: int
    snapshot: dict  # {"state": State, "reached": bool array, "clients": {id: State}}
    meta: dict  # seed, method, totals so far
    path: Path | None = None  # the file it was read from


def save(path: Path, round_idx: int, snapshot: dict, meta: dict) -> Path:
    from safetensors.numpy import save_file

    tensors = _tensors(snapshot)
    if "best" in snapshot:
        tensors.update({f"best/{k}": v for k, v in _tensors(snapshot["best"]).items()})
    tensors.update({f"strategy/{k}": np.ascontiguousarray(v) for k, v in snapshot.get("strategy", {}).items()})
    for cid, memory in snapshot.get("memory", {}).items():
        tensors.update({f"memory/{int(cid)}/{k}": np.ascontiguousarray(v) for k, v in memory.items()})
    info = {"format": FORMAT, "round": str(round_idx), "meta": json.dumps(meta)}
    if "selection" in snapshot:
        info["selection"] = json.dumps(snapshot["selection"])
    # A reader sees the previous checkpoint or this one, never half of one; a full disk is one line.
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=info), what="checkpoint")


def _tensors(snap: dict) -> dict[str, np.ndarray]:
    tensors = {f"global/{k}": np.ascontiguousarray(v) for k, v in snap["state"].items()}
    tensors["reached"] = np.asarray(snap["reached"], dtype=np.uint8)
    for cid, state in snap.get("clients", {}).items():
        tensors.update({f"client/{int(cid)}/{k}": np.ascontiguousarray(v) for k, v in state.items()})
    return tensors


def _states(tensors: dict[str, np.ndarray]) -> dict:
    state = {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
    return {"state": state, "clients": _per_client(tensors, "client/"), "reached": tensors["reached"].astype(bool)}


def _per_client(tensors: dict[str, np.ndarray], prefix: str) -> dict[int, dict[str, np.ndarray]]:
    """`<prefix><client id>/<key>` tensors -> {client id: {key: tensor}} (keys may contain '/')."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            cid, key = k[len(prefix):].split("/", 1)
            out.setdefault(int(cid), {})[key] = v
    return out


def _same(a: dict, b: dict) -> bool:
    """Whether two snapshots hold equal states (the global one and the clients' own)."""
    def equal(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)

    return (equal(a["state"], b["state"]) and a["clients"].keys() == b["clients"].keys()
            and all(equal(a["clients"][c], b["clients"][c]) for c in a["clients"]))


def load(path: Path, what: str = "--resume") -> Checkpoint:
    """The checkpoint at `path`; `what` names the option or key a missing or damaged file is reported under."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{what}: checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            info = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 (any failure to parse is a damaged file)
        raise UserError(f"{what}: checkpoint {path} is damaged or not a checkpoint ({type(err).__name__})") from None
    if info.get("format") != FORMAT:
        raise UserError(f"{what}: {path} is not a raycache checkpoint")
    snap = _states(tensors)
    snap["memory"] = _per_client(tensors, "memory/")
    snap["strategy"] = {k.removeprefix("strategy/"): v for k, v in tensors.items() if k.startswith("strategy/")}
    if "selection" in info:
        snap["selection"] = json.loads(info["selection"])
        snap["best"] = _states({k.removeprefix("best/"): v for k, v in tensors.items() if k.startswith("best/")})
        if snap["selection"].get("best_round") == int(info["round"]) and _same(snap["best"], snap):
            # the best round is this one: one copy of its states, as the server held them (not two of a full model)
            snap["best"].update(state=snap["state"], clients=snap["clients"])
    return Checkpoint(int(info["round"]), snap, json.loads(info["meta"]), path)
