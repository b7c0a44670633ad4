"""MoE layout, gather and gather-reduce kernels on the simulator against the PyTorch
reference (bit for bit, outputs poisoned first), and permute/unpermute end to end:
semantics, padding, FP8 pairs, autograd against float64, both CPU engines."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import moe_layout, moe_permute
from fastmoe_ops.reference import moe as ref

from conftest import assert_bitwise_equal, cpu_engines, poison_
from device_tags import device_tags

needs_sim = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")


def routing(tokens, k, experts, seed, minus_one=0.2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]) if tokens else torch.zeros(0, k, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=g) < minus_one] = -1
    return idx


@needs_sim
@pytest.mark.parametrize("once", [True, False])
@pytest.mark.parametrize("tokens, k, buckets, per", [(1, 1, 1, 4), (300, 8, 4, 16), (600, 3, 8, 1), (257, 6, 16, 2), (40, 2, 3, 1)])
def test_layout_kernel_bitexact(once, tokens, k, buckets, per):
    """Token counts past one 256-thread chunk carry the running total across chunks."""
    seed = tokens * 31 + k
    idx = routing(tokens, k, buckets * per, seed) if k <= buckets * per else torch.randint(-1, buckets * per, (tokens, k))
    counts = poison_(torch.empty(buckets, dtype=torch.int64))
    pos = poison_(torch.empty(tokens, buckets if once else k, dtype=torch.int64))
    moe_layout.bucket_layout(idx, buckets, per, once, engine="sim", out=(counts, pos))
    want_counts, want_pos = ref.bucket_layout(idx, buckets, per, once)
    assert_bitwise_equal(counts, want_counts, f"counts (once={once})", seed)
    assert_bitwise_equal(pos, want_pos, f"positions (once={once})", seed)


def test_reference_layout_is_the_obvious_one():
    """Independent check of the reference by a Python loop (skewed and duplicate ids too)."""
    idx = torch.tensor([[0, 0, 5], [3, -1, 3], [5, 4, 1], [-1, -1, -1], [1, 0, 2]])
    counts, pos = ref.bucket_layout(idx, 6, 1, once=False)
    seen = [0] * 6
    for t, row in enumerate(idx.tolist()):
        for j, e in enumerate(row):
            assert pos[t, j] == (seen[e] if e >= 0 else -1)
            if e >= 0:
                seen[e] += 1
    assert counts.tolist() == seen
    counts, pos = ref.bucket_layout(idx, 3, 2, once=True)
    seen = [0] * 3
    for t, row in enumerate(idx.tolist()):
        for b in range(3):
            hit = any(e >= 0 and e // 2 == b for e in row)
            assert pos[t, b] == (seen[b] if hit else -1)
            seen[b] += hit
    assert counts.tolist() == seen


@needs_sim
@pytest.mark.parametrize("dtype, cols", [(torch.bfloat16, 200), (torch.float32, 7), (torch.float8_e4m3fn, 136),
                                         (torch.int64, 3), (torch.bfloat16, 1), (torch.uint8, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided"])
def test_gather_rows_kernel_bitexact(dtype, cols, layout):
    seed = cols
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 255, (23, cols + 8), generator=g, dtype=torch.uint8).view(torch.uint8)
    base = base.view(dtype) if dtype.itemsize == 1 else torch.randn(23, cols + 8, generator=g).to(dtype) if dtype.is_floating_point \
        else torch.randint(-2**40, 2**40, (23, cols + 8), generator=g)
    src = base[:, :cols].contiguous() if layout == "contiguous" else base[:, 1:cols + 1]
    index = torch.randint(-1, 23, (41,), generator=g)
    out = poison_(torch.empty(41, cols, dtype=dtype))
    moe_permute.gather_rows(src, index, engine="sim", out=out)
    assert_bitwise_equal(out, ref.gather_rows(src, index), f"gather {dtype} {layout}", seed)


@needs_sim
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [200, 201, 64])
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_reduce_kernel_bitexact(dtype, hidden, weighted):
    seed = hidden + 7 * weighted
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(30, hidden, generator=g) * 10).to(dtype)
    index = torch.randint(-1, 30, (19, 8), generator=g)
    index[3] = -1                                            # a row that gathers nothing: zeros
    w = torch.rand(19, 8, generator=g) if weighted else None
    out = poison_(torch.empty(19, hidden, dtype=dtype))
    moe_permute.gather_reduce(y, index, w, engine="sim", out=out)
    assert_bitwise_equal(out, ref.gather_reduce(y, index, w), f"gather_reduce {dtype} H={hidden} weighted={weighted}", seed)
    assert bool((out[3] == 0).all())


@needs_sim
def test_kernels_under_memcheck_and_racecheck(monkeypatch):
    """Every kernel touches only its launch's tensors and has no shared-memory races
    (ragged sizes, scalar and vector paths, several layout chunks)."""
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    idx = routing(300, 4, 16, 5)
    for once, buckets, per in ((True, 4, 4), (False, 16, 1)):
        got = moe_layout.bucket_layout(idx, buckets, per, once, engine="sim")
        want = ref.bucket_layout(idx, buckets, per, once)
        assert_bitwise_equal(got[1], want[1], "layout under memcheck")
    x = torch.randn(12, 201).to(torch.bfloat16)
    for src in (x, x[:, :200].contiguous(), x[:, 1:]):
        index = torch.tensor([3, -1, 0, 11, 11])
        assert_bitwise_equal(moe_permute.gather_rows(src, index, engine="sim"), ref.gather_rows(src, index), "gather under memcheck")
    for y in (x[:, :200].contiguous(), x):
        index = torch.tensor([[3, -1], [0, 11], [-1, -1]])
        w = torch.rand(3, 2)
        assert_bitwise_equal(moe_permute.gather_reduce(y, index, w, engine="sim"), ref.gather_reduce(y, index, w), "reduce under memcheck")


# ------------------------------------------------------------------------ permute / unpermute


@pytest.mark.parametrize("engine", cpu_engines())
@pytest.mark.parametrize("alignment", [1, 16])
def test_permute_semantics_and_roundtrip(engine, alignment):
    n, k, experts, hidden = 37, 4, 6, 72
    idx = routing(n, k, experts, 11)
    idx[:5] = -1
    x = torch.randn(n, hidden).to(torch.bfloat16)
    with fmo.use_backend(engine):
        xs, pmap = fmo.moe.permute(x, idx, experts, alignment=alignment)
    # Obvious model: for each expert ascending, rows ascending, slots ascending; pad with zeros.
    rows, offsets = [], [0]
    for e in range(experts):
        seg = [x[t] for t in range(n) for j in range(k) if idx[t, j] == e]
        pad = (-len(seg)) % alignment
        rows += seg + [torch.zeros(hidden, dtype=x.dtype)] * pad
        offsets.append(len(rows))
        assert pmap.tokens_per_expert[e] == len(seg)
    assert_bitwise_equal(xs, torch.stack(rows), f"permuted rows ({engine}, alignment {alignment})")
    assert pmap.expert_offsets.tolist() == offsets
    w = torch.rand(n, k)
    with fmo.use_backend(engine):
        back = fmo.moe.unpermute(xs, pmap, torch.where(idx >= 0, w, 0.0))
    want = torch.zeros(n, hidden)
    for t in range(n):
        for j in range(k):
            if idx[t, j] >= 0:
                want[t] = want[t] + w[t, j] * x[t].float()
    assert_bitwise_equal(back, want.to(torch.bfloat16), f"unpermute ({engine})")


@needs_sim
def test_permute_sim_matches_reference_fp8_pair():
    n, k, experts, hidden = 29, 3, 4, 256
    idx = routing(n, k, experts, 3)
    xq, xs = fmo.fp8.quantize_per_token_group(torch.randn(n, hidden), 128)
    outs = {}
    for engine in ("sim", "reference"):
        with fmo.use_backend(engine):
            outs[engine] = fmo.moe.permute((xq, xs), idx, experts, alignment=8)
    (sq, ss), smap = outs["sim"]
    (rq, rs), rmap = outs["reference"]
    assert_bitwise_equal(sq, rq, "fp8 values")
    assert_bitwise_equal(ss, rs, "fp8 scales")
    assert torch.equal(smap.slot_rows, rmap.slot_rows) and torch.equal(smap.src_slots, rmap.src_slots)


@pytest.mark.parametrize("engine", cpu_engines())
def test_permute_unpermute_gradients_against_float64(engine):
    n, k, experts, hidden = 13, 3, 5, 16
    idx = routing(n, k, experts, 21)
    x64 = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
    w64 = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(experts, hidden, dtype=torch.float64)
    g = torch.randn(n, hidden, dtype=torch.float64)

    def dense(x, w):   # out[t] = sum_j w[t, j] * x[t] * scale[e_j]
        s = torch.where((idx >= 0)[:, :, None], scale[idx.clamp(min=0)], 0.0)
        return (w[:, :, None] * x[:, None, :] * s).sum(1)

    (dense(x64, w64) * g).sum().backward()
    x = x64.detach().float().requires_grad_()
    w = w64.detach().float().requires_grad_()
    with fmo.use_backend(engine):
        xs, pmap = fmo.moe.permute(x, idx, experts, alignment=4)
        expert_of_row = torch.repeat_interleave(torch.arange(experts), pmap.expert_offsets.diff())
        ys = xs * scale.float()[expert_of_row]
        out = fmo.moe.unpermute(ys, pmap, w)
        (out * g.float()).sum().backward()
    assert (x.grad.double() - x64.grad).abs().max() < 1e-5, "grad x"
    assert (w.grad.double() - w64.grad).abs().max() < 1e-5, "grad w"


@pytest.mark.parametrize("engine", cpu_engines())
def test_permute_unpermute_keep_tensors_on_the_device(engine):
    """What CUDA inputs meet, checked on the CPU with DeviceTags: every tensor permute and
    unpermute make, forward and backward, lives on the inputs' device and is never mixed
    with a host one (the first H200 run failed in permute: a host offsets table indexed by
    device ids). bf16 and fp64 rows (fp64: the gather-reduce's PyTorch fallback), an FP8
    pair, and no rows at all (the layout's fallback); the results are those of an
    unchecked run, bit for bit."""
    def run(tags, dtype, n, fp8=False):
        k, experts, hidden = 3, 5, 128
        g = torch.Generator().manual_seed(n)
        idx = routing(n, k, experts, n)
        x = torch.randn(n, hidden, generator=g).to(dtype)
        x = fmo.fp8.quantize_per_token_group(x, 128) if fp8 else x.requires_grad_()
        w = torch.rand(n, k, generator=g).requires_grad_()
        dy = torch.randn(n, hidden, generator=g).to(torch.float32 if fp8 else dtype)
        if tags is not None:
            tags.mark(*(x if fp8 else (x,)), idx, w, dy)
        with fmo.use_backend(engine):
            xs, pmap = fmo.moe.permute(x, idx, experts, alignment=8)
            rows = xs[1].repeat_interleave(128, 1) * xs[0].float() if fp8 else xs * 2
            out = fmo.moe.unpermute(rows, pmap, w)
            (out * dy).sum().backward()
        got = [out.detach(), w.grad] + ([] if fp8 else [x.grad])
        return [t.clone() for t in got]

    for dtype, n, fp8 in ((torch.bfloat16, 37, False), (torch.float64, 21, False), (torch.float32, 19, True),
                          (torch.bfloat16, 0, False)):
        want = run(None, dtype, n, fp8)
        with device_tags() as tags:
            got = run(tags, dtype, n, fp8)
        assert not tags.violations, f"{dtype}, {n} rows{', fp8' if fp8 else ''}: {tags.report()}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.shape == b.shape, f"result {i} ({dtype}, {n} rows): shape {tuple(a.shape)} != {tuple(b.shape)}"
            if a.numel():
                assert_bitwise_equal(a, b, f"checked vs unchecked run, result {i} ({dtype}, {n} rows)")


def test_bad_permute_input_refused():
    with pytest.raises(fmo.InputError, match=r"^recv_topk_idx: expected local expert ids in \[-1, 4\)"):
        fmo.moe.permute(torch.randn(3, 8), torch.tensor([[0], [4], [1]]), 4)
    with pytest.raises(fmo.InputError, match="^alignment: expected an int >= 1"):
        fmo.moe.permute(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.int64), 4, alignment=0)
    with pytest.raises(fmo.InputError, match="^recv_topk_idx: expected 3 rows"):
        fmo.moe.permute(torch.randn(3, 8), torch.zeros(2, 1, dtype=torch.int64), 4)
