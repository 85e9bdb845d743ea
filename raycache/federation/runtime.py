"""Start the federation on Ray: client-host actors with configured resources, and the server actor."""

from __future__ import annotations

import numpy as np

from raycache.methods.base import Task


class WarmPool:
    """Idle server and host actors of this process, kept for its next federation (a sweep trial's process,
    which Tune reuses for the next trial of the same resources). A reused actor is re-initialised with the
    next federation's arguments, exactly as a new one would be constructed, but without starting a process,
    importing torch or loading its compiler stack again. Actors die with the process that owns them."""

    def __init__(self) -> None:
        self.idle: dict[tuple, list] = {}

    def take(self, key: tuple):
        actors = self.idle.get(key)
        return actors.pop() if actors else None

    def give(self, key: tuple, actor) -> None:
        self.idle.setdefault(key, []).append(actor)

    def size(self) -> int:
        return sum(len(v) for v in self.idle.values())


WARM = WarmPool()  # this process's pool (used only by federations started with `warm=True`)


class Federation:
    """Owns the actors of one experiment; `close()` (or leaving the `with` block) removes them, or, for a
    federation started with `warm=True`, hands them to this process's `WARM` pool for the next one."""

    def __init__(self, cfg, task: Task, train: tuple[np.ndarray, np.ndarray], parts: list[np.ndarray],
                 evals, server_data: tuple[np.ndarray, np.ndarray], class_counts: np.ndarray,
                 audit: bool = False, warm: bool = False) -> None:
        """`train` holds the inputs the method trains on (features, or images), `parts` each trainer's rows
        of it (one pooled trainer for a centralised method), `evals` the test, validation and client-test
        sets (`EvalSets`), `class_counts` the clients' label mixes."""
        self.hosts: list = []
        self.nodes: list[str] = []
        self.server = None
        self.warm = warm
        self.reused = 0  # actors taken from the warm pool
        self.failed = False
        try:
            self._start(cfg, task, train, parts, evals, server_data, class_counts, audit)
        except BaseException:
            self.failed = True
            self.close()  # never leave actors holding a shared cluster's CPUs
            raise

    def _start(self, cfg, task, train, parts, evals, server_data, class_counts, audit) -> None:
        import ray

        from raycache.federation.host import ClientHost
        from raycache.federation.server import Server

        from raycache.federation.host import ClientRules
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
        import uuid

        # Named (raycache-host-<federation>-<host>-<generation>) so that operators and tests can find them.
        options = {"num_cpus": rt.client_cpus, "num_gpus": rt.client_gpus,
                   "name": f"raycache-host-{uuid.uuid4().hex[:8]}"}
        specs = [((method_cls, cfg.method, task_ref, train_ref,
                   {c: parts[c] for c in range(h, len(parts), n_hosts)}, cfg.seed),
                  {"threads": max(1, int(rt.client_cpus)), "use_gpu": rt.client_gpus > 0, "evals": evals_ref,
                   "audit": audit, "rules": rules})
                 for h in range(n_hosts)]
        host_cls = ray.remote(ClientHost)
        self.host_key = ("host", rt.client_cpus, rt.client_gpus)
        starting = []
        for h, (args, kwargs) in enumerate(specs):  # one by one, so that a failure part-way still cleans up
            host = WARM.take(self.host_key) if self.warm else None
            if host is None:
                host = host_cls.options(**{**options, "name": f"{options['name']}-{h}-0"}).remote(*args, **kwargs)
                starting.append(host.node.remote())
            else:
                self.reused += 1
                starting.append(host.reinit.remote(*args, **kwargs))
            self.hosts.append(host)
        server_args = (method_cls, cfg.method, task_ref, evals_ref, server_data, class_counts, self.hosts,
                       len(parts), cfg.federation, cfg.seed, (options, specs),
                       np.array([len(p) for p in parts], np.int64))
        # The server can replace a host that dies or times out: it gets the same options and arguments.
        self.server = WARM.take(("server",)) if self.warm else None
        if self.server is None:
            self.server = ray.remote(Server).options(num_cpus=0).remote(*server_args)
        else:
            self.reused += 1
            ray.get(self.server.reinit.remote(*server_args))
        self.nodes: list[str] = ray.get(starting)  # waits until all have started
        # the distinct GPUs the hosts hold (four hosts of client_gpus: 0.25 on one GPU: 1)
        self.gpu_devices = len({g for gs in ray.get([h.gpus.remote() for h in self.hosts]) for g in gs})

    def info(self) -> dict[str, int]:
        import ray

        return ray.get(self.server.info.remote())

    def state(self):
        import ray

        return ray.get(self.server.get_state.remote())

    def snapshot(self) -> dict:
        import ray

        return ray.get(self.server.snapshot.remote())

    def restore(self, snap: dict) -> None:
        import ray

        ray.get(self.server.restore.remote(snap))

    def audit_log(self) -> list[dict]:
        """Every client message recorded since the last call (a federation started with `audit`)."""
        import ray

        return ray.get(self.server.audit_log.remote())

    def evaluate(self) -> dict[str, float]:
        import ray

        return ray.get(self.server.evaluate.remote())

    def start(self) -> dict[str, float]:
        """Round 0: evaluate the initial state and offer it for selection."""
        import ray

        return ray.get(self.server.start.remote())

    def result(self, selection: str) -> dict:
        """The run's selected result: {"round", "snapshot", "metrics"}."""
        import ray

        return ray.get(self.server.result.remote(selection))

    def run_round(self, round_idx: int) -> dict[str, float]:
        import ray

        return ray.get(self.server.run_round.remote(round_idx))

    def close(self) -> None:
        import ray

        if self.warm and not self.failed and self.server is not None:
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
        for actor in [self.server, *self.hosts]:
            if actor is not None:
                ray.kill(actor)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, kind, *exc) -> None:
        # actors of a failed run are not reused; a clean early stop (a scheduler's) leaves them healthy
        self.failed = self.failed or (kind is not None and not getattr(kind, "clean", False))
        self.close()


def check_fits(prefix: str, actors: int, cpus: float, gpus: float) -> None:
    """Fail now, rather than wait forever, when a pool of actors can never all be placed on this Ray.
    `prefix` names the config keys: `runtime.client` -> runtime.client_cpus / runtime.client_gpus."""
    import ray

    from raycache.errors import UserError

    have = ray.cluster_resources()
    for what, each in (("CPU", cpus), ("GPU", gpus)):
        need = actors * each
        if need > have.get(what, 0.0) + 1e-9:
            raise UserError(f"{prefix}_{what.lower()}s: {actors} actors x {each:g} {what} = {need:g} {what}, but "
                            f"the Ray cluster has {have.get(what, 0.0):g}; use fewer actors or less per actor")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A `host:port` (or `ray://host:port`) address must accept a TCP connection: Ray itself retries an
    unreachable one for minutes before it gives up."""
    import socket

    from raycache.errors import UserError

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto` and the like: Ray resolves them and fails fast itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"runtime.address: cannot reach Ray at {address!r} ({err.strerror or err})") from None


def ensure_ray(runtime) -> bool:
    """Join `runtime.address`, or start a local Ray; returns True if this call started it."""
    import logging
    import sys

    import ray
    import ray.data

    from raycache.errors import UserError

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    if ray.is_initialized():
        return False
    if runtime.address:
        check_reachable(runtime.address)
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if runtime.address:
            ray.init(address=runtime.address, **kwargs)
        else:
            ray.init(num_cpus=runtime.num_cpus, **kwargs)
    except (ConnectionError, ValueError) as err:
        raise UserError(f"runtime.address: cannot reach Ray at {runtime.address!r} "
                        f"({str(err).splitlines()[0][:160]})") from None
    return True
