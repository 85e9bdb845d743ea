"""What a federated CacheFL round costs on Ray, against the floor: the same arithmetic in one plain
single-process torch loop (same features, partition, seeds, local training and FedAvg, no Ray).

For each setting it reports encoder calls against distinct images, the wall-time split (Ray start,
encoding, rounds), time per round and per client, and the runtime/floor ratio, all from one process run,
the floor's rounds interleaved with the runtime's in blocks of `BLOCK`, so that the two see the same load
on a shared machine. (The client actors begin each round's training before the driver asks for it,
`runtime.look_ahead`: a floor block waits for that round's training to end, and the runtime round whose
clock holds the block is left out.) Each block is followed by the same rounds of the split floor
(`SplitFloor`): the floor's arithmetic shared out over as many processes as the run has client actors, all
running at once, so `split_s` is the floor divided by the workers as this machine's cores deliver it when
all of them are busy, beside the ideal `floor_s / workers`. Usage:

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

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raycache.config_file import load_config  # noqa: E402
from raycache.data.features import load_or_encode  # noqa: E402
from raycache.data.cache_source import cache_examples
from raycache.experiment import prepare, run_experiment  # noqa: E402
from raycache.methods.training import LocalRound  # noqa: E402
from raycache.federation.aggregate import WeightedSum  # noqa: E402
from raycache.federation.evaluate import predict, row_pieces  # noqa: E402
from raycache.federation.sampling import assign_hosts, client_seed, sample_clients  # noqa: E402
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


BLOCK = 5  # runtime rounds between two blocks of floor rounds


def floor_rounds(cfg, rounds: int) -> tuple[list[float], list[float]]:
    """The yardstick: one process, one thread, a plain loop over clients doing what the runtime does, on the
    very split, partition and text classifier the run used (`prepare` derives them from the config).
    Returns (seconds, test accuracy) per round; the accuracies equal the runtime's (tested)."""
    floor = Floor(cfg)
    times, accuracy = zip(*(floor.round(r) for r in range(1, rounds + 1)))
    return list(times), list(accuracy)


class Floor:
    """The floor's rounds one at a time, so that `main` can run each right after the runtime's round of the
    same number: both then see the same load on a shared machine.

    `share` = (k, n): only worker k of n's part of each round, the clients and evaluation rows the runtime's
    host k of n would get (`assign_hosts`, `row_pieces`), for the split floor (`SplitFloor`)."""

    def __init__(self, cfg, share: tuple[int, int] = (0, 1)) -> None:
        prep = prepare(cfg)
        self.cfg, self.share = cfg, share
        self.feats = load_or_encode(prep.source, prep.spec, prep.cfg.runtime).features
        self.y, self.splits, self.parts = prep.source.labels, prep.splits, prep.parts
        self.train_f, self.train_y = self.feats[self.splits.train], self.y[self.splits.train]
        self.sizes = np.maximum([len(p) for p in self.parts], 1)  # as the server deals them
        self.test_f, self.val_f = self.feats[self.splits.test], self.feats[self.splits.val]  # held, as hosts do
        self.method = method_class(prep.cfg.method.name)(prep.cfg.method, prep.task)
        cache_f, cache_y = self.feats[self.splits.server], self.y[self.splits.server]
        if prep.uses_cache:  # the same keys the runtime builds (augmented views, synthetic set, ...)
            cache_f, cache_y, _ = cache_examples(prep.cfg, prep.spec, prep.source, self.splits, self.feats,
                                                 prep.synth_store, self.splits.train[prep.trainers[0]])
        self.state = self.method.init_state(cache_f, cache_y)

    def round(self, r: int) -> tuple[float, float]:
        """(seconds, test accuracy) of round `r`, on one thread (accuracy NaN for a share: the split floor)."""
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
        k, n = self.share  # (0, 1): every sampled client, in order, and every evaluation row
        clients = assign_hosts(sample_clients(len(self.parts), cfg.federation.fraction, cfg.seed, r), self.sizes, n,
                               pinned=False)[k]
        for c in clients:
            idx = self.parts[c]
            update, _ = method.local_train(self.state, torch.from_numpy(self.train_f[idx]),
                                           torch.from_numpy(self.train_y[idx]),
                                           LocalRound(client_seed(cfg.seed, r, int(c)), r, cfg.federation.rounds))
            total.add(update, float(len(idx)))
        self.state = state = total.mean() if total.weight else self.state
        # the runtime evaluates every round, on the test and the validation splits (this worker's rows of them)
        pred = {name: predict(lambda f: method.logits(state, f), getattr(self, f"{name}_f")[start:stop])
                for name, start, stop in row_pieces({"test": len(splits.test), "val": len(splits.val)}, n)[k]}
        seconds = time.perf_counter() - t0
        return seconds, float((pred["test"] == self.y[splits.test]).mean()) if n == 1 else float("nan")


class FloorProcess:
    """The floor in a process of its own, as the plain loop would run: torch in the driver would stay behind
    when the floor's block ends (its thread pool, its arrays) and share the CPUs with the runtime's next
    rounds (measured: rounds after a block in the driver 20-40% slower)."""

    def __init__(self, overrides: list[str], share: tuple[int, int] = (0, 1), wait: bool = True) -> None:
        """The tiny config with `overrides`, loaded in the floor's process (a config does not pickle)."""
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_floor, args=(overrides, share, child), daemon=True)
        self.proc.start()
        if wait:
            self.conn.recv()  # built

    def rounds(self, numbers: list[int]) -> list[float]:
        self.conn.send(numbers)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


class SplitFloor:
    """The floor run perfectly in parallel, on this machine: `n` floor processes, each doing its share of
    every round (the clients and evaluation rows host k of n gets), all at once, a round at a time, with no
    communication and no merge between them (each averages its own share). A round's time is the slowest
    worker's. It is the floor divided by the workers as the hardware delivers it: two busy cores of a
    shared VM can each run slower than one busy core does, which `floor_s / n` does not show."""

    def __init__(self, overrides: list[str], n: int) -> None:
        self.workers = [FloorProcess(overrides, (k, n), wait=False) for k in range(n)]
        for w in self.workers:
            w.conn.recv()  # built

    def rounds(self, numbers: list[int]) -> list[float]:
        out = []
        for r in numbers:
            for w in self.workers:
                w.conn.send([r])
            out.append(max(w.conn.recv()[0] for w in self.workers))
        return out

    def close(self) -> None:
        for w in self.workers:
            w.close()


def _serve_floor(overrides: list[str], share: tuple[int, int], conn) -> None:
    floor = Floor(load_config("experiments/tiny.yaml", overrides), share)
    conn.send(True)
    while (numbers := conn.recv()) is not None:
        conn.send([floor.round(r)[0] for r in numbers])


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
        overrides = SETTINGS[name] + [
            f"federation.rounds={args.rounds}", f"runtime.cache_dir={store}/{name}", "tracking.experiment=benchmark",
            *([f"runtime.client_actors={args.actors}"] if args.actors else [])]
        cfg = load_config("experiments/tiny.yaml", overrides)
        # Every BLOCK rounds the round callback has the floor's process run its next BLOCK rounds, once the
        # runtime's next round, started ahead, has had time to finish its training (the client actors idle
        # then); the floor is built at the first block, after the run has encoded.
        marks: dict[int, float] = {}  # each round's callback entered: the driver's loop between two of them
        fl: list[float] = []
        fl_split: list[float] = []
        floor: list = []  # [FloorProcess, SplitFloor]
        workers = min(cfg.runtime.client_actors, cfg.data.clients)  # the hosts a run starts
        blocked: set[int] = set()  # runtime rounds whose clock holds a floor block: not measured

        def on_round(r: int, metrics) -> None:
            marks[r] = time.perf_counter()
            if r % BLOCK and r < args.rounds:
                return
            if r < args.rounds:
                blocked.add(r + 1)
                time.sleep(0.2 + 1.5 * metrics["round_seconds"])  # round r+1's training, started ahead, ends
            if not floor:
                floor.extend([FloorProcess(overrides), SplitFloor(overrides, workers)])
            numbers = list(range(len(fl) + 1, r + 1))
            fl.extend(floor[0].rounds(numbers))
            fl_split.extend(floor[1].rounds(numbers))

        s = run_experiment(cfg, on_round=on_round)  # an empty feature store each: its own encode, Ray start
        for f in floor:
            f.close()
        ray.shutdown()
        rt = [m["round_seconds"] for r, m in enumerate(s.history, 1) if r not in blocked]
        # The driver's wall time per round: from round r-1's callback to round r's (the round as the driver
        # waits for it, plus its snapshot and whatever of round r-1's checkpoint and metrics writing the
        # round did not hide).
        loop = [marks[r] - marks[r - 1] for r in range(2, args.rounds + 1) if r not in blocked]
        # Round 1 pays one-off warm-up (first torch calls in each actor); medians skip nothing but are robust.
        rt_med, fl_med, split_med = statistics.median(rt), statistics.median(fl), statistics.median(fl_split)
        loop_med = statistics.median(loop) if loop else float("nan")
        clients = int(s.history[0]["clients_sampled"])
        rows.append((name, clients, s.encoded, s.distinct_images, s.timings["time_ray_start_s"],
                     s.timings["time_encode_s"], sum(rt), rt_med, 1000 * rt_med / clients,
                     fl_med, 1000 * (rt_med - fl_med) / clients, rt_med / fl_med, loop_med, loop_med / fl_med,
                     workers, split_med, rt_med / split_med, s.final["accuracy"]))
        print(f"[{name}] rounds (s): runtime {[round(x, 3) for x in rt]}  floor {[round(x, 3) for x in fl]}  "
              f"driver loop {[round(x, 3) for x in loop]}  split floor {[round(x, 3) for x in fl_split]}",
              file=sys.stderr)
    head = ("setting", "clients", "encoded", "distinct", "ray_s", "encode_s", "rounds_s", "round_s",
            "ms/client", "floor_s", "overhead_ms/client", "ratio", "loop_s", "loop_ratio", "workers", "split_s",
            "split_ratio", "acc")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) if isinstance(x, (int, str)) else f"{x:.3f}" for x in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
