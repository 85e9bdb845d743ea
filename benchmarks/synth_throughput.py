"""Images/s of `raycache synth` with the offline tiny pipeline on this machine, with 1 and 2 generator actors.

`wall` counts everything from the call to the last shard (actor start-up included); `steady` counts from
the first finished job to the last, i.e. generation once the actors are up. Usage:

    .venv/bin/python benchmarks/synth_throughput.py [--classes 4 --per-class 16 --steps 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402

from raycache.config import SynthConfig  # noqa: E402
from raycache.synth.generate import ensure_set  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    classes = [f"class{i}" for i in range(args.classes)]
    print("actors | images | wall_s | wall_img_s | steady_img_s")
    for actors in (1, 2):
        out = tempfile.mkdtemp(prefix="raycache-synth-bench-")
        cfg = SynthConfig(generator="tiny", classes=classes, per_class=args.per_class, steps=args.steps,
                          batch_size=args.batch_size, actors=actors, num_cpus=1, out=f"{out}/set")
        stamps: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        result = ensure_set(cfg, classes, out, on_images=lambda n: stamps.append((time.perf_counter(), n)))
        wall = time.perf_counter() - t0
        made = [(t, n) for t, n in stamps if n > 0]
        steady = sum(n for _, n in made[1:]) / (made[-1][0] - made[0][0]) if len(made) > 1 else float("nan")
        print(f"{actors} | {result.generated} | {wall:.1f} | {result.generated / wall:.2f} | {steady:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
