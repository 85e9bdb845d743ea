"""Tip-Adapter and Tip-Adapter-F (Zhang et al. 2022) as the paper means them: K labelled shots per class drawn
(seeded) from the training data are the cache, and Tip-Adapter-F fine-tunes the keys on those same shots,
nothing more. `method.training_free: true` keeps the keys fixed (Tip-Adapter).

Matched with the reference (gaopengcuhk/Tip-Adapter, main.py and utils.py): keys are the mean raw feature of
10 augmented views, normalised; AdamW lr 1e-3 eps 1e-4; one cosine schedule over every step of the run
(`schedule: cosine_run`, 20 rounds of one epoch = the reference's 20 epochs); the best epoch kept (here on
validation, not test); alpha and beta then grid-searched on validation. Not matched: the reference draws a
fresh augmentation of each shot every batch; here the shots train on their stored centre-crop features.

One pooled trainer holds the shots (flow `pooled`); nothing travels.
"""

from __future__ import annotations

from pydantic import Field

from raycache.federation.flows import POOLED
from raycache.methods.base import Frozen, State
from raycache.methods.cachefl import CacheFL, CacheFLSettings
from raycache.methods.settings import PooledCacheSettings, reference


class _TipSettings(PooledCacheSettings):
    training_free: bool = Field(False, description="keep the cache keys fixed (Tip-Adapter); false = fine-tune "
                                                   "them (Tip-Adapter-F)")


TipAdapterSettings = reference(
    _TipSettings, "TipAdapterSettings", "Tip-Adapter(-F): K shots per class as the cache, one trainer.",
    **{**{k: f.default for k, f in CacheFLSettings.model_fields.items() if k != "name"},
       "persist_optimizer": True, "schedule": "cosine_run", "cache_init": "shots"})


class TipAdapter(CacheFL):
    name = "tip_adapter"
    Settings = TipAdapterSettings
    flow = POOLED

    def local_train(self, state: State, inputs, labels, ctx) -> tuple[State, float]:
        if self.cfg.training_free:  # the keys stay: a round only measures the loss
            return Frozen.local_train(self, state, inputs, labels, ctx)
        return super().local_train(state, inputs, labels, ctx)
