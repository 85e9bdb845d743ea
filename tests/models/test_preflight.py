"""The model's preflight (its spec checked, the method's check, the text weights, the eval transform): made
in a single-use process when the caller holds no torch, and the same as when made in the caller."""

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycache.config import settings_for
from raycache.errors import UserError
from raycache.methods import method_class
from raycache.models.clip import ModelSpec
from raycache.models.preflight import EvalTransform, preflight

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter that has not imported torch: the preflight must happen in a child of it.
PARENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from raycache.config import settings_for
    from raycache.errors import UserError
    from raycache.methods import method_class
    from raycache.models.clip import ModelSpec
    from raycache.models.preflight import EvalTransform, run_preflight

    out = sys.argv[1]
    made = run_preflight(ModelSpec("tiny"), ["zero", "one", "two"], ("a photo of {}.", "{}"),
                         method_class("cachefl"), settings_for("cachefl"))
    np.save(out + "/weights.npy", made.text_weights)
    json.dump(made.transform.cfg, open(out + "/recipe.json", "w"))
    from raycache.data.features import decode_task

    fn, kwargs = decode_task(made.transform, rows=4)  # what the encode pipeline's decode tasks will run
    json.dump(kwargs["steps"], open(out + "/steps.json", "w"))
    augmented, aug_kwargs = decode_task(made.transform, rows=4, views=10, seed=0)  # Tip-Adapter's views
    json.dump(aug_kwargs["steps"][0][1:3], open(out + "/views.json", "w"))
    report = {"recipe": isinstance(made.transform, EvalTransform), "torch": "torch" in sys.modules,
              "open_clip": "open_clip" in sys.modules, "decode": f"{fn.__module__}.{fn.__name__}",
              "augmented": f"{augmented.__module__}.{augmented.__name__}"}
    try:
        run_preflight(ModelSpec("tiny"), ["zero", "one"], ("{}",), method_class("promptfl"),
                      settings_for("promptfl", n_ctx=500))
    except UserError as err:
        report["error"] = str(err)
    report["torch_after"] = "torch" in sys.modules

    # prepare's `meanwhile` (a run starts Ray and its encoders there) runs while the child builds the model;
    # a `meanwhile` that fails stops the child
    import psutil
    from raycache.config_file import load_config
    from raycache.experiment import prepare

    def children():
        return [p for p in psutil.Process().children() if "_serve" in " ".join(p.cmdline())]

    beside, rows = [], []

    def meanwhile(cfg, spec, source, encode_rows):
        beside.append(len(children()))
        rows.append(encode_rows)

    # a method that trains through the encoder: `meanwhile` looks for the rows the run's encode reads
    prep = prepare(load_config("experiments/tiny.yaml", ["method.name=fedavg_full"]), meanwhile=meanwhile)
    report["beside"], report["after"] = beside, len(children())
    report["rows"] = rows[0] is not None and rows[0].tolist() == np.concatenate([prep.splits.test,
                                                                                prep.splits.server]).tolist()
    report["same_weights"] = bool(np.allclose(prep.task.text_weights, run_preflight(
        ModelSpec("tiny"), prep.source.class_names, prep.cfg.model.templates).text_weights, atol=1e-6))

    def fail(*a):
        raise RuntimeError("meanwhile failed")

    try:
        prepare(load_config("experiments/tiny.yaml", []), meanwhile=fail)
    except RuntimeError as err:
        report["failed"], report["left"] = str(err), len(children())
    print(json.dumps(report))
""")


def test_a_process_without_torch_gets_the_preflight_from_a_child_with_the_same_results(tmp_path):
    done = subprocess.run([sys.executable, "-c", PARENT, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"recipe": True, "torch": False, "open_clip": False, "torch_after": False,
                      "error": report.get("error"), "decode": "raycache.data.pil_stage.decode_block",
                      "augmented": "raycache.data.pil_stage.decode_block",
                      # `meanwhile` ran beside the model's process, which was gone once prepare returned; a
                      # failing one is raised as it is, and leaves no model process behind
                      "beside": [1], "after": 0, "rows": True, "same_weights": True, "failed": "meanwhile failed",
                      "left": 0}
    # A user's mistake found by the method's check in the child is the same one-line UserError here.
    assert report["error"].startswith("method.n_ctx: 500 context tokens")

    here = preflight(ModelSpec("tiny"), ["zero", "one", "two"], ("a photo of {}.", "{}"), method_class("cachefl"),
                     settings_for("cachefl"))
    # The same model in another process: the same text weights, to float32 rounding (its threads differ).
    np.testing.assert_allclose(np.load(tmp_path / "weights.npy"), here.text_weights, rtol=1e-5, atol=1e-7)
    shipped = EvalTransform(json.loads((tmp_path / "recipe.json").read_text()))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    np.testing.assert_array_equal(shipped(img).numpy(), here.transform(img).numpy())
    # the decode tasks' steps, compiled in the child, are the ones this process compiles from its transform
    from raycache.data import pil_stage
    from raycache.data.transforms import split_at_tensor

    steps = pil_stage.compile_steps(split_at_tensor(here.transform)[0])
    assert steps and json.loads((tmp_path / "steps.json").read_text()) == json.loads(json.dumps(steps))
    # the augmented views' crop size, from the child: the model's input size, read here from its transform
    from raycache.data.transforms import input_size

    size = input_size(here.transform)
    assert json.loads((tmp_path / "views.json").read_text()) == ([size, size] if isinstance(size, int) else list(size))


@pytest.mark.parametrize("name", ["tiny", "effnet-lite0"])
def test_the_transforms_recipe_builds_the_models_own_transform_where_it_is_used(name):
    from raycache.models.clip import load_clip
    from raycache.models.preflight import _made

    model, transform, _ = load_clip(ModelSpec(name))
    made = json.loads(json.dumps(_made(ModelSpec(name), ["a", "b"], ("{}",), None, None)[1]))
    recipe = EvalTransform(made["preprocess"], made["pil_steps"], made["input_size"])
    moved = pickle.loads(pickle.dumps(recipe))  # as Ray hands it to a decode task: the config, not a build
    assert moved._built is None and moved.cfg == recipe.cfg and moved.pil_steps == recipe.pil_steps
    assert moved.input_size == recipe.input_size is not None
    rng = np.random.default_rng(3)
    for shape in [(40, 30, 3), (17, 90, 3)]:  # portrait and landscape: resize, then crop
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        np.testing.assert_array_equal(moved(img).numpy(), transform(img).numpy())
    assert [type(t) for t in moved.transforms] == [type(t) for t in transform.transforms]


def test_every_methods_settings_survive_the_json_the_preflight_process_reads():
    """The child rebuilds the method's settings from JSON: defaults, and a value JSON has no number for."""
    from raycache.methods import method_names

    for name in method_names():
        s = settings_for(name)
        assert type(s).model_validate_json(s.model_dump_json()) == s, name
    inf = settings_for("cachefl", alpha=float("inf"))
    assert type(inf).model_validate_json(inf.model_dump_json()) == inf


def test_a_reused_process_builds_the_model_only_for_what_it_has_not_made_or_checked(monkeypatch):
    """A sweep's trial process makes a preflight for every trial: the same model, classes and templates are
    made once, and the model is built again only for a method's own check of settings not yet checked. What
    comes back is the same as from a fresh build, and each caller's weights are its own."""
    from raycache.models import clip, preflight as pf

    monkeypatch.setattr(pf, "_MADE", {})
    monkeypatch.setattr(pf, "_CHECKED", set())
    builds = []
    real = clip.load_clip
    monkeypatch.setattr(clip, "load_clip", lambda spec, *a, **k: builds.append(spec) or real(spec, *a, **k))
    spec, names, templates = ModelSpec("tiny"), ["zero", "one", "two"], ("a photo of {}.", "{}")
    cachefl, flora = method_class("cachefl"), method_class("flora")

    first = preflight(spec, names, templates, cachefl, settings_for("cachefl"))
    again = preflight(spec, names, templates, cachefl, settings_for("cachefl", shots=4))  # no check of its own
    assert len(builds) == 1
    np.testing.assert_array_equal(first.text_weights, again.text_weights)
    again.text_weights[:] = 0  # a caller's weights are its own copy
    assert np.abs(preflight(spec, names, templates).text_weights).sum() > 0 and len(builds) == 1

    preflight(spec, names[:2], templates)  # other classes: made afresh
    assert len(builds) == 2
    vision = settings_for("flora", lora_targets=["vision.attn.q_proj"])
    preflight(spec, names, templates, flora, vision)  # flora checks its targets against the model: built once
    preflight(spec, names, templates, flora, vision)
    assert len(builds) == 3
    bad = settings_for("flora", lora_targets=["vision.attn.nope"])
    for _ in range(2):  # a failed check is never remembered as passed
        with pytest.raises(UserError, match="vision.attn.nope"):
            preflight(spec, names, templates, flora, bad)
    assert len(builds) == 5
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:  # torch's threads change the text weights' last bits: made afresh, as a fresh process would
        preflight(spec, names, templates)
    finally:
        torch.set_num_threads(threads)
    assert len(builds) == 6
    # and what a fresh build makes is what was kept
    monkeypatch.setattr(pf, "_MADE", {})
    np.testing.assert_array_equal(preflight(spec, names, templates).text_weights, first.text_weights)


def test_a_reused_process_reads_local_weights_again_once_they_are_rewritten(monkeypatch, tmp_path):
    """A notebook holds torch, so its runs make their preflight in its own process: saving over the weights
    file must give the next run the new model's text weights, not the kept ones."""
    import os

    import torch
    from safetensors.torch import save_file

    from raycache.models import preflight as pf
    from raycache.models.clip import load_clip

    monkeypatch.setattr(pf, "_MADE", {})
    path = tmp_path / "w.safetensors"
    names, templates = ["zero", "one"], ("{}",)

    def save(seed: int) -> None:
        model, _, _ = load_clip(ModelSpec("tiny", init_seed=seed))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    save(1)
    spec = ModelSpec("tiny", pretrained=str(path))
    first = preflight(spec, names, templates).text_weights
    save(2)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later write, on any clock
    second = preflight(spec, names, templates).text_weights
    want, _, tok = load_clip(spec)  # the rewritten file, built afresh
    from raycache.models.text import text_classifier

    with torch.no_grad():
        np.testing.assert_allclose(second, text_classifier(want, tok, names, list(templates)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(first, second)
