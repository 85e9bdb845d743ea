"""Multi-head attention with its four projections as separate `nn.Linear` modules.

`torch.nn.MultiheadAttention` keeps q, k and v in one fused `in_proj_weight` and calls its `out_proj` weight
directly rather than through the module, so LoRA cannot adapt one of them on its own. `unfuse_attention`
swaps each such layer for this module: the same weights and the same outputs, with `q_proj`, `k_proj`,
`v_proj` and `out_proj` that PEFT can target individually (FLoRA adapts only `out_proj`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or not mha.batch_first:
            raise ValueError("only self-attention with batch_first=True and one embedding size is supported")
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.dropout = mha.dropout
        bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, L, d_h)

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None, key_padding_mask=None,
                **_) -> tuple[torch.Tensor, None]:
        """The `nn.MultiheadAttention(batch_first=True)` call signature; attention weights are not returned."""
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not supported")
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention: True = masked out; SDPA: True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def unfuse_attention(module: nn.Module) -> int:
    """Replace every `nn.MultiheadAttention` inside `module` by an equivalent `LinearAttention`, in place;
    returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, LinearAttention(child))
            count += 1
        else:
            count += unfuse_attention(child)
    return count
