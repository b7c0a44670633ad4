"""FP8 per-block (weight) quantisation: every engine against an independent float64 model
of the e4m3 recipe, and the kernel (sim) bit-exact against the PyTorch reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal, cpu_engines
from fp8_contract import e4m3_model

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def model_quantize_blocks(w: np.ndarray, block: int, pow2: bool, eps: float = 1e-12):
    """Independent float64/numpy model: loops over blocks, no shared code with the reference."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    ws = np.empty((nb, kb), np.float32)
    wq = np.empty((n, k), np.float64)
    for i in range(nb):
        for j in range(kb):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].astype(np.float32)
            a = np.abs(blk)
            amax = np.float32(np.where(np.isfinite(a), a, 0).max())
            scale = np.float32(np.maximum(amax, np.float32(eps)) / np.float32(448.0))
            if pow2:
                scale = np.float32(2.0 ** np.ceil(np.log2(np.float64(scale))))
            ws[i, j] = scale
            with np.errstate(invalid="ignore"):
                wq[i * block:(i + 1) * block, j * block:(j + 1) * block] = e4m3_model((blk / scale).astype(np.float32).astype(np.float64))
    return wq, ws


def check_against_model(w, block, pow2, engine, seed):
    with fmo.use_backend(engine):
        wq, ws = fmo.fp8.quantize_per_block(w, block, pow2_scale=pow2)
    assert wq.dtype == torch.float8_e4m3fn and ws.dtype == torch.float32
    assert ws.shape == (math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block))
    mq, ms = model_quantize_blocks(w.float().numpy(), block, pow2)
    np.testing.assert_array_equal(ws.numpy(), ms, err_msg=f"scales, engine {engine}, shape {tuple(w.shape)}, seed {seed}")
    got = wq.double().numpy()
    bad = ~(np.isnan(got) & np.isnan(mq)) & (got != mq)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise AssertionError(f"wq differs from the model at {(int(i), int(j))}: got {got[i, j]}, want {mq[i, j]} "
                             f"(engine {engine}, shape {tuple(w.shape)}, block {block}, seed {seed})")


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(128, 128), (130, 200), (40, 264), (1, 8)])
def test_block_quant_matches_model(engine, dtype, shape):
    seed = 11 + shape[0] * 7 + shape[1]
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, so per-block amax differs from block to block.
    w = (torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[0])[:, None]).to(dtype)
    check_against_model(w, 128, False, engine, seed)


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("block", [32, 64])
def test_block_sizes_and_pow2(engine, block):
    seed = 5 + block
    w = torch.randn(3 * block + 5, 2 * block + 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    check_against_model(w, block, True, engine, seed)


@pytest.mark.parametrize("engine", cpu_engines())
def test_block_edge_values(engine):
    """All-zero block, huge, +-inf, NaN, subnormals; NaN does not spread to its block."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    w[:128, :128] = 0.0
    w[:128, 128:] *= 1e30; w[5, 130] = -3e38
    w[128, 3] = float("inf"); w[130, 4] = float("-inf"); w[140, 5] = float("nan")
    w[128:, 128:] = torch.randn(128, 128) * 1e-40
    check_against_model(w, 128, False, engine, 3)
    with fmo.use_backend(engine):
        wq, ws = fmo.fp8.quantize_per_block(w)
    assert torch.all(ws > 0) and torch.all(torch.isfinite(ws))
    assert torch.all(wq[:128, :128].float() == 0)
    assert wq[128, 3].float().item() == 448.0 and wq[130, 4].float().item() == -448.0
    assert math.isnan(wq[140, 5].float().item())
    assert torch.isnan(wq.float()).sum().item() == 1


@SIM
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "misaligned"])
def test_sim_bitexact_vs_reference(dtype, layout):
    seed = 21
    base = torch.randn(150, 270, generator=torch.Generator().manual_seed(seed)).to(dtype) * 5
    w = {"contiguous": base[:, :256].contiguous(), "row_strided": base[:, 8:264], "misaligned": base[:, 1:258]}[layout]
    for pow2 in (False, True):
        with fmo.use_backend("sim"):
            wq, ws = fmo.fp8.quantize_per_block(w, 128, pow2_scale=pow2)
        rq, rs = ref.quantize_per_block(w, 128, pow2_scale=pow2)
        assert_bitwise_equal(ws, rs, f"scales ({layout}, {dtype}, pow2={pow2})", seed)
        assert_bitwise_equal(wq, rq, f"values ({layout}, {dtype}, pow2={pow2})", seed)


def test_transposed_weight_is_transposed_quantisation():
    """The backward's w^T: quantising w^T per block equals transposing w's quantisation."""
    w = torch.randn(200, 136, generator=torch.Generator().manual_seed(4))
    for engine in cpu_engines():
        with fmo.use_backend(engine):
            wq, ws = fmo.fp8.quantize_per_block(w)
            tq, ts = fmo.fp8.quantize_per_block(w.t().contiguous())
        assert_bitwise_equal(tq, wq.t().contiguous(), f"values ({engine})", 4)
        assert_bitwise_equal(ts, ws.t().contiguous(), f"scales ({engine})", 4)


def test_empty_and_bad_input():
    for engine in cpu_engines():
        with fmo.use_backend(engine):
            wq, ws = fmo.fp8.quantize_per_block(torch.empty(0, 256))
        assert wq.shape == (0, 256) and ws.shape == (0, 2)
    with pytest.raises(fmo.InputError, match="^w: expected dtype"):
        fmo.fp8.quantize_per_block(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(fmo.InputError, match="^w: expected a contiguous last dimension"):
        fmo.fp8.quantize_per_block(torch.randn(128, 4).t())
    with pytest.raises(fmo.InputError, match="^block_size: expected one of"):
        fmo.fp8.quantize_per_block(torch.randn(4, 4), 100)
