"""The encoder pool (`raycache.data.encoders`): raycache's own encoder actors, fed decoded blocks in the
source's order, started once and used by every encode that fits it."""

from pathlib import Path

import numpy as np
import pytest

from raycache.config import DataConfig, RuntimeConfig
from raycache.data.encoders import EncoderPool
from raycache.data.features import load_or_encode
from raycache.data.sources import open_source
from raycache.models.clip import ModelSpec

ROOT = Path(__file__).resolve().parents[2]


def one_at_a_time(source, spec: ModelSpec) -> np.ndarray:
    """Each image's features, computed here in this process one image at a time: the model's own answer,
    with no pipeline, pool or batching in between."""
    import torch

    from raycache.data.sources.base import decode_image
    from raycache.models.clip import load_clip

    model, preprocess, _ = load_clip(spec)
    with torch.no_grad():
        return np.stack([model.encode_image(preprocess(decode_image(r["image"], r["key"]))[None])[0].numpy()
                         for r in source.to_ray().take_all()])


def test_two_actors_return_each_image_in_the_source_order_and_serve_later_encodes(ray_session, tmp_path):
    """A pool of two actors fed 19 blocks (the last one short) returns the features of every image in the
    source's order, each image once; a second encode (another subset, augmented views) runs on the same
    two actors, started once. An encode for other weights does not use the pool (it would give the pool's
    model's features): it stops it, so that its own pool fits beside the decode tasks (two pools holding
    the CPUs they need would wait for ever), and the next encode that fits starts it again."""
    spec = ModelSpec("tiny")
    src = open_source(DataConfig()).subset(np.arange(300))  # digits: 18 blocks of 16, one of 12
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "store"), encoder_batch_size=16, encoder_actors=2,
                            encoder_cpus=0.5)
    with EncoderPool(spec, runtime) as pool:
        first = load_or_encode(src, spec, runtime, encoders=pool)
        actors = list(pool.actors)
        assert len(actors) == 2
        np.testing.assert_allclose(first.features, one_at_a_time(src, spec), rtol=1e-4, atol=1e-5)
        assert first.encoded == 300

        keys = load_or_encode(src.subset(np.arange(40)), spec, runtime, views=3, seed=1, encoders=pool)
        assert keys.encoded == 40 * 3 and pool.actors == actors  # the same actors, not a new start

        other = ModelSpec("tiny", init_seed=1)
        assert not pool.fits(other, runtime)
        theirs = load_or_encode(src.subset(np.arange(40)), other, runtime, encoders=pool)
        np.testing.assert_allclose(theirs.features, one_at_a_time(src.subset(np.arange(40)), other),
                                   rtol=1e-4, atol=1e-5)
        assert pool.actors == []
        again = load_or_encode(src.subset(np.arange(8)), spec, runtime, encoders=pool)
        np.testing.assert_allclose(again.features, first.features[:8], rtol=1e-4, atol=1e-5)
        assert len(pool.actors) == 2 and pool.actors != actors
    assert pool.actors == []  # closed with its block


@pytest.mark.slow  # CI runs it (.ci/run)
def test_a_run_starts_its_encoder_once_for_the_features_and_the_cache_keys(ray_session, tmp_path, monkeypatch,
                                                                            mlflow_uri):
    """A CacheFL run whose cache keys are augmented views encodes twice (every image; the keys' views) with
    one start of its encoder actors; both encodes happen (each counted by the encoder itself), and no
    encoder actor is left running beside the federation's rounds. A second run, which finds both in the
    store, starts none."""
    from conftest import ray_actors
    from mlflow.tracking import MlflowClient

    from raycache.config_file import load_config
    from raycache.experiment import run_experiment

    starts: list[int] = []
    start = EncoderPool.start

    def counted(self):
        if not self.actors:
            starts.append(self.runtime.encoder_actors)
        return start(self)

    monkeypatch.setattr(EncoderPool, "start", counted)
    cfg = load_config(str(ROOT / "experiments/tiny.yaml"), [
        "federation.rounds=1", "data.clients=4", f"runtime.cache_dir={tmp_path / 'store'}",
        "method.augment_views=2", "tracking.experiment=encoders"])
    beside: set[str] = set()
    summary = run_experiment(cfg, on_round=lambda r, m: beside.update(ray_actors()))
    assert starts == [1]
    metrics = MlflowClient(mlflow_uri).get_run(summary.run_id).data.metrics
    assert metrics["features_encoded"] == 1797
    assert metrics["cache_views_encoded"] == 2 * 16 * 10  # K = 16 keys per class, two views each
    assert beside and not [name for name in beside if "EncoderActor" in name]

    again = run_experiment(cfg)
    assert starts == [1]
    metrics = MlflowClient(mlflow_uri).get_run(again.run_id).data.metrics
    assert metrics["features_encoded"] == 0 and metrics["cache_views_encoded"] == 0
