"""CacheFL (arXiv 2505.05130): a Tip-Adapter-F cache whose keys clients fine-tune and the server averages.

Keys are initialised from K class-balanced labelled images per class held by the server; values are fixed
one-hot labels, so only the keys (N*K x D floats) ever travel. Each key is the mean raw feature of
`method.augment_views` augmented views of its image, then normalised (Tip-Adapter's cache; see
`raycache.data.cache_source`). After training, alpha and beta are grid-searched on the validation split
(`method.search`, Tip-Adapter's `search_hp`) and the result carries the pair found.
"""

from __future__ import annotations


import numpy as np

from raycache.lazy import lazy_module
from raycache.methods.base import Method, State
from raycache.methods.cache_model import (cache_logits, cache_residual, class_balanced_keys, one_hot_values,
                                          search_alpha_beta)
from raycache.methods.settings import CacheSettings, reference

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")

# Tip-Adapter-F's optimiser (AdamW 1e-3, eps 1e-4, torch's default betas and weight decay); batch 256 covers a
# typical client's data in one step; a fresh optimiser each round, as the cache arrives new each round.
CacheFLSettings = reference(CacheSettings, "CacheFLSettings", "CacheFL: a Tip-Adapter-F cache, federated.",
                            lr=1e-3, optimizer="adamw", betas=(0.9, 0.999), eps=1e-4, weight_decay=0.01,
                            local_epochs=1, batch_size=256, schedule="cosine", persist_optimizer=False,
                            cache_init="synthetic")


class CacheFL(Method):
    name = "cachefl"
    Settings = CacheFLSettings
    fused_optimizer = True  # one kernel per step: the per-op overhead of the unfused step dominates here

    @classmethod
    def uses_cache(cls, settings) -> bool:
        return True

    def __init__(self, cfg, task) -> None:
        super().__init__(cfg, task)
        self.values = one_hot_values(task.n_classes, self.cfg.shots)  # (NK, N)

    def to(self, device) -> "CacheFL":
        super().to(device)
        self.values = self.values.to(self.device)
        return self

    @classmethod
    def class_rows(cls, settings, n_classes: int) -> dict[str, np.ndarray]:
        return {"cache_keys": np.repeat(np.arange(n_classes), settings.shots)}  # class-major rows

    def init_state(self, server_features: np.ndarray, server_labels: np.ndarray) -> State:
        keys = class_balanced_keys(server_features, server_labels, self.task.n_classes, self.cfg.shots)
        return {"cache_keys": keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)}

    def _alpha_beta(self, state: State) -> tuple[float, float]:
        """The searched pair when the state carries one (a tuned result), else the configured one."""
        if "alpha" in state:
            return float(np.asarray(state["alpha"]).reshape(-1)[0]), float(np.asarray(state["beta"]).reshape(-1)[0])
        return self.cfg.alpha, self.cfg.beta

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        keys = torch.as_tensor(state["cache_keys"], device=self.device)
        return cache_logits(F.normalize(features, dim=-1), self.text_weights, keys, self.values,
                            *self._alpha_beta(state))

    def tune(self, state: State, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        if not self.cfg.search:
            return {}
        keys = torch.as_tensor(state["cache_keys"], device=self.device)
        alpha, beta, _ = search_alpha_beta(F.normalize(features.to(self.device), dim=-1), self.text_weights, keys,
                                           labels.to(self.device), self.cfg.search_scale, self.cfg.search_step,
                                           (self.cfg.alpha, self.cfg.beta))
        return {"alpha": alpha, "beta": beta}

    def trainables(self, state: State) -> dict[str, torch.Tensor]:
        return {"cache_keys": torch.tensor(state["cache_keys"], device=self.device, requires_grad=True)}  # (NK, D)

    def prepare(self, features: torch.Tensor):
        features = F.normalize(features, dim=-1)  # Tip-Adapter's maths is on unit features
        return features, 100.0 * features @ self.text_weights.T  # (n, D), and the zero-shot logits (n, N)

    def batch_loss(self, params, inputs, labels) -> torch.Tensor:
        features, zero_shot = inputs
        residual = cache_residual(features, params["cache_keys"], self.values, self.cfg.alpha, self.cfg.beta)
        return F.cross_entropy(zero_shot + residual, labels)
