"""PromptFL (federated CoOp): the context vectors stand in the prompt's token embeddings and the frozen text
tower encodes them as open_clip encodes tokens; only the context trains and travels."""

import numpy as np
import pytest
import torch

from raycache.config import settings_for
from raycache.errors import UserError
from raycache.methods.base import Task
from raycache.methods.promptfl import PromptFL, encode_embedded
from raycache.methods.training import LocalRound
from raycache.models.clip import ModelSpec, load_clip
from raycache.models.text import text_classifier

NAMES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def tiny():
    model, _, tokenizer = load_clip(ModelSpec("tiny"))
    task = Task(NAMES, text_classifier(model, tokenizer, NAMES, ["a photo of a {}."]), ModelSpec("tiny"))
    return model, tokenizer, task


def test_encoding_embeddings_is_open_clips_encode_text(tiny):
    """With the placeholders' own embeddings as the context, the prompts encode exactly as open_clip
    encodes their tokens: the forward pass the context trains through is CLIP's text tower."""
    model, tokenizer, task = tiny
    m = PromptFL(settings_for("promptfl", n_ctx=4), task)
    x_embedding = m.model.token_embedding(tokenizer(["X"])[:, 1])  # the placeholder's embedding, (1, width)
    ctx = x_embedding.expand(4, -1)
    with torch.no_grad():
        got = m._text(ctx)
        tokens = tokenizer([f"X X X X {n}." for n in NAMES])
        want = torch.nn.functional.normalize(m.model.encode_text(tokens).float(), dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        emb = m.model.token_embedding(tokens)
        torch.testing.assert_close(encode_embedded(m.model, emb, tokens), m.model.encode_text(tokens))


def test_only_the_context_trains_and_the_loss_falls(tiny):
    model, _, task = tiny
    m = PromptFL(settings_for("promptfl", lr=0.5, local_epochs=10, warmup_epochs=0, schedule="constant"), task)
    state = m.init_state(None, None)
    width = model.token_embedding.weight.shape[1]
    assert set(state) == {"ctx"} and state["ctx"].shape == (16, width)  # M x width floats travel
    assert abs(state["ctx"].std() - 0.02) < 0.005  # CoOp's N(0, 0.02^2)
    rng = np.random.default_rng(0)
    y = torch.from_numpy(np.repeat(np.arange(3), 8))
    feats = torch.from_numpy((rng.normal(size=(24, task.dim)) + 3 * rng.normal(size=(3, task.dim))[y.numpy()]
                              ).astype(np.float32))
    before = torch.nn.functional.cross_entropy(m.logits(state, feats), y).item()
    frozen = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    new, _ = m.local_train(state, feats, y, LocalRound(0))
    assert torch.nn.functional.cross_entropy(m.logits(new, feats), y).item() < before
    assert all(torch.equal(p, frozen[n]) for n, p in m.model.named_parameters())  # CLIP never moves


def test_a_context_longer_than_the_models_is_refused(tiny):
    model, _, _ = tiny
    with pytest.raises(UserError, match="method.n_ctx: 40 context tokens"):
        PromptFL.check(settings_for("promptfl", n_ctx=40), model, ModelSpec("tiny"))
