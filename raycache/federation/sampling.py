"""Which clients train in a round: a seeded sample of max(1, round(fraction * clients)), sorted."""

from __future__ import annotations

import numpy as np


def sample_clients(n_clients: int, fraction: float, seed: int, round_idx: int) -> np.ndarray:
    k = max(1, int(round(fraction * n_clients)))
    if k >= n_clients:
        return np.arange(n_clients)
    rng = np.random.default_rng([seed, 0x5A, round_idx])
    return np.sort(rng.choice(n_clients, size=k, replace=False))


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """Seed of one client's local training in one round: independent of which actor hosts it."""
    return int(np.random.SeedSequence([seed, round_idx, client]).generate_state(1)[0])
