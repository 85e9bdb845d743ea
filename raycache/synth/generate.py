"""Make a synthetic set: check inputs, resume what is done, generate the rest on a Ray Data actor pool."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raycache.errors import UserError, find_user_error
from raycache.synth.pipeline import ImageGenerator, check_generator
from raycache.synth.plan import fingerprint, jobs, settings_of
from raycache.synth.store import SynthStore


@dataclass
class SynthResult:
    out: Path
    images: int  # images in the finished set
    generated: int  # images made by this call (0 when the set was already complete)
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def resolve_classes(synth, dataset_classes: list[str] | None) -> list[str]:
    classes = synth.classes if synth.classes is not None else dataset_classes
    if not classes:
        raise UserError("synth.classes: the class list is empty")
    return list(classes)


def prepare(synth, classes: list[str], cache_dir: str) -> SynthStore:
    """All the checks that need no compute: generator source, output folder, settings match."""
    check_generator(synth.generator, synth.allow_download)
    settings = settings_of(synth, classes)
    out = Path(synth.out) if synth.out else Path(cache_dir) / "synth" / fingerprint(settings)
    store = SynthStore(out, settings)
    store.prepare()
    return store


def fill(store: SynthStore, synth, on_images: Callable[[int], None] | None = None) -> SynthResult:
    """Generate every class whose shard is missing, shard by shard, then mark the set complete."""
    import ray.data

    s = store.settings
    total = len(s["classes"]) * s["per_class"]
    if store.complete():
        return SynthResult(store.out, total, 0, 0.0)
    todo = set(range(len(s["classes"]))) - store.done_classes()
    if on_images:
        on_images(total - len(todo) * s["per_class"])  # resumed shards count as done
    t0 = time.perf_counter()
    generated = 0
    if todo:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = ray.data.from_items(jobs(s["classes"], s["per_class"], s["batch_size"], todo)).map_batches(
            ImageGenerator,
            fn_constructor_kwargs={"settings": s, "use_gpu": synth.num_gpus > 0},
            batch_size=1,  # one job per call: a job's images never depend on what else is in flight
            compute=ray.data.ActorPoolStrategy(size=synth.actors),
            num_cpus=synth.num_cpus,
            num_gpus=synth.num_gpus,
            # a lost actor is restarted and its jobs rerun (a job's images depend only on the job), at most
            # `synth.retries` times: a job that kills its actor fails the set instead of looping for ever
            max_restarts=synth.retries, max_task_retries=synth.retries,
        )
        pending: dict[int, dict[str, list]] = {}
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    rows = pending.setdefault(row["label"], {k: [] for k in row})
                    for k, v in row.items():
                        rows[k].append(v)
                    if len(rows["image"]) == s["per_class"]:
                        store.write_shard(row["label"], pending.pop(row["label"]))
                generated += batch.num_rows
                if on_images:
                    on_images(batch.num_rows)
        except Exception as err:
            user = find_user_error(err)
            if user is not None:
                raise user from None
            raise
        if pending:
            raise RuntimeError(f"generation ended with partial classes {sorted(pending)}")
    store.mark_complete()
    return SynthResult(store.out, total, generated, time.perf_counter() - t0)


def ensure_set(synth, classes: list[str], cache_dir: str,
               on_images: Callable[[int], None] | None = None) -> SynthResult:
    """The finished set for these settings: reused if complete, resumed or generated otherwise."""
    return fill(prepare(synth, classes, cache_dir), synth, on_images)
