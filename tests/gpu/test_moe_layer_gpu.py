"""fmo.nn.MoELayer on a GPU, one process (group=None: every expert local, nothing exchanged;
the multi-rank CUDA paths are tests/gpu/test_moe_gpu.py under mpirun): router, permute,
grouped FP8 experts on the `cuda` engine and unpermute, forward and backward.

- against the dense float64 layer with the routing the layer chose (tests/moe_layer_util.py:
  calc_diff < 4e-3 and no coordinate off by more than 15% of the largest magnitude, the bounds
  of the CPU tests, tests/test_moe_layer.py), sequential and overlapped (the two-micro-batch
  schedule on a comm and a compute CUDA stream), contiguous and static-shape (masked) experts;
- against the CPU run of the same layer (`reference` engine) with the routing forced by the
  expert bias, so both devices route alike: the same e4m3 operands on both sides, only the
  accumulation differs (calc_diff < 1e-5, the FP8 GEMM bound); idle experts get zero gradients;
- overlap=True equals overlap=False bit for bit in out, dx and the router gradient, as on CPU.
Every CUDA tensor the layer allocates with torch.empty starts as NaN
(gpu_util.poison_cuda_allocations). Seconds on one H100/H200."""
from __future__ import annotations

import copy

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)
from moe_layer_util import OVERLAP_WGRAD_BOUND, make_layer, run_and_check

pytestmark = needs_cuda
SAME_OPERANDS_BOUND = 1e-5   # CUDA vs CPU with identical routing: accumulation differences only


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
@pytest.mark.parametrize("dtype, scoring, normalize", [(torch.float32, "softmax", False), (torch.bfloat16, "sigmoid", True)],
                         ids=["fp32-softmax", "bf16-sigmoid-normalised"])
def test_layer_matches_dense_float64(dtype, scoring, normalize, overlap):
    seed = 3
    layer = make_layer(seed, dtype=dtype, scoring=scoring, normalize_topk=normalize, route_scale=1.5, overlap=overlap).to(DEV)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 37, 128, generator=g).to(dtype).to(DEV)   # 74 tokens: ragged per expert, not a tile multiple
    dy = torch.randn(2, 37, 128, generator=g).to(dtype).to(DEV)
    out, _ = run_and_check(layer, x, dy, f"cuda, {dtype}, {scoring}, overlap={overlap}, seed {seed}",
                           scoring=scoring, normalize=normalize, route_scale=1.5)
    assert out.dtype == dtype and out.shape == x.shape and out.device.type == DEV.type


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_larger_layer_matches_dense_float64(overlap):
    """1000 tokens, 8 experts of 256 -> 512 -> 256, top-2, bf16: several GEMM tiles per expert."""
    seed = 5
    layer = make_layer(seed, hidden=256, inter=512, experts=8, k=2, dtype=torch.bfloat16, overlap=overlap).to(DEV)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1000, 256, generator=g).to(torch.bfloat16).to(DEV)
    dy = torch.randn(1000, 256, generator=g).to(torch.bfloat16).to(DEV)
    run_and_check(layer, x, dy, f"cuda, 1000 x 256, 8 experts, overlap={overlap}, seed {seed}")


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_static_shapes_masked_experts(overlap):
    """num_worst_tokens > 0: fixed per-expert slots and masked grouped GEMMs; same float64 bound."""
    layer = make_layer(12, experts=4, k=3, num_worst_tokens=64, overlap=overlap, scoring="sigmoid",
                       normalize_topk=True).to(DEV)
    g = torch.Generator().manual_seed(12)
    x, dy = torch.randn(50, 128, generator=g).to(DEV), torch.randn(50, 128, generator=g).to(DEV)
    run_and_check(layer, x, dy, f"cuda, masked, overlap={overlap}, seed 12", scoring="sigmoid", normalize=True)


def test_forced_routing_equals_the_cpu_run():
    """A bias that sends every token to experts 4 and 1 (k = 2): the CUDA run and the CPU
    `reference` run of the same layer route alike, so they must agree up to accumulation; the
    four idle experts get exactly zero gradients and the load is counted on the device."""
    layer = make_layer(8, experts=6, k=2, expert_bias=True)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0, 100.0, 0.0]))
    layer_cpu = copy.deepcopy(layer)
    layer = layer.to(DEV)
    x = torch.arange(300 * 128, dtype=torch.float32).reshape(300, 128).remainder(7).sub(3) / 4   # structured
    dy = torch.randn(300, 128, generator=torch.Generator().manual_seed(8))
    out, dx = run_and_check(layer, x.to(DEV), dy.to(DEV), "cuda, forced routing, seed 8")
    with fmo.use_backend("reference"):
        out_cpu, dx_cpu = run_and_check(layer_cpu, x, dy, "cpu reference, forced routing, seed 8")
    assert torch.equal(layer.last_topk_idx.cpu(), torch.tensor([[4, 1]] * 300))
    assert layer.expert_load.device.type == DEV.type and layer.expert_load.tolist() == [0, 300, 0, 0, 300, 0]
    for e in (0, 2, 3, 5):
        assert torch.count_nonzero(layer.w13.grad[e]) == 0 and torch.count_nonzero(layer.w2.grad[e]) == 0, f"expert {e}"
    pairs = [("out", out, out_cpu), ("dx", dx, dx_cpu), ("d router", layer.router_weight.grad, layer_cpu.router_weight.grad),
             ("d w13", layer.w13.grad, layer_cpu.w13.grad), ("d w2", layer.w2.grad, layer_cpu.w2.grad)]
    for name, a, b in pairs:
        d = ref.calc_diff(a.cpu(), b)
        assert d < SAME_OPERANDS_BOUND, f"{name}: CUDA vs CPU calc_diff {d:.3g} >= {SAME_OPERANDS_BOUND} (forced routing, seed 8)"


def test_overlap_equals_sequential():
    """Row-wise token path, router on the whole batch before the split: out, dx and the router
    gradient bit for bit; the expert weights' gradients (two halves' FP8 wgrad, summed) close."""
    x = torch.randn(45, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEV)   # halves 23 + 22
    dy = torch.randn(45, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEV)
    runs = []
    for overlap in (False, True):
        layer = make_layer(9, dtype=torch.bfloat16, k=3, overlap=overlap).to(DEV)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(dy)
        torch.cuda.synchronize()
        runs.append((out.detach(), xi.grad, layer.router_weight.grad, layer.w13.grad.float(), layer.w2.grad.float()))
    for name, a, b in zip(("out", "dx", "d router"), runs[0][:3], runs[1][:3]):
        assert torch.equal(a, b), f"{name}: overlap differs from sequential by {(a.double() - b.double()).abs().max().item():.3g}"
    for name, a, b in zip(("d w13", "d w2"), runs[0][3:], runs[1][3:]):
        d = ref.calc_diff(a, b)
        assert d < OVERLAP_WGRAD_BOUND, f"{name}: overlap vs sequential calc_diff {d:.3g} (cuda, seeds 4/5/9)"
