"""`raycache synth` with the offline tiny pipeline: balance, determinism, resume, MLflow, bad input."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from raycache.cli import main
from raycache.config import SynthConfig
from raycache.errors import UserError
from raycache.synth.generate import ensure_set, fill, prepare
from raycache.storage import host_name
from raycache.synth.store import COMPLETE, PLAN

CLASSES = ["cat", "dog", "owl"]
K = 3


def synth_cfg(out, **kw) -> SynthConfig:
    return SynthConfig(generator="tiny", classes=CLASSES, per_class=K, steps=2, batch_size=2, out=str(out), **kw)


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ref"
    return ensure_set(synth_cfg(out), CLASSES, str(out.parent)), out


def test_set_is_balanced_and_complete(reference):
    result, out = reference
    assert result.images == result.generated == len(CLASSES) * K and (out / COMPLETE).is_file()
    table = pq.read_table(sorted(out.glob("*.parquet")))
    assert set(table.column_names) >= {"image", "label", "class_name", "prompt", "seed", "generator"}
    rows = table.to_pylist()
    for label, name in enumerate(CLASSES):
        mine = [r for r in rows if r["label"] == label]
        assert len(mine) == K and {r["class_name"] for r in mine} == {name}
        assert all(r["prompt"] == f"a photo of a {name}." and r["generator"] == "tiny" for r in mine)
        assert len({r["seed"] for r in mine}) == K  # every image its own seed
    assert all(r["image"].startswith(b"\x89PNG") for r in rows)


@pytest.mark.slow  # CI runs it (.ci/run); by default the interrupted run's resume compares its bytes with the reference
def test_same_config_gives_byte_identical_parquet(reference, tmp_path):
    _, ref = reference
    ensure_set(synth_cfg(tmp_path / "again"), CLASSES, str(tmp_path))
    for shard in sorted(ref.glob("*.parquet")):
        assert (tmp_path / "again" / shard.name).read_bytes() == shard.read_bytes()


def test_resume_skips_finished_shards_and_redoes_broken_ones(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "resumed"
    out.mkdir()
    # The state a killed run leaves: its plan, one finished shard, one short shard, a temp file mid-write.
    shutil.copy(ref / PLAN, out / PLAN)
    shutil.copy(ref / "class-00000.parquet", out / "class-00000.parquet")
    short = pq.read_table(ref / "class-00001.parquet").slice(0, 1)
    pq.write_table(short, out / "class-00001.parquet")
    dead = _dead_pid()
    (out / f".class-00002.parquet.{host_name()}-{dead}-0123abcd.tmp").write_bytes(b"partial")  # a dead writer's
    live = out / f".class-00002.parquet.{host_name()}-{os.getpid()}-0123abcd.tmp"  # another run, still writing
    live.write_bytes(b"partial")
    store = prepare(synth_cfg(out), CLASSES, str(tmp_path))
    assert [p.name for p in out.glob(".*.tmp")] == [live.name]  # only the dead writer's file is removed
    live.unlink()
    assert store.done_classes() == {0} and not store.complete()
    with pytest.raises(UserError, match="unfinished synthetic set"):
        from raycache.config import DataConfig

        from raycache.data.sources import open_source
        open_source(DataConfig(dataset=str(out)))
    result = fill(store, synth_cfg(out))
    assert result.generated == 2 * K  # only the two unfinished classes
    for shard in sorted(ref.glob("*.parquet")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert fill(store, synth_cfg(out)).generated == 0  # complete: nothing more to do


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_bytes(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "killed"
    calls = []

    def stop_after_first_shard(n):
        calls.append(n)
        if sum(calls) >= K + 1:  # class 0's shard is on disk, class 1 is half made
            raise Interrupted

    store = prepare(synth_cfg(out), CLASSES, str(tmp_path))
    with pytest.raises(Interrupted):
        fill(store, synth_cfg(out), on_images=stop_after_first_shard)
    assert not store.complete() and not (out / COMPLETE).exists()
    assert store.done_classes() == {0}
    assert [p.name for p in sorted(out.glob("*.parquet"))] == ["class-00000.parquet"]  # no half shard
    result = fill(prepare(synth_cfg(out), CLASSES, str(tmp_path)), synth_cfg(out))
    assert result.generated == 2 * K and (out / COMPLETE).is_file()
    for shard in sorted(ref.glob("*.parquet")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_missing_hub_weights_fail_even_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="'acme/no-such-model' are not available offline"):
        prepare(SynthConfig(generator="acme/no-such-model", classes=["a"]), ["a"], "/tmp")


def test_synth_command_logs_to_mlflow(capsys, ray_session, mlflow_uri, tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"synth": {"generator": "tiny", "classes": ["a", "b"], "per_class": 2, "steps": 2,
                                         "out": str(tmp_path / "set")},
                               "tracking": {"experiment": "synth-cli"}}))
    assert main(["synth", str(cfg)]) == 0
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("synth-cli").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["images"] == 4 and run.data.metrics["images_per_s"] > 0
    assert run.data.params["synth.generator"] == "tiny" and run.data.params["synth.per_class"] == "2"
    assert "contact_sheet.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    from PIL import Image

    sheet = Image.open(client.download_artifacts(run.info.run_id, "contact_sheet.png"))
    assert sheet.size[1] == 2 * 64  # one row per class


@pytest.mark.slow  # CI runs it (.ci/run)
def test_pipeline_from_a_local_folder(ray_session, tmp_path):
    from raycache.synth.tiny import build_tiny_pipeline

    build_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    cfg = SynthConfig(generator=str(tmp_path / "pipe"), classes=["x"], per_class=1, steps=2,
                      out=str(tmp_path / "set"))
    result = ensure_set(cfg, ["x"], str(tmp_path))
    assert result.images == 1 and pq.read_table(tmp_path / "set" / "class-00000.parquet").num_rows == 1


@pytest.mark.parametrize("override, expect", [
    ("synth.generator=acme/no-such-model", "synth.generator: weights for 'acme/no-such-model' are not available"),
    ("synth.generator=/no/such/folder", "synth.generator: /no/such/folder is not a diffusers pipeline folder"),
    ("synth.per_class=0", "synth.per_class: Input should be greater than or equal to 1"),
    ("synth.classes=[]", "synth.classes: Value error, the class list is empty"),
    ("synth.classes=[a,b,a]", "synth.classes: Value error, duplicate class name 'a'"),
    ("synth.out=/proc/raycache-cannot-write", "synth.out: cannot write to /proc/raycache-cannot-write"),
])
def test_bad_synth_input_is_one_line_exit_2(capsys, mlflow_uri, override, expect):
    code = main(["synth", "experiments/tiny.yaml", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect.replace("Value error, ", "") in err[0], err


def test_cachefl_refuses_synthetic_classes_that_differ(capsys, mlflow_uri):
    code = main(["run", "experiments/tiny.yaml", "--set", "method.cache_init=synthetic",
                 "--set", "synth.classes=[a,b]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "synth.classes" in err[-1] and "differ from the dataset's classes" in err[-1]


@pytest.mark.slow  # CI runs it (.ci/run)
def test_a_generator_actor_lost_mid_set_is_restarted_and_its_jobs_rerun(ray_session, tmp_path):
    """The generator actor's process killed (-9, as a lost node would) once the first images have reached the
    driver: the pool restarts it and reruns its lost jobs (a job's images depend on the job alone), and the
    set is byte for byte the undisturbed one. With no retries allowed the same kill fails the set, so the
    kill lands while jobs are left."""
    from conftest import kill_pool_actors

    def cfg(out, **kw):  # 12 one-image jobs
        return SynthConfig(generator="tiny", classes=CLASSES, per_class=4, steps=2, batch_size=1, out=str(out),
                           **kw)

    ref = tmp_path / "undisturbed"
    fill(prepare(cfg(ref), CLASSES, str(tmp_path)), cfg(ref))
    killed: list[int] = []

    def kill_once(n):
        if n and not killed:  # the first images are in (the call before generation reports 0)
            killed.extend(kill_pool_actors("ImageGenerator"))

    out = tmp_path / "lost"
    result = fill(prepare(cfg(out), CLASSES, str(tmp_path)), cfg(out), on_images=kill_once)
    assert killed and (out / COMPLETE).is_file() and result.images == len(CLASSES) * 4
    for shard in sorted(ref.glob("*.parquet")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    killed.clear()
    out = tmp_path / "no-retries"
    with pytest.raises(Exception):
        fill(prepare(cfg(out, retries=0), CLASSES, str(tmp_path)), cfg(out, retries=0), on_images=kill_once)
    assert killed and not (out / COMPLETE).exists()
