"""Centralised Tip-Adapter (Zhang et al. 2022) on the union of the clients' data: the accuracy ceiling that
federated caches approach. `method.training_free: true` keeps the keys fixed (Tip-Adapter); otherwise they
are fine-tuned as in Tip-Adapter-F, each round being `local_epochs` epochs over the pooled data.

The runtime pools every client's samples into one trainer (`role = "centralised"`); nothing travels.
"""

from __future__ import annotations

from raycache.methods.base import State
from raycache.methods.cachefl import CacheFL


class TipAdapter(CacheFL):
    name = "tip_adapter"
    role = "centralised"

    def local_train(self, state: State, inputs, labels, seed) -> tuple[State, float]:
        if not self.cfg.training_free:
            return super().local_train(state, inputs, labels, seed)
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            loss = F.cross_entropy(self.logits(state, inputs), labels)
        return state, float(loss)
