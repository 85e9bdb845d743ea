"""Start the federation on Ray: client-host actors with configured resources, and the server actor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raycache.methods.base import Task


class WarmPool:
    """Idle server and host actors of this process, kept for its next federation (a sweep trial's process,
    which Tune reuses for the next trial of the same resources). A reused actor is re-initialised with the
    next federation's arguments, exactly as a new one would be constructed, but without starting a process,
    or importing torch again. Actors die with the process that owns them."""

    def __init__(self) -> None:
        self.idle: dict[tuple, list] = {}

    def take(self, key: tuple):
        actors = self.idle.get(key)
        return actors.pop() if actors else None

    def give(self, key: tuple, actor) -> None:
        self.idle.setdefault(key, []).append(actor)

    def size(self) -> int:
        return sum(len(v) for v in self.idle.values())

    def clear(self) -> None:
        """Kill every idle actor now (their CPUs go back to the cluster) instead of when this process ends."""
        import ray

        for actors in self.idle.values():
            for actor in actors:
                ray.kill(actor)
        self.idle.clear()


WARM = WarmPool()  # this process's pool (used only by federations started with `warm=True`)


class Federation:
    """Owns the actors of one experiment; `close()` (or leaving the `with` block) removes them, or, for a
    federation started with `warm=True`, hands them to this process's `WARM` pool for the next one."""

    def __init__(self, cfg, task: Task, train: tuple[np.ndarray, np.ndarray], parts: list[np.ndarray],
                 evals, server_data: tuple[np.ndarray, np.ndarray], class_counts: np.ndarray,
                 audit: bool = False, warm: bool = False, look_ahead: bool = True) -> None:
        """`train` holds the inputs the method trains on (features, or images), `parts` each trainer's rows
        of it (one pooled trainer for a centralised method), `evals` the test, validation and client-test
        sets (`EvalSets`), `class_counts` the clients' label mixes. `look_ahead` (with
        `runtime.look_ahead`): the server starts each round's training before it is asked for the round."""
        self.hosts: list = []
        self.nodes: list[str] = []
        self.server = None
        self.warm = warm
        self.reused = 0  # actors taken from the warm pool
        self.failed = False
        self.cfg, self.audit = cfg, audit
        # the audit log is read per round: a round started before the last one's log is read would mix them
        self.look_ahead = look_ahead and cfg.runtime.look_ahead and not audit
        self._spec = (cfg, task, train, parts, evals, server_data, class_counts, audit)
        self.round = 0  # the last round the server's state holds
        self._started = False  # round 0 (`start`) done
        # the latest snapshot, the state after round `_snap_round`: its arrays, or the checkpoint file that
        # holds them once it is saved (`saved`), so that a full model's state and best state are not held here
        self._snap: dict | Path | None = None
        self._snap_round = 0
        self._lost: BaseException | None = None  # the server was lost: rebuild before the next call
        self._pending: tuple[int, object] | None = None  # (round, its call) started by `submit_round`
        self.server_restarts = 0  # lost servers replaced
        self.rounds_replayed = 0  # rounds run again on a replacement
        try:
            self._start(*self._spec)
        except BaseException:
            self.failed = True
            self.close()  # never leave actors holding a shared cluster's CPUs
            raise

    def _start(self, cfg, task, train, parts, evals, server_data, class_counts, audit) -> None:
        import ray

        from raycache.federation.host import ClientHost, ClientRows, ClientRules
        from raycache.federation.sampling import home_host
        from raycache.federation.server import Server
        from raycache.federation.strategies import strategy_class
        from raycache.methods import method_class, weighting

        rt = cfg.runtime
        fed = cfg.federation
        method_cls = method_class(cfg.method.name)  # the class travels to the actors, not its name
        rules = ClientRules(weighting(fed, cfg.method.name), strategy_class(fed.strategy).per_class,
                            None if fed.dp is None else fed.dp.clip_norm, fed.prox_mu)
        n_hosts = min(rt.client_actors, len(parts))
        task_ref = ray.put(task)
        train_ref = ray.put(train)  # one object-store copy shared by every host
        evals_ref = ray.put(evals)
        rows_ref = ray.put(ClientRows.pack(parts))  # any host can train any client that keeps no state there
        homes: list[dict[int, np.ndarray]] = [{} for _ in range(n_hosts)]  # the clients each host keeps
        for c, rows in enumerate(parts):
            homes[home_host(c, n_hosts)][c] = rows
        import uuid

        # Named (raycache-host-<federation>-<host>-<generation>) so that operators and tests can find them.
        options = {"num_cpus": rt.client_cpus, "num_gpus": rt.client_gpus,
                   "name": f"raycache-host-{uuid.uuid4().hex[:8]}"}
        specs = [((method_cls, cfg.method, task_ref, train_ref, homes[h], cfg.seed),
                  {"threads": max(1, int(rt.client_cpus)), "use_gpu": rt.client_gpus > 0, "evals": evals_ref,
                   "audit": audit, "rules": rules, "rows": rows_ref})
                 for h in range(n_hosts)]
        host_cls = ray.remote(ClientHost)
        self.host_key = ("host", rt.client_cpus, rt.client_gpus)
        starting, reinits = [], []
        for h, (args, kwargs) in enumerate(specs):  # one by one, so that a failure part-way still cleans up
            host = WARM.take(self.host_key) if self.warm else None
            if host is None:
                host = host_cls.options(**{**options, "name": f"{options['name']}-{h}-0"}).remote(*args, **kwargs)
                starting.append(host.node.remote())
            else:
                self.reused += 1
                starting.append(host.reinit.remote(*args, **kwargs))
                reinits.append(starting[-1])
            self.hosts.append(host)
        # The server asks a host for its initial state as it starts: a reused host must be this federation's
        # first (calls from two callers, here and the server, have no order between them).
        ray.get(reinits)
        server_args = (method_cls, cfg.method, task_ref, evals_ref, server_data, class_counts, self.hosts,
                       len(parts), cfg.federation, cfg.seed, (options, specs),
                       np.array([len(p) for p in parts], np.int64), self.look_ahead)
        # The server can replace a host that dies or times out: it gets the same options and arguments.
        self.server = WARM.take(("server",)) if self.warm else None
        if self.server is None:
            self.server = ray.remote(Server).options(num_cpus=0, name=f"raycache-server-{uuid.uuid4().hex[:8]}"
                                                     ).remote(*server_args)
        else:
            self.reused += 1
            ray.get(self.server.reinit.remote(*server_args))
        self.nodes: list[str] = ray.get(starting)  # waits until all have started
        # the distinct GPUs the hosts hold (four hosts of client_gpus: 0.25 on one GPU: 1)
        self.gpu_devices = len({g for gs in ray.get([h.gpus.remote() for h in self.hosts]) for g in gs})

    # Every call to the server goes through `_call`: a lost server actor (its process or node died) is
    # replaced by a new federation (server and hosts), restored from the latest snapshot the driver took (the
    # round checkpoint) or started afresh, and brought back to the round it had reached by replaying the rounds
    # since; then the call is made again. Client sampling, faults and local training draw from (seed, round,
    # client), so a replayed round is the round it replaces. At most `federation.server_restarts` times a run.

    def _call(self, method: str, *args, started=None):
        """The server's `method(*args)`; `started`: that call's ref, already made (`submit_round`)."""
        import ray

        while True:
            try:
                if self._lost is not None:
                    self._rebuild()
                    started = None  # made to the lost server
                ref = getattr(self.server, method).remote(*args) if started is None else started
                started = None  # a retry makes the call anew
                return ray.get(ref)
            except ray.exceptions.RayActorError as err:
                server = self.server
                if (isinstance(err, ray.exceptions.RayTaskError) or server is None
                        or err.actor_id != server._actor_id.hex()):
                    raise  # the server raised (a host it could not replace, ...): not a lost server
                self._note_lost(err)

    def _note_lost(self, err: BaseException) -> None:
        import sys

        from raycache.errors import RunFailed

        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        limit = self.cfg.federation.server_restarts
        if self.server_restarts >= limit:
            raise RunFailed(f"round {self.round + 1}: the server actor was lost ({cause}) and "
                            f"federation.server_restarts={limit} replacements are used up; --resume continues "
                            f"the run from its last checkpoint") from None
        self.server_restarts += 1
        self._lost = err
        since = f"its round {self._snap_round} snapshot" if self._snap is not None else "the start"
        print(f"raycache: round {self.round + 1}: the server actor was lost ({cause}); starting a new "
              f"federation from {since}", file=sys.stderr)

    def _rebuild(self) -> None:
        import ray

        self._kill()
        self.hosts, self.server = [], None
        self._start(*self._spec)
        if self._snap is not None:
            snap = self._snap
            if isinstance(snap, Path):
                from raycache.federation import checkpoint

                snap = checkpoint.load(snap, what="the run's latest checkpoint").snapshot
            ray.get(self.server.restore.remote(snap))
            del snap
        elif self._started:
            ray.get(self.server.start.remote())
        for r in range(self._snap_round + 1, self.round + 1):  # rounds since the snapshot
            ray.get(self.server.run_round.remote(r))
            self.rounds_replayed += 1
        if self.audit:  # the replayed rounds' messages were recorded when they first ran
            ray.get(self.server.audit_log.remote())
        self._lost = None

    def info(self) -> dict[str, int]:
        return self._call("info")

    def state(self):
        return self._call("get_state")

    def snapshot(self) -> dict:
        """The server's full state now; kept as the point a lost server is rebuilt from."""
        import ray

        while True:
            snap = self._call("snapshot")
            try:  # the clients' optimiser memories, straight from the hosts, not through the server
                parts = ray.get(snap.pop("memory_refs"))
                break
            except ray.exceptions.OwnerDiedError as err:  # the server was lost before they were fetched
                self._note_lost(err)
        memory: dict = {}
        for part in parts:
            memory.update(part)
        snap["memory"] = memory
        self._snap, self._snap_round = snap, self.round
        return snap

    def saved(self, path: Path, round_idx: int) -> None:
        """The latest snapshot (of round `round_idx`) is now the checkpoint at `path`: a lost server is rebuilt
        from that file, and this process lets go of the snapshot's arrays."""
        if round_idx != self._snap_round or not isinstance(self._snap, dict):
            raise ValueError(f"checkpoint of round {round_idx} given for the snapshot of round {self._snap_round}")
        self._snap = Path(path)

    def restore(self, snap: dict, round_idx: int, path: Path | None = None) -> None:
        """Continue from `snap`, the server's state after round `round_idx` (a checkpoint, read from `path`:
        a lost server is rebuilt from that file, not from arrays kept here)."""
        self._call("restore", snap)
        self._snap, self._snap_round, self.round = snap if path is None else Path(path), round_idx, round_idx

    def audit_log(self) -> list[dict]:
        """Every client message recorded since the last call (a federation started with `audit`)."""
        return self._call("audit_log")

    def evaluate(self) -> dict[str, float]:
        return self._call("evaluate")

    def start(self) -> dict[str, float]:
        """Round 0: evaluate the initial state and offer it for selection."""
        metrics = self._call("start")
        self._started = True
        return metrics

    def result(self, selection: str) -> dict:
        """The run's selected result: {"round", "snapshot", "metrics"}."""
        return self._call("result", selection)

    def submit_round(self, round_idx: int) -> None:
        """Start round `round_idx` on the server and return at once; `run_round(round_idx)` collects it. The
        driver writes the previous round's checkpoint and metrics meanwhile: take its `snapshot` first (the
        server answers calls in order, so any other call waits for the round)."""
        if round_idx != self.round + 1 or self._pending is not None:
            raise ValueError(f"round {round_idx} submitted after round {self.round}"
                             + (f" with round {self._pending[0]} still running" if self._pending else ""))
        if self._lost is None:  # a lost server is rebuilt by `run_round`, which then makes the call itself
            import ray

            try:
                self._pending = (round_idx, self.server.run_round.remote(round_idx))
            except ray.exceptions.RayActorError:  # found lost at once: `run_round`'s own call finds it too
                pass

    def run_round(self, round_idx: int) -> dict[str, float]:
        """Round `round_idx`'s metrics: the call `submit_round` started, or one made now."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] != round_idx:
            raise ValueError(f"round {round_idx} asked for while round {pending[0]} runs")
        metrics = self._call("run_round", round_idx, started=None if pending is None else pending[1])
        self.round = round_idx
        return metrics

    def _kill(self) -> None:
        import ray

        for actor in [self.server, *self.hosts]:
            if actor is not None:
                ray.kill(actor)

    def close(self) -> None:
        import ray

        if self.warm and not self.failed and self.server is not None and self._pending is None:  # idle only
            try:  # the hosts the server holds now (it may have replaced some)
                hosts = ray.get(self.server.current_hosts.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (a server that cannot answer is not worth keeping)
                hosts = None
            if hosts is not None:
                WARM.give(("server",), self.server)
                for host in hosts:
                    WARM.give(self.host_key, host)
                self.server, self.hosts = None, []
                return
        self._kill()

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, kind, *exc) -> None:
        # actors of a failed run are not reused; a clean early stop (a scheduler's) leaves them healthy
        self.failed = self.failed or (kind is not None and not getattr(kind, "clean", False))
        self.close()
