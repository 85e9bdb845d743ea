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
