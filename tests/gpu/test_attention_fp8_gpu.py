"""The FP8 (e4m3) attention forward on a GPU (the `cuda` engine, sm_90a: csrc/attention/hopper_fwd_fp8.cuh):
fmo.flash_attn(q8, k8, v8, descale_q=, descale_k=, descale_v=) against the float64 oracle on the same
codes under tests/test_attention_fp8.py's arithmetic-derived tolerance (QGMMA's per-step rule, P in
e4m3), as the simulator runs it there; every output the kernel allocates starts as NaN
(gpu_util.poison_cuda_allocations). D 128 and 64, GQA/MQA, causal bottom-right, Sq != Sk, ragged,
per-head and per-128-key-block K/V scales, 2048 keys (16 key tiles: the ring wraps many times), the
broken key permutation failing, and the simulator's output close to the GPU's (both compute QGMMA's
sums, but exp2 may differ in its last bits and flip a P's e4m3 rounding: within 2^-6 of max |out|).
Seconds on one H100/H200."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import attention_hopper_fp8 as fp8_kernel
from fastmoe_ops.reference.attention import attention_fp8

from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)
from attention_fp8_util import check_kernel, inputs, kernel_tolerance, quantise, quantise_blocks, run_kernel

pytestmark = needs_cuda

CASES = {  # name: (inputs kwargs, causal, per-block K/V scales)
    "d128_gqa": (dict(b=2, sq=64, sk=96, hq=4, hkv=2), False, False),
    "d128_gqa_causal_blocks": (dict(b=2, sq=200, sk=300, hq=4, hkv=2), True, True),
    "d128_sq_gt_sk_causal": (dict(b=1, sq=150, sk=70, hq=2, hkv=1), True, False),
    "d64_mqa_ragged_blocks": (dict(b=1, sq=47, sk=300, hq=3, hkv=1, d=64, dv=64), False, True),
    "d128_long": (dict(b=1, sq=64, sk=2048, hq=2, hkv=1), True, True),  # tolerance: [Sq, Sk, D] products
}


def _quantised(seed, kw, blocks, outliers=False):
    q, k, v = inputs(seed, outliers=outliers, **kw)
    kv = quantise_blocks if blocks else quantise
    return (*quantise(q), *kv(k), *kv(v))


@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
@pytest.mark.parametrize("name", list(CASES))
def test_fp8_forward_vs_oracle(name, outliers):
    kw, causal, blocks = CASES[name]
    q8, dq, k8, dk, v8, dv = _quantised(7, kw, blocks, outliers)
    cuda = [t.to(DEV) for t in (q8, k8, v8, dq, dk, dv)]
    with fmo.use_backend("cuda"):
        out, lse = fmo.flash_attn(*cuda[:3], causal=causal, return_lse=True, descale_q=cuda[3], descale_k=cuda[4],
                                  descale_v=cuda[5])
    torch.cuda.synchronize()
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv, causal=causal)
    check_kernel(out.cpu(), lse.cpu(), want, wlse, kernel_tolerance(q8, k8, v8, dq, dk, dv, want), f"cuda {name}")


def test_gpu_matches_the_simulator():
    """The same codes on both engines: within 2^-6 of max |out| (QGMMA's sums are the simulator's;
    exp2 may round differently and flip a probability's e4m3 rounding, 2^-4 of that one term)."""
    q8, dq, k8, dk, v8, dv = _quantised(12, dict(b=1, sq=64, sk=260, hq=2, hkv=1), True)
    sim_out, _ = run_kernel(q8, k8, v8, dq, dk, dv, causal=True)
    cuda = [t.to(DEV) for t in (q8, k8, v8, dq, dk, dv)]
    out, _ = fp8_kernel.forward(*cuda, causal=True, softmax_scale=None, engine="cuda")
    torch.cuda.synchronize()
    diff = (out.cpu().float() - sim_out.float()).abs()
    assert not torch.isnan(out).any(), "NaN"
    assert diff.max() <= sim_out.float().abs().max() * 2.0 ** -6, f"max diff {diff.max()}"


def test_broken_key_permutation_fails_on_gpu():
    q8, dq, k8, dk, v8, dv = _quantised(13, dict(b=1, sq=64, sk=96, hq=2, hkv=1), False)
    cuda = [t.to(DEV) for t in (q8, k8, v8, dq, dk, dv)]
    want, wlse = attention_fp8(q8, k8, v8, dq, dk, dv)
    tol = kernel_tolerance(q8, k8, v8, dq, dk, dv, want)
    out, lse = fp8_kernel.forward(*cuda, causal=False, softmax_scale=None, engine="cuda", broken_permutation=True)
    torch.cuda.synchronize()
    with pytest.raises(AssertionError, match="over tolerance"):
        check_kernel(out.cpu(), lse.cpu(), want, wlse, tol, "broken permutation")
