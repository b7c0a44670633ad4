"""The FP8 kernels on a GPU (the `cuda` engine): quantisation bit-exact against the
reference, the GEMMs against the float64 oracle (calc_diff < 1e-5 + the elementwise bound
of tests/fp8_gemm_util.py) at ragged and DeepSeek-V3 shapes (exact structured inputs, per
kernel: tests/gpu/test_fp8_gemm_kernels_gpu.py), grouped variants (FP8Linear: tests/gpu/test_fp8_linear_gpu.py). Skipped without a CUDA device and CuPy.
Written to run in well under a minute on one H100/H200."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal, poison_
from fp8_gemm_util import assert_close_to_oracle, gemm_oracle, contiguous_layout, contiguous_oracle, expert_weights, quantised_operands
from gpu_util import DEV, needs_cuda

pytestmark = needs_cuda


@pytest.mark.parametrize("shape", [(300, 7168), (129, 2056)])
def test_quantisation_bitexact_on_gpu(shape):
    x = (torch.randn(shape, device=DEV) * 3).to(torch.bfloat16)
    for fn, reffn in ((fmo.fp8.quantize_per_token_group, ref.quantize_per_token_group),
                      (fmo.fp8.quantize_per_block, ref.quantize_per_block),
                      (fmo.fp8.quantize_per_token_group_transposed, ref.quantize_per_token_group_transposed)):
        q, s = fn(x)
        rq, rs = reffn(x.cpu())
        assert_bitwise_equal(s.cpu(), rs, f"{fn.__name__} scales", 0)
        assert_bitwise_equal(q.cpu(), rq, f"{fn.__name__} values", 0)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(100, 72, 272), (129, 200, 1040), (128, 7168, 2048), (4096, 2048, 7168)])
def test_gemm_on_gpu(shape, out_dtype):
    m, n, k = shape
    xq, xs, wq, ws = (t.to(DEV) for t in quantised_operands(m, n, k, 1))
    out = poison_(torch.empty(m, n, dtype=out_dtype, device=DEV))
    y = fmo.fp8.gemm(xq, xs, wq, ws, out_dtype, out=out)
    torch.cuda.synchronize()
    assert_close_to_oracle(y.cpu(), gemm_oracle(xq, xs, wq, ws), f"cuda {shape}", 1)


def test_grouped_on_gpu():
    wq3, ws3 = expert_weights(8, 256, 512, 3)
    xq, xs, m_indices = contiguous_layout([5, 0, 130, 64, 1, 0, 300, 7], 512, 3)
    y = fmo.fp8.grouped_gemm_contiguous(xq.to(DEV), xs.to(DEV), wq3.to(DEV), ws3.to(DEV), m_indices.to(DEV), debug=True)
    assert_close_to_oracle(y.cpu(), contiguous_oracle(xq, xs, wq3, ws3, m_indices), "cuda contiguous", 3)
    masked = torch.tensor([0, 3, 64, 17, 0, 64, 1, 40], dtype=torch.int32)
    xq3, xs3 = xq[:512].reshape(8, 64, 512), xs[:512].reshape(8, 64, -1)
    y3 = fmo.fp8.grouped_gemm_masked(xq3.to(DEV), xs3.to(DEV), wq3.to(DEV), ws3.to(DEV), masked.to(DEV), torch.float32)
    for g in range(8):
        r = int(masked[g])
        if r:
            assert_close_to_oracle(y3[g, :r].cpu(), gemm_oracle(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g]), f"cuda masked {g}", 3)

