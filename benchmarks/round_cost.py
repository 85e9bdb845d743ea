"""What a federated CacheFL round costs on Ray, against the floor: the same arithmetic in one plain
single-process torch loop (same features, partition, seeds, local training and FedAvg, no Ray).

For each setting it reports encoder calls against distinct images, the wall-time split (Ray start,
encoding, rounds), time per round and per client, and the runtime/floor ratio, all from one process run,
each floor round right after the runtime's round of the same number, so that the ratio is measured under
the same load. Usage:

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
    floor = Floor(cfg)
    times, accuracy = zip(*(floor.round(r) for r in range(1, rounds + 1)))
    return list(times), list(accuracy)


class Floor:
    """The floor's rounds one at a time, so that `main` can run each right after the runtime's round of the
    same number: both then see the same load on a shared machine."""

    def __init__(self, cfg) -> None:
        prep = prepare(cfg)
        self.cfg = cfg
        self.feats = load_or_encode(prep.source, prep.spec, prep.cfg.runtime).features
        self.y, self.splits, self.parts = prep.source.labels, prep.splits, prep.parts
        self.train_f, self.train_y = self.feats[self.splits.train], self.y[self.splits.train]
        self.method = method_class(prep.cfg.method.name)(prep.cfg.method, prep.task)
        cache_f, cache_y = self.feats[self.splits.server], self.y[self.splits.server]
        if prep.uses_cache:  # the same keys the runtime builds (augmented views, synthetic set, ...)
            cache_f, cache_y, _ = cache_examples(prep.cfg, prep.spec, prep.source, self.splits, self.feats,
                                                 prep.synth_store, self.splits.train[prep.trainers[0]])
        self.state = self.method.init_state(cache_f, cache_y)

    def round(self, r: int) -> tuple[float, float]:
        """(seconds, test accuracy) of round `r`, on one thread."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._round(r)
        finally:
            torch.set_num_threads(threads)

    def _round(self, r: int) -> tuple[float, float]:
        cfg, method, splits = self.cfg, self.method, self.splits
        t0 = time.perf_counter()
        total = WeightedSum()
        for c in sample_clients(len(self.parts), cfg.federation.fraction, cfg.seed, r):
            idx = self.parts[c]
            update, _ = method.local_train(self.state, torch.from_numpy(self.train_f[idx]),
                                           torch.from_numpy(self.train_y[idx]),
                                           LocalRound(client_seed(cfg.seed, r, int(c)), r, cfg.federation.rounds))
            total.add(update, float(len(idx)))
        self.state = state = total.mean()
        # the runtime evaluates every round, on the test and the validation splits
        pred = predict(lambda f: method.logits(state, f), self.feats[splits.test])
        if len(splits.val):
            predict(lambda f: method.logits(state, f), self.feats[splits.val])
        seconds = time.perf_counter() - t0
        return seconds, float((pred == self.y[splits.test]).mean())


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
        # Each floor round runs right after the runtime's round of the same number (the hosts idle then), so
        # that the two see the same load on a shared machine; the floor is built after the run has encoded.
        fl: list[float] = []
        floor: list[Floor] = []
        marks: list[tuple[float, float]] = []  # (callback entered, left): the driver's loop between them

        def floor_round(r: int, _metrics) -> None:
            entered = time.perf_counter()
            if not floor:
                floor.append(Floor(cfg))
            fl.append(floor[0].round(r)[0])
            marks.append((entered, time.perf_counter()))

        s = run_experiment(cfg, on_round=floor_round)  # an empty feature store each: its own encode, Ray start
        ray.shutdown()
        rt = [m["round_seconds"] for m in s.history]
        # The driver's wall time per round: from leaving round r-1's callback to entering round r's (the round
        # as the driver waits for it, plus its snapshot and whatever of round r-1's checkpoint and metrics
        # writing the round did not hide), without the floor's rounds, which run inside the callbacks.
        loop = [marks[i][0] - marks[i - 1][1] for i in range(1, len(marks))]
        # Round 1 pays one-off warm-up (first torch calls in each actor); medians skip nothing but are robust.
        rt_med, fl_med = statistics.median(rt), statistics.median(fl)
        loop_med = statistics.median(loop) if loop else float("nan")
        clients = int(s.history[0]["clients_sampled"])
        rows.append((name, clients, s.encoded, s.distinct_images, s.timings["time_ray_start_s"],
                     s.timings["time_encode_s"], sum(rt), rt_med, 1000 * rt_med / clients,
                     fl_med, 1000 * (rt_med - fl_med) / clients, rt_med / fl_med, loop_med, loop_med / fl_med,
                     s.final["accuracy"]))
        print(f"[{name}] rounds (s): runtime {[round(x, 3) for x in rt]}  floor {[round(x, 3) for x in fl]}  "
              f"driver loop {[round(x, 3) for x in loop]}", file=sys.stderr)
    head = ("setting", "clients", "encoded", "distinct", "ray_s", "encode_s", "rounds_s", "round_s",
            "ms/client", "floor_s", "overhead_ms/client", "ratio", "loop_s", "loop_ratio", "acc")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) if isinstance(x, (int, str)) else f"{x:.3f}" for x in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
