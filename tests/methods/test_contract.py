"""Every registered method through the same contract, on the real runtime (Ray actors, FedAvg, offline):
2 clients, 2 rounds. State keys and shapes stay stable, metrics stay finite, the trainable state matches
each paper's formula, and what travels is exactly that state (or nothing, for local and centralised)."""

import json

import numpy as np
import pytest
import torch

from raycache.config_file import load_config
from raycache.federation.runtime import Federation
from raycache.methods import METHODS, method_class, with_defaults
from raycache.methods.base import Task
from raycache.models.clip import PRESETS_DIR, ModelSpec, load_clip
from raycache.models.text import text_classifier

N, K, CLIENTS = 3, 2, 2
TINY = json.loads((PRESETS_DIR / "raycache-tiny.json").read_text())
D = TINY["embed_dim"]
TEXT_LAYERS, TEXT_WIDTH = TINY["text_cfg"]["layers"], TINY["text_cfg"]["width"]
R = 2  # the default method.lora_rank


def clip_params() -> int:
    """Every parameter of both towers (CLIP's logit scale is not trained: methods classify at scale 100)."""
    model, _, _ = load_clip(ModelSpec("tiny"))
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("logit_"))


STATE_FLOATS = {  # the state each client trains, from each paper; federated methods send exactly this
    "zeroshot": lambda: 0,
    "cachefl": lambda: N * K * D,  # the cache keys: N*K x D
    "tip_adapter": lambda: N * K * D,
    "centralised_cache": lambda: N * K * D,
    "local_only": lambda: N * K * D,  # a cache of its own (method.local_model: cache)
    "fedclip": lambda: 2 * (D * D + D),  # the attention adapter: two D x D layers with biases
    # LoRA on the text attention output projection of every layer: r (d_in + d_out) per adapted matrix
    "flora": lambda: TEXT_LAYERS * R * (TEXT_WIDTH + TEXT_WIDTH),
    "fedavg_full": clip_params,  # the whole CLIP, both towers (FLoRA's FedFFT)
}


def test_every_method_has_a_state_formula():
    assert set(STATE_FLOATS) == set(METHODS)


def _data(pixels: bool, n: int, rng):
    labels = np.repeat(np.arange(N), n // N)
    if pixels:
        x = (rng.normal(size=(len(labels), 3, 32, 32)) + labels[:, None, None, None]).astype(np.float32)
    else:
        x = rng.normal(size=(len(labels), D)).astype(np.float32) + 2 * np.eye(N, D, dtype=np.float32)[labels]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, ray_session):
    cfg = load_config(None, [f"method.name={name}", f"method.shots={K}", f"data.clients={CLIENTS}",
                             "runtime.client_actors=1", "method.cache_init=real"])
    method = method_class(name)
    model, _, tokenizer = load_clip(ModelSpec("tiny"))
    names = list("abc")
    task = Task(names, text_classifier(model, tokenizer, names, ["a photo of a {}."]), ModelSpec("tiny"))
    rng = np.random.default_rng(0)
    pixels = method.uses_pixels(cfg.method)
    train, test = _data(pixels, 30, rng), _data(pixels, 12, rng)
    server = _data(False, N * K, rng)
    parts = [np.arange(0, 30, 2), np.arange(1, 30, 2)]
    counts = np.stack([np.bincount(train[1][p], minlength=N) for p in parts])
    parts = method.trainer_rows(parts, train[1], N, with_defaults(cfg.method), 0)
    from raycache.federation.evaluate import EvalSets

    owner = np.array([0, 0, 1, 1, 1])  # each client's own held-out rows (here: copies of training rows)
    evals = EvalSets(test, (test[0][:6], test[1][:6]), (train[0][:5], train[1][:5], owner))
    with Federation(cfg, task, train, parts, evals, server, counts, audit=True) as fed:
        state0 = fed.state()
        shapes = {k: v.shape for k, v in state0.items()}
        floats = STATE_FLOATS[name]()
        assert sum(v.size for v in state0.values()) == floats
        for r in (1, 2):
            m = fed.run_round(r)
            assert all(np.isfinite(v) for v in m.values()), m
            assert {"val_accuracy", "local_accuracy_mean", "local_accuracy_std"} <= set(m)
            assert m["trainable_params"] == floats
            sent = {"federated": CLIENTS * 4 * floats}.get(method.role, 0)
            assert m["comm_bytes_up"] == sent
            assert m["comm_bytes_down"] == {"federated": sent, "local": CLIENTS * 4 * floats if r == 1 else 0
                                            }.get(method.role, 0)
            assert m["client_seconds"] > 0 and m["peak_memory_mb"] > 0
            # The privacy invariant: every message a client sent this round is exactly the method's trainable
            # state (same keys, shapes, float32) plus its sample count; nothing else leaves a client.
            messages = fed.audit_log()
            if method.role == "federated":
                assert sorted(msg["client"] for msg in messages) == list(range(CLIENTS))
                for msg in messages:
                    assert msg["fields"] == ["update", "weight"] and msg["keys"] == sorted(shapes)
                    assert msg["shapes"] == {k: list(v) for k, v in shapes.items()}
                    assert set(msg["dtypes"].values()) <= {"float32"}
                    uniform = method.weighting == "uniform"  # FedCLIP's reference: 1 / clients
                    assert msg["weight"] == (1.0 if uniform else len(parts[msg["client"]]))
                assert sum(msg["nbytes"] for msg in messages) == m["comm_bytes_up"]
            else:
                assert messages == []  # local and centralised: nothing is uploaded
            state = fed.state()
            assert {k: v.shape for k, v in state.items()} == shapes
            assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["client_accuracy_mean"] <= 1


def test_local_steps_cover_each_sample_once_per_epoch_and_anneal():
    from raycache.methods.base import local_steps

    steps = list(local_steps(10, 4, 2, seed=0, lr=1.0, schedule="cosine"))
    assert len(steps) == 6 and steps[0][1] == 1.0 and steps[-1][1] < steps[1][1] < 1.0
    for epoch in (steps[:3], steps[3:]):
        assert sorted(torch.cat([b for b, _ in epoch]).tolist()) == list(range(10))
    assert [b for b, _ in local_steps(3, 8, 2, 0, 0.1, "constant")] == [None, None]  # full batch, no shuffle
    again = list(local_steps(10, 4, 2, seed=0, lr=1.0, schedule="cosine"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(steps, again))
