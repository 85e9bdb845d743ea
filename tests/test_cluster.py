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
