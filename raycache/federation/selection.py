"""Model selection over rounds, as plain bookkeeping: validation selects, test only reports.

Every evaluated round (round 0 is the initial state) is offered with its metrics and the bytes it moved.
`best_round` is the round with the highest `val_accuracy` (the earliest on ties); `selected_accuracy` is the
test accuracy at that round. With `federation.target_accuracy`, the first round whose validation accuracy
reaches it gives `rounds_to_target` and `bytes_to_target` (cumulative bytes up + down through that round).
The record is JSON-able, so a checkpoint carries it and a resumed run selects exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Selection:
    target: float | None = None
    best_round: int | None = None
    best_val: float | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_round: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    bytes_total: float = 0.0
    target_round: int | None = None
    target_bytes: float | None = None

    def offer(self, round_idx: int, metrics: dict[str, float], round_bytes: float = 0.0) -> bool:
        """Record an evaluated round; True when it is the new best (the caller keeps its state)."""
        self.bytes_total += round_bytes
        self.last_round, self.last_metrics = round_idx, dict(metrics)
        val = metrics.get("val_accuracy")
        if val is None:
            return False
        if self.target is not None and self.target_round is None and val >= self.target:
            self.target_round, self.target_bytes = round_idx, self.bytes_total
        if self.best_val is None or val > self.best_val:  # strictly better: the earliest round wins ties
            self.best_round, self.best_val, self.best_metrics = round_idx, val, dict(metrics)
            return True
        return False

    def picks_best(self, selection: str) -> bool:
        """Whether the run's result is the best validation round (`best_val`, once a round had validation
        accuracy) rather than the last one."""
        return selection == "best_val" and self.best_round is not None

    def result_round(self, selection: str) -> int:
        """The round whose state is the run's result: `best_val` or `final`."""
        return self.best_round if self.picks_best(selection) else self.last_round

    def summary(self, selection: str) -> dict[str, float]:
        """End-of-run metrics: the selection, the result's own metrics (`result_*`) and the target figures."""
        out: dict[str, float] = {}
        if self.best_round is not None:
            out.update({"best_round": self.best_round, "best_val_accuracy": self.best_val,
                        "selected_accuracy": self.best_metrics["accuracy"]})
        chosen = self.best_metrics if self.picks_best(selection) else self.last_metrics
        out["result_round"] = self.result_round(selection)
        out.update({f"result_{k}": v for k, v in chosen.items() if k.endswith("accuracy") or "accuracy_" in k})
        if self.target_round is not None:
            out.update({"rounds_to_target": self.target_round, "bytes_to_target": self.target_bytes})
        return out

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Selection":
        return cls(**data)
