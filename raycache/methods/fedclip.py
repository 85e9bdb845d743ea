"""FedCLIP (arXiv 2302.13485): an attention adapter on frozen CLIP image features, trained by clients and
averaged by the server. Only the adapter, 2(D^2 + D) parameters, travels.

    a  = softmax(W2 tanh(W1 f + b1) + b2)      (B, D) attention over feature dimensions
    f' = normalise(a * f)                      adapted feature
    logits = 100 f' @ W_text.T
"""

from __future__ import annotations

import math

import numpy as np

from raycache.lazy import lazy_module
from raycache.methods.base import Method, State
from raycache.methods.settings import LossSettings, reference
from raycache.methods.training import image_text_loss

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")


def adapt(features: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, D) raw image features -> (B, D) adapted unit features. As in the reference, the adapter reads the
    raw `encode_image` output and only its product with the features is normalised."""
    hidden = torch.tanh(F.linear(features, p["fc1.weight"], p["fc1.bias"]))  # (B, D)
    attention = torch.softmax(F.linear(hidden, p["fc2.weight"], p["fc2.bias"]), dim=-1)  # (B, D)
    return F.normalize(attention * features, dim=-1)


# The reference code's optimiser (Adam 5e-5, betas (0.9, 0.98), eps 1e-6, wd 0.2), re-created every round;
# batch 32; one local epoch; symmetric contrastive loss.
FedCLIPSettings = reference(LossSettings, "FedCLIPSettings", "FedCLIP: an attention adapter, federated.",
                            lr=5e-5, optimizer="adam", betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
                            local_epochs=1, batch_size=32, schedule="constant", loss="contrastive",
                            persist_optimizer=False)


class FedCLIP(Method):
    name = "fedclip"
    Settings = FedCLIPSettings
    weighting = "uniform"  # PersonalizedFL fedclip: the server's client weights are 1 / clients

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

    def trainables(self, state: State) -> dict[str, torch.Tensor]:
        return self._params(state, True)

    def batch_loss(self, params, features, labels) -> torch.Tensor:
        return image_text_loss(self.cfg.loss, adapt(features, params), self.text_weights, labels)
