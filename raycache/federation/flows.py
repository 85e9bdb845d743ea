"""What a round does with states, as objects a method declares (`Method.flow`); the server and the client
hosts call these hooks and never ask which method, or which kind of method, they run.

- `Federated`: the server broadcasts the global state; each sampled client trains from it and sends its update
  (with its weight) up; the hosts fold the updates, the server merges the folds and its strategy makes the
  next global state (FedAvg, FedAdam, ...). Client-level DP clips each update on its client and adds noise
  to the average on the server.
- `Personal`: each client keeps and trains its own state (the initial state reaches it once); nothing is
  uploaded or merged; every client is evaluated under its own state.
- `Pooled`: one trainer holds the union of the clients' training data (an upper bound, not federated
  learning); its state is the model; nothing travels.

Host hooks: `start` (the state a client trains from), `keep` (what happens to its update). Server hooks:
`merge` (the next global state and the bytes that moved), `evaluate`, `client_states`, `restore`. Data hook:
`trainer_rows` (whose rows each trainer gets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raycache.federation.aggregate import WeightedSum

if TYPE_CHECKING:
    from raycache.federation.host import ClientHost, ClientMessage
    from raycache.federation.server import Server

State = dict[str, np.ndarray]


def nbytes(state: State) -> int:
    return int(sum(np.asarray(a).nbytes for a in state.values()))


class Flow:
    name: str = ""
    aggregates = False  # client updates are merged into a global state (server strategies and DP apply)
    pooled = False  # one trainer on the pooled training data
    keeps_client_state = False  # a client's own state stays on its host across rounds (it trains there)
    result_label = "final federated accuracy"

    def trainer_rows(self, parts: list[np.ndarray], labels: np.ndarray, n_classes: int, settings,
                     seed: int) -> list[np.ndarray]:
        """Each trainer's rows of the training pool: by default, one trainer per client on its own rows."""
        return parts

    # -- on a client host --
    def start(self, host: "ClientHost", cid: int, broadcast: State) -> State:
        return broadcast

    def keep(self, host: "ClientHost", cid: int, broadcast: State, update: State, msg: "ClientMessage",
             partial: WeightedSum) -> None:
        raise NotImplementedError

    # -- on the server --
    def merge(self, server: "Server", reports: list, reporting: np.ndarray, round_idx: int) -> tuple[float, float]:
        """Make the server's next state from the hosts' reports; returns (bytes down, bytes up)."""
        raise NotImplementedError

    def evaluate(self, server: "Server", state: State) -> dict[str, float]:
        return server.evaluate_global(state)

    def client_states(self, server: "Server") -> dict[int, State]:
        return {}

    per_client = False  # the result is a state per client (a prediction names the client whose state it uses)

    def result_state(self, snapshot: dict, client: int | None) -> State:
        """The state a prediction uses from a result snapshot: the global one (`client` is not needed)."""
        return snapshot["state"]

    def restore(self, server: "Server", snap: dict) -> None:
        pass


class Federated(Flow):
    name = "federated"
    aggregates = True

    def keep(self, host, cid, broadcast, update, msg, partial) -> None:
        rules = host.rules
        if rules.clip_norm is not None:  # client-level DP: the update is clipped before it leaves
            from raycache.federation.privacy import clip_update

            update = clip_update(update, broadcast, rules.clip_norm)
        rows = None
        if rules.per_class:  # class-aware aggregation: the client's class counts weigh each class's rows
            counts = np.bincount(host.labels[host.rows[cid]], minlength=host.method.task.n_classes)
            msg.class_counts = counts.astype(np.int64)
            rows = {k: counts[classes].astype(np.float64) for k, classes in host.class_rows.items()}
        msg.weight = float(msg.samples) if rules.weighting == "samples" else 1.0
        host.upload(partial, msg, update, rows)

    def merge(self, server, reports, reporting, round_idx) -> tuple[float, float]:
        total = WeightedSum()
        for rep in reports:
            total.merge(rep.partial)
        mean = total.mean(fallback=server.state)  # rows no client weighed keep the global rows
        dp = server.federation.dp
        if dp is not None:
            from raycache.federation.privacy import add_noise, noise_std

            clients = sum(len(r.messages) for r in reports)
            rng = np.random.default_rng([server.seed, round_idx, 0xD9])
            mean = add_noise(mean, noise_std(dp.noise_multiplier, dp.clip_norm, clients), rng)
        bytes_down = len(reporting) * nbytes(server.state)
        server.state, server.strategy_memory = server.strategy.step(server.state, mean, server.strategy_memory,
                                                                    server.federation)
        return float(bytes_down), float(sum(r.bytes_up for r in reports))


class Personal(Flow):
    name = "personal"
    keeps_client_state = True
    result_label = "final mean test accuracy over clients"

    def start(self, host, cid, broadcast) -> State:
        return host.states.get(cid, broadcast)

    def keep(self, host, cid, broadcast, update, msg, partial) -> None:
        host.states[cid] = update  # kept on the client; nothing leaves it
        host.upload(None, msg, None, None)

    def merge(self, server, reports, reporting, round_idx) -> tuple[float, float]:
        fresh = reporting[~server.reached[reporting]]  # the initial state reaches each client once
        server.reached[fresh] = True
        return float(len(fresh) * nbytes(server.state)), 0.0

    def evaluate(self, server, state) -> dict[str, float]:
        """Every client under its own state: accuracies are means over clients. Each host evaluates its home
        clients under the server's evaluation deadlines (`Server.ask_hosts`)."""
        from raycache.federation.evaluate import client_accuracy, per_class_accuracy, summarise
        from raycache.federation.sampling import home_host

        n_classes = server.task.n_classes
        n_clients = len(server.class_counts)
        ev = server.evals
        test_y = ev.test[1]
        # what each host predicts (its deadline scales with it): every home client on the global splits, and
        # the clients' own held-out rows
        home = home_host(np.arange(n_clients), len(server.hosts))
        per_client = len(test_y) + (0 if ev.val is None else len(ev.val[1]))
        owner = np.zeros(0, np.int64) if ev.client is None else ev.client[2]
        rows = [per_client * int((home == h).sum()) + int((home[owner] == h).sum()) for h in range(len(server.hosts))]
        preds: dict[str, dict[int, np.ndarray]] = {"test": {}, "val": {}, "local": {}}
        for part in server.ask_hosts("evaluate", (state,), rows):
            for name, by_client in part.items():
                preds[name].update(by_client)
        clients = range(n_clients)
        per_class = np.stack([per_class_accuracy(preds["test"][c], test_y, n_classes) for c in clients])
        test_acc = np.mean([(preds["test"][c] == test_y).mean() for c in clients])
        val_acc = local_acc = None
        if ev.val is not None:
            val_acc = np.mean([(preds["val"][c] == ev.val[1]).mean() for c in clients])
        if ev.client is not None:
            local_acc = np.array([(preds["local"][c] == ev.client_rows(c)[1]).mean() for c in clients])
        return summarise(test_acc, val_acc, client_accuracy(server.class_counts, per_class), local_acc)

    def client_states(self, server) -> dict[int, State]:
        import ray

        clients: dict[int, State] = {}
        for part in ray.get([h.get_states.remote() for h in server.hosts]):
            clients.update(part)
        return clients

    def restore(self, server, snap) -> None:
        import ray

        ray.get([h.set_states.remote(snap["clients"]) for h in server.hosts])

    per_client = True

    def result_state(self, snapshot, client) -> State:
        """Client `client`'s own state (the initial state, if it never trained)."""
        return snapshot["clients"].get(client, snapshot["state"])


class Pooled(Flow):
    name = "pooled"
    pooled = True
    result_label = "final centralised accuracy"

    def trainer_rows(self, parts, labels, n_classes, settings, seed) -> list[np.ndarray]:
        """One trainer on the union of the clients' rows; with `cache_init: shots`, on K (seeded) shots per
        class of that union: the rows its keys come from, and all it trains on."""
        pooled = np.sort(np.concatenate(parts))
        if getattr(settings, "cache_init", None) != "shots":
            return [pooled]
        from raycache.data.split import few_shot_rows
        from raycache.errors import UserError

        try:
            return [pooled[few_shot_rows(labels[pooled], n_classes, settings.shots, seed)]]
        except ValueError as err:
            raise UserError(f"method.shots: {err} (K shots per class from the clients' training data)") from None

    def keep(self, host, cid, broadcast, update, msg, partial) -> None:
        partial.add(update, 1.0)  # the one pooled trainer: not a client, no message

    def merge(self, server, reports, reporting, round_idx) -> tuple[float, float]:
        server.state = reports[0].partial.mean()  # the one trainer's state is the model; nothing travelled
        return 0.0, 0.0


FEDERATED, PERSONAL, POOLED = Federated(), Personal(), Pooled()
