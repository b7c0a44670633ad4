"""The GEMMs' per-signature plans (fastmoe_ops/runtime/plans.py) never let an input past
validation that the uncached path would refuse, and follow everything that changes the
launch: the engine, the SM budget, the options, strides, dtypes and devices."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import budget
from fastmoe_ops.ops import fp8_gemm, fp8_gemm_grouped
from fastmoe_ops.runtime import launch

from fp8_gemm_util import assert_close_to_oracle, gemm_oracle, quantised_operands


def recorded_launches(monkeypatch):
    seen = []
    real = launch.launch

    def record(spec, config, params, *, engine, tensors):
        seen.append((spec, config.grid, engine))
        return real(spec, config, params, engine=engine, tensors=tensors)

    monkeypatch.setattr(fp8_gemm, "launch", record)
    return seen


def bad_variants(xq, xs, wq, ws):
    """(argument named in the error, operands): each differs from the good call in one way
    that validation refuses, with the good call's shapes where possible."""
    strided = torch.empty(xq.shape[0], xq.shape[1] * 2, dtype=xq.dtype)[:, ::2]  # same shape, not contiguous
    strided.copy_(xq)
    return [
        ("xq", (strided, xs, wq, ws)),
        ("xs", (xq, xs.double(), wq, ws)),
        ("ws", (xq, xs, wq, ws.t().contiguous().t())),       # same shape and dtype, strides differ
        ("wq", (xq, xs, wq.view(torch.uint8), ws)),
        ("xs", (xq, xs[:, :1], wq, ws)),
    ]


@pytest.mark.parametrize("engine", ["sim", "reference"])
def test_warm_gemm_still_refuses_bad_input(engine):
    xq, xs, wq, ws = quantised_operands(16, 256, 256, 31)  # ws [2, 2]: a transposed view differs in strides
    with fmo.use_backend(engine):
        for _ in range(2):
            fmo.fp8.gemm(xq, xs, wq, ws)  # the signature is cached now
        for arg, operands in bad_variants(xq, xs, wq, ws):
            with pytest.raises(fmo.InputError, match=rf"^{arg}: expected"):
                fmo.fp8.gemm(*operands)
        with pytest.raises(fmo.InputError, match="^out_dtype: expected"):
            fmo.fp8.gemm(xq, xs, wq, ws, torch.float16)
        with pytest.raises(fmo.InputError, match="^out: expected"):
            fmo.fp8.gemm(xq, xs, wq, ws, out=torch.empty(16, 255, dtype=torch.bfloat16))


def test_plans_follow_engine_budget_and_options(monkeypatch):
    seed = 32
    xq, xs, wq, ws = quantised_operands(64, 1024, 256, seed)
    seen = recorded_launches(monkeypatch)
    with fmo.use_backend("sim"):
        y_sim = fmo.fp8.gemm(xq, xs, wq, ws, torch.float32)
        with fmo.use_backend("reference"):       # same signature, another engine: no launch
            y_ref = fmo.fp8.gemm(xq, xs, wq, ws, torch.float32)
        assert len(seen) == 1 and seen[0][2] == "sim"
        with budget.comm_sms(120), budget.communication_in_flight():   # 12 SMs left for compute
            fmo.fp8.gemm(xq, xs, wq, ws, torch.float32)
        fmo.fp8.gemm(xq, xs, wq, ws, torch.float32, kernel="mma_sync")
        fmo.fp8.gemm(xq, xs, wq, ws, torch.float32)
    # The cost model may pick another tile for 12 SMs (fewer, larger tiles in one wave), so the
    # budget's mark is a grid within those 12 SMs where the whole machine's plan used more.
    assert seen[1][1][0] <= 12 < seen[0][1][0], f"the persistent grid must follow the budget: {seen[:2]}"
    assert seen[2][0].op != seen[0][0].op, "kernel= must choose the other kernel"
    assert seen[3] == seen[0], "back to the first signature: the first plan"
    oracle = gemm_oracle(xq, xs, wq, ws)
    assert_close_to_oracle(y_sim, oracle, "sim", seed)
    assert_close_to_oracle(y_ref, oracle, "reference", seed)


def test_masked_plan_follows_expected_m(monkeypatch):
    from fp8_gemm_util import expert_weights

    wq3, ws3 = expert_weights(4, 1024, 128, 33)
    xq, xs, _, _ = quantised_operands(4 * 80, 16, 128, 33)
    xq3, xs3 = xq.view(4, 80, 128), xs.view(4, 80, 1)
    masked_m = torch.tensor([80, 3, 0, 41], dtype=torch.int32)
    seen = recorded_launches(monkeypatch)
    # 12 SMs for compute: 80 rows per group take 128-row tiles, 8 expected rows 64-row ones
    with fmo.use_backend("sim"), budget.comm_sms(120), budget.communication_in_flight():
        fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m)
        fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, expected_m=8)
        with pytest.raises(fmo.InputError, match="^masked_m: expected"):
            fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m.long())
    assert seen[0][0] != seen[1][0], f"expected_m feeds the tile heuristic: {seen}"


def test_a_bad_call_caches_nothing():
    xq, xs, wq, ws = quantised_operands(16, 128, 256, 34)
    before = len(fp8_gemm._plans._plans)
    with fmo.use_backend("sim"), pytest.raises(fmo.InputError):
        fmo.fp8.gemm(xq, xs.double(), wq, ws)
    assert len(fp8_gemm._plans._plans) == before
    assert fp8_gemm_grouped._plans is not fp8_gemm._plans


def test_warm_attention_still_refuses_bad_input_and_follows_options():
    from attention_util import make_inputs
    from fastmoe_ops.reference import attention as ref_attn

    q, k, v, _ = make_inputs(1, 5, 9, 2, 1, 64, torch.bfloat16, 35)
    with fmo.use_backend("sim"):
        for _ in range(2):
            fmo.flash_attn(q, k, v, causal=True)   # cached
        with pytest.raises(fmo.InputError, match="^v: expected"):
            fmo.flash_attn(q, k, v.float())
        with pytest.raises(fmo.InputError, match="^k: expected"):
            fmo.flash_attn(q, torch.empty(1, 9, 1, 128, dtype=k.dtype)[..., ::2].copy_(k), v)  # same shape, strided
        with pytest.raises(fmo.InputError, match="^softmax_scale: expected"):
            fmo.flash_attn(q, k, v, softmax_scale=float("nan"))
        with pytest.raises(fmo.InputError, match="^softmax_scale: expected"):
            fmo.flash_attn(q, k, v, softmax_scale=[0.1])
        got = {c: fmo.flash_attn(q, k, v, causal=c, softmax_scale=0.3) for c in (True, False)}
        unaligned = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape).copy_(q)   # 2-byte offset: cloned
        again = fmo.flash_attn(unaligned, k, v, causal=True, softmax_scale=0.3)
        with fmo.use_backend("reference"):
            ref = {c: fmo.flash_attn(q, k, v, causal=c, softmax_scale=0.3) for c in (True, False)}
    for c in (True, False):
        want, _ = ref_attn.attention(q.double(), k.double(), v.double(), causal=c, softmax_scale=0.3)
        for name, y in (("sim", got[c]), ("reference", ref[c])):
            err = (y.double() - want).abs().max().item()
            assert err < 2e-2, f"causal={c} {name}: max error {err} (seed 35)"
    assert torch.equal(again, got[True]), "an unaligned q (copied to an aligned buffer) must give the same result"


@pytest.mark.parametrize("name", ["quantize_per_block", "quantize_per_token_group_transposed"])
def test_warm_quantisers_keep_validation_and_follow_alignment(name):
    from fastmoe_ops.reference import fp8 as ref

    fn, reffn = getattr(fmo.fp8, name), getattr(ref, name)
    g = torch.Generator().manual_seed(36)
    base = torch.randn(48, 264, generator=g).to(torch.bfloat16)
    dense = base[:, :256].contiguous()
    shifted = base.reshape(-1)[1:1 + 48 * 256].view(48, 256)   # 2-byte offset: the unvectorised variant
    with fmo.use_backend("sim"):
        for x in (dense, shifted, base[:, :256], dense):
            q, s = fn(x, 32)
            rq, rs = reffn(x, 32)
            assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs), \
                f"{name}: strides {x.stride()}, offset {x.storage_offset()} (seed 36)"
        for bad, arg in ((dict(eps=float("nan")), "eps"), (dict(eps=1), "eps"), (dict(pow2_scale=1), "pow2_scale")):
            with pytest.raises(fmo.InputError, match=f"^{arg}: expected"):
                fn(dense, 32, **bad)
        with pytest.raises(fmo.InputError):
            fn(dense, [32])   # unhashable: no key, validation refuses it


def test_varlen_offsets_are_read_again_after_a_change():
    from attention_util import make_inputs

    q, k, v, _ = make_inputs(1, 6, 9, 2, 1, 64, torch.bfloat16, 37, varlen_cu=True)
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    with fmo.use_backend("sim"):
        fmo.flash_attn_varlen(q, k, v, cu_q, cu_k, 4, 5)
        with pytest.raises(fmo.InputError, match="^max_seqlen_k: expected an int >= the longest sequence \\(5\\)"):
            fmo.flash_attn_varlen(q, k, v, cu_q, cu_k, 4, 4)      # checked against the remembered read
        cu_k[1] = 7                                                 # in place: [0, 7, 9], the longest now 7
        with pytest.raises(fmo.InputError, match="^max_seqlen_k: expected an int >= the longest sequence \\(7\\)"):
            fmo.flash_attn_varlen(q, k, v, cu_q, cu_k, 4, 5)
        cu_k[1] = 10                                                # 10 > 9: decreasing offsets
        with pytest.raises(fmo.InputError, match="^cu_seqlens_k: expected non-decreasing offsets"):
            fmo.flash_attn_varlen(q, k, v, cu_q, cu_k, 4, 9)
        view = cu_q[:]                                              # a write through a view bumps the same version
        view[2] = 5
        with pytest.raises(fmo.InputError, match="^cu_seqlens_q: expected last offset 6"):
            fmo.flash_attn_varlen(q, k, v, cu_q, torch.tensor([0, 4, 9], dtype=torch.int32), 4, 5)
