"""The eval transform's PIL stage run on PIL alone (`raycache.data.pil_stage`): torchvision's pixels, byte for
byte, in a decode worker that never loads torch."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# (height, width): landscape, portrait, square at the model's size, thinner than one pixel after scaling,
# smaller than the crop (zero padding, odd and even margins), odd sizes that round half to even
SHAPES = [(24, 30), (30, 24), (32, 32), (1, 50), (9, 6), (13, 8), (301, 97), (97, 301), (33, 35)]


def transforms():
    """Eval transforms whose PIL stage compiles: open_clip's own (square input, the shape every CLIP has),
    and torchvision steps with every option the compiler reads."""
    import open_clip
    from open_clip.transform import MaybeConvertMode
    from torchvision import transforms as T

    bilinear, nearest = T.InterpolationMode.BILINEAR, T.InterpolationMode.NEAREST
    return {
        "open_clip 32": open_clip.image_transform(32, is_train=False),
        "open_clip squash": open_clip.image_transform((20, 14), is_train=False, resize_mode="squash"),
        "max_size, non-square crop, gray": T.Compose([
            T.Resize(20, interpolation=bilinear, max_size=25), T.CenterCrop((16, 12)), MaybeConvertMode("L"),
            T.ToTensor()]),
        "(h, w) resize, crop larger than it": T.Compose([
            T.Resize((18, 11), interpolation=nearest), T.CenterCrop(21), T.ToTensor()]),
        "crop first": T.Compose([T.CenterCrop((10, 40)), T.Resize([7]), T.ToTensor()]),
    }


@pytest.mark.parametrize("name", list(transforms()))
def test_the_compiled_steps_give_torchvisions_pixels_byte_for_byte(name):
    """Every image shape through every transform: the compiled steps on PIL make the same uint8 pixels as the
    transform's own torchvision PIL stage (`to_pixels`), which the encoder then scales and normalises."""
    import torch
    from PIL import Image

    from raycache.data import pil_stage
    from raycache.data.features import split_at_tensor, to_pixels

    transform = transforms()[name]
    stage = split_at_tensor(transform)[0]
    steps = pil_stage.compile_steps(stage)
    assert steps, f"{name} did not compile"
    rng = np.random.default_rng(7)
    for h, w in SHAPES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        try:
            expected = to_pixels(img, stage)
        except ValueError as err:  # torchvision cannot either (an edge scaled to 0 pixels): the same error
            with pytest.raises(ValueError, match=str(err)):
                pil_stage.apply(img, steps)
            continue
        got = pil_stage.to_chw(pil_stage.apply(img, steps))
        assert expected.dtype == torch.uint8 and got.dtype == np.uint8
        assert got.shape == tuple(expected.shape), f"{name} {h}x{w}: {got.shape} != {tuple(expected.shape)}"
        np.testing.assert_array_equal(got, expected.numpy(), err_msg=f"{name} {h}x{w}")


def test_steps_it_does_not_know_keep_the_torchvision_path():
    """A step whose output the compiler cannot vouch for (open_clip's aspect-keeping resize for a non-square
    input, a user's lambda, a conversion to a float mode) compiles to nothing, and augmented views are never
    compiled: the decode task stays torchvision's, which runs them as they are."""
    import open_clip
    from open_clip.transform import MaybeConvertMode
    from torchvision import transforms as T

    from raycache.data import features, pil_stage
    from raycache.data.features import decode_task, split_at_tensor

    eval_32 = open_clip.image_transform(32, is_train=False)
    unknown = [open_clip.image_transform((20, 14), is_train=False),
               T.Compose([T.Lambda(lambda im: im.rotate(90)), T.ToTensor()]),
               T.Compose([MaybeConvertMode("F"), T.ToTensor()]),
               T.Compose([T.Resize((20, 14), max_size=30)])]  # no ToTensor: not split at all
    for t in unknown:
        assert pil_stage.compile_steps(split_at_tensor(t)[0]) is None, t
        assert decode_task(t, rows=4)[0] is features.decode_block
    assert decode_task(eval_32, rows=4)[0] is pil_stage.decode_block
    assert decode_task(eval_32, rows=4, views=4, seed=1)[0] is features.decode_block


WORKER = """
import pickle, sys
fn, kwargs, block = pickle.load(sys.stdin.buffer)
parts = list(fn(block, **kwargs))
pickle.dump({"parts": parts, "loaded": sorted(m for m in ("torch", "torchvision", "open_clip")
                                             if m in sys.modules)}, sys.stdout.buffer)
"""


def test_a_decode_worker_runs_the_compiled_stage_without_loading_torch():
    """What Ray sends a decode worker for a CLIP eval transform (the task's function and arguments, pickled)
    runs in a fresh interpreter without importing torch, torchvision or open_clip, and yields `rows`-image
    blocks whose pixels are the torchvision decode's."""
    import cloudpickle

    from raycache.data.features import decode_task, decode_views
    from raycache.models.clip import ModelSpec, load_clip

    transform = load_clip(ModelSpec("tiny"))[1]
    rng = np.random.default_rng(11)
    block = {"image": np.array([png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SHAPES],
                               dtype=object), "key": np.array([f"k{i}" for i in range(len(SHAPES))])}
    fn, kwargs = decode_task(transform, rows=4)
    sent = cloudpickle.dumps((fn, kwargs, block))
    done = subprocess.run([sys.executable, "-c", WORKER], input=sent, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = pickle.loads(done.stdout)
    assert out["loaded"] == [], f"the decode worker imported {json.dumps(out['loaded'])}"
    assert [len(p["pixels"]) for p in out["parts"]] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([p["pixels"] for p in out["parts"]]),
                                  decode_views(block, transform)["pixels"])
