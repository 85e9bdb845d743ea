"""Peak memory of all Ray processes against the number of clients: a CacheFL run on precomputed features at
10, 100 and 1,000 clients, each on its own fresh local Ray, sampled every 0.2 s.

"All Ray processes" = the driver plus every process it starts (GCS, raylet, dashboard and runtime-env
agents, workers and actors). Each is summed two ways: RSS (what `top` shows; counts shared pages, such as
torch's libraries and the object store, once per process that maps them) and PSS (each shared page split
between the processes that map it: the honest total). Usage:

    .venv/bin/python benchmarks/memory.py                  # 10, 100, 1000 clients, 3 rounds
    .venv/bin/python benchmarks/memory.py --clients 10 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import ray  # noqa: E402

from raycache.config_file import load_config  # noqa: E402
from raycache.experiment import run_experiment  # noqa: E402

MB = 1024 * 1024


def role_of(p: psutil.Process) -> str:
    """A Ray process's role: the actor's class for actors (Ray names an actor's process `ray::Class`, or
    `ray::<actor name>:Class.method` while it runs one; `ray::IDLE` between calls), the program otherwise
    (gcs_server, raylet, the dashboard and runtime-env agents, the log and autoscaler monitors)."""
    name = p.name()
    if name.startswith("ray::"):
        return "" if name == "ray::IDLE" else name[5:].split(":")[-1].split(".")[0]
    cmd = " ".join(p.cmdline()[:3])
    for key in ("gcs_server", "raylet", "dashboard/agent", "dashboard/dashboard", "runtime_env/agent",
                "log_monitor", "autoscaler/_private/monitor", "default_worker"):
        if key in cmd:
            return key
    return name


class PeakSampler:
    """Samples the summed RSS and PSS of this process and all its descendants until stopped: every `interval`
    seconds, or 4x the time a sample takes if that is longer."""

    def __init__(self, interval: float = 0.2, report_every: float | None = None) -> None:
        """`report_every`: also print the peaks so far to stderr every that many seconds (a long run that is
        stopped early still leaves its figures)."""
        self.interval = interval
        self.report_every = report_every
        self.peak_rss = self.peak_pss = self.peak_driver_pss = 0.0
        self.peak_processes = 0
        self.samples = 0
        self._roles: dict[int, str] = {}  # pid -> what it became (a worker starts as default_worker / IDLE)
        self._peaks: dict[int, float] = {}  # pid -> its own peak PSS
        self._at_peak: dict[int, float] = {}  # pid -> its PSS in the sample with the highest total
        self.stage = ""  # what the run was doing (set by the caller); `peak_stage`: at the total's peak
        self.peak_stage = ""
        self.stage_peaks: dict[str, float] = {}  # the highest total PSS while each stage ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        rss = pss = driver = 0.0
        procs = [me, *me.children(recursive=True)]
        now: dict[int, float] = {}
        for p in procs:
            try:
                info = p.memory_full_info()  # reads smaps_rollup: PSS as well as RSS
                role = "driver" if p.pid == me.pid else role_of(p)
                if role and (role != "default_worker" or p.pid not in self._roles):
                    self._roles[p.pid] = role
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += info.pss
            self._peaks[p.pid] = max(self._peaks.get(p.pid, 0.0), info.pss)
            now[p.pid] = info.pss
            if p.pid == me.pid:
                driver = info.pss
        self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0.0), pss)
        if pss > self.peak_pss:
            self._at_peak, self.peak_stage = now, self.stage
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_driver_pss = max(self.peak_driver_pss, driver)
        self.peak_processes = max(self.peak_processes, len(procs))

    @property
    def by_role(self) -> dict[str, float]:
        """Each process's own peak PSS, summed by what it became (an upper bound on its share of the total
        peak: processes peak at different moments)."""
        out: dict[str, float] = {}
        for pid, peak in self._peaks.items():
            role = self._roles.get(pid, "idle worker")
            out[role] = out.get(role, 0.0) + peak
        return out

    @property
    def at_peak(self) -> dict[str, float]:
        """What made up the total at its highest sample: PSS summed by role (these add up to `peak_pss`)."""
        out: dict[str, float] = {}
        for pid, pss in self._at_peak.items():
            role = self._roles.get(pid, "idle worker")
            out[role] = out.get(role, 0.0) + pss
        return out

    def report(self) -> str:
        return (f"peak PSS {self.peak_pss / MB:.0f} MB (driver {self.peak_driver_pss / MB:.0f}), by role: "
                + ", ".join(f"{k} {v / MB:.0f}" for k, v in sorted(self.by_role.items(), key=lambda kv: -kv[1])))

    def _loop(self) -> None:
        start = last = time.monotonic()
        while not self._stop.is_set():
            began = time.monotonic()
            self._sample()
            took = time.monotonic() - began
            self.samples += 1
            if self.report_every is not None and time.monotonic() - last >= self.report_every:
                last = time.monotonic()
                print(f"[mem {last - start:.0f}s] {self.report()}", file=sys.stderr, flush=True)
            # Reading every process's smaps is kernel work that grows with their mappings (0.27 s for 13
            # processes beside a 14 GB object store, on a loaded 2-core VM): waiting at least 4x that keeps
            # the sampler under a fifth of one core, so that it does not slow the run it measures.
            self._stop.wait(max(self.interval, 4 * took))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--dataset", default="digits", help="data.dataset (e.g. fashion_mnist: 60,000 training images)")
    ap.add_argument("--client-actors", type=int, default=2, help="runtime.client_actors: the host processes")
    ap.add_argument("--encode", action="store_true",
                    help="each run encodes into an empty store (a first run); the peak of its rounds is shown apart")
    args = ap.parse_args()
    store = tempfile.mkdtemp(prefix="raycache-bench-mem-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")

    def config(clients: int, folder: str):
        return load_config("experiments/tiny.yaml", [
            f"data.dataset={args.dataset}", f"data.clients={clients}", f"data.alpha={args.alpha}",
            f"federation.rounds={args.rounds}", f"runtime.client_actors={args.client_actors}",
            f"runtime.cache_dir={store}/{folder}",
            "tracking.experiment=benchmark-memory"])

    # One round first, in its own process and Ray (`raycache run`): the measured runs read precomputed
    # features and cache keys from the store, so the peaks compare what a federation costs, not the
    # (client-independent) encoder pool; and this process, the measured runs' driver, holds nothing of the
    # encoding (Ray Data's pipeline, the encoded arrays): it starts as a run from the store starts.
    # With --encode, each run encodes for itself, as a first run on a dataset does.
    if not args.encode:
        subprocess.run([sys.executable, "-m", "raycache", "run", "experiments/tiny.yaml", *(f"--set={kv}" for kv in [
            f"data.dataset={args.dataset}", f"data.clients={args.clients[0]}", f"data.alpha={args.alpha}",
            "federation.rounds=1", f"runtime.cache_dir={store}/shared",
            "tracking.experiment=benchmark-memory-warmup"])], check=True, stdout=subprocess.DEVNULL)

    rows = []
    for i, clients in enumerate(args.clients):
        t = time.perf_counter()
        cfg = config(clients, str(i) if args.encode else "shared")  # with --encode, an empty store each
        with PeakSampler() as mem:
            s = run_experiment(cfg, on_stage=lambda name: setattr(mem, "stage", name))
            ray.shutdown()  # inside the sampler: its processes are counted until they are gone
        assert (s.encoded > 0) == args.encode, "features should have come from the store unless --encode"
        if args.encode:  # encoding's pool and pipeline peak apart from the rounds that follow
            print(f"[{clients}] peak PSS by stage (MB): " + ", ".join(
                f"{k or 'start'} {v / MB:.0f}" for k, v in mem.stage_peaks.items()), file=sys.stderr)
        print(f"[{clients}] peak PSS by role (MB): " + ", ".join(
            f"{k} {v / MB:.0f}" for k, v in sorted(mem.by_role.items(), key=lambda kv: -kv[1])), file=sys.stderr)
        print(f"[{clients}] at the total's peak, by role (MB): " + ", ".join(
            f"{k} {v / MB:.0f}" for k, v in sorted(mem.at_peak.items(), key=lambda kv: -kv[1])), file=sys.stderr)
        rows.append((clients, mem.peak_processes, mem.peak_rss / MB, mem.peak_pss / MB, mem.peak_driver_pss / MB,
                     s.final["peak_memory_mb"], time.perf_counter() - t, s.final["accuracy"]))
        print(f"[{clients}] done in {rows[-1][-2]:.1f} s", file=sys.stderr)
    base_pss = rows[0][3]
    head = ("clients", "processes", "peak_rss_mb", "peak_pss_mb", "driver_pss_mb", "actor_peak_mb", "wall_s",
            "acc", "pss_vs_first")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) if isinstance(x, int) else f"{x:.1f}" if x > 1 else f"{x:.3f}" for x in r)
              + f" | {r[3] / base_pss:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
