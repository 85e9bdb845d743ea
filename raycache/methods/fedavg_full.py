"""FedAvg with full fine-tuning of the CLIP image encoder: the cost ceiling. Every image-encoder parameter
is trained on the clients' images and travels both ways each round; the text tower stays frozen."""

from __future__ import annotations

from raycache.methods.encoder import EncoderMethod


class FedAvgFull(EncoderMethod):
    name = "fedavg_full"
    # full fine-tuning of a pretrained encoder wants a small step; otherwise FLoRA/FedCLIP's optimiser
    defaults = {**EncoderMethod.defaults, "lr": 1e-5, "batch_size": 32}

    @classmethod
    def uses_pixels(cls, cfg) -> bool:
        return True

    def build(self):
        from raycache.models.clip import load_clip

        model, _, tokenizer = load_clip(self.task.spec)
        model.visual.requires_grad_(True)
        return model, tokenizer
