"""FedCLIP (arXiv 2302.13485): an attention adapter on frozen CLIP image features, trained by clients and
averaged by the server. Only the adapter, 2(D^2 + D) parameters, travels.

    a  = softmax(W2 tanh(W1 f + b1) + b2)      (B, D) attention over feature dimensions
    f' = normalise(a * f)                      adapted feature
    logits = 100 f' @ W_text.T
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from raycache.methods.base import Method, State, adam, local_steps, remember


def adapt(features: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, D) raw image features -> (B, D) adapted unit features. As in the reference, the adapter reads the
    raw `encode_image` output and only its product with the features is normalised."""
    hidden = torch.tanh(F.linear(features, p["fc1.weight"], p["fc1.bias"]))  # (B, D)
    attention = torch.softmax(F.linear(hidden, p["fc2.weight"], p["fc2.bias"]), dim=-1)  # (B, D)
    return F.normalize(attention * features, dim=-1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Symmetric CLIP loss between each image and its own class prompt's text feature (the reference)."""
    logits = scale * image @ text.T  # (B, B)
    target = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class FedCLIP(Method):
    name = "fedclip"
    # The reference code's optimiser, re-created every round; batch 32; one local epoch; adapters averaged
    # uniformly over clients (PersonalizedFL fedclip: the server's client weights are 1 / clients).
    defaults = {"lr": 5e-5, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2, "local_epochs": 1,
                "batch_size": 32, "schedule": "constant", "loss": "contrastive", "persist_optimizer": False}
    weighting = "uniform"

    def init_state(self, server_features: np.ndarray, server_labels: np.ndarray) -> State:
        d = self.task.dim
        gen = torch.Generator().manual_seed(0)  # nn.Linear's init, drawn from a fixed stream
        bound = 1.0 / math.sqrt(d)

        def uniform(*shape):
            return ((torch.rand(*shape, generator=gen) * 2 - 1) * bound).numpy()

        return {"fc1.weight": uniform(d, d), "fc1.bias": uniform(d), "fc2.weight": uniform(d, d),
                "fc2.bias": uniform(d)}

    def _params(self, state: State, trainable: bool) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, device=self.device, requires_grad=trainable) for k, v in state.items()}

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * adapt(features, self._params(state, False)) @ self.text_weights.T  # (B, N)

    def local_train(self, state: State, features: torch.Tensor, labels: torch.Tensor, seed: int,
                    memory: dict | None = None, round_idx: int = 1) -> tuple[State, float]:
        cfg = self.cfg
        params = self._params(state, True)
        opt = adam(params, cfg, memory)
        loss_sum = 0.0
        for batch, rate in local_steps(len(labels), cfg.batch_size, cfg.local_epochs, seed, cfg.lr, cfg.schedule,
                                       round_idx, self.task.rounds):
            opt.param_groups[0]["lr"] = rate
            f, y = (features, labels) if batch is None else (features[batch], labels[batch])
            image = adapt(f, params)  # (b, D)
            if cfg.loss == "contrastive":
                loss = contrastive_loss(image, self.text_weights[y])
            else:
                loss = F.cross_entropy(100.0 * image @ self.text_weights.T, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
        remember(opt, params, cfg, memory)
        return {k: v.detach().cpu().numpy() for k, v in params.items()}, loss_sum / (len(labels) * cfg.local_epochs)
