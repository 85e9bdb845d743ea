"""Encode once: the Ray Data encoder pool runs once per (model weights, dataset), then the store serves."""

import numpy as np
import pytest

from raycache.config import DataConfig, RuntimeConfig
from raycache.data.features import load_or_encode
from raycache.data.sources import open_source
from raycache.errors import UserError
from raycache.models.clip import ModelSpec


def test_each_image_is_encoded_once(ray_session, image_folder, tmp_path):
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "store"), encoder_batch_size=16)
    src = open_source(DataConfig(dataset=str(image_folder)))
    seen = []  # progress: (images done, total) as blocks arrive
    first = load_or_encode(src, ModelSpec("tiny"), runtime, progress=lambda done, total: seen.append((done, total)))
    assert first.encoded == len(src.labels) == 72  # every distinct image through the encoder once
    assert seen[-1] == (72, 72) and [d for d, _ in seen] == sorted({d for d, _ in seen}) and seen[0][0] > 0
    assert first.features.shape == (72, 64)
    # Stored raw, as encode_image returns them (FedCLIP's adapter reads them so; other methods normalise)
    import torch

    from raycache.data.sources.base import decode_image
    from raycache.models.clip import load_clip

    model, preprocess, _ = load_clip(ModelSpec("tiny"))
    table = src.to_ray().take(3)
    pixels = torch.stack([preprocess(decode_image(r["image"], r["key"])) for r in table])
    with torch.no_grad():
        np.testing.assert_allclose(first.features[:3], model.encode_image(pixels).numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(first.features, axis=1), 1.0)
    # Rows follow the source order: images of one class (same brightness) sit together in feature space.
    unit = first.features / np.linalg.norm(first.features, axis=1, keepdims=True)
    sims = unit @ unit.T
    same = src.labels[:, None] == src.labels[None, :]
    assert sims[same].mean() > sims[~same].mean()

    second = load_or_encode(src, ModelSpec("tiny"), runtime)
    assert second.encoded == 0  # served from disk: no encoder call
    np.testing.assert_array_equal(second.features, first.features)

    other_weights = load_or_encode(src, ModelSpec("tiny", init_seed=1), runtime)
    assert other_weights.encoded == 72 and other_weights.path != first.path


def test_a_corrupt_image_is_named(ray_session, image_folder, tmp_path):
    bad = image_folder / "dog" / "007.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "store"), encoder_batch_size=16)
    with pytest.raises(UserError, match=r"cannot decode image .*dog/007\.png"):
        load_or_encode(open_source(DataConfig(dataset=str(image_folder))), ModelSpec("tiny"), runtime)
    assert not list((tmp_path / "store").rglob("*.safetensors"))  # nothing half-written


def test_augmented_cache_keys_average_the_views_raw_features(ray_session, image_folder, tmp_path):
    """Tip-Adapter's cache key: the mean of the raw features of `views` augmented views (RandomResizedCrop
    to the input size with scale 0.5-1, bicubic; horizontal flip p = 0.5), here of a subset of rows only;
    the views come from a stream seeded by (seed, image key), so batching cannot change them. The expected
    views are cut and flipped by torchvision's own functional ops, at the crops the stream draws."""
    import torch
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    from raycache.data.pil_stage import crop_params, view_seed
    from raycache.data.sources.base import decode_image
    from raycache.models.clip import load_clip

    src = open_source(DataConfig(dataset=str(image_folder)))
    rows = np.array([5, 0, 40])
    sub = src.subset(rows)
    np.testing.assert_array_equal(sub.labels, src.labels[rows])
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "store"), encoder_batch_size=8)
    keys = load_or_encode(sub, ModelSpec("tiny"), runtime, views=4, seed=3)
    assert keys.features.shape == (3, 64) and keys.encoded == 3 * 4  # every view through the encoder

    model, preprocess, _ = load_clip(ModelSpec("tiny"))
    size = next(t.size for t in preprocess.transforms if isinstance(t, T.CenterCrop))
    norm = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))
    table = sub.to_ray().take_all()
    expected, centre, flips = [], [], 0
    for r in table:
        img = decode_image(r["image"], r["key"])
        rng = np.random.default_rng(view_seed(3, r["key"]))
        views = []
        for _ in range(4):
            top, left, h, w = crop_params(img.height, img.width, (0.5, 1.0), (3 / 4, 4 / 3), rng)
            assert 0.5 * img.height * img.width * 0.9 < h * w <= img.height * img.width  # scale 0.5-1, rounded
            view = TF.resized_crop(img, top, left, h, w, list(size), T.InterpolationMode.BICUBIC)
            flip = rng.random() < 0.5
            flips += flip
            views.append(norm(TF.to_tensor(TF.hflip(view) if flip else view)))
        with torch.no_grad():
            expected.append(model.encode_image(torch.stack(views)).mean(dim=0).numpy())
            centre.append(model.encode_image(preprocess(img)[None])[0].numpy())
    assert 0 < flips < 12
    np.testing.assert_allclose(keys.features, np.stack(expected), rtol=1e-4, atol=1e-5)
    assert not np.allclose(keys.features, np.stack(centre), atol=1e-3)  # not the plain centre crop

    one_by_one = load_or_encode(sub, ModelSpec("tiny"), RuntimeConfig(cache_dir=str(tmp_path / "other"),
                                                                      encoder_batch_size=1), views=4, seed=3)
    np.testing.assert_allclose(one_by_one.features, keys.features, rtol=1e-5, atol=1e-6)
    again = load_or_encode(sub, ModelSpec("tiny"), runtime, views=4, seed=3)
    assert again.encoded == 0  # stored under (rows, views, seed)
    other_seed = load_or_encode(sub, ModelSpec("tiny"), runtime, views=4, seed=4)
    assert other_seed.encoded == 12 and not np.allclose(other_seed.features, keys.features)


def test_the_store_is_sharded_and_reads_back_in_source_order(ray_session, tmp_path):
    """Features are written block by block as they arrive; the shards, read back, are one array in the
    source's order: each row is its own image's features, computed here one image at a time."""
    import json

    import torch

    from raycache.data.feature_store import INDEX, read_store
    from raycache.data.sources.base import decode_image
    from raycache.models.clip import load_clip

    src = open_source(DataConfig())  # digits: 1,797 images, an in-memory source split into blocks
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "store"), encoder_batch_size=64)
    first = load_or_encode(src, ModelSpec("tiny"), runtime)
    index = json.loads((first.path / INDEX).read_text())
    assert len(index["shards"]) > 3 and sum(rows for _, rows in index["shards"]) == len(src.labels)
    assert not [p for p in (tmp_path / "store" / "features").iterdir() if p.name.startswith(".")]  # no temp left

    model, preprocess, _ = load_clip(ModelSpec("tiny"))
    rows = src.to_ray().take_all()
    picks = [0, 63, 64, 1000, len(rows) - 1]  # either side of block edges, and the last image
    with torch.no_grad():
        expected = np.stack([model.encode_image(preprocess(decode_image(rows[i]["image"], rows[i]["key"]))[None])[0]
                             .numpy() for i in picks])
    np.testing.assert_allclose(first.features[picks], expected, rtol=1e-4, atol=1e-5)
    stored = read_store(tmp_path / "store" / "features", first.path.name, len(src.labels))
    np.testing.assert_array_equal(stored, first.features)
    assert read_store(tmp_path / "store" / "features", first.path.name, len(src.labels) + 1) is None  # not whole


def test_an_encoder_pool_that_leaves_no_cpu_for_decoding_is_sized_down_or_refused(ray_session, image_folder,
                                                                                 tmp_path, capsys):
    """On a local Ray the decode tasks need a CPU beside the encoder actors: two 1-CPU actors on this
    2-CPU Ray once hung the encode for ever; now the pool is sized to fit, said in one line."""
    from raycache.data.encoders import encoder_plan

    assert encoder_plan(RuntimeConfig()) == (1, 1.0, 2)  # one CPU reserved, both cores' threads
    assert encoder_plan(RuntimeConfig(encoder_actors=2, encoder_cpus=0.5)) == (2, 0.5, 1)
    assert encoder_plan(RuntimeConfig(encoder_threads=1)) == (1, 1.0, 1)
    with pytest.raises(UserError, match=r"runtime.encoder_cpus: .*2 CPU.*does not fit this Ray's 2 CPUs"):
        encoder_plan(RuntimeConfig(encoder_cpus=2))
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "store"), encoder_actors=2, encoder_cpus=1,
                            encoder_batch_size=8)
    feats = load_or_encode(open_source(DataConfig(dataset=str(image_folder))), ModelSpec("tiny"), runtime)
    assert feats.encoded == 72
    assert "runtime.encoder_actors=2 x 1 CPU leave no CPU for reading and decoding" in capsys.readouterr().err


def test_pixels_cross_as_uint8_and_the_encoder_finishes_the_transform_exactly():
    """The decode stage hands over uint8 pixels (a quarter of float32's bytes); scaled and normalised by the
    encoder they equal the whole torchvision transform applied to the image, bit for bit. Images that are not
    8-bit, and transforms that are not a Compose with ToTensor, arrive as the transform's own float output."""
    import io

    import torch
    from PIL import Image
    from torchvision import transforms as T

    from raycache.data.features import decode_views
    from raycache.data.transforms import split_at_tensor

    transform = T.Compose([T.Resize(20), T.CenterCrop(16), T.ToTensor(),
                           T.Normalize((0.3, 0.5, 0.7), (0.2, 0.25, 0.3))])
    rng = np.random.default_rng(0)

    def png(arr, mode=None):
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, format="PNG")
        return buf.getvalue()

    rgb = [rng.integers(0, 256, (24, 30, 3), dtype=np.uint8) for _ in range(3)]
    batch = {"image": np.array([png(a) for a in rgb], dtype=object), "key": np.array(["a", "b", "c"])}
    pixels = decode_views(batch, transform)["pixels"]
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 1, 3, 16, 16)
    _, tensor_stage = split_at_tensor(transform)
    finished = tensor_stage(torch.from_numpy(pixels).flatten(0, 1).float().div(255))
    whole = torch.stack([transform(Image.fromarray(a)) for a in rgb])
    assert torch.equal(finished, whole)

    # a PIL stage that leaves a float image (mode F, which ToTensor does not scale) for one image of the batch
    to_float = T.Lambda(lambda im: im.convert("F") if im.size[0] == 31 else im.convert("L"))
    gray = T.Compose([to_float, T.Resize(20), T.CenterCrop(16), T.ToTensor(), T.Normalize((0.5,), (0.25,))])
    wide = rng.integers(0, 256, (24, 31, 3), dtype=np.uint8)
    mixed = {"image": np.array([png(rgb[0]), png(wide)], dtype=object), "key": np.array(["g", "f"])}
    out = decode_views(mixed, gray)["pixels"]
    assert out.dtype == np.float32 and out.shape == (2, 1, 1, 16, 16)
    for got, arr in zip(out, [rgb[0], wide]):
        assert torch.equal(torch.from_numpy(got[0]), gray(Image.fromarray(arr)))

    plain = decode_views(batch, lambda img: torch.full((3, 4, 4), float(img.size[0])))["pixels"]
    assert plain.dtype == np.float32 and (plain == 30.0).all()


@pytest.mark.slow  # CI runs it (.ci/run)
def test_an_encoder_actor_lost_mid_encode_is_restarted_and_its_batches_rerun(ray_session, tmp_path, monkeypatch):
    """The encoder actor's process killed (-9, what a lost node does to it) once the first block of features
    has reached the driver: the pool restarts it and reruns the batches it lost (a batch's features depend on
    that batch alone), and the encode ends with exactly the features of an undisturbed one, each image
    delivered once. With no restarts allowed the same kill fails the encode, so the kill lands mid-encode."""
    from conftest import kill_pool_actors

    from raycache.data import feature_store

    src = open_source(DataConfig()).subset(np.arange(480))  # 30 batches of 16 digits
    clean = load_or_encode(src, ModelSpec("tiny"), RuntimeConfig(cache_dir=str(tmp_path / "clean"),
                                                                 encoder_batch_size=16))
    killed: list[int] = []
    write = feature_store.ShardWriter.write

    def write_then_kill(self, feats):
        write(self, feats)
        if not killed:
            killed.extend(kill_pool_actors("EncoderActor"))

    monkeypatch.setattr(feature_store.ShardWriter, "write", write_then_kill)
    again = load_or_encode(src, ModelSpec("tiny"), RuntimeConfig(cache_dir=str(tmp_path / "killed"),
                                                                 encoder_batch_size=16))
    assert killed
    np.testing.assert_array_equal(again.features, clean.features)
    assert again.encoded == len(src.labels)  # every image once: a rerun batch replaces what was lost
    killed.clear()
    with pytest.raises(Exception):
        load_or_encode(src, ModelSpec("tiny"), RuntimeConfig(cache_dir=str(tmp_path / "no-retries"),
                                                             encoder_batch_size=16, encode_retries=0))
    assert killed


def test_decode_block_yields_encoder_sized_blocks_of_the_same_pixels():
    """A source block of any size is decoded `rows` images at a time, each slice its own output block, and
    together they are exactly the whole block decoded at once."""
    import io

    from PIL import Image
    from torchvision import transforms as T

    from raycache.data.features import decode_block, decode_views

    rng = np.random.default_rng(3)

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    block = {"image": np.array([png(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(5)],
                               dtype=object), "key": np.array([f"k{i}" for i in range(5)])}
    transform = T.Compose([T.CenterCrop(8), T.ToTensor()])
    parts = list(decode_block(block, transform, rows=2))
    assert [len(p["pixels"]) for p in parts] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([p["pixels"] for p in parts]),
                                  decode_views(block, transform)["pixels"])


def test_a_folder_is_read_and_decoded_by_the_same_tasks(ray_session, image_folder):
    """Ray Data fuses the folder source's file reads into the decode stage (one task reads, decodes and
    preprocesses), because the read takes the stage's remote args. A read operator of its own got one or
    two CPUs of sixteen from Ray Data's budget and paced the whole encode (benchmarks/README.md). With
    `preserve_order` (which the encode sets) the decoded images come out in the source's order."""
    import ray.data

    from raycache.config import DataConfig, RuntimeConfig
    from raycache.data.features import decode_views, decoded
    from raycache.data.sources import open_source
    from raycache.models.clip import ModelSpec, load_clip

    source = open_source(DataConfig(dataset=str(image_folder)))
    transform = load_clip(ModelSpec("tiny"))[1]
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        ds = decoded(source, RuntimeConfig(), transform, rows=16)
        pixels = np.concatenate([b["pixels"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
        rows = source.to_ray().take_all()
    finally:
        options.preserve_order = before
    assert "ReadBinary->Project->MapBatches(decode_block)" in ds.stats(), "the read ran as its own operator"
    assert [r["key"] for r in rows] == sorted(str(p) for p in image_folder.rglob("*.png"))  # the source's order
    expected = decode_views({"image": np.array([r["image"] for r in rows], dtype=object),
                             "key": np.array([r["key"] for r in rows])}, transform)["pixels"]
    np.testing.assert_array_equal(pixels, expected)
