"""A run's checkpoints and result files, and resuming a run whose driver died.

After every round the full server state is written (atomically, durably) to `<cache_dir>/checkpoints/<run id>/
round-<r>.safetensors` and linked from the run (with the round's metrics, `raycache.round_log`), and older
round files beyond `federation.keep_checkpoints` (and the best validation round's) are deleted; the
selected result goes beside them as `final.safetensors`. `--resume <run id>` continues from the newest
checkpoint file, in the same run, after checking that the config is the run's own.
"""

from __future__ import annotations

from pathlib import Path

from raycache.errors import UserError

CHECKPOINT_TAG = "raycache.checkpoint"
RESULT_TAG = "raycache.result_checkpoint"


def run_folder(cfg, run_id: str) -> Path:
    """Where a run's checkpoints and result file live."""
    return (Path(cfg.runtime.cache_dir) / "checkpoints" / run_id).resolve()


def round_path(cfg, run_id: str, round_idx: int) -> Path:
    return run_folder(cfg, run_id) / f"round-{round_idx:05d}.safetensors"


def rounds_on_disk(folder: Path) -> dict[int, Path]:
    """The round checkpoints in a run's folder, by round."""
    out = {}
    for p in folder.glob("round-*.safetensors"):
        try:
            out[int(p.stem.removeprefix("round-"))] = p
        except ValueError:
            continue
    return out


def prune(folder: Path, keep: int, best_round: int | None) -> list[int]:
    """Delete round checkpoints beyond the newest `keep` and the best validation round's; returns the rounds
    deleted. Called only after the newest is on disk: a resume takes the newest file (`newest_checkpoint`)."""
    from raycache.storage import remove_stale

    rounds = rounds_on_disk(folder)
    kept = set(sorted(rounds)[-keep:]) | ({best_round} if best_round is not None else set())
    gone = []
    for r, p in sorted(rounds.items()):
        if r not in kept:
            try:
                p.unlink(missing_ok=True)
            except OSError as err:  # clean-up only: never a reason to fail the run
                import sys

                print(f"raycache: cannot delete old checkpoint {p} ({err.strerror})", file=sys.stderr)
                continue
            gone.append(r)
    remove_stale(folder)  # a writer that died mid-write left its temporary file
    return gone


LOCK = "driver.lock"


class _NoLock:
    def close(self) -> None:
        pass


def hold_driver(cfg, run_id: str):
    """Mark this process as the live driver of `run_id` (an exclusive lock on `<run folder>/driver.lock`,
    which the operating system drops when the process dies, kill -9 included) and return the open lock
    file; close it to let go. A run another live driver holds is refused: two drivers on one run would
    write one checkpoint and one history."""
    import fcntl
    import os

    from raycache.storage import host_name

    import re
    import sys

    if not re.fullmatch(r"[0-9a-f]{32}", run_id):  # an MLflow run id; never a path
        raise UserError(f"--resume: {run_id!r} is not an MLflow run id (32 hexadecimal characters)")
    folder = run_folder(cfg, run_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / LOCK, "a+")  # noqa: SIM115 (held for the run's life)
    except OSError:  # an unwritable cache folder: the run's first checkpoint will say so, in one line
        return _NoLock()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise UserError(f"--resume: run {run_id} is still being run by a live driver ({who}); stop that "
                        f"process first (a driver that died holds nothing)") from None
    except OSError as err:  # a filesystem without locks (ENOLCK, ENOSYS): the run goes on unguarded
        f.close()
        print(f"raycache: cannot lock {folder / LOCK} ({err.strerror}); nothing keeps a second driver off "
              f"this run", file=sys.stderr)
        return _NoLock()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {host_name()}\n")
        f.flush()
    except OSError:  # a full disk: the lock holds without its note
        pass
    return f


def resumable(cfg, run_id: str):
    """The checkpoint to resume `run_id` from, after checking that the run can be resumed with `cfg`."""
    from raycache.federation import checkpoint
    from raycache.tracking import logged_run

    old = logged_run(run_id)
    if old is None:
        from raycache.tracking import masked, tracking_uri

        raise UserError(f"--resume: no MLflow run {run_id!r} in {masked(tracking_uri())}")
    if old.status == "FINISHED":
        raise UserError(f"--resume: run {run_id} already finished")
    for key, value in cfg.flat().items():  # the same experiment, or the result would be neither run
        logged = old.params.get(key)
        if logged is not None and logged != str(value)[:6000] and not key.startswith("tracking."):
            raise UserError(f"--resume: {key}={value!r} differs from the run's {key}={logged!r}; resume with "
                            f"the run's config")
    path = newest_checkpoint(cfg, run_id, old.tags.get(CHECKPOINT_TAG))
    if path is None:
        raise UserError(f"--resume: run {run_id} has no checkpoint (it stopped before its first round ended, "
                        f"or ran with federation.checkpoint=false)")
    ckpt = checkpoint.load(path)
    if "selection" not in ckpt.snapshot:  # its split had no validation set: resuming would change its data
        raise UserError(f"--resume: run {run_id} predates validation-based selection (its checkpoint has no "
                        f"selection record); start it again")
    return ckpt


def newest_checkpoint(cfg, run_id: str, linked: str | None) -> Path | None:
    """The newest round checkpoint of a run: the newest file in the folder of the one the run links
    (`linked`, its checkpoint tag) or else in its folder under `cfg`. The link is written with the round's
    metrics (`raycache.round_log`), so a driver that died may have left newer files than it names; every
    file there is whole (written atomically)."""
    folder = Path(linked).parent if linked else run_folder(cfg, run_id)
    rounds = rounds_on_disk(folder) if folder.is_dir() else {}
    if rounds:
        return rounds[max(rounds)]
    return Path(linked) if linked else None


def checkpoint_tags(path: Path, round_idx: int) -> dict[str, str]:
    """The tags that link a run to its newest checkpoint."""
    return {CHECKPOINT_TAG: str(path), "raycache.checkpoint_round": str(round_idx)}


def save_round(cfg, run, round_idx: int, snapshot: dict, meta: dict) -> Path:
    """Write this round's checkpoint (atomically and durably), then delete the round checkpoints
    `federation.keep_checkpoints` does not keep. Returns its path (the caller links it from the run)."""
    from raycache.federation import checkpoint

    path = checkpoint.save(round_path(cfg, run.run_id, round_idx), round_idx, snapshot, meta)
    prune(path.parent, cfg.federation.keep_checkpoints, (snapshot.get("selection") or {}).get("best_round"))
    return path


def save_result(cfg, run, result: dict) -> Path:
    """The run's result (the state `federation.selection` chose) as `final.safetensors` beside the round
    checkpoints, linked from the run."""
    from raycache.federation import checkpoint

    path = run_folder(cfg, run.run_id) / "final.safetensors"
    checkpoint.save(path, result["round"], result["snapshot"],
                    {"selection": cfg.federation.selection, "method": cfg.method.name, "seed": cfg.seed})
    run.set_tags({RESULT_TAG: str(path), "raycache.selection": cfg.federation.selection,
                  "raycache.result_round": result["round"]})
    return path


def log_checkpointed_rounds(run, ckpt) -> None:
    """Log the rounds the checkpoint carries that its driver died before logging (`unlogged`; a checkpoint
    of earlier versions carries its own round's, `last`), and link the run to it: each round is in the
    run's history exactly once."""
    import time

    from raycache.tracking import history

    rounds = [tuple(u) for u in ckpt.meta.get("unlogged") or []]
    if not rounds and ckpt.meta.get("last"):
        rounds = [(ckpt.round, int(time.time() * 1000), ckpt.meta["last"])]
    keys = {k for _, _, metrics in rounds for k in metrics}
    logged = {k: {step for step, _ in history(run.run_id, k)} for k in keys}  # per key: a write cut short
    missing = [(r, ts, {k: v for k, v in metrics.items() if r not in logged[k]}) for r, ts, metrics in rounds]
    run.log_rounds([m for m in missing if m[2]], checkpoint_tags(ckpt.path, ckpt.round))
