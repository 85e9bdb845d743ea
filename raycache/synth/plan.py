"""What a synthetic set is, as pure functions: per-image prompts and seeds, the settings' fingerprint,
and the jobs (chunks of one class) that make it."""

from __future__ import annotations

import hashlib
import json

import numpy as np

# Settings that change the images; actors, CPUs, GPUs and download permission only change how they come.
IMAGE_SETTINGS = ("generator", "per_class", "prompts", "seed", "steps", "guidance_scale", "size", "batch_size",
                  "half")


def image_prompt(templates: list[str], class_name: str, index: int) -> str:
    return templates[index % len(templates)].format(class_name)


def image_seed(seed: int, label: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, label, index]).generate_state(1)[0])


def settings_of(synth, classes: list[str]) -> dict:
    s = {k: getattr(synth, k) for k in IMAGE_SETTINGS}
    s["classes"] = list(classes)
    return s


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def jobs(classes: list[str], per_class: int, batch_size: int, todo: set[int] | None = None) -> list[dict]:
    """One job per batch of one class: (label, class_name, start, count), class-major."""
    out = []
    for label, name in enumerate(classes):
        if todo is not None and label not in todo:
            continue
        for start in range(0, per_class, batch_size):
            out.append({"label": label, "class_name": name, "start": start,
                        "count": min(batch_size, per_class - start)})
    return out
