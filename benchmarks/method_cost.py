"""What each method trains and sends, and what one local step costs, against full fine-tuning of the whole
CLIP (FLoRA's FedFFT, `fedavg_full` with `method.towers: both`): the baseline the seeds' ratios are stated
against (FedCLIP: "283x fewer parameters"; FLoRA: "up to 34.72x faster, 2.47x less memory").

Payload ratios are exact parameter counts of the architecture (random init: no download). Step time is one
local step of each method on the same batch, measured in this process one after the other (same load), on
CPU by default or on a GPU (`--device cuda`). On a GPU each method's peak device memory during its steps is
measured too (torch's allocator peak, reset before each method); on CPU memory is not compared here: one
process's peak only grows (a ratio needs one process per method).

    .venv/bin/python benchmarks/method_cost.py                       # ViT-B-32, batch 8 at 224 px
    .venv/bin/python benchmarks/method_cost.py --model tiny --batch 32
    python benchmarks/method_cost.py --device cuda --batch 64      # on a machine with a GPU
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raycache.config import settings_for  # noqa: E402
from raycache.data.transforms import input_size  # noqa: E402
from raycache.methods import method_class  # noqa: E402
from raycache.methods.base import Task  # noqa: E402
from raycache.models.clip import ModelSpec, load_clip  # noqa: E402
from raycache.models.text import text_classifier  # noqa: E402
from raycache.methods.training import LocalRound  # noqa: E402

METHODS = {  # label -> method settings
    "fedavg_full (whole CLIP)": {"name": "fedavg_full", "towers": "both"},
    "fedavg_full (image tower)": {"name": "fedavg_full", "towers": "vision"},
    "flora (text out_proj, r=2)": {"name": "flora"},
    "flora (vision out_proj, r=2)": {"name": "flora", "lora_targets": ["vision.attn.out_proj"]},
    "fedclip (adapter)": {"name": "fedclip"},
    "cachefl (16 shots)": {"name": "cachefl", "shots": 16, "cache_init": "random"},
}


def measure(model_name: str, batch: int, classes: int, steps: int, device: str = "cpu") -> list[dict]:
    spec = ModelSpec(model_name)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, preprocess, tokenizer = load_clip(spec)
    names = [f"class {i}" for i in range(classes)]
    task = Task(names, text_classifier(model, tokenizer, names, ["a photo of a {}."]), spec)
    size = input_size(preprocess)
    size = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    with torch.no_grad():
        feats = model.encode_image(pixels).float()
    labels = torch.arange(batch) % classes
    del model
    rows = []
    for label, settings in METHODS.items():
        gc.collect()
        cfg = settings_for(**{"batch_size": batch, **settings})
        method = method_class(cfg.name)(cfg, task).to(device)
        keys = np.resize(feats.numpy(), (classes * 16, feats.shape[1]))  # any K=16 rows per class
        state = method.init_state(keys, np.repeat(np.arange(classes), 16))
        inputs = (pixels if method.uses_pixels(method.cfg) else feats).to(device)  # where a host puts them
        method.local_train(state, inputs, labels.to(device), LocalRound(0))  # warm-up: builds the model, allocates
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        for s in range(steps):
            method.local_train(state, inputs, labels.to(device), LocalRound(s + 1))
        sync()
        rows.append({"method": label, "params": int(sum(v.size for v in state.values())),
                     "step_s": (time.perf_counter() - t0) / steps,
                     "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None})
        del method
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU: step time and peak device memory)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("method_cost: --device cuda, but torch sees no CUDA device here")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = measure(args.model, args.batch, args.classes, args.steps, args.device)
    full = rows[0]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"{args.model}, batch {args.batch}, {args.classes} classes, {args.steps} steps, {where}")
    gpu = full["peak_mb"] is not None
    print("method | trainable = sent params | whole CLIP / this | step_s | full step / this"
          + (" | peak_gpu_mb | full peak / this" if gpu else ""))
    for r in rows:
        mem = f" | {r['peak_mb']:.0f} | {full['peak_mb'] / r['peak_mb']:.2f}x" if gpu else ""
        print(f"{r['method']} | {r['params']:,} | {full['params'] / r['params']:.1f}x | {r['step_s']:.3f} | "
              f"{full['step_s'] / r['step_s']:.1f}x{mem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
