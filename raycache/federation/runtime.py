"""Start the federation on Ray: client-host actors with configured resources, and the server actor."""

from __future__ import annotations

import numpy as np

from raycache.methods.base import Task


class Federation:
    """Owns the actors of one experiment; `close()` (or leaving the `with` block) removes them."""

    def __init__(self, cfg, task: Task, train: tuple[np.ndarray, np.ndarray], parts: list[np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], server_data: tuple[np.ndarray, np.ndarray],
                 class_counts: np.ndarray) -> None:
        import ray

        from raycache.federation.host import ClientHost
        from raycache.federation.server import Server

        rt = cfg.runtime
        n_hosts = min(rt.client_actors, len(parts))
        task_ref = ray.put(task)
        train_ref = ray.put(train)  # one object-store copy shared by every host
        host_cls = ray.remote(ClientHost).options(num_cpus=rt.client_cpus, num_gpus=rt.client_gpus)
        self.hosts = [
            host_cls.remote(cfg.method.name, cfg.method, task_ref, train_ref,
                            {c: parts[c] for c in range(h, len(parts), n_hosts)}, cfg.seed,
                            threads=max(1, int(rt.client_cpus)))
            for h in range(n_hosts)
        ]
        server_cls = ray.remote(Server).options(num_cpus=0)
        self.server = server_cls.remote(cfg.method.name, cfg.method, task_ref, test, server_data, class_counts,
                                        self.hosts, cfg.federation.fraction, cfg.seed)
        ray.get([h.ping.remote() for h in self.hosts])

    def info(self) -> dict[str, int]:
        import ray

        return ray.get(self.server.info.remote())

    def evaluate(self) -> dict[str, float]:
        import ray

        return ray.get(self.server.evaluate.remote())

    def run_round(self, round_idx: int) -> dict[str, float]:
        import ray

        return ray.get(self.server.run_round.remote(round_idx))

    def state(self):
        import ray

        return ray.get(self.server.get_state.remote())

    def close(self) -> None:
        import ray

        for actor in [self.server, *self.hosts]:
            ray.kill(actor)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_fits(actors: int, cpus: float, gpus: float) -> None:
    """Fail now, rather than wait forever, when the client actors can never all be placed on this Ray."""
    import ray

    from raycache.errors import UserError

    have = ray.cluster_resources()
    for what, each, key in (("CPU", cpus, "client_cpus"), ("GPU", gpus, "client_gpus")):
        need = actors * each
        if need > have.get(what, 0.0) + 1e-9:
            raise UserError(f"runtime.{key}: {actors} client actors x {each:g} {what} = {need:g} {what}, but the "
                            f"Ray cluster has {have.get(what, 0.0):g}; lower runtime.client_actors or "
                            f"runtime.{key}")


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
