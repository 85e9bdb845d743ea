"""Accuracy maths: global test accuracy, per-class accuracy, and each client's accuracy under its own
label distribution (sum over classes of its class share times the per-class test accuracy)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


@torch.no_grad()
def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], inputs: np.ndarray, chunk: int = 4096,
            device: str | torch.device = "cpu") -> np.ndarray:
    """Predicted classes for `inputs` (features or images), `chunk` at a time."""
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    return np.concatenate([logits_fn(x[i:i + chunk].to(device)).argmax(dim=1).cpu().numpy()
                           for i in range(0, len(x), chunk)])


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    totals = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[pred == labels], minlength=n_classes)
    return np.divide(hits, totals, out=np.zeros(n_classes), where=totals > 0)


def client_accuracy(class_counts: np.ndarray, per_class_acc: np.ndarray) -> np.ndarray:
    """(clients, classes) counts and per-class accuracy -> (clients,) expected accuracy on each client's mix.
    `per_class_acc` is (classes,) for one shared model, or (clients, classes) when each client has its own."""
    share = class_counts / np.maximum(class_counts.sum(axis=1, keepdims=True), 1)
    return (share * per_class_acc).sum(axis=1)
