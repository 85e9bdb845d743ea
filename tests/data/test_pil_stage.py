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
    from raycache.data.transforms import split_at_tensor, to_pixels

    transform = transforms()[name]
    stage = split_at_tensor(transform)[0]
    steps = pil_stage.compile_steps(stage)
    assert steps, f"{name} did not compile"
    assert pil_stage.as_steps(json.loads(json.dumps(steps))) == steps and hash(steps)  # as the preflight ships it
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
    input, a user's lambda, a conversion to a float mode) compiles to nothing: the decode task stays
    torchvision's, which runs them as they are. Augmented views need only the input size: always on PIL."""
    import open_clip
    from open_clip.transform import MaybeConvertMode
    from torchvision import transforms as T

    from raycache.data import features, pil_stage
    from raycache.data.features import decode_task
    from raycache.data.transforms import split_at_tensor

    eval_32 = open_clip.image_transform(32, is_train=False)
    unknown = [open_clip.image_transform((20, 14), is_train=False),
               T.Compose([T.Lambda(lambda im: im.rotate(90)), T.ToTensor()]),
               T.Compose([MaybeConvertMode("F"), T.ToTensor()]),
               T.Compose([T.Resize(20, max_size=20), T.ToTensor()]),  # torchvision refuses it on every image
               T.Compose([T.Resize((20, 14), max_size=30)])]  # no ToTensor: not split at all
    for t in unknown:
        assert pil_stage.compile_steps(split_at_tensor(t)[0]) is None, t
        assert decode_task(t, rows=4)[0] is features.decode_block
    assert decode_task(eval_32, rows=4)[0] is pil_stage.decode_block
    fn, kwargs = decode_task(eval_32, rows=4, views=4, seed=1)
    assert fn is pil_stage.decode_block and kwargs["steps"] == pil_stage.augment_steps((32, 32))


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
    def run(fn, kwargs):
        sent = cloudpickle.dumps((fn, kwargs, block))
        done = subprocess.run([sys.executable, "-c", WORKER], input=sent, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        out = pickle.loads(done.stdout)
        assert out["loaded"] == [], f"the decode worker imported {json.dumps(out['loaded'])}"
        assert [len(p["pixels"]) for p in out["parts"]] == [4, 4, 1]
        return np.concatenate([p["pixels"] for p in out["parts"]])

    np.testing.assert_array_equal(run(*decode_task(transform, rows=4)), decode_views(block, transform)["pixels"])
    views = run(*decode_task(transform, rows=4, views=3, seed=5))  # Tip-Adapter's augmented views
    assert views.dtype == np.uint8 and views.shape == (len(SHAPES), 3, 3, 32, 32)
    # room for random crops to differ (far from 4:3, every try fails and the view is the centre crop)
    big = [i for i, (h, w) in enumerate(SHAPES) if min(h, w) >= 24 and max(h, w) / min(h, w) <= 4 / 3]
    assert all(len({v.tobytes() for v in views[i]}) == 3 for i in big)  # three different views each


def test_augmented_views_are_torchvisions_crops_and_flips_from_numpys_stream():
    """A view is torchvision's `resized_crop` (bicubic, to the input size) and `hflip` at the crop and coin
    the stream draws, byte for byte; and the crops are drawn as torchvision's `RandomResizedCrop.get_params`
    draws them: the same distribution of area and aspect ratio on a non-square image, and the same centre
    crop where no random crop fits (an image far wider than 4:3)."""
    import torch
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    from raycache.data import pil_stage

    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    steps = pil_stage.augment_steps((20, 24))
    flips = 0
    for seed in range(20):
        got = pil_stage.to_chw(pil_stage.apply(img, steps, np.random.default_rng(seed)))
        replay = np.random.default_rng(seed)
        top, left, h, w = pil_stage.crop_params(60, 90, (0.5, 1.0), (3 / 4, 4 / 3), replay)
        view = TF.resized_crop(img, top, left, h, w, [20, 24], T.InterpolationMode.BICUBIC)
        flip = replay.random() < 0.5
        flips += flip
        expected = TF.pil_to_tensor(TF.hflip(view) if flip else view)
        np.testing.assert_array_equal(got, expected.numpy(), err_msg=f"seed {seed}")
    assert 3 < flips < 17

    def stats(draw, n=3000):
        crops = np.array([draw() for _ in range(n)], dtype=float)  # (top, left, h, w)
        area, log_ratio = crops[:, 2] * crops[:, 3] / (60 * 90), np.log(crops[:, 3] / crops[:, 2])
        return np.array([area.mean(), np.quantile(area, 0.1), np.quantile(area, 0.9), log_ratio.mean(),
                         log_ratio.std(), (crops[:, 0] / (60 - crops[:, 2] + 1)).mean()])

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ours = stats(lambda: pil_stage.crop_params(60, 90, (0.5, 1.0), (3 / 4, 4 / 3), rng))
    theirs = stats(lambda: T.RandomResizedCrop.get_params(img, [0.5, 1.0], [3 / 4, 4 / 3]))
    np.testing.assert_allclose(ours, theirs, atol=0.02)
    wide = Image.new("RGB", (400, 10))
    assert (pil_stage.crop_params(10, 400, (0.5, 1.0), (3 / 4, 4 / 3), rng)
            == tuple(T.RandomResizedCrop.get_params(wide, [0.5, 1.0], [3 / 4, 4 / 3])))
