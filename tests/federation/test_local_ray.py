"""A local Ray that a run starts: what it runs, and what it leaves out."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, psutil, ray
from raycache.config import RuntimeConfig
from raycache.federation.runtime import ensure_ray
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
