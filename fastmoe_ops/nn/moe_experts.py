"""The routed experts of an MoE layer as grouped FP8 GEMMs, forward and backward.

Rows arrive sorted by local expert (fmo.moe.permute with alignment =
fmo.fp8.contiguous_alignment(), so every expert's segment starts at a multiple of 128 and
its padding rows are zeros marked -1). Per expert e, with x [M, H] the sorted rows,
w13 [E, 2I, H] (gate rows 0..I-1, up rows I..2I-1) and w2 [E, H, I]:

  forward   h  [M, 2I] = grouped(x per 1x128 group,  w13[e] per 128x128 block)   fp32 out
            a  [M, I]  = silu(h[:, :I]) * h[:, I:]                               fp32
            y  [M, H]  = grouped(a per 1x128 group,  w2[e] per 128x128 block)
            (a and its quantisation are one kernel, fmo.fp8.swiglu_quantize_per_token_group,
            when I % 128 == 0: `a` is never written, and the backward recomputes it from h)
  dgrad     da [M, I]  = grouped(dy per 1x128 group, w2[e]^T)   (w2^T's blocks are w2's blocks
                         transposed: wq.transpose(1, 2) with ws.transpose(1, 2), no requantisation)
            dh [M, 2I] = [da * up * silu'(gate), da * silu(gate)]                fp32
            dx [M, H]  = grouped(dh per 1x128 group, w13[e]^T)
  wgrad     dW2[e]  [H, I]  = dy_e^T a_e,  dW13[e] [2I, H] = dh_e^T x_e: the dense FP8 GEMM once
            per expert on the operands quantised per 1x128 group along the tokens
            (quantize_per_token_group_transposed, one pass over all M rows). A quantisation
            group never straddles two experts because segments are 128-aligned, so slicing
            expert e's columns of the transposed operands is exactly quantising its rows alone.

Static shapes (`masked_experts`, used when the Buffer has num_worst_tokens): every local expert
gets a fixed slot of Mmax = N rounded up to 128 rows ([E, Mmax, H]: a row can meet an expert at
most once, so no slot overflows), filled by an index_copy with a dump row for unused slots;
`masked_m` [E] (rows per expert) stays on the device; the GEMMs are grouped_gemm_masked into
zero-filled outputs (rows past masked_m stay 0, so SiLU*up and the wgrad see zeros there); the
wgrad loops over experts with static bounds. No host synchronisation anywhere in this path.

Everything is FP8 (e4m3) with fp32 accumulation and promotion per 128 of K, as
fmo.nn.FP8Linear's recipe. The forward's SiLU-and-multiply is fused with the quantisation of
its result (csrc/quant/swiglu_quant.cuh: one pass over h, gate | up halves as w13's rows) where
I % 128 == 0, else two PyTorch steps (fp32 silu * up, then quantize_per_token_group). h stays
fp32 (e4m3 would add a third rounding to the gate and the derivative). The fused op has no
gradient of its own (its outputs are FP8): this Function's backward recomputes a = silu(gate) *
up from the saved h in fp32 PyTorch for dW2 and the derivative, which also saves keeping the
[M, I] activation between forward and backward. The recomputed a differs from the kernel's by
a few fp32 ulps (its expf), far below the e4m3 rounding both go through next. The wgrad loop needs the segment offsets on the host: one
host synchronisation in the backward (`expert_offsets.tolist()`). GEMM K dimensions are H,
I, 2I and the segments, so H and I must be multiples of 16.
"""
from __future__ import annotations

import torch

from ..errors import expect
from ..ops.fp8_block_quant import quantize_per_block, quantize_per_token_group_transposed
from ..ops.fp8_gemm import contiguous_alignment, gemm
from ..ops.fp8_gemm_grouped import grouped_gemm_contiguous, grouped_gemm_masked
from ..ops.fp8_quant import quantize_per_token_group
from ..ops.fp8_swiglu_quant import swiglu_quantize_per_token_group
from ..moe import kernels as moe_kernels
from ..moe.autograd import nones_for

GROUP = 128   # 1 x 128 activation groups, 128 x 128 weight blocks (DeepSeek-V3's recipe)


def quantize_expert_weights(w: torch.Tensor):
    """w [E, N, K] -> (wq [E, N, K] e4m3, ws [E, ceil(N/128), ceil(K/128)] fp32), each expert
    quantised on its own so no 128 x 128 block mixes two experts."""
    parts = [quantize_per_block(w[e].detach(), GROUP) for e in range(w.shape[0])]
    if not parts:
        n, k = w.shape[1], w.shape[2]
        return (torch.zeros(0, n, k, dtype=torch.float8_e4m3fn, device=w.device),
                torch.zeros(0, -(-n // GROUP), -(-k // GROUP), dtype=torch.float32, device=w.device))
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def transposed(wq: torch.Tensor, ws: torch.Tensor):
    """The block quantisation of w[e]^T: the same blocks, transposed."""
    return wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous()


def m_indices(src_slots: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """[M] int32: the expert of every sorted row, -1 for padding rows (no host sync)."""
    rows = torch.arange(src_slots.shape[0], device=src_slots.device)
    expert = torch.searchsorted(expert_offsets, rows, right=True) - 1
    return torch.where(src_slots >= 0, expert, -1).to(torch.int32)


def _silu_mul(h: torch.Tensor, inter: int) -> torch.Tensor:
    gate, up = h[:, :inter], h[:, inter:]
    return torch.nn.functional.silu(gate) * up


def _silu_mul_backward(h: torch.Tensor, da: torch.Tensor, inter: int) -> torch.Tensor:
    gate, up = h[:, :inter], h[:, inter:]
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dgate = da * up * (sig * (1 + gate * (1 - sig)))   # d silu(g)/dg = s (1 + g (1 - s))
    return torch.cat([dgate, da * silu], dim=1)


def _swiglu_quantized(h: torch.Tensor, inter: int):
    """(aq [M, I] e4m3, as [M, I/128] fp32) of silu(gate) * up: fused where I % 128 == 0."""
    if inter % GROUP == 0:
        return swiglu_quantize_per_token_group(h, GROUP)
    return quantize_per_token_group(_silu_mul(h, inter), GROUP)


def _grouped(act: torch.Tensor, wq, ws, m_idx) -> torch.Tensor:
    return _grouped_q(quantize_per_token_group(act, GROUP), wq, ws, m_idx)


def _grouped_q(act_fp8, wq, ws, m_idx) -> torch.Tensor:
    return grouped_gemm_contiguous(*act_fp8, wq, ws, m_idx, torch.float32)


def _wgrad(dout: torch.Tensor, inp: torch.Tensor, offsets: list[int], dtype) -> torch.Tensor:
    """[E, N, K]: dW[e] = dout_e^T inp_e for dout [M, N], inp [M, K], FP8 per 1x128 group of tokens."""
    dq, ds = quantize_per_token_group_transposed(dout, GROUP)   # [N, Mp], [N, M/128]
    iq, is_ = quantize_per_token_group_transposed(inp, GROUP)   # [K, Mp], [K, M/128]
    out = torch.zeros(len(offsets) - 1, dout.shape[1], inp.shape[1], dtype=torch.float32, device=dout.device)
    for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        if hi > lo:    # an expert without tokens has a zero gradient
            gl, gh = lo // GROUP, hi // GROUP
            gemm(dq[:, lo:hi].contiguous(), ds[:, gl:gh].contiguous(), iq[:, lo:hi].contiguous(),
                 is_[:, gl:gh].contiguous(), torch.float32, out=out[e])
    return out.to(dtype)


def _rows_fp32(x: torch.Tensor, x_fp8) -> torch.Tensor:
    """The expert input as the first GEMM saw it, in fp32 (wgrad's operand): x, or for FP8
    rows their dequantisation xq * xs (padding rows: codes and scales 0)."""
    if x_fp8 is None:
        return x.float()
    xq, xs = x_fp8
    return xq.float() * xs.repeat_interleave(GROUP, dim=-1)[..., : xq.shape[-1]]


class GroupedExpertsFn(torch.autograd.Function):
    """x_sorted [M, H], w13 [E, 2I, H], w2 [E, H, I] -> y_sorted [M, H] (x's dtype).

    FP8 rows (a dispatch with use_fp8, then permute): x is their gradient anchor [N, H]
    (fmo.moe.autograd.Fp8Rows), x_fp8 the sorted (xq, xs), which the first GEMM reads as they
    arrived, and slot_rows permute's map: the anchor's gradient is permute's backward (the
    unweighted unpermute) of the sorted rows' gradient, so dx is bit for bit the bf16 path's;
    the w13 gradient uses the dequantised rows (what the GEMM saw), one more e4m3 rounding."""

    @staticmethod
    def forward(ctx, x, w13, w2, m_idx, expert_offsets, w13_fp8, w2_fp8, x_fp8=None, slot_rows=None):
        inter = w2.shape[2]
        h = _grouped_q(x_fp8 or quantize_per_token_group(x, GROUP), *w13_fp8, m_idx)   # [M, 2I] fp32
        y = _grouped_q(_swiglu_quantized(h, inter), *w2_fp8, m_idx)   # [M, H] fp32
        ctx.save_for_backward(*(x_fp8 or (x, None)), slot_rows, h, m_idx, expert_offsets, *w13_fp8, *w2_fp8)
        ctx.inter, ctx.w_dtypes, ctx.fp8 = inter, (w13.dtype, w2.dtype), x_fp8 is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xa, xb, slot_rows, h, m_idx, expert_offsets, w13q, w13s, w2q, w2s = ctx.saved_tensors
        x_dtype = dy.dtype
        dy = dy.contiguous()
        da = _grouped(dy, *transposed(w2q, w2s), m_idx)             # [M, I]
        dh = _silu_mul_backward(h, da, ctx.inter)                   # [M, 2I]
        dx = _grouped(dh, *transposed(w13q, w13s), m_idx).to(x_dtype) if ctx.needs_input_grad[0] else None
        if dx is not None and ctx.fp8:   # the anchor's gradient: permute's backward, as PermuteFn's
            dx = moe_kernels.gather_reduce(dx, slot_rows)
        dw13 = dw2 = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            offsets = expert_offsets.tolist()     # host sync: the per-expert wgrad loop's bounds
            if ctx.needs_input_grad[1]:
                dw13 = _wgrad(dh, _rows_fp32(xa, (xa, xb) if ctx.fp8 else None), offsets, ctx.w_dtypes[0])
            if ctx.needs_input_grad[2]:   # a recomputed from h (the forward never kept it)
                dw2 = _wgrad(dy.float(), _silu_mul(h, ctx.inter), offsets, ctx.w_dtypes[1])
        return _grouped_grads(dx, dw13, dw2)


def grouped_experts(x_sorted: torch.Tensor, pmap, w13: torch.Tensor, w2: torch.Tensor, w13_fp8=None, w2_fp8=None):
    """y_sorted [M, H] = w2[e] (silu(gate) * up)(w13[e] x) for every sorted row of expert e.

    x_sorted, pmap: from fmo.moe.permute(..., alignment=contiguous_alignment()); w13 [E, 2I, H],
    w2 [E, H, I]; w13_fp8/w2_fp8: their quantise_expert_weights() (computed when None).
    x_sorted may be FP8 rows (permute of a use_fp8 dispatch's Fp8Rows): y_sorted then has the
    anchor's dtype, and the gradient goes to the anchor (see GroupedExpertsFn)."""
    expect(pmap.alignment % contiguous_alignment() == 0, "pmap", f"a permute with alignment a multiple of {contiguous_alignment()}",
           pmap.alignment)
    e, i2, hidden = w13.shape
    expect(w2.dim() == 3 and tuple(w2.shape) == (e, hidden, i2 // 2) and i2 % 2 == 0, "w2",
           f"shape ({e}, {hidden}, {i2 // 2}) to match w13 {tuple(w13.shape)}", tuple(w2.shape))
    expect(hidden % 16 == 0 and (i2 // 2) % 16 == 0, "w13", "hidden and intermediate sizes that are multiples of 16 (GEMM K)",
           tuple(w13.shape))
    expect(pmap.expert_offsets.shape[0] == e + 1, "pmap", f"{e} local experts (like w13)", pmap.expert_offsets.shape[0] - 1)
    x_fp8, anchor = _fp8_rows(x_sorted, "x_sorted")
    rows = x_fp8[0] if x_fp8 else x_sorted
    expect(rows.dim() == 2 and rows.shape[1] == hidden, "x_sorted", f"[M, {hidden}]", tuple(rows.shape))
    if rows.shape[0] == 0:   # nothing received: the weights still join the graph (zero gradient)
        like = anchor[:0] if x_fp8 else x_sorted
        return like + 0 * (w13.sum() + w2.sum()).to(like.dtype)
    w13_fp8 = w13_fp8 if w13_fp8 is not None else quantize_expert_weights(w13)
    w2_fp8 = w2_fp8 if w2_fp8 is not None else quantize_expert_weights(w2)
    m_idx = m_indices(pmap.src_slots, pmap.expert_offsets)
    if x_fp8:
        return GroupedExpertsFn.apply(anchor, w13, w2, m_idx, pmap.expert_offsets, w13_fp8, w2_fp8, x_fp8, pmap.slot_rows)
    return GroupedExpertsFn.apply(x_sorted.contiguous(), w13, w2, m_idx, pmap.expert_offsets, w13_fp8, w2_fp8)


def _fp8_rows(x, name: str):
    """(None, None) for a tensor; for FP8 rows ((xq, xs) contiguous, their gradient anchor)."""
    if not isinstance(x, (tuple, list)):
        return None, None
    anchor = getattr(x, "grad_anchor", None)
    expect(len(x) == 2 and anchor is not None, name, "a tensor, or the FP8 rows of a dispatch with use_fp8=True "
           "(fmo.moe.autograd.Fp8Rows, with its grad_anchor) or their permute", lambda: f"a {type(x).__name__} of {len(x)}")
    return (x[0].contiguous(), x[1].contiguous()), anchor


# ------------------------------------------------------------- static shapes: masked layout


def _masked(act3: torch.Tensor, wq, ws, masked_m) -> torch.Tensor:
    """[E, Mmax, K] -> [E, Mmax, N] fp32; rows past masked_m[e] are 0 (zero-filled `out`)."""
    e, mmax, k = act3.shape
    return _masked_q(quantize_per_token_group(act3.reshape(e * mmax, k), GROUP), e, wq, ws, masked_m)


def _masked_q(act_fp8, e: int, wq, ws, masked_m) -> torch.Tensor:
    """_masked of the quantised [E * Mmax, K] rows."""
    aq, as_ = act_fp8
    mmax = aq.shape[0] // e
    out = torch.zeros(e, mmax, wq.shape[1], dtype=torch.float32, device=aq.device)
    return grouped_gemm_masked(aq.view(e, mmax, -1), as_.view(e, mmax, -1), wq, ws, masked_m, torch.float32, out=out)


def _wgrad_masked(dout3: torch.Tensor, inp3: torch.Tensor, dtype) -> torch.Tensor:
    """[E, N, K]: dW[e] = dout3[e]^T inp3[e] over all Mmax rows (rows past masked_m are 0)."""
    out = torch.empty(dout3.shape[0], dout3.shape[2], inp3.shape[2], dtype=torch.float32, device=dout3.device)
    for e in range(dout3.shape[0]):
        dq, ds = quantize_per_token_group_transposed(dout3[e], GROUP)
        iq, is_ = quantize_per_token_group_transposed(inp3[e], GROUP)
        gemm(dq, ds, iq, is_, torch.float32, out=out[e])
    return out.to(dtype)


class MaskedExpertsFn(torch.autograd.Function):
    """x3 [E, Mmax, H] (rows past masked_m zero), w13, w2 -> y3 [E, Mmax, H] (x3's dtype).

    FP8 rows: x3 is the receive rows' gradient anchor [N, H], x3_fp8 the slots' (xq [E*Mmax, H],
    xs [E*Mmax, H/128]) and dest [N*k] each (row, slot)'s slot row (E*Mmax: none): the anchor's
    gradient gathers the slots' gradients back, as the bf16 path's index_copy does."""

    @staticmethod
    def forward(ctx, x3, w13, w2, masked_m, w13_fp8, w2_fp8, x3_fp8=None, dest=None):
        inter = w2.shape[2]
        e = masked_m.shape[0]
        h3 = _masked_q(x3_fp8, e, *w13_fp8, masked_m) if x3_fp8 else _masked(x3, *w13_fp8, masked_m)   # [E, Mmax, 2I]
        mmax = h3.shape[1]
        y3 = _masked_q(_swiglu_quantized(h3.view(e * mmax, -1), inter), e, *w2_fp8, masked_m)
        ctx.save_for_backward(*(x3_fp8 or (x3, None)), dest, h3, masked_m, *w13_fp8, *w2_fp8)
        ctx.inter, ctx.w_dtypes, ctx.fp8, ctx.rows = inter, (w13.dtype, w2.dtype), x3_fp8 is not None, x3.shape[0]
        return y3.to(x3.dtype)

    @staticmethod
    def backward(ctx, dy3):
        xa, xb, dest, h3, masked_m, w13q, w13s, w2q, w2s = ctx.saved_tensors
        e, mmax, _ = h3.shape
        dy3 = dy3.contiguous()
        da3 = _masked(dy3, *transposed(w2q, w2s), masked_m)
        dh3 = _silu_mul_backward(h3.reshape(e * mmax, -1), da3.reshape(e * mmax, -1), ctx.inter).view(e, mmax, -1)
        dx3 = _masked(dh3, *transposed(w13q, w13s), masked_m).to(dy3.dtype) if ctx.needs_input_grad[0] else None
        if dx3 is not None and ctx.fp8:   # slot rows -> the receive rows' anchor, slots summed in order
            k = dest.shape[0] // max(ctx.rows, 1)
            rows = torch.cat([dx3.reshape(e * mmax, -1), dx3.new_zeros(1, dx3.shape[2])]).index_select(0, dest)
            dx3 = rows.view(ctx.rows, k, -1).sum(1)
        x3 = _rows_fp32(xa, (xa, xb) if ctx.fp8 else None).view(e, mmax, -1)
        dw13 = _wgrad_masked(dh3, x3, ctx.w_dtypes[0]) if ctx.needs_input_grad[1] else None
        a3 = _silu_mul(h3.view(e * mmax, -1), ctx.inter).view(e, mmax, -1) if ctx.needs_input_grad[2] else None
        dw2 = _wgrad_masked(dy3.float(), a3, ctx.w_dtypes[1]) if ctx.needs_input_grad[2] else None
        return _masked_grads(dx3, dw13, dw2)


# The Nones padding each backward's gradients, counted once here: torch.compile traces the
# backwards, and cannot trace the inspect call counting them.
_grouped_grads, _masked_grads = nones_for(GroupedExpertsFn), nones_for(MaskedExpertsFn)


def masked_experts(recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   w13_fp8=None, w2_fp8=None) -> torch.Tensor:
    """Static-shape experts: recv_x [N, H], recv_idx [N, k] (local ids or -1), recv_w [N, k] fp32
    -> [N, H]: out[n] = sum_j recv_w[n, j] * expert_{idx[n, j]}(recv_x[n]) (fp32 sum, slots in
    order, one rounding: fmo.moe.unpermute's order). Shapes depend on N, k, E only."""
    e, i2, hidden = w13.shape
    expect(tuple(w2.shape) == (e, hidden, i2 // 2), "w2", f"shape ({e}, {hidden}, {i2 // 2}) to match w13", tuple(w2.shape))
    n, k = recv_idx.shape
    x_fp8, anchor = _fp8_rows(recv_x, "recv_x")
    mmax = max(GROUP, -(-n // GROUP) * GROUP)     # a row meets an expert at most once: N rows suffice
    experts = torch.arange(e, device=recv_idx.device)
    hit = (recv_idx.reshape(n * k, 1) == experts).to(torch.int32)            # [N*k, E]
    pos = (hit.cumsum(0) - 1).gather(1, recv_idx.reshape(-1, 1).clamp(min=0)).squeeze(1)   # place in its expert
    masked_m = hit.sum(0, dtype=torch.int32)                                  # [E] on the device
    valid = recv_idx.reshape(-1) >= 0
    dest = torch.where(valid, recv_idx.reshape(-1).clamp(min=0) * mmax + pos, e * mmax)   # e * mmax: the dump row
    w13_fp8 = w13_fp8 if w13_fp8 is not None else quantize_expert_weights(w13)
    w2_fp8 = w2_fp8 if w2_fp8 is not None else quantize_expert_weights(w2)
    if x_fp8:   # the codes (as bytes) and scales into their slots, the anchor carries the gradient
        x3_fp8 = tuple(_to_slots(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t, k, dest, e * mmax).view(t.dtype)
                       for t in x_fp8)
        y3 = MaskedExpertsFn.apply(anchor, w13, w2, masked_m, w13_fp8, w2_fp8, x3_fp8, dest)
        recv_x = anchor
    else:
        x3 = _to_slots(recv_x, k, dest, e * mmax).view(e, mmax, hidden)
        y3 = MaskedExpertsFn.apply(x3.contiguous(), w13, w2, masked_m, w13_fp8, w2_fp8)
    y_rows = torch.cat([y3.reshape(e * mmax, hidden), y3.new_zeros(1, hidden)]).index_select(0, dest)   # [N*k, H]
    acc = torch.float64 if recv_x.dtype == torch.float64 else torch.float32
    y_rows = y_rows.view(n, k, hidden).to(acc)
    w = torch.where(recv_idx >= 0, recv_w, 0.0).to(acc)
    out = y_rows[:, 0] * w[:, :1]
    for j in range(1, k):                                                      # slots in order, fp32
        out = out + y_rows[:, j] * w[:, j:j + 1]
    return out.to(recv_x.dtype)


def _to_slots(rows: torch.Tensor, k: int, dest: torch.Tensor, slots: int) -> torch.Tensor:
    """[slots, W]: slot dest[n*k + j] holds rows[n] (zeros elsewhere; dest == slots: dropped)."""
    src = rows.repeat_interleave(k, 0) if k > 1 else rows                    # [N*k, W]: row of slot n*k + j
    return torch.zeros(slots + 1, rows.shape[1], dtype=rows.dtype, device=rows.device).index_copy(0, dest, src)[:slots]

