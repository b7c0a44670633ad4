"""Autograd for dispatch and combine.

Dispatch copies each token to the ranks that own its experts, so its backward sums the
copies' gradients back on the source rank: dispatch's backward is a combine. Combine sums
the copies, so each copy's gradient is the source token's gradient: combine's backward is
a dispatch with the saved handle (no new layout, no counts exchange).

The functions call the Buffer's collectives without autograd (`exchange_dispatch`,
`exchange_combine`, `exchange_combine_backward`); every forward output, the handle and
the integer tensors included, is returned by `apply` (non-tensors pass through it).
"""
from __future__ import annotations

import inspect

import torch


def with_nones(fn_cls, *grads):
    """`grads` followed by one None per remaining forward input (never counted by hand)."""
    return nones_for(fn_cls)(*grads)


def nones_for(fn_cls):
    """with_nones for fn_cls, with the count taken once (at import): a backward that
    torch.compile traces cannot call inspect."""
    n_inputs = len(inspect.signature(fn_cls.forward).parameters) - 1   # minus ctx

    def pad(*grads):
        return grads + (None,) * (n_inputs - len(grads))
    return pad


class DispatchFn(torch.autograd.Function):
    """x [T, H], topk_weights [T, k] -> recv_x [N, H], recv_topk_weights [N, k]."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx):
        recv_x, recv_topk_idx, recv_w, tokens_per_expert, handle = buffer.exchange_dispatch(x, topk_idx, topk_weights)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx, tokens_per_expert)
        if recv_w is None:
            recv_w = torch.empty(0)      # placeholder output; `run` hands back None
        return recv_x, recv_topk_idx, recv_w, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_idx, grad_recv_w, _grad_counts, _grad_handle):
        return with_nones(DispatchFn, *_dispatch_backward(ctx, grad_recv_x, grad_recv_w))

    @staticmethod
    def run(buffer, x, topk_idx, topk_weights, use_fp8: bool = False):
        if not _needs_grad(x, topk_weights):   # no graph to record: skip autograd's bookkeeping
            return buffer.exchange_dispatch(x, topk_idx, topk_weights, use_fp8)
        if use_fp8 is True:
            xq, xs, anchor, recv_topk_idx, recv_w, counts, handle = Fp8DispatchFn.apply(x, topk_weights, buffer, topk_idx)
            recv_x = Fp8Rows((xq, xs))
            recv_x.grad_anchor = anchor
        else:
            recv_x, recv_topk_idx, recv_w, counts, handle = DispatchFn.apply(x, topk_weights, buffer, topk_idx)
        return recv_x, recv_topk_idx, recv_w if topk_weights is not None else None, counts, handle


class Fp8Rows(tuple):
    """A use_fp8 dispatch's rows: unpacks as the pair (q [N, H] e4m3, s [N, ceil(H/128)] fp32).
    FP8 tensors carry no gradient, so `grad_anchor` is an [N, H] tensor of x's dtype (zeros,
    expanded: no memory) standing in for recv_x, requiring grad when x's gradient is recorded:
    a consumer computing differentiably from (q, s) makes the anchor an input of its autograd
    Function and returns d loss / d recv_x as its gradient (fmo.nn's experts do); dispatch's
    backward then combines that, exactly as for a bf16 dispatch. None for a caller's pair."""

    grad_anchor = None


class Fp8DispatchFn(torch.autograd.Function):
    """x [T, H] (bf16/fp16/fp32), topk_weights [T, k] -> recv_xq, recv_xs (no gradient), the
    gradient anchor [N, H] (see Fp8Rows), recv_topk_weights [N, k]."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx):
        rows, recv_topk_idx, recv_w, tokens_per_expert, handle = buffer.exchange_dispatch(x, topk_idx, topk_weights, True)
        (xq, xs), anchor = rows, rows.grad_anchor
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(xq, xs, recv_topk_idx, tokens_per_expert)
        if recv_w is None:
            recv_w = torch.empty(0)      # placeholder output; `run` hands back None
        return xq, xs, anchor, recv_topk_idx, recv_w, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, _grad_q, _grad_s, grad_anchor, _grad_idx, grad_recv_w, _grad_counts, _grad_handle):
        return with_nones(Fp8DispatchFn, *_dispatch_backward(ctx, grad_anchor, grad_recv_w))


def _dispatch_backward(ctx, grad_recv_x, grad_recv_w):
    """(grad x, grad topk_weights) of a dispatch (either Function above)."""
    (recv_topk_idx,) = ctx.saved_tensors
    buffer, handle = ctx.buffer, ctx.handle
    # Dispatch's backward is a combine: every rank that received token t returns its
    # gradient row, and the source adds them in ascending rank order.
    if grad_recv_x is None:
        grad_recv_x = torch.zeros(handle.num_recv_rows, handle.hidden, device=recv_topk_idx.device)
    grad_x = buffer.exchange_combine(grad_recv_x, handle) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        # Only the owner of slot j's expert saw the weight: mask the others' slots, then
        # combine; every other rank contributes an exact zero.
        if grad_recv_w is None:
            grad_recv_w = torch.zeros(recv_topk_idx.shape, dtype=torch.float32, device=recv_topk_idx.device)
        masked = torch.where(recv_topk_idx >= 0, grad_recv_w, 0.0).to(torch.float32)
        grad_w = buffer.exchange_combine(masked, handle, any_width=True)
    return grad_x, grad_w


class CombineFn(torch.autograd.Function):
    """y [N, H] -> out [T, H]."""

    @staticmethod
    def forward(ctx, y, buffer, handle):
        ctx.buffer, ctx.handle, ctx.rows = buffer, handle, y.shape[0]
        return buffer.exchange_combine(y, handle)

    @staticmethod
    def backward(ctx, grad_out):
        # Combine's backward is a dispatch with the saved handle: each received row's
        # gradient is its source token's gradient.
        grad_y = ctx.buffer.exchange_combine_backward(grad_out.contiguous(), ctx.handle)
        return with_nones(CombineFn, grad_y[: ctx.rows])

    @staticmethod
    def run(buffer, y, handle):
        if not _needs_grad(y):
            return buffer.exchange_combine(y, handle)
        return CombineFn.apply(y, buffer, handle)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
