"""The pixel path: a method that trains through the image encoder gets every image as its encoded bytes
(read once through Ray Data, in the source's order, shared by the client hosts), decoded and run through
the model's eval transform only a minibatch at a time; end to end through a real run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from raycache.config_file import load_config


def test_rows_decode_on_demand_to_the_eval_transform_of_each_image_in_source_order(ray_session, image_folder):
    from raycache.config import DataConfig
    from raycache.data.pixels import load_pixels
    from raycache.data.sources import open_source
    from raycache.data.sources.base import decode_image
    from raycache.methods.training import take
    from raycache.models.clip import ModelSpec, load_clip

    _, transform, _ = load_clip(ModelSpec("tiny"))
    source = open_source(DataConfig(dataset=str(image_folder)))
    images = load_pixels(source, transform)
    rows = source.to_ray().take_all()
    assert len(images) == len(source.labels) == 72
    # held as the encoded files, not as float pixels (72 x 3 x 32 x 32 x 4 bytes)
    assert images.nbytes == sum(len(r["image"]) for r in rows) + 8 * 73

    def want(i):
        return transform(decode_image(rows[i]["image"], rows[i]["key"]))

    picked = images[np.array([71, 0, 35])]  # positions, in the order asked
    assert len(picked) == 3 and picked.nbytes < images.nbytes
    torch.testing.assert_close(picked.tensor(), torch.stack([want(71), want(0), want(35)]))
    torch.testing.assert_close(images[10:13].tensor(), torch.stack([want(10), want(11), want(12)]))
    mask = np.zeros(72, bool)
    mask[[5, 6]] = True
    torch.testing.assert_close(images[mask].tensor(), torch.stack([want(5), want(6)]))
    # a training minibatch decodes only its rows; the rows travel (pickled, as through the object store)
    travelled = pickle.loads(pickle.dumps(images[np.arange(20, 30)]))
    torch.testing.assert_close(take(travelled, torch.tensor([3, 0])), torch.stack([want(23), want(20)]))
    torch.testing.assert_close(take(images[[4]], None), want(4)[None])


@pytest.mark.slow  # CI runs it (.ci/run); by default the contract runs each pixel method on the runtime
def test_a_vision_lora_run_trains_on_images_and_encodes_only_what_it_evaluates(ray_session, mlflow_uri, tmp_path):
    from raycache.experiment import prepare, run_experiment

    cfg = load_config("experiments/tiny.yaml", [
        "method.name=flora", "per_method.flora.lora_targets=[vision.attn.q_proj]", "per_method.flora.lr=1.0e-3",
        "data.clients=3", "runtime.client_actors=1", "federation.rounds=2", f"runtime.cache_dir={tmp_path}",
        "tracking.experiment=pixels"])
    summary = run_experiment(cfg)
    assert summary.timings["time_pixels_s"] > 0 and summary.rounds == 2
    # frozen features only for the zero-shot accuracy (test rows) and the server's hold-out
    splits = prepare(cfg).splits
    assert summary.encoded == len(splits.test) + len(splits.server) < summary.distinct_images
    layers, width, rank = 2, 64, 2  # the tiny preset's image tower; LoRA on q_proj: r (d_in + d_out) per layer
    assert summary.final["trainable_params"] == layers * rank * (width + width)
    assert summary.comm_bytes_up == 2 * 3 * layers * rank * 2 * width * 4  # 2 rounds x 3 clients, float32
    assert all(np.isfinite(h["loss"]) for h in summary.history)
    # Its MLflow model predicts through the LoRA-adapted image tower on images: the run's test accuracy again
    from mlflow.tracking import MlflowClient

    from raycache.tracking import load_pyfunc

    model = load_pyfunc(f"runs:/{summary.run_id}/model")
    assert model.uses_pixels
    prep = prepare(cfg)
    rows = prep.source.to_ray().take_all()
    images = [rows[i]["image"] for i in prep.splits.test]
    pred = model.scores(images, [f"test {i}" for i in prep.splits.test]).argmax(axis=1)
    accuracy = float((pred == prep.source.labels[prep.splits.test]).mean())
    assert accuracy == MlflowClient(mlflow_uri).get_run(summary.run_id).data.metrics["result_accuracy"]
