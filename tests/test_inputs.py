"""Which rows a run encodes, decided once in `prepare` (`Prepared.encode_rows`) and read by the run's encode,
its early encoder start (`tests/models/test_preflight.py`: `meanwhile` is handed the same rows) and a sweep's
driver."""

import numpy as np
import pytest

from raycache.config_file import load_config
from raycache.experiment import prepare


@pytest.mark.parametrize("overrides, pixels_only", [
    (["method.name=fedavg_full"], True),  # trains the whole image tower on pixels: features for test and server
    (["method.name=flora", "per_method.flora.lora_targets=[vision.attn.q_proj]"], True),
    (["method.name=flora"], False),  # text-side LoRA trains on features: every image's
    (["method.name=cachefl"], False),
    (["method.name=fedclip"], False),
])
def test_a_method_that_trains_through_the_encoder_encodes_only_its_test_and_server_rows(overrides, pixels_only):
    prep = prepare(load_config("experiments/tiny.yaml", overrides), model_here=True)
    if not pixels_only:
        assert prep.encode_rows is None
        return
    # test (the zero-shot accuracy), then the server's hold-out; no training, validation or client rows
    s = prep.splits
    np.testing.assert_array_equal(prep.encode_rows, np.concatenate([s.test, s.server]))
    others = np.concatenate([s.train, s.val])
    assert not np.isin(prep.encode_rows, others).any() and len(prep.encode_rows) < len(prep.source.labels)

