"""A run's checkpoints and result files, and resuming a run whose driver died.

After every round the full server state is written (atomically) to `<cache_dir>/checkpoints/<run id>/
latest.safetensors` and linked from the run; the selected result goes beside it as `final.safetensors`.
`--resume <run id>` continues from the latest checkpoint, in the same run, after checking that the config is
the run's own.
"""

from __future__ import annotations

from pathlib import Path

from raycache.errors import UserError

CHECKPOINT_TAG = "raycache.checkpoint"
RESULT_TAG = "raycache.result_checkpoint"


def checkpoint_path(cfg, run_id: str) -> Path:
    return (Path(cfg.runtime.cache_dir) / "checkpoints" / run_id / "latest.safetensors").resolve()


def resumable(cfg, run_id: str):
    """The checkpoint to resume `run_id` from, after checking that the run can be resumed with `cfg`."""
    from raycache.federation import checkpoint
    from raycache.tracking import logged_run

    old = logged_run(run_id)
    if old is None:
        from raycache.tracking import tracking_uri

        raise UserError(f"--resume: no MLflow run {run_id!r} in {tracking_uri()}")
    if old.status == "FINISHED":
        raise UserError(f"--resume: run {run_id} already finished")
    for key, value in cfg.flat().items():  # the same experiment, or the result would be neither run
        logged = old.params.get(key)
        if logged is not None and logged != str(value)[:6000] and not key.startswith("tracking."):
            raise UserError(f"--resume: {key}={value!r} differs from the run's {key}={logged!r}; resume with "
                            f"the run's config")
    path = old.tags.get(CHECKPOINT_TAG)
    if path is None:
        raise UserError(f"--resume: run {run_id} has no checkpoint (it stopped before its first round ended, "
                        f"or ran with federation.checkpoint=false)")
    ckpt = checkpoint.load(Path(path))
    if "selection" not in ckpt.snapshot:  # its split had no validation set: resuming would change its data
        raise UserError(f"--resume: run {run_id} predates validation-based selection (its checkpoint has no "
                        f"selection record); start it again")
    return ckpt


def save_round(cfg, run, round_idx: int, snapshot: dict, meta: dict) -> None:
    """Write this round's checkpoint (atomically, replacing the last) and link it from the run."""
    from raycache.federation import checkpoint

    path = checkpoint.save(checkpoint_path(cfg, run.run_id), round_idx, snapshot, meta)
    run.set_tags({CHECKPOINT_TAG: str(path), "raycache.checkpoint_round": round_idx})


def save_result(cfg, run, result: dict) -> None:
    """The run's result (the state `federation.selection` chose) as `final.safetensors` beside the round
    checkpoints, linked from the run."""
    from raycache.federation import checkpoint

    path = checkpoint_path(cfg, run.run_id).with_name("final.safetensors")
    checkpoint.save(path, result["round"], result["snapshot"],
                    {"selection": cfg.federation.selection, "method": cfg.method.name, "seed": cfg.seed})
    run.set_tags({RESULT_TAG: str(path), "raycache.selection": cfg.federation.selection,
                  "raycache.result_round": result["round"]})
