"""Zero-shot classifier weights from class names and prompt templates."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def text_classifier(model, tokenizer, class_names: list[str], templates: list[str]) -> np.ndarray:
    """(N, D) L2-normalised text embeddings, one per class, averaged over templates then re-normalised."""
    rows = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates])  # (T, ctx)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)  # (T, D)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows).numpy()  # (N, D)
