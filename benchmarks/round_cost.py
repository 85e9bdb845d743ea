"""What a federated CacheFL round costs on Ray, against the floor: the same arithmetic in one plain
single-process torch loop (same features, partition, seeds, local training and FedAvg, no Ray).

For each setting it reports encoder calls against distinct images, the wall-time split (Ray start,
encoding, rounds), time per round and per client, and the runtime/floor ratio, all from one process run so
the ratio is measured under the same load. Usage:

    .venv/bin/python benchmarks/round_cost.py            # tiny config, 100 and 1,000 clients
    .venv/bin/python benchmarks/round_cost.py --rounds 10 --settings 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from raycache.config_file import load_config  # noqa: E402
from raycache.data.features import load_or_encode  # noqa: E402
from raycache.data.cache_source import cache_examples
from raycache.experiment import prepare, run_experiment  # noqa: E402
from raycache.methods.training import LocalRound  # noqa: E402
from raycache.federation.aggregate import WeightedSum  # noqa: E402
from raycache.federation.evaluate import predict  # noqa: E402
from raycache.federation.sampling import client_seed, sample_clients  # noqa: E402
from raycache.methods import method_class  # noqa: E402

SETTINGS = {
    "tiny": [],
    "100": ["data.clients=100", "data.alpha=0.1"],
    "1000": ["data.clients=1000", "data.alpha=0.1"],
    # Fashion-MNIST's 60,000 training images (Debian's dataset-fashion-mnist) over 10,000 clients, all of
    # them or 1% (100) a round. Dirichlet(0.1) leaves about 1,000 of 10,000 clients empty in every draw, so
    # no min_partition_size >= 1 is ever reached: empty clients get one sample from the largest instead.
    "10000": ["data.dataset=fashion_mnist", "data.clients=10000", "data.alpha=0.1"],
    "10000@0.01": ["data.dataset=fashion_mnist", "data.clients=10000", "data.alpha=0.1", "federation.fraction=0.01"],
}


def floor_rounds(cfg, rounds: int) -> tuple[list[float], list[float]]:
    """The yardstick: one process, one thread, a plain loop over clients doing what the runtime does, on the
    very split, partition and text classifier the run used (`prepare` derives them from the config).
    Returns (seconds, test accuracy) per round; the accuracies equal the runtime's (tested)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _floor(cfg, rounds)
    finally:
        torch.set_num_threads(threads)


def _floor(cfg, rounds: int) -> tuple[list[float], list[float]]:
    prep = prepare(cfg)
    feats = load_or_encode(prep.source, prep.spec, prep.cfg.runtime).features
    y, splits, parts = prep.source.labels, prep.splits, prep.parts
    train_f, train_y = feats[splits.train], y[splits.train]
    method = method_class(prep.cfg.method.name)(prep.cfg.method, prep.task)
    cache_f, cache_y = feats[splits.server], y[splits.server]
    if prep.uses_cache:  # the same keys the runtime builds (augmented views, synthetic set, ...)
        cache_f, cache_y, _ = cache_examples(prep.cfg, prep.spec, prep.source, splits, feats, prep.synth_store,
                                             splits.train[prep.trainers[0]])
    state = method.init_state(cache_f, cache_y)
    times, accuracy = [], []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        total = WeightedSum()
        for c in sample_clients(len(parts), cfg.federation.fraction, cfg.seed, r):
            idx = parts[c]
            update, _ = method.local_train(state, torch.from_numpy(train_f[idx]), torch.from_numpy(train_y[idx]),
                                           LocalRound(client_seed(cfg.seed, r, int(c)), r, cfg.federation.rounds))
            total.add(update, float(len(idx)))
        state = total.mean()
        # the runtime evaluates every round, on the test and the validation splits
        pred = predict(lambda f: method.logits(state, f), feats[splits.test])
        if len(splits.val):
            predict(lambda f: method.logits(state, f), feats[splits.val])
        times.append(time.perf_counter() - t0)
        accuracy.append(float((pred == y[splits.test]).mean()))
    return times, accuracy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--actors", type=int, default=None, help="client actors (default: the config's, 2)")
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="raycache-bench-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    rows = []
    for name in args.settings:
        cfg = load_config("experiments/tiny.yaml", SETTINGS[name] + [
            f"federation.rounds={args.rounds}", f"runtime.cache_dir={store}/{name}", "tracking.experiment=benchmark",
            *([f"runtime.client_actors={args.actors}"] if args.actors else [])])
        s = run_experiment(cfg)  # an empty feature store each: every setting pays its own encode and Ray start
        ray.shutdown()
        rt = [m["round_seconds"] for m in s.history]
        fl, _ = floor_rounds(cfg, args.rounds)
        # Round 1 pays one-off warm-up (first torch calls in each actor); medians skip nothing but are robust.
        rt_med, fl_med = statistics.median(rt), statistics.median(fl)
        clients = int(s.history[0]["clients_sampled"])
        rows.append((name, clients, s.encoded, s.distinct_images, s.timings["time_ray_start_s"],
                     s.timings["time_encode_s"], s.timings["time_rounds_s"], rt_med, 1000 * rt_med / clients,
                     fl_med, 1000 * (rt_med - fl_med) / clients, rt_med / fl_med, s.final["accuracy"]))
        print(f"[{name}] rounds (s): runtime {[round(x, 3) for x in rt]}  floor {[round(x, 3) for x in fl]}",
              file=sys.stderr)
    head = ("setting", "clients", "encoded", "distinct", "ray_s", "encode_s", "rounds_s", "round_s",
            "ms/client", "floor_s", "overhead_ms/client", "ratio", "acc")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) if isinstance(x, (int, str)) else f"{x:.3f}" for x in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
