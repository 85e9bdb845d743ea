"""Methods that train parameters inside CLIP itself (LoRA adapters, or the whole image encoder).

Each host builds one copy of the encoder (never one per client) and loads the broadcast parameters into it
before training or predicting. Inputs are images when the image tower trains (`uses_pixels`), otherwise the
stored image features, which a frozen image tower would reproduce exactly. If the text tower trains, the
class text embeddings are recomputed through it at every step.

The model stays in eval mode: batch-norm statistics stay frozen and dropout off, so what a client trains
is exactly the parameters it sends.
"""

from __future__ import annotations

from abc import abstractmethod

from raycache.lazy import lazy_module
from raycache.methods.base import Method, State
from raycache.methods.settings import LossSettings, reference
from raycache.methods.training import image_text_loss

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")

# FLoRA's (and FedCLIP's) reference optimiser: Adam 5e-5, betas (0.9, 0.98), eps 1e-6, wd 0.2; batch 128;
# FLoRA builds each client's optimiser once and keeps it across rounds
EncoderSettings = reference(LossSettings, "EncoderSettings", "A method that trains parameters inside CLIP.",
                            lr=5e-5, optimizer="adam", betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
                            local_epochs=1, batch_size=128, schedule="constant", loss="contrastive",
                            persist_optimizer=True)


class EncoderMethod(Method):
    eval_batch = 256
    Settings = EncoderSettings

    def __init__(self, cfg, task) -> None:
        super().__init__(cfg, task)
        if task.spec is None:
            raise ValueError(f"{self.name} needs the task's model spec")
        self._model = None
        self.trainable: dict[str, torch.nn.Parameter] = {}

    @abstractmethod
    def build(self):
        """(model with exactly the trainable parameters requiring grad, tokenizer)."""

    @property
    def trains_text(self) -> bool:
        return any(not n.startswith("visual.") for n in self.trainable)

    @property
    def model(self):
        if self._model is None:
            model, tokenizer = self.build()
            self._model = model.to(self.device).eval()
            self.trainable = {n: p for n, p in self._model.named_parameters() if p.requires_grad}
            self.tokens = None
            if self.trains_text:
                from raycache.models.text import prompt_tokens

                self.tokens = prompt_tokens(tokenizer, self.task.class_names, self.task.templates).to(self.device)
        return self._model

    def to(self, device) -> "EncoderMethod":
        """Move to `device` and build the model now (a host pays the load at start-up, not in round 1)."""
        super().to(device)
        if self._model is not None:
            self._model.to(self.device)
        self.model  # noqa: B018
        return self

    def init_state(self, server_features, server_labels) -> State:
        self.model  # noqa: B018 (builds it)
        return {n: p.detach().cpu().numpy().copy() for n, p in self.trainable.items()}

    def _load(self, state: State) -> None:
        self.model  # noqa: B018
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(torch.from_numpy(state[n]))

    def _image(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() == 2:  # stored (raw) features: the image tower is frozen
            return F.normalize(inputs, dim=-1)
        return F.normalize(self.model.encode_image(inputs).float(), dim=-1)

    def _text(self) -> torch.Tensor:
        if not self.trains_text:
            return self.text_weights
        from raycache.models.text import class_embeddings

        return class_embeddings(self.model, self.tokens, self.task.n_classes)

    def logits(self, state: State, inputs: torch.Tensor) -> torch.Tensor:
        self._load(state)
        with torch.no_grad():
            return 100.0 * self._image(inputs) @ self._text().T

    def trainables(self, state: State) -> dict[str, torch.Tensor]:
        self._load(state)  # the global weights copied in place, as FLoRA's clients do
        return self.trainable

    def batch_loss(self, params, inputs, labels) -> torch.Tensor:
        return image_text_loss(self.cfg.loss, self._image(inputs), self._text(), labels)
