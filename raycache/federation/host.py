"""A client host: one Ray actor that serves many virtual clients.

It holds a read-only view of the shared training inputs (features, or images for a method that trains
through the encoder: one object-store copy for every host) and each of its clients' sample indices. Per
round it trains each requested client and hands the update to the method's flow
(`raycache.federation.flows`), which folds it into one partial sum (what returns to the server is one
message per host) or keeps it on the client. Each client's report is a declared `ClientMessage`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from raycache import heap
from raycache.errors import RunFailed
from raycache.federation.aggregate import WeightedSum
from raycache.federation.sampling import client_seed
from raycache.methods.base import State, state_nbytes


@dataclass
class ClientMessage:
    """Everything one client sends the server about a round, besides its update (folded into the host's
    partial sum). `MESSAGE_FIELDS` declares them; nothing else leaves a client."""

    client: int
    samples: int  # its training samples (the metrics' loss weighting; FedAvg's weight)
    loss: float  # its mean local training loss
    seconds: float  # its local compute time
    weight: float | None = None  # its aggregation weight (a flow that aggregates)
    class_counts: np.ndarray | None = None  # its samples per class (a per-class strategy only)
    nbytes: int | None = None  # its update's bytes (None: it sent no update)

    def fields(self) -> list[str]:
        """The fields this message carries (those set), plus `update` if it sent one."""
        out = [f for f in MESSAGE_FIELDS if getattr(self, f) is not None]
        return out + (["update"] if self.nbytes is not None else [])


MESSAGE_FIELDS = ("client", "samples", "loss", "seconds", "weight", "class_counts")


@dataclass
class HostReport:
    partial: WeightedSum
    messages: list[ClientMessage]  # one per client that reported (trained within the time limit)
    bytes_up: int  # exact bytes of every reported client's update
    peak_rss_mb: float  # the host process's peak memory (the host's, not a client's)
    timed_out: np.ndarray  # client ids whose local training exceeded federation.client_timeout_s: dropped

    def column(self, name: str, dtype=np.float64) -> np.ndarray:
        return np.asarray([getattr(m, name) for m in self.messages], dtype)


@dataclass(frozen=True)
class ClientRules:
    """How clients treat their updates, from the federation section: the aggregation weight (`samples` or
    `uniform`), whether class counts weigh each class's rows (a per-class strategy), the DP clipping norm,
    and FedProx's mu."""

    weighting: str = "samples"
    per_class: bool = False
    clip_norm: float | None = None
    prox_mu: float = 0.0


@dataclass(frozen=True)
class ClientRows:
    """Every client's training rows in one packed array: what each host reads a client's rows from when a
    round gives it a client it is not home to (one object-store copy for all hosts, however many clients)."""

    flat: np.ndarray
    offsets: np.ndarray  # client c's rows are flat[offsets[c]:offsets[c + 1]]

    @classmethod
    def pack(cls, parts: list[np.ndarray]) -> "ClientRows":
        sizes = np.fromiter((len(p) for p in parts), np.int64, len(parts))
        flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return cls(flat, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    def __getitem__(self, client: int) -> np.ndarray:
        return self.flat[self.offsets[client]:self.offsets[client + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1


class ClientHost:
    def __init__(self, method_cls, settings, task, train, clients: dict[int, np.ndarray], seed: int,
                 threads: int = 1, use_gpu: bool = False, evals=None, audit: bool = False,
                 rules: ClientRules = ClientRules(), rows: ClientRows | None = None) -> None:
        """`clients`: the clients this host is home to (it keeps their state across rounds) and their
        training rows; `rows`: every client's training rows, for a round that gives this host clients it is
        not home to (None: only its own)."""
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.method = method_cls(settings, task).to(self.device)
        self.flow = self.method.flow
        self.features, self.labels = train  # read-only, zero-copy views of the shared object
        self.clients = clients
        self.rows = clients if rows is None else rows
        self.seed = seed
        self.evals = evals  # EvalSets: test, validation, client tests (for evaluating personal states)
        self.rules = rules
        self.class_rows = self.method.class_rows(self.method.cfg, task.n_classes) if rules.per_class else {}
        self.states: dict[int, State] = {}  # a personal flow's per-client states (clients trained so far)
        self.memory: dict[int, State] = {}  # each client's private memory across rounds (optimiser moments)
        self.audit: list[dict] | None = [] if audit else None  # a record of every client message (tests)
        self.bytes_up = 0

    def reinit(self, *args, **kwargs) -> str:
        """Become the host of another federation (a warm pool's actor, reused for a sweep's next trial): the
        same as constructing one, in this already started process; returns its node."""
        self.__init__(*args, **kwargs)
        return self.node()

    def train(self, state: State, client_ids: list[int], round_idx: int,
              timeout_s: float | None = None) -> HostReport:
        """Train each client from `state` (or what its flow starts it from) and hand each update to the
        flow; updates of clients that finish within `timeout_s` are folded into one partial sum. Every
        client's message to the server passes through `upload`."""
        import resource

        import torch

        from raycache.data.pixels import to_device
        from raycache.methods.training import LocalRound

        partial = WeightedSum()
        messages, timed_out = [], []
        self.bytes_up = 0
        for cid in client_ids:
            t0 = time.perf_counter()
            idx = self.rows[cid]
            feats = to_device(self.features[idx], self.device)  # fancy indexing copies: (n_c, D), or images
            labels = torch.from_numpy(self.labels[idx]).to(self.device)
            memory = dict(self.memory.get(cid, {}))  # a copy: a client that times out keeps last round's
            ctx = LocalRound(client_seed(self.seed, round_idx, cid), round_idx, self.method.task.rounds, memory,
                             self.rules.prox_mu)
            update, loss = self.method.local_train(self.flow.start(self, cid, state), feats, labels, ctx)
            took = time.perf_counter() - t0
            if timeout_s is not None and took > timeout_s:
                timed_out.append(cid)  # too slow: this round goes on without it
                continue
            _check_finite(update, cid, round_idx)
            if memory:
                self.memory[cid] = memory
            msg = ClientMessage(cid, len(idx), float(loss), took)
            self.flow.keep(self, cid, state, update, msg, partial)
            messages.append(msg)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        heap.release(state_nbytes(state))  # a full model's gradients, moments and copies: freed, returned
        return HostReport(partial, messages, self.bytes_up, peak, np.asarray(timed_out, np.int64))

    def upload(self, partial: WeightedSum | None, msg: ClientMessage, update: State | None,
               row_weights: dict[str, np.ndarray] | None) -> None:
        """A client's one message to the server: its update (if any), folded with its weight, and the
        declared fields of `msg`, nothing else."""
        if update is not None:
            msg.nbytes = state_nbytes(update)
            partial.add(update, msg.weight, row_weights)
            self.bytes_up += msg.nbytes
        if self.audit is not None:
            record = {"client": msg.client, "fields": msg.fields(), "nbytes": msg.nbytes, "weight": msg.weight,
                      "samples": msg.samples, "loss": msg.loss, "seconds": msg.seconds}
            if msg.class_counts is not None:
                record["class_counts"] = msg.class_counts.tolist()
            if update is not None:
                record.update({"keys": sorted(update), "shapes": {k: list(np.shape(v)) for k, v in update.items()},
                               "dtypes": {k: str(np.asarray(v).dtype) for k, v in update.items()}})
            self.audit.append(record)

    def audit_log(self) -> list[dict]:
        """The messages recorded since the last call (with `audit`), then cleared."""
        out = self.audit or []
        if self.audit is not None:
            self.audit = []
        return out

    def get_states(self) -> dict[int, State]:
        """A personal flow's per-client states (for a checkpoint)."""
        return self.states

    def set_states(self, states: dict[int, State]) -> None:
        self.states = {int(c): s for c, s in states.items() if int(c) in self.clients}

    def get_memory(self) -> dict[int, State]:
        """The clients' private memories (for a checkpoint: a resumed run continues their optimisers)."""
        return self.memory

    def set_memory(self, memory: dict[int, State]) -> None:
        self.memory = {int(c): m for c, m in memory.items() if int(c) in self.clients}

    def init_state(self, server_data) -> State:
        """The method's initial global state from the server's labelled hold-out, made here for the server
        (which holds no torch)."""
        return self.method.init_state(*server_data)

    def tune(self, state: State) -> dict[str, float]:
        """The method's post-training search on the validation split, run here for the server."""
        from raycache.federation.evaluate import tune

        return tune(self.method, state, self.evals)

    def predict(self, state: State, split: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """`state`'s predicted classes on rows [start, stop) of one of the global evaluation splits ("test",
        "val" or "client": the clients' own held-out rows), which the server shares out among the hosts so
        that evaluation runs in parallel."""
        return self.predict_share(state, [(split, start, stop)])[0]

    def predict_share(self, state: State, pieces: list[tuple[str, int, int | None]]) -> list[np.ndarray]:
        """`predict` for each (split, start, stop) piece of this host's share of a round's evaluation, in one
        call: a share that spans two splits costs one call, not one per split."""
        from raycache.federation.evaluate import predict, slice_rows

        out = [predict(lambda x: self.method.logits(state, x), slice_rows(getattr(self.evals, split)[0], start, stop),
                       self.method.eval_batch, self.device) for split, start, stop in pieces]
        heap.release(state_nbytes(state))
        return out

    def evaluate(self, state: State) -> dict[str, dict[int, np.ndarray]]:
        """A personal flow's predictions, each client under its own state (or the initial `state` if it has
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

    def pid(self) -> int:
        """This host's process id (operators and fault tests signal it)."""
        import os

        return os.getpid()

    def node(self) -> str:
        """The Ray node this host runs on (answers once the host has started)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def gpus(self) -> list[str]:
        """The GPUs Ray gave this host, as `<node>/<gpu id>` (a fraction of one GPU names that GPU)."""
        import ray

        ctx = ray.get_runtime_context()
        return [f"{ctx.get_node_id()}/{g}" for g in ctx.get_accelerator_ids().get("GPU", [])]


def _check_finite(update: State, cid: int, round_idx: int) -> None:
    for k, v in update.items():
        if not np.isfinite(np.asarray(v)).all():
            raise RunFailed(f"round {round_idx}: client {cid}'s update {k!r} has NaN/inf (local training "
                                     f"diverged; lower method.lr)")
