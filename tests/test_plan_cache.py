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
    assert seen[1][1][0] == 12 < seen[0][1][0], f"the persistent grid must follow the budget: {seen[:2]}"
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
