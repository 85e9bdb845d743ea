"""On a CUDA device (opt in with `-m gpu`; CI has no GPU, so these run where a developer has one).

Every registered method runs the tiny config with its client hosts on fractions of one GPU, and the result
is the CPU run's: the same per-round validation and test accuracy (to a few images: the GPU's float
arithmetic is not the CPU's) and the same accuracy after the validation search. The features come from one
shared store, so only the hosts differ. This covers what only a GPU host does: the method and its text
weights on the device, the initial state, every evaluation split and the search that the server (which
holds no torch) asks the hosts for, the states crossing back as numpy, and the pixel methods training the
encoder on the device. The encoder pool on fractional GPUs is checked against the CPU encoder through the
zero-shot accuracy its features give.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raycache.config import settings_for
from raycache.config_file import load_config
from raycache.experiment import run_experiment
from raycache.methods import method_names

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = str(Path(__file__).resolve().parents[1] / "experiments/tiny.yaml")
ACC_TOL = 0.03  # about 10 of the 359 test digits


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-features")


def _run(method: str, store, mlflow_uri, *overrides: str):
    from mlflow.tracking import MlflowClient

    # a cache of real held-out images: the synthetic one is the generator's path (diffusers), not the hosts'
    synthetic = getattr(settings_for(method), "cache_init", None) == "synthetic"
    real = [f"per_method.{method}.cache_init=real"] if synthetic else []
    cfg = load_config(TINY, [f"method.name={method}", "federation.rounds=2", "data.clients=6",
                             "tracking.experiment=gpu", f"runtime.cache_dir={store}", *real, *overrides])
    summary = run_experiment(cfg)
    return summary, MlflowClient(mlflow_uri).get_run(summary.run_id).data.metrics


def _accuracies(summary) -> list[tuple[float, float]]:
    rounds = [summary.initial] + summary.history
    return [(m["val_accuracy"], m["accuracy"]) for m in rounds]


@pytest.mark.parametrize("method", method_names())
def test_hosts_on_a_gpu_give_the_cpu_result(gpu_ray, mlflow_uri, store, method):
    cpu, _ = _run(method, store, mlflow_uri, "runtime.client_actors=2")
    gpu, metrics = _run(method, store, mlflow_uri, "runtime.client_actors=2", "runtime.client_gpus=0.25")
    assert metrics["client_gpu_devices"] == 1  # both hosts on a quarter of the one GPU
    assert gpu.rounds == cpu.rounds == 2
    for (cv, ct), (gv, gt) in zip(_accuracies(cpu), _accuracies(gpu)):
        assert gv == pytest.approx(cv, abs=ACC_TOL) and gt == pytest.approx(ct, abs=ACC_TOL), (method, cpu, gpu)
    for key in ("result_accuracy", "selected_accuracy"):  # the searched result (Tip-Adapter's alpha, beta)
        if key in cpu.selection:
            assert gpu.selection[key] == pytest.approx(cpu.selection[key], abs=ACC_TOL), (method, key)


def test_four_hosts_share_one_gpu(gpu_ray, mlflow_uri, store):
    cpu, _ = _run("cachefl", store, mlflow_uri, "runtime.client_actors=2")
    gpu, metrics = _run("cachefl", store, mlflow_uri, "runtime.client_actors=4", "runtime.client_gpus=0.25")
    assert metrics["client_gpu_devices"] == 1
    assert gpu.selection["result_accuracy"] == pytest.approx(cpu.selection["result_accuracy"], abs=ACC_TOL)


def test_encoder_pool_on_fractional_gpus(gpu_ray, mlflow_uri, store, tmp_path):
    cpu, _ = _run("zeroshot", store, mlflow_uri)
    gpu, _ = _run("zeroshot", tmp_path, mlflow_uri, "runtime.encoder_actors=2", "runtime.encoder_gpus=0.25",
                  "runtime.encoder_cpus=1")
    assert gpu.encoded == cpu.distinct_images == 1797  # encoded afresh into its own store, on the GPU
    assert gpu.zeroshot_accuracy == pytest.approx(cpu.zeroshot_accuracy, abs=ACC_TOL)
