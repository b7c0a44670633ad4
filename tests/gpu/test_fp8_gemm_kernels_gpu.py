"""Both FP8 GEMM kernels on a GPU, forced with `kernel=`: the wgmma kernel (sm_90a only)
and the mma.sync kernel (sm_89 and sm_90a), against the float64 oracle (calc_diff < 1e-5 +
the elementwise bound of tests/fp8_gemm_util.py), exact structured inputs bit for bit, the
persistent grid under a shrunken SM budget (several tiles per CTA, raster bands), and the
grouped views with empty groups and masked_m = 0; the wgmma kernel's tma_store epilogue too.
tests/gpu/test_fp8_gpu.py runs the launcher's
own pick; this file makes sure the other kernel is checked on the same device too.
Skipped without a CUDA device and CuPy; well under a minute on one H100/H200."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import budget
from fastmoe_ops.reference import fp8 as ref

from conftest import poison_
from fp8_gemm_util import assert_close_to_oracle, gemm_oracle, contiguous_layout, contiguous_oracle, expert_weights, quantised_operands
from gpu_util import DEV, needs_cuda

pytestmark = needs_cuda


def kernels():
    if "cuda" not in fmo.available_backends():
        return ["mma_sync"]  # collected only; skipped
    return ["wgmma", "mma_sync"] if torch.cuda.get_device_capability() == (9, 0) else ["mma_sync"]


@contextlib.contextmanager
def compute_sms(n: int):
    with budget.comm_sms(budget.device_num_sms() - n), budget.communication_in_flight():
        yield


def to_dev(*ts):
    return tuple(t.to(DEV) for t in ts)


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 8, 16), (100, 200, 400), (129, 200, 1040), (4096, 2048, 7168)])
def test_dense_vs_oracle(kernel, out_dtype, shape):
    m, n, k = shape
    xq, xs, wq, ws = quantised_operands(m, n, k, 21)
    out = poison_(torch.empty(m, n, dtype=out_dtype, device=DEV))
    y = fmo.fp8.gemm(*to_dev(xq, xs, wq, ws), out_dtype, out=out, kernel=kernel)
    assert_close_to_oracle(y.cpu(), gemm_oracle(xq, xs, wq, ws, kernel=kernel), f"cuda {kernel} {shape}", 21)


@pytest.mark.parametrize("kernel", kernels())
def test_structured_exact(kernel):
    m, n, k = 70, 136, 272
    mi, ki, ni = torch.arange(m)[:, None], torch.arange(k)[None, :], torch.arange(n)[:, None]
    xq = (((mi * 3 + ki) % 7) - 3).float().to(torch.float8_e4m3fn)
    wq = (((ni + 2 * ki) % 5) - 2).float().to(torch.float8_e4m3fn)
    xs = 2.0 ** ((torch.arange(m)[:, None] + torch.arange(3)[None, :]) % 4 - 2).float()
    ws = 2.0 ** ((torch.arange(2)[:, None] * 2 + torch.arange(3)[None, :]) % 3 - 1).float()
    y = fmo.fp8.gemm(*to_dev(xq, xs, wq, ws), torch.float32, kernel=kernel)
    assert torch.equal(y.cpu(), ref.fp8_gemm_oracle(xq, xs, wq, ws).float()), kernel


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("sms", [1, 3])
def test_persistent_under_a_small_budget(kernel, sms):
    """With a few SMs the wgmma grid is `sms` CTAs looping over 10 x 2 tiles (two raster bands)."""
    m, n, k = 1200, 250, 400
    xq, xs, wq, ws = quantised_operands(m, n, k, 22, b_rows=sms == 3)
    with compute_sms(sms):
        y = fmo.fp8.gemm(*to_dev(xq, xs, wq, ws), torch.float32, kernel=kernel)
    assert_close_to_oracle(y.cpu(), gemm_oracle(xq, xs, wq, ws, b_scale_rows=1 if sms == 3 else 128, kernel=kernel),
                           f"cuda {kernel} budget {sms}", 22)


@pytest.mark.parametrize("kernel", kernels())
def test_grouped(kernel):
    wq3, ws3 = expert_weights(8, 256, 512, 23)
    xq, xs, m_indices = contiguous_layout([5, 0, 130, 64, 1, 0, 300, 7], 512, 23)
    out = poison_(torch.empty(xq.shape[0], 256, dtype=torch.bfloat16, device=DEV))  # padding rows must be written 0
    y = fmo.fp8.grouped_gemm_contiguous(*to_dev(xq, xs, wq3, ws3, m_indices), out=out, debug=True, kernel=kernel)
    assert torch.all(y.cpu()[m_indices < 0] == 0)
    assert_close_to_oracle(y.cpu(), contiguous_oracle(xq, xs, wq3, ws3, m_indices, kernel=kernel), f"cuda {kernel} contiguous", 23)
    masked = torch.tensor([0, 3, 64, 17, 0, 64, 1, 40], dtype=torch.int32)
    xq3, xs3 = xq[:512].reshape(8, 64, 512), xs[:512].reshape(8, 64, -1)
    out = poison_(torch.empty(8, 64, 256, device=DEV))
    y3 = fmo.fp8.grouped_gemm_masked(*to_dev(xq3, xs3, wq3, ws3, masked), torch.float32, out=out, kernel=kernel)
    for g in range(8):
        r = int(masked[g])
        if r:
            assert_close_to_oracle(y3[g, :r].cpu(), gemm_oracle(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g], kernel=kernel),
                                   f"cuda {kernel} masked {g}", 23)
        assert torch.isnan(y3[g, r:]).all(), f"{kernel}: group {g} rows >= masked_m written"


@pytest.mark.skipif("wgmma" not in kernels(), reason="the warp-specialised kernel needs sm_90a")
@pytest.mark.parametrize("bm,bn,stages,b_rows,shape", [
    (64, 64, 3, True, (100, 200, 400)), (128, 96, 2, False, (150, 200, 912)), (64, 112, 4, False, (70, 230, 48)),
    (128, 112, 7, True, (300, 500, 1040)), (128, 128, 7, False, (1000, 1000, 2048)),
    # decode tiles (BN 16..56): DeepSeek-V3's M 128 x N 2112 x K 7168 at BN 16, ragged N at odd 8-row groups
    (128, 16, 8, False, (128, 2112, 7168)), (128, 24, 8, False, (100, 200, 400)), (64, 40, 8, True, (40, 330, 1040)),
    (64, 56, 4, False, (64, 1000, 400)), (128, 48, 8, True, (128, 300, 656))])
def test_wgmma_tile_shapes(bm, bn, stages, b_rows, shape):
    """Every wgmma N >= 64 the cost model may pick and the decode tiles' branches (weight-scale
    blocks 1 / 2, per-row b-scale registers 1 / 2, odd / even 8-row groups of B), launched
    directly on 3 persistent CTAs (the ring's phases wrap across tiles; 2 stages too),
    driver-encoded TMA maps, ragged M, N, K."""
    from fastmoe_ops.ops import fp8_gemm as launcher

    m, n, k = shape
    xq, xs, wq, ws = quantised_operands(m, n, k, 24, b_rows=b_rows)
    spec = launcher.Fp8GemmWgmmaSpec(mode="dense", out="bf16", b_scale="row" if b_rows else "blk128",
                                     block_m=bm, block_n=bn, stages=stages)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device=DEV))
    a, a_s, b, b_s = to_dev(xq, xs, wq, ws)
    launcher.run_kernel(spec, grid=(3, 1, 1), a=a, a_scale=a_s, b=b, b_scale=b_s, out=out, m=m, n=n, k=k, engine="cuda")
    assert_close_to_oracle(out.cpu(), gemm_oracle(xq, xs, wq, ws, b_scale_rows=1 if b_rows else 128),
                           f"cuda wgmma {bm}x{bn} s{stages}", 24)


@pytest.mark.skipif("wgmma" not in kernels(), reason="the warp-specialised kernel needs sm_90a")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(100, 264, 400), (4096, 2048, 7168), (128, 2112, 7168)])
def test_wgmma_tma_store_epilogue_vs_oracle(out_dtype, shape):
    """The staged epilogue (epilogue="tma_store": shared memory + TMA stores, driver-encoded out
    map) through the launcher, ragged M and N included, against the oracle: what a GPU run of
    bench/bench_fp8.py times against the registers epilogue."""
    m, n, k = shape
    xq, xs, wq, ws = quantised_operands(m, n, k, 25)
    out = poison_(torch.empty(m, n, dtype=out_dtype, device=DEV))
    y = fmo.fp8.gemm(*to_dev(xq, xs, wq, ws), out_dtype, out=out, kernel="wgmma", epilogue="tma_store")
    assert_close_to_oracle(y.cpu(), gemm_oracle(xq, xs, wq, ws), f"cuda wgmma tma_store {shape} {out_dtype}", 25)


@pytest.mark.skipif("wgmma" not in kernels(), reason="the warp-specialised kernel needs sm_90a")
@pytest.mark.parametrize("bm,bn,out", [(128, 128, "fp32"), (128, 96, "bf16"), (64, 40, "fp32"), (64, 24, "bf16"),
                                       (128, 16, "bf16")])
def test_wgmma_tma_store_boxes_and_grouped(bm, bn, out):
    """Every kind of store box (128/64/32-byte swizzles, 16-byte unswizzled, several per row) on 3
    persistent CTAs over ragged M and N, then the grouped views with the same tile: contiguous
    (padding rows 0, empty experts) and masked (rows >= masked_m unwritten; a warpgroup's partial
    rows copied out of staging)."""
    from fastmoe_ops.ops import fp8_gemm as launcher

    dtype = torch.bfloat16 if out == "bf16" else torch.float32
    spec = launcher.Fp8GemmWgmmaSpec(mode="dense", out=out, b_scale="blk128", block_m=bm, block_n=bn, stages=4,
                                     epilogue="tma_store")
    m, n, k = 300, 456, 656
    xq, xs, wq, ws = quantised_operands(m, n, k, 26)
    y = poison_(torch.empty(m, n, dtype=dtype, device=DEV))
    a, a_s, b, b_s = to_dev(xq, xs, wq, ws)
    launcher.run_kernel(spec, grid=(3, 1, 1), a=a, a_scale=a_s, b=b, b_scale=b_s, out=y, m=m, n=n, k=k, engine="cuda")
    assert_close_to_oracle(y.cpu(), gemm_oracle(xq, xs, wq, ws), f"cuda tma_store {bm}x{bn} {out}", 26)

    wq3, ws3 = expert_weights(4, 256, 512, 27)
    xq, xs, m_indices = contiguous_layout([5, 0, 130, 300], 512, 27)
    y = poison_(torch.empty(xq.shape[0], 256, dtype=dtype, device=DEV))
    a, a_s, b, b_s, idx = to_dev(xq, xs, wq3, ws3, m_indices)
    launcher.run_kernel(dataclasses.replace(spec, mode="contiguous"), grid=(3, 1, 1), a=a, a_scale=a_s, b=b,
                        b_scale=b_s, out=y, m=xq.shape[0], n=256, k=512, groups=4, m_indices=idx, engine="cuda")
    assert torch.all(y.cpu()[m_indices < 0] == 0)
    assert_close_to_oracle(y.cpu(), contiguous_oracle(xq, xs, wq3, ws3, m_indices), f"cuda tma_store contiguous {bn}", 27)
    masked = torch.tensor([0, 3, 130, 65], dtype=torch.int32)
    xq3, xs3 = xq[:4 * 130].reshape(4, 130, 512), xs[:4 * 130].reshape(4, 130, -1)
    y3 = poison_(torch.empty(4, 130, 256, dtype=dtype, device=DEV))
    a, a_s, mm = to_dev(xq3, xs3, masked)
    launcher.run_kernel(dataclasses.replace(spec, mode="masked"), grid=(3, 1, 1), a=a, a_scale=a_s, b=b, b_scale=b_s,
                        out=y3, m=130, n=256, k=512, groups=4, masked_m=mm, engine="cuda")
    for g in range(4):
        r = int(masked[g])
        if r:
            assert_close_to_oracle(y3[g, :r].cpu(), gemm_oracle(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g]),
                                   f"cuda tma_store masked {g}", 27)
        assert torch.isnan(y3[g, r:].float()).all(), f"tma_store: group {g} rows >= masked_m written"
