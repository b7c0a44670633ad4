"""Plain-PyTorch reference of MoE dispatch/combine and permute/unpermute.

Two kinds of function live here:
  * the building blocks the kernels compute (bucket layout, row gather, gather-reduce),
    written to produce exactly the kernels' bits (same fp32 operations in the same order);
    the `reference` engine runs these, and so do CUDA tensors where no kernel applies
    (empty inputs, fp64), so they allocate on their inputs' device;
  * the oracle: `dispatch` / `combine` over every rank's inputs at once in one process,
    the obvious gather and sum, float64-capable.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation type of the reductions: fp64 for fp64, fp32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- layout


def bucket_layout(topk_idx: torch.Tensor, num_buckets: int, experts_per_bucket: int, once: bool):
    """Counts and exclusive positions of tokens (or (token, slot) pairs) per bucket.

    topk_idx [T, k] int64 in [-1, num_buckets * experts_per_bucket); bucket = idx // experts_per_bucket.
    once=True  -> counts [B] tokens with at least one slot in the bucket, pos [T, B]: the
                  token's rank among them (ascending token) or -1.
    once=False -> counts [B] (token, slot) pairs, pos [T, k]: the pair's rank among the
                  bucket's pairs (ascending token, then slot) or -1 for idx == -1."""
    t, k = topk_idx.shape
    valid = topk_idx >= 0
    bucket = torch.where(valid, topk_idx.div(experts_per_bucket, rounding_mode="floor"), num_buckets)
    hits = torch.zeros(t, num_buckets + 1, dtype=torch.int64, device=topk_idx.device)
    hits.scatter_add_(1, bucket, torch.ones_like(bucket))
    hits = hits[:, :num_buckets]                                    # [T, B] slots per bucket
    if once:
        present = (hits > 0).to(torch.int64)
        before = torch.cumsum(present, 0) - present
        return present.sum(0), torch.where(present > 0, before, -1)
    before_rows = torch.cumsum(hits, 0) - hits                      # pairs in earlier tokens
    same_earlier = (bucket[:, :, None] == bucket[:, None, :]) & torch.ones(k, k, dtype=torch.bool, device=topk_idx.device).tril(-1)
    pos = before_rows.gather(1, bucket.clamp(max=num_buckets - 1)) + same_earlier.sum(2)
    return hits.sum(0), torch.where(valid, pos, -1)


# ------------------------------------------------------------------------ data movement


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = src[index[i]], zeros where index[i] == -1. Any dtype (bytes are copied)."""
    shape = (index.shape[0],) + tuple(src.shape[1:])
    if src.shape[0] == 0 or index.shape[0] == 0:
        return torch.zeros(shape, dtype=src.dtype, device=src.device)
    rows = src.reshape(src.shape[0], -1)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = rows.view(torch.uint8).index_select(0, index.clamp(min=0))
    missing = index < 0
    if bool(missing.any()):
        out[missing] = 0
    return out.view(src.dtype).reshape(shape)


def gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[m] = sum over j ascending of w[m, j] * y[index[m, j]] (w = 1 when None), skipping
    index == -1; accumulated in fp32 (fp64 for fp64 y) from 0, rounded once to y.dtype.

    y [S, H], index [M, J] int64, weights [M, J] fp32 -> [M, H] y.dtype."""
    acc_t = acc_dtype(y.dtype)
    acc = torch.zeros(index.shape[0], y.shape[1], dtype=acc_t, device=y.device)
    if y.shape[0] == 0:   # nothing to gather (then every index is -1)
        return acc.to(y.dtype)
    for j in range(index.shape[1]):
        col = index[:, j]
        keep = col >= 0
        if not bool(keep.any()):
            continue
        sel = keep.nonzero().squeeze(1)
        rows = y.index_select(0, col[sel]).to(acc_t)
        if weights is not None:
            rows.mul_(weights[sel, j].to(acc_t)[:, None])        # rounded product, then the sum
        acc.index_add_(0, sel, rows)                             # distinct rows: one add each
    return acc.to(y.dtype)


# ----------------------------------------------------------------------- permute layout


def permute_layout(recv_topk_idx: torch.Tensor, num_local_experts: int, alignment: int):
    """(slot_rows [N, k], src_slots [M], expert_offsets [E+1], tokens_per_expert [E]) for
    rows grouped by expert (ascending expert, then receive row, then slot), each expert's
    segment padded to a multiple of `alignment`; src_slots holds n*k + j or -1 (padding)."""
    counts, pos = bucket_layout(recv_topk_idx, num_local_experts, 1, once=False)
    return permute_from_layout(recv_topk_idx, counts, pos, alignment)


def permute_from_layout(recv_topk_idx: torch.Tensor, counts: torch.Tensor, pos: torch.Tensor, alignment: int):
    """permute_layout, given the expert bucket layout (counts [E], pair positions [N, k]).
    Everything stays on recv_topk_idx's device; the sorted row count M is read on the host
    (one synchronisation: it sizes src_slots)."""
    n, k = recv_topk_idx.shape
    device = recv_topk_idx.device
    num_local_experts = counts.shape[0]
    padded = (counts + alignment - 1) // alignment * alignment
    offsets = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    valid = recv_topk_idx >= 0
    slot_rows = torch.where(valid, offsets[recv_topk_idx.clamp(min=0)] + pos, -1)
    src_slots = torch.full((int(offsets[-1]),), -1, dtype=torch.int64, device=device)
    src_slots[slot_rows[valid]] = torch.arange(n * k, dtype=torch.int64, device=device).reshape(n, k)[valid]
    return slot_rows, src_slots, offsets, counts


# ------------------------------------------------------------------------------ oracle


def dispatch(xs, topk_idxs, topk_weights, num_experts: int):
    """The obvious gather, for every rank at once. xs[s] [T_s, H], topk_idxs[s] [T_s, k],
    topk_weights[s] [T_s, k] for each source rank s. Returns, per destination rank r, a dict:
    x [N_r, H], topk_idx [N_r, k] (local or -1), topk_weights [N_r, k] (0 elsewhere),
    tokens_per_expert [E/R], src [(s, t), ...] the origin of each row."""
    ranks = len(xs)
    per = num_experts // ranks
    out = []
    for r in range(ranks):
        rows, idx, w, src = [], [], [], []
        for s in range(ranks):
            for t in range(xs[s].shape[0]):
                mine = [(e >= r * per and e < (r + 1) * per) for e in topk_idxs[s][t].tolist()]
                if any(mine):
                    rows.append(xs[s][t])
                    idx.append([e - r * per if m else -1 for e, m in zip(topk_idxs[s][t].tolist(), mine)])
                    w.append([float(v) if m else 0.0 for v, m in zip(topk_weights[s][t].tolist(), mine)])
                    src.append((s, t))
        k = topk_idxs[0].shape[1]
        h = xs[0].shape[1]
        x = torch.stack(rows) if rows else torch.zeros(0, h, dtype=xs[0].dtype)
        ti = torch.tensor(idx, dtype=torch.int64).reshape(-1, k)
        tw = torch.tensor(w, dtype=torch.float32).reshape(-1, k)
        tpe = torch.zeros(per, dtype=torch.int64)
        for e in ti[ti >= 0].tolist():
            tpe[e] += 1
        out.append(dict(x=x, topk_idx=ti, topk_weights=tw, tokens_per_expert=tpe, src=src))
    return out


def combine(ys, srcs, num_tokens):
    """out[s][t] = sum, over ranks r ascending that received (s, t), of ys[r][row]; zeros for
    a token sent nowhere. Accumulated like `gather_reduce` (fp32, or fp64 for fp64)."""
    ranks = len(ys)
    h = ys[0].shape[1]
    acc_t = acc_dtype(ys[0].dtype)
    outs = [torch.zeros(num_tokens[s], h, dtype=acc_t) for s in range(ranks)]
    for r in range(ranks):
        for row, (s, t) in enumerate(srcs[r]):
            outs[s][t] = outs[s][t] + ys[r][row].to(acc_t)
    return [o.to(ys[0].dtype) for o in outs]


def low_latency_sources(topk_idxs, num_experts: int):
    """Per destination rank r and local expert e, the (source rank, token) pairs it receives
    in the low-latency masked layout, in order: source rank, then token; a token once per
    expert it names (a repeated id, or one outside [0, E), sends nothing more)."""
    ranks = len(topk_idxs)
    per = num_experts // ranks
    lists = [[[] for _ in range(per)] for _ in range(ranks)]
    for s in range(ranks):
        for t, row in enumerate(topk_idxs[s].tolist()):
            for e in sorted({e for e in row if 0 <= e < num_experts}):
                lists[e // per][e % per].append((s, t))
    return lists


def low_latency_combine(ys, topk_idxs, topk_weights, num_experts: int):
    """out[s][t] = sum over slots j ascending with an expert e in [0, E) of
    w[s][t, j] * ys[owner(e)][e % E_local, row of (s, t)], accumulated like `gather_reduce`
    (a rounded fp32 product, then a rounded fp32 sum), rounded once. ys[r] [E_local, rows, H];
    topk_weights None: weights 1."""
    ranks = len(ys)
    per = num_experts // ranks
    sources = low_latency_sources(topk_idxs, num_experts)
    where = {(r, e, st): i for r in range(ranks) for e in range(per) for i, st in enumerate(sources[r][e])}
    outs = []
    for s in range(ranks):
        t_count, k = topk_idxs[s].shape
        out = torch.zeros(t_count, ys[0].shape[2], dtype=torch.float32)
        for t, row in enumerate(topk_idxs[s].tolist()):
            for j, e in enumerate(row):
                if 0 <= e < num_experts:
                    y = ys[e // per][e % per, where[(e // per, e % per, (s, t))]].float()
                    out[t] = out[t] + (y if topk_weights is None else topk_weights[s][t, j] * y)
        outs.append(out.to(ys[0].dtype))
    return outs
