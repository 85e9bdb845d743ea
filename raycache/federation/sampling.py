"""Which clients train in a round (a seeded sample of max(1, round(fraction * clients)), sorted) and which
client host trains each of them."""

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


def home_host(client, n_hosts: int):
    """The host that keeps a client's own state (its optimiser memory, a personal state) across rounds (an
    id, or an array of ids)."""
    return client % n_hosts


def assign_hosts(clients: np.ndarray, sizes: np.ndarray, n_hosts: int, pinned: bool) -> list[np.ndarray]:
    """The sampled `clients` each host trains this round, in ascending order.

    `pinned` (clients keep state on their host): each on its home host. Otherwise dealt by size: largest
    first, in snake order (hosts 0..h-1, then h-1..0, ...), so that every host gets the same number of
    clients (to one) and about the same number of samples: a client's local training has a fixed cost and a
    cost per sample, and with ids taken modulo the hosts, 100 sampled clients split 44/56 or 260/300 samples.
    Deterministic: a replayed or resumed round assigns as the original did (the updates do not depend on the
    host: each client's training is seeded by (seed, round, client))."""
    clients = np.asarray(clients, np.int64)
    if pinned or n_hosts == 1:
        home = home_host(clients, n_hosts)
        return [clients[home == h] for h in range(n_hosts)]
    order = clients[np.argsort(-np.asarray(sizes)[clients], kind="stable")]
    lap = np.arange(len(order)) % (2 * n_hosts)
    host = np.where(lap < n_hosts, lap, 2 * n_hosts - 1 - lap)
    return [np.sort(order[host == h]) for h in range(n_hosts)]
