"""A synthetic set on disk: one Parquet shard per class, written atomically, plus two markers.

`_PLAN.json` records the settings the folder is for; `_COMPLETE.json` is written only when every class has
a shard with exactly K images. Every file is written atomically by its own writer (`raycache.storage`), so
two runs making the same set at once never break each other (their shards are the same bytes); a killed
run leaves finished shards (reused on resume), its temporary files (removed by the next run on its host)
and no marker that claims the set is whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from raycache.errors import UserError
from raycache.storage import remove_stale, write_atomic

PLAN, COMPLETE = "_PLAN.json", "_COMPLETE.json"
COLUMNS = ("image", "label", "class_name", "prompt", "seed", "generator", "index")


def shard_name(label: int) -> str:
    return f"class-{label:05d}.parquet"


class SynthStore:
    def __init__(self, out: str | Path, settings: dict) -> None:
        self.out = Path(out)
        self.settings = settings

    def shard(self, label: int) -> Path:
        return self.out / shard_name(label)

    def prepare(self) -> None:
        """Create the folder (or adopt a matching one); refuse a folder made with other settings."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UserError(f"synth.out: cannot write to {self.out} ({err.strerror or err})") from None
        remove_stale(self.out)  # half-written files of writers that died (another live run's are its own)
        plan = self.out / PLAN
        if plan.is_file():
            try:
                recorded = json.loads(plan.read_text())
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"synth.out: {plan} is corrupt; delete {self.out} or choose another synth.out") \
                    from None
            if recorded != self.settings:
                raise UserError(f"synth.out: {self.out} holds a set made with other settings; choose another "
                                f"synth.out or delete that folder")
        else:
            self._write_json(plan, self.settings)

    def done_classes(self) -> set[int]:
        """Classes whose shard is present and holds exactly K images."""
        import pyarrow.parquet as pq

        done = set()
        for label in range(len(self.settings["classes"])):
            path = self.shard(label)
            try:
                if path.is_file() and pq.read_metadata(path).num_rows == self.settings["per_class"]:
                    done.add(label)
            except Exception:  # a corrupt shard is simply redone
                pass
        return done

    def write_shard(self, label: int, rows: dict[str, list]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(rows["image"]) != self.settings["per_class"]:
            raise RuntimeError(f"class {label}: {len(rows['image'])} images, expected {self.settings['per_class']}")
        order = sorted(range(len(rows["index"])), key=rows["index"].__getitem__)
        table = pa.table({c: [rows[c][i] for i in order] for c in COLUMNS})
        write_atomic(self.shard(label), lambda tmp: pq.write_table(table, tmp), what="synthetic shard")

    def complete(self) -> bool:
        return (self.out / COMPLETE).is_file()

    def mark_complete(self) -> None:
        missing = set(range(len(self.settings["classes"]))) - self.done_classes()
        if missing:
            raise RuntimeError(f"synthetic set incomplete: classes {sorted(missing)} lack a full shard")
        self._write_json(self.out / COMPLETE, {"classes": len(self.settings["classes"]),
                                               "per_class": self.settings["per_class"]})

    @staticmethod
    def _write_json(path: Path, data: dict) -> None:
        text = json.dumps(data, indent=1, sort_keys=True)
        write_atomic(path, lambda tmp: tmp.write_text(text), what="synthetic set marker")
