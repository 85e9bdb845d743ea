"""Unfused attention is the same function; LoRA targets resolve per tower and bad ones list the choices."""

import pytest
import torch
from torch import nn

from raycache.errors import UserError
from raycache.models.attention import LinearAttention, unfuse_attention
from raycache.models.clip import ModelSpec, load_clip
from raycache.models.lora import add_lora, lora_choices, resolve_targets


def test_unfused_attention_computes_what_multihead_attention_does():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    ours = LinearAttention(mha)
    for mask in (None, causal, causal.isinf()):  # none, additive float and boolean masks
        want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        torch.testing.assert_close(ours(x, x, x, attn_mask=mask)[0], want, rtol=1e-5, atol=1e-6)


def test_unfusing_a_clip_model_keeps_both_towers_outputs():
    model, _, tokenizer = load_clip(ModelSpec("tiny"))
    images, tokens = torch.randn(3, 3, 32, 32), tokenizer(["a photo of a cat.", "a dog"])
    before = model.encode_image(images), model.encode_text(tokens)
    assert unfuse_attention(model) == 4  # 2 vision + 2 text layers
    torch.testing.assert_close(model.encode_image(images), before[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_text(tokens), before[1], rtol=1e-5, atol=1e-5)


def test_targets_name_each_tower_across_layers():
    model, _, _ = load_clip(ModelSpec("tiny"))
    unfuse_attention(model)
    choices = lora_choices(model)
    assert choices["text.attn.out_proj"] == ["transformer.resblocks.0.attn.out_proj",
                                            "transformer.resblocks.1.attn.out_proj"]
    assert choices["vision.attn.q_proj"] == ["visual.transformer.resblocks.0.attn.q_proj",
                                            "visual.transformer.resblocks.1.attn.q_proj"]
    with pytest.raises(UserError, match=r"^method.lora_targets: tiny has no module 'text.attn.qkv'; choose "
                                        r"from: .*text.attn.out_proj.*vision.mlp.c_fc"):
        resolve_targets(model, ["text.attn.qkv"], "tiny")


def test_a_text_target_on_a_model_without_a_text_tower_is_refused():
    model, _, _ = load_clip(ModelSpec("tiny"))
    vision_only = nn.Module()
    vision_only.visual = model.visual
    unfuse_attention(vision_only)
    with pytest.raises(UserError, match="needs a text tower, but model vis has none; choose from: vision."):
        resolve_targets(vision_only, ["text.attn.out_proj"], "vis")


@pytest.mark.parametrize("scaling,rank", [("reference", 2), ("reference", 4), ("peft", 2), ("peft", 4)])
def test_lora_adapts_only_its_targets_with_its_scale(scaling, rank):
    """y = W x + s B A x with s = alpha whatever the rank (FLoRA's code: lora.py's `self.alpha` multiplies
    the update, no division by r) or s = alpha / r (PEFT, the LoRA paper)."""
    alpha = 32.0
    model, _, tokenizer = load_clip(ModelSpec("tiny"))
    tokens = tokenizer(["a photo of a cat."])
    base_text = model.encode_text(tokens)
    torch.manual_seed(0)
    names = add_lora(model, ["text.attn.out_proj"], rank=rank, alpha=alpha, model_name="tiny", scaling=scaling)
    assert names == [f"transformer.resblocks.{i}.attn.out_proj.lora_{m}.default.weight"
                     for i in (0, 1) for m in "AB"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
    torch.testing.assert_close(model.encode_text(tokens), base_text, rtol=1e-5, atol=1e-5)  # B = 0 at init
    layer = model.transformer.resblocks[0].attn.out_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, d_in), (d_out, r)
    assert a.shape == (rank, 64) and b.shape == (64, rank)
    scale = alpha if scaling == "reference" else alpha / rank
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + scale * x @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_lora_a_is_drawn_with_the_references_std():
    """FLoRA's reference draws A ~ N(0, 1/sqrt(r)) (PEFT's `gaussian` would give 1/r) and B = 0."""
    model, _, _ = load_clip(ModelSpec("effnet-lite0"))  # 64-wide text tower: 2 layers x (r x 64) A entries
    torch.manual_seed(0)
    rank = 16
    add_lora(model, ["text.attn.out_proj", "text.attn.q_proj", "text.attn.k_proj", "text.attn.v_proj"], rank=rank,
             alpha=32.0, model_name="effnet-lite0")
    a = torch.cat([p.flatten() for n, p in model.named_parameters() if ".lora_A." in n])
    b = torch.cat([p.flatten() for n, p in model.named_parameters() if ".lora_B." in n])
    assert len(a) == 8 * rank * 64 and not b.any()
    assert abs(a.std().item() - rank ** -0.5) < 0.02 and abs(a.mean().item()) < 0.02  # 0.25, not 1/r = 0.0625
