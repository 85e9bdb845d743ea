"""How the server watches its client hosts: how long it waits for each (an automatic deadline from the paces
it has measured, or the configured one), and a replacement for a host that died or stayed silent past it.

The server owns one `Supervisor` per federation; it shares the server's list of hosts, so a host replaced
here is the one the server calls next.
"""

from __future__ import annotations

import time

import numpy as np

from raycache.errors import RunFailed

# The automatic deadlines (federation.client_timeout_s: null): see Supervisor.deadline and .eval_deadline.
AUTO_FLOOR_S = 30.0
AUTO_FACTOR = 10.0
RESPAWN_TIMEOUT_S = 600.0  # a replacement host that has not started by then cannot be placed


class Supervisor:
    def __init__(self, hosts: list, host_spec: tuple | None, federation, sizes: np.ndarray) -> None:
        """`hosts`: the server's own list (replacements are put in it); `host_spec` = (actor options, [(args,
        kwargs) per host]): how to start a replacement (None: a host cannot be replaced); `sizes`: each
        trainer's training samples (the automatic deadline scales with them)."""
        self.hosts = hosts
        self.host_spec = host_spec
        self.federation = federation
        self.sizes = sizes
        self.restarts = 0  # hosts replaced
        self.rate: float | None = None  # the slowest local training seen, in seconds per sample
        self.client_max = 0.0  # the slowest single client's seconds seen
        self.missed: dict[int, int] = {}  # host index -> deadlines it missed (each doubles its next one)
        self.eval_rate: float | None = None  # the slowest evaluation seen, in seconds per row

    @property
    def replaceable(self) -> bool:
        return self.host_spec is not None

    def deadline(self, h: int, clients: list[int]) -> float | None:
        """Seconds host `h` may take to train `clients` before it is given up on (None: no limit yet).

        `federation.client_timeout_s` set: that many per client, plus 5 s. Null (the default): automatic,
        AUTO_FLOOR_S plus AUTO_FACTOR times what the host's clients would take at the slowest pace measured
        so far in this run (this round's earlier hosts included): the host's samples at the slowest seconds
        per sample of one host's clients together, plus its clients at the slowest single client's seconds
        (a per-client cost that samples do not show); doubled for every deadline this host missed before
        (a host slower than the ones measured gets more time, not the same cut every round). Generous
        enough that no legitimate round is cut off, short enough that a hung host costs minutes, not the
        run. Before any client has reported there is no measurement and no limit."""
        timeout = self.federation.client_timeout_s
        if timeout is not None:
            return timeout * len(clients) + 5.0
        if self.rate is None:
            return None
        pace = self.rate * float(self.sizes[clients].sum()) + self.client_max * len(clients)
        return (AUTO_FLOOR_S + AUTO_FACTOR * pace) * 2.0 ** self.missed.get(h, 0)

    def eval_deadline(self, h: int, rows: int) -> float | None:
        """Seconds host `h` may take to predict `rows` rows (None: no limit yet): AUTO_FLOOR_S plus AUTO_FACTOR
        times those rows at the slowest pace an evaluation has shown so far (measured from the calls' start,
        to the host's own last answer), doubled for every deadline this host missed before (in training or
        evaluation). The first evaluation of a server (round 0's, or the first after a resume or a rebuilt
        server) sets the pace and has no limit, like the first round of training."""
        if self.eval_rate is None:
            return None
        return (AUTO_FLOOR_S + AUTO_FACTOR * self.eval_rate * rows) * 2.0 ** self.missed.get(h, 0)

    def trained(self, seconds: np.ndarray, samples: np.ndarray) -> None:
        """Record a host's clients' training times and sample counts (the training pace)."""
        if len(seconds):  # the host's clients together (a client's fixed cost spread over its samples)
            rate = float(seconds.sum() / max(samples.sum(), 1))
            self.rate = rate if self.rate is None else max(self.rate, rate)
            self.client_max = max(self.client_max, float(seconds.max()))

    def evaluated(self, seconds: float, rows: int) -> None:
        """Record that a host predicted `rows` rows in `seconds` (the evaluation pace)."""
        pace = seconds / max(rows, 1)
        self.eval_rate = pace if self.eval_rate is None else max(self.eval_rate, pace)

    def missed_deadline(self, h: int) -> None:
        self.missed[h] = self.missed.get(h, 0) + 1

    def wait(self, refs: dict[int, object], limit):
        """Yield (host, late) for each host as its call `refs[host]` is ready (late None) or as `limit(host)`
        seconds (None: no limit) pass since the wait began without it (late: that limit). Limits are asked
        again after every answer, so what the caller learns from one host (its pace) applies to the others."""
        import ray

        start = time.monotonic()
        pending = dict(refs)
        while pending:
            limits = {h: limit(h) for h in pending}
            due = [start + d for d in limits.values() if d is not None]
            ready, _ = ray.wait(list(pending.values()), num_returns=1,  # one call per answer, no polling
                                timeout=None if not due else max(0.0, min(due) - time.monotonic()))
            ready = set(ready)
            for h in list(pending):
                if pending[h] in ready:
                    del pending[h]
                    yield h, None
                elif limits[h] is not None and time.monotonic() - start >= limits[h]:
                    del pending[h]  # late, unless it answered as the limit passed (a wait returns one answer)
                    yield h, None if ray.wait([refs[h]], timeout=0)[0] else limits[h]

    def evaluations(self, calls: dict[int, list], rows, began: float) -> tuple[dict[int, list], dict[int, str]]:
        """Wait for each host's evaluation calls (`calls[h]`, which the host runs in order), under its evaluation
        deadline for its `rows[h]` rows, fixed when the wait begins. Returns (each answering host's results, in
        its calls' order; why each other host failed). Records each answer's pace, from `began` to that
        host's own finish, and each missed deadline."""
        import ray
        from ray.exceptions import RayActorError

        limits = {h: self.eval_deadline(h, rows[h]) for h in calls}
        answers: dict[int, list] = {}
        failed: dict[int, str] = {}
        for h, late in self.wait({h: refs[-1] for h, refs in calls.items()}, limits.get):
            if late is not None:
                failed[h] = f"gave no evaluation within {late:.0f} s"
                self.missed_deadline(h)
                continue
            try:
                answers[h] = ray.get(calls[h])
            except RayActorError as err:
                failed[h] = f"died while evaluating ({type(err).__name__})"
                continue
            self.evaluated(time.monotonic() - began, rows[h])
        return answers, failed

    def respawn(self, h: int) -> None:
        """Replace host `h` (dead, or still busy past its deadline) with a fresh one on the same clients."""
        import ray
        from ray.exceptions import GetTimeoutError

        from raycache.federation.host import ClientHost

        ray.kill(self.hosts[h], no_restart=True)
        if self.host_spec is None:
            raise RuntimeError(f"client host {h} failed and this federation cannot restart it")
        options, specs = self.host_spec
        args, kwargs = specs[h]
        self.restarts += 1
        name = f"{options['name']}-{h}-{self.restarts}"
        self.hosts[h] = ray.remote(ClientHost).options(**{**options, "name": name}).remote(*args, **kwargs)
        # Wait until it has started (imports, model build): the next round's deadline must not pay for that.
        # A replacement that cannot be placed (its node is gone, the autoscaler is at its maximum) ends the
        # run in one line rather than waiting for ever.
        try:
            ray.get(self.hosts[h].node.remote(), timeout=RESPAWN_TIMEOUT_S)
        except GetTimeoutError:
            raise RunFailed(f"client host {h} failed and its replacement did not start within "
                            f"{RESPAWN_TIMEOUT_S:.0f} s (no room for it on the cluster?)") from None
