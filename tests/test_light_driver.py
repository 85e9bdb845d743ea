"""A CacheFL run's driver and server never import torch: the model's preflight runs in a single-use process,
the zero-shot accuracy is numpy, and the server asks the hosts for what needs the method's tensors (its
initial state, evaluations, the post-training search). Each process that imports torch holds about 0.3 GB."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import json, os, sys
    store = sys.argv[1]
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    import ray
    from raycache.config_file import load_config
    from raycache.experiment import run_experiment

    server_torch = []

    def on_round(r, metrics):  # while the federation lives: has its server imported torch?
        names = [n for n in ray.util.list_named_actors() if n.startswith("raycache-server-")]
        server_torch.extend(ray.get(ray.get_actor(n).__ray_call__.remote(lambda self: "torch" in sys.modules))
                            for n in names)

    s = run_experiment(load_config("experiments/tiny.yaml", [
        "federation.rounds=2", "method.search=true", f"runtime.cache_dir={store}",
        "data.client_test_fraction=0.2", "tracking.experiment=light-driver"]), on_round=on_round)
    from mlflow.tracking import MlflowClient

    logged = MlflowClient().get_run(s.run_id).data.metrics
    print(json.dumps({"driver_torch": sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules),
                      "server_torch": server_torch, "accuracy": logged["result_accuracy"],
                      "zeroshot": s.zeroshot_accuracy, "searched": "searched_alpha" in logged}))
""")


@pytest.mark.slow
def test_a_cachefl_runs_driver_imports_no_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["driver_torch"] == []
    assert out["server_torch"] == [False, False]  # asked at both rounds, the client tests evaluated too
    assert out["searched"]  # Tip-Adapter's search ran (on a host) and the run learned past zero-shot
    assert out["accuracy"] > out["zeroshot"]
