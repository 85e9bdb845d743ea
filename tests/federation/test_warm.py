"""Warm actors: a federation started with `warm=True` hands its server and hosts to the process's pool when
it ends, and the next one (a sweep's next trial in the same process) re-initialises them instead of starting
new processes. What a run computes must not depend on whether its actors were warm."""

from __future__ import annotations

import pytest

from raycache.config_file import load_config
from raycache.experiment import run_experiment
from raycache.federation.runtime import WARM

BASE = ["data.clients=6", "runtime.client_actors=2", "federation.rounds=2", "tracking.experiment=warm",
        "federation.checkpoint=false"]
TIMING = ("seconds", "time", "memory", "_s")


def _learned(summary) -> list[dict]:
    """What a run computed, round by round: every metric but timings and memory."""
    return [{k: v for k, v in h.items() if not any(t in k for t in TIMING)} for h in summary.history]


@pytest.fixture
def pool(ray_session):
    yield WARM
    WARM.clear()  # whatever the test asserted: idle actors must not hold the session's CPUs for later tests


@pytest.mark.slow  # four runs (about a minute): CI runs it after the default suite
def test_a_warm_federation_reuses_its_actors_and_computes_what_a_cold_one_does(pool, mlflow_uri):
    first = load_config("experiments/tiny.yaml", [*BASE, "data.alpha=0.5", "method.lr_scale=3"])
    second = load_config("experiments/tiny.yaml", [*BASE, "data.alpha=0.1", "seed=1"])
    cold = run_experiment(second)
    assert WARM.size() == 0  # a run that is not warm kills its actors

    run_experiment(first, warm=True)
    assert WARM.size() == 3  # the server and two hosts wait for the next federation
    warm = run_experiment(second, warm=True)
    assert WARM.size() == 3
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_uri).get_run(warm.run_id).data.metrics["actors_reused"] == 3
    assert _learned(warm) == _learned(cold)  # other partition, seed and lr: re-initialised, not carried over
    assert warm.final["accuracy"] == cold.final["accuracy"]

    class Boom(Exception):
        pass

    def fail(round_idx, metrics):
        raise Boom("a failed run's actors are not reused")

    with pytest.raises(Boom):
        run_experiment(second, warm=True, on_round=fail)
    assert WARM.size() == 0  # taken, then killed with the failed run
