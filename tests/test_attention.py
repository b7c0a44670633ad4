"""Fused attention on the simulator (the kernels' own CUDA source) against float64, by
FlashAttention's rule (tests/attention_util.py, shared with the GPU tests): out, dq, dk and dv
within twice the error of PyTorch's same-dtype computation plus rounding, lse within 1e-3 of
float64 and -inf exactly where the row sees no key. NaN never; outputs are poisoned before
every run.

Forward and backward: where the simulator (which models sm_90a) takes the Hopper kernel
(hopper_fwd.cuh, hopper_bwd.cuh: D 64, 128 and MLA's 192/128), check_case runs the mma.sync
kernel too (what other archs run); tests/test_attention_hopper.py and
test_attention_hopper_bwd.py have the Hopper kernels' own cases.

The default run is a representative subset (~1-2 minutes on 2 cores); the full grid of
the issue (B {1, 2} x S {1, 17, 128, 257} x D {64, 128} x Hq/Hkv x causal x dtype) is
behind `-m slow`.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import attention as launcher
from fastmoe_ops.ops import attention_hopper as hopper
from fastmoe_ops.ops import attention_hopper_bwd as hbwd
from fastmoe_ops.reference import attention as ref
from fastmoe_ops.runtime import launch as runtime_launch

from attention_util import (assert_lse, assert_uniform_mean, assert_within_rule, make_inputs, oracle_and_pytorch,
                            uniform_inputs)

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def check_case(b, sq, sk, hq, hkv, d, causal, dtype, seed=0, backward=True, dv=None, both_kernels=True):
    ctx = f"B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} D={d} Dv={dv or d} causal={causal} {dtype} seed={seed}"
    q, k, v, dout = make_inputs(b, sq, sk, hq, hkv, d, dtype, seed, dv=dv)
    (o_out, o_lse, o_dq, o_dk, o_dv), (p_out, _, p_dq, p_dk, p_dv) = oracle_and_pytorch(q, k, v, dout, causal)
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None)
    # Both forward kernels where the simulator (sm_90a) would take the wgmma one; the backward
    # consumes the last (the default choice's) out and lse.
    # both_kernels=False: the default choice's alone.
    kernels = ["mma_sync", None] if both_kernels and isinstance(launcher.forward_launch(pb), hopper.HopperForwardLaunch) \
        else [None]
    for kernel in kernels:
        out, lse = launcher.forward(pb, "sim", kernel)
        out = out.reshape(o_out.shape)
        assert_within_rule("out", out, o_out, p_out, dtype, f"{ctx} {kernel or 'default'} forward")
        assert_lse(lse, o_lse.double(), f"{ctx} {kernel or 'default'} forward")
    if backward:  # both backward kernels, likewise
        for kernel in ["mma_sync", None] if both_kernels and hbwd.resolve_kernel(pb, "sim", None) == "wgmma" else [None]:
            dq, dk, dv = launcher.backward(pb, dout, out, lse, "sim", kernel)
            for name, got, want, pt in (("dq", dq, o_dq, p_dq), ("dk", dk, o_dk, p_dk), ("dv", dv, o_dv, p_dv)):
                assert_within_rule(name, got.reshape(want.shape), want, pt, dtype, f"{ctx} {kernel or 'default'} backward")


@SIM
@pytest.mark.parametrize("causal", [False, True])
def test_structured_uniform_attention(causal):
    """attention_util.uniform_inputs: out is the mean of v over the keys each row sees (both
    forward kernels where the simulator has two)."""
    b, sq, sk, hq, hkv, d = 1, 70, 100, 4, 2, 64
    q, k, v = uniform_inputs(b, sq, sk, hq, hkv, d)
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None)
    for kernel in ("mma_sync", "wgmma"):
        out, lse = launcher.forward(pb, "sim", kernel)
        assert_uniform_mean(out.reshape(b, sq, hq, d), lse, sq, sk, hq, hkv, causal)


# (B, Sq, Sk, Hq, Hkv, D, causal, dtype): every axis of the grid appears, kept small.
CASES = [
    (1, 1, 1, 1, 1, 64, False, torch.bfloat16),
    (2, 17, 17, 4, 1, 64, True, torch.float16),      # MQA, ragged tile
    (1, 128, 128, 8, 8, 64, True, torch.bfloat16),   # full tiles, many heads
    (1, 257, 129, 4, 2, 128, True, torch.bfloat16),  # Sq > Sk: rows that see no key
    (2, 17, 128, 8, 4, 128, False, torch.float16),   # Sq < Sk
    (1, 128, 257, 1, 1, 64, True, torch.float16),
    (1, 257, 257, 2, 1, 128, False, torch.bfloat16),
]


@SIM
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_sk{}_h{}-{}_d{}_{}_{}".format(*c[:6], "causal" if c[6] else "full", str(c[7])[6:]))
def test_kernels_vs_float64(case):
    check_case(*case)


@SIM
@pytest.mark.parametrize("causal", [False, True])
def test_mla_head_dims(causal, monkeypatch):
    """MLA prefill: q/k head dim 192 (128 nope + 64 rope), v head dim 128; Sq != Sk, GQA. Both
    backwards: the mma.sync passes (forced) and the default, the sm_90a wgmma kernel."""
    launches = _count_launches(monkeypatch)
    check_case(1, 40, 75, 4, 2, 192, causal, torch.bfloat16, seed=21, dv=128)
    names = [getattr(s, "kernel", s.op) for s in launches]
    assert names[-5:] == ["bwd_delta", "bwd_dq", "bwd_dkdv", "bwd_delta", "attn_bwd_sm90"], names


@SIM
@pytest.mark.slow
@pytest.mark.parametrize("b, s, d, heads, causal, dtype", list(itertools.product(
    (1, 2), (1, 17, 128, 257), (64, 128), ((1, 1), (4, 1), (8, 4), (8, 8)), (False, True), (torch.bfloat16, torch.float16))))
def test_kernels_vs_float64_full_grid(request, b, s, d, heads, causal, dtype):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full grid runs with -m slow")
    # The default (sm_90a) kernels on every case; the mma.sync ones (the sm_80/sm_89 path, also
    # in every fast case above, S 257 included) on the fp16 half of the grid up to S 128: all
    # four kernels on every case took the simulator about 24 minutes, and the fp16 half with
    # S 257 kept CI near 30.
    both = dtype == torch.float16 and s <= 128
    check_case(b, s, s, *heads, d, causal, dtype, seed=b * 1000 + s, both_kernels=both)
    check_case(b, s, max(1, s // 2 + 3), *heads, d, causal, dtype, seed=b * 1000 + s + 1, both_kernels=both)  # Sq != Sk


@SIM
@pytest.mark.parametrize("d, dtype, causal", [(64, torch.bfloat16, True), (128, torch.float16, False)])
def test_varlen_with_empty_sequences(d, dtype, causal):
    cu_q = torch.tensor([0, 0, 17, 145, 145, 150], dtype=torch.int32)  # empty q, and a q with no keys
    cu_k = torch.tensor([0, 5, 5, 133, 150, 150], dtype=torch.int32)
    total_q, total_k, hq, hkv = 150, 150, 4, 2
    ctx = f"varlen D={d} {dtype} causal={causal}"
    q, k, v, dout = make_inputs(1, total_q, total_k, hq, hkv, d, dtype, 7, varlen_cu=True)
    (o_out, o_lse, o_dq, o_dk, o_dv), (p_out, _, p_dq, p_dk, p_dv) = oracle_and_pytorch(q, k, v, dout, causal, (cu_q, cu_k))
    with fmo.use_backend("sim"):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out, lse = fmo.flash_attn_varlen(qg, kg, vg, cu_q, cu_k, 128, 128, causal=causal, return_lse=True)
        out.backward(dout)
    assert lse.shape == (hq, total_q)
    assert_within_rule("out", out.detach(), o_out, p_out, dtype, ctx)
    assert_lse(lse, o_lse.double(), ctx)
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=128, max_seqlen_k=128)
    forced = launcher.backward(pb, dout, out.detach(), lse, "sim", "mma_sync")  # the public call took the wgmma one
    for kernel, (dq, dk, dv) in (("default", (qg.grad, kg.grad, vg.grad)), ("mma_sync", forced)):
        for name, got, want, pt in (("dq", dq, o_dq, p_dq), ("dk", dk, o_dk, p_dk), ("dv", dv, o_dv, p_dv)):
            assert_within_rule(name, got.reshape(want.shape), want, pt, dtype, f"{ctx} {kernel} backward")
        assert torch.all(dk[133:150] == 0), kernel  # keys no query sees: zero gradient


@SIM
def test_public_function_autograd_and_determinism():
    """fmo.flash_attn on the simulator: autograd end to end against float64 (the wgmma backward),
    and the mma.sync backward (dQ in its own pass, no atomics) is bit-for-bit reproducible."""
    q, k, v, dout = make_inputs(2, 33, 40, 4, 2, 64, torch.bfloat16, 3)
    (_, _, o_dq, o_dk, o_dv), (_, _, p_dq, p_dk, p_dv) = oracle_and_pytorch(q, k, v, dout, True)
    with fmo.use_backend("sim"):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out, lse = fmo.flash_attn(qg, kg, vg, causal=True, return_lse=True)
        out.backward(dout)
    for name, got, want, pt in (("dq", qg.grad, o_dq, p_dq), ("dk", kg.grad, o_dk, p_dk), ("dv", vg.grad, o_dv, p_dv)):
        assert_within_rule(name, got, want, pt, torch.bfloat16, "flash_attn autograd")
    assert lse.shape == (2, 4, 33) and lse.dtype == torch.float32
    pb = launcher.problem(q, k, v, causal=True, softmax_scale=None)
    runs = [launcher.backward(pb, dout, out.detach(), lse, "sim", "mma_sync") for _ in range(2)]
    for name, a, b_ in zip(("dq", "dk", "dv"), *runs):
        assert torch.equal(a, b_), f"mma_sync {name} differs between two runs"


def _count_launches(monkeypatch) -> list:
    """Records the spec of every kernel launch of the attention launchers (Plan.run: runtime.launch's)."""
    launches = []
    for mod in (launcher, hopper, hbwd, runtime_launch):
        real = mod.launch
        monkeypatch.setattr(mod, "launch", lambda *a, _real=real, **kw: launches.append(a[0]) or _real(*a, **kw))
    return launches


@SIM
def test_public_deterministic_flag_reaches_the_backward(monkeypatch):
    """flash_attn / flash_attn_varlen(deterministic=True) launch the wgmma backward's deterministic
    variant (dQ's adds in key-tile order), and two dense runs give the same bits; a non-bool is
    refused by name."""
    launches = _count_launches(monkeypatch)
    q, k, v, dout = make_inputs(2, 33, 140, 4, 2, 64, torch.bfloat16, 3)  # 3 key tiles add into each dQ row
    runs = []
    for _ in range(2):
        with fmo.use_backend("sim"):
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            out = fmo.flash_attn(qg, kg, vg, causal=True, deterministic=True)
            launches.clear()
            out.backward(dout)
        assert [s.deterministic for s in launches if s.op == "attn_bwd_sm90"] == [True], launches
        runs.append((qg.grad, kg.grad, vg.grad))
    for name, a, b_ in zip(("dq", "dk", "dv"), *runs):
        assert torch.equal(a, b_), f"deterministic {name} differs between two runs"
    cu = torch.tensor([0, 20, 66], dtype=torch.int32)
    qv, kv, vv, doutv = make_inputs(1, 66, 66, 2, 1, 128, torch.float16, 8, varlen_cu=True)
    with fmo.use_backend("sim"):
        qg = qv.clone().requires_grad_(True)
        out = fmo.flash_attn_varlen(qg, kv, vv, cu, cu, 46, 46, deterministic=True)
        launches.clear()
        out.backward(doutv)
    assert [s.deterministic for s in launches if s.op == "attn_bwd_sm90"] == [True], launches
    with pytest.raises(fmo.InputError, match=r"^deterministic: expected a bool"):
        fmo.flash_attn(q, k, v, deterministic=1)
    with pytest.raises(fmo.InputError, match=r"^deterministic: expected a bool"):
        fmo.flash_attn_varlen(qv, kv, vv, cu, cu, 46, 46, deterministic="yes")


def test_backward_kernel_choice():
    """A pure function of the arch and shapes: wgmma on sm_90a for its head dims with keys."""
    assert hbwd.backward_kernel("sm_90a", 64, 64, 1) == hbwd.backward_kernel("sm_90a", 128, 128, 9) == "wgmma"
    assert hbwd.backward_kernel("sm_90a", 192, 128, 9) == "wgmma"     # MLA prefill
    assert hbwd.backward_kernel("sm_90a", 256, 256, 9) == "mma_sync"  # no backward tiles (refused before)
    assert hbwd.backward_kernel("sm_90a", 64, 64, 0) == "mma_sync"    # no keys: no tensor map
    assert hbwd.backward_kernel("sm_80", 64, 64, 9) == hbwd.backward_kernel("sm_89", 128, 128, 9) == "mma_sync"


@SIM
def test_public_backward_runs_the_chosen_kernel_and_forcing_is_checked(monkeypatch):
    """fmo.flash_attn's backward on the simulator (sm_90a) launches the wgmma kernel for D 64 and
    MLA's (192, 128) alike; a forced kernel is checked by name before any launch (a forced 'wgmma'
    with no keys: no tensor map)."""
    launches = _count_launches(monkeypatch)
    for d, dv, want in ((64, None, ["bwd_delta", "attn_bwd_sm90"]), (192, 128, ["bwd_delta", "attn_bwd_sm90"])):
        q, k, v, dout = make_inputs(1, 9, 12, 2, 1, d, torch.bfloat16, 4, dv=dv)
        with fmo.use_backend("sim"):
            qg = q.clone().requires_grad_(True)
            out, lse = fmo.flash_attn(qg, k, v, causal=True, return_lse=True)
            launches.clear()
            out.backward(dout)
        assert [getattr(s, "kernel", s.op) for s in launches] == want, (d, launches)
    pb = launcher.problem(q, k, v, causal=True, softmax_scale=None)
    launches.clear()
    k0, v0 = k[:, :0], v[:, :0]  # no keys: no tensor map, so no wgmma backward
    pb0 = launcher.problem(q, k0, v0, causal=True, softmax_scale=None)
    with pytest.raises(fmo.InputError, match=r"^kernel: expected 'mma_sync' or None for head dims \(192, 128\) with 0 key"):
        launcher.backward(pb0, dout, out.detach(), lse, "sim", "wgmma")
    with pytest.raises(fmo.InputError, match=r"^kernel: expected one of \('wgmma', 'mma_sync'\)"):
        launcher.backward(pb, dout, out.detach(), lse, "sim", "fast")
    assert launches == []


@SIM
@pytest.mark.parametrize("d, dv", [(64, None), (192, 128)], ids=["d64", "mla"])
def test_memcheck_and_racecheck(d, dv, monkeypatch):
    """Every global access inside the launch's tensors, no shared-memory races (fwd + bwd; MLA: the
    wgmma backward's dK panel in shared memory too)."""
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    check_case(2, 20, 70, 2, 1, d, True, torch.bfloat16, seed=5, dv=dv)


def test_reference_engine_matches_oracle():
    q, k, v, dout = make_inputs(2, 9, 12, 4, 2, 64, torch.float16, 11)
    (o_out, o_lse, o_dq, o_dk, o_dv), (p_out, _, p_dq, p_dk, p_dv) = oracle_and_pytorch(q, k, v, dout, True)
    with fmo.use_backend("reference"):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out, lse = fmo.flash_attn(qg, kg, vg, causal=True, return_lse=True)
        out.backward(dout)
    assert_within_rule("out", out.detach(), o_out, p_out, torch.float16, "reference")
    assert_lse(lse, o_lse.double(), "reference")
    for name, got, want, pt in (("dq", qg.grad, o_dq, p_dq), ("dk", kg.grad, o_dk, p_dk), ("dv", vg.grad, o_dv, p_dv)):
        assert_within_rule(name, got, want, pt, torch.float16, "reference")


# ------------------------------------------------------------------------ bad input


def _bad_cases():
    bf = dict(dtype=torch.bfloat16)
    q, k, v = torch.zeros(1, 4, 4, 64, **bf), torch.zeros(1, 4, 2, 64, **bf), torch.zeros(1, 4, 2, 64, **bf)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    qv, kv = torch.zeros(4, 4, 64, **bf), torch.zeros(4, 2, 64, **bf)
    yield "q", "divisible by k's 3", (q, torch.zeros(1, 4, 3, 64, **bf), torch.zeros(1, 4, 3, 64, **bf)), {}
    yield "v", "2 heads", (q, k, torch.zeros(1, 4, 1, 64, **bf)), {}
    yield "q", "positive number of heads", (torch.zeros(1, 4, 0, 64, **bf), k, v), {}   # once crashed in a reshape
    yield "q", "head dim in", (torch.zeros(1, 4, 4, 96, **bf), torch.zeros(1, 4, 2, 96, **bf), torch.zeros(1, 4, 2, 96, **bf)), {}
    yield "q", "bfloat16 or float16", (q.float(), k.float(), v.float()), {}
    yield "k", "dtype of q", (q, k.half(), v), {}
    yield "q", "contiguous last dimension", (torch.zeros(1, 4, 64, 4, **bf).transpose(-1, -2), k, v), {}
    yield "k", "batch 1", (q, torch.zeros(2, 4, 2, 64, **bf), torch.zeros(2, 4, 2, 64, **bf)), {}
    yield "v", "head dim 64", (q, k, torch.zeros(1, 4, 2, 128, **bf)), {}
    yield "cu_seqlens_q", "non-decreasing", (qv, kv, kv, torch.tensor([0, 3, 2, 4], dtype=torch.int32), cu, 4, 4), {"varlen": 1}
    yield "cu_seqlens_k", "int32", (qv, kv, kv, cu, cu.long(), 2, 2), {"varlen": 1}
    yield "cu_seqlens_q", "last offset 4", (qv, kv, kv, torch.tensor([0, 2, 3], dtype=torch.int32), cu, 2, 2), {"varlen": 1}
    yield "max_seqlen_k", "longest sequence", (qv, kv, kv, cu, cu, 2, 1), {"varlen": 1}


@pytest.mark.parametrize("case", list(range(12)))
def test_bad_input_refused(case):
    arg, fragment, args, kw = list(_bad_cases())[case]
    fn = fmo.flash_attn_varlen if kw.pop("varlen", 0) else fmo.flash_attn
    with pytest.raises(fmo.InputError, match=rf"^{arg}: expected .*{fragment}"):
        fn(*args, **kw)


def test_spec_refuses_unsupported_and_names_kernels():
    spec = launcher.choose_spec("fwd", "bf16", 128, 128, True)
    assert spec.entry_name() == "fmo_attn_fwd_bf16_d128_bm64_bn64_causal"
    assert launcher.choose_spec("bwd_dq", "fp16", 192, 128, False).entry_name() == "fmo_attn_bwd_dq_fp16_d192v128_bm64_bn32"
    with pytest.raises(fmo.UnsupportedError, match="head_dim_v"):
        launcher.AttnSpec(kernel="fwd", dtype="bf16", head_dim=128, head_dim_v=64, block_m=64, block_n=64, causal=False).stub()
    assert len(list(launcher.standard_specs())) == 40


@SIM
@pytest.mark.parametrize("b, sq, sk", [(2, 5, 0), (2, 0, 5), (0, 3, 3)])
def test_empty_shapes(b, sq, sk):
    """No keys: out 0, lse -inf, gradients 0 (never NaN); no queries: dk = dv = 0; B = 0."""
    q = torch.randn(b, sq, 2, 64).bfloat16().requires_grad_(True)
    k = torch.randn(b, sk, 1, 64).bfloat16().requires_grad_(True)
    v = torch.randn(b, sk, 1, 64).bfloat16().requires_grad_(True)
    with fmo.use_backend("sim"):
        out, lse = fmo.flash_attn(q, k, v, causal=True, return_lse=True)
        out.float().sum().backward()
    assert out.shape == (b, sq, 2, 64) and lse.shape == (b, 2, sq)
    assert bool((out == 0).all()) and bool((lse == -math.inf).all())
    assert all(bool((t.grad == 0).all()) for t in (q, k, v))
    # the mma.sync backward forced: the same zeros (the default takes the wgmma one where keys exist)
    pb = launcher.problem(q.detach(), k.detach(), v.detach(), causal=True, softmax_scale=None)
    grads = launcher.backward(pb, torch.ones_like(out), out.detach(), lse, "sim", "mma_sync")
    assert all(g.shape == t.reshape(g.shape).shape and bool((g == 0).all()) for g, t in zip(grads, (q, k, v)))


@SIM
def test_misaligned_and_strided_inputs():
    """A 16-byte-misaligned q and a strided (non-contiguous, last dim contiguous) k."""
    base = torch.randn(9 * 2 * 64 + 3).bfloat16()
    q = base[3:].view(1, 9, 2, 64)                                  # data_ptr % 16 == 6
    k = torch.randn(1, 2, 9, 64).bfloat16().transpose(1, 2)        # [1, 9, 2, 64], strided
    v = torch.randn(1, 9, 2, 64).bfloat16()
    with fmo.use_backend("sim"):
        out = fmo.flash_attn(q, k, v)
    want, _ = ref.attention(q, k, v, compute_dtype=torch.float64)
    pt, _ = ref.attention(q, k, v, compute_dtype=torch.bfloat16)
    assert_within_rule("out", out, want, pt, torch.bfloat16, "misaligned q, strided k")
