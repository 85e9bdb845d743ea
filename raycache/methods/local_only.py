"""Local-only training: each client trains its own cache (CacheFL's) or adapter (FedCLIP's) on its own data
and never shares it. What federation buys is the gap between this and the federated method.

The runtime keeps one state per client on that client's host (`role = "local"`); nothing is uploaded or
averaged, and each client is evaluated with its own state. The cache methods' alpha/beta search is not run
here (`tune` is the base's: none): each client would have to search on its own held-out samples.
"""

from __future__ import annotations

from raycache.methods.base import Method, State
from raycache.methods.cachefl import CacheFL
from raycache.methods.fedclip import FedCLIP

INNER = {"cache": CacheFL, "adapter": FedCLIP}


class LocalOnly(Method):
    name = "local_only"
    role = "local"

    @classmethod
    def uses_cache(cls, cfg) -> bool:
        return INNER[cfg.local_model].uses_cache(cfg)

    @classmethod
    def reference(cls, cfg) -> dict:
        return INNER[cfg.local_model].reference(cfg)

    def __init__(self, cfg, task) -> None:
        super().__init__(cfg, task)
        self.inner = INNER[self.cfg.local_model](self.cfg, task)

    def to(self, device) -> "LocalOnly":
        super().to(device)
        self.inner.to(device)
        return self

    def init_state(self, server_features, server_labels) -> State:
        return self.inner.init_state(server_features, server_labels)

    def logits(self, state, inputs):
        return self.inner.logits(state, inputs)

    def local_train(self, state, inputs, labels, seed, memory=None, round_idx=1):
        return self.inner.local_train(state, inputs, labels, seed, memory, round_idx)
