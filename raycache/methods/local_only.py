"""Local-only training: each client trains its own cache (CacheFL's) or adapter (FedCLIP's) on its own data
and never shares it. What federation buys is the gap between this and the federated method.

Its flow is `personal`: one state per client on that client's host; nothing is uploaded or averaged, and
each client is evaluated with its own state. The cache methods' alpha/beta search is not run here (`tune` is
the base's: none): each client would have to search on its own held-out samples. Settings left unset take
the reference of the method it trains alone (`local_model`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raycache.federation.flows import PERSONAL
from raycache.methods.base import Method, State
from raycache.methods.cachefl import CacheFL
from raycache.methods.fedclip import FedCLIP
from raycache.methods.settings import CacheSettings, LossSettings

INNER = {"cache": CacheFL, "adapter": FedCLIP}


class LocalOnlySettings(CacheSettings, LossSettings):
    """Local-only: each client trains a cache or an adapter alone."""

    local_model: Literal["cache", "adapter"] = Field("cache", description="what each client trains alone: a "
                                                                          "CacheFL cache or a FedCLIP adapter")

    @model_validator(mode="before")
    @classmethod
    def _inner_reference(cls, data):
        """Unset settings take the reference of the method trained alone."""
        if not isinstance(data, dict):
            return data
        inner = INNER.get(data.get("local_model", "cache"))
        if inner is None:
            return data  # the field's own check names the bad value
        defaults = {k: f.default for k, f in inner.Settings.model_fields.items() if k != "name"}
        return {**defaults, **data}


class LocalOnly(Method):
    name = "local_only"
    Settings = LocalOnlySettings
    flow = PERSONAL

    @classmethod
    def uses_cache(cls, settings) -> bool:
        return INNER[settings.local_model].uses_cache(settings)

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

    def local_train(self, state, inputs, labels, ctx):
        return self.inner.local_train(state, inputs, labels, ctx)
