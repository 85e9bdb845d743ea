"""The benchmark scripts keep working, and the floor they compare against does the runtime's arithmetic."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raycache.config_file import load_config
from raycache.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["round_cost", "memory", "sweep_overhead", "synth_throughput", "encode_throughput",
                                  "encode_gpu", "pixels_memory"])
def test_benchmark_scripts_import(name):
    assert callable(load(name).main)


def test_the_floor_is_the_runtimes_arithmetic(feature_store, ray_session, mlflow_uri):
    """Same config and seed: the plain loop's per-round accuracy equals the federated run's, exactly."""
    cfg = load_config(str(ROOT / "experiments/tiny.yaml"), [
        "federation.rounds=2", "data.clients=6", f"runtime.cache_dir={feature_store}",
        "tracking.experiment=bench-test"])
    summary = run_experiment(cfg)
    _, floor_accuracy = load("round_cost").floor_rounds(cfg, 2)
    assert floor_accuracy == [m["accuracy"] for m in summary.history]


def test_memory_sampler_sees_this_process_and_its_children(capsys):
    sampler = load("memory").PeakSampler(interval=0.05, report_every=0.3)
    with sampler:
        sampler.stage = "the child"
        child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(1)"])
        child.wait()
        sampler.stage = "after"
    assert sampler.peak_processes >= 2
    assert sampler.peak_pss >= sampler.peak_driver_pss + 150 * 2**20  # the child's 200 MB counted
    # what made up the peak: the processes of that one sample, adding up to it, while the child ran
    assert sampler.peak_stage == "the child"
    assert sum(sampler.at_peak.values()) == sampler.peak_pss
    assert max(v for k, v in sampler.at_peak.items() if k != "driver") >= 150 * 2**20
    # each stage's own peak: the child's 200 MB only in the stage it ran in
    assert sampler.stage_peaks["the child"] == sampler.peak_pss
    assert sampler.stage_peaks["after"] <= sampler.peak_pss - 150 * 2**20
    reports = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[mem ")]
    assert reports and "peak PSS" in reports[-1] and "driver" in reports[-1]  # a long run's figures as it goes


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("encode_gpu.py", ["--device", "cpu", "--model", "tiny", "--images", "48", "--actors", "1", "--cpus", "2"]),
    ("encode_throughput.py", ["--model", "tiny", "--datasets", "folder", "--folder-images", "48", "--cpus", "2"]),
])
def test_encode_benchmarks_run_their_own_check(script, args):
    """Each script runs end to end on the CPU (importing is not enough: a call into the runtime whose signature
    moved only fails here), and its pipeline's features equal the plain loop's (the script asserts it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout[done.stdout.index("ratio"):]
    assert len([line for line in table.splitlines()[1:] if line.count("|") >= 5]) >= 1, done.stdout
