"""What a sweep costs beyond its trials: a 9-trial offline CacheFL grid (Dirichlet alpha x shots on the
tiny config, 2 rounds each, 2 trials at once) through `raycache sweep`, timed from the outside.

- `wall_s`: the whole sweep, as a user waits for it (prepare, encode once, Tune, summary).
- `driver_s`: before the first trial starts (checks, Ray start, encoding the shared features once).
- `tune_s`: first trial start to last trial end; `summary_s`: after it (the parent's table and heatmap).
- `sum_trials_s`: the trials' own walls (their MLflow runs, start to end), added up.
- `concurrency` = sum_trials_s / tune_s (the most it can be is `max_concurrent`);
  `gap_per_trial_s` = (tune_s x max_concurrent - sum_trials_s) / trials: the slot time no trial ran in
  (Tune scheduling, starting a trial's actor and placement group, worker start-up).
- `marginal_s` = tune_s x max_concurrent / trials - the mean trial's rounds: what one more trial adds
  beyond its own rounds, the first trials' process start-up included. `warm_marginal_s`: the same over
  the trials that reused warm actors only (from the first of them starting to the last trial ending): what
  each further trial costs. `actors_reused`: server and host actors the trials took from a warm pool.
Usage:

    .venv/bin/python benchmarks/sweep_overhead.py           # warm trials (the default)
    .venv/bin/python benchmarks/sweep_overhead.py --cold    # a fresh trial process and actors every trial
    .venv/bin/python benchmarks/sweep_overhead.py --timeline  # and each trial's start, end and stages
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="warm_trials: false (fresh processes for every trial)")
    ap.add_argument("--timeline", action="store_true",
                    help="also print each trial's start and end (from the first trial's start) and stages")
    args = ap.parse_args()
    store = Path(tempfile.mkdtemp(prefix="raycache-bench-sweep-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    sweep_path = store / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump({
        "name": "overhead", "base": str(ROOT / "experiments/tiny.yaml"),
        "set": [f"federation.rounds={args.rounds}", "runtime.client_actors=1", "runtime.client_cpus=0.95",
                f"runtime.cache_dir={store}", "tracking.experiment=benchmark-sweep"],
        "max_concurrent": args.max_concurrent, "warm_trials": not args.cold,
        "space": {"data.alpha": {"grid": [0.1, 0.5, 1.0]}, "method.shots": {"grid": [1, 4, 16]}}}))

    from mlflow.tracking import MlflowClient

    from raycache.sweep.runner import run_sweep
    from raycache.sweep.space import load_sweep

    t0 = time.time()
    sweep, base = load_sweep(sweep_path)
    result = run_sweep(sweep, base)
    t_end = time.time()

    client = MlflowClient()
    runs = [client.get_run(t["run_id"]) for t in result.trials]
    assert len(runs) == 9 and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    starts = [r.info.start_time / 1000 for r in runs]
    ends = [r.info.end_time / 1000 for r in runs]
    walls = [e - s for s, e in zip(starts, ends)]
    tune_s = max(ends) - min(starts)
    sum_trials = sum(walls)
    parts = {k: statistics.mean(r.data.metrics[k] for r in runs)
             for k in ("time_text_s", "time_ray_start_s", "time_encode_s", "time_actors_s", "time_rounds_s")}
    row = {"trials": len(runs), "wall_s": t_end - t0, "driver_s": min(starts) - t0, "tune_s": tune_s,
           "summary_s": t_end - max(ends), "sum_trials_s": sum_trials, "mean_trial_s": statistics.mean(walls),
           "concurrency": sum_trials / tune_s,
           "gap_per_trial_s": (tune_s * args.max_concurrent - sum_trials) / len(runs),
           # a trial's slot time beyond its own rounds: what one more trial adds to the sweep
           "marginal_s": tune_s * args.max_concurrent / len(runs) - parts["time_rounds_s"],
           "actors_reused": int(sum(r.data.metrics.get("actors_reused", 0) for r in runs))}
    warm = [(s, e, r) for s, e, r in zip(starts, ends, runs) if r.data.metrics.get("actors_reused", 0) > 0]
    if warm:  # once the first trials have started the processes: slot time per further trial, less its rounds
        span = max(ends) - min(s for s, _, _ in warm)
        row["warm_marginal_s"] = span * args.max_concurrent / len(warm) - statistics.mean(
            r.data.metrics["time_rounds_s"] for _, _, r in warm)
    if args.timeline:
        first = min(starts)
        for s, e, r in sorted(zip(starts, ends, runs), key=lambda x: x[0]):
            stages = " ".join(f"{k.removeprefix('time_').removesuffix('_s')} {v:.2f}"
                              for k, v in sorted(r.data.metrics.items()) if k.startswith("time_"))
            print(f"trial {s - first:6.2f}-{e - first:6.2f} s  reused {r.data.metrics.get('actors_reused', 0):.0f}"
                  f"  {stages}")
    print(" | ".join(row))
    print(" | ".join(str(v) if isinstance(v, int) else f"{v:.2f}" for v in row.values()))
    print("mean per trial (s): " + ", ".join(f"{k.removeprefix('time_').removesuffix('_s')} {v:.2f}"
                                            for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
