"""Server strategies, FedProx and client-level DP in real runs (Ray actors, MLflow): what each client sends,
the privacy spent per round, and the checks that keep a strategy to the methods it fits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from raycache.config_file import load_config
from raycache.errors import UserError
from raycache.experiment import prepare, run_experiment

BASE = ["data.clients=4", "runtime.client_actors=1", "federation.rounds=3", "tracking.experiment=strategies",
        "federation.checkpoint=false"]


def test_adaptive_server_with_dp_and_fedprox(ray_session, mlflow_uri, feature_store):
    from mlflow.tracking import MlflowClient

    from raycache.federation.privacy import epsilon

    cfg = load_config("experiments/tiny.yaml", [
        *BASE, f"runtime.cache_dir={feature_store}", "federation.strategy=fedadam", "federation.server_lr=0.001", "federation.prox_mu=0.1",
        "federation.fraction=0.5", "federation.dp={clip_norm: 0.05, noise_multiplier: 0.8, delta: 1.0e-5}"])
    summary = run_experiment(cfg, audit=True)
    eps = [h["dp_epsilon"] for h in summary.history]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert eps[-1] == pytest.approx(epsilon(0.8, 0.5, 3, 1e-5))  # 2 of 4 clients a round: q = 0.5
    params = MlflowClient(mlflow_uri).get_run(summary.run_id).data.params
    assert params["federation.weighting"] == "uniform"  # DP's noise is calibrated to a uniform average
    assert params["federation.strategy"] == "fedadam" and params["federation.dp.clip_norm"] == "0.05"
    assert {m["weight"] for m in summary.messages} == {1.0} and len(summary.messages) == 3 * 2
    assert all(np.isfinite(h["accuracy"]) for h in summary.history)


def test_classwise_clients_send_their_class_counts(ray_session, mlflow_uri, feature_store):
    cfg = load_config("experiments/tiny.yaml", [*BASE, f"runtime.cache_dir={feature_store}", "federation.rounds=1", "federation.strategy=classwise",
                                                      "data.alpha=0.1"])
    prep = prepare(cfg)
    summary = run_experiment(cfg, audit=True)
    train_labels = prep.source.labels[prep.splits.train]
    for msg in summary.messages:  # the one extra field classwise needs, declared and exactly the counts
        assert msg["fields"] == ["client", "samples", "loss", "seconds", "weight", "class_counts", "update"]
        want = np.bincount(train_labels[prep.parts[msg["client"]]], minlength=10)
        assert msg["class_counts"] == want.tolist()


@pytest.mark.parametrize("overrides, message", [
    (["method.name=fedclip", "federation.strategy=classwise"], "federation.strategy: classwise averages per-class "
                                                                 "rows of a cache; fedclip's state has none"),
    (["method.name=local_only", "federation.strategy=fedadam"], "federation.strategy: fedadam acts on the server's "
                                                                  "average of client updates, and local_only "
                                                                  "aggregates none (its flow is personal)"),
    (["method.name=tip_adapter", "federation.dp={clip_norm: 1, noise_multiplier: 1}"], "federation.dp acts on"),
])
def test_a_strategy_the_method_cannot_use_is_refused_before_any_run(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prepare(load_config(None, ["model.name=tiny", *overrides]))


@pytest.mark.parametrize("overrides, message", [
    (["federation.strategy=classwise", "federation.dp={clip_norm: 1, noise_multiplier: 1}"], "strategy classwise"),
    (["federation.weighting=samples", "federation.dp={clip_norm: 1, noise_multiplier: 1}"], "weighting to uniform"),
    (["federation.dp={clip_norm: 0, noise_multiplier: 1}"], "federation.dp.clip_norm"),
])
def test_dp_settings_that_would_break_the_guarantee_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)
