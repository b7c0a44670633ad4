"""fmo.flash_attn under torch.compile (CPU, reference engine) matches eager, forward and
backward, through the fmo::flash_attn_fwd/bwd custom ops and their fake implementations;
opcheck on the ops. And fmo.nn.FusedAttention as a drop-in block.

opcheck quirks on CPU: the ops pick their engine at run time (FMO_BACKEND / use_backend),
so opcheck needs the engine set around it; it runs the op many times (schema, autograd
registration, fake tensors, AOT dispatch with dynamic shapes), so it runs under the
reference engine (all four checks also pass on `sim`, slowly). The fakes must promise
contiguous outputs because the kernels (and the reference path) return contiguous ones:
opcheck's fake-tensor check compares strides, not only shapes."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo


class TinyBlock(torch.nn.Module):
    def __init__(self, hidden=128, heads=2, kv_heads=1):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, dtype=torch.bfloat16)
        self.attn = fmo.nn.FusedAttention(hidden, heads, num_kv_heads=kv_heads, head_dim=64, dtype=torch.bfloat16)
        self.mlp = torch.nn.Linear(hidden, hidden, dtype=torch.bfloat16)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(2, 24, 128, dtype=torch.bfloat16)
    with fmo.use_backend("reference"):
        eager = model(x)
        eager.float().square().mean().backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(x)
        out.float().square().mean().backward()
    assert torch.equal(out, eager)
    for g, e in zip((p.grad for p in model.parameters()), eager_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("varlen", [False, True])
def test_deterministic_reaches_the_backward_under_compile(varlen, monkeypatch):
    """flash_attn(deterministic=True) traced by torch.compile (fullgraph): the flag travels through
    the forward op's inputs and setup_context to the backward op, as in eager (False by default)."""
    from fastmoe_ops.ops import attention as launcher
    seen = []
    real = launcher.attention_backward
    monkeypatch.setattr(launcher, "attention_backward",
                        lambda *a, **kw: seen.append(kw["deterministic"]) or real(*a, **kw))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 6, 2, 64, generator=g).bfloat16().requires_grad_(True) for _ in range(3))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)

    def f(q, k, v, deterministic):
        if varlen:
            return fmo.flash_attn_varlen(q[0], k[0], v[0], cu, cu, 4, 4, causal=True, deterministic=deterministic)
        return fmo.flash_attn(q, k, v, causal=True, deterministic=deterministic)

    with fmo.use_backend("reference"):
        for deterministic in (True, False):
            torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, deterministic).float().sum().backward()
            f(q, k, v, deterministic).float().sum().backward()  # eager
    assert seen == [True, True, False, False]


def test_opcheck_custom_ops():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 5, 2, 64, generator=g).bfloat16()
    k = torch.randn(1, 7, 1, 64, generator=g).bfloat16()
    v = torch.randn(1, 7, 1, 64, generator=g).bfloat16()
    with fmo.use_backend("reference"):
        torch.library.opcheck(torch.ops.fmo.flash_attn_fwd, (q, k, v, True, 0.125))
        out, lse = torch.ops.fmo.flash_attn_fwd(q, k, v, True, 0.125)
        torch.library.opcheck(torch.ops.fmo.flash_attn_bwd, (torch.ones_like(out), q, k, v, out, lse, True, 0.125))
        torch.library.opcheck(torch.ops.fmo.flash_attn_fwd, (q, k, v, True, 0.125, True))  # deterministic
        torch.library.opcheck(torch.ops.fmo.flash_attn_bwd, (torch.ones_like(out), q, k, v, out, lse, True, 0.125, True))
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        cuk = torch.tensor([0, 0, 7], dtype=torch.int32)
        torch.library.opcheck(torch.ops.fmo.flash_attn_varlen_fwd, (q[0], k[0], v[0], cu, cuk, 3, 7, False, 0.125))


def test_fused_attention_module_shapes_and_refusals():
    m = fmo.nn.FusedAttention(256, 4, num_kv_heads=2, dtype=torch.bfloat16)
    assert m.head_dim == 64 and m.k_proj.out_features == 128
    with fmo.use_backend("reference"):
        y = m(torch.randn(1, 3, 256, dtype=torch.bfloat16))
    assert y.shape == (1, 3, 256)
    with pytest.raises(fmo.InputError, match="num_kv_heads"):
        fmo.nn.FusedAttention(256, 4, num_kv_heads=3)
    with pytest.raises(fmo.InputError, match="head_dim"):
        fmo.nn.FusedAttention(96, 1)
