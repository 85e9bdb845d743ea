"""A local Ray that a run starts: what it runs, and what it leaves out."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import DATA_HELPER_PROCESSES

PROBE = """
import json, psutil, ray
from raycache.config import RuntimeConfig
from raycache.ray_session import ensure_ray
assert ensure_ray(RuntimeConfig(num_cpus=1))
answer = ray.get(ray.remote(lambda: 6 * 7).remote())  # a worker under the raylet, as a run's actors are
cmds = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
print(json.dumps({"answer": answer, "cmds": cmds}))
"""


def test_a_local_ray_runs_without_the_daemons_nothing_uses():
    """The autoscaler monitor and the log monitor are gone (about 110 MB: nothing to scale on one machine, no
    driver that reads the workers' output); the node's own processes still run work."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["answer"] == 42
    cmds = seen["cmds"]
    for needed in ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent/main.py"):
        assert any(needed in c for c in cmds), (needed, cmds)
    for stopped in ("log_monitor.py", "autoscaler/_private/monitor.py"):
        assert not any(stopped in c for c in cmds), (stopped, cmds)


PIPELINE = """
import json, sys, time, psutil, ray, ray.data
HELPERS = {helpers!r}
from raycache.config import RuntimeConfig
from raycache.ray_session import ensure_ray, release_data_actors

if sys.argv[1] == "joined":  # a Ray that someone else started: raycache only joins it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
assert ensure_ray(RuntimeConfig(num_cpus=2)) == (sys.argv[1] == "started")

class Double:
    def __call__(self, batch):
        return {"id": batch["id"] * 2}

def pipeline():  # an actor-pool stage, as encoding runs its model
    ds = ray.data.range(200).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy")
    return sum(int(r["id"]) for r in ds.take_all())

def actors():  # Ray Data's helpers as they run: {process name: PSS MB}
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(k in p.name() for k in HELPERS):
                out[p.name()] = p.memory_full_info().pss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out

seen = {"first": pipeline()}
time.sleep(1)
seen["after_pipeline"] = actors()
release_data_actors()
deadline = time.monotonic() + 20  # a killed actor's process takes a moment to exit
while time.monotonic() < deadline and actors() and sys.argv[1] == "started":
    time.sleep(0.5)
seen["after_release"] = actors()
seen["second"] = pipeline()
print(json.dumps(seen))
"""


def _pipeline_probe(mode: str) -> dict:
    code = PIPELINE.replace("{helpers!r}", repr(DATA_HELPER_PROCESSES))
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ray_datas_helper_actors_are_released_after_the_last_pipeline_of_a_local_ray():
    """A Ray Data pipeline leaves its detached helpers running (stats, autoscaling coordinator, actor
    locations: hundreds of MB for the rest of a run). On the local Ray a run started, they go once encoding is
    done, and a later pipeline still runs (it starts them again)."""
    seen = _pipeline_probe("started")
    assert seen["first"] == seen["second"] == 2 * sum(range(200))
    left = seen["after_pipeline"]
    assert len(left) == 3 and sum(left.values()) > 150, left  # what a run would otherwise hold to its end
    assert not seen["after_release"], seen


def test_ray_datas_helper_actors_stay_on_a_ray_that_the_run_only_joined():
    """On a Ray that someone else started (a cluster, a notebook's), other drivers may be using them."""
    seen = _pipeline_probe("joined")
    assert seen["first"] == seen["second"]
    assert len(seen["after_pipeline"]) == 3 and seen["after_pipeline"].keys() == seen["after_release"].keys(), seen
