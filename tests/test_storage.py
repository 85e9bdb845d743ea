"""Nothing lost on a full disk or a crash: files are written whole or not at all, by their own writer; a full
disk is one line naming the file; a feature store that cannot be written costs the run nothing; a run's
checkpoints are kept as `federation.keep_checkpoints` says, and a resumed run logs every round once."""

import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

from raycache.storage import WriteFailed, host_name, remove_stale, temp_path, write_atomic

ROOT = Path(__file__).resolve().parents[1]
# What safetensors raises when the disk fills mid-write (its own error type, not OSError), verbatim.
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture
def small_disk(tmp_path, request):
    """A small tmpfs (256 kB, or the size a test's `disk_size` mark asks for): a disk that really fills
    (needs root; skipped without it, the injected-error tests here cover the same paths everywhere)."""
    mark = request.node.get_closest_marker("disk_size")
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = mark.args[0] if mark else "256k"
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_atomic_write_leaves_the_file_whole_or_the_old_one(tmp_path):
    path = tmp_path / "a" / "f.bin"
    write_atomic(path, lambda tmp: tmp.write_bytes(b"one"))
    assert path.read_bytes() == b"one" and [p.name for p in path.parent.iterdir()] == ["f.bin"]

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise SafetensorError(DISK_FULL)

    with pytest.raises(WriteFailed) as err:
        write_atomic(path, fails, what="checkpoint")
    assert str(err.value) == f"cannot write checkpoint {path}: No space left on device"
    assert path.read_bytes() == b"one" and [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_a_really_full_disk_is_one_line(small_disk):
    from safetensors.numpy import save_file

    path = small_disk / "c.safetensors"
    write_atomic(path, lambda tmp: save_file({"x": np.zeros(100, np.float32)}, str(tmp)))
    before = path.read_bytes()
    with pytest.raises(WriteFailed, match=f"cannot write file {path}: No space left on device$"):
        write_atomic(path, lambda tmp: save_file({"x": np.zeros(200_000, np.float32)}, str(tmp)))
    assert path.read_bytes() == before and [p.name for p in small_disk.iterdir()] == ["c.safetensors"]


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    """Two runs (or a sweep's trials) making the same file at once: each writes its own temporary file, both
    succeed, and the file is one writer's whole content (the old shared name let one delete the other's)."""
    path = tmp_path / "shard.bin"
    both = threading.Barrier(2)
    errors = []

    def writer(content: bytes):
        def write(tmp):
            tmp.write_bytes(content[:4])
            both.wait(timeout=10)  # both temporary files exist now
            with open(tmp, "ab") as f:
                f.write(content[4:])
        try:
            write_atomic(path, write)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(c * 1000,)) for c in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and path.read_bytes() in (b"a" * 1000, b"b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["shard.bin"]


def test_only_dead_writers_temporary_files_are_removed(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / f".x.bin.{host_name()}-{proc.pid}-0123abcd.tmp"
    live = temp_path(tmp_path / "x.bin")  # this process's: alive
    other_host = tmp_path / f".x.bin.elsewhere-{proc.pid}-0123abcd.tmp"  # a shared folder's other host
    unrelated = tmp_path / ".hidden.tmp"
    for p in (dead, live, other_host, unrelated):
        p.write_bytes(b"x")
    assert remove_stale(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, unrelated))


def test_a_feature_store_that_cannot_be_written_costs_the_run_nothing(ray_session, tmp_path, monkeypatch, capsys):
    """A full disk under the feature store: one line on stderr, nothing half-written left, and the features
    (the same as a run with a working store computes) are handed back from memory."""
    import safetensors.numpy

    from raycache.config import DataConfig, RuntimeConfig
    from raycache.data.features import load_or_encode
    from raycache.data.feature_store import feature_key, read_store
    from raycache.data.sources import open_source
    from raycache.models.clip import ModelSpec

    source = open_source(DataConfig(dataset="digits")).subset(np.arange(64))
    good = load_or_encode(source, ModelSpec("tiny"), RuntimeConfig(cache_dir=str(tmp_path / "ok")))
    calls = []

    def disk_fills(tensors, filename, metadata=None):  # the disk is full: a shard is half-written, then fails
        calls.append(filename)
        Path(filename).write_bytes(b"half")
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_fills)
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "full"), encoder_batch_size=16)
    got = load_or_encode(source, ModelSpec("tiny"), runtime)
    err = capsys.readouterr().err
    assert len(calls) == 1  # one failed shard, and no further attempts
    assert got.path is None and got.encoded == 64 and np.array_equal(got.features, good.features)
    line = [x for x in err.splitlines() if x.startswith("raycache: cannot store features")]
    assert len(line) == 1 and "No space left on device" in line[0] and "goes on with them in memory" in line[0]
    store = tmp_path / "full" / "features"
    assert list(store.iterdir()) == [] and read_store(store, feature_key(ModelSpec("tiny"), source), 64) is None


def test_keep_checkpoints_keeps_the_newest_and_the_best_round(tmp_path):
    from raycache.resume import prune, rounds_on_disk

    for r in range(1, 7):
        (tmp_path / f"round-{r:05d}.safetensors").write_bytes(b"x")
    assert prune(tmp_path, keep=2, best_round=3) == [1, 2, 4]
    assert sorted(rounds_on_disk(tmp_path)) == [3, 5, 6]
    assert prune(tmp_path, keep=1, best_round=6) == [3, 5]
    assert sorted(rounds_on_disk(tmp_path)) == [6]


@pytest.mark.slow
@pytest.mark.disk_size("4m")
def test_a_disk_that_fills_mid_run_fails_it_in_one_line_and_it_resumes_once_there_is_room(
        small_disk, tmp_path, ray_session, mlflow_uri):
    """The cache folder on a small disk that a neighbour fills after round 1: round 2's checkpoint cannot be
    written, the run ends FAILED naming the file and the cause, round 1's checkpoint is whole, and once there
    is room again the run resumes from it and finishes."""
    from mlflow.tracking import MlflowClient

    from raycache.config_file import load_config
    from raycache.errors import RunFailed
    from raycache.experiment import run_experiment
    from raycache.federation import checkpoint

    cfg = load_config(str(ROOT / "experiments/tiny.yaml"), [
        "method.cache_init=real", "federation.rounds=3", "data.clients=4", "runtime.client_actors=1",
        f"runtime.cache_dir={small_disk}", "tracking.experiment=full-disk"])
    filler = small_disk / "neighbour.bin"

    def fill_the_disk(r, metrics):  # round 2's callback: round 1 is written, round 2 is not yet
        if r == 2:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:  # the disk is full
                pass
            finally:
                os.close(fd)

    with pytest.raises(RunFailed, match=r"cannot write checkpoint .*round-00002\.safetensors: No space left"):
        run_experiment(cfg, on_round=fill_the_disk)
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("full-disk").experiment_id])[0]
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["failure_reason"]
    assert checkpoint.load(Path(run.data.tags["raycache.checkpoint"])).round == 1  # whole
    filler.unlink()
    resumed = run_experiment(cfg, resume=run.info.run_id)
    assert resumed.rounds == 2 and client.get_run(run.info.run_id).info.status == "FINISHED"
