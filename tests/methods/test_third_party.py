"""A method from outside this repository: a package registers it under the `raycache.methods` entry-point
group and the platform runs it like a built-in one. Nothing is installed here: a distribution's metadata
(a `*.dist-info` folder with its entry_points.txt) is put on sys.path, naming the toy method defined below,
which then goes through the same contract test as every built-in method."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raycache.methods.base import Method, State
from raycache.methods.settings import TrainSettings, reference

ToyBiasSettings = reference(TrainSettings, "ToyBiasSettings", "A per-class bias on zero-shot logits.", lr=0.05)


class ToyBias(Method):
    """Zero-shot logits plus a learned per-class bias: the smallest trainable method."""

    name = "toy_bias"
    Settings = ToyBiasSettings

    def init_state(self, server_features, server_labels) -> State:
        return {"bias": np.zeros(self.task.n_classes, np.float32)}

    def _logits(self, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.normalize(features, dim=-1) @ self.text_weights.T + bias

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        return self._logits(torch.as_tensor(state["bias"], device=self.device), features)

    def trainables(self, state: State) -> dict[str, torch.Tensor]:
        return {"bias": torch.tensor(state["bias"], device=self.device, requires_grad=True)}

    def batch_loss(self, params, features, labels) -> torch.Tensor:
        return F.cross_entropy(self._logits(params["bias"], features), labels)


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """The toy method's distribution metadata on sys.path, as `pip install` would leave it."""
    from ray import cloudpickle  # the copy Ray pickles tasks and actors with

    dist = tmp_path / "raycache_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: raycache-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[raycache.methods]\ntoy_bias = {__name__}:ToyBias\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Ray's workers cannot import this test module: its classes travel by value, as an installed package's
    # would travel by reference.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_an_entry_point_method_is_registered_configured_and_checked(toy_installed):
    from raycache.config_file import load_config
    from raycache.errors import UserError
    from raycache.methods import BUILTIN, method_class, method_names

    assert "toy_bias" in method_names() and "toy_bias" not in BUILTIN
    assert method_class("toy_bias") is ToyBias
    cfg = load_config(None, ["method.name=toy_bias", "method.lr=0.2"])
    assert isinstance(cfg.method, ToyBiasSettings) and cfg.method.lr == 0.2
    with pytest.raises(UserError, match="method.shots: toy_bias has no setting 'shots'"):
        load_config(None, ["method.name=toy_bias", "method.shots=4"])


def test_an_entry_point_method_keeps_the_contract(toy_installed, ray_session):
    from test_contract import check_contract

    check_contract("toy_bias")


def test_without_the_package_the_method_is_unknown():
    from raycache.config_file import load_config
    from raycache.errors import UserError

    with pytest.raises(UserError, match="method.name: unknown method 'toy_bias'"):
        load_config(None, ["method.name=toy_bias"])
