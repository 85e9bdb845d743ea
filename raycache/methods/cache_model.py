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


def class_balanced_rows(labels: np.ndarray, n_classes: int, shots: int) -> np.ndarray:
    """(N*K,) positions: the first K of each class, class-major (matches `one_hot_values`)."""
    rows = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)[:shots]
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} cache images, needs {shots}")
        rows.append(idx)
    return np.concatenate(rows).astype(np.int64)


def class_balanced_keys(features: np.ndarray, labels: np.ndarray, n_classes: int, shots: int) -> np.ndarray:
    """(N*K, D) keys: the first K features of each class, class-major (matches `one_hot_values`)."""
    return np.ascontiguousarray(features[class_balanced_rows(labels, n_classes, shots)], dtype=np.float32)


def search_grid(scale: float, steps: int) -> np.ndarray:
    """Tip-Adapter's search grid: `steps` points from 0.1 up to (not including) `scale`."""
    return np.array([i * (scale - 0.1) / steps + 0.1 for i in range(steps)])


def search_alpha_beta(features: torch.Tensor, text_weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      labels: torch.Tensor, scale: tuple[float, float],
                      steps: tuple[int, int]) -> tuple[float, float, float]:
    """Tip-Adapter's post-training search (`search_hp`): the (beta, alpha) on the grids of `scale` and
    `steps` (beta first) with the highest accuracy of `cache_logits` on the labelled unit `features`; the
    first best in (beta, then alpha) order wins ties. Returns (alpha, beta, accuracy)."""
    zero_shot = 100.0 * features @ text_weights.T  # (n, N)
    sim = features @ keys.T  # (n, NK)
    best = (-1.0, 0.0, 0.0)
    for beta in search_grid(scale[0], steps[0]):
        residual = torch.exp(-beta * (1.0 - sim)) @ values  # (n, N)
        for alpha in search_grid(scale[1], steps[1]):
            acc = float(((zero_shot + alpha * residual).argmax(dim=1) == labels).float().mean())
            if acc > best[0]:
                best = (acc, float(alpha), float(beta))
    return best[1], best[2], best[0]


def few_shot_rows(labels: np.ndarray, n_classes: int, shots: int, seed: int) -> np.ndarray:
    """K positions per class drawn without replacement (seeded), class-major: CoOp's and Tip-Adapter's
    few-shot sample of a training split. ValueError naming the class when one has fewer than K."""
    rng = np.random.default_rng([seed, 0x5407])
    rows = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} training samples, needs {shots}")
        rows.append(np.sort(rng.choice(idx, size=shots, replace=False)))
    return np.concatenate(rows).astype(np.int64)
