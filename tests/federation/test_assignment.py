"""Which host trains which sampled client, and which rows of the evaluation splits each host predicts.

Stated independently of the code: every sampled client is trained exactly once per round; a client that keeps
state on its host always trains there; otherwise the hosts' shares differ by at most one client and by at
most one client's size in samples (the bound of dealing sorted sizes in snake order); each evaluation row is
predicted exactly once, in contiguous pieces, and the hosts' shares differ by at most one row.
"""

from __future__ import annotations

import numpy as np
import pytest

from raycache.federation.evaluate import row_pieces, slice_rows
from raycache.federation.host import ClientRows
from raycache.federation.sampling import assign_hosts, home_host, sample_clients


def _skewed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.pareto(1.2, n) * 5).astype(np.int64)  # heavy-tailed, like Dirichlet(0.1) clients


@pytest.mark.parametrize("n_hosts", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unpinned_clients_are_shared_evenly(n_hosts, seed):
    sizes = _skewed(10_000, seed)
    sampled = sample_clients(10_000, 0.01, seed, 3)
    shares = assign_hosts(sampled, sizes, n_hosts, pinned=False)
    assert len(shares) == n_hosts
    assert sorted(np.concatenate(shares).tolist()) == sampled.tolist()  # each sampled client exactly once
    assert all((np.diff(s) > 0).all() for s in shares)  # ascending, as the hosts train them
    counts = [len(s) for s in shares]
    loads = [int(sizes[s].sum()) for s in shares]
    assert max(counts) - min(counts) <= 1
    assert max(loads) - min(loads) <= sizes[sampled].max()
    again = assign_hosts(sampled, sizes, n_hosts, pinned=False)  # deterministic: a replayed round matches
    assert [s.tolist() for s in shares] == [s.tolist() for s in again]


def test_even_shares_beat_ids_modulo_hosts_on_skewed_clients():
    sizes = _skewed(10_000, 0)
    worst_mod, worst_even = 0, 0
    for r in range(1, 21):
        sampled = sample_clients(10_000, 0.01, 0, r)
        mod = [sizes[sampled[sampled % 2 == h]].sum() for h in range(2)]
        even = [sizes[s].sum() for s in assign_hosts(sampled, sizes, 2, pinned=False)]
        worst_mod, worst_even = max(worst_mod, max(mod) / np.mean(mod)), max(worst_even, max(even) / np.mean(even))
    assert worst_even < worst_mod


def test_pinned_clients_train_on_their_home_host():
    sizes = _skewed(1_000, 3)
    sampled = sample_clients(1_000, 0.1, 0, 1)
    for h, share in enumerate(assign_hosts(sampled, sizes, 3, pinned=True)):
        assert share.tolist() == [c for c in sampled.tolist() if home_host(c, 3) == h]


@pytest.mark.parametrize("lengths,n_hosts", [({"test": 10_000, "val": 6_000}, 2), ({"test": 7, "val": 0, "client": 5}, 3),
                                             ({"test": 3}, 5), ({"test": 1_000, "val": 100, "client": 37}, 4)])
def test_row_pieces_cover_every_row_once_in_equal_shares(lengths, n_hosts):
    shares = row_pieces(lengths, n_hosts)
    assert len(shares) == n_hosts
    seen = {name: np.zeros(n, int) for name, n in lengths.items()}
    for share in shares:
        for name, start, stop in share:
            assert 0 <= start < stop <= lengths[name]
            seen[name][start:stop] += 1
    assert all((v == 1).all() for v in seen.values())
    sizes = [sum(stop - start for _, start, stop in share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    # a split's pieces, host after host, are in row order (the server concatenates them so)
    for name in lengths:
        starts = [start for share in shares for n, start, _ in share if n == name]
        assert starts == sorted(starts)


def test_two_hosts_split_test_and_validation_evenly():
    assert row_pieces({"test": 10_000, "val": 6_000}, 2) == [[("test", 0, 8_000)],
                                                             [("test", 8_000, 10_000), ("val", 0, 6_000)]]


def test_slice_rows_is_the_split_itself_when_whole():
    x = np.arange(10)
    assert slice_rows(x) is x and slice_rows(x, 0, 10) is x
    assert slice_rows(x, 2, 5).tolist() == [2, 3, 4]


def test_client_rows_pack_every_clients_rows():
    parts = [np.array([5, 1]), np.array([], np.int64), np.array([7]), np.arange(20, 25)]
    rows = ClientRows.pack(parts)
    assert len(rows) == 4
    assert all(rows[c].tolist() == parts[c].tolist() for c in range(4))


def test_a_server_without_hosts_computes_what_the_method_does():
    """The server's own fallback (no host answers): the initial state, each split's accuracy and the
    validation search, each equal to the method's own maths on the same arrays."""
    import torch

    from raycache.config import FederationConfig, settings_for
    from raycache.federation.evaluate import EvalSets
    from raycache.federation.server import Server
    from raycache.methods.base import Task
    from raycache.methods.cachefl import CacheFL

    rng = np.random.default_rng(4)
    n, d = 4, 16
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    text = unit(rng.normal(size=(n, d))).astype(np.float32)
    centers = unit(rng.normal(size=(n, d)))

    def draw(k: int):
        y = np.repeat(np.arange(n), k)
        return (centers[y] + 0.8 * rng.normal(size=(len(y), d))).astype(np.float32), y

    server_data, test, val = draw(4), draw(25), draw(15)
    settings = settings_for("cachefl", shots=4, cache_init="real", alpha=3.0, beta=4.0, search=True,
                            search_scale=[5.0, 5.0], search_step=[5, 5])
    task = Task(list("abcd"), text)
    server = Server(CacheFL, settings, task, EvalSets(test, val), server_data, np.ones((3, n)), [], 3,
                    FederationConfig(), 0)
    method = CacheFL(settings, task)
    state = method.init_state(*server_data)
    assert np.array_equal(server.state["cache_keys"], state["cache_keys"])
    metrics = server.start()  # round 0: the initial state evaluated, and offered for selection
    for name, (x, y) in {"accuracy": test, "val_accuracy": val}.items():
        pred = method.logits(state, torch.from_numpy(x)).argmax(1).numpy()
        assert metrics[name] == pytest.approx((pred == y).mean())
    searched = method.tune(state, torch.from_numpy(val[0]), torch.from_numpy(val[1]))
    result = server.result("final")["metrics"]
    assert (result["searched_alpha"], result["searched_beta"]) == (searched["alpha"], searched["beta"])
