"""Text-to-image pipelines: resolve and check a generator source, and the Ray Data generator actor."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from raycache.errors import UserError
from raycache.synth.tiny import TINY, build_tiny_pipeline


def _looks_like_path(generator: str) -> bool:
    return generator.startswith((os.sep, ".", "~")) or os.path.exists(generator)


def check_generator(generator: str, allow_download: bool = False) -> None:
    """Fail before any compute on a generator that cannot be loaded here."""
    if generator == TINY:
        return
    if _looks_like_path(generator):
        folder = Path(generator).expanduser()
        if not (folder / "model_index.json").is_file():
            raise UserError(f"synth.generator: {generator} is not a diffusers pipeline folder "
                            f"(no model_index.json)")
        return
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snapshot_download(generator, local_files_only=True, allow_patterns=["model_index.json"])
    except HFValidationError:
        raise UserError(f"synth.generator: {generator!r} is neither 'tiny', a local folder nor a hub id") from None
    except Exception:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        if offline or not allow_download:
            raise UserError(f"synth.generator: weights for {generator!r} are not available offline (not in the "
                            f"Hugging Face cache); download them, point synth.generator at a local folder, or "
                            f"set synth.allow_download=true") from None
        # Downloads allowed: from_pretrained fetches it in the generator actor and reports a failure there.


def load_pipeline(generator: str, device: str, half: bool, seed: int = 0):
    import torch

    if generator == TINY:
        pipe = build_tiny_pipeline(seed)
    else:
        from diffusers import AutoPipelineForText2Image

        dtype = torch.float16 if half and device.startswith("cuda") else torch.float32
        logging.disable(logging.ERROR)
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(generator, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as err:
            raise UserError(f"synth.generator: cannot load {generator!r}: not available offline or not a "
                            f"text-to-image pipeline ({str(err).splitlines()[0][:160]})") from None
        finally:
            logging.disable(logging.NOTSET)
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def png(image: np.ndarray) -> bytes:
    """(H, W, 3) float in [0, 1] -> PNG bytes (deterministic)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class ImageGenerator:
    """Ray Data callable class. Each input row is a job: `count` images of one class starting at `start`;
    a job's output depends only on the job, so a resumed run makes the same images."""

    def __init__(self, settings: dict, use_gpu: bool) -> None:
        import torch

        self.s = settings
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(settings["generator"], self.device, settings["half"])

    def __call__(self, jobs: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        from raycache.synth.plan import image_prompt, image_seed

        out: dict[str, list] = {k: [] for k in ("image", "label", "class_name", "prompt", "seed", "generator",
                                               "index")}
        s = self.s
        for label, name, start, count in zip(jobs["label"], jobs["class_name"], jobs["start"], jobs["count"]):
            idx = list(range(int(start), int(start) + int(count)))
            prompts = [image_prompt(s["prompts"], str(name), i) for i in idx]
            seeds = [image_seed(s["seed"], int(label), i) for i in idx]
            gens = [torch.Generator(self.device).manual_seed(x) for x in seeds]
            kwargs = {"num_inference_steps": s["steps"], "guidance_scale": s["guidance_scale"],
                      "generator": gens, "output_type": "np"}
            if s["size"]:
                kwargs.update(height=s["size"], width=s["size"])
            images = self.pipe(prompts, **kwargs).images  # (count, H, W, 3) in [0, 1]
            if not np.isfinite(images).all():
                raise UserError(f"synth.generator: {s['generator']} produced NaN/inf pixels for class {name!r}")
            out["image"] += [png(im) for im in images]
            out["label"] += [int(label)] * len(idx)
            out["class_name"] += [str(name)] * len(idx)
            out["prompt"] += prompts
            out["seed"] += seeds
            out["generator"] += [s["generator"]] * len(idx)
            out["index"] += idx
        return out
