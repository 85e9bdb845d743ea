"""Accuracy maths and the evaluation sets.

- `EvalSets`: the global test split (reported), the global validation split (selected on) and the clients'
  own held-out samples (each client's local test set, with the client that owns each row).
- Global test accuracy, per-class accuracy, each client's accuracy under its own label distribution (sum over
  classes of its class share times the per-class test accuracy: a re-weighting of the global test, not a
  held-out test), and each client's accuracy on its own held-out samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from raycache.lazy import lazy_module

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it


@dataclass(frozen=True)
class EvalSets:
    test: tuple[np.ndarray, np.ndarray]  # (inputs, labels)
    val: tuple[np.ndarray, np.ndarray] | None = None  # None: data.val_fraction = 0
    client: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (inputs, labels, owner); None: no local tests

    def client_rows(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """One client's own held-out (inputs, labels)."""
        inputs, labels, owner = self.client
        mine = owner == cid
        return inputs[mine], labels[mine]


IMAGE_CHUNK = 256  # images decoded and pushed through the encoder at once: 256 x 3 x 224^2 floats = 154 MB


def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], inputs: np.ndarray, chunk: int = 4096,
            device: str | torch.device = "cpu") -> np.ndarray:
    """Predicted classes for `inputs`, `chunk` rows at a time (features), or at most IMAGE_CHUNK images at a
    time (images, decoded a chunk at a time: 4,096 images at 224 px would be 2.5 GB of pixels before the
    encoder's activations)."""
    if len(inputs) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([z.argmax(dim=1).cpu().numpy() for z in _chunks(logits_fn, inputs, chunk, device)])


def logits(logits_fn: Callable[[torch.Tensor], torch.Tensor], inputs: np.ndarray, chunk: int = 4096,
           device: str | torch.device = "cpu") -> np.ndarray:
    """(n, classes) logits for `inputs`, chunked as `predict` chunks them."""
    parts = [z.float().cpu().numpy() for z in _chunks(logits_fn, inputs, chunk, device)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _chunks(logits_fn, inputs, chunk: int, device):
    from raycache.data.pixels import ImageRows, materialize

    if isinstance(inputs, ImageRows):
        chunk = min(chunk, IMAGE_CHUNK)
    x = inputs if isinstance(inputs, ImageRows) else torch.from_numpy(np.ascontiguousarray(inputs))
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            yield logits_fn(materialize(x[i:i + chunk]).to(device))


def tune(method, state, evals: EvalSets) -> dict[str, float]:
    """`method`'s post-training search for `state` on the validation split (Tip-Adapter's alpha and beta);
    {} without one. Run on a client host for the server, or by the server itself when no host answers."""
    from raycache.data.pixels import to_device

    if evals.val is None:
        return {}
    inputs, labels = evals.val
    return method.tune(state, to_device(inputs, "cpu"), torch.from_numpy(np.asarray(labels)))


def slice_rows(inputs, start: int = 0, stop: int | None = None):
    """Rows [start, stop) of an evaluation split's inputs (features, or `ImageRows`); the whole split is
    itself, not a copy."""
    if start == 0 and (stop is None or stop >= len(inputs)):
        return inputs
    return inputs[start:stop]


def row_pieces(lengths: dict[str, int], n_hosts: int) -> list[list[tuple[str, int, int]]]:
    """The evaluation splits' rows cut into one share per host, in order: host h gets rows
    [h * total / n_hosts, (h + 1) * total / n_hosts) of the splits laid end to end, as (split, start, stop)
    pieces. Shares differ by at most one row, whatever the splits' sizes (a 10,000-row test split and a
    6,000-row validation split on two hosts: 8,000 rows each, not 10,000 and 6,000)."""
    total = sum(lengths.values())
    bounds = [round(h * total / n_hosts) for h in range(n_hosts + 1)]
    shares: list[list[tuple[str, int, int]]] = []
    for h in range(n_hosts):
        lo, hi, offset, share = bounds[h], bounds[h + 1], 0, []
        for name, n in lengths.items():
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                share.append((name, a - offset, b - offset))
            offset += n
        shares.append(share)
    return shares


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    totals = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[pred == labels], minlength=n_classes)
    return np.divide(hits, totals, out=np.zeros(n_classes), where=totals > 0)


def client_accuracy(class_counts: np.ndarray, per_class_acc: np.ndarray) -> np.ndarray:
    """(clients, classes) counts and per-class accuracy -> (clients,) expected accuracy on each client's mix.
    `per_class_acc` is (classes,) for one shared model, or (clients, classes) when each client has its own."""
    share = class_counts / np.maximum(class_counts.sum(axis=1, keepdims=True), 1)
    return (share * per_class_acc).sum(axis=1)


def owner_accuracy(pred: np.ndarray, labels: np.ndarray, owner: np.ndarray, n_clients: int) -> np.ndarray:
    """(clients,) accuracy of `pred` on each client's own rows (`owner[i]` is row i's client)."""
    hits = np.bincount(owner, weights=(pred == labels).astype(np.float64), minlength=n_clients)
    totals = np.bincount(owner, minlength=n_clients)
    return np.divide(hits, totals, out=np.zeros(n_clients), where=totals > 0)


def summarise(test_acc: float, val_acc: float | None, client_acc: np.ndarray,
              local_acc: np.ndarray | None) -> dict[str, float]:
    """The per-round evaluation metrics."""
    out = {"accuracy": float(test_acc), "client_accuracy_mean": float(client_acc.mean()),
           "client_accuracy_std": float(client_acc.std())}
    if val_acc is not None:
        out["val_accuracy"] = float(val_acc)
    if local_acc is not None:
        out["local_accuracy_mean"] = float(local_acc.mean())
        out["local_accuracy_std"] = float(local_acc.std())
    return out
