"""FP8 (e4m3) attention forward: validation and kernel selection (issue 16).

    out = fmo.flash_attn(q8, k8, v8, causal=..., descale_q=dq, descale_k=dk, descale_v=dv)

q8: [B, Sq, Hq, D], k8 / v8: [B, Sk, Hkv, D] torch.float8_e4m3fn (D as the bf16 kernel: 64, 128,
or q/k 192 with v 128); descale_q: [B, Hq] fp32; descale_k / descale_v: [B, Hkv] fp32 (per (batch,
head)) or [B, Hkv, ceil(Sk / 128)] (per (batch, head, block of 128 keys)), each independently;
finite and > 0: the real value of q8[b, :, h, :] is its e4m3 value times descale_q[b, h] (likewise
k, v with the KV head, and with key j's block j // 128 where given). out: [B, Sq, Hq, Dv] bf16.

Scales in the kernel: descale_q * descale_k (of the key tile: a tile is one 128-key block) is
folded into the softmax scale per key tile, so a block scale on K costs one multiply per tile;
V's block scale dv_j enters P: the tile's probabilities are multiplied by dv_j / max_j dv_j before
their e4m3 rounding (the row sum l stays the unscaled one), and max_j dv_j is applied in the
epilogue. Per-(batch, head) scales are the one-block case of the same code (FlashAttention-3's
convention).

Kernel: csrc/attention/hopper_fwd_fp8.cuh (launcher ops/attention_hopper_fp8.py) on sm_90a and the
simulator: QGMMA for S = Q K^T and O += P V (P rounded to e4m3 in registers, times 256), V transposed
in shared memory by three warps of the producer warpgroup into wgmma's K-major layout with the keys
permuted to P's register order; D 64 and 128 (MLA's (192, 128) is refused on kernel engines);
dense batches, causal bottom-right, GQA. Other archs refuse after validating, rather than
dequantising to bf16 silently (which would look like an FP8 kernel and run at bf16's speed). The
oracle is fastmoe_ops.reference.attention.attention_fp8 (float64)."""
from __future__ import annotations

import math

import torch

from .. import backends
from ..errors import UnsupportedError, expect

E4M3 = torch.float8_e4m3fn
SCALE_BLOCK = 128  # keys per K / V scale block (reference.attention.FP8_SCALE_BLOCK; the kernel's key tile)


def validate(q, k, v, descale_q, descale_k, descale_v) -> None:
    """Refuse bad input before anything runs, naming the argument, the expectation and what came."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        expect(isinstance(t, torch.Tensor), name, "a torch.Tensor", lambda: type(t).__name__)
        expect(t.dtype == E4M3, name, "dtype float8_e4m3fn (the FP8 forward: q, k and v all e4m3)", t.dtype)
        expect(t.dim() == 4, name, "a 4-D tensor [B, S, H, D]", lambda: f"shape {tuple(t.shape)}")
        expect(t.device == q.device, name, f"a tensor on {q.device} (like q)", t.device)
    b, sq, hq, dqk = q.shape
    expect(k.shape[0] == b and v.shape[0] == b, "k", f"batch {b} (like q)", lambda: f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    expect(v.shape[1] == k.shape[1] and v.shape[2] == k.shape[2], "v", f"[B, Sk, Hkv] of k {tuple(k.shape[:3])}",
           lambda: tuple(v.shape[:3]))
    hkv = k.shape[2]
    expect(hkv > 0 and hq % hkv == 0, "k", f"a head count dividing q's {hq}", hkv)
    expect(k.shape[3] == dqk, "k", f"q's head dim {dqk}", k.shape[3])
    expect((dqk, v.shape[3]) in ((64, 64), (128, 128), (192, 128)), "v",
           "head dims (q/k, v) in (64, 64), (128, 128), (192, 128)", (dqk, v.shape[3]))
    blocks = -(-k.shape[1] // SCALE_BLOCK)
    for name, s, heads in (("descale_q", descale_q, hq), ("descale_k", descale_k, hkv), ("descale_v", descale_v, hkv)):
        shapes = [(b, heads)] + ([(b, heads, blocks)] if name != "descale_q" else [])
        want = " or ".join(f"[{', '.join(map(str, sh))}]" for sh in shapes)
        expect(isinstance(s, torch.Tensor), name, f"a float32 tensor {want} (e4m3 input needs its scales)",
               lambda: type(s).__name__)
        expect(s.dtype == torch.float32 and tuple(s.shape) in shapes, name,
               f"a float32 tensor {want}" + (f" (per head, or per head and block of {SCALE_BLOCK} keys)"
                                             if name != "descale_q" else ""),
               lambda: f"{s.dtype} {tuple(s.shape)}")
        expect(s.device == q.device, name, f"a tensor on {q.device} (like q)", s.device)
        expect(bool(torch.isfinite(s).all() and (s > 0).all()), name, "finite values > 0",
               lambda: f"min {s.min().item()}, max {s.max().item()}")


def attention_forward_fp8(q, k, v, descale_q, descale_k, descale_v, *, causal: bool, softmax_scale=None):
    """(out [B, Sq, Hq, Dv] bf16, lse [B, Hq, Sq] fp32) of the dequantised attention; softmax_scale
    (of the dequantised q k^T) defaults to 1/sqrt(D)."""
    validate(q, k, v, descale_q, descale_k, descale_v)
    expect(softmax_scale is None or isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
           and softmax_scale > 0, "softmax_scale", "None or a finite number > 0", softmax_scale)
    engine = backends.engine_for(q=q, k=k, v=v)
    if engine != "reference":
        from . import attention_hopper_fp8 as kernel
        from .attention_hopper import arch_of

        arch = arch_of(engine, q.device)
        if arch != "sm_90a":
            raise UnsupportedError(
                f"flash_attn with float8_e4m3fn inputs on {arch} (engine {engine!r}): the FP8 attention kernel is "
                "sm_90a only (QGMMA, TMA); refusing rather than dequantising to bf16 behind the caller's back. "
                "Dequantise explicitly and call the bf16 kernel, or use engine 'reference' for the float64 oracle")
        expect(q.shape[3] in kernel.HEAD_DIMS, "v", f"head dims (q/k, v) in {[(d, d) for d in kernel.HEAD_DIMS]} "
               f"for the FP8 kernel on engine {engine!r} (MLA's (192, 128): engine 'reference' only)",
               (q.shape[3], v.shape[3]))
        return kernel.forward(q, k, v, descale_q, descale_k, descale_v, causal=causal, softmax_scale=softmax_scale,
                              engine=engine)
    from ..reference.attention import attention_fp8

    out, lse = attention_fp8(q, k, v, descale_q, descale_k, descale_v, causal=causal, softmax_scale=softmax_scale)
    return out.to(torch.bfloat16), lse
