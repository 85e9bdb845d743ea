"""Linear probe, federated (FLoRA's FedLC baseline; dphuongn/FLoRA, system/flcore/clients/clientlc.py and
trainmodel/clip_model.py): a linear layer with bias on the frozen, L2-normalised image features,

    logits = normalise(f) @ W.T + b          (no logit scale, as in the reference)

initialised from the zero-shot text classifier (W = the class text embeddings, b = 0), trained with
cross-entropy and averaged by sample count. The reference's optimiser: Adam 5e-5, betas (0.9, 0.98), eps 1e-6,
coupled weight decay 0.2, built once per client and kept across rounds; batch 128, one local epoch, no
schedule. Only W and b travel: N (D + 1) floats. (The reference's `-uw` switch sums the heads instead of
averaging them; that is not reproduced.)
"""

from __future__ import annotations

import numpy as np

from raycache.lazy import lazy_module
from raycache.methods.base import Method, State
from raycache.methods.settings import TrainSettings, reference

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")

LinearProbeSettings = reference(TrainSettings, "LinearProbeSettings", "A linear head on frozen image features.",
                                lr=5e-5, optimizer="adam", betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
                                local_epochs=1, batch_size=128, schedule="constant", persist_optimizer=True)


class LinearProbe(Method):
    name = "linear_probe"
    Settings = LinearProbeSettings

    def init_state(self, server_features: np.ndarray, server_labels: np.ndarray) -> State:
        weight = np.array(self.task.text_weights, dtype=np.float32)  # (N, D): the zero-shot classifier
        return {"weight": weight, "bias": np.zeros(len(weight), np.float32)}

    def _head(self, features: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=-1), p["weight"], p["bias"])  # (B, N)

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        return self._head(features, {k: torch.as_tensor(v, device=self.device) for k, v in state.items()})

    def trainables(self, state: State) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, device=self.device, requires_grad=True) for k, v in state.items()}

    def batch_loss(self, params, features, labels) -> torch.Tensor:
        return F.cross_entropy(self._head(features, params), labels)
