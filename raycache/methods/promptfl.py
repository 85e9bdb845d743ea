"""PromptFL (Guo et al. 2023): federated CoOp (Zhou et al. 2022). M learnable context vectors, shared by all
classes, stand in front of each class name, "[ctx_1] ... [ctx_M] [CLASS].", and the frozen text tower turns
the prompts into class embeddings; logits are 100 * normalise(f) @ normalise(t).T with cross-entropy. Only
the context travels: M x width floats (the text tower's token-embedding width).

Matched with the reference (KaiyangZhou/CoOp trainers/coop.py, PEILab-Federated-Learning/PromptFL):
M = 16, the class token at the end, the context drawn from N(0, 0.02^2), the prompt's "X" placeholders
replaced in the token embedding, the text feature taken at the end-of-text token and projected; SGD lr 0.002,
momentum 0.9, weight decay 5e-4, batch 32; one cosine over the run after one epoch of constant warm-up at
1e-5 (Dassl's ConstantWarmupScheduler); clients averaged uniformly, as PromptFL's `average_weights`.
Differs: the schedule steps per batch, not per epoch; each client keeps its own SGD momentum across rounds
(PromptFL's one shared trainer carries one momentum across all clients); the reference's averaging keeps
only the last client's context (its state-dict copies alias), which is not reproduced.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from raycache.lazy import lazy_module
from raycache.methods.base import Method, State
from raycache.methods.settings import TrainSettings, reference

torch = lazy_module("torch")  # imported at first use: the driver imports this module without it
F = lazy_module("torch.nn.functional")


class _PromptSettings(TrainSettings):
    n_ctx: int = Field(16, ge=1, description="learnable context tokens M in front of each class name")
    ctx_std: float = Field(0.02, gt=0, description="the context's initial N(0, std^2) (CoOp's random init)")


PromptFLSettings = reference(_PromptSettings, "PromptFLSettings", "PromptFL: CoOp's context vectors, federated.",
                             lr=0.002, optimizer="sgd", momentum=0.9, weight_decay=5e-4, batch_size=32,
                             local_epochs=1, schedule="cosine_run", warmup_epochs=1, warmup_lr=1e-5,
                             persist_optimizer=True)


def encode_embedded(model, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text` from token embeddings (B, L, width) instead of token ids; `tokens` (B, L)
    only locate the end-of-text token (the highest id, or the model's eos id)."""
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    x = embeddings.to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


class PromptFL(Method):
    name = "promptfl"
    Settings = PromptFLSettings
    weighting = "uniform"  # PromptFL's average_weights: a plain mean over the clients

    @classmethod
    def check(cls, settings, model, spec) -> None:
        from raycache.errors import UserError

        missing = [a for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
                   if getattr(model, a, None) is None]
        if missing:
            raise UserError(f"method.name: promptfl learns prompt embeddings of open_clip's built-in text tower; "
                            f"{spec.name}'s text tower has no {missing[0]}")
        context = model.positional_embedding.shape[0]
        if settings.n_ctx + 3 > context:
            raise UserError(f"method.n_ctx: {settings.n_ctx} context tokens and a class name do not fit "
                            f"{spec.name}'s {context}-token context")

    def __init__(self, cfg, task) -> None:
        super().__init__(cfg, task)
        if task.spec is None:
            raise ValueError(f"{self.name} needs the task's model spec")
        self._model = None

    @property
    def model(self):
        """The frozen CLIP and each class's prompt: tokens (N, L) and their embeddings (N, L, width)."""
        if self._model is None:
            from raycache.models.clip import load_clip

            model, _, tokenizer = load_clip(self.task.spec)
            model = model.to(self.device).eval().requires_grad_(False)
            placeholder = " ".join(["X"] * self.cfg.n_ctx)
            self.tokens = tokenizer([f"{placeholder} {name}." for name in self.task.class_names]).to(self.device)
            if (self.tokens[:, -1] != 0).any():  # a prompt filled the context: its class name may be cut
                from raycache.errors import UserError

                raise UserError(f"method.n_ctx: a class name with {self.cfg.n_ctx} context tokens exceeds the "
                                f"model's {self.tokens.shape[1]}-token context")
            with torch.no_grad():
                self.embedded = model.token_embedding(self.tokens)  # (N, L, width): SOS, X..X, name, '.', EOS
            self._model = model
        return self._model

    def to(self, device) -> "PromptFL":
        super().to(device)
        if self._model is not None:
            self._model = None  # rebuilt on the new device when next used
        return self

    def init_state(self, server_features, server_labels) -> State:
        width = self.model.token_embedding.weight.shape[1]
        gen = torch.Generator().manual_seed(0)  # the same initial context in every process
        return {"ctx": (torch.randn(self.cfg.n_ctx, width, generator=gen) * self.cfg.ctx_std).numpy()}

    def _text(self, ctx: torch.Tensor) -> torch.Tensor:
        """(N, D) unit class embeddings of the prompts with context `ctx` (M, width)."""
        model = self.model
        n = len(self.tokens)
        prefix, suffix = self.embedded[:, :1], self.embedded[:, 1 + self.cfg.n_ctx:]
        prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(n, -1, -1).to(prefix.dtype), suffix], dim=1)
        return F.normalize(encode_embedded(model, prompts, self.tokens).float(), dim=-1)

    def logits(self, state: State, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            text = self._text(torch.as_tensor(state["ctx"], device=self.device))
        return 100.0 * F.normalize(features, dim=-1) @ text.T

    def trainables(self, state: State) -> dict[str, torch.Tensor]:
        return {"ctx": torch.tensor(state["ctx"], device=self.device, requires_grad=True)}

    def batch_loss(self, params, features, labels) -> torch.Tensor:
        return F.cross_entropy(100.0 * F.normalize(features, dim=-1) @ self._text(params["ctx"]).T, labels)
