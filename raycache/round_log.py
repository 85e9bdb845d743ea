"""A run's rounds on their way to MLflow: written together, at most once every `tracking.flush_seconds`.

Each MLflow write costs the driver about 16 ms of CPU on a sqlite store (SQLAlchemy's unit of work per call,
the round's metrics and its checkpoint's two tags; benchmarks/README.md), CPU that a short round takes
from the client actors. So a round's metrics and the link to its checkpoint wait until `every` seconds have
passed since the last write, then go in one batch; the first round goes at once. Nothing waits that a
crash could lose:
- every round's checkpoint file is written at once and carries the rounds still waiting (`unlogged`), and
  a resume logs those the run lacks (`raycache.resume.log_checkpointed_rounds`) and continues from the
  newest checkpoint file, linked or not;
- an exception writes what waits before the run is ended (`close`, on leaving a `with RoundLog(...)`).
With `every` 0 each round is written as it ends: a sweep's trials (Tune reads their rounds from MLflow) and a
run without checkpoints (nothing else would hold a waiting round). A round waits at most `every` plus the
next round (what is due is written when a round ends).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from raycache.tracking import MAX_BATCH_METRICS


class RoundLog:
    def __init__(self, run, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.every, self.clock = run, every, clock
        self.waiting: list[tuple[int, int, dict[str, float]]] = []  # (round, timestamp in ms, metrics)
        self.tags: dict[str, str] = {}
        self.written: float | None = None  # when the last write was (None: nothing written yet)

    def stamp(self, round_idx: int, metrics: dict[str, float]) -> tuple[int, int, dict[str, float]]:
        """Round `round_idx`'s entry, stamped with the time it ended: the same in its checkpoint and in MLflow
        (a resume that logs it again from the checkpoint would add nothing MLflow lacks)."""
        return round_idx, _now_ms(), dict(metrics)

    def unlogged(self, entry: tuple[int, int, dict[str, float]]) -> list[list]:
        """What the checkpoint of `entry`'s round carries: the rounds waiting, then this one (JSON lists)."""
        return [list(e) for e in (*self.waiting, entry)]

    def add(self, entry: tuple[int, int, dict[str, float]], tags: dict[str, str] | None = None) -> None:
        """A round ended (`entry`, from `stamp`; `tags`: its checkpoint's link): written now if due."""
        self.waiting.append(entry)
        self.tags.update(tags or {})
        due = self.written is None or self.clock() - self.written >= self.every
        if due or sum(len(m) for _, _, m in self.waiting) >= MAX_BATCH_METRICS:
            self.flush()

    def flush(self) -> None:
        """Write every round waiting, and the newest checkpoint's tags, in one batch."""
        if self.waiting or self.tags:
            self.run.log_rounds(self.waiting, self.tags)
        self.waiting, self.tags = [], {}
        self.written = self.clock()

    def __enter__(self) -> "RoundLog":
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        """Write what waits. While `error` ends the run, a failing write is said in one line, not raised
        over it (the rounds are in their checkpoints)."""
        if error is None:
            self.flush()
            return
        try:
            self.flush()
        except Exception as err:  # noqa: BLE001 (the store may be what failed)
            print(f"raycache: could not log rounds {[r for r, _, _ in self.waiting]} to MLflow "
                  f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); a resume logs "
                  f"them from their checkpoints", file=sys.stderr)


def _now_ms() -> int:
    return int(time.time() * 1000)
