"""FLoRA (arXiv 2404.15182): LoRA adapters on CLIP, trained by clients and averaged by sample count. Adapters
come from the PEFT library; rank, alpha, scaling and target modules are config (`method.lora_*`).

The reference setting (dphuongn/FLoRA, system/flcore/trainmodel/clip_model.py and the FLoRA client/server),
the default here: the text tower's attention output projections in every layer, r = 2, the update scaled
by alpha = 32 whatever the rank (`lora_scaling: reference`; PEFT's alpha / r is `peft`), A ~ N(0, 1/sqrt(r)),
B = 0; each client's Adam built once and kept across rounds (`persist_optimizer`); r (d_in + d_out) per
matrix travels.

The server averages A and B separately, as the reference does. That is not the average of the clients'
updates B_k A_k: mean(B) mean(A) differs from mean(B A) whenever the clients' adapters differ (the cross terms
B_j A_k, j != k, enter), so the merged model is not the average of the clients' models.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from raycache.lazy import lazy_module
from raycache.methods.encoder import EncoderMethod, EncoderSettings

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it


class FLoRASettings(EncoderSettings):
    """FLoRA: LoRA adapters on CLIP, federated."""

    lora_rank: int = Field(2, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update B A x is scaled by it "
                                                      "(lora_scaling: reference) or by alpha / rank (peft)")
    lora_scaling: Literal["reference", "peft"] = Field(
        "reference", description="reference = scale alpha whatever the rank (FLoRA's code: a rank sweep keeps "
                                 "the scale), peft = alpha / rank (PEFT's and the LoRA paper's)")
    lora_targets: list[str] = Field(["text.attn.out_proj"], min_length=1,
                                    description="modules to adapt, as <tower>.<module> with tower text or "
                                                "vision, in every layer (e.g. text.attn.out_proj, "
                                                "vision.attn.q_proj, text.mlp.c_fc); an unknown one lists the "
                                                "model's choices")


class FLoRA(EncoderMethod):
    name = "flora"
    Settings = FLoRASettings

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
        add_lora(model, self.cfg.lora_targets, self.cfg.lora_rank, self.cfg.lora_alpha, self.task.spec.name,
                 self.cfg.lora_scaling)
        return model, tokenizer
