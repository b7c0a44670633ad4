"""The sm_90a attention backward (csrc/attention/hopper_bwd.cuh: producer warp with TMA, two wgmma
consumer warpgroups of 64 keys each (BN 128), dQ by fp32 red.global.add) on the simulator, which
models sm_90a (TMA lands only when polled and poisons its destination until then, wgmma runs at
its wait).

dq, dk, dv against the float64 oracle's gradients by FlashAttention's rule (tests/attention_util.py:
within twice PyTorch's same-dtype error plus rounding; NaN never passes); the forward that makes
out and lse is the project's own. dk and dv come from torch.empty (poisoned by conftest: a row the
kernel leaves unwritten fails), dq from an fp32 buffer every contributing CTA adds into (a missing
key tile's share shows as a wrong value). Cases: D 64 and 128, causal and not, Sq > Sk (rows that
see no key), Sq < Sk (several key tiles add into one dQ row), ragged tiles, GQA (dk / dv summed
over the group), two dense batches (TMA boxes zero-filled at a batch's end), varlen with empty
sequences; Sk past 64 but not a multiple of 128 (the second warpgroup partly or wholly past Sk) and
Sk <= 64 (the second warpgroup has no keys: it still arrives on every barrier, stores nothing);
MLA's (192, 128) (one consumer warpgroup; dK's columns 128..191 accumulated in shared memory:
causal and not, GQA, Sq != Sk, ragged, varlen, deterministic); the deterministic mode (its fp32 dQ sum equal bit for bit
to a key-tile-order run while the CTAs run last tile first). Then the refusals and the sm_90a
build (0 spills, HGMMA, UTMALDG). ~1 min on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.errors import InputError, UnsupportedError
from fastmoe_ops.ops import attention as launcher
from fastmoe_ops.ops import attention_hopper_bwd as hbwd
from fastmoe_ops.runtime import compiler
from fastmoe_ops.runtime.launch import MAX_DYNAMIC_SMEM

from attention_util import assert_within_rule, make_inputs, oracle_and_pytorch

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def check_grads(q, k, v, dout, causal, ctx, varlen=None, max_seqlen=None, deterministic=False):
    """The kernel's (dq, dk, dv) against float64 by the rule, returned; varlen: (cu_q, cu_k)."""
    (o_out, o_lse, o_dq, o_dk, o_dv), (_, _, p_dq, p_dk, p_dv) = oracle_and_pytorch(q, k, v, dout, causal, varlen)
    cu = dict(cu_seqlens_q=varlen[0], cu_seqlens_k=varlen[1], max_seqlen_q=max_seqlen,
              max_seqlen_k=max_seqlen) if varlen else {}
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None, **cu)
    out, lse = launcher.forward(pb, "sim")
    out = out.reshape(*q.shape[:-1], v.shape[-1])
    dq, dk, dv = hbwd.backward(q, k, v, out, lse, dout, causal=causal, engine="sim", deterministic=deterministic, **cu)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape, ctx
    assert dq.dtype == dk.dtype == dv.dtype == q.dtype, ctx
    for name, got, want, pt in (("dq", dq, o_dq, p_dq), ("dk", dk, o_dk, p_dk), ("dv", dv, o_dv, p_dv)):
        assert_within_rule(name, got, want, pt, q.dtype, ctx)
    return dq, dk, dv, out, lse


# (B, Sq, Sk, Hq, Hkv, D, causal, dtype): BM = 64 query rows per ring stage, BN = 128 keys per CTA
# (two consumer warpgroups of 64).
CASES = [
    (1, 64, 64, 1, 1, 64, False, torch.bfloat16),     # one tile each way
    (1, 130, 100, 2, 1, 64, True, torch.bfloat16),    # Sq > Sk: rows that see no key (lse -inf, dq 0); GQA 2
    (1, 70, 130, 2, 2, 128, True, torch.float16),     # Sq < Sk: three key tiles add into each dQ row
    (2, 100, 77, 4, 2, 128, False, torch.bfloat16),   # GQA, two batches: boxes zero-filled at a batch's end
    (1, 129, 65, 1, 1, 128, False, torch.float16),    # ragged query tiles (3 stages' worth: the ring wraps)
    (1, 90, 200, 2, 1, 64, True, torch.bfloat16),     # Sk 200: CTA 1's second warpgroup keys 192..199 only
    (1, 100, 150, 1, 1, 128, False, torch.float16),   # Sk 150: CTA 1's second warpgroup wholly past Sk
    (2, 80, 50, 2, 2, 128, True, torch.bfloat16),     # Sk <= 64: the second warpgroup has no keys
    (1, 40, 64, 1, 1, 64, False, torch.float16),      # Sk = 64 exactly: the second warpgroup has no keys
]


@SIM
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_sk{}_h{}-{}_d{}_{}_{}".format(*c[:6], "causal" if c[6] else "full", str(c[7])[6:]))
def test_hopper_backward_vs_float64(case):
    b, sq, sk, hq, hkv, d, causal, dtype = case
    q, k, v, dout = make_inputs(b, sq, sk, hq, hkv, d, dtype, seed=3)
    check_grads(q, k, v, dout, causal, f"B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} D={d} causal={causal} {dtype} seed=3")


# MLA prefill (q/k 192, v 128): (B, Sq, Sk, Hq, Hkv, causal, dtype). dK's last 64 columns are the
# shared-memory panel (HopperBwdShape::DK_SMEM_PANELS): a wrong add or store there shows in dk.
MLA_CASES = [
    (1, 70, 130, 2, 1, True, torch.bfloat16),     # Sq < Sk: three key tiles add into each dQ row; GQA 2
    (1, 130, 100, 2, 2, True, torch.float16),     # Sq > Sk: rows that see no key; the ring wraps
    (2, 77, 65, 4, 2, False, torch.bfloat16),     # GQA, two batches, ragged tiles both ways
]


@SIM
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: "b{}_sq{}_sk{}_h{}-{}_{}_{}".format(*c[:5], "causal" if c[5] else "full", str(c[6])[6:]))
def test_hopper_backward_mla_vs_float64(case):
    b, sq, sk, hq, hkv, causal, dtype = case
    q, k, v, dout = make_inputs(b, sq, sk, hq, hkv, 192, dtype, seed=11, dv=128)
    check_grads(q, k, v, dout, causal, f"MLA B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} Dqk=192 Dv=128 causal={causal} {dtype} seed=11")


@SIM
def test_hopper_backward_mla_varlen_deterministic():
    """MLA, varlen with an empty query sequence and one without keys, deterministic=True: within the
    rule, and a second run gives the same dq, dk, dv bit for bit."""
    cu_q = torch.tensor([0, 0, 17, 90, 95], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 75, 75], dtype=torch.int32)
    q, k, v, dout = make_inputs(1, 95, 75, 2, 1, 192, torch.bfloat16, 13, varlen_cu=True, dv=128)
    first = check_grads(q, k, v, dout, True, "MLA varlen deterministic seed=13", (cu_q, cu_k), 80, deterministic=True)
    again = hbwd.backward(q, k, v, first[3], first[4], dout, causal=True, engine="sim", deterministic=True,
                          cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=80, max_seqlen_k=80)
    for name, a, b in zip(("dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), f"MLA varlen deterministic: {name} differs between two runs"


@SIM
@pytest.mark.parametrize("causal", [True, False])
def test_hopper_backward_varlen_with_empty_sequences(causal):
    """An empty query sequence (its keys get dk = dv = 0), one with no keys (its rows: dq = 0), and
    boxes that run past a sequence's end into the next one's rows (masked, never stored)."""
    cu_q = torch.tensor([0, 0, 17, 145, 145, 150], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 133, 150, 150], dtype=torch.int32)
    dtype = torch.bfloat16 if causal else torch.float16
    q, k, v, dout = make_inputs(1, 150, 150, 4, 2, 64, dtype, 7, varlen_cu=True)
    check_grads(q, k, v, dout, causal, f"varlen causal={causal} {dtype} seed=7", (cu_q, cu_k), 128)


@SIM
@pytest.mark.parametrize("causal, d, dv", [(True, 64, None), (False, 64, None), (True, 192, 128)],
                         ids=["causal", "full", "mla_causal"])
def test_hopper_backward_deterministic(causal, d, dv, monkeypatch):
    """deterministic=True: the key tiles add into dQ's fp32 sum in key-tile order, whatever order
    the CTAs run in. The test-only reverse_grid variant starts the last key tile first; one CTA at
    a time (FMO_SIM_WORKERS=1) in grid order is key-tile order. The fp32 sums (rounding to bf16
    hides the order) of the reversed deterministic run and the in-order run must be equal bit for
    bit, and the reversed run without the turns must differ (else this test could not see a
    broken order)."""
    ctx = f"deterministic causal={causal} D={d} Dv={dv or d} seed=5"
    q, k, v, dout = make_inputs(1, 100, 256, 2, 1, d, torch.bfloat16, 5, dv=dv)  # 4 key tiles add into each dQ row
    check_grads(q, k, v, dout, causal, ctx, deterministic=True)
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None)
    out, lse = launcher.forward(pb, "sim")
    args = (pb, launcher._rows(dout), out, lse, "sim")
    turns = hbwd.accumulate(*args, deterministic=True, reverse_grid=True)  # the turns: CTAs must run at once
    monkeypatch.setenv("FMO_SIM_WORKERS", "1")
    in_order = hbwd.accumulate(*args)
    reversed_adds = hbwd.accumulate(*args, reverse_grid=True)
    assert not torch.equal(reversed_adds[0], in_order[0]), f"the order of the adds does not show ({ctx})"
    for name, got, want in zip(("dq (fp32 sum)", "dk", "dv"), turns, in_order):
        assert torch.equal(got, want), f"{name}: differs from the key-tile-order run ({ctx})"


@SIM
def test_hopper_backward_refuses_bad_input_by_name():
    q, k, v, dout = make_inputs(1, 8, 8, 2, 1, 64, torch.bfloat16, 0)
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(InputError, match="lse: expected a float32 tensor of shape \\(1, 2, 8\\)"):
        hbwd.backward(q, k, v, dout, lse[:, :1], dout, causal=False, engine="sim")
    with pytest.raises(InputError, match="dout: expected a torch.bfloat16 tensor"):
        hbwd.backward(q, k, v, dout, lse, dout.half(), causal=False, engine="sim")
    with pytest.raises(InputError, match="o: expected .* shape \\(1, 8, 2, 64\\)"):
        hbwd.backward(q, k, v, dout[:, :4], lse, dout, causal=False, engine="sim")
    q2, k2, v2, dout2 = make_inputs(1, 8, 8, 1, 1, 256, torch.bfloat16, 0)
    with pytest.raises(InputError, match="q: expected \\(Dqk, Dv\\) in"):
        hbwd.backward(q2, k2, v2, dout2, torch.zeros(1, 1, 8), dout2, causal=False, engine="sim")
    with pytest.raises(InputError, match="deterministic: expected a bool"):
        hbwd.backward(q, k, v, dout, lse, dout, causal=False, engine="sim", deterministic=1)
    with pytest.raises(InputError, match="engine: expected 'sim' or 'cuda'"):
        hbwd.backward(q, k, v, dout, lse, dout, causal=False, engine="reference")


def test_spec_names_sizes_and_refusals():
    spec = hbwd.choose_spec("bf16", 128, 128, True)
    assert spec.entry_name() == "fmo_attn_bwd_sm90_bf16_d128_bm64_bn128_s2_causal"
    assert spec.warpgroups == 2 and spec.block_threads() == 384
    # K, V (128 keys), two Q/dO stages; per warpgroup dS^T, lse + delta; barriers: the kernel's static_assert
    # checks the same sum
    assert spec.smem_bytes() == 2 * (128 * 256 + 2 * 64 * 256) + 2 * (2 * 64 * 64 + 512) + 40 <= MAX_DYNAMIC_SMEM
    # MLA (one warpgroup: consumer_warpgroups): K 192 + V 128 columns, the ring likewise, dS^T, dK's fp32
    # columns 128..191, lse + delta, barriers
    mla = hbwd.choose_spec("bf16", 192, 128, False)
    assert mla.entry_name() == "fmo_attn_bwd_sm90_bf16_d192v128_bm64_bn64_s2" and mla.block_threads() == 256
    assert mla.smem_bytes() == 2 * (64 * 320 + 2 * 64 * 320 + 64 * 64) + 4 * 64 * 64 + 512 + 40 <= MAX_DYNAMIC_SMEM
    two = hbwd.AttnHopperBwdSpec(dtype="bf16", head_dim=192, head_dim_v=128, stages=2, causal=False, warpgroups=2)
    assert two.entry_name() == "fmo_attn_bwd_sm90_bf16_d192v128_bm64_bn128_s2" and two.block_threads() == 384
    assert two.smem_bytes() == 2 * (128 * 320 + 2 * 64 * 320) + 2 * (2 * 64 * 64 + 4 * 64 * 64 + 512) + 40
    assert two.smem_bytes() <= hbwd.SMEM_LIMIT <= MAX_DYNAMIC_SMEM
    assert len(list(hbwd.standard_specs())) == 24
    det = hbwd.choose_spec("fp16", 64, 64, False, True)
    assert det.entry_name() == "fmo_attn_bwd_sm90_fp16_d64_bm64_bn128_s2_deterministic"
    with pytest.raises(UnsupportedError, match="warpgroups"):
        hbwd.AttnHopperBwdSpec(dtype="bf16", head_dim=64, head_dim_v=64, stages=2, causal=False, warpgroups=3).check()
    with pytest.raises(UnsupportedError, match="head_dim_v"):
        hbwd.AttnHopperBwdSpec(dtype="bf16", head_dim=256, head_dim_v=256, stages=2, causal=False).check()
    with pytest.raises(UnsupportedError, match="stages"):
        hbwd.AttnHopperBwdSpec(dtype="bf16", head_dim=64, head_dim_v=64, stages=1, causal=False).check()


def test_consumer_warpgroups_is_a_pure_choice():
    """Two consumer warpgroups (BN 128) for D 64 and 128; one for MLA (192, 128), whose shared memory
    would fit two (214056 bytes) but whose registers do not (240 per consumer thread: a spill); one
    where two would not fit shared memory (a 5-stage D 128 ring)."""
    for dqk, dv in ((64, 64), (128, 128)):
        assert hbwd.consumer_warpgroups(dqk, dv) == 2, (dqk, dv)
        assert hbwd.choose_spec("bf16", dqk, dv, False).warpgroups == 2
    assert hbwd.consumer_warpgroups(192, 128) == 1 and hbwd.choose_spec("fp16", 192, 128, True).warpgroups == 1
    assert hbwd.smem_bytes(192, 128, 2, 2) == 214056 <= hbwd.SMEM_LIMIT
    assert hbwd.consumer_warpgroups(128, 128, stages=5) == 1
    assert hbwd.smem_bytes(128, 128, 5, 1) <= hbwd.SMEM_LIMIT < hbwd.smem_bytes(128, 128, 5, 2)


@pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")
def test_hopper_backward_builds_with_hgmma_and_tma():
    from fastmoe_ops import build
    from fastmoe_ops.ops import _all  # noqa: F401  (registers the specs)
    reports = build.build_all("sm_90a", "attn_bwd_sm90")
    assert len(reports) == 24  # {bf16, fp16} x (64, 64), (128, 128), (192, 128) x causal x deterministic
    for r in reports:
        assert r.ok, r.error
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack_frame == 0, f"{r.name} spills: {r}"
        # two consumer warpgroups: 384 threads launch with 168 registers (setmaxnreg moves them); one: 256 threads
        assert 0 < r.registers <= (168 if "_bn128_" in r.name else 255), f"{r.name}: {r}"
        if compiler.find_cuobjdump() is not None:
            assert r.sass["HGMMA"] > 0 and r.sass["UTMALDG"] > 0, f"{r.name}: {r.sass}"
            assert r.sass["USETMAXREG"] == (2 if "_bn128_" in r.name else 0), f"{r.name}: setmaxnreg dec + inc"
            assert r.sass["HMMA"] == 0 and r.sass["LDGSTS"] == 0, f"{r.name}: no mma.sync / cp.async: {r.sass}"
