"""A sweep's summary artifacts: the trial table (CSV) and a heatmap of the final metric over the two most-swept
keys (mean over the trials that share a cell)."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from raycache.sweep.space import most_swept


def trial_table(trials: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["trial", *keys, metric, "test_accuracy", "status", "run_id", "failure_reason"])
    for t in trials:
        test = t.get("test_accuracy")
        out.writerow([t["trial"], *(t["params"].get(k, "") for k in keys),
                      "" if t["metric"] is None else f"{t['metric']:.6g}", "" if test is None else f"{test:.6g}",
                      t["status"], t["run_id"], t["failure_reason"]])
    return buf.getvalue()


def _label(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def heatmap(trials: list[dict[str, Any]], space: dict, metric: str):
    """A matplotlib figure, or None when fewer than two keys were swept or no trial finished."""
    done = [t for t in trials if t["metric"] is not None and t["status"] == "FINISHED"]
    if len(space) < 2 or not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ky, kx = most_swept(space, done)[:2]
    xs = sorted({t["params"].get(kx) for t in done}, key=lambda v: (str(type(v)), v))
    ys = sorted({t["params"].get(ky) for t in done}, key=lambda v: (str(type(v)), v))
    sums, counts = np.zeros((len(ys), len(xs))), np.zeros((len(ys), len(xs)))
    for t in done:
        i, j = ys.index(t["params"].get(ky)), xs.index(t["params"].get(kx))
        sums[i, j] += t["metric"]
        counts[i, j] += 1
    grid = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2.5))
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [_label(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_label(v) for v in ys])
    ax.set_xlabel(kx)
    ax.set_ylabel(ky)
    for i in range(len(ys)):
        for j in range(len(xs)):
            if counts[i, j]:
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"final {metric}")
    ax.set_title(f"final {metric} (mean over trials per cell)")
    fig.tight_layout()
    return fig
