"""FLoRA (arXiv 2404.15182): LoRA adapters on CLIP, trained by clients and averaged (A and B separately,
by sample count). Adapters come from the PEFT library; rank, alpha and target modules are config
(`method.lora_*`). The reference setting, the default here, adapts the text tower's attention output
projections in every layer with r = 2 and scale 32 (PEFT lora_alpha 64): r (d_in + d_out) per matrix travels.
"""

from __future__ import annotations

import copy

import torch

from raycache.methods.encoder import EncoderMethod


class FLoRA(EncoderMethod):
    name = "flora"

    @classmethod
    def uses_pixels(cls, cfg) -> bool:
        return any(t.startswith("vision.") for t in cfg.lora_targets)

    @classmethod
    def check(cls, cfg, model, spec) -> None:
        from raycache.models.attention import unfuse_attention
        from raycache.models.lora import resolve_targets

        probe = copy.deepcopy(model)  # unfusing is in place; the caller's model stays as it was
        unfuse_attention(probe)
        resolve_targets(probe, cfg.lora_targets, spec.name)

    def build(self):
        from raycache.models.clip import load_clip
        from raycache.models.lora import add_lora

        model, _, tokenizer = load_clip(self.task.spec)
        torch.manual_seed(0)  # the adapters' initial A is drawn from a fixed stream: the same in every process
        add_lora(model, self.cfg.lora_targets, self.cfg.lora_rank, self.cfg.lora_alpha, self.task.spec.name)
        return model, tokenizer
