"""Every registered method through the same contract, on the real runtime (Ray actors, FedAvg, offline):
2 clients, 2 rounds. State keys and shapes stay stable, metrics stay finite, the trainable state matches
each paper's formula, and what travels is exactly that state (or nothing, for local and centralised)."""

import json

import numpy as np
import pytest
import torch

from raycache.config_file import load_config
from raycache.federation.runtime import Federation
from raycache.methods import method_class, method_names
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


STATE_FLOATS = {  # the state each client trains, from each paper (a later method's own tests state its own)
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


def _data(pixels: bool, n: int, rng):
    labels = np.repeat(np.arange(N), n // N)
    if pixels:
        x = (rng.normal(size=(len(labels), 3, 32, 32)) + labels[:, None, None, None]).astype(np.float32)
    else:
        x = rng.normal(size=(len(labels), D)).astype(np.float32) + 2 * np.eye(N, D, dtype=np.float32)[labels]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def check_contract(name: str, warm: bool = False) -> None:
    """The contract every registered method keeps on the real runtime (a Ray session must be up). `warm`: take
    the server and host from this process's pool and give them back after (as a sweep's trials do)."""
    method = method_class(name)
    fields = method.Settings.model_fields
    cache = [f"method.shots={K}", "method.cache_init=real"] if "cache_init" in fields else []
    cfg = load_config(None, [f"method.name={name}", f"data.clients={CLIENTS}", "runtime.client_actors=1", *cache])
    model, _, tokenizer = load_clip(ModelSpec("tiny"))
    names = list("abc")
    task = Task(names, text_classifier(model, tokenizer, names, ["a photo of a {}."]), ModelSpec("tiny"))
    rng = np.random.default_rng(0)
    pixels = method.uses_pixels(cfg.method)
    train, test = _data(pixels, 30, rng), _data(pixels, 12, rng)
    server = _data(False, N * K, rng)
    parts = [np.arange(0, 30, 2), np.arange(1, 30, 2)]
    counts = np.stack([np.bincount(train[1][p], minlength=N) for p in parts])
    parts = method.flow.trainer_rows(parts, train[1], N, cfg.method, 0)
    from raycache.federation.evaluate import EvalSets

    owner = np.array([0, 0, 1, 1, 1])  # each client's own held-out rows (here: copies of training rows)
    evals = EvalSets(test, (test[0][:6], test[1][:6]), (train[0][:5], train[1][:5], owner))
    flow = method.flow.name
    with Federation(cfg, task, train, parts, evals, server, counts, audit=True, warm=warm) as fed:
        state0 = fed.state()
        shapes = {k: v.shape for k, v in state0.items()}
        floats = sum(v.size for v in state0.values())
        if name in STATE_FLOATS:  # a built-in method: the state is what its paper trains
            assert floats == STATE_FLOATS[name]()
        for r in (1, 2):
            m = fed.run_round(r)
            assert all(np.isfinite(v) for v in m.values()), m
            assert {"val_accuracy", "local_accuracy_mean", "local_accuracy_std"} <= set(m)
            assert m["trainable_params"] == floats
            sent = {"federated": CLIENTS * 4 * floats}.get(flow, 0)
            assert m["comm_bytes_up"] == sent
            assert m["comm_bytes_down"] == {"federated": sent, "personal": CLIENTS * 4 * floats if r == 1 else 0
                                            }.get(flow, 0)
            assert m["client_seconds"] > 0 and m["peak_memory_mb"] > 0
            # The privacy invariant: every message a client sent this round carries only the declared fields;
            # an update is exactly the method's trainable state (same keys, shapes, float32).
            messages = fed.audit_log()
            if flow == "pooled":
                assert messages == []  # one trainer on pooled data: no client sends anything
                continue
            assert sorted(msg["client"] for msg in messages) == list(range(CLIENTS))
            for msg in messages:
                assert msg["samples"] == len(parts[msg["client"]]) and np.isfinite(msg["loss"])
                if flow == "personal":
                    assert msg["fields"] == ["client", "samples", "loss", "seconds"] and msg["nbytes"] is None
                    continue
                assert msg["fields"] == ["client", "samples", "loss", "seconds", "weight", "update"]
                assert msg["keys"] == sorted(shapes) and msg["shapes"] == {k: list(v) for k, v in shapes.items()}
                assert set(msg["dtypes"].values()) <= {"float32"}
                uniform = method.weighting == "uniform"  # FedCLIP's reference: 1 / clients
                assert msg["weight"] == (1.0 if uniform else len(parts[msg["client"]]))
            assert sum(msg["nbytes"] or 0 for msg in messages) == m["comm_bytes_up"]
            state = fed.state()
            assert {k: v.shape for k, v in state.items()} == shapes
            assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["client_accuracy_mean"] <= 1
        # The server holds the global state once: read-only views of the copy the broadcast put in the object
        # store (a full model's state is not kept a second time in the server's own memory).
        import ray

        held = ray.get(fed.server.__ray_call__.remote(
            lambda s: [(v.flags.writeable, v.flags.owndata) for v in s.state.values()]))
        assert not any(writeable or own for writeable, own in held), held
        snap = fed.snapshot()  # what a checkpoint holds, for every method (zero-shot's once failed here)
        assert {k: v.shape for k, v in snap["state"].items()} == shapes


@pytest.fixture(scope="module")
def warm_pool(ray_session):
    """The methods take turns on one server and one host actor, re-initialised for each (a warm federation
    computes what a cold one does: tests/federation/test_warm.py); killed when the module ends."""
    from raycache.federation.runtime import WARM

    yield
    WARM.clear()


@pytest.mark.parametrize("name", method_names())
def test_method_contract(name, warm_pool):
    check_contract(name, warm=True)


def test_local_steps_cover_each_sample_once_per_epoch():
    from raycache.methods.training import local_steps

    steps = list(local_steps(10, 4, 2, seed=0))
    assert len(steps) == 6
    for epoch in (steps[:3], steps[3:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert list(local_steps(3, 8, 2, 0)) == [None, None]  # full batch, no shuffle
    again = list(local_steps(10, 4, 2, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(steps, again))
