"""Zero-shot CLIP: no training, nothing sent. The floor every method must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raycache.methods.base import Frozen, State


class ZeroShot(Frozen):
    name = "zeroshot"

    def init_state(self, server_features, server_labels) -> State:
        return {}

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.normalize(features, dim=-1) @ self.text_weights.T  # (B, N)
