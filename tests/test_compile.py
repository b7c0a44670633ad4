"""torch.compile(fullgraph=True) on the CPU over every public op and nn module: the compiled
output equals the eager output bit for bit (the same kernels on the same engine; the graph
only adds the fmo::* custom ops as opaque nodes), and the backward works and equals eager.
torch.library.opcheck on every fmo::* op.

Backend aot_eager: dynamo's fullgraph trace, the fake implementations and AOT autograd's
joint graph, without inductor's C++ code generation (minutes on two cores, and it adds
nothing fmo-specific). Inputs are poisoned by tests/conftest.py outside the compiled region.

opcheck and FP8 on the CPU: its test_schema runs the op on inputs it perturbs arithmetically,
and PyTorch's CPU kernels lack multiplication for float8_e4m3fn ("mul_cpu_reduced_float" not
implemented), so for the GEMMs (FP8 inputs) test_schema cannot run; their other three
checks (autograd registration, fake tensors, AOT dispatch with dynamic shapes) do. The
quantisers (bf16 inputs, FP8 outputs) pass all four. MoE and attention ops are opchecked
here too, for one list of every fmo::* op (a new op without a case fails the list test)."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal, cpu_engines
from attention_util import make_inputs
from fp8_gemm_util import contiguous_layout, expert_weights, quantised_operands


GRAPHS: list[str] = []  # the code of every graph dynamo handed to the backend


def compiled(fn):
    """torch.compile(fullgraph=True) through aot_eager, recording each graph's code."""
    torch._dynamo.reset()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        GRAPHS.append(gm.print_readable(print_output=False))  # with subgraphs (autograd.Function bodies)
        return aot_eager(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=backend)


def assert_traced(*ops):
    """The last graph holds each fmo op as a node (not inlined into aten ops, not skipped)."""
    for op in ops:
        assert f"torch.ops.fmo.{op}" in GRAPHS[-1], f"fmo::{op} is not a node of the graph:\n{GRAPHS[-1]}"


def same(got, want, what, seed):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{what}[{i}]", seed)
        return
    assert_bitwise_equal(got.detach().view(torch.uint8) if got.element_size() == 1 else got.detach(),
                         want.detach().view(torch.uint8) if want.element_size() == 1 else want.detach(), what, seed)


def activations(m, k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)).to(dtype)


# ---------------------------------------------------------------------------- FP8 ops


@pytest.mark.parametrize("engine", cpu_engines())
def test_quantisers_compile_fullgraph(engine):
    x = activations(24, 384, 11)
    cases = {
        "quantize_per_token_group": lambda t: fmo.fp8.quantize_per_token_group(t, 128, pow2_scale=True),
        "quantize_per_block": lambda t: fmo.fp8.quantize_per_block(t, 128),
        "quantize_per_token_group_transposed": lambda t: fmo.fp8.quantize_per_token_group_transposed(t, 128),
    }
    with fmo.use_backend(engine):
        for name, fn in cases.items():
            same(compiled(fn)(x), fn(x), f"{name} compiled vs eager ({engine})", 11)
            assert_traced(name.replace("quantize", "fp8_quant").replace("_per_token", "_token"))


@pytest.mark.parametrize("engine", cpu_engines())
def test_gemm_compiles_with_its_quantisation(engine):
    seed = 12
    w = activations(128, 256, seed + 1)
    wq, ws = ref.quantize_per_block(w)

    def linear(x):  # quantise + GEMM + an elementwise op: one graph
        xq, xs = fmo.fp8.quantize_per_token_group(x)
        return fmo.fp8.gemm(xq, xs, wq, ws, torch.float32) * 0.5

    x = activations(32, 256, seed)
    with fmo.use_backend(engine):
        same(compiled(linear)(x), linear(x), f"fp8.gemm compiled vs eager ({engine})", seed)
        assert_traced("fp8_quant_token_group", "fp8_gemm")
        xq, xs, wq2, ws2 = quantised_operands(16, 64, 128, seed)
        out = torch.full((16, 64), float("nan"))
        got = compiled(lambda *a: fmo.fp8.gemm(*a, torch.float32, out=out))(xq, xs, wq2, ws2)
        assert got.data_ptr() == out.data_ptr()
        same(got, fmo.fp8.gemm(xq, xs, wq2, ws2, torch.float32), f"fp8.gemm out= compiled ({engine})", seed)


@pytest.mark.parametrize("engine", cpu_engines())
def test_grouped_gemms_compile_fullgraph(engine):
    seed = 13
    wq3, ws3 = expert_weights(3, 64, 128, seed)
    xq, xs, m_indices = contiguous_layout([5, 0, 130], 128, seed)
    g = torch.Generator().manual_seed(seed)
    x3 = torch.randn(3, 24, 128, generator=g)
    q = [ref.quantize_per_token_group(x3[i]) for i in range(3)]
    xq3, xs3 = torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])
    masked_m = torch.tensor([24, 0, 7], dtype=torch.int32)
    with fmo.use_backend(engine):
        fn = lambda *a: fmo.fp8.grouped_gemm_contiguous(*a)  # noqa: E731
        same(compiled(fn)(xq, xs, wq3, ws3, m_indices), fn(xq, xs, wq3, ws3, m_indices),
             f"grouped_gemm_contiguous compiled vs eager ({engine})", seed)
        assert_traced("fp8_grouped_gemm_contiguous")
        want = fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m, torch.float32)
        # out=: rows past masked_m[g] keep what was there (here -7), rows before get the product
        out = torch.full((3, 24, 64), -7.0)
        got = compiled(lambda *a: fmo.fp8.grouped_gemm_masked(*a, torch.float32, out=out, expected_m=8))(
            xq3, xs3, wq3, ws3, masked_m)
        assert got.data_ptr() == out.data_ptr()
        assert_traced("fp8_grouped_gemm_masked")
        for gi, rows in enumerate(masked_m.tolist()):
            same(got[gi, :rows], want[gi, :rows], f"grouped_gemm_masked group {gi} ({engine})", seed)
            assert bool((got[gi, rows:] == -7).all()), f"grouped_gemm_masked out=: group {gi} rows >= {rows} were written"


# -------------------------------------------------------------------- modules, attention


def forward_backward(fn, params, *inputs):
    """fn(*inputs) and the gradients of its outputs' square-sum w.r.t. inputs and params."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    for p in params:
        p.grad = None
    out = fn(*leaves)
    out.float().square().sum().backward()
    return [out.detach()] + [t.grad for t in leaves] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("engine", cpu_engines())
def test_fp8_linear_compiles_forward_and_backward_and_sees_weight_updates(engine):
    torch.manual_seed(14)
    layer = fmo.nn.FP8Linear(256, 128)
    x = activations(20, 256, 14)
    with fmo.use_backend(engine):
        fast = compiled(layer)
        want = forward_backward(layer, list(layer.parameters()), x)
        got = forward_backward(fast, list(layer.parameters()), x)
        same(got, want, f"FP8Linear compiled vs eager: out, dx, dW, db ({engine})", 14)
        assert_traced("fp8_quant_per_block", "fp8_quant_token_group", "fp8_gemm")
        with torch.no_grad():
            layer.weight.mul_(-2)  # an optimizer step: the compiled graph must quantise the new weight
        same(fast(x), layer(x), f"FP8Linear after a weight update ({engine})", 14)


@pytest.mark.parametrize("engine", cpu_engines())
def test_flash_attn_and_varlen_compile_forward_and_backward(engine):
    q, k, v, _ = make_inputs(2, 9, 13, 4, 2, 64, torch.bfloat16, 15)
    qv, kv, vv, _ = make_inputs(1, 10, 14, 4, 2, 64, torch.bfloat16, 16, varlen_cu=True)
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9, 14], dtype=torch.int32)
    dense = lambda a, b, c: fmo.flash_attn(a, b, c, causal=True)  # noqa: E731
    varlen = lambda a, b, c: fmo.flash_attn_varlen(a, b, c, cu_q, cu_k, 7, 5, causal=True)  # noqa: E731
    with fmo.use_backend(engine):
        same(forward_backward(compiled(dense), [], q, k, v), forward_backward(dense, [], q, k, v),
             f"flash_attn compiled vs eager: out, dq, dk, dv ({engine})", 15)
        assert_traced("flash_attn_fwd")
        same(forward_backward(compiled(varlen), [], qv, kv, vv), forward_backward(varlen, [], qv, kv, vv),
             f"flash_attn_varlen compiled vs eager: out, dq, dk, dv ({engine})", 16)
        assert_traced("flash_attn_varlen_fwd")


@pytest.mark.parametrize("engine", cpu_engines())
def test_fused_attention_module_compiles_forward_and_backward(engine):
    torch.manual_seed(17)
    attn = fmo.nn.FusedAttention(128, 2, num_kv_heads=1, head_dim=64, dtype=torch.bfloat16)
    x = torch.randn(2, 11, 128).to(torch.bfloat16)
    params = list(attn.parameters())
    with fmo.use_backend(engine):
        same(forward_backward(compiled(attn), params, x), forward_backward(attn, params, x),
             f"FusedAttention compiled vs eager: out, dx, parameter grads ({engine})", 17)


# ----------------------------------------------------------------------------- opcheck

ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_FP8_SCHEMA = ALL_CHECKS[1:]  # FP8 inputs: test_schema's perturbation needs e4m3 arithmetic on the CPU


def opcheck_cases():
    """(op name, args, checks): one case per fmo::* op."""
    x = activations(16, 256, 18)
    xq, xs, wq, ws = quantised_operands(32, 64, 256, 18)
    wq3, ws3 = expert_weights(2, 64, 256, 18)
    m_indices = torch.tensor([0] * 20 + [-1] * 4 + [1] * 8, dtype=torch.int32)
    xq3, xs3 = xq.view(2, 16, 256), xs.view(2, 16, 2)
    masked_m = torch.tensor([16, 5], dtype=torch.int32)
    q, k, v, dout = make_inputs(1, 5, 7, 2, 1, 64, torch.bfloat16, 19)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 0, 7], dtype=torch.int32)
    out, lse = torch.ops.fmo.flash_attn_fwd(q, k, v, True, 0.125)
    vout, vlse = torch.ops.fmo.flash_attn_varlen_fwd(q[0], k[0], v[0], cu_q, cu_k, 3, 7, False, 0.125)
    rows = torch.tensor([3, -1, 0, 7, 7], dtype=torch.int32)
    y = torch.randn(6, 32).to(torch.bfloat16)
    slot_rows = torch.tensor([[0, 5], [-1, 2], [4, 4]], dtype=torch.int32)
    return [
        ("fp8_quant_token_group", (x, 128, False, 1e-12), ALL_CHECKS),
        ("fp8_quant_per_block", (x, 128, True, 1e-12), ALL_CHECKS),
        ("fp8_quant_token_group_transposed", (x, 128, False, 1e-12), ALL_CHECKS),
        ("fp8_swiglu_quant_token_group", (x, 128, False, 1e-12), ALL_CHECKS),
        ("fp8_gemm", (xq, xs, wq, ws, torch.float32), NO_FP8_SCHEMA),
        ("fp8_grouped_gemm_contiguous", (xq, xs, wq3, ws3, m_indices, torch.bfloat16), NO_FP8_SCHEMA),
        ("fp8_grouped_gemm_masked", (xq3, xs3, wq3, ws3, masked_m, torch.float32), NO_FP8_SCHEMA),
        ("flash_attn_fwd", (q, k, v, True, 0.125), ALL_CHECKS),
        ("flash_attn_bwd", (dout, q, k, v, out, lse, True, 0.125), ALL_CHECKS),
        ("flash_attn_varlen_fwd", (q[0], k[0], v[0], cu_q, cu_k, 3, 7, False, 0.125), ALL_CHECKS),
        ("flash_attn_varlen_bwd", (dout[0], q[0], k[0], v[0], vout, vlse, cu_q, cu_k, 3, 7, False, 0.125), ALL_CHECKS),
        ("moe_gather_rows", (x[:8], rows), ALL_CHECKS),
        ("moe_gather_reduce", (y, slot_rows, torch.rand(3, 2)), ALL_CHECKS),
    ]


def test_every_fmo_op_has_an_opcheck_case():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fmo::")}
    with fmo.use_backend("reference"):
        covered = {name for name, _, _ in opcheck_cases()}
    assert registered == covered, f"fmo ops without an opcheck case: {sorted(registered - covered)}; " \
                                  f"cases for ops that do not exist: {sorted(covered - registered)}"


@pytest.mark.parametrize("case", range(13))
def test_opcheck(case):
    # reference engine: opcheck runs each op a dozen times (the sim engine passes too, slowly)
    with fmo.use_backend("reference"):
        name, args, checks = opcheck_cases()[case]
        torch.library.opcheck(getattr(torch.ops.fmo, name).default, args, test_utils=checks)


@pytest.mark.parametrize("engine", cpu_engines())
def test_single_rank_moe_layer_compiles_forward_and_backward(engine):
    """Static shapes (num_worst_tokens): routing, the masked expert GEMMs and the weighted sum
    depend on no data, so the layer is one graph. (Without num_worst_tokens, permute sizes its
    segments from the routing on the host: a data-dependent shape, not one graph.)"""
    torch.manual_seed(18)
    layer = fmo.nn.MoELayer(128, 128, 4, 2, num_worst_tokens=16, dtype=torch.float32)
    x = torch.randn(12, 128)
    params = [layer.router_weight, layer.w13, layer.w2]
    with fmo.use_backend(engine):
        fast = compiled(layer)
        same(forward_backward(fast, params, x), forward_backward(layer, params, x),
             f"MoELayer compiled vs eager: out, dx, d router, d w13, d w2 ({engine})", 18)
        assert_traced("fp8_quant_per_block", "fp8_quant_token_group", "fp8_grouped_gemm_masked")
        with torch.no_grad():
            layer.w2.mul_(-2)  # an optimizer step: the compiled graph must quantise the new weights
        same(fast(x), layer(x), f"MoELayer after a weight update ({engine})", 18)
