"""A warm call takes the fast path: its plan comes from the cache, so validation, spec
construction and heuristics do not run again; a change of anything the key covers (shape,
dtype, strides, SM budget, options) misses and builds a new plan. Checks on values the key
cannot capture (varlen offsets, a TMA address's alignment) still run on every call.

The kernels' execution is replaced by a recorder (the simulator's loaded-function lookup
returns it): these tests count host-side work, the numerics are tested elsewhere, and no
kernel is compiled here (~1 s in all)."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import budget
from fastmoe_ops.errors import InputError
from fastmoe_ops.ops import attention, fp8_gemm, fp8_quant
from fastmoe_ops.reference import fp8 as reference
from fastmoe_ops.runtime import fast_launch, launch, tensor_map

pytestmark = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")


class _Recorder:
    """Stands in for a loaded simulator function: records the launch, runs nothing."""

    num_params = 1

    def __init__(self, launches, spec):
        self.launches, self.spec = launches, spec

    def __call__(self, grid, block, args, shared_mem=0, extra_ranges=()):
        self.launches.append((self.spec, grid))


@pytest.fixture(autouse=True, params=["fast_launch", "python"])
def cold_plan_caches(request, monkeypatch):
    """Every test starts with empty plan caches: what it counts must not depend on which
    earlier test (in the same process) already planned the same signature. Each runs with
    the C++ fast launch path (a hit there skips the Python cache too) and without it."""
    monkeypatch.setenv("FMO_FAST_LAUNCH", "1" if request.param == "fast_launch" else "0")
    monkeypatch.setattr(fp8_quant, "_shape_plans", {})
    for cache in (fp8_gemm._plans, attention._dense, attention._varlen):
        cache.clear()
    fast_launch.clear_all()


@pytest.fixture
def launches(monkeypatch):
    seen = []
    monkeypatch.setattr(launch, "sim_function", lambda spec, traced=False: _Recorder(seen, spec))
    return seen


def counted(monkeypatch, module, name):
    """Replace module.name by a wrapper counting its calls; returns the list of calls."""
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_quantiser_repeat_skips_validation_and_spec_choice(monkeypatch, launches):
    validated = counted(monkeypatch, fp8_quant, "_validate")
    specs = counted(monkeypatch, fp8_quant, "choose_spec")
    x = _bf16(3, 256, seed=1)
    with fmo.use_backend("sim"):
        for _ in range(3):
            fp8_quant.quantize_per_token_group(x)
        fp8_quant.quantize_per_token_group(_bf16(3, 256, seed=2))   # other data, same signature
        assert (len(validated), len(specs), len(launches)) == (1, 1, 4)
        padded = _bf16(3, 264, seed=3)[:, :256]                    # same shape, row stride 264
        for changed in (_bf16(5, 256), x.half(), padded):           # shape, dtype, strides: a miss each
            fp8_quant.quantize_per_token_group(changed)
        fp8_quant.quantize_per_token_group(x, pow2_scale=True)      # an option: a miss
        assert (len(validated), len(specs)) == (5, 5)
        fp8_quant.quantize_per_token_group(x)                       # the first signature again: a hit
        assert len(validated) == 5 and launches[-1][0] == launches[0][0]


def test_gemm_repeat_skips_validation_and_heuristics(monkeypatch, launches):
    planned = counted(monkeypatch, fp8_gemm, "_dense_plan")
    selected = counted(monkeypatch, fp8_gemm, "select")
    xq, xs = reference.quantize_per_token_group(_bf16(4, 256, seed=4).float())
    wq, ws = reference.quantize_per_block(_bf16(256, 256, seed=5).float())
    with fmo.use_backend("sim"):
        for _ in range(3):
            fmo.fp8.gemm(xq, xs, wq, ws)
        assert (len(planned), len(selected), len(launches)) == (1, 1, 3)
        xq2, xs2 = reference.quantize_per_token_group(_bf16(6, 256, seed=6).float())
        fmo.fp8.gemm(xq2, xs2, wq, ws)                                      # shape
        fmo.fp8.gemm(xq, xs, wq, ws, torch.float32)                         # output dtype
        one = xq[:1].as_strided((1, 256), (512, 1))                         # contiguous, another stride
        fmo.fp8.gemm(one, xs[:1], wq, ws)                                    # (and another M)
        fmo.fp8.gemm(one.as_strided((1, 256), (256, 1)), xs[:1], wq, ws)    # only the stride differs
        assert len(planned) == len(selected) == 5
        with budget.comm_sms(120), budget.communication_in_flight():        # the SM budget
            fmo.fp8.gemm(xq, xs, wq, ws)
        assert len(selected) == 6
        assert launches[-1][1][0] <= 12 < launches[0][1][0], "the persistent grid follows the budget"
        fmo.fp8.gemm(xq, xs, wq, ws)                                         # back: the first plan
        assert len(selected) == 6 and launches[-1] == launches[0]


def test_attention_repeat_skips_validation_offsets_still_checked(monkeypatch, launches):
    validated = counted(monkeypatch, attention, "validate")
    q, k, v = _bf16(1, 1, 8, 128, seed=7), _bf16(1, 64, 1, 128, seed=8), _bf16(1, 64, 1, 128, seed=9)
    with fmo.use_backend("sim"):
        for _ in range(3):
            fmo.flash_attn(q, k, v, causal=True)
        assert (len(validated), len(launches)) == (1, 3)
        fmo.flash_attn(q, k[:, :32], v[:, :32], causal=True)   # shape (and strides)
        fmo.flash_attn(q, k, v, causal=False)                   # an option
        assert len(validated) == 3

        q2, k2, v2 = q.view(1, 8, 128).expand(2, 8, 128).contiguous(), k[0], v[0]
        cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
        cu_k = torch.tensor([0, 40, 64], dtype=torch.int32)
        for _ in range(3):
            fmo.flash_attn_varlen(q2, k2, v2, cu_q, cu_k, 1, 40, causal=True)
        assert len(validated) == 4
        fmo.flash_attn_varlen(q2, k2, v2, cu_q, cu_k, 1, 48, causal=True)  # max_seqlen: in the key
        assert len(validated) == 5
        cu_k[1] = 10   # the same tensor written: a warm signature, but sequences of 10 and 54 keys
        with pytest.raises(InputError, match=r"^max_seqlen_k: expected an int >= the longest sequence \(54\)"):
            fmo.flash_attn_varlen(q2, k2, v2, cu_q, cu_k, 1, 40, causal=True)
        cu_k[1] = 70   # decreasing offsets
        with pytest.raises(InputError, match="^cu_seqlens_k: expected non-decreasing"):
            fmo.flash_attn_varlen(q2, k2, v2, cu_q, cu_k, 1, 80, causal=True)
    assert len(launches) == 9  # 5 dense, 4 varlen: nothing launched for the refused calls


def test_tensor_map_geometry_cache_keeps_every_check():
    base = torch.zeros(4 * 128 + 16, dtype=torch.float8_e4m3fn)
    a = base[:4 * 128].view(4, 128)
    b = base[16:16 + 4 * 128].view(4, 128)   # same geometry, another 16-byte aligned address
    first = tensor_map.encode_tiled(a, (128, 4), swizzle=128, engine="sim")
    again = tensor_map.encode_tiled(b, (128, 4), swizzle=128, engine="sim")    # a hit: the address patched in
    assert again == tensor_map._encode(b, (128, 4), 128, "zero", "sim") != first
    assert tensor_map.descriptor(again)[1] == b.data_ptr()
    shifted = base[1:1 + 4 * 128].view(4, 128)   # the cached geometry at an unaligned address
    with pytest.raises(InputError, match="address must be 16-byte aligned"):
        tensor_map.encode_tiled(shifted, (128, 4), swizzle=128, engine="sim")
    with pytest.raises(InputError, match="box: expected 2 ints"):  # 128.0 == 128: must not hit
        tensor_map.encode_tiled(a, (128.0, 4), swizzle=128, engine="sim")
    with pytest.raises(InputError, match="swizzle: expected one of"):  # unhashable: the full check
        tensor_map.encode_tiled(a, (128, 4), swizzle=[128], engine="sim")
    with pytest.raises(InputError, match="expected 128 bytes"):
        tensor_map.descriptor(first[:64])
