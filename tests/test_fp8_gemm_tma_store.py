"""The Hopper FP8 GEMM's staged epilogue (epilogue="tma_store": each math warpgroup's outputs
through its own shared-memory region and TMA stores; csrc/gemm/fp8_gemm_epilogue.cuh) on the
simulator, against the float64 oracle with poisoned outputs: dense through the launcher (ragged
M and N, bf16 and fp32 out, several tiles per CTA), every box geometry (128/64/32-byte swizzles,
16-byte unswizzled boxes, several boxes per row), contiguous with padding rows, an empty expert
and a bad group, masked (rows past masked_m unwritten: a warpgroup's partial rows copied out of staging)
under memcheck and racecheck; the launcher's rule for where TMA cannot store (N * sizeof(out) not
a multiple of 16, a misaligned out); a deliberately broken variant (staging overwritten before
the previous tile's store read it) must fail. Tolerances as tests/test_fp8_gemm.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import fp8_gemm as launcher
from fastmoe_ops.reference import fp8 as ref

from conftest import poison_
from fp8_gemm_util import (assert_close_to_oracle, compute_sms, contiguous_layout, contiguous_oracle, expert_weights,
                           gemm_oracle, quantised_operands)

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
OUT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _spec(mode, out, bm, bn, stages=3, **kw):
    return launcher.Fp8GemmWgmmaSpec(mode=mode, out=out, b_scale="blk128", block_m=bm, block_n=bn, stages=stages,
                                     epilogue="tma_store", **kw)


def _run_dense(spec, m, n, k, seed, *, ctas, out=None):
    xq, xs, wq, ws = quantised_operands(m, n, k, seed)
    out = poison_(torch.empty(m, n, dtype=OUT[spec.out])) if out is None else out
    launcher.run_kernel(spec, grid=(ctas, 1, 1), a=xq, a_scale=xs, b=wq, b_scale=ws, out=out, m=m, n=n, k=k,
                        engine="sim")
    return out, gemm_oracle(xq, xs, wq, ws)


@SIM
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dense_through_the_launcher(out_dtype):
    """epilogue="tma_store" through fmo.fp8.gemm: 2 CTAs over 6 tiles of 128 x 128 (ragged M 150,
    N 264: the boxes past M and N are clipped by TMA, so every poisoned element left is a bug)."""
    m, n, k = 150, 264, 400
    xq, xs, wq, ws = quantised_operands(m, n, k, 31)
    with compute_sms(2):
        spec, grid = launcher.select("dense", "wgmma", m, n, k, "fp32", "blk128", epilogue="tma_store")
        assert (spec.epilogue, spec.block_m, grid) == ("tma_store", 128, (2, 1, 1)), (spec, grid)
        out = poison_(torch.empty(m, n, dtype=out_dtype))
        with fmo.use_backend("sim"):
            y = fmo.fp8.gemm(xq, xs, wq, ws, out_dtype, out=out, kernel="wgmma", epilogue="tma_store")
    assert_close_to_oracle(y, gemm_oracle(xq, xs, wq, ws), f"tma_store dense {out_dtype}", 31)


@SIM
@pytest.mark.parametrize("bm,bn,out", [
    (128, 96, "fp32"),  # 384-byte rows: 3 boxes of 128 bytes, 128B swizzle, 2 warpgroups
    (64, 40, "fp32"),   # 160-byte rows: 5 boxes of 32 bytes, 32B swizzle
    (64, 16, "fp32"),   # 64-byte rows: 1 box, 64B swizzle
    (64, 24, "bf16"),   # 48-byte rows: 3 unswizzled boxes of 16 bytes
    (64, 16, "bf16"),   # 32-byte rows: 1 box, 32B swizzle
])
def test_box_geometries(bm, bn, out):
    """Each kind of store box, on 3 CTAs over ragged M, N (N = 200: the last tile's boxes partly
    or wholly past N) and K; the box the launcher encodes must be the kernel's (its stub's
    static_assert) and place every element."""
    y, oracle = _run_dense(_spec("dense", out, bm, bn), 100, 200, 272, 32, ctas=3)
    assert_close_to_oracle(y, oracle, f"tma_store {bm}x{bn} {out}", 32)


@SIM
def test_contiguous_padding_empty_expert_and_bad_group():
    """Grouped contiguous, 128 x 96 on 2 CTAs: padding rows (m_indices -1) 0, an empty expert, a
    segment whose group index is out of range: its rows NaN (row policy as the registers
    epilogue), every other row against the oracle."""
    counts, n, k = [100, 0, 28, 130], 136, 272
    groups = len(counts)
    wq3, ws3 = expert_weights(groups, n, k, 33)
    xq, xs, m_indices = contiguous_layout(counts, k, 33)
    bad = torch.zeros_like(m_indices, dtype=torch.bool)
    bad[128:256] = True  # the segment of expert 2 (expert 1 is empty)
    m_bad = torch.where(bad, torch.full_like(m_indices, groups + 3), m_indices)
    out = poison_(torch.empty(xq.shape[0], n))
    launcher.run_kernel(_spec("contiguous", "fp32", 128, 96), grid=(2, 1, 1), a=xq, a_scale=xs, b=wq3, b_scale=ws3,
                        out=out, m=xq.shape[0], n=n, k=k, groups=groups, m_indices=m_bad, engine="sim")
    assert torch.isnan(out[bad]).all(), "a bad group's rows must be NaN"
    good = ~bad
    assert torch.all(out[good & (m_indices < 0)] == 0), "padding rows (-1) must be zero"
    oracle = contiguous_oracle(xq, xs, wq3, ws3, m_indices)
    assert_close_to_oracle(out[good], oracle[good], "tma_store contiguous", 33)


@SIM
def test_masked_rows_past_masked_m_stay_unwritten_under_checks(monkeypatch):
    """Masked, 128 x 64 bf16 on 2 CTAs, memcheck and racecheck on: masked_m = 0, 130 (a tile of
    two full warpgroups, then one whose rows end after 2), 65 (warpgroup 0 by TMA store, warpgroup 1's
    single row copied out of staging by plain stores): rows >= masked_m keep their poison, the rest
    match the oracle."""
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    groups, mmax, n, k = 3, 130, 136, 272
    masked = [0, 130, 65]
    wq3, ws3 = expert_weights(groups, n, k, 34)
    x = torch.randn(groups, mmax, k, generator=torch.Generator().manual_seed(34))
    q = [ref.quantize_per_token_group(x[i]) for i in range(groups)]
    xq3, xs3 = torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])
    out = poison_(torch.empty(groups, mmax, n, dtype=torch.bfloat16))
    launcher.run_kernel(_spec("masked", "bf16", 128, 64), grid=(2, 1, 1), a=xq3, a_scale=xs3, b=wq3, b_scale=ws3,
                        out=out, m=mmax, n=n, k=k, groups=groups, masked_m=torch.tensor(masked, dtype=torch.int32),
                        engine="sim")
    for g, r in enumerate(masked):
        if r:
            assert_close_to_oracle(out[g, :r], gemm_oracle(xq3[g, :r], xs3[g, :r], wq3[g], ws3[g]),
                                   f"tma_store masked group {g}", 34)
        assert torch.isnan(out[g, r:].float()).all(), f"group {g}: rows >= masked_m must not be written"


def test_where_tma_cannot_store_the_launcher_uses_registers():
    """The rule (fp8_gemm_config.tma_store_possible): N * sizeof(out) a multiple of 16 bytes, else
    registers at plan time; a bad epilogue name is refused naming the argument."""
    spec, _ = launcher.select("dense", "wgmma", 64, 260, 256, "bf16", "blk128", epilogue="tma_store")
    assert spec.epilogue == "registers", "520-byte rows: no TMA row stride"
    spec, _ = launcher.select("dense", "wgmma", 64, 260, 256, "fp32", "blk128", epilogue="tma_store")
    assert spec.epilogue == "tma_store", "1040-byte rows: TMA can"
    assert launcher.select("dense", "wgmma", 64, 264, 256, "bf16", "blk128")[0].epilogue == "registers", "the default"
    with pytest.raises(fmo.InputError, match="^epilogue: expected one of"):
        launcher.select("dense", "wgmma", 64, 264, 256, "bf16", "blk128", epilogue="smem")


@SIM
def test_misaligned_out_runs_the_registers_twin():
    """A caller's `out` 8 bytes off a 16-byte boundary: TMA cannot store it (the map wants a
    16-byte aligned address), so the plan runs its registers variant, per call, correctly."""
    m, n, k = 70, 64, 256
    spec = _spec("dense", "bf16", 64, 64)
    raw = torch.empty(m * n + 4, dtype=torch.bfloat16)
    out = poison_(raw[4:].view(m, n))
    assert out.data_ptr() % 16 == 8
    y, oracle = _run_dense(spec, m, n, k, 35, ctas=2, out=out)
    assert_close_to_oracle(y, oracle, "tma_store plan, misaligned out", 35)


@SIM
def test_overwriting_staging_before_the_store_read_it_fails():
    """The bug the issuer's tma_store_wait before each tile's staging writes prevents, built in
    on purpose (unsafe_store_reuse): the simulator performs a TMA store at the wait that retires
    it (strict: a store never waited for is lost), so one CTA's earlier tiles get a later tile's
    values. The same spec with the wait passes (so the failure is the bug's)."""
    spec = _spec("dense", "fp32", 64, 64, unsafe_store_reuse=True)
    y, oracle = _run_dense(spec, 64, 192, 128, 36, ctas=1)
    with pytest.raises(AssertionError):
        assert_close_to_oracle(y, oracle, "staging reused early", 36)
    y, oracle = _run_dense(dataclasses.replace(spec, unsafe_store_reuse=False), 64, 192, 128, 36, ctas=1)
    assert_close_to_oracle(y, oracle, "staging reused after the wait", 36)
