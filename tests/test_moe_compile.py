"""torch.compile(fullgraph=True) over the MoE row movements: the gather and the fixed-order
gather-reduce are torch.library ops (fmo::moe_gather_rows, fmo::moe_gather_reduce) with
fake implementations, so an expert block ending in unpermute, and permute's gather given
its map, trace as one graph, forward and backward, with the same bits as eager.

The layout itself (how many rows each expert gets) is data-dependent and runs eagerly in
permute(), before the compiled region."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.moe import kernels
from fastmoe_ops.moe.permute import PermuteFn

from conftest import assert_bitwise_equal, cpu_engines


def inputs(seed: int, n: int = 24, hidden: int = 64, experts: int = 4, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])
    idx[torch.rand(n, k, generator=g) < 0.2] = -1
    w = torch.rand(n, k, generator=g)
    return x, idx, w


@pytest.mark.parametrize("engine", cpu_engines())
def test_expert_block_compiles_fullgraph_forward_and_backward(engine):
    x, idx, w = inputs(5)
    scale = torch.linspace(0.5, 2.0, x.shape[1]).to(torch.bfloat16)

    def block(x_sorted, slot_rows, src_slots, expert_offsets, weights):
        pmap = fmo.moe.PermuteMap(slot_rows, src_slots, expert_offsets, expert_offsets, 1)
        return fmo.moe.unpermute(x_sorted * scale, pmap, weights)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with fmo.use_backend(engine):
        x_sorted, pmap = fmo.moe.permute(x, idx, 4, alignment=8)
        results = []
        for fn in (block, compiled):
            xs = x_sorted.detach().clone().requires_grad_()
            ws = w.clone().requires_grad_()
            out = fn(xs, pmap.slot_rows, pmap.src_slots, pmap.expert_offsets, ws)
            out.float().square().sum().backward()
            results.append((out.detach(), xs.grad, ws.grad))
    for (a, b), what in zip(zip(*results), ("out", "grad x_sorted", "grad weights")):
        assert_bitwise_equal(b, a, f"compiled vs eager: {what} ({engine})", 5)


@pytest.mark.parametrize("engine", cpu_engines())
def test_permute_gather_compiles_fullgraph(engine):
    x, idx, _ = inputs(9)
    with fmo.use_backend(engine):
        _, pmap = fmo.moe.permute(x, idx, 4, alignment=4)
        fn = torch.compile(lambda t, s, r: PermuteFn.apply(t, s, r), fullgraph=True, backend="aot_eager")
        got = fn(x, pmap.src_rows, pmap.slot_rows)
        want = kernels.gather_rows(x, pmap.src_rows)
    assert_bitwise_equal(got, want, f"compiled permute gather ({engine})", 9)


def test_fake_implementations_give_the_kernels_shapes():
    """torch.library.opcheck: schema, fake shapes and dispatch agree with the real ops."""
    x, idx, w = inputs(3)
    _, pmap = fmo.moe.permute(x, idx, 4, alignment=2)
    with fmo.use_backend("reference"):
        torch.library.opcheck(torch.ops.fmo.moe_gather_rows.default, (x, pmap.src_rows))
        y = torch.randn(pmap.src_slots.shape[0], x.shape[1]).to(torch.bfloat16)
        torch.library.opcheck(torch.ops.fmo.moe_gather_reduce.default, (y, pmap.slot_rows, w))
        torch.library.opcheck(torch.ops.fmo.moe_gather_reduce.default, (y, pmap.slot_rows, None))
