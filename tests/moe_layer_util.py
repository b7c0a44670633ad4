"""Helpers shared by the single-process fmo.nn.MoELayer tests on the CPU engines (tests/) and
on the GPU (tests/gpu/): the seeded layer, one forward + backward checked against the dense
float64 layer with the routing the layer chose, and the closeness check (a helper module, so
test files never import each other). Every helper works on the tensors' device. The bounds
and why they are what they are: tests/test_moe_layer.py."""
from __future__ import annotations

import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref
from fastmoe_ops.reference.moe_layer import moe_layer as dense_layer

CALC_DIFF_BOUND = 4e-3
ELEMENT_BOUND = 0.15
OVERLAP_WGRAD_BOUND = 1e-3   # overlap vs sequential expert-weight gradients: measured ~3.5e-4


def close(name, got, want, where):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)} ({where})"
    assert not got.isnan().any(), f"{name}: NaN ({where})"
    if not want.numel():
        return
    d = ref.calc_diff(got, want)
    err = (got.double() - want.double()).abs()
    coord = tuple(int(c) for c in torch.unravel_index(err.argmax(), err.shape))
    assert d < CALC_DIFF_BOUND, f"{name}: calc_diff {d:.3g} vs float64 ({where})"
    assert err.max() <= ELEMENT_BOUND * want.abs().max(), \
        f"{name}: |err| {err.max().item():.3g} at {coord} > {ELEMENT_BOUND} * max|want| {want.abs().max().item():.3g} ({where})"


def make_layer(seed, hidden=128, inter=128, experts=6, k=2, dtype=torch.float32, **kw):
    """A MoELayer whose weights come from torch.manual_seed(seed) (made on the CPU unless
    `device=` says otherwise)."""
    torch.manual_seed(seed)
    return fmo.nn.MoELayer(hidden, inter, experts, k, dtype=dtype, **kw)


def run_and_check(layer, x, dy, where, **ref_kw):
    """layer(x).backward(dy); out, dx and the router, w13 and w2 gradients against the dense
    float64 layer run with layer.last_topk_idx. Returns (out, dx)."""
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(dy)
    x64 = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in (layer.router_weight, layer.w13, layer.w2)]
    y64 = dense_layer(x64.reshape(-1, layer.hidden), *params, layer.last_topk_idx, **ref_kw).reshape(x.shape)
    y64.backward(dy.double())
    close("out", out, y64, where)
    close("dx", x.grad, x64.grad, where)
    for name, p, p64 in zip(("d router", "d w13", "d w2"), (layer.router_weight, layer.w13, layer.w2), params):
        close(name, p.grad, p64.grad, where)
    return out, x.grad
