"""Peak memory of a method that trains through the image encoder on a whole dataset at 224 px: `fedavg_full`
with ViT-B-32 (random weights) on all 70,000 Fashion-MNIST images (Debian's dataset-fashion-mnist), one round,
its evaluation on the validation and test splits included, sampled every 0.2 s over every process (PSS).

The yardstick is what the images would take as float pixels, the way this path held them before (every image
preprocessed into one float32 array in the object store): 70,000 x 3 x 224 x 224 x 4 bytes = 42 GB.

    .venv/bin/python benchmarks/pixels_memory.py             # about 2 hours on 2 CPU cores
    .venv/bin/python benchmarks/pixels_memory.py --val-fraction 0.01 --client-cpus 2   # 51 minutes here
    .venv/bin/python benchmarks/pixels_memory.py --model tiny --val-fraction 0.01   # a quick look
    python benchmarks/pixels_memory.py --dataset digits --client-gpus 0.5 --encoder-gpus 0.5   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402

from raycache.config_file import load_config  # noqa: E402
from raycache.experiment import run_experiment  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # a script's neighbours, also when loaded by file path
from memory import MB, PeakSampler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.01, help="clients trained in a round")
    ap.add_argument("--rounds", type=int, default=1, help="rounds (from the second on, a round runs beside the "
                                                             "previous round's state and checkpoint)")
    ap.add_argument("--batch", type=int, default=32, help="local minibatch (activations scale with it)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--client-cpus", type=float, default=1.0, help="the client actor's CPUs (and threads)")
    ap.add_argument("--client-gpus", type=float, default=0.0, help="the client actor's share of a GPU (0: CPU)")
    ap.add_argument("--encoder-gpus", type=float, default=0.0, help="the encoder actor's share of a GPU (0: CPU)")
    ap.add_argument("--report-every", type=float, default=60.0, help="seconds between peak reports on stderr")
    ap.add_argument("--store", default=None, help="a feature store an earlier run of the same settings left "
                                                  "(its path is printed): the frozen features are read, not "
                                                  "encoded again (default: a new one)")
    args = ap.parse_args(argv)
    store = args.store or tempfile.mkdtemp(prefix="raycache-bench-pixels-")
    print(f"[pixels] feature store: {store}", file=sys.stderr, flush=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    cfg = load_config("experiments/tiny.yaml", [
        f"model.name={args.model}", "model.pretrained=null", f"data.dataset={args.dataset}",
        f"data.clients={args.clients}", f"data.val_fraction={args.val_fraction}", "method.name=fedavg_full",
        f"per_method.fedavg_full.batch_size={args.batch}", "per_method.fedavg_full.local_epochs=1",
        f"federation.rounds={args.rounds}", f"federation.fraction={args.fraction}", "runtime.client_actors=1",
        f"runtime.client_cpus={args.client_cpus}", f"runtime.client_gpus={args.client_gpus}",
        f"runtime.encoder_gpus={args.encoder_gpus}",
        f"runtime.cache_dir={store}", "tracking.experiment=benchmark-pixels"])
    t = time.perf_counter()
    mem = PeakSampler(report_every=args.report_every)

    def stage(name: str) -> None:  # where the run is, beside the periodic peak reports
        mem.stage = name
        print(f"[pixels {time.perf_counter() - t:.0f}s] {name}", file=sys.stderr, flush=True)

    with mem:
        s = run_experiment(cfg, on_stage=stage, on_round=lambda r, m: stage(f"after round {r}"))
        ray.shutdown()
    wall = time.perf_counter() - t
    from raycache.data.transforms import input_size
    from raycache.data.sources import open_source
    from raycache.models.clip import ModelSpec, load_clip

    source = open_source(cfg.data)
    size = input_size(load_clip(ModelSpec.from_config(cfg.model))[1])
    side = size if isinstance(size, int) else size[0]
    floats = len(source.labels) * 3 * side * side * 4
    print(f"[pixels] peak PSS by role (MB): " + ", ".join(
        f"{k} {v / MB:.0f}" for k, v in sorted(mem.by_role.items(), key=lambda kv: -kv[1])), file=sys.stderr)
    print(f"[pixels] at the total's peak ({mem.peak_stage or 'start'}), by role (MB): " + ", ".join(
        f"{k} {v / MB:.0f}" for k, v in sorted(mem.at_peak.items(), key=lambda kv: -kv[1])), file=sys.stderr)
    if args.client_gpus or args.encoder_gpus:
        print(f"[pixels] GPU: {gpu_name()}", file=sys.stderr)
    # clients_trained: in all rounds; round_s: the slowest round
    print("model | images | px | clients_trained | encoded | peak_pss_mb | driver_pss_mb | float_pixels_mb | "
          "wall_s | round_s | acc")
    print(f"{args.model} | {len(source.labels)} | {side} | {sum(int(m['clients_sampled']) for m in s.history)} | "
          f"{s.encoded} | {mem.peak_pss / MB:.0f} | {mem.peak_driver_pss / MB:.0f} | {floats / MB:.0f} | {wall:.0f} | "
          f"{max(m['round_seconds'] for m in s.history):.0f} | {s.final['accuracy']:.3f}")
    return 0


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to the driver"


if __name__ == "__main__":
    sys.exit(main())
