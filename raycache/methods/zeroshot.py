"""Zero-shot CLIP: no training, nothing sent. The floor every method must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raycache.methods.base import Method, State


class ZeroShot(Method):
    name = "zeroshot"

    def init_state(self, server_features, server_labels) -> State:
        return {}

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.normalize(features, dim=-1) @ self.text_weights.T  # (B, N)

    def local_train(self, state, features, labels, seed, memory=None, round_idx=1) -> tuple[State, float]:
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(self.logits(state, features), labels)
        return state, float(loss)
