"""Centralised cache fine-tuning on the union of every client's data: the accuracy ceiling CacheFL's federated
cache approaches. The same cache (keys from `method.cache_init`, synthetic by default, as CacheFL's) trained
Tip-Adapter-F style by one trainer holding all the clients' samples; each round is `local_epochs` epochs.
Like Tip-Adapter-F's reference, one AdamW and one cosine schedule span the whole run.

The runtime pools every client's samples into one trainer (`role = "centralised"`); nothing travels.
"""

from __future__ import annotations

from raycache.methods.cachefl import CacheFL


class CentralisedCache(CacheFL):
    name = "centralised_cache"
    role = "centralised"
    defaults = {**CacheFL.defaults, "persist_optimizer": True, "schedule": "cosine_run"}
