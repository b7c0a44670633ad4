"""Plain-PyTorch reference of the FP8 recipe: the oracle's building blocks and the CPU
fallback engine. Written to be obviously right, not fast; it computes exactly what the
kernels compute (same fp32 operations in the same order where order matters)."""
from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
FP32_MAX = 3.4028234663852886e38


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale for positive normal fp32 scales (UE8M0), by bits."""
    bits = scale.view(torch.int32)
    mantissa = bits & 0x7FFFFF
    exponent = bits & 0x7F800000
    rounded = torch.where(mantissa != 0, exponent + 0x00800000, exponent)
    return rounded.view(torch.float32)


def group_scales(amax: torch.Tensor, *, eps: float, pow2_scale: bool) -> torch.Tensor:
    """fp32 scale per group from the group's finite amax."""
    amax = torch.clamp_min(amax.float(), torch.tensor(eps, dtype=torch.float32).item())
    scale = amax / torch.tensor(E4M3_MAX, dtype=torch.float32)
    return round_up_pow2(scale) if pow2_scale else scale


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN and +-inf replaced by 0: the amax policy ignores non-finite values."""
    a = x.abs()
    return torch.where(a <= FP32_MAX, a, torch.zeros((), dtype=a.dtype))


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest even and saturate finite values (and +-inf) to +-448; NaN stays NaN."""
    return torch.clamp(v, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_per_token_group(x: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False, eps: float = 1e-12):
    """x [M, K] -> (xq [M, K] float8_e4m3fn, xs [M, ceil(K/group_size)] fp32)."""
    m, k = x.shape
    groups = math.ceil(k / group_size)
    xf = x.float()
    padded = torch.zeros(m, groups * group_size, dtype=torch.float32, device=x.device)
    padded[:, :k] = xf
    amax = finite_abs(padded.view(m, groups, group_size)).amax(dim=-1)
    scale = group_scales(amax, eps=eps, pow2_scale=pow2_scale)
    expanded = scale.repeat_interleave(group_size, dim=1)[:, :k]
    return to_e4m3(xf / expanded), scale


def dequantize_per_token_group(xq: torch.Tensor, xs: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """float64 x ~= xq * xs (the oracle's view of a quantised activation)."""
    k = xq.shape[1]
    return xq.double() * xs.double().repeat_interleave(group_size, dim=1)[:, :k]
