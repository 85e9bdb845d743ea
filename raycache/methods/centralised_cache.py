"""Centralised cache fine-tuning on the union of every client's data: the accuracy ceiling CacheFL's federated
cache approaches. The same cache (keys from `method.cache_init`, synthetic by default, as CacheFL's) trained
Tip-Adapter-F style by one trainer holding all the clients' samples; each round is `local_epochs` epochs.
Like Tip-Adapter-F's reference, one AdamW and one cosine schedule span the whole run.

Its flow is `pooled`: one trainer on the clients' pooled samples; nothing travels.
"""

from __future__ import annotations

from raycache.federation.flows import POOLED
from raycache.methods.cachefl import CacheFL, CacheFLSettings
from raycache.methods.settings import PooledCacheSettings, reference

CentralisedCacheSettings = reference(
    PooledCacheSettings, "CentralisedCacheSettings", "The cache trained on the clients' pooled data.",
    **{**{k: f.default for k, f in CacheFLSettings.model_fields.items() if k != "name"},
       "persist_optimizer": True, "schedule": "cosine_run"})


class CentralisedCache(CacheFL):
    name = "centralised_cache"
    Settings = CentralisedCacheSettings
    flow = POOLED
