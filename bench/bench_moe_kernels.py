"""The `moe` area of `python -m bench`: single-process MoE rows against plain PyTorch.

    python -m bench --only moe [--quick] [--engine sim|reference]

moe_permute_unpermute: fmo.moe.permute + unpermute against index_select + index_add_.
Then each memory-bound kernel of dispatch/combine alone (issue 18's target: >= 85% of the
device copy bandwidth measured in the same run), with bytes_moved = the bytes that kernel
reads + writes:
  moe_gather_rows    kernels.gather_rows: the permute's row gather (and the staged send
                     packing) against index_select (-1 rows zeroed, as the kernel does);
  moe_gather_reduce  kernels.gather_reduce: unpermute / combine's weighted sum against
                     index_select + a weighted sum over the k slots;
  moe_layout         kernels.bucket_layout: dispatch's per-rank layout (once) and the per-expert
                     one of permute / tokens_per_expert, against bincount + a stable argsort.
Every kernel's output is first checked bit for bit against fastmoe_ops/reference/moe.py, written
into a poisoned buffer (a wrong or silent kernel is never timed), and every baseline against the
same reference. On a GPU: DeepSeek-V3 sizes, "% ceil" against the device copy; on the CPU: small
shapes on the simulator / reference (their speed, not a GPU's).
"""
from __future__ import annotations

import contextlib

import torch

import fastmoe_ops as fmo
from fastmoe_ops.moe import kernels
from fastmoe_ops.ops import moe_layout, moe_permute
from fastmoe_ops.ops.fp8_gemm import contiguous_alignment
from fastmoe_ops.reference import moe as ref

from .harness import Row
from .stats import compare

# (received rows N, hidden, local experts, top-k): permute/unpermute and the gather/reduce rows.
# GPU: DeepSeek-V3 prefill, 8192 (32768) received tokens x top-8 of H 7168 bf16.
PERMUTE_CPU_SHAPES = [(512, 1024, 8, 4), (1024, 2048, 16, 8)]
PERMUTE_GPU_SHAPES = [(8192, 7168, 8, 8), (32768, 7168, 32, 8)]
# (tokens, top-k, experts, buckets, once): dispatch's layout (buckets = 8 ranks, a token counted
# once per rank) and the per-expert one (buckets = experts, one count per (token, slot)).
LAYOUT_CPU_SHAPES = [(512, 8, 64, 4, True), (512, 8, 64, 64, False)]
LAYOUT_GPU_SHAPES = [(4096, 8, 256, 8, True), (4096, 8, 256, 256, False)]
ROUTED_ELSEWHERE = 0.1   # fraction of slots set to -1 (routed to another rank / masked)


def run(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list[Row]:
    gpu = device.type == "cuda"
    routed = PERMUTE_GPU_SHAPES if gpu else PERMUTE_CPU_SHAPES
    layouts = LAYOUT_GPU_SHAPES if gpu else LAYOUT_CPU_SHAPES
    timing = {"engine": engine, "max_seconds": 3.0 if quick else 6.0, "copy_gbps": copy_gbps}
    rows = []
    for shape in routed[:1] if quick else routed:
        rows += [permute_unpermute_row(device, shape, **timing), gather_rows_row(device, shape, **timing),
                 gather_reduce_row(device, shape, **timing)]
    for shape in layouts[:1] if quick else layouts:
        rows.append(layout_row(device, shape, **timing))
    return rows


# ------------------------------------------------------------------------------ inputs


def routing(tokens: int, experts: int, k: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """topk_idx [T, k] int64: k distinct experts per token, ROUTED_ELSEWHERE of the slots -1."""
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    idx[torch.rand(tokens, k, generator=g) < ROUTED_ELSEWHERE] = -1
    return idx.to(device)


def routed_rows(device: torch.device, n: int, hidden: int, experts: int, k: int):
    """x [N, H] bf16, topk_idx [N, k] (local experts) and weights [N, k] fp32, seeded."""
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(n, hidden, generator=g).to(torch.bfloat16).to(device)
    idx = routing(n, experts, k, g, device)
    return x, idx, torch.rand(n, k, generator=g).to(device)


def on_engine(engine: str):
    """The context a call runs in: CUDA tensors pick the cuda engine themselves."""
    return contextlib.nullcontext() if engine == "cuda" else fmo.use_backend(engine)


def poisoned(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer no correct result matches where unwritten: NaN, or int64's minimum."""
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


def mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    """'' when got equals want bit for bit (NaN matches nothing but the same NaN), else where
    they first differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype} {tuple(got.shape)} vs reference {want.dtype} {tuple(want.shape)}"
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    diff = (got.contiguous().view(bits) != want.contiguous().view(bits)).nonzero()
    if not len(diff):
        return ""
    i = tuple(diff[0].tolist())
    return f"{len(diff)} of {got.numel()} elements differ, first at {i}: {got[i].item()!r} vs reference {want[i].item()!r}"


def refuse_if_wrong(op: str, shape: str, engine: str, checks: dict) -> None:
    """Raise before any timing if an output (name -> (got, want)) differs from the reference."""
    bad = [f"{name}: {m}" for name, (got, want) in checks.items() if (m := mismatch(got, want))]
    if bad:
        raise RuntimeError(f"{op} {shape} ({engine}) disagrees with the reference ({'; '.join(bad)}): not timing it")


def compared_row(op, shape, engine, ours, torch_way, *, max_seconds, copy_gbps, device, **kw) -> Row:
    """ours against torch_way, interleaved (bench.stats.compare); kw: Row's (baseline name, bytes_moved)."""
    c = compare(ours, torch_way, device=device, max_seconds=max_seconds)
    return Row.compared(op, shape, engine, c, ceiling="device copy" if copy_gbps else "", ceiling_rate=copy_gbps * 1e9, **kw)


# ----------------------------------------------------------------- permute + unpermute


def _index_baseline(x, idx, weights, num_experts):
    """What a user would write: sort (row, slot) pairs by expert, index_select the rows,
    then index_add_ the weighted rows back (no padding)."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    valid = (flat >= 0).nonzero().squeeze(1)
    order = valid[torch.argsort(flat[valid], stable=True)]
    rows = order.div(k, rounding_mode="floor")
    x_sorted = x.index_select(0, rows)
    out = torch.zeros_like(x, dtype=torch.float32)
    out.index_add_(0, rows, x_sorted.float() * weights.reshape(-1)[order, None])
    return out.to(x.dtype)


def permute_unpermute_row(device, shape, *, engine, **timing) -> Row:
    n, hidden, experts, k = shape
    x, idx, w = routed_rows(device, n, hidden, experts, k)

    def ours():
        with on_engine(engine):
            y, pmap = fmo.moe.permute(x, idx, experts)
            return fmo.moe.unpermute(y, pmap, w)

    pairs = int((idx >= 0).sum())
    moved = 2 * (n * hidden * 2 + pairs * hidden * 2)   # permute: read rows, write copies; unpermute: read copies, write rows
    return compared_row("moe_permute_unpermute", f"N{n} H{hidden} E{experts} k{k} bf16", engine, ours,
                        lambda: _index_baseline(x, idx, w, experts), device=device,
                        baseline="index_select + index_add_", bytes_moved=moved, **timing)


# ------------------------------------------------------------------ gather and reduce


def sorted_rows_layout(idx: torch.Tensor, experts: int):
    """The permute map the grouped GEMM gets (segments aligned to contiguous_alignment()):
    src_rows [M] (-1: padding) is the gather's index, slot_rows [N, k] the reduce's."""
    slot_rows, src_slots, _, _ = ref.permute_layout(idx, experts, contiguous_alignment())
    return slot_rows, torch.where(src_slots >= 0, src_slots.div(idx.shape[1], rounding_mode="floor"), -1)


def torch_gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """index_select, with the rows of index -1 zeroed (the kernel's contract)."""
    return src.index_select(0, index.clamp(min=0)).masked_fill_((index < 0)[:, None], 0)


def torch_gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """index_select of the M x k rows, then their fp32 weighted sum over k (slots -1 weigh 0)."""
    m, k = index.shape
    rows = y.index_select(0, index.clamp(min=0).reshape(-1)).view(m, k, -1).float()
    return (rows * weights.masked_fill(index < 0, 0)[..., None]).sum(1).to(y.dtype)


def gather_rows_row(device, shape, *, engine, **timing) -> Row:
    n, hidden, experts, k = shape
    x, idx, _ = routed_rows(device, n, hidden, experts, k)
    _, index = sorted_rows_layout(idx, experts)
    m = index.shape[0]
    label = f"N{n} k{k} E{experts} H{hidden} bf16 -> M{m}"
    want = ref.gather_rows(x, index)
    got = want if engine == "reference" else moe_permute.gather_rows(
        x, index, engine=engine, out=poisoned((m, hidden), x.dtype, device))
    refuse_if_wrong("moe_gather_rows", label, engine, {"kernel": (got, want), "baseline": (torch_gather_rows(x, index), want)})

    def ours():
        with on_engine(engine):
            return kernels.gather_rows(x, index)

    row_bytes = hidden * x.element_size()
    moved = int((index >= 0).sum()) * row_bytes + m * row_bytes + index.numel() * 8   # rows read, written; index
    return compared_row("moe_gather_rows", label, engine, ours, lambda: torch_gather_rows(x, index), device=device,
                        baseline="index_select (-1 rows zeroed)", bytes_moved=moved, **timing)


def check_baseline_sum(label: str, base: torch.Tensor, y, index, weights) -> None:
    """The baseline sums the same fp32 products in another order: its fp32 sum is within
    k * 2^-24 of sum_j |w y_j| of the fixed-order one, and each is rounded once to bf16 (2^-9
    of itself): within (2^-8 + k 2^-24) sum_j |w y_j| of the reference. NaN fails."""
    m, k = index.shape
    mass = torch.zeros(m, y.shape[1], dtype=torch.float64, device=y.device)   # slot by slot: [M, k, H] fp64 is 15 GB on a GPU
    for j in range(k):
        w = weights[:, j].masked_fill(index[:, j] < 0, 0).double()
        mass += y.index_select(0, index[:, j].clamp(min=0)).double().abs() * w.abs()[:, None]
    err = (base.double() - ref.gather_reduce(y, index, weights).double()).abs()
    if not bool((err <= mass * (2.0 ** -8 + k * 2.0 ** -24)).all()):
        raise RuntimeError(f"moe_gather_reduce {label}: the torch baseline disagrees with the reference "
                           f"(worst error {float(torch.nan_to_num(err, nan=float('inf')).max())}): not timing it")


def gather_reduce_row(device, shape, *, engine, **timing) -> Row:
    n, hidden, experts, k = shape
    _, idx, w = routed_rows(device, n, hidden, experts, k)
    index, src_rows = sorted_rows_layout(idx, experts)
    m_sorted = src_rows.shape[0]
    g = torch.Generator(device="cpu").manual_seed(8)
    y = torch.randn(m_sorted, hidden, generator=g).to(torch.bfloat16).to(device)   # the experts' outputs, sorted
    label = f"N{n} k{k} E{experts} H{hidden} bf16 <- M{m_sorted}"
    want = ref.gather_reduce(y, index, w)
    got = want if engine == "reference" else moe_permute.gather_reduce(
        y, index, w, engine=engine, out=poisoned((n, hidden), y.dtype, device))
    refuse_if_wrong("moe_gather_reduce", label, engine, {"kernel": (got, want)})
    check_baseline_sum(label, torch_gather_reduce(y, index, w), y, index, w)

    def ours():
        with on_engine(engine):
            return kernels.gather_reduce(y, index, w)

    row_bytes = hidden * y.element_size()
    moved = int((index >= 0).sum()) * row_bytes + n * row_bytes + index.numel() * (8 + 4)   # rows read, out; index + weights
    return compared_row("moe_gather_reduce", label, engine, ours, lambda: torch_gather_reduce(y, index, w), device=device,
                        baseline="index_select + weighted sum over k", bytes_moved=moved, **timing)


# ----------------------------------------------------------------------------- layout


def torch_layout(topk_idx: torch.Tensor, num_buckets: int, experts_per_bucket: int, once: bool):
    """bucket_layout the PyTorch way: bincount of the buckets, and each entry's rank inside its
    bucket from a stable argsort (row-major entries: ascending token, then slot)."""
    t, k = topk_idx.shape
    bucket = torch.where(topk_idx >= 0, topk_idx.div(experts_per_bucket, rounding_mode="floor"), num_buckets)
    if once:   # one entry per (token, bucket): sort each token's buckets, drop repeats
        bucket = bucket.sort(1).values
        repeat = bucket[:, 1:] == bucket[:, :-1]
        bucket[:, 1:][repeat] = num_buckets
    flat = bucket.reshape(-1)
    counts = torch.bincount(flat, minlength=num_buckets + 1)
    order = torch.sort(flat, stable=True).indices
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = rank.view(t, k)
    if once:
        pos = torch.full((t, num_buckets + 1), -1, dtype=torch.int64, device=flat.device)
        pos.scatter_(1, bucket, torch.where(bucket < num_buckets, rank, -1))   # column B: the dropped entries
        return counts[:num_buckets], pos[:, :num_buckets]
    return counts[:num_buckets], torch.where(bucket < num_buckets, rank, -1)


def layout_row(device, shape, *, engine, **timing) -> Row:
    tokens, k, experts, buckets, once = shape
    g = torch.Generator(device="cpu").manual_seed(9)
    idx = routing(tokens, experts, k, g, device)
    per = experts // buckets
    label = f"T{tokens} k{k} E{experts} B{buckets} {'once' if once else 'per-slot'}"
    want = ref.bucket_layout(idx, buckets, per, once)
    if engine == "reference":
        got = want
    else:
        out = (poisoned((buckets,), torch.int64, device), poisoned((tokens, buckets if once else k), torch.int64, device))
        got = moe_layout.bucket_layout(idx, buckets, per, once, engine=engine, out=out)
    base = torch_layout(idx, buckets, per, once)
    refuse_if_wrong("moe_layout", label, engine, {"kernel counts": (got[0], want[0]), "kernel pos": (got[1], want[1]),
                                                  "baseline counts": (base[0], want[0]), "baseline pos": (base[1], want[1])})

    def ours():
        with on_engine(engine):
            return kernels.bucket_layout(idx, buckets, per, once)

    # topk_idx read once from memory (each of the B CTAs walks all of it; after the first from
    # L2), counts and positions written. A few hundred KB: at this size the kernel is bound by
    # launch latency and its B-CTA grid's serial chunks, not by bandwidth; % ceil is far below 85.
    moved = idx.numel() * 8 + (buckets + want[1].numel()) * 8
    return compared_row("moe_layout", label, engine, ours, lambda: torch_layout(idx, buckets, per, once), device=device,
                        baseline="bincount + stable argsort", bytes_moved=moved, **timing)
