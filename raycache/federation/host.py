"""A client host: one Ray actor that serves many virtual clients.

It holds a read-only view of the shared training inputs (features, or images for a method that trains
through the encoder: one object-store copy for every host) and each of its clients' sample indices. Per
round it trains each requested client from the broadcast state and folds the results into one partial
FedAvg sum, so what returns to the server is one message per host. For a `local` method it instead keeps
each client's own state and evaluates it; nothing is uploaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from raycache.errors import RunFailed
from raycache.federation.aggregate import WeightedSum
from raycache.federation.sampling import client_seed
from raycache.methods.base import State, state_nbytes


@dataclass
class HostReport:
    partial: WeightedSum
    clients: np.ndarray  # (c,) client ids that reported (trained within the time limit)
    samples: np.ndarray  # (c,) their sample counts
    losses: np.ndarray  # (c,) mean local training loss
    seconds: np.ndarray  # (c,) compute seconds per client
    bytes_up: int  # exact bytes of every reported client's update
    peak_rss_mb: float
    timed_out: np.ndarray  # client ids whose local training exceeded federation.client_timeout_s: dropped


class ClientHost:
    def __init__(self, method_name: str, method_cfg, task, train, clients: dict[int, np.ndarray], seed: int,
                 threads: int = 1, use_gpu: bool = False, evals=None, audit: bool = False,
                 weighting: str = "samples") -> None:
        import torch

        from raycache.methods import method_class

        torch.set_num_threads(max(1, threads))
        # torch loads its compiler stack on a process's first optimizer step (~2 s here): pay that at
        # start-up so that round 1 costs what every other round costs.
        param = torch.zeros(1, requires_grad=True)
        param.sum().backward()
        torch.optim.AdamW([param], fused=True).step()
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.method = method_class(method_name)(method_cfg, task).to(self.device)
        self.features, self.labels = train  # read-only, zero-copy views of the shared object
        self.clients = clients
        self.seed = seed
        self.evals = evals  # EvalSets: test, validation, client tests (for evaluating local states)
        self.local = self.method.role == "local"
        self.states: dict[int, State] = {}  # a local method's per-client states (clients trained so far)
        self.memory: dict[int, State] = {}  # each client's private memory across rounds (optimiser moments)
        self.weighting = weighting  # "samples": FedAvg weight = the client's sample count; "uniform": 1
        self.audit: list[dict] | None = [] if audit else None  # a record of every client message (tests)
        self.bytes_up = 0

    def train(self, state: State, client_ids: list[int], round_idx: int,
              timeout_s: float | None = None) -> HostReport:
        """Train each client from `state` and fold the updates of those that finish within `timeout_s` into
        one partial sum. Every client's message to the server passes through `_upload`."""
        import resource

        import torch

        partial = WeightedSum()
        reported, samples, losses, seconds, timed_out = [], [], [], [], []
        self.bytes_up = 0
        for cid in client_ids:
            t0 = time.perf_counter()
            idx = self.clients[cid]
            feats = torch.from_numpy(self.features[idx]).to(self.device)  # fancy indexing copies: (n_c, D)
            labels = torch.from_numpy(self.labels[idx]).to(self.device)
            start = self.states.get(cid, state) if self.local else state
            memory = dict(self.memory.get(cid, {}))  # a copy: a client that times out keeps last round's
            update, loss = self.method.local_train(start, feats, labels, client_seed(self.seed, round_idx, cid),
                                                   memory, round_idx)
            took = time.perf_counter() - t0
            if timeout_s is not None and took > timeout_s:
                timed_out.append(cid)  # too slow: this round goes on without it
                continue
            _check_finite(update, cid, round_idx)
            if memory:
                self.memory[cid] = memory
            weight = float(len(idx)) if self.weighting == "samples" else 1.0
            if self.local:
                self.states[cid] = update  # kept on the client; nothing leaves it
            elif self.method.role == "centralised":
                partial.add(update, weight)  # the server's own pooled trainer: no client message
            else:
                self._upload(partial, cid, update, weight)
            reported.append(cid)
            samples.append(len(idx))
            losses.append(loss)
            seconds.append(took)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return HostReport(partial, np.asarray(reported, np.int64), np.asarray(samples, np.int64),
                          np.asarray(losses, np.float64), np.asarray(seconds, np.float64), self.bytes_up, peak,
                          np.asarray(timed_out, np.int64))

    def _upload(self, partial: WeightedSum, cid: int, update: State, weight: float) -> None:
        """A client's one message to the server: its update and its sample count, nothing else."""
        if self.audit is not None:
            self.audit.append({"client": cid, "keys": sorted(update),
                               "shapes": {k: list(np.shape(v)) for k, v in update.items()},
                               "dtypes": {k: str(np.asarray(v).dtype) for k, v in update.items()},
                               "nbytes": state_nbytes(update), "weight": weight,
                               "fields": ["update", "weight"]})
        partial.add(update, weight)
        self.bytes_up += state_nbytes(update)

    def audit_log(self) -> list[dict]:
        """The messages recorded since the last call (with `audit`), then cleared."""
        out = self.audit or []
        if self.audit is not None:
            self.audit = []
        return out

    def get_states(self) -> dict[int, State]:
        """A local method's per-client states (for a checkpoint)."""
        return self.states

    def set_states(self, states: dict[int, State]) -> None:
        self.states = {int(c): s for c, s in states.items() if int(c) in self.clients}

    def get_memory(self) -> dict[int, State]:
        """The clients' private memories (for a checkpoint: a resumed run continues their optimisers)."""
        return self.memory

    def set_memory(self, memory: dict[int, State]) -> None:
        self.memory = {int(c): m for c, m in memory.items() if int(c) in self.clients}

    def evaluate(self, state: State) -> dict[str, dict[int, np.ndarray]]:
        """A local method's predictions, each client under its own state (or the initial `state` if it has
        not trained yet): {"test": {client: pred}, "val": ..., "local": {client: pred on its own held-out
        samples}}. Clients still on the initial state share one global prediction."""
        from raycache.federation.evaluate import predict

        ev = self.evals
        sets = {"test": ev.test[0]} | ({"val": ev.val[0]} if ev.val is not None else {})
        shared: dict[str, np.ndarray] = {}
        out: dict[str, dict[int, np.ndarray]] = {"test": {}, "val": {}, "local": {}}

        def run(s: State, inputs: np.ndarray) -> np.ndarray:
            return predict(lambda x: self.method.logits(s, x), inputs, self.method.eval_batch, self.device)

        for cid in self.clients:
            own = self.states.get(cid)
            for name, inputs in sets.items():
                if own is not None:
                    out[name][cid] = run(own, inputs)
                else:
                    if name not in shared:
                        shared[name] = run(state, inputs)
                    out[name][cid] = shared[name]
            if ev.client is not None:
                out["local"][cid] = run(state if own is None else own, ev.client_rows(cid)[0])
        return out

    def node(self) -> str:
        """The Ray node this host runs on (answers once the host has started)."""
        import ray

        return ray.get_runtime_context().get_node_id()


def _check_finite(update: State, cid: int, round_idx: int) -> None:
    for k, v in update.items():
        if not np.isfinite(np.asarray(v)).all():
            raise RunFailed(f"round {round_idx}: client {cid}'s update {k!r} has NaN/inf (local training "
                                     f"diverged; lower method.lr)")
