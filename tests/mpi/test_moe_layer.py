"""fmo.nn.MoELayer across MPI ranks (CPU tensors, `sim` and `reference` engines): forward and
backward against one dense float64 computation of the same layer over every rank's tokens
(same weights, the routing the layer chose), and overlap=True against overlap=False.

Every rank builds the global weights from one seed and every rank's tokens from (seed + rank),
so each rank evaluates the float64 oracle for the whole world by itself.

Tolerance (FP8): the layer quantises four operands on the way to `out` (x, w13, the SiLU*up
activation, w2), each an e4m3 rounding of ~2.5% RMS relative error, calc_diff ~3e-4 each
(calc_diff ~ |err|^2 / 2): ~1.3e-3 together; FP8Linear's tests allow twice the estimate for
their two operands (1.5e-3), so the layer's bound is 4e-3 for out and every gradient (the
gradients pass through as many quantised operands). Elementwise: no coordinate may be off by
more than 15% of the tensor's largest magnitude (a wrong expert, slot or row is off by its own
magnitude). Measured on these inputs: calc_diff up to 2.8e-3, worst coordinate up to 9.0%."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference.fp8 import calc_diff
from fastmoe_ops.reference.moe_layer import moe_layer as dense_layer

from mpi_util import comm, need_ranks, run_all  # noqa: F401 (comm: a fixture)

ENGINES = [e for e in ("sim", "reference") if e in fmo.available_backends()]
H, I, E = 128, 128, 8
CALC_DIFF_BOUND = 4e-3
ELEMENT_BOUND = 0.15
OVERLAP_WGRAD_BOUND = 1e-3   # overlap vs sequential expert-weight gradients: measured 2.5e-4..3.1e-4 (4 ranks)


def global_weights(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(E, H, generator=g) / H ** 0.5
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    return router, w13, w2


def tokens_of(rank, seed, count, dtype):
    g = torch.Generator().manual_seed(seed + 1 + rank)
    return torch.randn(count, H, generator=g).to(dtype), torch.randn(count, H, generator=g).to(dtype)


def close(name, got, want, where):
    assert not got.isnan().any(), f"{name}: NaN ({where})"
    d = calc_diff(got, want)
    err = (got.double() - want).abs()
    worst = err.max().item() if err.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 1.0
    coord = tuple(int(c) for c in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    assert d < CALC_DIFF_BOUND, f"{name}: calc_diff {d:.3g} >= {CALC_DIFF_BOUND} vs float64 ({where})"
    assert worst <= ELEMENT_BOUND * scale, f"{name}: |err| {worst:.3g} at {coord} > {ELEMENT_BOUND} * max {scale:.3g} ({where})"
    return d


def run_layer(group, counts, seed, dtype, overlap, k, **kw):
    layer = fmo.nn.MoELayer(H, I, E, k, group=group, dtype=dtype, overlap=overlap, **kw)
    layer.load_global_weights(*global_weights(seed, dtype))
    x, dy = tokens_of(group.rank, seed, counts[group.rank], dtype)
    x.requires_grad_()
    out = layer(x)
    out.backward(dy)
    return layer, x, dy, out


def check_against_dense(comm, layer, x, dy, out, counts, seed, dtype, where, **kw):
    """The float64 dense layer over every rank's tokens, with every rank's routing."""
    world, rank = comm.Get_size(), comm.Get_rank()
    idx_all = comm.allgather(layer.last_topk_idx)
    router, w13, w2 = global_weights(seed, dtype)
    xs, dys = zip(*(tokens_of(r, seed, counts[r], dtype) for r in range(world)))
    x64 = torch.cat(xs).double().requires_grad_()
    r64, a64, b64 = (t.double().requires_grad_() for t in (router, w13, w2))
    y64 = dense_layer(x64, r64, a64, b64, torch.cat(idx_all), **kw)
    y64.backward(torch.cat(dys).double())
    lo = sum(counts[:rank])
    el, eh = rank * layer.num_local_experts, (rank + 1) * layer.num_local_experts
    router_sum = sum(comm.allgather(layer.router_weight.grad))   # data parallel: the user all-reduces it
    diffs = {}
    for name, got, want in (("out", out, y64[lo:lo + counts[rank]]), ("dx", x.grad, x64.grad[lo:lo + counts[rank]]),
                            ("d router", router_sum, r64.grad), ("d w13", layer.w13.grad, a64.grad[el:eh]),
                            ("d w2", layer.w2.grad, b64.grad[el:eh])):
        diffs[name] = close(name, got, want, where)
    return diffs


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("overlap", [False, True])
def test_layer_matches_dense_float64(comm, engine, overlap):
    need_ranks(comm, 4)
    seed, dtype, k = 11, torch.float32, 3
    counts = [23, 0, 40, 9][: comm.Get_size()] + [17] * (comm.Get_size() - 4)   # ragged, one rank empty
    opts = dict(scoring="sigmoid", normalize_topk=True, route_scale=2.5)
    group = fmo.comm.Group(comm)

    def body():
        with fmo.use_backend(engine):
            layer, x, dy, out = run_layer(group, counts, seed, dtype, overlap, k, **opts)
        try:
            return check_against_dense(comm, layer, x, dy, out, counts, seed, dtype, f"{engine}, overlap={overlap}, seed {seed}",
                                       scoring="sigmoid", normalize=True, route_scale=2.5)
        finally:
            layer.destroy()

    run_all(comm, body)


def test_overlap_equals_sequential(comm):
    """Outputs and input gradients bit for bit (every op on a token's path is row-wise and the
    router runs before the split); expert-weight gradients to FP8 rounding (two halves' wgrad
    GEMMs quantise different token groups, then add)."""
    need_ranks(comm, 4)
    seed, dtype, k = 5, torch.bfloat16, 2
    counts = [31, 12, 1, 26][: comm.Get_size()] + [8] * (comm.Get_size() - 4)
    group = fmo.comm.Group(comm)

    def body():
        runs = []
        for overlap in (False, True):
            layer, x, dy, out = run_layer(group, counts, seed, dtype, overlap, k, scoring="softmax")
            runs.append((out.detach(), x.grad, layer.router_weight.grad, layer.w13.grad, layer.w2.grad))
            layer.destroy()
        (o0, x0, r0, a0, b0), (o1, x1, r1, a1, b1) = runs
        for name, a, b in (("out", o0, o1), ("dx", x0, x1), ("d router", r0, r1)):
            assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                               b.view(torch.int16) if b.dtype == torch.bfloat16 else b), \
                f"{name}: overlap=True differs from overlap=False (max {(a.double() - b.double()).abs().max().item():.3g}, seed {seed})"
        for name, a, b in (("d w13", a0, a1), ("d w2", b0, b1)):
            d = calc_diff(a, b)
            assert d < OVERLAP_WGRAD_BOUND, f"{name}: overlap vs sequential calc_diff {d:.3g} (seed {seed})"

    with fmo.use_backend("sim" if "sim" in ENGINES else "reference"):
        run_all(comm, body)


@pytest.mark.parametrize("overlap", [False, True])
def test_static_shapes_and_an_empty_rank(comm, overlap):
    """Buffer(num_worst_tokens=...) fixes every receive shape (padding rows: topk_idx -1,
    skipped by permute); rank 0 has no tokens at all. Still the float64 layer."""
    need_ranks(comm, 4)
    seed, dtype, k = 13, torch.float32, 2
    counts = [0, 15, 33, 4][: comm.Get_size()] + [6] * (comm.Get_size() - 4)
    group = fmo.comm.Group(comm)

    def body():
        with fmo.use_backend("reference"):
            layer, x, dy, out = run_layer(group, counts, seed, dtype, overlap, k, num_worst_tokens=sum(counts))
        try:
            return check_against_dense(comm, layer, x, dy, out, counts, seed, dtype, f"num_worst_tokens, overlap={overlap}")
        finally:
            layer.destroy()

    run_all(comm, body)


FP8_DISPATCH_WGRAD_BOUND = 1e-3   # d w13 from dequantised x: one more e4m3 rounding (~3e-4)


@pytest.mark.parametrize("transport, static, overlap", [("host", False, False), ("host", True, True), ("ipc", False, True),
                                                        ("ipc", True, False)])
def test_fp8_dispatch_equals_bf16_dispatch(comm, monkeypatch, transport, static, overlap):
    """The layer dispatches x as FP8 (use_fp8=True; on ipc the kernel quantises): the very
    quantisation the experts' first GEMM applies to bf16 rows, so out, dx (through the FP8
    rows' gradient anchor), the router and w2 gradients equal a bf16 dispatch's bit for bit;
    the w13 gradient reads the dequantised rows (one more e4m3 rounding of x): calc_diff
    below FP8_DISPATCH_WGRAD_BOUND."""
    if transport == "ipc" and "sim" not in ENGINES:
        pytest.skip("the ipc transport runs on the sim engine here")
    need_ranks(comm, 2)
    seed, dtype, k = 17, torch.bfloat16, 2
    counts = [19, 0, 27, 5][: comm.Get_size()] + [11] * (comm.Get_size() - 4)
    group = fmo.comm.Group(comm)
    sent = []
    real = fmo.moe.Buffer.dispatch

    def recording(buf, x, topk_idx, topk_weights=None, use_fp8=False):   # bf16[0]: the bf16 run
        sent.append(use_fp8)
        return real(buf, x, topk_idx, topk_weights, use_fp8=use_fp8 and not bf16[0])

    bf16 = [False]
    monkeypatch.setattr(fmo.moe.Buffer, "dispatch", recording)
    kw = dict(transport=transport, max_tokens_per_rank=64) if transport == "ipc" else {}
    if static:
        kw["num_worst_tokens"] = sum(counts)

    def body():
        runs = []
        for bf16[0] in (False, True):
            layer, x, dy, out = run_layer(group, counts, seed, dtype, overlap, k, **kw)
            runs.append((out.detach(), x.grad, layer.router_weight.grad, layer.w2.grad, layer.w13.grad))
            layer.destroy()
        assert sent and all(sent), f"the layer must dispatch with use_fp8=True: {sent}"
        for name, a, b in zip(("out", "dx", "d router", "d w2"), runs[0], runs[1]):
            assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                               b.view(torch.int16) if b.dtype == torch.bfloat16 else b), \
                f"{name}: FP8 dispatch differs from bf16 dispatch (max {(a.double() - b.double()).abs().max().item():.3g})"
        d = calc_diff(runs[0][4], runs[1][4])
        assert d < FP8_DISPATCH_WGRAD_BOUND, f"d w13: calc_diff {d:.3g} between FP8 and bf16 dispatch"
        return d

    with fmo.use_backend("sim" if "sim" in ENGINES else "reference"):
        run_all(comm, body)


def test_expert_bias_update_uses_the_global_load(comm):
    """update_expert_bias sums every rank's expert load (collective) and moves each bias by
    rate * sign(mean - load): the same bias on every rank, from the routing every rank chose."""
    need_ranks(comm, 4)
    counts = [5, 9, 0, 14][: comm.Get_size()] + [3] * (comm.Get_size() - 4)
    group = fmo.comm.Group(comm)

    def body():
        with fmo.use_backend("reference"):
            layer, x, dy, out = run_layer(group, counts, 17, torch.float32, False, 2, expert_bias=True)
        try:
            idx = torch.cat(comm.allgather(layer.last_topk_idx))
            want = torch.bincount(idx.reshape(-1), minlength=E).float()
            load = layer.update_expert_bias(0.5)
            assert torch.equal(load, want), f"load {load.tolist()} != every rank's routing {want.tolist()}"
            assert torch.equal(layer.expert_bias, 0.5 * torch.sign(want.mean() - want))
            biases = comm.allgather(layer.expert_bias)
            assert all(torch.equal(b, biases[0]) for b in biases), "ranks disagree on the bias"
        finally:
            layer.destroy()

    run_all(comm, body)
