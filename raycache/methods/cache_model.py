"""Tip-Adapter cache-model maths (Zhang et al. 2022), as pure functions.

    A = exp(-beta * (1 - f @ Fk.T))          affinity, (B, NK)
    logits = 100 * f @ W.T + alpha * A @ L   (B, N)
"""

from __future__ import annotations

import numpy as np
import torch


def one_hot_values(n_classes: int, shots: int) -> torch.Tensor:
    """(N*K, N) one-hot cache values for class-major keys: row i belongs to class i // K."""
    return torch.repeat_interleave(torch.eye(n_classes), shots, dim=0)


def affinity(features: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.exp(-beta * (1.0 - features @ keys.T))  # (B, NK)


def cache_residual(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float,
                   beta: float) -> torch.Tensor:
    """The cache's contribution alpha * A @ L, (B, N)."""
    return alpha * affinity(features, keys, beta) @ values


def cache_logits(features: torch.Tensor, text_weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 alpha: float, beta: float) -> torch.Tensor:
    zero_shot = 100.0 * features @ text_weights.T  # (B, N)
    return zero_shot + cache_residual(features, keys, values, alpha, beta)  # (B, N)


def class_balanced_keys(features: np.ndarray, labels: np.ndarray, n_classes: int, shots: int) -> np.ndarray:
    """(N*K, D) keys: the first K features of each class, class-major (matches `one_hot_values`)."""
    rows = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)[:shots]
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} cache images, needs {shots}")
        rows.append(features[idx])
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
