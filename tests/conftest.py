"""Shared fixtures: offline everywhere, one Ray for the session, one MLflow sqlite store, tiny data."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download: fail fast instead of retrying a hub
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# A process that holds torch builds the model's preflight itself (`raycache.models.preflight`): the suite's
# many runs then skip a single-use process each (~8 s here). That process, and a driver without torch, have
# tests of their own (tests/models/test_preflight.py, tests/test_light_driver.py), which run in subprocesses.
import torch  # noqa: E402, F401


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def ray_session():
    """The session's local Ray, started as a run starts one (`ensure_ray`: without the daemons it stops)."""
    import ray

    from raycache.config import RuntimeConfig
    from raycache.ray_session import ensure_ray

    ensure_ray(RuntimeConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def feature_store(tmp_path_factory) -> Path:
    """One `runtime.cache_dir` for the session's runs whose subject is not encoding: the first such run
    encodes its dataset (about 30 s here, mostly the encoder actor's start-up), the rest read the store.
    Resume checkpoints (per run id) and synthetic sets (per fingerprint) in it cannot collide. The tests of
    encoding itself (tests/data/test_features.py, the e2e run's first encode) keep stores of their own."""
    return tmp_path_factory.mktemp("shared-store")


@pytest.fixture(scope="session")
def e2e_store(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e-features")  # the e2e run's own store: its first run must encode


@pytest.fixture(scope="session")
def e2e_run(ray_session, mlflow_uri, e2e_store):
    """The tiny config (2 rounds, 16 shots, 6 clients on 2 actors) in experiment `e2e`: (config, summary, the
    rounds its callback saw, an MLflow client, the actors running while its rounds ran). Shared by the
    end-to-end and the serving tests."""
    from mlflow.tracking import MlflowClient

    from raycache.config_file import load_config
    from raycache.experiment import run_experiment

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "experiments/tiny.yaml"), [
        "federation.rounds=2", "method.shots=16", "data.clients=6", "runtime.client_actors=2",
        "tracking.experiment=e2e", f"runtime.cache_dir={e2e_store}"])
    rounds, actors = [], set()

    def on_round(r, _metrics):
        rounds.append(r)
        actors.update(ray_actors())  # what runs beside the federation (encoding is over)

    summary = run_experiment(cfg, on_round=on_round)
    return cfg, summary, rounds, MlflowClient(mlflow_uri), actors


# The process names Ray gives the helper actors a Ray Data pipeline leaves running (stats, autoscaling, locations)
DATA_HELPER_PROCESSES = ("_StatsActor", "AutoscalingCoordinator", "ActorLocationTracker")


def ray_actors() -> set[str]:
    """The names of the Ray workers running under this process's local Ray (`ray::Class` for an actor, or the
    task it runs), but for Ray's own agents, idle workers and processes that have exited."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            name = p.name()
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        if name.startswith("ray::") and name != "ray::IDLE" and not name.endswith("Agent"):
            out.add(name)
    return out


def write_test_split(cfg, folder: Path) -> dict[str, int]:
    """The run's test images as files in `folder` (created), each path with its label."""
    from raycache.experiment import prepare

    prep = prepare(cfg)
    rows = prep.source.to_ray().take_all()
    folder.mkdir(parents=True)
    labels = {}
    for i in prep.splits.test:
        path = folder / f"{i:05d}.png"
        path.write_bytes(rows[i]["image"])
        labels[str(path)] = int(prep.source.labels[i])
    return labels


def write_png(path: Path, rng: np.random.Generator, size: int = 12, value: int | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) if value is None else \
        np.full((size, size, 3), value, np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 24 tiny PNGs; each class has its own brightness so features separate them."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "dog", "owl"]):
        for i in range(24):
            from PIL import Image

            base = 40 + 80 * c
            arr = np.clip(base + rng.integers(-20, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


def kill_pool_actors(marker: str) -> list[int]:
    """SIGKILL the Ray worker processes of the actors whose class is `marker` (Ray titles an actor's process
    `ray::<class>...`, or `ray::MapWorker(MapBatches(<class>))` in a Ray Data actor pool): what a lost node
    does to them. Returns the pids killed."""
    import psutil

    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("ray::") and marker in title:
            try:
                proc.kill()
                killed.append(proc.info["pid"])
            except psutil.NoSuchProcess:
                pass
    return killed
