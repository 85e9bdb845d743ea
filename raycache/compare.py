"""Compare the methods in one MLflow experiment: a table per method and two plots, logged to a summary run.

Reads the experiment's finished experiment runs (those tagged `raycache.method`). A method's runs are grouped
by setting (every param except the seed and tracking keys); validation picks the setting (highest mean
`result_val_accuracy`), and only that setting's runs (seeds, say) are averaged into the method's row, which
reports their test accuracy at each run's selected round. The plots are test accuracy against round, and
against cumulative bytes sent (log x; methods that send nothing are drawn as a dashed line), for the
selected settings.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from dataclasses import dataclass

from raycache.errors import UserError
from raycache.tracking import Run, RunRecord, history, search


@dataclass
class MethodRow:
    method: str
    runs: int  # runs of the selected setting (averaged)
    settings: int  # settings tried (the lr grid, say)
    lr: float  # the selected setting's learning rate (nan: the method has none)
    val_accuracy: float  # what selected it
    accuracy: float  # test accuracy at each run's selected round
    local_accuracy_mean: float  # clients' own held-out samples (nan without data.client_test_fraction)
    client_accuracy_mean: float
    client_accuracy_std: float
    bytes_total: float
    trainable_params: float
    wall_seconds: float
    run_ids: tuple[str, ...] = ()

    def cells(self) -> list[str]:
        return [self.method, str(self.runs), str(self.settings), f"{self.lr:.3g}", f"{self.val_accuracy:.4f}",
                f"{self.accuracy:.4f}", f"{self.local_accuracy_mean:.4f}", f"{self.client_accuracy_mean:.4f}",
                f"{self.client_accuracy_std:.4f}", f"{self.bytes_total:.0f}", f"{self.trainable_params:.0f}",
                f"{self.wall_seconds:.1f}"]


HEADER = ["method", "runs", "settings", "lr", "val_accuracy", "accuracy", "local_acc_mean", "client_acc_mean",
          "client_acc_std", "bytes_total", "trainable_params", "wall_s"]

# Params that do not change what a run learns: the seed (runs of one setting differ in it), lr_scale (folded
# into method.lr), checkpointing and the target (bookkeeping), and the tracking and runtime sections.
_NOT_A_SETTING = ("seed", "method.lr_scale", "federation.checkpoint", "federation.target_accuracy")


def _param(key: str, value: str) -> str:
    if key == "data.dataset" and Path(value).exists():  # a sweep logs the absolute path, `run` the typed one
        return str(Path(value).resolve())
    return value


def setting(run) -> tuple:
    """What distinguishes one setting of a method from another: its params, less the keys above."""
    return tuple(sorted((k, _param(k, v)) for k, v in run.params.items()
                        if k not in _NOT_A_SETTING and not k.startswith(("tracking.", "runtime."))))


def _metric(run, key: str) -> float:
    """`result_<key>` (at the run's selected round) if logged, else the last value of `key`."""
    m = run.metrics
    return m.get(f"result_{key}", m.get(key, float("nan")))


def _runs(experiment: str) -> list[RunRecord]:
    runs = search(experiment, "attributes.status = 'FINISHED'")
    if runs is None:
        raise UserError(f"compare: no MLflow experiment named {experiment!r} (tracking.experiment)")
    runs = [r for r in runs if "raycache.method" in r.tags]
    if not runs:
        raise UserError(f"compare: experiment {experiment!r} has no finished raycache runs")
    return runs


def table(runs: list[RunRecord]) -> list[MethodRow]:
    by_method: dict[str, list] = {}
    for r in runs:
        by_method.setdefault(r.tags["raycache.method"], []).append(r)
    rows = []
    for method, runs in sorted(by_method.items()):
        settings: dict[tuple, list] = {}
        for r in runs:
            settings.setdefault(setting(r), []).append(r)

        def score(group) -> float:  # validation chooses; a run without it (val_fraction 0) ranks last
            vals = [_metric(r, "val_accuracy") for r in group]
            return statistics.fmean(vals) if all(v == v for v in vals) else float("-inf")

        group = max((settings[k] for k in sorted(settings)), key=score)  # ties: the first in a fixed order

        def mean(key: str) -> float:
            return statistics.fmean(_metric(r, key) for r in group)

        lr = group[0].params.get("method.lr", "None")
        rows.append(MethodRow(
            method, len(group), len(settings), float("nan") if lr == "None" else float(lr), mean("val_accuracy"),
            mean("accuracy"), mean("local_accuracy_mean"), mean("client_accuracy_mean"),
            mean("client_accuracy_std"),
            statistics.fmean(r.metrics.get("comm_bytes_up_total", 0) + r.metrics.get(
                "comm_bytes_down_total", 0) for r in group),
            statistics.fmean(r.metrics.get("trainable_params", float("nan")) for r in group),
            statistics.fmean(r.wall_seconds for r in group),
            tuple(r.run_id for r in group)))
    return rows


def plots(runs: list[RunRecord]):
    """(accuracy vs round, accuracy vs cumulative bytes) matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_round, ax_r = plt.subplots(figsize=(7, 4.5))
    by_bytes, ax_b = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for r in sorted(runs, key=lambda r: r.tags["raycache.method"]):
        method = r.tags["raycache.method"]
        colour = colours.setdefault(method, f"C{len(colours)}")
        label = method if method not in {line.get_label() for line in ax_r.lines} else None
        acc = history(r.run_id, "accuracy")
        ax_r.plot([s for s, _ in acc], [a for _, a in acc], marker="o", color=colour, label=label)
        sent = dict(history(r.run_id, "comm_bytes_up"))
        down = dict(history(r.run_id, "comm_bytes_down"))
        total, xs, ys = 0.0, [], []
        for step, a in acc:
            total += sent.get(step, 0.0) + down.get(step, 0.0)
            if total > 0:
                xs.append(total)
                ys.append(a)
        if xs:
            ax_b.plot(xs, ys, marker="o", color=colour, label=label)
        elif acc:
            ax_b.axhline(acc[-1][1], linestyle="--", color=colour, label=f"{method} (sends nothing)" if label else None)
    ax_r.set(xlabel="round", ylabel="test accuracy", title="Accuracy by round (each method's selected lr)")
    ax_b.set(xscale="log", xlabel="cumulative bytes sent (up + down)", ylabel="test accuracy",
             title="Accuracy against communication")
    for ax in (ax_r, ax_b):
        ax.grid(alpha=0.3)
        ax.legend()
    by_round.tight_layout()
    by_bytes.tight_layout()
    return by_round, by_bytes


def compare(experiment: str):
    """Build the table and plots for `experiment` and log them to a new summary run; returns (rows, run)."""
    runs = _runs(experiment)
    rows = table(runs)
    selected = {i for row in rows for i in row.run_ids}
    by_round, by_bytes = plots([r for r in runs if r.run_id in selected])
    summary = Run(experiment, "compare", tags={"raycache.kind": "compare"})
    try:
        csv = io.StringIO()
        csv.write(",".join(HEADER) + "\n")
        for row in rows:
            csv.write(",".join(row.cells()) + "\n")
        summary.log_text(csv.getvalue(), "comparison.csv")
        summary.log_figure(by_round, "accuracy_vs_round.png")
        summary.log_figure(by_bytes, "accuracy_vs_bytes.png")
        best = max(rows, key=lambda r: r.val_accuracy)  # validation names the best method; test reports
        summary.set_tags({"best_method": best.method})
        summary.log_metrics({"best_accuracy": best.accuracy, "runs_compared": len(runs)})
    except BaseException as err:
        summary.finish(err)
        raise
    summary.finish()
    return rows, summary
