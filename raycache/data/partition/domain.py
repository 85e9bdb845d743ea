"""Feature shift: one client per domain (FedCLIP's PACS setting), in the source's domain order."""

from __future__ import annotations

import numpy as np

from raycache.errors import UserError


def partition(labels: np.ndarray, cfg, rng: np.random.Generator, domains: np.ndarray | None = None,
              ) -> list[np.ndarray]:
    if domains is None:
        raise UserError("data.partition: domain needs a source with domains (an ImageFolder laid out as "
                        "root/<domain>/<class>/... or a Parquet file with a data.domain_column)")
    present = np.unique(domains)
    if cfg.clients != len(present):
        raise UserError(f"data.clients: partition domain makes one client per training domain, and there are "
                        f"{len(present)}; set data.clients={len(present)}")
    return [np.flatnonzero(domains == d) for d in present]
