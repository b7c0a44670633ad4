"""The host transport's pieces that need no second rank: the send layout, and combine's
fixed-order sum (index_add_ of one rank's segment at a time, this rank's own rows read where
they lie) against an explicit float64-free oracle written element by element in ascending
rank order. Data movement and a fixed-order
fp32 sum: everything must match bit for bit, including NaN, infinities, -0 and subnormals."""
from __future__ import annotations

import types

import pytest
import torch

from fastmoe_ops.moe import host
from fastmoe_ops.reference import moe as ref

from conftest import assert_bitwise_equal


def same_bits(out, want, what, seed):
    assert out.shape == want.shape, f"{what}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    if want.numel():   # (the shared helper cannot reshape an empty tensor)
        assert_bitwise_equal(out, want, what, seed)


def routing(tokens: int, ranks: int, seed: int, p: float = 0.6):
    """A random token -> ranks map (some tokens sent nowhere) and its combine layout."""
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(tokens, ranks, generator=g) < p
    counts = hit.sum(0)
    send_src = hit.t().nonzero()[:, 1].contiguous()
    index = torch.full((ranks, tokens), -1, dtype=torch.int64)
    index[hit.t()] = torch.arange(send_src.shape[0])
    return index.t().contiguous(), send_src, counts.tolist()


def oracle(back: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[t] = (((0 + b[r0]) + b[r1]) + ...) in the accumulation dtype, rounded once."""
    acc_t = ref.acc_dtype(back.dtype)
    out = torch.zeros(index.shape[0], back.shape[1], dtype=acc_t)
    for r in range(index.shape[1]):
        rows = index[:, r]
        for t in range(index.shape[0]):
            if rows[t] >= 0:
                out[t] = out[t] + back[rows[t]].to(acc_t)
    return out.to(back.dtype)


def special_rows(s: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, width, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, width, dtype=torch.float64)
    x = x.to(dtype)
    if s and width >= 8:
        x[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40]).to(dtype)
        x[-1, :3] = torch.tensor([-0.0, float("inf"), -1.0]).to(dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("tokens, ranks, width", [(0, 4, 16), (1, 1, 8), (37, 4, 72), (64, 8, 200), (5, 3, 1)])
def test_combine_sum_formulations_bitexact(dtype, tokens, ranks, width):
    seed = tokens * 31 + ranks * 7 + width
    index, send_src, counts = routing(tokens, ranks, seed)
    back = special_rows(send_src.shape[0], width, dtype, seed)
    want = oracle(back, index)
    transport = host.HostTransport.__new__(host.HostTransport)   # no Group: reduce uses only the work buffers
    transport._work, transport._views = {}, {}
    got = transport.reduce(back, send_src, counts, tokens)
    same_bits(got, want, f"index_add_ formulation {dtype} T{tokens} R{ranks} W{width}", seed)
    # One rank's rows elsewhere (as combine reads its own rows from y): the same sum, and
    # stale rows in `back` at its place (NaN here) do not leak into the sum.
    mine = ranks // 2
    start = sum(counts[:mine])
    own = back[start: start + counts[mine]].clone()
    back[start: start + counts[mine]] = float("nan")
    transport.group = types.SimpleNamespace(rank=mine)
    got = transport.combine_host(back, send_src, counts, tokens, own=own)
    same_bits(got, want, f"rank {mine}'s rows elsewhere, {dtype} T{tokens} R{ranks} W{width}", seed)


@pytest.mark.parametrize("tokens, ranks, per, k", [(0, 4, 2, 2), (1, 1, 3, 1), (50, 4, 2, 4), (33, 8, 1, 6)])
def test_layout_is_the_obvious_one(tokens, ranks, per, k):
    g = torch.Generator().manual_seed(tokens + ranks)
    idx = torch.randint(-1, ranks * per, (tokens, k), generator=g)
    lay = host.layout(idx, ranks, per, on_device=False)
    dest = [{int(e) // per for e in row if e >= 0} for row in idx.tolist()]
    want_src = [t for r in range(ranks) for t in range(tokens) if r in dest[t]]
    assert lay.send_src.tolist() == want_src
    assert lay.counts.tolist() == [sum(r in d for d in dest) for r in range(ranks)]
    for t in range(tokens):
        for r in range(ranks):
            row = int(lay.combine_index[t, r])
            if r in dest[t]:
                assert want_src[row] == t
                before = sum(lay.counts[:r])
                assert int(lay.pos[t, r]) == row - before == sum(r in dest[u] for u in range(t))
            else:
                assert row == -1 and int(lay.pos[t, r]) == -1
    # The device formulation (the layout kernel, here on a CPU engine) agrees.
    staged = host.layout(idx, ranks, per, on_device=True)
    assert staged.counts.tolist() == lay.counts.tolist()
    assert torch.equal(staged.send_src, lay.send_src) and torch.equal(staged.combine_index, lay.combine_index)
    assert torch.equal(staged.pos, lay.pos)
