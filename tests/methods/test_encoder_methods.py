"""FLoRA and full fine-tuning train parameters inside CLIP: only their own parameters move, the state
round-trips through a second process's model, and training lowers the loss."""

from raycache.methods.training import LocalRound
import numpy as np
import pytest
import torch

from raycache.config import settings_for
from raycache.methods.base import Task
from raycache.methods.fedavg_full import FedAvgFull
from raycache.methods.flora import FLoRA
from raycache.models.clip import ModelSpec, load_clip
from raycache.models.text import text_classifier

NAMES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def task():
    model, _, tokenizer = load_clip(ModelSpec("tiny"))
    return Task(NAMES, text_classifier(model, tokenizer, NAMES, ["a photo of a {}."]), ModelSpec("tiny"))


def _pixels(n=24, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    x = (rng.normal(size=(n, 3, 32, 32)) + y[:, None, None, None]).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_flora_starts_at_zero_shot_and_trains_only_lora(task):
    cfg = settings_for("flora", lr=1e-2, local_epochs=5, batch_size=8, loss="ce")
    method = FLoRA(cfg, task)
    state = method.init_state(None, None)
    assert all(".lora_A." in k or ".lora_B." in k for k in state) and len(state) == 4
    assert all(not v.any() for k, v in state.items() if ".lora_B." in k)  # B = 0: the base model at init
    feats = torch.nn.functional.normalize(torch.randn(12, 64), dim=-1)
    zero_shot = 100 * feats @ torch.from_numpy(task.text_weights).T
    torch.testing.assert_close(method.logits(state, feats), zero_shot, rtol=1e-4, atol=1e-3)
    frozen = {n: p.clone() for n, p in method.model.named_parameters() if not p.requires_grad}
    y = torch.arange(12) % 3
    new, loss = method.local_train(state, feats, y, LocalRound(0))
    assert all(torch.equal(p, frozen[n]) for n, p in method.model.named_parameters() if n in frozen)
    assert any(not np.array_equal(new[k], state[k]) for k in state)
    again, second = FLoRA(cfg, task).local_train(new, feats, y, LocalRound(1))  # a fresh process's model loads it
    assert np.isfinite(loss) and second < loss


def test_flora_on_the_vision_tower_needs_pixels(task):
    cfg = settings_for("flora", lora_targets=["vision.attn.q_proj", "vision.mlp.c_fc"], lr=1e-2,
                       batch_size=8, loss="ce")
    assert FLoRA.uses_pixels(cfg) and not FLoRA.uses_pixels(settings_for("flora"))
    method = FLoRA(cfg, task)
    state = method.init_state(None, None)
    # r (d_in + d_out) per matrix: q_proj 64 -> 64, c_fc 64 -> 256, in each of 2 vision layers
    assert sum(v.size for v in state.values()) == 2 * 2 * ((64 + 64) + (64 + 256))
    x, y = _pixels()
    new, loss = method.local_train(state, x, y, LocalRound(0))
    assert np.isfinite(loss) and any(not np.array_equal(new[k], state[k]) for k in state)


@pytest.mark.parametrize("towers", ["both", "vision", "text"])
def test_fedavg_full_trains_exactly_its_towers(task, towers):
    """`both` is FLoRA's FedFFT: every CLIP parameter but the (unused) logit scale; `vision` the image encoder
    alone; `text` the text tower alone, on stored features. The rest stays frozen."""
    cfg = settings_for("fedavg_full", towers=towers, lr=1e-3, local_epochs=3, batch_size=8, loss="ce")
    method = FedAvgFull(cfg, task)
    state = method.init_state(None, None)
    clip = dict(load_clip(ModelSpec("tiny"))[0].named_parameters())
    want = {"both": lambda n: True, "vision": lambda n: n.startswith("visual."),
            "text": lambda n: not n.startswith("visual.")}[towers]
    assert set(state) == {n for n in clip if want(n) and n != "logit_scale"}
    assert all(np.array_equal(state[n], clip[n].detach().numpy()) for n in state)  # starts at the pretrained
    assert FedAvgFull.uses_pixels(cfg) == (towers != "text")
    frozen = {n: p.clone() for n, p in method.model.named_parameters() if n not in state}
    if towers == "text":
        x = torch.nn.functional.normalize(torch.randn(24, 64), dim=-1)
        y = torch.arange(24) % 3
    else:
        x, y = _pixels()
    new, loss = method.local_train(state, x, y, LocalRound(0))
    assert all(torch.equal(p, frozen[n]) for n, p in method.model.named_parameters() if n in frozen)
    assert all(not np.array_equal(new[n], state[n]) for n in state if n.endswith("weight") and "ln" not in n)
    _, second = method.local_train(new, x, y, LocalRound(1))
    assert second < loss
