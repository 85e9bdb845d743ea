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
    first = load_or_encode(src, ModelSpec("tiny"), runtime)
    assert first.encoded == len(src.labels) == 72  # every distinct image through the encoder once
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
    the views come from a stream seeded by (seed, image key), so batching cannot change them."""
    import hashlib

    import torch
    from torchvision import transforms as T

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
    augment = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                         T.RandomHorizontalFlip(p=0.5), T.ToTensor(), norm])
    table = sub.to_ray().take_all()
    expected, centre = [], []
    for r in table:
        img = decode_image(r["image"], r["key"])
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"3|{r['key']}".encode()).digest()[:8], "little"))
        views = torch.stack([augment(img) for _ in range(4)])
        with torch.no_grad():
            expected.append(model.encode_image(views).mean(dim=0).numpy())
            centre.append(model.encode_image(preprocess(img)[None])[0].numpy())
    np.testing.assert_allclose(keys.features, np.stack(expected), rtol=1e-4, atol=1e-5)
    assert not np.allclose(keys.features, np.stack(centre), atol=1e-3)  # not the plain centre crop

    one_by_one = load_or_encode(sub, ModelSpec("tiny"), RuntimeConfig(cache_dir=str(tmp_path / "other"),
                                                                      encoder_batch_size=1), views=4, seed=3)
    np.testing.assert_allclose(one_by_one.features, keys.features, rtol=1e-5, atol=1e-6)
    again = load_or_encode(sub, ModelSpec("tiny"), runtime, views=4, seed=3)
    assert again.encoded == 0  # stored under (rows, views, seed)
    other_seed = load_or_encode(sub, ModelSpec("tiny"), runtime, views=4, seed=4)
    assert other_seed.encoded == 12 and not np.allclose(other_seed.features, keys.features)
