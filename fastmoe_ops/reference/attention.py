"""Plain-PyTorch reference of fused attention: the oracle (in float64) and the CPU fallback
engine. Obvious rather than fast: it materialises the [Sq, Sk] score matrix.

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h // G]) v[b, j, h // G]
    lse[b, h, i] = log sum_j exp(scale * q[b, i, h] . k[b, j, h // G])     (natural log)

q: [B, Sq, Hq, Dqk], k: [B, Sk, Hkv, Dqk], v: [B, Sk, Hkv, Dv], G = Hq / Hkv (GQA/MQA).
Causal masks align to the bottom right: query i sees key j iff j <= i + Sk - Sq. A query
row that sees no key gets out = 0 and lse = -inf (never NaN, in value and in gradient).
Varlen packs sequences as [total, H, D] with int32 cu_seqlens [B + 1]; its lse is
[Hq, total_q] (FlashAttention's varlen layout).
"""
from __future__ import annotations

import math

import torch


def visible(sq: int, sk: int, causal: bool, device=None) -> torch.Tensor:
    """[Sq, Sk] bool: query i sees key j (bottom-right aligned causal mask)."""
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None, compute_dtype=None):
    """(out [B, Sq, Hq, Dv], lse [B, Hq, Sq] fp32), differentiable in q, k, v through `out`.

    compute_dtype: the dtype every operation runs in (float64 for the oracle; q's dtype
    for "the same computation done by PyTorch in the same dtype"). out is returned in q's
    dtype unless compute_dtype is float64 (the oracle keeps its precision)."""
    b, sq, hq, dqk = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dqk) if softmax_scale is None else softmax_scale
    cd = compute_dtype or torch.float32
    group = hq // hkv
    qc = q.to(cd)
    kc = k.to(cd).repeat_interleave(group, dim=2)                      # [B, Sk, Hq, Dqk]
    vc = v.to(cd).repeat_interleave(group, dim=2)                      # [B, Sk, Hq, Dv]
    s = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale               # [B, Hq, Sq, Sk]
    mask = visible(sq, sk, causal, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    # Max over visible keys; a row with none has max -inf: subtract 0 instead, so that
    # exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
    m = s.detach().amax(dim=-1, keepdim=True) if sk else s.new_full((b, hq, sq, 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))
    out = torch.einsum("bhij,bjhd->bihd", p, vc)
    with torch.no_grad():
        lse = (torch.log(l.double()) + m.double()).squeeze(-1).float()  # -inf where l == 0
    out_dtype = cd if cd == torch.float64 else q.dtype
    return out.to(out_dtype), lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = False,
                     softmax_scale: float | None = None, compute_dtype=None):
    """Packed sequences: q [total_q, Hq, D], k/v [total_k, Hkv, D] -> (out [total_q, Hq, Dv],
    lse [Hq, total_q]); each sequence attends only within itself."""
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].unsqueeze(0)
        kb = k[ck[b]:ck[b + 1]].unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].unsqueeze(0)
        o, lse = attention(qb, kb, vb, causal=causal, softmax_scale=scale, compute_dtype=compute_dtype)
        outs.append(o[0])
        lses.append(lse[0])
    out_dtype = torch.float64 if compute_dtype == torch.float64 else q.dtype
    out = torch.cat(outs, 0) if outs else q.new_empty(0, q.shape[1], v.shape[-1], dtype=out_dtype)
    lse = torch.cat(lses, 1) if lses else torch.empty(q.shape[1], 0)
    return out.to(out_dtype), lse


def attention_backward(dout, q, k, v, *, causal: bool, softmax_scale: float, compute_dtype=torch.float32,
                       cu_seqlens_q=None, cu_seqlens_k=None):
    """(dq, dk, dv) in the inputs' dtypes: the CPU fallback's backward, written out (it runs
    inside a custom op, below autograd). GQA: dk/dv summed over the query heads sharing a
    key head. Varlen: per sequence."""
    if cu_seqlens_q is not None:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b in range(len(cq) - 1):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            g = attention_backward(dout[qs][None], q[qs][None], k[ks][None], v[ks][None], causal=causal,
                                   softmax_scale=softmax_scale, compute_dtype=compute_dtype)
            dq[qs], dk[ks], dv[ks] = g[0][0], g[1][0], g[2][0]
        return dq, dk, dv
    cd = compute_dtype
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    qc, do = q.to(cd), dout.to(cd)
    kc = k.to(cd).repeat_interleave(group, dim=2)
    vc = v.to(cd).repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qc, kc) * softmax_scale
    s = s.masked_fill(~visible(sq, sk, causal, q.device), float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if sk else s.new_zeros(b, hq, sq, 1)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))                  # [B, Hq, Sq, Sk]
    out = torch.einsum("bhij,bjhd->bihd", p, vc)
    dv = torch.einsum("bhij,bihd->bjhd", p, do)                       # [B, Sk, Hq, D]
    dp = torch.einsum("bihd,bjhd->bhij", do, vc)
    delta = (do * out).sum(-1).transpose(1, 2)[..., None]             # [B, Hq, Sq, 1]
    ds = p * (dp - delta) * softmax_scale
    dq = torch.einsum("bhij,bjhd->bihd", ds, kc)
    dk = torch.einsum("bhij,bihd->bjhd", ds, qc)
    dk = dk.reshape(b, sk, hkv, group, k.shape[-1]).sum(3)
    dv = dv.reshape(b, sk, hkv, group, v.shape[-1]).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def expand_kv_descale(descale: torch.Tensor, sk: int) -> torch.Tensor:
    """A K/V descale as a float64 factor [B, Sk, Hkv, 1]: per (batch, head) [B, Hkv], or per (batch, head,
    block of FP8_SCALE_BLOCK keys) [B, Hkv, ceil(Sk / FP8_SCALE_BLOCK)]."""
    s = descale.double()
    if s.dim() == 3:
        s = s.repeat_interleave(FP8_SCALE_BLOCK, dim=2)[:, :, :sk].transpose(1, 2)  # [B, Sk, Hkv]
    else:
        s = s[:, None, :].expand(-1, sk, -1)
    return s[..., None]


FP8_SCALE_BLOCK = 128  # keys per K / V scale block (the FP8 kernel's key tile)


def attention_fp8(q, k, v, descale_q, descale_k, descale_v, *, causal: bool = False,
                  softmax_scale: float | None = None):
    """The FP8 forward's oracle, in float64: e4m3 q [B, Sq, Hq, D], k / v [B, Sk, Hkv, D] times
    their descales (descale_q [B, Hq]; descale_k / descale_v [B, Hkv] per (batch, head) or
    [B, Hkv, ceil(Sk / 128)] per (batch, head, block of 128 keys)), then `attention` in float64.
    (out float64, lse fp32); softmax_scale defaults to 1/sqrt(D)."""
    qd = q.double() * descale_q.double()[:, None, :, None]
    kd = k.double() * expand_kv_descale(descale_k, k.shape[1])
    vd = v.double() * expand_kv_descale(descale_v, v.shape[1])
    return attention(qd, kd, vd, causal=causal, softmax_scale=softmax_scale, compute_dtype=torch.float64)
