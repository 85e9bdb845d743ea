"""The driver's rounds: each round run on the federation, snapshotted, told to the caller and written (its
checkpoint, then its metrics); by default the next round starts before this one is written and runs
while it is.

`run_rounds` owns the order of those steps:
- the server's snapshot is taken before the next round can change it, and a round's checkpoint is written
  before its metrics (`write_round`): what makes a run exact after a crash at any point;
- no round starts before the caller's callback returns, so a caller that stops the run inside it (a sweep's
  scheduler) wastes no round;
- a caller told of each round after it is written (a sweep's trial: Tune reads its rounds from MLflow) gets
  the round written before the callback; otherwise it is written after the next round has started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from raycache.errors import StopRun

RoundCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Rounds:
    """What the rounds left: the metrics of every round run here (a resumed run's earlier rounds are not in
    `history`), the last round's, the bytes moved so far (a resumed run's earlier rounds included), the
    audited client messages, and why the run stopped early (None: it did not)."""

    totals: dict[str, float]
    last: dict[str, float] | None
    history: list[dict[str, float]] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    stopped_by: str | None = None


def run_rounds(cfg, fed, log, first: int, done: Rounds, initial: dict[str, float],
               on_round: RoundCallback | None = None, audit: bool = False,
               callback_after_write: bool = False) -> Rounds:
    """Rounds `first`..`federation.rounds` of `fed`, each written to `log` (a `RoundLog`) and, when the run
    checkpoints, to a checkpoint; `done` holds what earlier rounds left (a resumed run's totals and last
    round) and is returned, completed. A callback that raises `StopRun` ends the run after its round, which
    is still written."""
    for r in range(first, cfg.federation.rounds + 1):
        metrics = fed.run_round(r)
        done.history.append(metrics)
        done.totals["up"] += metrics["comm_bytes_up"]
        done.totals["down"] += metrics["comm_bytes_down"]
        done.last = metrics
        snap = fed.snapshot() if cfg.federation.checkpoint else None  # before the next round changes it
        if audit:
            done.messages += [{**m, "round": r} for m in fed.audit_log()]
        meta = {**done.totals, "last": metrics, "seed": cfg.seed, "method": cfg.method.name, "initial": initial}
        if callback_after_write:
            write_round(cfg, log, fed, r, metrics, snap, meta)
        if on_round:  # before the next round starts: a scheduler that stops this trial wastes no round
            try:
                on_round(r, metrics)
            except StopRun as stop:  # e.g. a sweep's scheduler stopped this trial: end cleanly
                done.stopped_by = stop.reason
        if done.stopped_by is None and r < cfg.federation.rounds:
            fed.submit_round(r + 1)  # it runs while this round is written
        if not callback_after_write:
            write_round(cfg, log, fed, r, metrics, snap, meta)
        snap = None  # the snapshot's arrays go now, not after the next round
        if done.stopped_by is not None:
            break
    return done


def write_round(cfg, log, fed, round_idx: int, metrics: dict[str, float], snap: dict | None, meta: dict) -> None:
    """Round `round_idx`'s checkpoint (`snap`, when the run checkpoints), holding the rounds not yet logged,
    then its metrics and the checkpoint's link to the `RoundLog`, which writes them when due: a driver that
    dies before they are written resumes from this checkpoint and logs them from it
    (`log_checkpointed_rounds`); logged first, a death before the checkpoint would log the round again when
    it is redone."""
    from raycache.resume import checkpoint_tags, save_round

    entry, tags = log.stamp(round_idx, metrics), None
    try:
        if snap is not None:
            path = save_round(cfg, log.run, round_idx, snap, {**meta, "unlogged": log.unlogged(entry)})
            fed.saved(path, round_idx)
            tags = checkpoint_tags(path, round_idx)
    finally:  # a round whose checkpoint failed (a full disk) still has its metrics logged, unlinked
        log.add(entry, tags)
