"""Encoding on one GPU: raycache's pipeline (decode tasks on the CPUs feeding encoder actors on the GPU), one
actor holding the whole GPU, two holding half and four holding a quarter each (fractional GPUs), against one
saturating process: a plain torch loop whose DataLoader decodes and preprocesses on all but one of the CPUs
and feeds the model on the GPU (same model, transform, batch and float32 arithmetic). All rows in one run, on
the same images.

`gpu_only` is the device's ceiling for this model: the same batches, already preprocessed and on the GPU,
pushed through `encode_image` (no decoding). On a GPU machine decoding JPEGs is usually the bound, so
`gpu_only` says how far the CPUs are from keeping the device busy.

    python benchmarks/encode_gpu.py --images 8000           # on a machine with a GPU
    .venv/bin/python benchmarks/encode_gpu.py --device cpu --images 64 --model tiny   # the script's own check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raycache.config import DataConfig, RuntimeConfig  # noqa: E402
from raycache.data.sources import open_source  # noqa: E402
from raycache.data.transforms import input_size  # noqa: E402
from raycache.data.sources.base import decode_image  # noqa: E402
from raycache.models.clip import ModelSpec, load_clip  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # a script's neighbours, also when loaded by file path
from encode_throughput import pipeline, write_folder  # noqa: E402


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, rows, preprocess) -> None:
        self.rows, self.preprocess = rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return self.preprocess(decode_image(r["image"], r["key"]))


def saturating(source, spec: ModelSpec, batch: int, workers: int,
               device: str) -> tuple[float, float, np.ndarray, object]:
    """(images/s of one process with a `workers`-process DataLoader feeding the model on `device`,
    images/s of the model alone on preprocessed batches already on the device, features, the eval transform
    that the pipeline is given as a run's preflight gives it)."""
    model, preprocess, _ = load_clip(spec, device=device)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = source.to_ray().take_all()  # the bytes, read before the clock (the pipeline reads them too)
    finally:
        ray.shutdown()
    loader = torch.utils.data.DataLoader(_Decoded(rows, preprocess), batch_size=batch, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=False,
                                         multiprocessing_context="fork" if workers else None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():  # warm the kernels once, outside the clock
        model.encode_image(torch.zeros((batch, 3, *_pair(input_size(preprocess))), device=device))
        sync()
        t = time.perf_counter()
        out = [model.encode_image(x.to(device, non_blocking=True)).float().cpu().numpy() for x in loader]
        sync()
        rate = len(rows) / (time.perf_counter() - t)
        x = torch.stack([preprocess(decode_image(r["image"], r["key"])) for r in rows[:batch]]).to(device)
        reps = max(1, len(rows) // batch)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            model.encode_image(x)
        sync()
        ceiling = reps * len(x) / (time.perf_counter() - t)
    return rate, ceiling, np.concatenate(out), preprocess


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4],
                    help="encoder pools to measure: each N holds 1/N of the GPU per actor")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("encode_gpu: no CUDA device here (use --device cpu for the script's own check)")
    spec = ModelSpec(args.model)
    gpus = 1.0 if args.device == "cuda" else 0.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = open_source(DataConfig(dataset=str(write_folder(Path(tmp) / "folder", args.images))))
        floor_rate, ceiling, expected, transform = saturating(source, spec, args.batch, max(0, args.cpus - 1),
                                                              args.device)
        # the pool holds one CPU in all, as the loop's process does beside its workers: the rest decode
        settings = {f"{n} x {1 / n:g} GPU": n for n in args.actors}
        for label, actors in settings.items():
            ray.init(num_cpus=args.cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
            try:
                runtime = RuntimeConfig(cache_dir=str(Path(tmp) / f"store-{label.replace(' ', '')}"),
                                        encoder_batch_size=args.batch, encoder_actors=actors,
                                        encoder_gpus=gpus / actors, encoder_cpus=1 / actors)
                rate, steady, feats = pipeline(source, spec, runtime, transform)
            finally:
                ray.shutdown()
            err = float(np.abs(feats - expected).max() / np.abs(expected).max())
            assert err < 1e-2, f"pipeline features differ from the loop's (max relative error {err:.2e})"
            rows.append((label, rate, steady, err))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\nmodel {args.model} fp32, {args.images} JPEGs (256 px), batch {args.batch}, {args.cpus} CPUs, {name}")
    print(f"saturating process (DataLoader, {max(0, args.cpus - 1)} workers): {floor_rate:.1f} images/s; "
          f"gpu_only (preprocessed batches on the device): {ceiling:.1f} images/s")
    print("setting      | raycache_img_s | steady_img_s | ratio | steady_ratio | max_rel_err")
    for label, rate, steady, err in rows:
        print(f"{label:12} | {rate:14.1f} | {steady:12.1f} | {rate / floor_rate:5.2f} | {steady / floor_rate:12.2f} "
              f"| {err:.1e}")


if __name__ == "__main__":
    main()
