"""FP8 (e4m3) attention forward: the API's validation, the float64 oracle
(fastmoe_ops.reference.attention.attention_fp8) against an independent computation, and the sm_90a
kernel (csrc/attention/hopper_fwd_fp8.cuh) on the simulator against that oracle.

Oracle accuracy (float64 attention of the unquantised inputs as truth; B 2, Sq 64, Sk 96, Hq 4,
Hkv 2, D 128, per-(batch, head) scales amax / 448; printed by test_fp8_accuracy_stated with
`pytest -s`), max |out error| / max |v|: random 3.9e-2 (bf16 inputs, same math: 2.2e-3);
outlier-heavy (4 channels x30) 4.6e-2 (bf16: 3.8e-3): the FP8 format's cost (3 mantissa bits).

Kernel: against the oracle on the same codes, under a tolerance derived from its arithmetic
(kernel_tolerance: QGMMA's per-k32-step rule on S and on P V, P rounded to e4m3), with NaN-poisoned
outputs; D 128 and 64, GQA/MQA, causal bottom-right, Sq != Sk, ragged lengths, several key tiles,
random and outlier-heavy inputs; a V^T without the key permutation fails. Stated against the bf16
sm_90a kernel (test_accuracy_stated_against_the_bf16_kernel, B 1, Sq 64, Sk 128, Hq 2, Hkv 1,
D 128; `pytest -s` prints it): max |err| / max |v~| against float64 of the dequantised inputs,
random: FP8 kernel 6.6e-3, bf16 kernel (on those inputs in bf16) 3.9e-3; outlier-heavy: 1.4e-2
and 9.0e-3. Against the unquantised inputs both are ~4e-2 (random) and ~7e-2 (outliers): e4m3
inputs dominate, the kernel adds little.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.errors import InputError
from fastmoe_ops.reference.attention import attention, attention_fp8

from attention_fp8_util import (
    P_ROUNDING, check_kernel, inputs, kernel_tolerance, quantise, quantise_blocks, run_kernel,
)


def test_oracle_is_dequantised_float64_attention():
    """The oracle against a direct float64 softmax on the dequantised codes (GQA, causal bottom-right)."""
    q, k, v = inputs(1)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    out, lse = attention_fp8(q8, k8, v8, dq, dk, dv, causal=True)
    qd = q8.double() * dq.double()[:, None, :, None]
    kd = (k8.double() * dk.double()[:, None, :, None]).repeat_interleave(2, dim=2)
    vd = (v8.double() * dv.double()[:, None, :, None]).repeat_interleave(2, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qd, kd) / math.sqrt(128)
    i, j = torch.arange(64)[:, None], torch.arange(96)[None, :]
    s = s.masked_fill(j > i + 32, float("-inf"))
    want = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), vd)
    assert out.dtype == torch.float64 and torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), rtol=1e-6)


def test_reference_engine_output_is_bf16_oracle():
    q, k, v = inputs(2)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    with fmo.use_backend("reference"):
        out, lse = fmo.flash_attn(q8, k8, v8, causal=False, return_lse=True, descale_q=dq, descale_k=dk, descale_v=dv)
    want, _ = attention_fp8(q8, k8, v8, dq, dk, dv)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 4, 128)
    assert torch.equal(out, want.to(torch.bfloat16))


def _bad(arg, **change):
    q, k, v = inputs(4, b=1, sq=16, sk=16)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    kw = dict(q=q8, k=k8, v=v8, descale_q=dq, descale_k=dk, descale_v=dv)
    kw.update(change)
    with fmo.use_backend("reference"), pytest.raises(InputError, match=rf"^{arg}\b"):
        fmo.flash_attn(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


def test_validation_names_the_argument():
    q, k, v = inputs(4, b=1, sq=16, sk=16)
    _bad("k", k=k.to(torch.bfloat16))                                          # mixed dtypes
    _bad("q", q=q.to(torch.bfloat16))                                          # descales with bf16 q
    _bad("descale_k", descale_k=None)                                          # a missing scale
    _bad("descale_v", descale_v=torch.ones(1, 4))                              # per q head, not KV head
    _bad("descale_q", descale_q=torch.ones(1, 4, dtype=torch.float64))         # not fp32
    _bad("descale_q", descale_q=torch.tensor([[1.0, float("nan"), 1.0, 1.0]]))  # NaN
    _bad("descale_k", descale_k=torch.zeros(1, 2))                             # zero
    _bad("descale_k", descale_k=torch.ones(1, 2, 2))                           # 2 key blocks for Sk 16
    _bad("descale_q", descale_q=torch.ones(1, 4, 1))                           # q: per head only
    _bad("v", v=quantise(v[..., :64])[0])                                      # head dims (128, 64)
    _bad("softmax_scale", softmax_scale=float("nan"))


@pytest.mark.parametrize("outliers", [False, True])
def test_fp8_accuracy_stated(outliers):
    """FP8's cost against float64 truth, held under the bound of the rounding actually made:
    with errors e_q, e_k of the dequantised q, k, |dS_ij| <= scale * sum_d (|e_q||k~| + |q||e_k|) =: delta_ij;
    softmax weights then change by a factor within exp(+-2 max_j delta_ij), so
    |dO_i| <= (exp(2 max_j delta_ij) - 1) max_j |v~_j| + max_j |e_v,j|, plus bf16's output rounding."""
    q, k, v = inputs(5 + outliers, outliers=outliers)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    truth, _ = attention(q, k, v, compute_dtype=torch.float64)
    with fmo.use_backend("reference"):
        out = fmo.flash_attn(q8, k8, v8, descale_q=dq, descale_k=dk, descale_v=dv).double()
    bf16_in, _ = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), compute_dtype=torch.float64)
    deq = lambda c, s: c.double() * s.double()[:, None, :, None]  # noqa: E731
    qt, kt, vt = deq(q8, dq), deq(k8, dk), deq(v8, dv)
    eq, ek, ev = (qt - q).abs(), (kt - k).abs(), (vt - v).abs()
    g = 2
    kt_, ek_, k_ = (x.repeat_interleave(g, dim=2) for x in (kt.abs(), ek, k.abs()))
    scale = 1 / math.sqrt(128)
    delta = scale * (torch.einsum("bihd,bjhd->bhij", eq, kt_) + torch.einsum("bihd,bjhd->bhij", q.abs(), ek_))
    dmax = delta.amax(-1)                                                   # [B, Hq, Sq]
    vmax = vt.abs().amax(dim=(1, 3)).repeat_interleave(g, dim=1)[:, :, None]  # [B, Hq, 1]
    evmax = ev.amax(dim=(1, 3)).repeat_interleave(g, dim=1)[:, :, None]
    bound = (torch.expm1(2 * dmax) * vmax + evmax).permute(0, 2, 1)[..., None]  # [B, Sq, Hq, 1]
    bound = bound + truth.abs() * 2.0**-8 + 1e-12
    err = (out - truth).abs()
    assert not torch.isnan(out).any() and (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3f}"
    rel = lambda x: ((x - truth).abs().max() / v.abs().max()).item()  # noqa: E731
    print(f"\nfp8 forward oracle ({'outlier-heavy' if outliers else 'random'}): max|err|/max|v| = {rel(out):.2e}; "
          f"bf16 inputs (float64 math): {rel(bf16_in):.2e}; bound used up to {(err / bound).max().item():.2f}")


# ---- the sm_90a FP8 kernel (csrc/attention/hopper_fwd_fp8.cuh) on the simulator ----------------------

KERNEL_CASES = {  # name: (inputs kwargs, causal)
    "d128_gqa": (dict(b=2, sq=64, sk=96, hq=4, hkv=2), False),
    "d128_gqa_causal": (dict(b=2, sq=64, sk=96, hq=4, hkv=2), True),
    "d128_sq_gt_sk_causal_ragged": (dict(b=1, sq=150, sk=70, hq=2, hkv=1), True),  # rows with no key: 0, -inf
    "d64_three_key_tiles_ragged": (dict(b=1, sq=33, sk=300, hq=2, hkv=2, d=64, dv=64), False),  # the ring wraps
    "d64_mqa_causal": (dict(b=1, sq=47, sk=300, hq=3, hkv=1, d=64, dv=64), True),
}


@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_oracle_on_sim(name, outliers):
    kw, causal = KERNEL_CASES[name]
    seed = 20 + list(KERNEL_CASES).index(name) + 100 * outliers
    q, k, v = inputs(seed, outliers=outliers, **kw)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    out, lse = run_kernel(q8, k8, v8, dq, dk, dv, causal=causal)
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv, causal=causal)
    used = check_kernel(out, lse, want, wlse, kernel_tolerance(q8, k8, v8, dq, dk, dv, want), f"{name} seed {seed}")
    print(f"\n{name} ({'outliers' if outliers else 'random'}): max err / tolerance {used:.3f}")


BLOCK_SCALE_CASES = {"d128_gqa_three_blocks_causal": (dict(b=1, sq=64, sk=260, hq=2, hkv=1), True),
                     "d64_three_key_tiles_ragged": (KERNEL_CASES["d64_three_key_tiles_ragged"][0], False)}


@pytest.mark.parametrize("name", list(BLOCK_SCALE_CASES))
def test_kernel_per_block_kv_scales(name):
    """descale_k / descale_v per (batch, head, block of 128 keys), the blocks' magnitudes 1/16..8 apart
    (so a block scale applied to the wrong tile shows), against the oracle with the same scales; and
    one of the two per head, the other per block."""
    kw, causal = BLOCK_SCALE_CASES[name]
    q, k, v = inputs(60, **kw)
    sk = k.shape[1]
    ramp = torch.tensor([1.0, 8.0, 1 / 16])[torch.arange(sk) // 128 % 3].double()[None, :, None, None]
    k, v = k * ramp.flip(1) ** 0.5, v * ramp
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise_blocks(k), quantise_blocks(v)
    assert dk.shape == dv.shape == (kw["b"], kw["hkv"], -(-sk // 128))
    for kq, vq in (((k8, dk), (v8, dv)), (quantise(k), (v8, dv)), ((k8, dk), quantise(v))):
        out, lse = run_kernel(q8, *kq[:1], *vq[:1], dq, kq[1], vq[1], causal=causal)
        want, wlse = attention_fp8(q8, kq[0], vq[0], dq, kq[1], vq[1], causal=causal)
        used = check_kernel(out, lse, want, wlse, kernel_tolerance(q8, kq[0], vq[0], dq, kq[1], vq[1], want),
                            f"{name} block scales k {tuple(kq[1].shape)} v {tuple(vq[1].shape)}")
        print(f"\n{name} block scales k {tuple(kq[1].shape)} v {tuple(vq[1].shape)}: max err / tolerance {used:.3f}")


@pytest.mark.parametrize("sms", [1, 3])
def test_persistent_ctas_walk_several_work_tiles(sms, monkeypatch):
    """1 or 3 CTAs over 8 work tiles (B 2 x Hq 4), causal, 3 key tiles each: the ring's stage and phase,
    q_full / q_empty and vt_full carry from one work tile to the next in every role; memcheck on."""
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    q, k, v = inputs(70 + sms, b=2, sq=64, sk=300, hq=4, hkv=2)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise_blocks(k), quantise_blocks(v)
    out, lse = run_kernel(q8, k8, v8, dq, dk, dv, causal=True, compute_sms=sms)
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv, causal=True)
    check_kernel(out, lse, want, wlse, kernel_tolerance(q8, k8, v8, dq, dk, dv, want), f"{sms} CTAs")


def test_key_permutation_derivation():
    """hopper_fwd_fp8.cuh's p_key_of_k from the two fragment maps: byte b of thread t4's A register
    r = b // 4 holds k = 4 t4 + b % 4 + 16 (b // 8) (ISA, e4m3 A of m64nNk32); pack_p8 fills it with S's
    n8 block 2 (r // 2) + (b % 4) // 2, element (b % 4) % 2 of the thread's two columns, i.e. key
    8 block + 2 t4 + b % 2. Every k of the 32 is covered once (per row), and the closed form matches
    the kernel's text."""
    key_of_k = {}
    for t4 in range(4):
        for b in (0, 1, 2, 3, 8, 9, 10, 11):  # row g's bytes (registers 0 and 2; 1 and 3: row g + 8, alike)
            r = b // 4
            k = 4 * t4 + b % 4 + 16 * (b // 8)
            key = 8 * (2 * (r // 2) + (b % 4) // 2) + 2 * t4 + b % 2
            assert k not in key_of_k
            key_of_k[k] = key
    assert sorted(key_of_k) == list(range(32)) and sorted(key_of_k.values()) == list(range(32))
    closed = [16 * (k // 16) + 8 * ((k % 4) // 2) + 2 * ((k % 16) // 4) + k % 2 for k in range(32)]
    assert [key_of_k[k] for k in range(32)] == closed
    assert closed[:16] == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    src = (Path(__file__).resolve().parents[1] / "csrc/attention/hopper_fwd_fp8.cuh").read_text()
    assert "return 16 * (k / 16) + 8 * ((k % 4) / 2) + 2 * ((k % 16) / 4) + k % 2;" in src


def test_broken_key_permutation_fails():
    """V^T without the key permutation P's registers need (hopper_fwd_fp8.cuh): far outside the tolerance."""
    q, k, v = inputs(30, b=1, sq=64, sk=96, hq=2, hkv=1)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv)
    tol = kernel_tolerance(q8, k8, v8, dq, dk, dv, want)
    out, lse = run_kernel(q8, k8, v8, dq, dk, dv, causal=False)  # the tolerance is tight enough to see it
    check_kernel(out, lse, want, wlse, tol, "correct permutation")
    out, lse = run_kernel(q8, k8, v8, dq, dk, dv, causal=False, broken_permutation=True)
    with pytest.raises(AssertionError, match="over tolerance"):
        check_kernel(out, lse, want, wlse, tol, "broken permutation")


def test_public_api_runs_the_kernel_on_sim():
    q, k, v = inputs(31, b=1, sq=40, sk=50, hq=4, hkv=2)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    with fmo.use_backend("sim"):
        out, lse = fmo.flash_attn(q8, k8, v8, causal=True, return_lse=True, descale_q=dq, descale_k=dk, descale_v=dv)
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv, causal=True)
    assert out.shape == (1, 40, 4, 128) and lse.shape == (1, 4, 40)
    check_kernel(out, lse, want, wlse, kernel_tolerance(q8, k8, v8, dq, dk, dv, want), "public API")
    with fmo.use_backend("sim"):  # an explicit softmax_scale (of the dequantised q k^T), 1.5x the default
        out, lse = fmo.flash_attn(q8, k8, v8, return_lse=True, softmax_scale=1.5 / math.sqrt(128), descale_q=dq,
                                  descale_k=dk, descale_v=dv)
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv, softmax_scale=1.5 / math.sqrt(128))
    check_kernel(out, lse, want, wlse, kernel_tolerance(q8, k8, v8, dq, dk, dv, want, 1.5 / math.sqrt(128)),
                 "public API, softmax_scale")


def test_kernel_engines_refuse_mla_head_dims_by_name():
    q, k, v = inputs(32, b=1, sq=16, sk=16, d=192)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    with fmo.use_backend("sim"), pytest.raises(InputError, match=r"^v\b.*FP8 kernel"):
        fmo.flash_attn(q8, k8, v8, descale_q=dq, descale_k=dk, descale_v=dv)


@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
def test_accuracy_stated_against_the_bf16_kernel(outliers):
    """The FP8 kernel's own error (against float64 on its dequantised inputs) beside the bf16 sm_90a
    kernel's on the same dequantised inputs in bf16, both on the simulator; and both against float64
    of the unquantised inputs (what FP8 costs in all). Stated bound: the FP8 kernel's error is under
    kernel_tolerance and at most 1.5 P_ROUNDING max |v~| (P in e4m3 dominates); the bf16 kernel's at most
    2^-6 max |v~| (bf16 inputs and P)."""
    q, k, v = inputs(40 + outliers, outliers=outliers, b=1, sq=64, sk=128, hq=2, hkv=1)
    (q8, dq), (k8, dk), (v8, dv) = quantise(q), quantise(k), quantise(v)
    deq = lambda c, s: c.double() * s.double()[:, None, :, None]  # noqa: E731
    qt, kt, vt = deq(q8, dq), deq(k8, dk), deq(v8, dv)
    truth_deq, _ = attention(qt, kt, vt, compute_dtype=torch.float64)
    truth, _ = attention(q, k, v, compute_dtype=torch.float64)
    out8, lse8 = run_kernel(q8, k8, v8, dq, dk, dv, causal=False)
    with fmo.use_backend("sim"):
        out16 = fmo.flash_attn(qt.bfloat16(), kt.bfloat16(), vt.bfloat16()).double()
    vmax = vt.abs().max().item()
    e8, e16 = (out8.double() - truth_deq).abs().max().item() / vmax, (out16 - truth_deq).abs().max().item() / vmax
    t8, t16 = (out8.double() - truth).abs().max().item() / vmax, (out16 - truth).abs().max().item() / vmax
    print(f"\n{'outlier-heavy' if outliers else 'random'}: max|err|/max|v~| vs float64 of the dequantised inputs: "
          f"fp8 kernel {e8:.2e}, bf16 sm_90a kernel {e16:.2e}; vs float64 of the unquantised inputs: fp8 kernel "
          f"{t8:.2e}, bf16 kernel on the dequantised inputs {t16:.2e}")
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv)
    check_kernel(out8, lse8, want, wlse, kernel_tolerance(q8, k8, v8, dq, dk, dv, want), "fp8 kernel")
    assert e8 <= 1.5 * P_ROUNDING and e16 <= 2.0 ** -6, (e8, e16)
