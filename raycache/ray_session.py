"""The Ray a run uses: a cluster it joins (checked reachable first) or a local Ray it starts with only what a run
needs (beside its model's preflight, with its encoder pool: `EarlyStart`), whether a pool of actors can ever
fit on it, and the helpers a Ray Data pipeline leaves behind."""

from __future__ import annotations

from typing import Callable


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


_LOCAL_RAY: str | None = None  # the node id of the local Ray that `ensure_ray` started here (new at every start)

# Ray Data's helper actors, (name, namespace): detached, one per cluster, got or created by every pipeline
DATA_HELPERS = (("datasets_stats_actor", "_dataset_stats_actor"),
                ("AutoscalingCoordinator", "AutoscalingCoordinator"),
                ("ActorLocationTracker", "ActorLocationTracker"))


def ensure_ray(runtime) -> bool:
    """Join `runtime.address`, or start a local Ray; returns True if this call started it."""
    global _LOCAL_RAY
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
    if not runtime.address:
        stop_unused_daemons()
        _LOCAL_RAY = ray.get_runtime_context().get_node_id()
    return True


def release_data_actors() -> None:
    """Stop the helper actors that Ray Data's pipelines leave running (its stats actor, autoscaling coordinator
    and actor-location tracker: about 310 MB of memory, benchmarks/memory.py), once this process's last
    pipeline (encoding) is done. Only on the local Ray that this process started, where raycache starts no
    other driver; on a cluster (or a Ray someone else started) they may serve others. A later pipeline starts
    them again."""
    import ray

    if _LOCAL_RAY is None or not ray.is_initialized() or ray.get_runtime_context().get_node_id() != _LOCAL_RAY:
        return
    for name, namespace in DATA_HELPERS:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # no pipeline started it (features came from the store)
            continue


def stop_unused_daemons() -> None:
    """Stop the two daemons of a local Ray that this process started and nothing here uses. The autoscaler
    monitor: one machine's fixed resources have nothing to scale. The log monitor: it streams the workers'
    output to drivers that ask for it, and raycache's driver asks for none (`log_to_driver=False`; the
    workers' logs stay in Ray's session folder). Together about 110 MB of memory (benchmarks/memory.py).
    `ray start` can leave both out (`--no-monitor`, `--include-log-monitor=False`); `ray.init` cannot, so
    they are stopped once it returns, through the node's own calls. A cluster that the run joins
    (`runtime.address`) is left as it is."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    for name in ("kill_monitor", "kill_log_monitor"):
        stop = getattr(node, name, None)
        if stop is not None:  # a Ray without them (a future version) loses only the memory saving
            stop(check_alive=False)


def warm_data():
    """Ray Data's cold start, paid now in a thread (returned): the first pipeline on a fresh Ray waits about
    3 s before its first block (its task workers import Ray Data; its helper actors start), the next ones
    0.2-0.3 s (measured on this project's 2-core machines). Its caller joins it before Ray may stop
    (`EarlyStart.record`, `EarlyStart.close`)."""
    import threading

    def run() -> None:
        import ray
        import ray.data

        try:
            if ray.is_initialized():  # never one of its own (Ray Data would start one, from this thread)
                ray.data.range(1).map_batches(_same, batch_format="numpy").materialize()
        except Exception:  # noqa: BLE001 - only a warm-up: the pipeline it serves reports its own failures
            pass

    thread = threading.Thread(target=run, name="raycache-warm-data", daemon=True)
    thread.start()
    return thread


def _same(batch):
    return batch


class EarlyStart:
    """What a run starts while its model's single-use process works (`prepare`'s `meanwhile`): Ray; and,
    where the store lacks the dataset's features, the encoder pool, whose actors import torch and build the
    model beside that process rather than after it, and Ray Data's cold start (`warm_data`)."""

    def __init__(self, stage: Callable[[str], None], shared: Callable[..., bool] = lambda spec, source: False) -> None:
        """`shared(spec, source)`: whether the caller has the dataset's features already (a sweep's trial)."""
        self.stage, self.shared = stage, shared
        self.encoders = None  # raycache.data.encoders.EncoderPool, once started
        self.ray_s: float | None = None
        self.warming = None  # the thread of `warm_data`

    def __call__(self, cfg, spec, source, rows=None) -> None:
        """`rows`: the only rows whose features the run encodes (a method that trains on pixels), else None."""
        import time
        from pathlib import Path

        from raycache.data.encoders import EncoderPool
        from raycache.data.feature_store import feature_key, has_entry

        self.stage("starting Ray")
        t = time.perf_counter()
        ensure_ray(cfg.runtime)
        self.ray_s = time.perf_counter() - t
        store = Path(cfg.runtime.cache_dir) / "features"
        if self.shared(spec, source) or has_entry(store, feature_key(spec, source)) or (
                rows is not None and has_entry(store, feature_key(spec, source.subset(rows)))):
            return
        if cfg.runtime.address is None:
            check_fits("runtime.encoder", cfg.runtime.encoder_actors, 0.0, cfg.runtime.encoder_gpus)
        self.encoders = EncoderPool(spec, cfg.runtime).start()
        self.warming = warm_data()

    def record(self, timings: dict[str, float]) -> None:
        """Once the model's preflight is made: Ray's start into `timings`; the warm-up over (it has had the
        preflight's time; no pipeline of the run's runs beside it)."""
        if self.ray_s is not None:
            timings["time_ray_start_s"] = self.ray_s
        if self.warming is not None:
            self.warming.join(WARM_WAIT_S)

    def close(self) -> None:
        """The pool stopped; the warm-up's helper actors released if the run ended before its encode."""
        if self.encoders is not None:
            self.encoders.close()
        if self.warming is not None:
            self.warming.join(WARM_WAIT_S)
            release_data_actors()
            self.warming = None


WARM_WAIT_S = 60.0  # a warm-up that takes longer (a cluster still adding nodes) is left to finish on its own
