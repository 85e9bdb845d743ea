"""Zero-shot CLIP: no training, nothing sent. The floor every method must beat."""

from __future__ import annotations

import numpy as np

from raycache.lazy import lazy_module
from raycache.methods.base import Frozen, State

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")


class ZeroShot(Frozen):
    name = "zeroshot"

    def init_state(self, server_features, server_labels) -> State:
        return {}

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.normalize(features, dim=-1) @ self.text_weights.T  # (B, N)


def zero_shot_predictions(features: np.ndarray, text_weights: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """`ZeroShot`'s predicted classes in numpy, for a process without torch (the driver's zero-shot
    accuracy): the argmax of 100 * unit(f) @ W.T over the classes, `chunk` rows at a time."""
    out = np.zeros(len(features), np.int64)
    w = np.asarray(text_weights, np.float32)
    for at in range(0, len(features), chunk):
        f = np.asarray(features[at:at + chunk], np.float32)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # F.normalize's eps
        out[at:at + chunk] = (100.0 * f @ w.T).argmax(axis=1)
    return out
