"""Tip-Adapter cache-model maths (Zhang et al. 2022), as pure functions.

    A = exp(-beta * (1 - f @ Fk.T))          affinity, (B, NK)
    logits = 100 * f @ W.T + alpha * A @ L   (B, N)
"""

from __future__ import annotations

import numpy as np

from raycache.lazy import lazy_module

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it


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


def search_alpha_beta(features: torch.Tensor, text_weights: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
                      scale: tuple[float, float], steps: tuple[int, int], current: tuple[float, float],
                      chunk: int = 4096) -> tuple[float, float, float]:
    """Tip-Adapter's post-training search (`search_hp`): the (beta, alpha) on the grids of `scale` and
    `steps` (beta first) with the highest accuracy of `cache_logits` on the labelled unit `features`; the
    first best in (beta, then alpha) order wins ties, and the `current` (alpha, beta) is kept unless the grid
    beats it. Keys are class-major, K per class (one-hot values: A @ L sums each class's K affinities).
    Validation rows go `chunk` at a time, so memory stays (chunk x NK). Returns (alpha, beta, accuracy)."""
    n_classes = text_weights.shape[0]
    betas, alphas = search_grid(scale[0], steps[0]), search_grid(scale[1], steps[1])
    hits = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=features.device)  # counted where
    kept = torch.zeros((), dtype=torch.long, device=features.device)  # the features are (a host's GPU)
    for start in range(0, len(labels), chunk):
        f, y = features[start:start + chunk], labels[start:start + chunk]
        zero_shot = 100.0 * f @ text_weights.T  # (c, N)
        sim = f @ keys.T  # (c, NK)

        def residual(beta: float) -> torch.Tensor:  # alpha-free cache logits, (c, N)
            return torch.exp(-beta * (1.0 - sim)).view(len(f), n_classes, -1).sum(-1)

        kept += ((zero_shot + current[0] * residual(current[1])).argmax(dim=1) == y).sum()
        for i, beta in enumerate(betas):
            res = residual(float(beta))
            for j, alpha in enumerate(alphas):
                hits[i, j] += ((zero_shot + float(alpha) * res).argmax(dim=1) == y).sum()
    best = int(torch.argmax(hits))  # the first maximum in (beta, alpha) order
    i, j = divmod(best, len(alphas))
    if int(hits[i, j]) <= int(kept):
        return float(current[0]), float(current[1]), int(kept) / len(labels)
    return float(alphas[j]), float(betas[i]), int(hits[i, j]) / len(labels)

