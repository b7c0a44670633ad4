"""The dispatch/combine checks of tests/mpi/test_moe_dispatch.py as plain functions, so that
another transport's tests (tests/mpi/test_moe_mpi_cuda_aware.py) run the same checks without
importing a test file. Every rank builds every rank's inputs from (seed + rank)."""
from __future__ import annotations

import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import moe as ref

from mpi_util import bitwise, inputs, need_ranks, run_all

ENGINES = [e for e in ("sim", "reference") if e in fmo.available_backends()]


CASES = [  # (name, tokens per rank (None: 5 + 3r), k, E, H, dtype, options)
    ("structured", None, 2, 8, 64, torch.float32, dict(structured=True)),
    ("random_bf16_k8_H200", None, 8, 16, 200, torch.bfloat16, dict(minus_one=0.2)),
    ("k1_fp32", None, 1, 4, 136, torch.float32, {}),
    ("skew_expert0", None, 3, 8, 128, torch.bfloat16, dict(skew=True)),
    ("rank1_empty", "rank1_empty", 4, 8, 72, torch.float32, dict(minus_one=0.3)),
    ("all_minus_one", None, 2, 8, 64, torch.bfloat16, dict(minus_one=1.0)),
    ("k5_k6_k7", None, 6, 12, 40, torch.float32, dict(minus_one=0.1)),
]


def check_dispatch_combine_bitexact(comm, engine, case):
    need_ranks(comm, 2)
    name, tokens, k, experts, hidden, dtype, opts = case
    world, rank = comm.Get_size(), comm.Get_rank()
    tokens = [5 + 3 * r if tokens is None else (0 if r == 1 else 9 + r) for r in range(world)]
    seed = 100 * len(name)
    xs, idxs, ws = inputs(world, seed, tokens, k, experts, hidden, dtype, **opts)
    want = ref.dispatch(xs, idxs, ws, experts)

    def body():
        group = fmo.comm.Group(comm)
        buf = fmo.moe.Buffer(group, hidden=hidden, num_experts=experts)
        with fmo.use_backend(engine):
            recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
            bitwise(recv_x, want[rank]["x"], f"recv_x ({name}, {engine}, seed {seed})")
            bitwise(recv_idx, want[rank]["topk_idx"], f"recv_topk_idx ({name})")
            bitwise(recv_w, want[rank]["topk_weights"], f"recv_topk_weights ({name})")
            assert tpe.tolist() == want[rank]["tokens_per_expert"].tolist(), (tpe, want[rank]["tokens_per_expert"])
            # Experts: any per-rank function of the received rows.
            ys = [(want[r]["x"].double() * (r + 1) + 0.25).to(dtype) for r in range(world)]
            out = buf.combine(ys[rank], handle)
            bitwise(out, ref.combine(ys, [w["src"] for w in want], tokens)[rank], f"combine ({name}, {engine})")
            again = buf.combine(ys[rank].clone(), handle)
            bitwise(again, out, "combine run twice")
        buf.destroy()
        return f"{tuple(recv_x.shape)} received"

    run_all(comm, body)


def check_fp8_pairs_and_capacity(comm, engine):
    """(xq e4m3, xs fp32) pairs travel as they are; num_worst_tokens pads the outputs."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 300, 8, 3
    tokens = [6 + 2 * r for r in range(world)]
    xs, idxs, ws = inputs(world, 77, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.1)
    pairs = [fmo.fp8.quantize_per_token_group(x, 128) for x in xs]
    want_q = ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts)
    want_s = ref.dispatch([p[1] for p in pairs], idxs, ws, experts)
    cap = sum(tokens)

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, num_worst_tokens=cap)
        with fmo.use_backend(engine):
            (rq, rs), ridx, rw, tpe, handle = buf.dispatch(pairs[rank], idxs[rank], ws[rank])
        n = want_q[rank]["x"].shape[0]
        assert rq.dtype == torch.float8_e4m3fn and rq.shape == (cap, hidden) and rs.shape == (cap, 3)
        bitwise(rq[:n].view(torch.uint8), want_q[rank]["x"], "recv xq")
        bitwise(rs[:n], want_s[rank]["x"], "recv xs")
        bitwise(ridx[:n], want_q[rank]["topk_idx"], "recv_topk_idx")
        assert bool((ridx[n:] == -1).all()) and bool((rw[n:] == 0).all()) and bool((rq[n:].view(torch.uint8) == 0).all())
        y = torch.ones(cap, hidden, dtype=torch.float32)
        with fmo.use_backend(engine):
            out = buf.combine(y, handle)      # padding rows are ignored
        sent_to = torch.tensor([[len({e // (experts // world) for e in row if e >= 0})] for row in idxs[rank].tolist()], dtype=torch.float32)
        bitwise(out, sent_to.expand(-1, hidden).contiguous(), "combine of ones counts the receiving ranks")
        buf.destroy()
        return n

    run_all(comm, body)


def check_autograd_against_dense_float64(comm, engine):
    """grad x and grad topk_weights through dispatch -> experts -> combine, against the
    same model computed densely in one process in float64."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 24, 8, 3
    per = experts // world
    tokens = [4 + r for r in range(world)]
    xs, idxs, ws = inputs(world, 5, tokens, k, experts, hidden, torch.float64, minus_one=0.2)
    gs = [torch.randn(t, hidden, generator=torch.Generator().manual_seed(900 + s), dtype=torch.float64) for s, t in enumerate(tokens)]

    # Dense model: out[s][t] = sum over ranks r owning any expert of t of x * (r + 1) * (sum of t's weights on r).
    dx = [x.clone().requires_grad_() for x in xs]
    dw = [w.double().requires_grad_() for w in ws]
    loss = 0
    for s in range(world):
        for r in range(world):
            own = (idxs[s] >= r * per) & (idxs[s] < (r + 1) * per)
            wsum = torch.where(own, dw[s], 0.0).sum(1, keepdim=True)
            sent = own.any(1, keepdim=True)
            loss = loss + (torch.where(sent, dx[s] * (r + 1) * wsum, 0.0) * gs[s]).sum()
    loss.backward()

    def body():
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts)
        x = xs[rank].clone().requires_grad_()
        w = ws[rank].clone().requires_grad_()
        with fmo.use_backend(engine):
            recv_x, recv_idx, recv_w, _, handle = buf.dispatch(x, idxs[rank], w)
            y = recv_x * (rank + 1) * recv_w.sum(1, keepdim=True).double()
            out = buf.combine(y, handle)
            (out * gs[rank]).sum().backward()
        err_x = (x.grad - dx[rank].grad).abs().max().item() if x.numel() else 0.0
        err_w = (w.grad.double() - dw[rank].grad).abs().max().item() if w.numel() else 0.0
        assert err_x < 1e-6 and err_w < 1e-4, f"grad x err {err_x}, grad w err {err_w}"
        buf.destroy()
        return f"grad errors {err_x:.1e} {err_w:.1e}"

    run_all(comm, body)
