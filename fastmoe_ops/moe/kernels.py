"""Engine choice for the MoE building blocks: the kernels (csrc/moe/) on `cuda`/`sim`, the
PyTorch reference on `reference`. Every caller in fastmoe_ops.moe goes through here."""
from __future__ import annotations

import torch

from .. import backends
from ..reference import moe as reference


def bucket_layout(topk_idx: torch.Tensor, num_buckets: int, experts_per_bucket: int, once: bool):
    """See reference.moe.bucket_layout: (counts [B] int64, pos [T, B] or [T, k] int64)."""
    engine = backends.engine_for(topk_idx=topk_idx)
    if engine == "reference" or topk_idx.shape[0] == 0:
        return reference.bucket_layout(topk_idx, num_buckets, experts_per_bucket, once)
    from ..ops import moe_layout

    return moe_layout.bucket_layout(topk_idx, num_buckets, experts_per_bucket, once, engine=engine)


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = src[index[i]] (zeros for -1): [M, ...] like src."""
    engine = backends.engine_for(src=src, index=index)
    if engine == "reference" or index.shape[0] == 0:
        return reference.gather_rows(src, index)
    from ..ops import moe_permute

    return moe_permute.gather_rows(src, index, engine=engine)


def gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[m] = sum_j w[m, j] * y[index[m, j]] in a fixed order: [M, H] y.dtype."""
    engine = backends.engine_for(y=y, index=index)
    if engine == "reference" or index.shape[0] == 0 or y.dtype == torch.float64:
        return reference.gather_reduce(y, index, weights)   # fp64: the oracle's dtype, no kernel
    from ..ops import moe_permute

    return moe_permute.gather_reduce(y, index, weights, engine=engine)



def combine_reduce(back: torch.Tensor, combine_index: torch.Tensor, send_src: torch.Tensor, send_counts) -> torch.Tensor:
    """Combine's sum: out [T, H] from the rows that came back [S, H] (this rank's send order:
    rank-major segments). Same bits as gather_reduce(back, combine_index): each token's
    rows added in ascending rank order to an fp32 (fp64) zero, rounded once."""
    engine = backends.engine_for(back=back, combine_index=combine_index)
    if engine != "reference" and back.dtype != torch.float64:
        return gather_reduce(back, combine_index)
    # Reference: one segment per rank, in ascending rank order. A segment's rows are
    # contiguous and hold distinct tokens, so index_add_ adds each element once.
    acc_t = reference.acc_dtype(back.dtype)
    acc = torch.zeros(combine_index.shape[0], back.shape[1], dtype=acc_t)
    start = 0
    for count in send_counts:
        if count:
            acc.index_add_(0, send_src[start:start + count], back[start:start + count].to(acc_t))
        start += count
    return acc.to(back.dtype)
