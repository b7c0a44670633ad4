"""Fused attention on a GPU (the `cuda` engine): fmo.flash_attn, fmo.flash_attn_varlen and
fmo.nn.FusedAttention, forward and backward through autograd, against the float64 oracle
under FlashAttention's rule (tests/attention_util.py: at most twice the error of PyTorch's
same-dtype computation, here run on the same GPU, plus rounding; lse within 1e-3 and -inf
exactly where a row sees no key). Every output the kernels allocate starts as NaN
(gpu_util.poison_cuda_allocations). Covers D 64 and 128 in bf16 and fp16, causal
(bottom-right) and not, MHA/GQA/MQA, Sq != Sk both ways (rows that see no key), ragged tiles,
MLA head dims (q/k 192, v 128), varlen with empty sequences, q = 0 (exact means: a layout or
mask bug shows as a wrong value, not noise), and bit-for-bit repeatable gradients with
deterministic=True.
Seconds on one H100/H200."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.nn import attention as nn_attention
from fastmoe_ops.reference import attention as ref

from attention_util import EPS, assert_lse, assert_within_rule, make_inputs, oracle_and_pytorch
from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)

pytestmark = needs_cuda
BF16, FP16 = torch.bfloat16, torch.float16

# (B, Sq, Sk, Hq, Hkv, D, Dv, causal, dtype): every D x dtype x causal combination on its own
# shape, then MLA head dims, one token, and a long sequence (many key tiles per row).
CASES = [
    (2, 128, 128, 8, 8, 64, None, False, BF16),    # whole tiles, MHA
    (2, 257, 257, 8, 2, 64, None, True, BF16),     # GQA 4:1, ragged last tile
    (1, 300, 129, 4, 1, 64, None, False, FP16),    # MQA, Sq > Sk
    (1, 300, 129, 4, 1, 64, None, True, FP16),     # causal Sq > Sk: the first 171 rows see no key
    (2, 17, 200, 8, 4, 128, None, False, BF16),    # Sq < Sk
    (2, 17, 200, 8, 4, 128, None, True, BF16),     # causal Sq < Sk: bottom-right alignment
    (2, 128, 128, 8, 8, 128, None, False, FP16),
    (2, 257, 257, 8, 2, 128, None, True, FP16),
    (2, 100, 170, 8, 2, 192, 128, False, BF16),    # MLA prefill head dims, GQA
    (1, 170, 100, 4, 4, 192, 128, True, FP16),     # MLA, causal, Sq > Sk
    (1, 1, 1, 1, 1, 64, None, True, BF16),
    (1, 2048, 2048, 4, 2, 128, None, True, BF16),  # 32 key tiles per row
]


def case_id(c):
    b, sq, sk, hq, hkv, d, dv, causal, dtype = c
    return f"b{b}_sq{sq}_sk{sk}_h{hq}-{hkv}_d{d}{f'v{dv}' if dv else ''}_{'causal' if causal else 'full'}_{str(dtype)[6:]}"


def run_flash_attn(q, k, v, dout, **kw):
    """(out, lse, dq, dk, dv) of fmo.flash_attn on copies of q, k, v, through autograd."""
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fmo.flash_attn(qg, kg, vg, return_lse=True, **kw)
    out.backward(dout)
    torch.cuda.synchronize()
    return out.detach(), lse, qg.grad, kg.grad, vg.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flash_attn_fwd_bwd_vs_float64(case):
    b, sq, sk, hq, hkv, d, dv, causal, dtype = case
    seed = sq * 1000 + sk
    ctx = f"cuda {case_id(case)} seed={seed}"
    q, k, v, dout = (t.to(DEV) for t in make_inputs(b, sq, sk, hq, hkv, d, dtype, seed, dv=dv))
    (o_out, o_lse, o_dq, o_dk, o_dv), (p_out, _, p_dq, p_dk, p_dv) = oracle_and_pytorch(q, k, v, dout, causal)
    out, lse, dq, dk, dv_ = run_flash_attn(q, k, v, dout, causal=causal)
    assert out.device.type == DEV.type and out.dtype == dtype and out.shape == (b, sq, hq, dv or d)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    assert_within_rule("out", out, o_out, p_out, dtype, ctx)
    assert_lse(lse, o_lse.double(), ctx)
    for name, got, want, pt in (("dq", dq, o_dq, p_dq), ("dk", dk, o_dk, p_dk), ("dv", dv_, o_dv, p_dv)):
        assert_within_rule(name, got, want, pt, dtype, ctx)


def test_backward_is_repeatable_bit_for_bit():
    """deterministic=True: two runs give the same bits (on sm_90a the wgmma backward's dQ atomics
    add in key-tile order; the mma.sync backward, elsewhere, has no atomics)."""
    q, k, v, dout = (t.to(DEV) for t in make_inputs(2, 200, 333, 8, 2, 128, BF16, 3))
    first = run_flash_attn(q, k, v, dout, causal=True, softmax_scale=0.1, deterministic=True)
    second = run_flash_attn(q, k, v, dout, causal=True, softmax_scale=0.1, deterministic=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs (seed 3)"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d, dtype", [(64, BF16), (128, FP16)])
def test_uniform_attention_exact_means(d, dtype, causal):
    """q = 0: every visible key gets the same weight, so out[i, h] is the mean of v over the
    keys row i sees, and v[j, hk, :] = j + 64 hk (exact in bf16/fp16) makes a wrong row,
    head, column, mask or tile boundary show as a wrong value."""
    b, sq, sk, hq, hkv = 2, 150, 200, 4, 2
    q = torch.zeros(b, sq, hq, d, dtype=dtype, device=DEV)
    k = torch.randn(b, sk, hkv, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    j = torch.arange(sk, dtype=torch.float32)[:, None, None] + 64 * torch.arange(hkv, dtype=torch.float32)[None, :, None]
    v = j.expand(sk, hkv, d)[None].expand(b, sk, hkv, d).to(dtype).contiguous().to(DEV)
    out, lse = fmo.flash_attn(q, k, v, causal=causal, return_lse=True)
    i = torch.arange(sq, dtype=torch.float64)[:, None]
    seen = (i + sk - sq + 1).clamp(max=sk) if causal else torch.full_like(i, sk)   # [Sq, 1] keys row i sees
    want = (seen - 1) / 2 + 64 * (torch.arange(hq, dtype=torch.float64)[None, :] // (hq // hkv))  # [Sq, Hq]
    got = out.double().cpu()                                                        # [B, Sq, Hq, D]
    err = (got - want[None, :, :, None]).abs()
    tol = EPS[dtype] * want.abs()[None, :, :, None] + 1e-6
    assert not bool(got.isnan().any()) and bool((err <= tol).all()), \
        f"q = 0, {dtype}, D={d}, causal={causal}: worst at {tuple(int(x) for x in torch.unravel_index(err.argmax(), err.shape))}"
    want_lse = seen.log().T[None].expand(b, hq, sq)                                 # log of the visible key count
    assert (lse.double().cpu() - want_lse).abs().max().item() < 1e-5


@pytest.mark.parametrize("d, dv, dtype, causal", [(64, None, BF16, True), (128, None, FP16, False),
                                                  (64, None, FP16, False), (192, 128, BF16, True)])
def test_varlen_with_empty_sequences(d, dv, dtype, causal):
    """Five packed sequences: an empty q (5 keys), 17 queries with no keys, 128 queries on
    128 keys, an empty q with 17 keys nobody sees, 5 queries with no keys at the end."""
    cu_q = torch.tensor([0, 0, 17, 145, 145, 150], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 133, 150, 150], dtype=torch.int32)
    total_q, total_k, hq, hkv, seed = 150, 150, 4, 2, 7
    ctx = f"cuda varlen D={d} Dv={dv or d} {dtype} causal={causal} seed={seed}"
    q, k, v, dout = (t.to(DEV) for t in make_inputs(1, total_q, total_k, hq, hkv, d, dtype, seed, varlen_cu=True, dv=dv))
    cq, ck = cu_q.to(DEV), cu_k.to(DEV)
    (o_out, o_lse, o_dq, o_dk, o_dv), (p_out, _, p_dq, p_dk, p_dv) = oracle_and_pytorch(q, k, v, dout, causal, (cq, ck))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fmo.flash_attn_varlen(qg, kg, vg, cq, ck, 128, 128, causal=causal, return_lse=True)
    out.backward(dout)
    torch.cuda.synchronize()
    assert out.shape == (total_q, hq, dv or d) and lse.shape == (hq, total_q)
    assert_within_rule("out", out.detach(), o_out, p_out, dtype, ctx)
    assert_lse(lse, o_lse.double(), ctx)
    for name, got, want, pt in (("dq", qg.grad, o_dq, p_dq), ("dk", kg.grad, o_dk, p_dk), ("dv", vg.grad, o_dv, p_dv)):
        assert_within_rule(name, got, want, pt, dtype, ctx)
    for rows in (slice(0, 5), slice(133, 150)):   # sequences 0 and 3: keys no query sees
        assert bool((kg.grad[rows] == 0).all()) and bool((vg.grad[rows] == 0).all()), f"keys {rows}: want zero gradients"
    for rows in (slice(0, 17), slice(145, 150)):   # sequences 1 and 4: queries with no keys
        assert bool((out[rows] == 0).all()) and bool((lse[:, rows] == -math.inf).all()), f"rows {rows}: want 0 and -inf"


def _attention_swapped_for_reference(monkeypatch, compute_dtype):
    """FusedAttention's forward with fmo.flash_attn replaced by the PyTorch reference in
    compute_dtype: the same module code, only the attention differs."""
    def attend(q, k, v, causal, softmax_scale):
        return ref.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, compute_dtype=compute_dtype)[0]
    monkeypatch.setattr(nn_attention, "flash_attn", attend)


def _run_block(module, x, dy):
    """(out, dx, then every parameter's gradient) of one forward + backward."""
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    out.backward(dy)
    return [out.detach(), xg.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("hidden, heads, kv_heads, head_dim, causal, dtype", [
    (256, 4, 2, 64, True, BF16),      # GQA
    (256, 2, 1, 128, False, FP16),    # MQA
])
def test_fused_attention_module(monkeypatch, hidden, heads, kv_heads, head_dim, causal, dtype):
    """fmo.nn.FusedAttention on CUDA: output, input gradient and every projection's weight
    gradient against the same module in float64 (reference attention), within twice the error
    of the module computed by PyTorch in `dtype` on the same GPU (reference attention in
    `dtype`, the same cuBLAS projections)."""
    seed = 11
    torch.manual_seed(seed)
    module = fmo.nn.FusedAttention(hidden, heads, num_kv_heads=kv_heads, head_dim=head_dim, causal=causal, bias=True,
                                   dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 100, hidden, generator=g).to(dtype)
    dy = torch.randn(2, 100, hidden, generator=g).to(dtype)
    module_cuda = copy.deepcopy(module).to(DEV)
    got = _run_block(module_cuda, x.to(DEV), dy.to(DEV))
    torch.cuda.synchronize()
    _attention_swapped_for_reference(monkeypatch, torch.float64)
    oracle = _run_block(copy.deepcopy(module).to(DEV, torch.float64), x.double().to(DEV), dy.double().to(DEV))
    _attention_swapped_for_reference(monkeypatch, dtype)
    pt = _run_block(copy.deepcopy(module).to(DEV), x.to(DEV), dy.to(DEV))
    names = ["out", "dx"] + [f"d {n}" for n, _ in module.named_parameters()]
    ctx = f"FusedAttention hidden={hidden} heads={heads}/{kv_heads} D={head_dim} causal={causal} {dtype} seed={seed}"
    for name, a, o, p in zip(names, got, oracle, pt):
        assert a.dtype == dtype and a.device.type == DEV.type, f"{name}: {a.dtype} on {a.device} ({ctx})"
        assert_within_rule(name, a, o, p, dtype, ctx)


@pytest.mark.parametrize("kernel", ["wgmma", "mma_sync"])
@pytest.mark.parametrize("case", [c for c in CASES if c[5] in (64, 128)], ids=case_id)
def test_forward_kernels_explicitly(case, kernel):
    """Each forward kernel by name (fastmoe_ops/ops/attention_hopper.py: the sm_90a one, TMA +
    wgmma, and the mma.sync one), so both stay checked on a Hopper GPU, where flash_attn picks
    the first; and that choice itself."""
    from fastmoe_ops.ops import attention as launcher
    from fastmoe_ops.ops import attention_hopper as hopper

    hopper_gpu = torch.cuda.get_device_capability(DEV) == (9, 0)
    if kernel == "wgmma" and not hopper_gpu:
        pytest.skip("the wgmma kernel needs sm_90a")
    b, sq, sk, hq, hkv, d, dv, causal, dtype = case
    ctx = f"cuda {kernel} {case_id(case)}"
    q, k, v, dout = (t.to(DEV) for t in make_inputs(b, sq, sk, hq, hkv, d, dtype, sq + sk, dv=dv))
    (o_out, o_lse, *_), (p_out, *_) = oracle_and_pytorch(q, k, v, dout, causal)
    pb = launcher.problem(q, k, v, causal=causal, softmax_scale=None)
    assert (hopper.arch_of("cuda", DEV) == "sm_90a") == hopper_gpu
    assert hopper.forward_kernel(hopper.arch_of("cuda", DEV), d, d, sk) == ("wgmma" if hopper_gpu else "mma_sync")
    out, lse = launcher.forward(pb, "cuda", kernel)
    torch.cuda.synchronize()
    assert_within_rule("out", out.reshape(o_out.shape), o_out, p_out, dtype, ctx)
    assert_lse(lse, o_lse.double(), ctx)
