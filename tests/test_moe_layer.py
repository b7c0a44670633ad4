"""fmo.nn.MoELayer on one process (group=None: every expert local, nothing exchanged), on the
`sim` and `reference` engines.

- forward and backward against the dense float64 layer (fastmoe_ops.reference.moe_layer) with
  the routing the layer chose. Tolerance: four e4m3-quantised operands on the way to `out`
  (x, w13, the SiLU*up activation, w2), calc_diff ~3e-4 each (relative RMS error ~2.5%,
  calc_diff ~ |err|^2 / 2), ~1.3e-3 together; FP8Linear's tests allow twice their two-operand
  estimate, so the layer allows 4e-3 (out and every gradient). Measured (both engines, these
  seeds): ~1.5e-3..2.1e-3, the router gradient 0.9e-3..3.2e-3 (the estimate is low). Plus an
  elementwise bound: no coordinate off by more than 15% of the tensor's largest magnitude
  (measured worst 4.3%..7.9%; a wrong expert, slot or row is off by its own magnitude).
- the grouped FP8 experts, tightly: against float64 products of the very operands the recipe
  quantises (only the GEMMs' accumulation differs: calc_diff < 1e-9 on `reference`, < 5e-5 on
  `sim`, which reproduces the tensor cores' FP8 sums), so a layout slip in dgrad or wgrad cannot
  hide in FP8 noise.
- overlap=True equals overlap=False bit for bit in out, dx and the router gradient; the expert
  weight gradients (two halves' FP8 wgrad, summed) to calc_diff < 1e-3 (measured ~3.5e-4), not
  the 4e-3 float64 bound, under which one half's wgrad scaled wrong by ~12% would pass (1e-3: ~5%).
The layer, the float64 check and these bounds live in the helper module tests/moe_layer_util.py
(the GPU's tests/gpu/test_moe_layer_gpu.py uses them too).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.errors import InputError
from fastmoe_ops.moe import permute
from fastmoe_ops.nn import moe_experts
from fastmoe_ops.reference import fp8 as ref

from conftest import assert_bitwise_equal, cpu_engines
from device_tags import device_tags
from moe_layer_util import OVERLAP_WGRAD_BOUND, make_layer, run_and_check
from readme_util import run_readme_example


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scoring,normalize", [("softmax", False), ("sigmoid", True)])
def test_layer_matches_dense_float64(engine, dtype, scoring, normalize):
    seed = 3
    layer = make_layer(seed, dtype=dtype, scoring=scoring, normalize_topk=normalize, route_scale=1.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, 128, generator=g).to(dtype)       # 74 tokens: ragged per expert, not a tile multiple
    dy = torch.randn(2, 37, 128, generator=g).to(dtype)
    with fmo.use_backend(engine):
        out, _ = run_and_check(layer, x, dy, f"{engine}, {dtype}, {scoring}, seed {seed}",
                               scoring=scoring, normalize=normalize, route_scale=1.5)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("engine", cpu_engines())
def test_structured_routing_one_expert(engine):
    """A bias that forces every token onto experts 4 and 1 (k = 2): the other experts get no
    rows (empty segments, zero gradients) and the oracle, with the same routing, agrees."""
    layer = make_layer(8, experts=6, k=2, expert_bias=True)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0, 100.0, 0.0]))
    x = torch.arange(20 * 128, dtype=torch.float32).reshape(20, 128).remainder(7).sub(3) / 4   # structured
    dy = torch.randn(20, 128, generator=torch.Generator().manual_seed(8))
    with fmo.use_backend(engine):
        run_and_check(layer, x, dy, f"{engine}, forced routing")
    assert torch.equal(layer.last_topk_idx, torch.tensor([[4, 1]] * 20))
    for e in (0, 2, 3, 5):
        assert torch.count_nonzero(layer.w13.grad[e]) == 0 and torch.count_nonzero(layer.w2.grad[e]) == 0
    assert layer.expert_load.tolist() == [0, 20, 0, 0, 20, 0]
    load = layer.update_expert_bias(0.01)        # overloaded experts go down, idle ones up
    assert load.tolist() == [0, 20, 0, 0, 20, 0]
    assert torch.allclose(layer.expert_bias, torch.tensor([0.01, 49.99, 0.01, 0.01, 99.99, 0.01]))
    assert layer.expert_load.count_nonzero() == 0


@pytest.mark.parametrize("engine", cpu_engines())
def test_overlap_equals_sequential(engine):
    x = torch.randn(45, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)   # odd: halves 23 + 22
    dy = torch.randn(45, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    runs = []
    for overlap in (False, True):
        layer = make_layer(9, dtype=torch.bfloat16, k=3, overlap=overlap)
        xi = x.clone().requires_grad_()
        with fmo.use_backend(engine):
            out = layer(xi)
            out.backward(dy)
        runs.append((out.detach(), xi.grad, layer.router_weight.grad, layer.w13.grad.float(), layer.w2.grad.float()))
    for name, a, b in zip(("out", "dx", "d router"), runs[0][:3], runs[1][:3]):
        assert torch.equal(a, b), f"{name}: overlap differs from sequential by {(a.double() - b.double()).abs().max().item():.3g}"
    for name, a, b in zip(("d w13", "d w2"), runs[0][3:], runs[1][3:]):   # two halves' FP8 wgrad, summed
        d = ref.calc_diff(a, b)
        assert d < OVERLAP_WGRAD_BOUND, f"{name}: overlap vs sequential calc_diff {d:.3g} ({engine}, seeds 4/5/9)"


# test_grouped_experts_tight: only the GEMMs' accumulation differs from the float64 products.
# reference: fp32 sums (measured ~5e-15). sim: the tensor cores' own FP8 sums, which the
# simulator reproduces (ptx/tensor_core_numerics.cuh: a 13-bit window per k-step, fitted on
# the H200), measured 1.8e-6..1.3e-5 over seeds 21..23; 5e-5 stays well below one operand's
# e4m3 rounding (~3e-4), and a row, slot or expert slip is off by O(1).
TIGHT_BOUND = {"reference": 1e-9, "sim": 5e-5}


@pytest.mark.parametrize("inter", [64, 128])   # 128: the fused SwiGLU + quantisation kernel
@pytest.mark.parametrize("engine", cpu_engines())
def test_grouped_experts_tight(engine, inter):
    """y, dx, dW13, dW2 of the grouped FP8 experts against float64 products of the operands the
    recipe quantises (dequantised with the same scale layout); TIGHT_BOUND says why per engine."""
    e, hidden, n = 3, 128, 150
    g = torch.Generator().manual_seed(21)
    recv_x = torch.randn(n, hidden, generator=g)
    idx = torch.randint(0, e, (n, 1), generator=g)
    idx[:7] = 2                                                     # expert 1 may be empty: force some skew
    w13 = torch.randn(e, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(e, hidden, inter, generator=g) / inter ** 0.5
    dy_rows = torch.randn(n, hidden, generator=g)
    with fmo.use_backend(engine):
        xs, pmap = permute(recv_x, idx, e, alignment=fmo.fp8.contiguous_alignment())
        xs = xs.detach().requires_grad_()
        a13, a2 = w13.clone().requires_grad_(), w2.clone().requires_grad_()
        y = moe_experts.grouped_experts(xs, pmap, a13, a2)
        dy = torch.zeros_like(y)
        real = pmap.src_slots >= 0
        dy[real] = dy_rows[pmap.src_rows[real]]
        y.backward(dy)
    off = pmap.expert_offsets.tolist()
    deq = ref.dequantize_per_token_group
    w13q, w13s = moe_experts.quantize_expert_weights(w13)
    w2q, w2s = moe_experts.quantize_expert_weights(w2)
    want_y, want_dx = torch.zeros(y.shape, dtype=torch.float64), torch.zeros(y.shape, dtype=torch.float64)
    want_d13, want_d2 = torch.zeros(w13.shape, dtype=torch.float64), torch.zeros(w2.shape, dtype=torch.float64)
    for j in range(e):
        lo, hi = off[j], off[j + 1]
        if hi == lo:
            continue
        x_e = xs.detach()[lo:hi]
        w13d, w2d = ref.dequantize_per_block(w13q[j], w13s[j]), ref.dequantize_per_block(w2q[j], w2s[j])
        h = deq(*ref.quantize_per_token_group(x_e)) @ w13d.t()
        a = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).float()
        want_y[lo:hi] = deq(*ref.quantize_per_token_group(a)) @ w2d.t()
        da = deq(*ref.quantize_per_token_group(dy[lo:hi])) @ w2d
        gate, up = h[:, :inter], h[:, inter:]
        sig = gate.sigmoid()
        dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * gate * sig], 1).float()
        want_dx[lo:hi] = deq(*ref.quantize_per_token_group(dh)) @ w13d
        tq = lambda t: deq(*ref.quantize_per_token_group(t.t().contiguous()))   # per 128 tokens
        want_d2[j] = tq(dy[lo:hi]) @ tq(a).t()
        want_d13[j] = tq(dh) @ tq(x_e).t()
    for name, got, want in (("y", y, want_y), ("dx", xs.grad, want_dx), ("dW13", a13.grad, want_d13), ("dW2", a2.grad, want_d2)):
        assert not got.isnan().any(), name
        d = ref.calc_diff(got, want)
        assert d < TIGHT_BOUND[engine], f"{name}: calc_diff {d:.3g} vs float64 products of the quantised operands ({engine}, seed 21)"
    assert torch.count_nonzero(y[~real]) == 0, "padding rows must stay zero"


@pytest.mark.parametrize("static", [False, True])
def test_experts_use_the_fused_swiglu_quantisation(monkeypatch, static):
    """I % 128 == 0: the forward quantises silu(gate) * up with the fused kernel (once per
    forward, on h [rows, 2I]), and still trains (the backward recomputes silu from h: the
    gradients are checked against float64 by the tests above, at I = 128); I = 64: not fused."""
    calls = []
    fused = moe_experts.swiglu_quantize_per_token_group

    def counting(h, *a, **kw):
        calls.append(tuple(h.shape))
        return fused(h, *a, **kw)

    monkeypatch.setattr(moe_experts, "swiglu_quantize_per_token_group", counting)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(4))
    for inter, want in ((128, 1), (64, 0)):
        calls.clear()
        layer = make_layer(15, inter=inter, experts=4, k=2, num_worst_tokens=64 if static else 0)
        with fmo.use_backend("sim" if "sim" in fmo.available_backends() else "reference"):
            layer(x.clone().requires_grad_()).sum().backward()
        assert len(calls) == want and all(c[1] == 2 * inter for c in calls), (inter, calls)
        assert layer.w13.grad is not None and layer.w13.grad.abs().sum() > 0 and layer.w2.grad.abs().sum() > 0


def test_experts_refuse_a_pair_without_its_gradient_anchor():
    """FP8 rows reach the experts only from a dispatch with use_fp8 (their anchor carries x's
    gradient and dtype; tests/mpi/test_moe_layer.py checks that path bit for bit against a
    bf16 dispatch); a bare pair is refused, naming the argument."""
    w13, w2 = torch.randn(2, 256, 128), torch.randn(2, 128, 128)
    pair = fmo.fp8.quantize_per_token_group(torch.randn(4, 128))
    idx = torch.tensor([[0], [1], [0], [1]])
    _, pmap = permute(pair, idx, 2, alignment=fmo.fp8.contiguous_alignment())
    with pytest.raises(InputError, match="^x_sorted: expected a tensor, or the FP8 rows of a dispatch with use_fp8=True"):
        moe_experts.grouped_experts(pair, pmap, w13, w2)
    with pytest.raises(InputError, match="^recv_x: expected a tensor, or the FP8 rows"):
        moe_experts.masked_experts(pair, idx, torch.ones(4, 1), w13, w2)


def test_empty_batch_and_inference():
    """No tokens: an empty output (and a backward that reaches every parameter). Under
    no_grad the overlap schedule builds no sub-graphs and still equals the sequential layer."""
    layer = make_layer(1)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    with fmo.use_backend("reference"):
        empty = torch.zeros(0, 128, requires_grad=True)
        out = layer(empty)
        assert out.shape == (0, 128)
        out.sum().backward()
        with torch.no_grad():
            y_seq = layer(x)
            layer.overlap = True
            y_ovl = layer(x)
    assert not y_ovl.requires_grad and torch.equal(y_seq, y_ovl)


def test_bad_input_is_refused():
    layer = make_layer(2)
    with pytest.raises(InputError, match="x: expected a tensor"):
        layer(torch.randn(4, 96))
    with pytest.raises(InputError, match="x: expected dtype"):
        layer(torch.randn(4, 128, dtype=torch.bfloat16))
    with pytest.raises(InputError, match="hidden"):
        fmo.nn.MoELayer(100, 128, 4, 2)
    with pytest.raises(InputError, match="top_k"):
        fmo.nn.MoELayer(128, 128, 4, 5)
    with pytest.raises(InputError, match="scoring"):
        fmo.nn.MoELayer(128, 128, 4, 2, scoring="relu")
    with pytest.raises(InputError, match="update_expert_bias"):
        layer.update_expert_bias(0.1)


def test_weights_requantised_only_when_they_change(monkeypatch):
    calls = []
    real = moe_experts.quantize_expert_weights
    monkeypatch.setattr(moe_experts, "quantize_expert_weights", lambda w: calls.append(1) or real(w))
    layer = make_layer(6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(8, 128)
    with fmo.use_backend("reference"):
        layer(x).sum().backward()
        layer(x)
        assert len(calls) == 2, "w13 and w2 quantised once each"
        opt.step()
        layer(x)
        assert len(calls) == 4


def test_overlap_gemms_see_the_reduced_sm_budget(monkeypatch):
    """Inside the overlap schedule communication is in flight, so the expert GEMMs (forward
    and backward) size persistent grids to num_sms - comm_sms; the sequential layer gives
    them every SM."""
    seen = []
    real = moe_experts.grouped_gemm_contiguous
    monkeypatch.setattr(moe_experts, "grouped_gemm_contiguous", lambda *a, **kw: seen.append(fmo.sm_budget().compute_sms) or real(*a, **kw))
    x = torch.randn(16, 128, requires_grad=True)
    with fmo.use_backend("reference"), fmo.comm_sms(24):
        for overlap in (False, True):
            seen.clear()
            make_layer(3, overlap=overlap)(x).sum().backward()
            num = fmo.sm_budget().num_sms
            assert len(seen) == (8 if overlap else 4), f"2 forward + 2 dgrad GEMMs per micro-batch, got {len(seen)}"
            assert set(seen) == ({num - 24} if overlap else {num}), (overlap, seen)


def test_readme_sm_budget_example_runs():
    """README "## The SM budget" runs as written (its own assert checks the budget)."""
    ns = run_readme_example("## The SM budget")
    assert ns["x"].grad is not None and not ns["x"].grad.isnan().any()
    assert ns["layer"].w13.grad is not None and ns["budget"].comm_sms == 24


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("overlap", [False, True])
def test_static_shapes_masked_experts(engine, overlap):
    """num_worst_tokens > 0: fixed per-expert slots and masked grouped GEMMs; same float64 bound."""
    layer = make_layer(12, experts=4, k=3, num_worst_tokens=64, overlap=overlap, scoring="sigmoid", normalize_topk=True)
    g = torch.Generator().manual_seed(12)
    x, dy = torch.randn(50, 128, generator=g), torch.randn(50, 128, generator=g)
    with fmo.use_backend(engine):
        run_and_check(layer, x, dy, f"{engine}, masked, overlap={overlap}, seed 12", scoring="sigmoid", normalize=True)


def test_masked_experts_never_synchronise(monkeypatch):
    """The static path reads nothing back to the host: every Tensor -> Python conversion
    raises while its forward and backward run (sim engine: the kernels' launch path)."""
    layer = make_layer(13, experts=4, k=2, num_worst_tokens=32)
    x = torch.randn(20, 128, requires_grad=True)
    with fmo.use_backend("sim"):
        idx, w = layer.route(x)
        fp8 = layer._fp8_weights()

        def refuse(*a, **kw):
            raise AssertionError("host synchronisation in the static-shape experts")

        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__int__", "__float__", "__bool__", "nonzero", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, refuse)
            y = moe_experts.masked_experts(x, idx, w, layer.w13, layer.w2, *fp8)
            y.backward(torch.ones_like(y))
    assert not y.isnan().any() and layer.w13.grad is not None


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("static", [False, True])
def test_layer_keeps_tensors_on_the_device(engine, static):
    """What a layer on a GPU meets, checked on the CPU with DeviceTags (tests/device_tags.py):
    with the parameters, buffers, input and output gradient taken as device tensors, nothing
    in the forward and backward (router, permute or the static slots, FP8 experts, unpermute)
    is made on the host and then mixed with them where CUDA would refuse (the first H200 run
    stopped in the layer's permute on exactly that). Same bits as an unchecked run."""
    g = torch.Generator().manual_seed(14)
    x, dy = torch.randn(40, 128, generator=g), torch.randn(40, 128, generator=g)
    runs = []
    for checked in (False, True):
        layer = make_layer(14, experts=4, k=2, num_worst_tokens=64 if static else 0, device="cpu")
        xi = x.clone().requires_grad_()
        with fmo.use_backend(engine), device_tags() if checked else contextlib.nullcontext() as tags:
            if checked:
                tags.mark(*layer.parameters(), *layer.buffers(), xi, dy)
            out = layer(xi)
            out.backward(dy)
        runs.append([out.detach(), xi.grad, layer.router_weight.grad, layer.w13.grad, layer.w2.grad])
    assert not tags.violations, tags.report()
    for name, a, b in zip(("out", "dx", "d router", "d w13", "d w2"), *runs):
        assert_bitwise_equal(a, b, f"{name}: checked vs unchecked run ({engine}, static={static})")


def test_bench_rows_single_process():
    """bench/bench_moe_layer.py's rows on a tiny shape (one process: no Buffer, nothing to overlap
    with, so no comm time and no traced fraction): times are positive and named."""
    MPI = pytest.importorskip("mpi4py.MPI")
    from bench import bench_moe_layer as bench

    shape = (16, 128, 128, 4, 2)
    with fmo.use_backend("reference"):
        rows = bench.layer_rows(MPI.COMM_SELF, None, shape, "reference", torch.device("cpu"), "host", max_seconds=1.0)
        sms = bench.reserved_sms_rows(shape, "reference", torch.device("cpu"), reps=1)
    assert [r.op for r in rows] == ["moe_layer_step", "moe_layer_overlap"]
    assert [r.extra["overlapped"] for r in rows] == [False, True], "the default is sequential on a CPU, the forced row overlaps"
    for row in rows:
        assert row.ours_s > 0 and row.baseline_s > 0 and row.extra["comm_s"] == 0 and row.extra["traced"] is None
        assert row.stats["pairs"] >= 8 and row.stats["ratio_lo"] <= row.stats["ratio"] <= row.stats["ratio_hi"]
    assert [r.extra["reserved_sms"] for r in sms] == list(bench.RESERVED_SMS) and all(r.ours_s > 0 for r in sms)


def test_overlap_auto_overlaps_only_on_the_ipc_transport_with_cuda_tensors(monkeypatch):
    """overlap='auto' (the default) runs the two-micro-batch schedule only where communication
    has its own SMs (ipc transport, CUDA tensors, a group); elsewhere it is sequential, because
    on CPUs the two micro-batches share the same cores (bench/README.md measures why)."""
    layer = make_layer(3)
    assert layer.overlap == "auto"
    cases = [(None, "ipc", "cuda", False), (object(), "host", "cuda", False), (object(), "ipc", "cpu", False),
             (object(), "ipc", "cuda", True)]
    for group, transport, device, want in cases:
        layer.group, layer.transport = group, transport
        assert layer.overlaps(torch.device(device)) is want, (group, transport, device)
    layer.group = None
    for forced in (True, False):
        layer.overlap = forced
        assert layer.overlaps(torch.device("cpu")) is forced
    # the CPU forward under 'auto' takes the sequential path: the two-batch function is never called
    layer.overlap = "auto"
    import fastmoe_ops.nn.moe_layer as ml
    monkeypatch.setattr(ml._TwoBatchFn, "apply", lambda *a: pytest.fail("auto overlapped on a CPU"))
    layer(torch.randn(8, layer.hidden, dtype=layer.w13.dtype))
    with pytest.raises(InputError, match="overlap"):
        fmo.nn.MoELayer(32, 32, 4, 2, overlap="yes")
