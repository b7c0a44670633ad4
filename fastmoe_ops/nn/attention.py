"""fmo.nn.FusedAttention: multi-head (GQA/MQA) self-attention on fmo.flash_attn, a drop-in
for the attention of a transformer block.

x: [B, S, hidden] -> [B, S, hidden]. Projections: q [hidden -> Hq D], k/v [hidden -> Hkv D],
out [Hq D -> hidden]; the attention runs in the projections' dtype, bf16 or fp16.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import flash_attn
from ..errors import expect


class FusedAttention(nn.Module):
    """Self-attention block: out_proj(flash_attn(q_proj(x), k_proj(x), v_proj(x))).

    num_heads query heads, num_kv_heads key/value heads (num_heads % num_kv_heads == 0;
    default num_heads), head_dim in {64, 128} (default hidden // num_heads)."""

    def __init__(self, hidden: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 causal: bool = True, softmax_scale: float | None = None, bias: bool = False, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden // num_heads if head_dim is None else head_dim
        expect(num_heads > 0 and num_kv_heads > 0 and num_heads % num_kv_heads == 0, "num_kv_heads",
               f"a positive divisor of num_heads ({num_heads})", num_kv_heads)
        expect(head_dim in (64, 128), "head_dim", "64 or 128", head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.softmax_scale = causal, softmax_scale
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, hidden]
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)        # [B, S, Hq, D]
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)     # [B, S, Hkv, D]
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        o = flash_attn(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale)
        return self.out_proj(o.reshape(b, s, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}")
