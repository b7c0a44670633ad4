"""Fused attention: public functions, autograd, and the torch.library custom ops.

    out = fmo.flash_attn(q, k, v, causal=False, softmax_scale=None)
    out, lse = fmo.flash_attn(q, k, v, causal=True, return_lse=True)
    out = fmo.flash_attn(q, k, v, causal=True, deterministic=True)   # reproducible gradients
    out = fmo.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False)

q: [B, Sq, Hq, D], k/v: [B, Sk, Hkv, D] (varlen: [total, H, D] with int32 cu_seqlens
[B + 1]); bf16 or fp16; Hq % Hkv == 0; D in {64, 128}, or q/k 192 with v 128 (MLA prefill;
out then has v's 128), or 256 (forward only: the sm_90a kernel, the simulator and the reference
engine; refused on other archs, and at the forward when gradients will be needed on a kernel
engine); softmax_scale defaults to 1/sqrt(q's D).
out: like q; lse: fp32 natural log, dense [B, Hq, Sq], varlen [Hq, total_q]. Causal masks
align to the bottom right (query i sees key j <= i + Sk - Sq); a row that sees no key gives
zeros and lse = -inf. Differentiable in q, k, v (lse is not: its gradient is ignored).
Backward: on sm_90a (and the simulator, which models it) the wgmma kernel for D 64, 128 and
MLA's 192/128 (ops/attention_hopper_bwd.py), whose dQ is an fp32 sum of atomic adds in whatever order the key
tiles finish, so dq may differ in its last bits between runs; deterministic=True orders those
adds (as FlashAttention-3's flag; the key tiles then wait on one another). Elsewhere the mma.sync
passes (dQ in its own pass: deterministic anyway), as is the reference engine.

Autograd: each op is a `torch.library.custom_op` (`fmo::flash_attn_fwd`, `fmo::flash_attn_bwd`,
and their varlen twins) with a fake (meta) implementation, and `register_autograd` makes
the forward op's backward the backward op. torch builds the autograd.Function from that,
so eager mode, torch.compile (which traces the ops as opaque nodes, fullgraph) and
torch.library.opcheck all see one definition.
"""
from __future__ import annotations

import math

import torch

from . import backends
from .errors import expect
from .ops import attention as launcher
from .ops import attention_fp8

Tensor = torch.Tensor


def _scale(q: Tensor, softmax_scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


# ------------------------------------------------------------------------------ dense


@torch.library.custom_op("fmo::flash_attn_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float,
         deterministic: bool = False) -> tuple[Tensor, Tensor]:
    # deterministic: the backward's (an input here so that setup_context can hand it on)
    out, lse = launcher.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return out, lse


@_fwd.register_fake
def _(q, k, v, causal, softmax_scale, deterministic=False):
    b, sq, hq, _ = q.shape
    return q.new_empty(b, sq, hq, v.shape[-1]), q.new_empty(b, hq, sq, dtype=torch.float32)


@torch.library.custom_op("fmo::flash_attn_bwd", mutates_args=())
def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
         softmax_scale: float, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = launcher.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                                             deterministic=deterministic)
    return dq, dk, dv


@_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale, deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels write


def _fwd_setup(ctx, inputs, output):
    q, k, v, causal, softmax_scale, deterministic = inputs  # (torch fills in defaults)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.deterministic = deterministic


def _fwd_backward(ctx, dout, dlse):
    # lse is an output for callers (and the backward), not a differentiable one: dlse ignored.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fmo.flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.softmax_scale,
                                              ctx.deterministic)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("fmo::flash_attn_fwd", _fwd_backward, setup_context=_fwd_setup)


def flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: float | None = None, *,
               return_lse: bool = False, descale_q: Tensor | None = None, descale_k: Tensor | None = None,
               descale_v: Tensor | None = None, deterministic: bool = False):
    """Fused softmax(q k^T * scale) v without materialising the scores.

    q: [B, Sq, Hq, D], k, v: [B, Sk, Hkv, D] bf16/fp16 -> out [B, Sq, Hq, D]
    (and lse [B, Hq, Sq] fp32 with return_lse). deterministic: bit-for-bit reproducible
    gradients (the sm_90a backward's dQ adds in a fixed order; see the module). FP8 forward (no autograd): q, k, v
    float8_e4m3fn with descale_q [B, Hq], descale_k / descale_v [B, Hkv] or per block of 128 keys
    [B, Hkv, ceil(Sk / 128)] fp32 -> out bf16 (ops/attention_fp8.py: the sm_90a QGMMA kernel on
    sm_90a and the simulator, D 64 and 128; the float64 oracle on the reference engine)."""
    expect(isinstance(causal, bool), "causal", "a bool", causal)
    expect(isinstance(deterministic, bool), "deterministic", "a bool", deterministic)
    if getattr(q, "dtype", None) == attention_fp8.E4M3 or any(s is not None for s in (descale_q, descale_k, descale_v)):
        out, lse = attention_fp8.attention_forward_fp8(q, k, v, descale_q, descale_k, descale_v, causal=causal,
                                                       softmax_scale=softmax_scale)
        return (out, lse) if return_lse else out
    if _needs_autograd(q, k, v):
        launcher.validate(q, k, v, varlen=False, softmax_scale=softmax_scale)
        _refuse_missing_backward(q, k, v)
        out, lse = torch.ops.fmo.flash_attn_fwd(q, k, v, causal, _scale(q, softmax_scale), deterministic)
    else:  # inference: the launcher (validation cached per signature) without the dispatcher's round trip
        out, lse = launcher.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return (out, lse) if return_lse else out


def _refuse_missing_backward(q, k, v) -> None:
    """A forward whose gradients will be needed (autograd records it) but whose head dims have no
    backward kernel (D 256) is refused now, before its forward runs, not at the backward. The
    engine is looked up only for such head dims (host time per call otherwise), and not while
    dynamo traces (its context variable would break the graph): the backward op refuses then,
    before its kernels."""
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(t.requires_grad for t in (q, k, v))
            and (q.shape[-1], v.shape[-1]) not in launcher.HEAD_DIM_PAIRS):
        launcher.check_backward_head_dims(q, v, backends.engine_for(q=q, k=k, v=v),
                                          "with requires_grad (a backward will be needed)")


def _needs_autograd(q, k, v) -> bool:
    """Whether the call goes through the custom op: when dynamo traces it (one graph node),
    or when autograd records it (register_autograd's backward). Otherwise the op's own
    implementation runs directly: a custom op's dispatch costs ~10 us of host time a call."""
    return torch.compiler.is_compiling() or torch.is_grad_enabled() and (
        getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False) or getattr(v, "requires_grad", False))


# ----------------------------------------------------------------------------- varlen


@torch.library.custom_op("fmo::flash_attn_varlen_fwd", mutates_args=())
def _vfwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
          max_seqlen_k: int, causal: bool, softmax_scale: float, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    out, lse = launcher.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                                          cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return out, lse


@_vfwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic=False):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("fmo::flash_attn_varlen_bwd", mutates_args=())
def _vbwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
          cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
          softmax_scale: float, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = launcher.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                             deterministic=deterministic)
    return dq, dk, dv


@_vbwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
      deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels write


def _vfwd_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_seqlens = (max_q, max_k)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.deterministic = deterministic


def _vfwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.fmo.flash_attn_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens,
                                                     ctx.causal, ctx.softmax_scale, ctx.deterministic)
    return (dq, dk, dv) + (None,) * 7  # cu_seqlens x2, max_seqlen x2, causal, softmax_scale, deterministic


torch.library.register_autograd("fmo::flash_attn_varlen_fwd", _vfwd_backward, setup_context=_vfwd_setup)


def flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                      max_seqlen_k: int, causal: bool = False, softmax_scale: float | None = None, *,
                      return_lse: bool = False, deterministic: bool = False):
    """Packed sequences: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens int32 [B + 1]
    (non-decreasing from 0; empty sequences allowed) -> out [total_q, Hq, D]
    (and lse [Hq, total_q] fp32 with return_lse). Sequence b attends only within itself.
    deterministic: as flash_attn's."""
    expect(isinstance(causal, bool), "causal", "a bool", causal)
    expect(isinstance(deterministic, bool), "deterministic", "a bool", deterministic)
    if not _needs_autograd(q, k, v):  # inference: the launcher directly (it validates)
        out, lse = launcher.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                                              cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        return (out, lse) if return_lse else out
    if not torch.compiler.is_compiling():  # compiled: the op validates when it runs (the offsets are data)
        launcher.validate(q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                          max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale)
    _refuse_missing_backward(q, k, v)
    out, lse = torch.ops.fmo.flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                                   int(max_seqlen_k), causal, _scale(q, softmax_scale), deterministic)
    return (out, lse) if return_lse else out
