"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema) with the shape the README promises."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def validated(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(cfg))  # fills Ray's AWS defaults; no network
    validate_config(full)  # ray-schema.json, plus Ray's own cross-field checks
    return full


def test_cluster_yaml_validates_against_rays_schema():
    full = validated(yaml.safe_load(CLUSTER.read_text()))
    assert full["provider"]["type"] == "aws"
    types = full["available_node_types"]
    assert full["head_node_type"] in types
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= full["max_workers"]  # autoscales from zero
    assert any("-c ~/raycache/constraints.txt -e ~/raycache" in c for c in full["setup_commands"])
    mlflow = [c for c in full["head_start_ray_commands"] if "mlflow server" in c]
    assert mlflow and "hostname -I" in mlflow[0] and "0.0.0.0" not in mlflow[0]  # the private address only
    starts = [c for c in full["head_start_ray_commands"] + full["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("export MLFLOW_TRACKING_URI=" in c for c in starts)  # inherited by jobs
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in full["worker_start_ray_commands"])


def test_the_schema_check_catches_a_bad_key():
    import jsonschema

    bad = yaml.safe_load(CLUSTER.read_text())
    bad["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validated(bad)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes(tmp_path_factory):
    """A real two-node Ray cluster on this machine: a head and a worker, each with 2 CPUs and its own
    temp dir. Everything it starts is stopped at the end (only its own processes, found by temp dir)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path_factory.mktemp("cluster", numbered=True)
    head_dir, worker_dir = root / "h", root / "w"
    port = _free_port()
    # Teardown finds exactly this cluster's processes (Ray renames them, so their command lines do not
    # name the temp dir), never the test session's own Ray: `ray stop` would stop that one too.
    marker = f"RAYCACHE_TEST_CLUSTER={root}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAYCACHE_TEST_CLUSTER": str(root)}
    ray_bin = str(Path(sys.executable).with_name("ray"))

    def ours() -> list[int]:
        """Processes with the marker in their environment, or a file open under the cluster's temp dirs
        (Ray's agents get a fresh environment, but they log there)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker.encode() in (proc / "environ").read_bytes().split(b"\0") or any(
                        os.readlink(fd).startswith(str(root)) for fd in (proc / "fd").iterdir()):
                    pids.append(int(proc.name))
            except OSError:
                pass
        return pids

    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                        f"--temp-dir={head_dir}", "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", "--num-gpus=0",
                        f"--temp-dir={worker_dir}", "--resources={\"worker_node\": 1}", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in ours():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        assert not ours(), "processes of the test cluster survived"


@pytest.mark.slow
def test_an_experiment_spreads_its_client_actors_over_two_nodes(two_nodes, tmp_path, mlflow_uri):
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    # 2 client actors of 2 CPUs each on two 2-CPU nodes: one lands on each node
    cmd = [sys.executable, "-m", "raycache", "run", str(Path(__file__).resolve().parents[1] / "experiments/quickstart.yaml"),
           "--set", f"runtime.address={two_nodes}", "--set", "runtime.client_actors=2", "--set", "runtime.client_cpus=2",
           "--set", "runtime.encoder_cpus=1", "--set", "federation.rounds=1", "--set", "data.clients=4",
           "--set", "tracking.experiment=two-nodes", "--set", f"runtime.cache_dir={tmp_path / 'store'}"]
    done = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("two-nodes")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["client_nodes"] == 2  # the hosts ran on both nodes
    assert run.data.params["runtime.address"] == two_nodes
