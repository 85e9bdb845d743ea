"""What a run needs from the CLIP model before any compute, made once: the check that `model.*` names
weights that exist, the method's own check of the model, the classes' zero-shot text weights and the model's
eval image transform.

A process that imports torch and open_clip holds about 0.5 GB before it does anything, and a run's driver
needs nothing else from them: it hands stored features, a method's class and numpy states to Ray. So the
model is built in a single-use process that exits once this is made, unless this process holds torch already
(a test, a notebook), where that would save nothing and cost an import, or is reused (a sweep's driver and
trial processes), where the import is paid once. What crosses between the two processes is JSON and a
`.npy` file, never a pickle; the transform crosses as its recipe (`EvalTransform`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raycache.errors import UserError
from raycache.models.clip import ModelSpec


class EvalTransform:
    """The model's eval image transform as open_clip's preprocessing config (size, mean, std,
    interpolation, resize mode): open_clip builds the transform from it where images are preprocessed (a
    client host, the encoder), so a process that only hands it on imports neither torch nor open_clip.
    It travels as the config, with what the decode tasks need made beforehand (`pil_steps`, `input_size`)."""

    def __init__(self, cfg: dict[str, Any], pil_steps=None, input_size=None) -> None:
        """`pil_steps`: the transform's PIL stage compiled where it was built (`pil_stage.compile_steps`, None
        if it does not compile), so that the encode pipeline's decode tasks run it without torch;
        `input_size`: its last crop or resize (`transforms.input_size`), the augmented views' size."""
        from raycache.data.pil_stage import as_steps

        self.cfg = dict(cfg)
        self.pil_steps = as_steps(pil_steps)
        self.input_size = tuple(input_size) if isinstance(input_size, list) else input_size  # JSON gives lists
        self._built = None

    def build(self):
        if self._built is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._built = image_transform_v2(PreprocessCfg(**self.cfg), is_train=False)
        return self._built

    def __call__(self, image):
        return self.build()(image)

    @property
    def transforms(self) -> list:
        """The steps (a torchvision `Compose`'s), for the pipeline's split at the tensor stage."""
        return self.build().transforms

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "pil_steps": self.pil_steps, "input_size": self.input_size}

    def __setstate__(self, state: dict) -> None:
        self.cfg, self._built = state["cfg"], None
        self.pil_steps, self.input_size = state.get("pil_steps"), state.get("input_size")


@dataclass(frozen=True)
class Preflight:
    text_weights: np.ndarray  # (N, D) unit rows, one per class
    transform: Any  # the model's eval image transform (an `EvalTransform` when made in another process)


def preflight(spec: ModelSpec, class_names: list[str], templates: list[str] | tuple[str, ...], method=None,
              settings=None) -> Preflight:
    """In this process: build the model (its spec checked first), run `method.check(settings, model, spec)`,
    and make the text weights; what this process made or checked before is not made again (`_MADE`)."""
    return _made(spec, class_names, templates, method, settings)[0]


# What this process has made already (a reused process: a sweep's trial processes and driver, whose trials
# differ in data and method settings, rarely in the model): the preflights by (spec, class names, templates),
# and the (spec, method, settings) whose method's own check has passed. A later preflight of the same model
# builds it only for a check not yet passed. The model is known by its fingerprint as well as its spec: local
# weights rewritten in place (a notebook that saves over its checkpoint) are read again, once their mtime
# moves (as the feature store tells them apart). A kept preflight is not checked again: weights removed from
# a hub cache since then are missed here, and fail where the encoder builds the model.
_MADE: dict[tuple, tuple[Preflight, dict[str, Any]]] = {}
_CHECKED: set[tuple] = set()
_MADE_MAX = 8  # preflights kept (one text weight row per class each: 3 MB for 1,000 classes at 768 wide)


def _has_check(method) -> bool:
    """Whether `method` checks the model itself (overrides `Method.check`, which checks nothing)."""
    from raycache.methods.base import Method

    return getattr(method.check, "__func__", None) is not Method.check.__func__


def _made(spec, class_names, templates, method, settings) -> tuple[Preflight, dict[str, Any]]:
    """(the preflight, the transform's recipe: open_clip's preprocessing config it was built from and its PIL
    stage's compiled steps), from this process's earlier preflights where they hold it (`_MADE`)."""
    import torch

    model_id = (spec, spec.fingerprint())
    # torch's threads too: the text weights' last bits depend on them, and a kept preflight must be the bits a
    # fresh one would be (a sweep's trial, 1 thread, computes what the same config run alone computes)
    key = (model_id, tuple(class_names), tuple(templates), torch.get_num_threads())
    check = (model_id, method, settings.model_dump_json()) if method is not None and _has_check(method) else None
    if key not in _MADE or (check is not None and check not in _CHECKED):  # the model is needed
        from raycache.data.pil_stage import compile_steps
        from raycache.data.transforms import input_size, split_at_tensor
        from raycache.models.clip import load_clip
        from raycache.models.text import text_classifier

        model, transform, tokenizer = load_clip(spec)
        if check is not None:
            method.check(settings, model, spec)
            _CHECKED.add(check)
        if key not in _MADE:
            if len(_MADE) >= _MADE_MAX:
                _MADE.pop(next(iter(_MADE)), None)  # the least recently used
            _MADE[key] = (Preflight(text_classifier(model, tokenizer, class_names, list(templates)), transform),
                          {"preprocess": dict(model.visual.preprocess_cfg),
                           "pil_steps": compile_steps(split_at_tensor(transform)[0]),
                           "input_size": input_size(transform)})
    made, recipe = _MADE[key] = _MADE.pop(key)  # the newest again: the oldest unused leaves first
    return Preflight(made.text_weights.copy(), made.transform), recipe  # the caller's own weights


def _serve(folder: str) -> None:
    """The single-use process: reads `job.json` in `folder`, writes `text_weights.npy` and `made.json` (the
    transform's recipe, or the user's mistake found)."""
    out = Path(folder)
    job = json.loads((out / "job.json").read_text())
    sys.path[:] = job["path"]  # the caller's: a method registered from its tree imports here too
    from raycache.methods import method_class

    method = method_class(job["method"]) if job["method"] else None
    settings = method.Settings.model_validate_json(job["settings"]) if method else None
    try:
        made, recipe = _made(ModelSpec(**job["spec"]), job["class_names"], job["templates"], method, settings)
    except UserError as err:
        (out / "made.json").write_text(json.dumps({"user_error": str(err)}))
        return
    np.save(out / "text_weights.npy", made.text_weights)
    (out / "made.json").write_text(json.dumps(recipe))


def run_preflight(spec: ModelSpec, class_names: list[str], templates: list[str] | tuple[str, ...], method=None,
                  settings=None, here: bool = False) -> Preflight:
    """`preflight`, in a single-use process unless this one holds torch already or `here` asks for this
    one. A user's mistake found there is raised here as the same one-line `UserError`."""
    with start_preflight(spec, class_names, templates, method, settings, here) as job:
        return job.result()


def start_preflight(spec: ModelSpec, class_names: list[str], templates: list[str] | tuple[str, ...], method=None,
                    settings=None, here: bool = False) -> "PreflightJob":
    """`run_preflight` begun: its single-use process started, for the caller to do other work (start Ray)
    until it asks for the `result`; made at once in this process where that is where it is made."""
    if here or "torch" in sys.modules:
        return PreflightJob(made=preflight(spec, class_names, templates, method, settings))
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="raycache-preflight-"))
    job = {"path": sys.path, "spec": spec.__dict__, "class_names": list(class_names), "templates": list(templates),
           "method": getattr(method, "name", None),
           "settings": settings.model_dump_json() if method is not None else None}
    try:
        (folder / "job.json").write_text(json.dumps(job))
        return PreflightJob(folder=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


class PreflightJob:
    """A preflight under way in its single-use process, or already made. A new interpreter, not a
    multiprocessing child (that would re-run the caller's main script); its output goes to files in its
    folder, kept for a failure's message (a progress display on this process's stderr stays whole, and a
    chatty model cannot fill a pipe no one reads yet)."""

    def __init__(self, made: Preflight | None = None, folder: Path | None = None) -> None:
        import subprocess

        self.made, self.folder, self.proc = made, folder, None
        if folder is not None:
            code = "import sys; from raycache.models.preflight import _serve; _serve(sys.argv[1])"
            with open(folder / "out.txt", "wb") as out:
                self.proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=out,
                                             stderr=subprocess.STDOUT, cwd=os.getcwd())

    @property
    def running(self) -> bool:
        """Whether the preflight is being made in its own process (else it was made here, already)."""
        return self.proc is not None

    def result(self) -> Preflight:
        """The preflight, once its process has made it; a user's mistake found there as its `UserError`."""
        if self.made is not None:
            return self.made
        code = self.proc.wait()
        made_file = self.folder / "made.json"
        if code != 0 or not made_file.is_file():
            text = (self.folder / "out.txt").read_text(errors="replace").strip()
            last = text.splitlines()[-1:] or ["no output"]
            how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}, out of memory?"
            raise RuntimeError(f"the model's preflight process failed ({how}): {last[0]}")
        made = json.loads(made_file.read_text())
        if "user_error" in made:
            raise UserError(made["user_error"])
        self.made = Preflight(np.load(self.folder / "text_weights.npy"),
                              EvalTransform(made["preprocess"], made["pil_steps"], made["input_size"]))
        return self.made

    def close(self) -> None:
        """Its process stopped if it still runs (the caller gave up on it), its folder removed."""
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PreflightJob":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
