"""LoRA targets on an open_clip model, named `<tower>.<module>` across layers, and their injection via PEFT.

A target such as `text.attn.out_proj` names that module in every layer of the text tower
(`transformer.resblocks.<i>.attn.out_proj`); `vision.` names the image tower (`visual.`). Attention layers
are first unfused (`raycache.models.attention`) so q, k, v and out projections are separate `nn.Linear`s.
Only `nn.Linear` modules are offered: each adapted (d_out x d_in) matrix adds r (d_in + d_out) parameters.
"""

from __future__ import annotations

import math
import re

from torch import nn

from raycache.errors import UserError
from raycache.models.attention import unfuse_attention


def towers(model: nn.Module) -> dict[str, str]:
    """Tower name -> attribute prefix of its modules in `model` (a text tower only if the model has one)."""
    out = {"vision": "visual"} if isinstance(getattr(model, "visual", None), nn.Module) else {}
    for attr in ("transformer", "text"):  # open_clip CLIP keeps its text transformer at the top; CustomTextCLIP
        if isinstance(getattr(model, attr, None), nn.Module):
            out["text"] = attr
            break
    return out


def _short(tower: str, path: str) -> str:
    """`resblocks.3.attn.out_proj` -> `<tower>.attn.out_proj`: the part after the last layer index."""
    parts = path.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join([tower] + parts[digits[-1] + 1:] if digits else [tower] + parts)


def lora_choices(model: nn.Module) -> dict[str, list[str]]:
    """Every target LoRA can take in `model` (already unfused) -> the full module names it adapts."""
    choices: dict[str, list[str]] = {}
    for tower, attr in towers(model).items():
        for path, module in getattr(model, attr).named_modules():
            if isinstance(module, nn.Linear) and path:
                choices.setdefault(_short(tower, path), []).append(f"{attr}.{path}")
    return choices


def resolve_targets(model: nn.Module, targets: list[str], model_name: str) -> list[str]:
    """Full module names for `targets` in an unfused `model`; UserError naming the valid choices if one is
    unknown or its tower is missing."""
    choices = lora_choices(model)
    have = towers(model)
    names: list[str] = []
    for t in targets:
        tower = t.split(".", 1)[0]
        if tower not in ("text", "vision"):
            raise UserError(f"method.lora_targets: {t!r} must start with text. or vision.; choose from: "
                            f"{', '.join(sorted(choices)) or 'none'}")
        if tower not in have:
            raise UserError(f"method.lora_targets: {t!r} needs a {tower} tower, but model {model_name} has none; "
                            f"choose from: {', '.join(sorted(choices)) or 'none'}")
        if t not in choices:
            raise UserError(f"method.lora_targets: {model_name} has no module {t!r}; choose from: "
                            f"{', '.join(sorted(choices)) or 'none'}")
        names += choices[t]
    return names


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, model_name: str,
             scaling: str = "reference") -> list[str]:
    """Freeze `model`, unfuse its attention and inject PEFT LoRA adapters on `targets`; returns the names of
    the trainable LoRA parameters, in a stable order. Each adapted layer computes W x + s B A x with
    s = alpha (`scaling="reference"`, FLoRA's code) or s = alpha / rank (`"peft"`).

    Initialised as FLoRA's reference does (dphuongn/FLoRA, system/flcore/trainmodel/clip_model.py):
    A ~ N(0, std 1/sqrt(r)), B = 0. PEFT's own `gaussian` init draws A with std 1/r, so A is redrawn here
    from torch's global generator (the caller seeds it)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    unfuse_attention(model)
    names = resolve_targets(model, targets, model_name)
    pattern = "|".join(re.escape(n) for n in names)  # full match: text names must not match vision suffixes
    peft_alpha = alpha * rank if scaling == "reference" else alpha  # PEFT scales by lora_alpha / r
    config = LoraConfig(r=rank, lora_alpha=peft_alpha, target_modules=f"^(?:{pattern})$", lora_dropout=0.0,
                        bias="none", init_lora_weights="gaussian")
    inject_adapter_in_model(config, model)
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict):
            for layer in lora_a.values():
                nn.init.normal_(layer.weight, mean=0.0, std=1.0 / math.sqrt(rank))
    return [n for n, p in model.named_parameters() if p.requires_grad]
