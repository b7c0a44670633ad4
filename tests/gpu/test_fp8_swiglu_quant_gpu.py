"""The fused SwiGLU + FP8 quantisation kernel on a GPU (the `cuda` engine) against the float64
oracle with the bound of tests/test_fp8_swiglu_quant.py (CUDA's expf is within 2 ulp, inside
DELTA): bit for bit where the fp32 product is exact, else within one e4m3 ulp; DeepSeek-V3's
expert shape (I = 2048, bf16 h) and a ragged one; outputs poisoned (gpu_util's autouse
fixture and explicit `out`). Skipped without a CUDA device and CuPy. Well under 10 s."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo

from conftest import assert_bitwise_equal, poison_
from fp8_swiglu_util import check_within_bound, exact_h, oracle, random_h
from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)

pytestmark = needs_cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, inter", [(4096, 2048), (257, 384)])
def test_random_within_one_ulp_on_gpu(dtype, t, inter):
    h = random_h(t, inter, dtype, t + inter)
    aq, as_ = fmo.fp8.swiglu_quantize_per_token_group(h.to(DEV))
    torch.cuda.synchronize()
    exact = check_within_bound(h, aq.cpu(), as_.cpu(), 128, False, f"cuda {dtype} T {t} I {inter}")
    assert exact > 0.99, f"only {exact:.4f} of the codes equal the oracle's"


@pytest.mark.parametrize("pow2", [False, True])
def test_exact_products_bitexact_on_gpu(pow2):
    h = exact_h(129, 512, torch.bfloat16, 11)
    out = (poison_(torch.empty(129, 512, dtype=torch.float8_e4m3fn, device=DEV)), poison_(torch.empty(129, 4, device=DEV)))
    fmo.fp8.swiglu_quantize_per_token_group(h.to(DEV), pow2_scale=pow2, out=out)
    _, rq, rs = oracle(h, 128, pow2)
    assert_bitwise_equal(out[1].cpu(), rs, f"scales (cuda, pow2 {pow2})", 11)
    assert_bitwise_equal(out[0].cpu(), rq, f"codes (cuda, pow2 {pow2})", 11)


def test_strided_and_misaligned_rows_on_gpu():
    for offset in (0, 1):   # padded rows (vector path), then 2-byte misaligned (scalar path)
        h = random_h(65, 256, torch.bfloat16, 3, stride_pad=8, offset=offset)
        base = h.as_strided((h.shape[0], h.stride(0)), (h.stride(0), 1), 0)   # h's whole storage
        view = base.to(DEV).as_strided(h.shape, h.stride(), offset)            # the same layout on the device
        assert torch.equal(view.cpu(), h)
        aq, as_ = fmo.fp8.swiglu_quantize_per_token_group(view)
        check_within_bound(h, aq.cpu(), as_.cpu(), 128, False, f"cuda offset {offset}")
