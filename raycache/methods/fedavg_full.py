"""FedAvg with full fine-tuning of CLIP: the cost ceiling. Every parameter of the trained towers travels both
ways each round.

`method.towers: both` (the default) trains the whole CLIP, as FLoRA's FedFFT baseline does (Adam 5e-5,
batch 128; dphuongn/FLoRA) and as FedCLIP's "283x fewer parameters" counts it; `vision` trains only the
image encoder (the text tower frozen), `text` only the text tower (images then come as stored features).
`logit_scale` never trains: every method classifies with CLIP's fixed scale 100.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raycache.methods.encoder import EncoderMethod, EncoderSettings
from raycache.methods.settings import reference


class _TowerSettings(EncoderSettings):
    towers: Literal["both", "vision", "text"] = Field(
        "both", description="which CLIP towers train and travel; both = the whole CLIP (FLoRA's FedFFT and "
                            "FedCLIP's cost ratios count it), vision = the image encoder only")


# FedFFT's optimiser; the moments are not kept across rounds by default: two full-CLIP copies per client
FedAvgFullSettings = reference(_TowerSettings, "FedAvgFullSettings", "FedAvg with full fine-tuning of CLIP.",
                               persist_optimizer=False)


class FedAvgFull(EncoderMethod):
    name = "fedavg_full"
    Settings = FedAvgFullSettings

    @classmethod
    def uses_pixels(cls, cfg) -> bool:
        return cfg.towers in ("both", "vision")

    def build(self):
        from raycache.models.clip import load_clip

        model, _, tokenizer = load_clip(self.task.spec)
        towers = self.cfg.towers
        for name, p in model.named_parameters():
            vision = name.startswith("visual.")
            p.requires_grad_(not name.startswith("logit_") and (towers == "both" or vision == (towers == "vision")))
        return model, tokenizer
