"""The MoE layer written the obvious way, in float64: the oracle of fmo.nn.MoELayer.

Every token goes through each of its top-k experts one at a time, with the routing given
(the experts the layer chose), so a near-tie in the router cannot make the oracle pick a
different expert; the routing weights are recomputed here in float64 from the router's
logits at those experts, so their gradient flows into the router weight and x.

    out[t] = sum_j w[t, j] * W2[e] (silu(W13[e, :I] x_t) * (W13[e, I:] x_t)),  e = topk_idx[t, j]
    w[t, :] = score(logits[t])[topk_idx[t]]  (/ their sum when normalised) * route_scale
"""
from __future__ import annotations

import torch


def router_weights(x: torch.Tensor, router_weight: torch.Tensor, topk_idx: torch.Tensor, *, scoring: str,
                   normalize: bool, route_scale: float) -> torch.Tensor:
    """[T, k] weights at the given experts (-1 slots get 0), differentiable, in x's dtype."""
    logits = x @ router_weight.t()                                         # [T, E]
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    w = torch.where(topk_idx >= 0, scores.gather(1, topk_idx.clamp(min=0)), 0.0)
    if normalize:
        w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    return w * route_scale


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [n, H] through one expert: w13 [2I, H], w2 [H, I] -> [n, H]."""
    inter = w2.shape[1]
    h = x @ w13.t()
    return (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2.t()


def moe_layer(x: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_idx: torch.Tensor, *,
              scoring: str = "softmax", normalize: bool = False, route_scale: float = 1.0) -> torch.Tensor:
    """x [T, H], router_weight [E, H], w13 [E, 2I, H], w2 [E, H, I], topk_idx [T, k] int64 in
    [-1, E) -> out [T, H], in float64 (the inputs are promoted). Differentiable in all four tensors."""
    x, router_weight, w13, w2 = (t.double() for t in (x, router_weight, w13, w2))
    w = router_weights(x, router_weight, topk_idx, scoring=scoring, normalize=normalize, route_scale=route_scale)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)
        if tok.numel():
            out = out.index_add(0, tok, w[tok, slot, None] * expert_mlp(x[tok], w13[e], w2[e]))
    return out
