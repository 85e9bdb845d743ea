"""The runtime never branches on which method it runs: no role switch, no test of a method's or a flow's
name outside the methods package. (A method's behaviour comes from what it declares: its flow, settings,
weighting, cache and pixel needs.)"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "raycache"
BRANCH = re.compile(r"(method\.name|method_name|flow\.name|\.role)\s*(==|!=|\bnot in\b|\bin\b)|\.role\b")


def test_no_branch_on_a_methods_kind_or_name_outside_the_methods_package():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.is_relative_to(ROOT / "methods"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if BRANCH.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_pattern_catches_a_role_switch():
    assert BRANCH.search('if self.method.role == "local":')
    assert BRANCH.search('label = {"federated": "x"}[method.role]')
    assert BRANCH.search('if cfg.method.name in ("flora", "fedavg_full"):')
    assert not BRANCH.search("self.flow.merge(self, reports, reporting, round_idx)")


MLFLOW_IMPORT = re.compile(r"^\s*(from mlflow\b|import mlflow\b)")


def test_mlflow_is_called_from_tracking_only():
    """The tracking store is one module's business: the rest of raycache reads `RunRecord`s and calls `Run`."""
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted(ROOT.rglob("*.py")) if path.name != "tracking.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if MLFLOW_IMPORT.search(line)]
    assert offenders == []
    assert MLFLOW_IMPORT.search("    from mlflow.tracking import MlflowClient")


def test_the_driver_and_the_server_import_no_torch():
    """Every built-in method (its declarations and class), the run's pipeline, the server and the hosts' actor
    classes import without torch: a run's driver and its server never import it (0.3 GB a process), only the
    processes that compute with the model do."""
    import subprocess
    import sys

    from raycache.methods import BUILTIN

    code = ("import sys; from raycache.methods import method_class, method_names; "
            "[method_class(m).Settings for m in method_names()]; "
            "import raycache.experiment, raycache.federation.server, raycache.federation.host, "
            "raycache.federation.runtime, raycache.sweep.runner, raycache.cli; "
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert len(BUILTIN) >= 10  # every built-in method was imported above
