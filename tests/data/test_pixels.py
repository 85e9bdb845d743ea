"""The pixel path: a method that trains through the image encoder gets every image decoded and run through
the model's eval transform once (a Ray Data map, in the source's order), shared by the client hosts, end to
end through a real run."""

from __future__ import annotations

import numpy as np
import torch

from raycache.config_file import load_config


def test_pixels_are_the_eval_transform_of_each_image_in_source_order(ray_session, image_folder):
    from raycache.config import DataConfig
    from raycache.data.pixels import load_pixels
    from raycache.data.sources import open_source
    from raycache.data.sources.base import decode_image
    from raycache.models.clip import ModelSpec, load_clip

    _, transform, _ = load_clip(ModelSpec("tiny"))
    source = open_source(DataConfig(dataset=str(image_folder)))
    pixels = load_pixels(source, transform, batch_size=7)  # batches that do not divide the 72 images
    rows = source.to_ray().take_all()
    assert pixels.shape == (len(source.labels), 3, 32, 32) and pixels.dtype == np.float32
    for i in (0, 35, 71):  # row i is image i of the source, whatever the batching
        want = transform(decode_image(rows[i]["image"], rows[i]["key"]))
        torch.testing.assert_close(torch.from_numpy(pixels[i]), want)


def test_a_vision_lora_run_trains_on_preprocessed_pixels(ray_session, mlflow_uri, tmp_path):
    from raycache.experiment import run_experiment

    cfg = load_config("experiments/quickstart.yaml", [
        "method.name=flora", "per_method.flora.lora_targets=[vision.attn.q_proj]", "per_method.flora.lr=1.0e-3",
        "data.clients=3", "runtime.client_actors=1", "federation.rounds=2", f"runtime.cache_dir={tmp_path}",
        "tracking.experiment=pixels"])
    summary = run_experiment(cfg)
    assert summary.timings["time_pixels_s"] > 0 and summary.rounds == 2
    layers, width, rank = 2, 64, 2  # the tiny preset's image tower; LoRA on q_proj: r (d_in + d_out) per layer
    assert summary.final["trainable_params"] == layers * rank * (width + width)
    assert summary.comm_bytes_up == 2 * 3 * layers * rank * 2 * width * 4  # 2 rounds x 3 clients, float32
    assert all(np.isfinite(h["loss"]) for h in summary.history)
