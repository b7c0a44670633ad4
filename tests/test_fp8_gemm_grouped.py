"""Grouped FP8 GEMMs (MoE experts): contiguous (m_indices, -1 padding rows, aligned
segments) and masked (masked_m, including 0 and empty groups), on the simulator against
the float64 oracle per group; bad input and m_indices out of range in debug mode refused.
Tolerance as tests/test_fp8_gemm.py (same kernel mainloops). The simulator runs both the
wgmma and the mma.sync kernel."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import fp8_gemm as launcher
from fastmoe_ops.reference import fp8 as ref

from conftest import poison_
from fp8_gemm_util import ALIGN, assert_close_to_oracle, gemm_oracle, contiguous_layout, contiguous_oracle, engine_kernels, expert_weights

def test_alignment_is_a_multiple_of_every_tile():
    assert fmo.fp8.contiguous_alignment() == ALIGN
    for spec in launcher.standard_specs():
        if spec.mode == "contiguous":
            assert ALIGN % spec.block_m == 0


@pytest.mark.parametrize("engine, kernel", engine_kernels())
@pytest.mark.parametrize("counts", [[5, 0, 130, 64], [0, 0, 1]])
def test_contiguous_vs_oracle(engine, kernel, counts):
    n, k = 72, 144
    seed = sum(counts)
    wq3, ws3 = expert_weights(len(counts), n, k, seed)
    xq, xs, m_indices = contiguous_layout(counts, k, seed)
    out = poison_(torch.empty(xq.shape[0], n, dtype=torch.bfloat16))
    with fmo.use_backend(engine):
        y = fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, torch.bfloat16, out=out, debug=True,
                                            kernel=kernel)
    pad = m_indices < 0
    assert torch.all(y[pad] == 0), "padding rows (-1) must be zero"
    assert_close_to_oracle(y, contiguous_oracle(xq, xs, wq3, ws3, m_indices, kernel=kernel), f"contiguous {engine} {kernel} {counts}", seed)


@pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
def test_contiguous_large_tile_and_fp32():
    """The 128-row tile (forced by a tiny SM budget) on a segment boundary layout."""
    counts, n, k = [100, 28], 130, 160
    wq3, ws3 = expert_weights(2, n, k, 9)
    xq, xs, m_indices = contiguous_layout(counts, k, 9)
    spec = launcher.choose_spec("contiguous", xq.shape[0], n, k, "fp32", "blk128", compute_sms=1)
    assert spec.block_m == 128
    out = poison_(torch.empty(xq.shape[0], n))
    launcher.run_kernel(spec, grid=(2, 2), a=xq, a_scale=xs, b=wq3, b_scale=ws3, out=out, m=xq.shape[0], n=n, k=k,
                        groups=2, m_indices=m_indices, engine="sim")
    assert_close_to_oracle(out, contiguous_oracle(xq, xs, wq3, ws3, m_indices), "contiguous 128x128", 9)


@pytest.mark.parametrize("engine, kernel", engine_kernels())
@pytest.mark.parametrize("masked", [[3, 0, 64, 40], [0, 0, 0, 0]])
def test_masked_vs_oracle(engine, kernel, masked):
    groups, mmax, n, k = 4, 64, 80, 176
    seed = 100 + sum(masked)
    wq3, ws3 = expert_weights(groups, n, k, seed)
    x = torch.randn(groups, mmax, k, generator=torch.Generator().manual_seed(seed))
    q = [ref.quantize_per_token_group(x[i]) for i in range(groups)]
    xq3, xs3 = torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])
    masked_m = torch.tensor(masked, dtype=torch.int32)
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.float32))
    with fmo.use_backend(engine):
        y = fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, torch.float32, out=out, kernel=kernel)
    for g in range(groups):
        r = masked[g]
        if r:
            assert_close_to_oracle(y[g, :r], gemm_oracle(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g], kernel=kernel), f"masked group {g} ({engine})", seed)
        assert torch.isnan(y[g, r:]).all(), f"group {g}: rows >= masked_m must not be written ({engine})"


@pytest.mark.parametrize("engine, kernel", engine_kernels())
def test_masked_above_mmax_counts_as_mmax(engine, kernel):
    groups, mmax, n, k = 2, 16, 8, 32
    wq3, ws3 = expert_weights(groups, n, k, 1)
    x = torch.randn(groups, mmax, k)
    q = [ref.quantize_per_token_group(x[i]) for i in range(groups)]
    xq3, xs3 = torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])
    with fmo.use_backend(engine):
        y = fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, torch.tensor([99, 16], dtype=torch.int32), torch.float32,
                                        kernel=kernel)
    for g in range(groups):
        assert_close_to_oracle(y[g], gemm_oracle(xq3[g], xs3[g], wq3[g], ws3[g], kernel=kernel), f"masked_m >= Mmax ({engine} {kernel})", 1)


def test_m_indices_checked_in_debug_mode():
    wq3, ws3 = expert_weights(2, 16, 32, 2)
    xq, xs, m_indices = contiguous_layout([3, 4], 32, 2)
    bad = m_indices.clone()
    bad[130] = 2
    with pytest.raises(fmo.InputError, match=r"^m_indices: expected values in \[-1, 2\).*2 at row 130"):
        fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3, bad, debug=True)
    mixed = m_indices.clone()
    mixed[1] = 1  # a second group inside the first aligned segment
    with pytest.raises(fmo.InputError, match="^m_indices: expected each 128-row segment"):
        fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3, mixed, debug=True)


@pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
@pytest.mark.parametrize("kernel", ["wgmma", "mma_sync"])
def test_out_of_range_group_without_debug_is_nan_not_a_wild_read(monkeypatch, kernel):
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    wq3, ws3 = expert_weights(2, 16, 32, 2)
    xq, xs, m_indices = contiguous_layout([3, 4], 32, 2)
    m_indices[128] = 7
    with fmo.use_backend("sim"):
        y = fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices, torch.float32, kernel=kernel)
    assert torch.isnan(y[128:132]).all() and not torch.isnan(y[:128]).any(), "the bad group's rows are NaN, other tiles unaffected"


def test_grouped_bad_input_refused():
    wq3, ws3 = expert_weights(2, 16, 32, 2)
    xq, xs, m_indices = contiguous_layout([3, 4], 32, 2)
    with pytest.raises(fmo.InputError, match="^m_indices: expected an int32"):
        fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices.long())
    with pytest.raises(fmo.InputError, match="^ws3: expected shape"):
        fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3[:1], m_indices)
    with pytest.raises(fmo.InputError, match="^wq3: expected a 3-D"):
        fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3[0], ws3, m_indices)
    with pytest.raises(fmo.InputError, match="^masked_m: expected a contiguous tensor of shape"):
        fmo.fp8.grouped_gemm_masked(xq.view(2, 128, 32), xs.view(2, 128, 1), wq3, ws3, torch.zeros(3, dtype=torch.int32))
