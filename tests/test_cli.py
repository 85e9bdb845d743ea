"""Bad input: exit code 2 and one line naming the key, value or file; never a traceback; no run left RUNNING."""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from raycache.cli import main
from raycache.methods import method_names

QUICK = "experiments/tiny.yaml"


def run_cli(capsys, *args):
    code = main(["run", QUICK, *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("override, expect", [
    ("data.clinets=3", "data.clinets: unknown config key (did you mean data.clients?)"),
    ("data.clients=many", "data.clients: Input should be a valid integer"),
    ("data.alpha=0", "data.alpha: Input should be greater than 0"),
    ("method.shots=0", "method.shots: Input should be greater than or equal to 1"),
    ("federation.fraction=2", "federation.fraction: Input should be less than or equal to 1"),
    ("method.name=nope", "method.name: unknown method 'nope'; choose one of: " + ", ".join(method_names())),
    ("method.training_free=true", "method.training_free: cachefl has no setting 'training_free'"),
    ("data.partition=domain", "data.partition: domain needs a source with domains"),
    ("data.test_domain=sketch", "data.test_domain: 'sketch' is not a domain of digits (domains: none)"),
    ("model.name=ViT-Q-99", "model.name: unknown model 'ViT-Q-99'"),
    ("model.pretrained=/no/such/weights.safetensors", "model.pretrained: weights file /no/such/weights.safetensors"),
    ("model.pretrained=local-dir:/no/such/dir", "model.pretrained: /no/such/dir is not a model folder"),
    ("data.dataset=/no/such/data", "data.dataset: '/no/such/data' not found"),
    ("data.clients=5000", "data.clients: 5000 clients but only"),
    ("method.shots=32", "method.shots=32 needs data.server_per_class >= 32"),
])
def test_bad_input_is_one_line_exit_2(capsys, mlflow_uri, override, expect):
    code, err = run_cli(capsys, "--set", override)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


def test_unknown_lora_target_lists_the_choices_before_any_run(capsys, mlflow_uri):
    client = MlflowClient(mlflow_uri)

    def runs():
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    before = runs()
    capsys.readouterr()  # the store's own set-up log lines are not the CLI's output
    code, err = run_cli(capsys, "--set", "method.name=flora", "--set", "method.lora_targets=[text.attn.out_proj, "
                                                                       "vision.attn.qkv]")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: method.lora_targets: tiny has no module 'vision.attn.qkv'; choose from: ")
    assert "text.attn.out_proj" in err[0] and "vision.attn.q_proj" in err[0] and "vision.mlp.c_fc" in err[0]
    assert runs() == before  # failed before any run was created


def test_class_with_no_images(capsys, mlflow_uri, image_folder):
    (image_folder / "zebra").mkdir()
    code, err = run_cli(capsys, "--set", f"data.dataset={image_folder}")
    assert code == 2 and len(err) == 1 and "class 'zebra'" in err[0]


def test_corrupt_image_fails_the_started_run(capsys, ray_session, mlflow_uri, image_folder, tmp_path):
    bad = image_folder / "owl" / "003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, err = run_cli(capsys, "--set", f"data.dataset={image_folder}", "--set", "method.shots=2",
                        "--set", "data.server_per_class=2", "--set", "data.clients=3",
                        "--set", "tracking.experiment=corrupt", "--set", f"runtime.cache_dir={tmp_path}")
    assert code == 2 and len(err) == 1 and "owl/003.png" in err[-1], err
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("corrupt").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "owl/003.png" in runs[0].data.tags["failure_reason"]


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The console entry point itself: exit 2, one stderr line, for a config error and for hub weights
    that are not on this machine (HF_HUB_OFFLINE=1, set by conftest, makes the miss immediate)."""
    for override, expect in [("data.alpha=-1", "data.alpha"),
                             ("model.name=ViT-B-32", "model.pretrained: weights 'openai' for ViT-B-32")]:
        args = [sys.executable, "-m", "raycache", "run", QUICK, "--set", override]
        if "ViT" in override:
            args += ["--set", "model.pretrained=openai"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert lines[-1].startswith("error: ") and expect in lines[-1], proc.stderr


def test_actors_that_cannot_fit_fail_instead_of_hanging(capsys, ray_session, mlflow_uri, tmp_path):
    code, err = run_cli(capsys, "--set", "runtime.client_actors=3", "--set", "runtime.client_cpus=1",
                        "--set", f"runtime.cache_dir={tmp_path}", "--set", "tracking.experiment=toobig")
    assert code == 2 and len(err) == 1
    assert "runtime.client_cpus: 3 actors x 1 CPU = 3 CPU, but the Ray cluster has 2" in err[0]
    assert not list(tmp_path.rglob("*.safetensors"))  # failed before any encoding
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("toobig").experiment_id])
    assert run.info.status == "FAILED" and "runtime.client_cpus" in run.data.tags["failure_reason"]


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_unreachable_ray_address_is_one_line_exit_2(command, tmp_path):
    import os
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [QUICK, "--set", f"runtime.address=127.0.0.1:{port}"] if command == "run" else \
        ["experiments/sweeps/quick.yaml", "--address", f"127.0.0.1:{port}",
         "--set", f"runtime.cache_dir={tmp_path / 'store'}"]
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raycache", command, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert done.returncode == 2, done.stderr[-1500:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: runtime.address: cannot reach Ray at '127.0.0.1:{port}' (Connection refused)"]
    assert time.perf_counter() - t < 120  # not Ray's minutes of retries
    if command == "run":  # refused before any MLflow run was opened
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("override, expect", [
    (["data.val_fraction=0.85"], "data.val_fraction: 0.85 + data.test_fraction 0.2 leaves nothing to train on"),
    (["federation.target_accuracy=0"], "federation.target_accuracy: Input should be greater than 0"),
    (["federation.target_accuracy=1.2"], "federation.target_accuracy: Input should be less than or equal to 1"),
    (["federation.selection=best"], "federation.selection: Input should be 'best_val' or 'final'"),
    (["data.val_fraction=0"], "federation.selection: best_val selects on the validation split, but "
                              "data.val_fraction is 0"),
    (["data.val_fraction=0", "federation.selection=final", "federation.target_accuracy=0.5"],
     "federation.target_accuracy: is measured on validation accuracy, but data.val_fraction is 0"),
    (["data.client_test_fraction=1"], "data.client_test_fraction: Input should be less than 1"),
    (["method.name=zeroshot", "method.lr_scale=10"], "method.lr_scale: zeroshot has no setting 'lr_scale'"),
    (["data.val_fraction=0.5", "data.server_per_class=60"], "class 'zero' has 178 images in all; needs at least "
                                                             "186 (data.test_fraction 36 + data.val_fraction 89 + "
                                                             "data.server_per_class 60 + 1 for training)"),
])
def test_bad_selection_and_split_keys_are_one_line_exit_2(capsys, mlflow_uri, override, expect):
    code, err = run_cli(capsys, *[a for o in override for a in ("--set", o)])
    assert code == 2 and len(err) == 1 and expect in err[0], err


def test_a_client_too_small_for_its_local_test_set_is_named_before_any_run(capsys, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    before = len(client.search_runs(exps)) if exps else 0
    code, err = run_cli(capsys, "--set", "data.client_test_fraction=0.1", "--set", "data.alpha=0.05",
                        "--set", "data.clients=60", "--set", "tracking.experiment=too-small")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: data.client_test_fraction: client ") and " to test and " in err[0], err
    exps = [e.experiment_id for e in client.search_experiments()]
    assert (len(client.search_runs(exps)) if exps else 0) == before  # no MLflow run was opened


@pytest.mark.slow  # CI runs it (.ci/run)
def test_encoding_progress_shows_in_a_terminal_and_not_in_a_log(capsys, ray_session, mlflow_uri, tmp_path,
                                                                monkeypatch):
    """Encoding reports done / total, rate and ETA on a live bar when stderr is a terminal (rich's
    TTY_COMPATIBLE / TTY_INTERACTIVE stand in for one), and nothing of it when stderr is a file."""
    import re

    args = ["--set", "federation.rounds=1", "--set", "tracking.experiment=progress"]
    assert main(["run", QUICK, *args, "--set", f"runtime.cache_dir={tmp_path / 'log'}"]) == 0
    err = capsys.readouterr().err
    assert "encoding images" not in err and "ETA" not in err
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert main(["run", QUICK, *args, "--set", f"runtime.cache_dir={tmp_path / 'terminal'}"]) == 0
    err = capsys.readouterr().err
    assert "encoding images" in err and re.search(r"\b(\d+)/1797  [\d.]+/s  ETA \d+:\d\d", err), err[-2000:]
