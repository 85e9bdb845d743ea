"""Counting a sweep's trials as they end, for the CLI's progress bar.

Tune saves its run config, callbacks included, with the sweep's state (and a resumed sweep restores it), so
the callback holds only a key; the function it reports to lives in this process's `LISTENERS`."""

from __future__ import annotations

from typing import Callable

from ray.tune import Callback

LISTENERS: dict[str, Callable[[int, int], None]] = {}  # key -> on_trial(ended, total)


class TrialCounter(Callback):
    """Reports (trials ended, `total`) to `LISTENERS[key]` each time a trial ends, however it ends. Tune
    creates trials as slots free up and calls this before the ended trial's status changes, so the counter
    counts for itself and the total comes from the sweep's space."""

    def __init__(self, key: str, total: int) -> None:
        self.key, self.total, self.ended = key, total, 0

    def _ended(self, trials) -> None:
        self.ended += 1
        listener = LISTENERS.get(self.key)
        if listener is not None:
            listener(self.ended, max(self.total, self.ended))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trials)
