"""The sm_90a attention forward (csrc/attention/hopper_fwd.cuh: TMA ring, producer warp, wgmma
consumer warpgroups) on the simulator, which models sm_90a: its own CUDA source with the TMA,
mbarrier and wgmma emulations (asynchronous: a tile read before its barrier, a stage refilled
under pending MMAs or D read before its wait shows as poison or wrong values).

Against float64 by FlashAttention's rule (tests/attention_util.py): out within twice the error of
PyTorch's same-dtype computation plus rounding, lse within 1e-3 and -inf exactly where a row sees
no key; outputs poisoned (torch.empty on the simulator is the launch's poison) and NaN never
passes. The cases cover D 64 and 128, causal (diagonal tiles masked, tiles past the diagonal
never loaded) and not, Sq > Sk (rows that see no key), Sq < Sk, ragged tiles, GQA and MQA, bf16
and fp16, MLA's (192, 128), D 256 (also through the public functions, and its refusals where no
kernel has tiles: the mma.sync forward, the backward), dense and varlen (empty sequences; boxes that run into the next sequence),
GQA packing (the query heads of a KV head in one work tile: forced on and off, equal bit for bit, and
the rule that chooses it) and the choice of kernel (attention_hopper.forward_kernel). ~40 s on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import attention as launcher
from fastmoe_ops.ops import attention_hopper as hopper

from attention_util import (assert_lse, assert_uniform_mean, assert_within_rule, make_inputs, oracle_and_pytorch,
                            uniform_inputs)

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def check_forward(b, sq, sk, hq, hkv, d, causal, dtype, seed=0, dv=None, sms=None):
    """sms: the SM budget (persistent CTAs); small budgets make each CTA walk several work tiles."""
    ctx = f"B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} D={d} Dv={dv or d} causal={causal} {dtype} seed={seed} sms={sms}"
    q, k, v, dout = make_inputs(b, sq, sk, hq, hkv, d, dtype, seed, dv=dv)
    (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, causal)
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None)
    fl = launcher.forward_launch(pb)
    assert isinstance(fl, hopper.HopperForwardLaunch), f"the simulator should take the sm_90a kernel ({ctx})"
    if sms is not None:
        fl = hopper.forward_launch(pb, fl.out_shape, fl.params, compute_sms=sms)
        rows, heads = (128 // (hq // hkv), hkv) if fl.spec.pack_gqa else (128, hq)  # a tile's positions, heads walked
        assert fl.config.grid[0] == min(sms, -(-sq // rows) * heads * b)
    out, lse = fl.run(pb.q, pb.k, pb.v, "sim")
    assert_within_rule("out", out.reshape(o_out.shape), o_out, p_out, dtype, ctx)
    assert_lse(lse, o_lse.double(), ctx)


# (B, Sq, Sk, Hq, Hkv, D, causal, dtype): BM = 128 query rows, BN = 128 keys per tile.
CASES = [
    (1, 1, 1, 1, 1, 64, False, torch.bfloat16),
    (2, 17, 17, 4, 1, 64, True, torch.float16),      # MQA, ragged tiles, two batches (map's zero fill)
    (1, 200, 300, 2, 2, 64, True, torch.bfloat16),   # Sq < Sk: three key tiles, the ring wraps
    (1, 257, 129, 2, 1, 128, True, torch.bfloat16),  # Sq > Sk: rows that see no key (lse -inf, out 0)
    (2, 40, 150, 4, 2, 128, False, torch.float16),   # GQA, ragged last key tile
]


@SIM
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_sk{}_h{}-{}_d{}_{}_{}".format(*c[:6], "causal" if c[6] else "full", str(c[7])[6:]))
def test_hopper_forward_vs_float64(case):
    check_forward(*case)


@SIM
@pytest.mark.parametrize("sms, causal", [(1, True), (2, False), (5, True)])
def test_hopper_persistent_ctas_walk_several_tiles(sms, causal):
    """Budgets of 1, 2 and 5 SMs: each persistent CTA walks several work tiles (query blocks x heads
    x batches, causal longest first), reusing Q's buffer (q_full / q_empty) and carrying the K/V
    ring's stage and phase from one work tile into the next."""
    check_forward(2, 300, 200, 2, 1, 64, causal, torch.bfloat16, seed=31 + sms, sms=sms)


@SIM
def test_hopper_varlen_persistent():
    """Varlen with 3 persistent CTAs: work tiles past a sequence's end are skipped by every role."""
    cu_q = torch.tensor([0, 130, 133, 400], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 300, 430], dtype=torch.int32)
    q, k, v, dout = make_inputs(1, 400, 430, 2, 1, 128, torch.float16, 8, varlen_cu=True)
    (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, True, (cu_q, cu_k))
    pb = launcher.problem(q, k, v, causal=True, softmax_scale=None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=267, max_seqlen_k=280)
    fl = launcher.forward_launch(pb)
    fl = hopper.forward_launch(pb, fl.out_shape, fl.params, compute_sms=3)
    out, lse = fl.run(pb.q, pb.k, pb.v, "sim", pb.cu_q, pb.cu_k)
    assert_within_rule("out", out, o_out, p_out, torch.float16, "varlen, 3 SMs")
    assert_lse(lse, o_lse.double(), "varlen, 3 SMs")


@SIM
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_mla_head_dims(causal):
    """MLA prefill: q/k head dim 192 (three panels of Q and K), v head dim 128; Sq != Sk, GQA."""
    check_forward(1, 140, 200, 4, 2, 192, causal, torch.bfloat16, seed=21, dv=128)  # two key tiles: 20 MMAs in flight


@SIM
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_head_dim_256(causal):
    """D 256 (BN 64 tiles: O is 128 registers per thread): four panels of Q, K and V, two query
    tiles (the second ragged), two key tiles (the second ragged: masked columns), Sq > Sk, GQA."""
    fl = launcher.forward_launch(launcher.problem(*make_inputs(1, 2, 2, 2, 1, 256, torch.bfloat16, 0)[:3],
                                                  causal=causal, softmax_scale=None))
    assert (fl.spec.block_m, fl.spec.block_n, fl.spec.head_dim_v) == (128, 64, 256), fl.spec
    check_forward(1, 130, 100, 2, 1, 256, causal, torch.bfloat16, seed=41)


@SIM
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_structured_uniform_attention(causal):
    """attention_util.uniform_inputs: out is the mean of v over the keys each row sees; two query
    tiles, three key tiles (the ring wraps), two panels of D, GQA."""
    b, sq, sk, hq, hkv, d = 1, 150, 260, 4, 2, 128
    q, k, v = uniform_inputs(b, sq, sk, hq, hkv, d)
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None)
    out, lse = launcher.forward(pb, "sim", "wgmma")
    assert_uniform_mean(out.reshape(b, sq, hq, d), lse, sq, sk, hq, hkv, causal)


@SIM
def test_hopper_varlen_with_empty_sequences():
    """Packed sequences: an empty query sequence, one whose keys are empty (out 0, lse -inf), and
    boxes that run past a sequence's end into the next one's rows (masked, never stored)."""
    cu_q = torch.tensor([0, 0, 17, 145, 145, 150], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 133, 150, 150], dtype=torch.int32)
    hq, hkv, d = 4, 2, 64
    for causal, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        ctx = f"varlen causal={causal} {dtype}"
        q, k, v, dout = make_inputs(1, 150, 150, hq, hkv, d, dtype, 7, varlen_cu=True)
        (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, causal, (cu_q, cu_k))
        pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=128, max_seqlen_k=128)
        out, lse = launcher.forward(pb, "sim", "wgmma")
        assert_within_rule("out", out, o_out, p_out, dtype, ctx)
        assert_lse(lse, o_lse.double(), ctx)


@SIM
def test_hopper_public_function_takes_the_new_kernel(monkeypatch):
    """fmo.flash_attn on the simulator goes through the sm_90a kernel (D 64) and agrees with the
    mma.sync kernel's forward within the rule's bound (both against float64)."""
    calls = []
    real = hopper.HopperForwardLaunch.run
    monkeypatch.setattr(hopper.HopperForwardLaunch, "run", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    q, k, v, dout = make_inputs(2, 33, 40, 4, 2, 64, torch.bfloat16, 3)
    (o_out, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, True)
    with fmo.use_backend("sim"):
        out = fmo.flash_attn(q, k, v, causal=True)
    assert calls, "the public function did not launch the sm_90a kernel"
    assert_within_rule("out", out, o_out, p_out, torch.bfloat16, "flash_attn")


@SIM
def test_hopper_memcheck_and_racecheck(monkeypatch):
    """Every global access inside the launch's tensors (TMA boxes included), no shared-memory races."""
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    check_forward(2, 20, 150, 2, 1, 64, True, torch.bfloat16, seed=5)
    check_forward(2, 5, 150, 4, 1, 64, True, torch.bfloat16, seed=6)  # packed (MQA): boxes of (64, 4 heads, 32 rows)


@SIM
def test_hopper_early_stage_release_fails():
    """The pipeline bug the simulator must catch: a consumer frees a K/V stage right after issuing
    the MMAs that read it, before they retired; the producer refills it (TMA poisons the stage
    until it lands) under the pending MMAs, which then multiply the poison or the next tile."""
    import dataclasses

    q, k, v, dout = make_inputs(1, 200, 300, 2, 2, 64, torch.bfloat16, 0)
    (o_out, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, False)
    pb = launcher.problem(q, k, v, causal=False, softmax_scale=None)
    fl = launcher.forward_launch(pb, "wgmma")
    out, _ = fl.run(pb.q, pb.k, pb.v, "sim")
    assert_within_rule("out", out.reshape(o_out.shape), o_out, p_out, torch.bfloat16, "safe release")
    fl.spec = dataclasses.replace(fl.spec, unsafe_early_release=True)
    out, _ = fl.run(pb.q, pb.k, pb.v, "sim")
    with pytest.raises(AssertionError):
        assert_within_rule("out", out.reshape(o_out.shape), o_out, p_out, torch.bfloat16, "early release")


def run_packed_and_unpacked(q, k, v, dout, causal, ctx, varlen=None, max_seqlen=None):
    """The forward with GQA packing forced on and off: both within the rule against float64 (outputs
    poisoned: torch.empty on the simulator), and equal to each other bit for bit (each row's
    arithmetic is the same, in the same order; only the rows' places in the tile differ)."""
    (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, causal, varlen)
    cu = dict(cu_seqlens_q=varlen[0], cu_seqlens_k=varlen[1], max_seqlen_q=max_seqlen[0],
              max_seqlen_k=max_seqlen[1]) if varlen else {}
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None, **cu)
    fl = launcher.forward_launch(pb)
    results = []
    for pack in (True, False):
        fp = hopper.forward_launch(pb, fl.out_shape, fl.params, pack_gqa=pack)
        assert fp.spec.pack_gqa == pack and fp.spec.entry_name().endswith("_packgqa") == pack
        out, lse = fp.run(pb.q, pb.k, pb.v, "sim", pb.cu_q, pb.cu_k)
        assert_within_rule("out", out.reshape(o_out.shape), o_out, p_out, q.dtype, f"{ctx} pack_gqa={pack}")
        assert_lse(lse, o_lse.double(), f"{ctx} pack_gqa={pack}")
        results.append((out, lse))
    (po, pl), (uo, ul) = results
    assert torch.equal(po, uo) and torch.equal(pl, ul), f"packed and unpacked outputs differ ({ctx})"
    return fl


@SIM
@pytest.mark.parametrize("hq, hkv", [(8, 2), (4, 1)])
@pytest.mark.parametrize("sq", [1, 5, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_gqa_packed_decode(hq, hkv, sq, causal):
    """Decode-like GQA (Hq 8 / Hkv 2) and MQA (Hq 4 / Hkv 1): one packed work tile holds the
    positions of all G query heads of a KV head; causal rows mask by their own position (Sk 70:
    a ragged key tile, bottom-right diagonal), two batches (a box past the first batch's end reads
    the second's rows: masked, never stored). The launcher packs these shapes by itself."""
    ctx = f"B=2 Sq={sq} Sk=70 Hq={hq} Hkv={hkv} causal={causal}"
    q, k, v, dout = make_inputs(2, sq, 70, hq, hkv, 64, torch.bfloat16, 50 + sq)
    fl = run_packed_and_unpacked(q, k, v, dout, causal, ctx)
    assert fl.spec.pack_gqa, f"the launcher should pack {ctx}"


@SIM
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_gqa_packed_varlen(causal):
    """Varlen, packed: sequences of 1, 5, 0 and 16 queries over 30, 1, 9 and 100 keys (Hq 8 / Hkv
    2, D 128, fp16): a box reads the next sequence's rows (masked, never stored), a sequence with
    more queries than keys (causal: rows that see no key, out 0 and lse -inf)."""
    cu_q = torch.tensor([0, 1, 6, 6, 22], dtype=torch.int32)
    cu_k = torch.tensor([0, 30, 31, 40, 140], dtype=torch.int32)
    q, k, v, dout = make_inputs(1, 22, 140, 8, 2, 128, torch.float16, 9, varlen_cu=True)
    run_packed_and_unpacked(q, k, v, dout, causal, f"varlen causal={causal}", (cu_q, cu_k), (16, 100))


@SIM
def test_hopper_gqa_packed_persistent_several_tiles():
    """Packed tiles walked by 3 persistent CTAs: Sq 40 x G 4 = 160 rows -> two packed query blocks
    (32 positions each) x 2 KV heads x 2 batches, D 256 (BN 64: two key tiles)."""
    q, k, v, dout = make_inputs(2, 40, 100, 8, 2, 256, torch.bfloat16, 13)
    (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, True)
    pb = launcher.problem(q, k, v, causal=True, softmax_scale=None)
    fl = launcher.forward_launch(pb)
    fl = hopper.forward_launch(pb, fl.out_shape, fl.params, compute_sms=3, pack_gqa=True)
    assert fl.config.grid == (3, 1, 1)
    out, lse = fl.run(pb.q, pb.k, pb.v, "sim")
    assert_within_rule("out", out.reshape(o_out.shape), o_out, p_out, torch.bfloat16, "packed, 3 SMs")
    assert_lse(lse, o_lse.double(), "packed, 3 SMs")


def _count_launches(monkeypatch) -> list:
    """Records every kernel launch of the attention launchers (a refusal must come before any)."""
    from fastmoe_ops.ops import attention_hopper
    launches = []
    for mod in (launcher, attention_hopper):
        real = mod.launch
        monkeypatch.setattr(mod, "launch", lambda *a, _real=real, **kw: launches.append(a[0]) or _real(*a, **kw))
    return launches


@SIM
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_256_through_the_public_functions(causal, monkeypatch):
    """fmo.flash_attn and flash_attn_varlen take D 256 on the simulator (the sm_90a forward) against
    float64: dense with GQA and a ragged key tile, varlen with a sequence of more queries than keys
    (causal: rows that see no key, out 0 and lse -inf) and an empty one; lse returned too."""
    launches = _count_launches(monkeypatch)
    q, k, v, dout = make_inputs(1, 9, 70, 4, 2, 256, torch.bfloat16, 61)
    (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, causal)
    with fmo.use_backend("sim"):
        out, lse = fmo.flash_attn(q, k, v, causal=causal, return_lse=True)
    assert [s.op for s in launches] == ["attn_fwd_sm90"], launches
    assert_within_rule("out", out, o_out, p_out, torch.bfloat16, f"flash_attn D 256 causal={causal}")
    assert_lse(lse, o_lse.double(), f"flash_attn D 256 causal={causal}")

    cu_q = torch.tensor([0, 20, 20, 26], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 17, 80], dtype=torch.int32)
    q, k, v, dout = make_inputs(1, 26, 80, 2, 1, 256, torch.float16, 62, varlen_cu=True)
    (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, causal, (cu_q, cu_k))
    with fmo.use_backend("sim"):
        out, lse = fmo.flash_attn_varlen(q, k, v, cu_q, cu_k, 20, 63, causal=causal, return_lse=True)
    assert_within_rule("out", out, o_out, p_out, torch.float16, f"flash_attn_varlen D 256 causal={causal}")
    assert_lse(lse, o_lse.double(), f"flash_attn_varlen D 256 causal={causal}")


def test_head_dim_256_on_the_reference_engine():
    """The reference engine has no tiles to lack: D 256 forward and backward both run there."""
    q, k, v, dout = make_inputs(1, 5, 6, 2, 1, 256, torch.bfloat16, 63)
    q.requires_grad_(True)
    with fmo.use_backend("reference"):
        out = fmo.flash_attn(q, k, v, causal=True)
        out.backward(dout)
    want = oracle_and_pytorch(q, k, v, dout, True)[0]
    assert torch.allclose(out.double(), want[0], atol=2e-2) and q.grad.shape == q.shape
    assert not bool(q.grad.isnan().any())


@SIM
def test_head_dim_256_refused_where_no_kernel_has_tiles(monkeypatch):
    """D 256 has only the sm_90a forward: the mma.sync forward (another arch, or forced) and the
    backward (no D 256 tiles) are refused by name, with what came, before any kernel runs; a
    forward whose gradients will be needed is refused at the forward, not after it ran."""
    from fastmoe_ops.errors import InputError

    launches = _count_launches(monkeypatch)
    q, k, v, dout = make_inputs(1, 3, 11, 2, 1, 256, torch.bfloat16, 64)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 11], dtype=torch.int32)
    with fmo.use_backend("sim"):
        with pytest.raises(InputError, match=r"^q: expected head dims .* for the backward .*got \(256, 256\) with requires_grad"):
            fmo.flash_attn(q.clone().requires_grad_(True), k, v)
        with pytest.raises(InputError, match=r"^q: expected head dims .* for the backward .*got \(256, 256\) with requires_grad"):
            fmo.flash_attn_varlen(q[0], k[0], v[0].clone().requires_grad_(True), cu, cu_k, 3, 11)
        with pytest.raises(InputError, match=r"^q: expected head dims .* for the backward .*got \(256, 256\) in a backward"):
            torch.ops.fmo.flash_attn_bwd(dout, q, k, v, torch.zeros_like(q), torch.zeros(1, 2, 3), False, 0.0625)
        with torch.no_grad():  # no gradients: the forward alone is fine
            fmo.flash_attn(q.clone().requires_grad_(True), k, v)
        assert [s.op for s in launches] == ["attn_fwd_sm90"], launches
        launches.clear()
        monkeypatch.setattr(hopper, "arch_of", lambda engine, device: "sm_80")  # the mma.sync forward's archs
        q2, k2, v2, _ = make_inputs(1, 4, 13, 2, 2, 256, torch.bfloat16, 65)  # a signature not planned before
        with pytest.raises(InputError, match=r"^q: expected head dims .* the mma.sync forward's tiles .*got \(256, 256\) "
                                             r"for the mma.sync forward \(sm_80, 13 key rows\)"):
            fmo.flash_attn(q2, k2, v2)
    with pytest.raises(InputError, match=r"got \(256, 256\) for the mma.sync forward \(a forced choice"):
        launcher.forward_launch(launcher.problem(q, k, v, causal=False, softmax_scale=None), "mma_sync")
    assert launches == []


def test_pack_gqa_rule():
    """pack_gqa_heads: pack when it makes fewer work tiles (decode), not at a tie, never without
    GQA or when G does not divide the tile's rows; forcing it there is refused by name."""
    from fastmoe_ops.errors import InputError

    assert hopper.pack_gqa_heads(1, 32, 8, 128)        # 1 tile per KV head instead of 4
    assert hopper.pack_gqa_heads(16, 32, 8, 128)       # 64 rows: still one tile
    assert hopper.pack_gqa_heads(40, 8, 2, 128)        # 160 rows: 2 tiles per KV head instead of 4
    assert not hopper.pack_gqa_heads(128, 32, 8, 128)  # 4 tiles either way
    assert not hopper.pack_gqa_heads(5, 8, 8, 128)     # no GQA
    assert not hopper.pack_gqa_heads(5, 6, 1, 128)     # G 6 does not divide 128
    q, k, v, _ = make_inputs(1, 5, 9, 2, 2, 64, torch.bfloat16, 0)
    pb = launcher.problem(q, k, v, causal=False, softmax_scale=None)
    fl = launcher.forward_launch(pb)
    with pytest.raises(InputError, match="pack_gqa"):
        hopper.forward_launch(pb, fl.out_shape, fl.params, pack_gqa=True)


def test_forward_kernel_choice():
    """One function chooses: sm_90a (a Hopper GPU, or the simulator, which models one) takes the
    wgmma kernel for the head dims it has tiles for and at least one key; everything else the
    mma.sync kernel. (The GPU's arch from its capability: tests/gpu/test_attention_gpu.py.)"""
    assert hopper.arch_of("sim", torch.device("cpu")) == "sm_90a"
    assert hopper.forward_kernel("sm_90a", 64, 64, 10) == "wgmma"
    assert hopper.forward_kernel("sm_90a", 128, 128, 1) == "wgmma"
    assert hopper.forward_kernel("sm_90a", 192, 128, 10) == "wgmma"     # MLA prefill
    assert hopper.forward_kernel("sm_90a", 256, 256, 10) == "wgmma"     # D 256: BN 64 tiles
    assert hopper.forward_kernel("sm_90a", 256, 128, 10) == "mma_sync"  # no tiles for this pair
    assert hopper.forward_kernel("sm_90a", 64, 64, 0) == "mma_sync"     # no keys: a map needs dims >= 1
    for arch in ("sm_80", "sm_89", "sm_90", "sm_100a", "sm_120"):
        assert hopper.forward_kernel(arch, 128, 128, 10) == "mma_sync", arch


def test_hopper_specs_and_refusals():
    from fastmoe_ops.errors import UnsupportedError
    from fastmoe_ops.runtime.launch import MAX_DYNAMIC_SMEM

    specs = list(hopper.standard_specs())
    assert len(specs) == 32 and len({s.entry_name() for s in specs}) == 32
    for s in specs:
        assert s.block_threads() == 384 and s.smem_bytes() <= MAX_DYNAMIC_SMEM
        assert "fmo::attn::attn_fwd_hopper<" in s.stub()
    with pytest.raises(UnsupportedError, match="head_dim"):
        hopper.AttnHopperSpec("bf16", 192, 192, 2, 128, 2, False).check()
    with pytest.raises(UnsupportedError, match="block_n"):
        hopper.AttnHopperSpec("bf16", 64, 64, 2, 96, 2, False).check()
    with pytest.raises(UnsupportedError, match="stages"):
        hopper.AttnHopperSpec("bf16", 128, 128, 2, 256, 4, False).check()
