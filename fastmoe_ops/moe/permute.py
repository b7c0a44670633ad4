"""permute / unpermute: the local regrouping around the grouped GEMM.

    x_sorted, pmap = fmo.moe.permute(recv_x, recv_topk_idx, num_local_experts, alignment=128)
    y_sorted = experts(x_sorted, pmap.expert_offsets)          # grouped GEMM over segments
    y = fmo.moe.unpermute(y_sorted, pmap, recv_topk_weights)  # [N, H], then buf.combine(y, handle)

permute: recv_x [N, H] (or an FP8 pair) -> x_sorted [M, H]: one row per (row, slot) with a
local expert, grouped by expert (ascending expert, then receive row, then slot), each
expert's segment padded with zero rows to a multiple of `alignment` (M = expert_offsets[-1]).
unpermute: y_sorted [M, H] -> [N, H], out[n] = sum over slots j ascending of
w[n, j] * y_sorted[slot_rows[n, j]], fp32 accumulation (fp64 for fp64), one rounding.
permute's backward is an unweighted unpermute; unpermute's backward is a weighted permute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError, expect
from ..reference import moe as reference
from . import kernels
from .autograd import Fp8Rows, nones_for

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class PermuteMap:
    """slot_rows [N, k]: sorted row of each (row, slot), -1 where no local expert;
    src_slots [M]: n*k + j of each sorted row, -1 for padding; expert_offsets [E+1]:
    padded segment starts; tokens_per_expert [E]: unpadded (row, slot) counts."""

    slot_rows: torch.Tensor
    src_slots: torch.Tensor
    expert_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    alignment: int

    @property
    def num_rows(self) -> int:
        return self.slot_rows.shape[0]

    @property
    def src_rows(self) -> torch.Tensor:
        """[M] receive row of each sorted row, -1 for padding."""
        return _src_rows(self.src_slots, self.slot_rows.shape[1])


def _check_rows(name, t, dtypes, rows=None):
    expect(isinstance(t, torch.Tensor), name, "a torch.Tensor", type(t).__name__)
    expect(t.dim() == 2, name, "a 2-D tensor", f"shape {tuple(t.shape)}")
    expect(t.dtype in dtypes, name, f"dtype in {[str(d) for d in dtypes]}", t.dtype)
    if rows is not None:
        expect(t.shape[0] == rows, name, f"{rows} rows", f"shape {tuple(t.shape)}")


def permute(recv_x, recv_topk_idx: torch.Tensor, num_local_experts: int, *, alignment: int = 1):
    """-> (x_sorted [M, H] (a pair for an FP8 pair, keeping a dispatch's grad_anchor: the
    receive rows', whose gradient the consumer forms from pmap, as grouped_experts does),
    PermuteMap). Differentiable in recv_x.
    Reads two things on the host (on CUDA, each a synchronisation): the ids' range (the
    check) and the sorted row count M (it sizes the outputs)."""
    fp8 = isinstance(recv_x, (tuple, list))
    x = recv_x[0] if fp8 else recv_x
    _check_rows("recv_x", x, _FLOATS + (torch.float8_e4m3fn,))
    _check_rows("recv_topk_idx", recv_topk_idx, (torch.int64,), x.shape[0])
    expect(isinstance(num_local_experts, int) and num_local_experts >= 1, "num_local_experts", "an int >= 1", num_local_experts)
    expect(isinstance(alignment, int) and alignment >= 1, "alignment", "an int >= 1", alignment)
    lo, hi = torch.stack(torch.aminmax(recv_topk_idx)).tolist() if recv_topk_idx.numel() else (0, 0)   # one host read
    if lo < -1 or hi >= num_local_experts:
        raise InputError(f"recv_topk_idx: expected local expert ids in [-1, {num_local_experts}), got values in [{lo}, {hi}]")
    counts, pos = kernels.bucket_layout(recv_topk_idx, num_local_experts, 1, once=False)
    slot_rows, src_slots, offsets, counts = reference.permute_from_layout(recv_topk_idx, counts, pos, alignment)
    pmap = PermuteMap(slot_rows, src_slots, offsets, counts, alignment)
    if fp8:   # FP8 rows carry no gradient; a dispatch's anchor (Fp8Rows) stays the receive rows'
        _check_rows("recv_x[1]", recv_x[1], (torch.float32,), x.shape[0])
        src = pmap.src_rows
        rows = Fp8Rows((kernels.gather_rows(recv_x[0], src), kernels.gather_rows(recv_x[1], src)))
        rows.grad_anchor = getattr(recv_x, "grad_anchor", None)
        return rows, pmap
    return PermuteFn.apply(x, pmap.src_rows, pmap.slot_rows), pmap


def unpermute(y_sorted: torch.Tensor, pmap: PermuteMap, recv_topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """-> [N, H] y_sorted.dtype. Differentiable in y_sorted and recv_topk_weights."""
    expect(isinstance(pmap, PermuteMap), "pmap", "the PermuteMap from permute()", type(pmap).__name__)
    _check_rows("y_sorted", y_sorted, _FLOATS, pmap.src_slots.shape[0])
    if recv_topk_weights is not None:
        _check_rows("recv_topk_weights", recv_topk_weights, (torch.float32,), pmap.num_rows)
        expect(recv_topk_weights.shape == pmap.slot_rows.shape, "recv_topk_weights",
               f"shape {tuple(pmap.slot_rows.shape)} like recv_topk_idx", f"shape {tuple(recv_topk_weights.shape)}")
    return UnpermuteFn.apply(y_sorted, recv_topk_weights, pmap.slot_rows, pmap.src_slots)


def _src_rows(src_slots: torch.Tensor, k: int) -> torch.Tensor:
    return torch.where(src_slots >= 0, src_slots.div(k, rounding_mode="floor"), -1)


# The map travels as tensors (saved for backward), not as an attribute of ctx: torch.compile
# traces these Functions (the row movements are torch.library ops, fastmoe_ops.moe.kernels).
class PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src_rows, slot_rows):
        ctx.save_for_backward(slot_rows)
        return kernels.gather_rows(x.contiguous(), src_rows)

    @staticmethod
    def backward(ctx, grad_sorted):
        # permute's backward is an unweighted unpermute: a row's copies add up, slot order.
        (slot_rows,) = ctx.saved_tensors
        return _permute_grads(kernels.gather_reduce(grad_sorted.contiguous(), slot_rows))


class UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, weights, slot_rows, src_slots):
        ctx.save_for_backward(y_sorted, weights, slot_rows, src_slots)
        return kernels.gather_reduce(y_sorted.contiguous(), slot_rows, weights)

    @staticmethod
    def backward(ctx, grad_out):
        y_sorted, weights, slot_rows, src_slots = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            # unpermute's backward is a weighted permute: sorted row m gets w * g[src row].
            grad_y = kernels.gather_rows(grad_out.contiguous(), _src_rows(src_slots, slot_rows.shape[1]))
            if weights is not None:
                keep = src_slots >= 0
                w = torch.where(keep, weights.reshape(-1)[src_slots.clamp(min=0)], 0.0)
                grad_y = (grad_y.to(reference.acc_dtype(grad_y.dtype)) * w[:, None]).to(grad_y.dtype)
        if weights is not None and ctx.needs_input_grad[1]:
            acc = reference.acc_dtype(y_sorted.dtype)
            rows = y_sorted.to(acc)[slot_rows.clamp(min=0)]                        # [N, k, H]
            grad_w = (rows * grad_out.to(acc)[:, None, :]).sum(-1)
            grad_w = torch.where(slot_rows >= 0, grad_w, 0.0).to(torch.float32)
        return _unpermute_grads(grad_y, grad_w)


_permute_grads = nones_for(PermuteFn)
_unpermute_grads = nones_for(UnpermuteFn)
