"""Plain-PyTorch reference of the FP8 recipe: the oracle's building blocks and the CPU
fallback engine. Written to be obviously right, not fast; it computes exactly what the
kernels compute (same fp32 operations in the same order where order matters).

Quantisation follows the contract written once in csrc/quant/fp8_scale.cuh (the kernels'
shared header): scale = RN32(max(amax, fp32(eps)) / 448), q = e4m3_rne_satfinite(RN32(x /
scale)), NaN -> 0x7f; bit for bit the kernels' result on CPU and CUDA tensors alike."""
from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
E4M3_NAN = 0x7F                      # the contract's NaN code, whatever the input NaN's sign
FP32_MAX = 3.4028234663852886e38
EPS_MIN = E4M3_MAX * 2.0**-126       # smallest eps whose scale eps / 448 is a normal fp32


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale for positive normal fp32 scales (UE8M0), by bits."""
    bits = scale.view(torch.int32)
    mantissa = bits & 0x7FFFFF
    exponent = bits & 0x7F800000
    rounded = torch.where(mantissa != 0, exponent + 0x00800000, exponent)
    return rounded.view(torch.float32)


def ieee_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b correctly rounded in fp32 on every device. b must be a tensor of a's shape on
    a's device: with a CPU scalar divisor (a Python number or a 0-dim CPU tensor) PyTorch's
    CUDA division multiplies by the rounded reciprocal instead, which differs in the last
    bit for about half of all quotients."""
    assert a.shape == b.shape and a.device == b.device and a.dtype == b.dtype == torch.float32
    return a / b


def group_scales(amax: torch.Tensor, *, eps: float, pow2_scale: bool) -> torch.Tensor:
    """fp32 scale per group from the group's finite amax: RN32(max(amax, fp32(eps)) / 448)."""
    amax = torch.clamp_min(amax.float(), torch.tensor(eps, dtype=torch.float32).item())
    scale = ieee_div(amax, torch.full_like(amax, E4M3_MAX))
    return round_up_pow2(scale) if pow2_scale else scale


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN and +-inf replaced by 0: the amax policy ignores non-finite values."""
    a = x.abs()
    return torch.where(a <= FP32_MAX, a, torch.zeros((), dtype=a.dtype))


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 v to nearest even on the e4m3 grid, saturating finite values and +-inf to
    +-448; every NaN becomes 0x7f (c10's conversion would keep a negative NaN's sign)."""
    q = torch.clamp(v, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q.view(torch.uint8).masked_fill_(v.isnan(), E4M3_NAN)
    return q


def quantize_blocks(x: torch.Tensor, block_rows: int, block_cols: int, *, pow2_scale: bool = False, eps: float = 1e-12):
    """The one reference of the scale policy: x [R, C] -> (xq [R, C] float8_e4m3fn,
    scales [ceil(R/block_rows), ceil(C/block_cols)] fp32), one scale per block_rows x
    block_cols block (partial edge blocks cover the elements present)."""
    r, c = x.shape
    br, bc = math.ceil(r / block_rows), math.ceil(c / block_cols)
    xf = x.float()
    padded = torch.zeros(br * block_rows, bc * block_cols, dtype=torch.float32, device=x.device)
    padded[:r, :c] = xf
    blocks = padded.view(br, block_rows, bc, block_cols)
    amax = finite_abs(blocks).amax(dim=(1, 3))
    scale = group_scales(amax, eps=eps, pow2_scale=pow2_scale)  # [br, bc]
    expanded = scale.repeat_interleave(block_rows, dim=0).repeat_interleave(block_cols, dim=1)[:r, :c]
    return to_e4m3(ieee_div(xf, expanded)), scale


def quantize_per_token_group(x: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False, eps: float = 1e-12):
    """x [M, K] -> (xq [M, K] float8_e4m3fn, xs [M, ceil(K/group_size)] fp32)."""
    return quantize_blocks(x, 1, group_size, pow2_scale=pow2_scale, eps=eps)


def quantize_per_block(w: torch.Tensor, block_size: int = 128, *, pow2_scale: bool = False, eps: float = 1e-12):
    """w [N, K] -> (wq [N, K] float8_e4m3fn, ws [ceil(N/block_size), ceil(K/block_size)] fp32)."""
    return quantize_blocks(w, block_size, block_size, pow2_scale=pow2_scale, eps=eps)


def quantize_per_token_group_transposed(x: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False, eps: float = 1e-12):
    """x [M, K] -> x^T quantised per 1 x group_size group along M (wgrad's layout):
    (xq_t [K, Mp] float8_e4m3fn, xs_t [K, ceil(M/group_size)] fp32), Mp = M rounded up to 16,
    columns M..Mp-1 zero (the consuming GEMM's K must be a multiple of 16)."""
    m, k = x.shape
    q, s = quantize_blocks(x.t(), 1, group_size, pow2_scale=pow2_scale, eps=eps)
    mp = -(-m // 16) * 16
    out = torch.zeros(k, mp, dtype=torch.float8_e4m3fn, device=x.device)
    out[:, :m] = q
    return out, s


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h [T, 2I] (gate | up halves, w13's row order in fastmoe_ops/nn/moe_experts.py) ->
    silu(gate) * up [T, I], computed in h's precision widened to at least fp32."""
    inter = h.shape[1] // 2
    hf = h if h.dtype == torch.float64 else h.float()
    return torch.nn.functional.silu(hf[:, :inter]) * hf[:, inter:]


def swiglu_quantize_per_token_group(h: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False,
                                    eps: float = 1e-12):
    """h [T, 2I] -> (aq [T, I] float8_e4m3fn, as [T, I/group_size] fp32): silu(gate) * up in fp32,
    then quantize_per_token_group. The kernel (csrc/quant/swiglu_quant.cuh) computes the fp32
    product with its own expf, so the two agree within the bound its header derives, not bit
    for bit (the tests compare both with a float64 oracle)."""
    return quantize_per_token_group(silu_mul(h.float()), group_size, pow2_scale=pow2_scale, eps=eps)


def dequantize_per_token_group(xq: torch.Tensor, xs: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """float64 x ~= xq * xs (the oracle's view of a quantised activation)."""
    k = xq.shape[1]
    return xq.double() * xs.double().repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_per_block(wq: torch.Tensor, ws: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """float64 w ~= wq * ws per block_size x block_size block."""
    n, k = wq.shape
    expanded = ws.double().repeat_interleave(block_size, dim=0).repeat_interleave(block_size, dim=1)[:n, :k]
    return wq.double() * expanded


# ------------------------------------------------------------------------------ GEMM

GEMM_BLOCK_K = 128


def _b_scale_rows_expanded(ws: torch.Tensor, n: int, b_scale_rows: int) -> torch.Tensor:
    """[ceil(N/b_scale_rows), kb] -> [N, kb]: the b scale of every row n."""
    return ws.repeat_interleave(b_scale_rows, dim=0)[:n]


def fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, *, b_scale_rows: int = 128) -> torch.Tensor:
    """DeepSeek's recipe, exactly: per 128-wide K block an fp32 partial sum, times
    xs[m, kb] * ws[n // b_scale_rows, kb], added into an fp32 accumulator; then out_dtype.
    xq [M, K] e4m3, xs [M, kb], wq [N, K] e4m3, ws [ceil(N/b_scale_rows), kb] -> [M, N]."""
    m, k = xq.shape
    n = wq.shape[0]
    a, b = xq.float(), wq.float()
    wsn = _b_scale_rows_expanded(ws.float(), n, b_scale_rows)
    acc = torch.zeros(m, n, dtype=torch.float32, device=xq.device)
    for kb in range(math.ceil(k / GEMM_BLOCK_K)):
        sl = slice(kb * GEMM_BLOCK_K, (kb + 1) * GEMM_BLOCK_K)
        partial = a[:, sl] @ b[:, sl].t()                            # fp32 [M, N]
        acc = acc + partial * (xs[:, kb:kb + 1].float() * wsn[:, kb][None, :])
    return acc.to(out_dtype)


def fp8_gemm_oracle(xq, xs, wq, ws, *, b_scale_rows: int = 128) -> torch.Tensor:
    """float64 matmul of the dequantised operands (the tests' oracle)."""
    k = xq.shape[1]
    n = wq.shape[0]
    a = xq.double() * xs.double().repeat_interleave(GEMM_BLOCK_K, dim=1)[:, :k]
    wsn = _b_scale_rows_expanded(ws.double(), n, b_scale_rows)
    b = wq.double() * wsn.repeat_interleave(GEMM_BLOCK_K, dim=1)[:, :k]
    return a @ b.t()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2<x, y> / (|x|^2 + |y|^2), in float64: 0 for equal tensors, ~ |x - y|^2 / (2|x|^2)."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Row m uses group m_indices[m]; rows with -1 are zero. wq3 [G, N, K], ws3 [G, nb, kb]."""
    m = xq.shape[0]
    n = wq3.shape[1]
    out = torch.zeros(m, n, dtype=out_dtype, device=xq.device)
    for g in range(wq3.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            out[rows] = fp8_gemm(xq[rows], xs[rows], wq3[g], ws3[g], out_dtype)
    return out


def grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Group g computes its first masked_m[g] rows; the other rows are zero here (the
    kernel leaves them unwritten)."""
    g_count, mmax, _ = xq3.shape
    n = wq3.shape[1]
    out = torch.zeros(g_count, mmax, n, dtype=out_dtype, device=xq3.device)
    for g in range(g_count):
        r = min(int(masked_m[g]), mmax)
        if r > 0:
            out[g, :r] = fp8_gemm(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g], out_dtype)
    return out
