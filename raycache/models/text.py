"""Zero-shot classifier weights from class names and prompt templates."""

from __future__ import annotations

import numpy as np

from raycache.lazy import lazy_module

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")


def prompt_tokens(tokenizer, class_names: list[str], templates: list[str] | tuple[str, ...]) -> torch.Tensor:
    """(N * T, ctx) tokens, class-major: rows c*T .. c*T+T-1 are class c under each template."""
    return tokenizer([t.format(name) for name in class_names for t in templates])


def class_embeddings(model, tokens: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, D) unit text embeddings: each class's prompts encoded, normalised, averaged over templates and
    re-normalised. Differentiable, for methods that adapt the text tower."""
    emb = F.normalize(model.encode_text(tokens).float(), dim=-1)  # (N*T, D)
    return F.normalize(emb.view(n_classes, -1, emb.shape[-1]).mean(dim=1), dim=-1)


def text_classifier(model, tokenizer, class_names: list[str], templates: list[str]) -> np.ndarray:
    """(N, D) L2-normalised text embeddings, one per class, averaged over templates then re-normalised."""
    with torch.no_grad():
        return class_embeddings(model, prompt_tokens(tokenizer, class_names, templates), len(class_names)).numpy()
