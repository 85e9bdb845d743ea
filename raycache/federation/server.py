"""The server (driver/aggregator) actor: holds the global state, samples clients, broadcasts the state with
one `ray.put` per round, merges the hosts' partial sums (FedAvg by sample count) and evaluates."""

from __future__ import annotations

import time

import numpy as np

from raycache.federation.aggregate import WeightedSum
from raycache.federation.evaluate import client_accuracy, per_class_accuracy, predict
from raycache.federation.sampling import sample_clients
from raycache.methods.base import state_nbytes, state_params


class Server:
    def __init__(self, method_name: str, method_cfg, task, test, server_data, class_counts: np.ndarray,
                 hosts: list, fraction: float, seed: int) -> None:
        from raycache.methods import method_class

        self.method = method_class(method_name)(method_cfg, task)
        self.test_features, self.test_labels = test
        self.state = self.method.init_state(*server_data)
        self.class_counts = class_counts  # (clients, classes)
        self.hosts = hosts
        self.fraction = fraction
        self.seed = seed

    def evaluate(self) -> dict[str, float]:
        pred = predict(lambda f: self.method.logits(self.state, f), self.test_features)
        per_class = per_class_accuracy(pred, self.test_labels, self.method.task.n_classes)
        client_acc = client_accuracy(self.class_counts, per_class)
        return {"accuracy": float((pred == self.test_labels).mean()),
                "client_accuracy_mean": float(client_acc.mean()),
                "client_accuracy_std": float(client_acc.std())}

    def info(self) -> dict[str, int]:
        return {"trainable_params": state_params(self.state), "payload_bytes": state_nbytes(self.state)}

    def run_round(self, round_idx: int) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        sampled = sample_clients(len(self.class_counts), self.fraction, self.seed, round_idx)
        state_ref = ray.put(self.state)  # the one broadcast of this round
        n_hosts = len(self.hosts)
        calls = [host.train.remote(state_ref, [int(c) for c in sampled if c % n_hosts == h], round_idx)
                 for h, host in enumerate(self.hosts) if any(c % n_hosts == h for c in sampled)]
        reports = ray.get(calls)
        total = WeightedSum()
        for rep in reports:
            total.merge(rep.partial)
        bytes_down = len(sampled) * state_nbytes(self.state)
        self.state = total.mean()
        train_seconds = time.perf_counter() - t0
        samples = np.concatenate([r.samples for r in reports])
        losses = np.concatenate([r.losses for r in reports])
        metrics = self.evaluate()
        metrics.update({
            "loss": float((losses * samples).sum() / samples.sum()),
            "comm_bytes_up": float(sum(r.bytes_up for r in reports)),
            "comm_bytes_down": float(bytes_down),
            "clients_sampled": float(len(sampled)),
            "client_seconds": float(sum(r.seconds.sum() for r in reports)),
            "train_seconds": train_seconds,
            "round_seconds": time.perf_counter() - t0,
            "peak_memory_mb": float(max(r.peak_rss_mb for r in reports)),
            "trainable_params": float(state_params(self.state)),
        })
        return metrics
