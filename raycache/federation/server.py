"""The server (driver/aggregator) actor: holds the global state and the server strategy's memory, samples
clients, broadcasts with one `ray.put` per global state (and keeps only that object-store copy), lets the
method's flow merge the hosts' reports (FedAvg, FedAdam, ... for a federated flow; nothing for a personal
one) and evaluates.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import numpy as np

from raycache import heap
from raycache.errors import RunFailed
from raycache.federation.evaluate import (EvalSets, client_accuracy, owner_accuracy, per_class_accuracy, predict,
                                          row_pieces, slice_rows, summarise, tune)
from raycache.federation.sampling import assign_hosts, sample_clients
from raycache.federation.selection import Selection
from raycache.federation.supervision import Supervisor
from raycache.methods.base import State, state_nbytes, state_params


class Server:
    def __init__(self, method_cls, settings, task, evals: EvalSets, server_data, class_counts: np.ndarray,
                 hosts: list, trainers: int, federation, seed: int, host_spec: tuple | None = None,
                 sizes: np.ndarray | None = None, look_ahead: bool = False) -> None:
        """`evals`: the test, validation and client-test sets. `host_spec` = (actor options, [(args, kwargs)
        per host]): how to start a replacement for a host that died or timed out. `sizes`: each trainer's
        training samples (the automatic deadline scales with them). `look_ahead`: start each round's training
        as soon as its state is known (`_evaluate_then`)."""
        from raycache.federation.strategies import strategy_class

        # The method computes on the hosts (they hold torch and the data): the server asks them for the
        # initial state, evaluations and the post-training search, and makes its own copy only for a call
        # no host answered, so a server process normally never imports torch.
        self.method_cls, self.settings, self.task = method_cls, settings, task
        self.__dict__.pop("method", None)  # a warm pool's reinit: the previous federation's method
        self.flow = method_cls.flow
        self.strategy = strategy_class(federation.strategy)
        self.strategy_memory: State = {}  # the server optimiser's moments (FedAvgM, FedAdam, ...)
        self.evals = evals
        self.hosts = hosts
        # The initial state as a host returned it: read-only views of the object-store copy that the first
        # broadcast passes on by its ref (`_shared`), rather than putting the state in the store again.
        self.state, ref = self._on_a_host("init_state", lambda: self.method.init_state(*server_data), server_data,
                                          with_ref=True)
        self._stored: tuple | None = None if ref is None else (ref, self.state)  # (ref, the views it gave)
        self.class_counts = class_counts  # (clients, classes): the clients' label mixes, for client accuracy
        self.trainers = trainers  # virtual clients that train (1 for a pooled flow)
        self.federation = federation
        self.fraction = federation.fraction
        self.seed = seed
        self.sizes = np.ones(trainers, np.int64) if sizes is None else np.maximum(np.asarray(sizes), 1)
        self.watch = Supervisor(self.hosts, host_spec, federation, self.sizes)  # deadlines, replacements
        # clients that keep state on their host (a personal state, optimiser memory) train there; the others
        # on whichever host balances the round
        self.pinned = self.flow.keeps_client_state or method_cls.keeps_optimizer(settings)
        self.reached = np.zeros(trainers, dtype=bool)  # clients that hold the initial state (personal flow)
        self.selection = Selection(federation.target_accuracy)  # validation selects the run's result
        self.best: dict = {"state": self.state, "clients": {}, "reached": self.reached.copy()}  # at best_round
        # Looking ahead: a round's training starts on the hosts right behind the previous round's evaluation,
        # before the driver asks for it (`_evaluate_then`). Only where training leaves nothing behind on a host
        # (no client's own state or optimiser memory there), so that a round started and never asked for
        # changes nothing.
        self.look_ahead = look_ahead and not self.pinned and bool(self.hosts)
        self._next: int | None = None  # the round to start once this evaluation's calls are out
        self._ahead: Round | None = None  # that round, started
        self._ended = time.perf_counter()  # when the last round (or round 0) ended: a started round's clock

    @functools.cached_property
    def method(self):
        """The method, made here only when the server must compute with it itself."""
        return self.method_cls(self.settings, self.task)

    def _on_a_host(self, call: str, here, *args, hosts: list | None = None, with_ref: bool = False):
        """The hosts' `call(*args)` (the first of `hosts`, by default all of them, that answers), or `here()`
        when none does. With `with_ref`: (the answer, its object ref; None when the server computed it)."""
        import ray
        from ray.exceptions import RayActorError

        for host in self.hosts if hosts is None else hosts:
            try:
                ref = getattr(host, call).remote(*args)
                answer = ray.get(ref)
            except RayActorError:  # a dead host: the next one, or the server itself
                continue
            return (answer, ref) if with_ref else answer
        return (here(), None) if with_ref else here()

    def reinit(self, *args, **kwargs) -> None:
        """Become the server of another federation (a warm pool's actor): the same as constructing one."""
        self.__init__(*args, **kwargs)

    def _shared(self):
        """The object ref of the current global state's one object-store copy, made once per state and passed
        to the hosts by the round's broadcast and by every evaluation of that state. The server then keeps
        only read-only views of that copy (`ray.get` of numpy arrays maps them, it does not copy), so a full
        model's state is held once, not once in this process and once more in the store."""
        import ray

        if self._stored is None or self._stored[1] is not self.state:
            self._stored = None  # the previous state's copy goes first (unless the selected round's views keep it)
            ref = ray.put(self.state)
            views = ray.get(ref)
            if self.best["state"] is self.state:  # the selected round's state is this one: the same views
                self.best["state"] = views
            self.state, self._stored = views, (ref, views)
            heap.release(state_nbytes(views))  # the private copy just dropped
        return self._stored[0]

    def current_hosts(self) -> list:
        """The host actors as they are now (a replaced host's successor in its place)."""
        return list(self.hosts)

    def evaluate(self, state: State | None = None) -> dict[str, float]:
        """Test, validation and local-test accuracy of `state` (the current one by default), as the flow
        evaluates it (a personal flow: each client under its own state)."""
        return self.flow.evaluate(self, self.state if state is None else state)

    def evaluate_global(self, state: State) -> dict[str, float]:
        """Every split under the one `state`."""
        n_classes = self.task.n_classes
        ev = self.evals
        preds = self._predict_splits(state, ["test"] + (["val"] if ev.val is not None else [])
                                     + (["client"] if ev.client is not None else []))
        pred = preds["test"]
        client_acc = client_accuracy(self.class_counts, per_class_accuracy(pred, ev.test[1], n_classes))
        val_acc = local_acc = None
        if ev.val is not None:
            val_acc = (preds["val"] == ev.val[1]).mean()
        if ev.client is not None:
            inputs, labels, owner = ev.client
            local_acc = owner_accuracy(preds["client"], labels, owner, len(self.class_counts))
        return summarise((pred == ev.test[1]).mean(), val_acc, client_acc, local_acc)

    def _predict_splits(self, state: State, names: list[str]) -> dict[str, np.ndarray]:
        """`state`'s predictions on the named global splits, evaluated in parallel like training: their rows,
        laid end to end, in one equal share per host (`row_pieces`; every host holds the splits and idles
        while the server evaluates). A host that dies, or is still silent past its evaluation deadline
        (`Supervisor.eval_deadline`), costs no result: once every other host has answered or missed its own
        deadline, it is replaced and its rows are predicted by a host that answered, its replacement, or the
        server.
        Hosts predict on their own device (a GPU, with `runtime.client_gpus`), the server on its CPU."""
        import ray

        def here(name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
            inputs = slice_rows(getattr(self.evals, name)[0], start, stop)
            return predict(lambda x: self.method.logits(state, x), inputs, self.method_cls.eval_batch)

        if not self.hosts:
            return {name: here(name) for name in names}
        if state is self.state:  # the state the round broadcast: its object-store copy, not another
            ref = self._shared()
            state = self.state
        else:
            ref = ray.put(state)
        shares = row_pieces({name: len(getattr(self.evals, name)[0]) for name in names}, len(self.hosts))
        began = time.monotonic()
        share_of = {h: share for h, share in enumerate(shares) if share}
        calls = {h: [self.hosts[h].predict_share.remote(ref, share)] for h, share in share_of.items()}
        self._launch_ahead()  # the next round's training queues right behind these calls on the hosts
        rows = {h: sum(stop - start for _, start, stop in share) for h, share in share_of.items()}
        answers, failed = self.watch.evaluations(calls, rows, began)  # failed: host -> why
        got = {piece: pred for h, (preds,) in answers.items() for piece, pred in zip(share_of[h], preds)}
        for h, why in failed.items():
            print(f"raycache: client host {h} {why}; it is replaced and its rows are evaluated elsewhere",
                  file=sys.stderr)
            if self.watch.replaceable:
                self.watch.respawn(h)
        helpers = [self.hosts[h] for h in answers] + [self.hosts[h] for h in failed if self.watch.replaceable]
        for h in failed:
            for name, start, stop in share_of[h]:
                got[(name, start, stop)] = self._on_a_host("predict", lambda: here(name, start, stop), ref, name,
                                                           start, stop, hosts=helpers)
        out: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for piece in sorted(got, key=lambda p: (names.index(p[0]), p[1])):  # a split's pieces in row order
            out[piece[0]].append(got[piece])
        return {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in out.items()}

    def ask_hosts(self, call: str, args: tuple, rows: list[int]) -> list:
        """Every host's `call(*args)` (an evaluation of `rows[h]` rows on host h), each under its evaluation
        deadline (`Supervisor.eval_deadline`), in host order. A host that dies or stays silent past it is
        replaced and its replacement asked once more; a replacement starts afresh (a personal flow's clients
        on it are back on the initial state, as after a failure in training)."""
        out: dict[int, object] = {}
        pending = list(range(len(self.hosts)))
        for attempt in (1, 2):
            began = time.monotonic()
            calls = {h: [getattr(self.hosts[h], call).remote(*args)] for h in pending}
            answers, failed = self.watch.evaluations(calls, rows, began)
            out.update((h, answer) for h, (answer,) in answers.items())
            if not failed:
                return [out[h] for h in range(len(self.hosts))]
            if attempt == 2 or not self.watch.replaceable:
                raise RunFailed("client hosts " + ", ".join(f"{h} {why}" for h, why in failed.items())
                                + ("" if attempt == 1 else ", after a replacement"))
            for h, why in failed.items():
                print(f"raycache: client host {h} {why}; it is replaced (its clients' own states with it) and "
                      f"asked again", file=sys.stderr)
                self.watch.respawn(h)
            pending = list(failed)
        raise AssertionError("unreachable")

    def start(self) -> dict[str, float]:
        """Evaluate the initial state (round 0): it is a candidate for selection like every round."""
        metrics = self._evaluate_then(1)
        self._offer(0, metrics, 0.0)
        self._ended = time.perf_counter()
        return metrics

    def _evaluate_then(self, next_round: int) -> dict[str, float]:
        """`evaluate()` of the current state; with `look_ahead`, round `next_round` (if the run has it) starts
        on the hosts as soon as the evaluation's calls are out, so that they go from evaluating straight on
        to training, while this server computes the metrics and the driver writes and reports the round."""
        self._ahead = None
        if self.look_ahead and next_round <= self.federation.rounds:
            self._next = next_round
        try:
            return self.evaluate()
        finally:
            self._launch_ahead()  # a flow that evaluated without asking the hosts: now

    def _launch_ahead(self) -> None:
        round_idx, self._next = self._next, None
        if round_idx is not None:
            self._ahead = self._issue(round_idx)

    def _issue(self, round_idx: int) -> "Round":
        """Sample round `round_idx`'s clients, plan its faults, and start their training on the hosts (one call
        per host, the state broadcast by its one object-store copy)."""
        from raycache.federation.faults import plan_faults

        sampled = sample_clients(self.trainers, self.fraction, self.seed, round_idx)
        faults = plan_faults(sampled, self.seed, round_idx, self.federation)
        reporting = sampled[faults.reporting]  # the rest dropped out or missed the deadline: no work asked
        state_ref = self._shared()  # the one broadcast of this round
        calls = {h: self._train_call(h, state_ref, mine.tolist(), round_idx)
                 for h, mine in enumerate(assign_hosts(reporting, self.sizes, len(self.hosts), self.pinned))
                 if len(mine)}
        return Round(round_idx, sampled, faults, reporting, state_ref, self.state, calls, list(self.hosts))

    def _train_call(self, h: int, state_ref, clients: list[int], round_idx: int) -> tuple:
        return (self.hosts[h].train.remote(state_ref, clients, round_idx, self.federation.client_timeout_s),
                clients)

    def _offer(self, round_idx: int, metrics: dict[str, float], round_bytes: float) -> None:
        if self.selection.offer(round_idx, metrics, round_bytes):
            self.best = {"state": self.state, "clients": self._client_states(), "reached": self.reached.copy()}

    def _client_states(self) -> dict[int, State]:
        """The clients' own states, where the flow keeps them ({} otherwise)."""
        return self.flow.client_states(self)

    def result(self, selection: str) -> dict:
        """The run's result: the state at the selected round (`best_val` or `final`), with its round and the
        end-of-run selection metrics."""
        snap = dict(self.best) if self.selection.picks_best(selection) else self._current()
        metrics = self.selection.summary(selection)
        tuned = self._tune(snap["state"])
        if tuned:  # the result is the state with its searched settings: re-evaluate it as such
            snap["state"] = {**snap["state"], **{k: np.asarray([v], np.float32) for k, v in tuned.items()}}
            after = self.evaluate(snap["state"])
            metrics.update({f"searched_{k}": v for k, v in tuned.items()})
            metrics.update({f"presearch_{k}": metrics[f"result_{k}"] for k in ("accuracy", "val_accuracy")})
            metrics.update({f"result_{k}": v for k, v in after.items()})
        return {"round": self.selection.result_round(selection), "snapshot": snap, "metrics": metrics}

    def _tune(self, state: State) -> dict[str, float]:
        """The method's post-training search on the validation split (Tip-Adapter's alpha/beta), if any."""
        if self.evals.val is None:
            return {}
        return self._on_a_host("tune", lambda: tune(self.method, state, self.evals), state)

    def _current(self) -> dict:
        """The current state, with the clients' own states (a personal flow) (reused from `best` when this round
        just became the best: nothing trained since, so they are the same states)."""
        just_best = self.selection.best_round is not None and self.selection.best_round == self.selection.last_round
        clients = self.best["clients"] if just_best else self._client_states()
        return {"state": self.state, "clients": clients, "reached": self.reached.copy()}

    def get_state(self):
        """The global state (the initial state, for a personal flow): what a checkpoint would hold."""
        return self.state

    def info(self) -> dict[str, int]:
        return {"trainable_params": state_params(self.state), "payload_bytes": state_nbytes(self.state)}

    def snapshot(self) -> dict:
        """The full server state for a checkpoint: the global state, the server strategy's memory, which
        clients already hold the initial state, their own states (a personal flow), their optimiser memories,
        and the selection so far (its record and the best state). (Client sampling, faults and local training
        draw from (seed, round, client), so the round number is all the RNG state there is.)

        The clients' optimiser memories stay on their hosts: `memory_refs` are the hosts' answers, which the
        caller fetches itself (`Federation.snapshot`), so a full model's moments (twice its size) never pass
        through this actor."""
        refs = [h.get_memory.remote() for h in self.hosts] if self.method_cls.keeps_optimizer(self.settings) else []
        return {**self._current(), "best": self.best, "selection": self.selection.to_json(), "memory_refs": refs,
                "strategy": self.strategy_memory}

    def restore(self, snap: dict) -> None:
        import ray

        self._ahead = None
        self.state = snap["state"]
        self.reached = np.array(snap["reached"], dtype=bool)  # a writable copy (ray.get gives read-only views)
        if "selection" in snap:
            self.selection = Selection.from_json(snap["selection"])
            self.best = snap["best"]
        self.strategy_memory = dict(snap.get("strategy", {}))
        self.flow.restore(self, snap)
        if snap.get("memory"):
            ray.get([h.set_memory.remote(snap["memory"]) for h in self.hosts])

    def audit_log(self) -> list[dict]:
        import ray

        return [m for part in ray.get([h.audit_log.remote() for h in self.hosts]) for m in part]

    def _collect(self, calls: dict[int, tuple], round_idx: int) -> tuple[list, int, int]:
        """Wait for the hosts' reports, each until its deadline (`Supervisor.deadline`). A host that died, or is still
        busy past its deadline, loses its clients for this round and is replaced. Returns (reports, clients
        failed, clients timed out)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        reports, failed, timed_out = [], 0, 0
        refs = {h: ref for h, (ref, _) in calls.items()}
        for h, late in self.watch.wait(refs, lambda h: self.watch.deadline(h, calls[h][1])):
            ref, clients = calls[h]
            if late is not None:
                print(f"raycache: round {round_idx}: client host {h} gave no answer within "
                      f"{late:.0f} s; its {len(clients)} clients miss the round and the "
                      f"host is replaced", file=sys.stderr)
                failed += len(clients)
                self.watch.missed_deadline(h)
                self.watch.respawn(h)
                continue
            try:
                rep = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError):  # the host died mid-round
                failed += len(clients)
                self.watch.respawn(h)
                continue
            self.watch.trained(rep.column("seconds"), rep.column("samples"))
            timed_out += len(rep.timed_out)
            reports.append(rep)
        return reports, failed, timed_out

    def run_round(self, round_idx: int) -> dict[str, float]:
        """Round `round_idx`: its clients' training (started already if the previous round looked ahead), the
        merge, the evaluation; its metrics. `round_seconds` runs from the previous round's end when this round
        had started by then (its training overlapped the driver's turn), else from this call."""
        t0 = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.round_idx == round_idx and ahead.state is self.state:
            t0 = self._ended
            for h, (_, clients) in list(ahead.calls.items()):
                if self.hosts[h] is not ahead.hosts[h]:  # replaced since (it failed the evaluation): ask its successor
                    ahead.calls[h] = self._train_call(h, ahead.state_ref, clients, round_idx)
            rnd = ahead
        else:  # not started (the first round of a resumed run, a rebuilt server, no looking ahead): now
            rnd = self._issue(round_idx)
        del ahead
        sampled, faults, reporting, calls = rnd.sampled, rnd.faults, rnd.reporting, rnd.calls
        reports, failed, timed_out = self._collect(calls, round_idx) if calls else ([], 0, 0)
        succeeded = int(sum(len(r.messages) for r in reports))
        counts = {"clients_sampled": float(len(sampled)), "clients_succeeded": float(succeeded),
                  "clients_failed": float(failed + timed_out), "clients_dropped": float(faults.dropped.sum()),
                  "clients_late": float(faults.late.sum()), "host_restarts": float(self.watch.restarts)}
        if succeeded < self.federation.min_clients:  # never aggregate from (almost) nothing
            raise RunFailed(f"round {round_idx}: {succeeded} of {len(sampled)} sampled clients reported, fewer "
                              f"than federation.min_clients={self.federation.min_clients} (failed {failed + timed_out}"
                              f", dropped {int(faults.dropped.sum())}, late {int(faults.late.sum())})")
        bytes_down, bytes_up = self.flow.merge(self, reports, reporting, round_idx)
        train_seconds = time.perf_counter() - t0
        order = np.argsort(np.concatenate([r.column("client", np.int64) for r in reports]))  # whatever the hosts
        samples = np.concatenate([r.column("samples") for r in reports])[order]
        losses = np.concatenate([r.column("loss") for r in reports])[order]
        client_seconds = float(sum(r.column("seconds").sum() for r in reports))
        peak_mb = float(max(r.peak_rss_mb for r in reports))
        # The hosts' partial sums (a full model's, in float64) and the broadcast, in the object store and
        # here: merged and trained from, so dropped before the evaluation.
        del reports, calls, rnd
        heap.release(state_nbytes(self.state))
        metrics = self._evaluate_then(round_idx + 1)
        metrics.update({
            "loss": float((losses * samples).sum() / samples.sum()),
            "comm_bytes_up": bytes_up,
            "comm_bytes_down": bytes_down,
            **counts,
            "client_seconds": client_seconds,
            "train_seconds": train_seconds,
            "round_seconds": time.perf_counter() - t0,
            "peak_memory_mb": peak_mb,
            "trainable_params": float(state_params(self.state)),
        })
        dp = self.federation.dp
        if dp is not None:  # the privacy spent so far: every round is one Gaussian mechanism at rate q
            from raycache.federation.privacy import epsilon

            metrics["dp_epsilon"] = epsilon(dp.noise_multiplier, len(sampled) / self.trainers, round_idx, dp.delta)
        self._offer(round_idx, metrics, bytes_up + bytes_down)
        self._ended = time.perf_counter()
        return metrics


@dataclass
class Round:
    """A round's training as it was started: its clients, faults and calls (host -> (ref, clients)), the
    state it broadcast (by `state_ref`) and the hosts it asked."""

    round_idx: int
    sampled: np.ndarray
    faults: object
    reporting: np.ndarray
    state_ref: object
    state: State
    calls: dict[int, tuple]
    hosts: list
