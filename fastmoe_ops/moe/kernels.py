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
    return torch.ops.fmo.moe_gather_rows(src, index)


def gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[m] = sum_j w[m, j] * y[index[m, j]] in a fixed order: [M, H] y.dtype."""
    return torch.ops.fmo.moe_gather_reduce(y, index, weights)


# torch.library registration: torch.compile traces permute/unpermute (and anything built on
# these row movements) with each kernel as one opaque op; the fake implementations give
# the output shapes, which depend only on the index shapes. The engine is chosen when the
# op runs, like every other launch.
@torch.library.custom_op("fmo::moe_gather_rows", mutates_args=())
def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    engine = backends.engine_for(src=src, index=index)
    if engine == "reference" or index.shape[0] == 0:
        return reference.gather_rows(src, index)
    from ..ops import moe_permute

    return moe_permute.gather_rows(src, index, engine=engine)


@_gather_rows.register_fake
def _(src, index):
    return src.new_empty((index.shape[0],) + tuple(src.shape[1:]))


@torch.library.custom_op("fmo::moe_gather_reduce", mutates_args=())
def _gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    engine = backends.engine_for(y=y, index=index)
    if engine == "reference" or index.shape[0] == 0 or y.dtype == torch.float64:
        return reference.gather_reduce(y, index, weights)   # fp64: the oracle's dtype, no kernel
    from ..ops import moe_permute

    return moe_permute.gather_reduce(y, index, weights, engine=engine)


@_gather_reduce.register_fake
def _(y, index, weights):
    return y.new_empty(index.shape[0], y.shape[1])
