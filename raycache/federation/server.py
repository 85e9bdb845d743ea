"""The server (driver/aggregator) actor: holds the global state, samples clients, broadcasts the state with
one `ray.put` per round, merges the hosts' partial sums (FedAvg by sample count) and evaluates.

What travels follows the method's `role`: a `federated` method sends the state down and each update up; a
`local` method sends its initial state once to each client and nothing after; a `centralised` method has one
trainer on the pooled data and nothing travels."""

from __future__ import annotations

import time

import numpy as np

from raycache.federation.aggregate import WeightedSum
from raycache.federation.evaluate import client_accuracy, per_class_accuracy, predict
from raycache.federation.sampling import sample_clients
from raycache.methods.base import state_nbytes, state_params


class Server:
    def __init__(self, method_name: str, method_cfg, task, test, server_data, class_counts: np.ndarray,
                 hosts: list, trainers: int, fraction: float, seed: int) -> None:
        from raycache.methods import method_class

        self.method = method_class(method_name)(method_cfg, task)
        self.role = self.method.role
        self.test_inputs, self.test_labels = test
        self.state = self.method.init_state(*server_data)
        self.class_counts = class_counts  # (clients, classes): the clients' label mixes, for client accuracy
        self.hosts = hosts
        self.trainers = trainers  # virtual clients that train (1 for a centralised method)
        self.fraction = fraction
        self.seed = seed
        self.reached = np.zeros(trainers, dtype=bool)  # clients that hold the initial state (local role)

    def evaluate(self) -> dict[str, float]:
        n_classes = self.method.task.n_classes
        if self.role == "local":  # every client under its own state: mean over clients
            import ray

            preds: dict[int, np.ndarray] = {}
            for part in ray.get([h.evaluate.remote(self.state) for h in self.hosts]):
                preds.update(part)
            per_class = np.stack([per_class_accuracy(preds[c], self.test_labels, n_classes)
                                  for c in range(len(self.class_counts))])  # (clients, classes)
            client_acc = client_accuracy(self.class_counts, per_class)
            accuracy = float(np.mean([(preds[c] == self.test_labels).mean() for c in range(len(per_class))]))
        else:
            pred = predict(lambda x: self.method.logits(self.state, x), self.test_inputs, self.method.eval_batch)
            client_acc = client_accuracy(self.class_counts, per_class_accuracy(pred, self.test_labels, n_classes))
            accuracy = float((pred == self.test_labels).mean())
        return {"accuracy": accuracy, "client_accuracy_mean": float(client_acc.mean()),
                "client_accuracy_std": float(client_acc.std())}

    def get_state(self):
        """The global state (the initial state, for a local method): what a checkpoint would hold."""
        return self.state

    def info(self) -> dict[str, int]:
        return {"trainable_params": state_params(self.state), "payload_bytes": state_nbytes(self.state)}

    def run_round(self, round_idx: int) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        sampled = sample_clients(self.trainers, self.fraction, self.seed, round_idx)
        state_ref = ray.put(self.state)  # the one broadcast of this round
        n_hosts = len(self.hosts)
        calls = [host.train.remote(state_ref, [int(c) for c in sampled if c % n_hosts == h], round_idx)
                 for h, host in enumerate(self.hosts) if any(c % n_hosts == h for c in sampled)]
        reports = ray.get(calls)
        if self.role == "federated":
            total = WeightedSum()
            for rep in reports:
                total.merge(rep.partial)
            bytes_down = len(sampled) * state_nbytes(self.state)
            self.state = total.mean()
        elif self.role == "centralised":  # the one trainer's state is the model; nothing travelled
            self.state = reports[0].partial.mean()
            bytes_down = 0
        else:  # local: each client's state stays on its host; the initial state reaches each client once
            fresh = sampled[~self.reached[sampled]]
            self.reached[fresh] = True
            bytes_down = len(fresh) * state_nbytes(self.state)
        train_seconds = time.perf_counter() - t0
        samples = np.concatenate([r.samples for r in reports])
        losses = np.concatenate([r.losses for r in reports])
        metrics = self.evaluate()
        metrics.update({
            "loss": float((losses * samples).sum() / samples.sum()),
            "comm_bytes_up": float(sum(r.bytes_up for r in reports)) if self.role == "federated" else 0.0,
            "comm_bytes_down": float(bytes_down),
            "clients_sampled": float(len(sampled)),
            "client_seconds": float(sum(r.seconds.sum() for r in reports)),
            "train_seconds": train_seconds,
            "round_seconds": time.perf_counter() - t0,
            "peak_memory_mb": float(max(r.peak_rss_mb for r in reports)),
            "trainable_params": float(state_params(self.state)),
        })
        return metrics
