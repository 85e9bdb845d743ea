"""Encoding throughput: raycache's two-stage pipeline (Ray Data read/decode tasks feeding an encoder pool)
against the floor, a plain torch loop on this machine's cores doing the same work (decode, eval transform,
`encode_image`, same batch size) in one process, measured in one run, just before each row, so that each
ratio is taken under the same load.

Datasets: scikit-learn's digits (1,797 images, an in-memory source) and an ImageFolder of JPEGs written here
(256 px, so decoding and resizing cost what they cost on real photos). Model: an open_clip architecture
with random weights (nothing is downloaded). Each raycache row starts from an empty feature store on a fresh
local Ray of `--cpus` CPUs; its clock includes starting the encoder actors and building their model, which
the floor does once before its clock starts (`steady_img_s` leaves that out: images over the time from the
first features to the last). The `started` row's pool is started, its model built and Ray Data's cold start
paid (`ray_session.warm_data`) before the clock, as the floor's model is built before its clock, and as a
run has them: made beside its model's preflight (`ray_session.EarlyStart`). The eval transform is handed to
the pipeline, as a run's model preflight hands it over before encoding starts.

    .venv/bin/python benchmarks/encode_throughput.py                      # ViT-B-32, all cores
    .venv/bin/python benchmarks/encode_throughput.py --model tiny --folder-images 200
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raycache.config import DataConfig, RuntimeConfig  # noqa: E402
from raycache.data.sources import open_source  # noqa: E402
from raycache.data.sources.base import decode_image  # noqa: E402
from raycache.models.clip import ModelSpec, load_clip  # noqa: E402


def write_folder(root: Path, n: int, size: int = 256, classes: int = 4) -> Path:
    """`n` JPEGs in `classes` folders: smooth random colour fields with noise, `size` px square."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        arr = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def floor(source, spec: ModelSpec, batch: int, threads: int) -> tuple[float, np.ndarray, object]:
    """(images/s, features, the eval transform): one process, `threads` torch threads, decode + transform +
    encode per batch."""
    torch.set_num_threads(threads)
    model, preprocess, _ = load_clip(spec)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = source.to_ray().take_all()  # the bytes, read before the clock (the pipeline reads them too)
    finally:
        ray.shutdown()
    t = time.perf_counter()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            pixels = torch.stack([preprocess(decode_image(r["image"], r["key"])) for r in chunk])
            out.append(model.encode_image(pixels).float().numpy())
    return len(rows) / (time.perf_counter() - t), np.concatenate(out), preprocess


def pipeline(source, spec: ModelSpec, runtime: RuntimeConfig, transform,
             started: bool = False) -> tuple[float, float, np.ndarray]:
    """(images/s over the wall time, images/s from first to last features, features) of `load_or_encode`,
    given the eval `transform` as a run gives it (made by the model's preflight before encoding starts).
    `started`: its encoder pool started, its model built and Ray Data's cold start paid before the clock
    (as the floor builds its model first; as a run has them, made beside its model's preflight)."""
    from raycache.data import features as F
    from raycache.data.encoders import EncoderPool
    from raycache.data.feature_store import ShardWriter
    from raycache.ray_session import warm_data

    stamps = []
    write = ShardWriter.write

    def timed(self, feats):  # when each block of features reaches the driver
        stamps.append((time.perf_counter(), len(feats)))
        return write(self, feats)

    ShardWriter.write = timed
    pool = EncoderPool(spec, runtime)
    try:
        if started:
            pool.wait()
            warm_data().join()
        t = time.perf_counter()
        feats = F.load_or_encode(source, spec, runtime, transform=transform, encoders=pool)
        wall = time.perf_counter() - t
    finally:
        ShardWriter.write = write
        pool.close()
    n = len(source.labels)
    first_t, first_n = stamps[0]
    steady = (n - first_n) / max(stamps[-1][0] - first_t, 1e-9)
    return n / wall, steady, feats.features


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--folder-images", type=int, default=600)
    ap.add_argument("--datasets", nargs="+", default=["digits", "folder"])
    args = ap.parse_args(argv)
    spec = ModelSpec(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"digits": lambda: open_source(DataConfig()),
                   "folder": lambda: open_source(DataConfig(dataset=str(write_folder(Path(tmp) / "folder",
                                                                                      args.folder_images))))}
        settings = {  # what a user sets: the defaults, and two actors on a machine that fits one beside decoding;
            # and the defaults with the pool started before the clock
            "default": ({}, False),
            "2 actors": ({"encoder_actors": 2}, False),
            "started": ({}, True),
        }
        for name in args.datasets:
            source = sources[name]()
            for label, (extra, started) in settings.items():
                # the floor again beside each row: this shared VM's speed drifts by tens of percent within minutes
                floor_rate, expected, transform = floor(source, spec, args.batch, args.cpus)
                ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
                try:
                    runtime = RuntimeConfig(cache_dir=str(Path(tmp) / f"store-{name}-{label}"),
                                            encoder_batch_size=args.batch, **extra)
                    rate, steady, feats = pipeline(source, spec, runtime, transform, started)
                finally:
                    ray.shutdown()
                assert np.allclose(feats, expected, rtol=1e-3, atol=1e-4), "pipeline features differ from the floor's"
                rows.append((name, len(source.labels), label, floor_rate, rate, steady))
    print(f"\nmodel {args.model}, {args.cpus} CPUs, batch {args.batch}; floor = plain loop on {args.cpus} torch threads")
    print("dataset | images | setting  | floor_img_s | raycache_img_s | steady_img_s | ratio | steady_ratio")
    for name, n, label, fl, rate, steady in rows:
        print(f"{name:7} | {n:6} | {label:8} | {fl:11.1f} | {rate:14.1f} | {steady:12.1f} | {rate / fl:5.2f} | "
              f"{steady / fl:12.2f}")


if __name__ == "__main__":
    main()
