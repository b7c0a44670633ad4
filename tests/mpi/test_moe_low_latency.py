"""Buffer.low_latency_dispatch / low_latency_combine (decode mode, fastmoe_ops.moe.low_latency)
across real MPI ranks: the kernels of csrc/moe/low_latency.cuh on the `sim` engine, every
rank's low-latency buffer POSIX shared memory mapped by every peer.

Oracle: the plain dispatch's (reference.moe.dispatch, the obvious gather): local expert e
receives exactly the rows whose received topk ids name e, in the plain receive order
(source rank, then token), counts exact; the combine against the fixed-order fp32 sum
(reference.moe.low_latency_combine), bit for bit. FP8: bit for bit quantise-then-dispatch.
Outputs start poisoned (tests/conftest.py): a row the kernel forgets to write fails.
~10 s at -n 2 (one simulator compile per kernel variant, cached after)."""
from __future__ import annotations

import time

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.comm import Group
from fastmoe_ops.ops import moe_low_latency
from fastmoe_ops.reference import moe as ref

from mpi_util import all_agree, bitwise, comm, expect_same_error, inputs, need_ranks, run_all  # noqa: F401 (comm: a fixture)

pytestmark = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="the ipc transport runs on the sim engine here")


def ll_buffer(comm, hidden, experts, max_tokens=8, max_topk=4):
    return fmo.moe.Buffer(Group(comm), hidden=hidden, num_experts=experts, transport="ipc", max_tokens_per_rank=max_tokens,
                          max_topk=max_topk, device="cpu", low_latency=True)


def expected_rows(want, rank, per, payload=None):
    """Per local expert, the rows of the plain dispatch's recv_x (or of `payload`, received
    in the same order) whose received topk ids name it, in receive order."""
    rows = want[rank]["x"] if payload is None else payload
    idx = want[rank]["topk_idx"]
    return [rows[(idx == e).any(1)] for e in range(per)]


def check_masked(recv, masked_m, expect, what):
    counts = [int(r.shape[0]) for r in expect]
    assert masked_m.dtype == torch.int32 and masked_m.tolist() == counts, f"{what}: masked_m {masked_m.tolist()} != {counts}"
    for e, rows in enumerate(expect):
        bitwise(recv[e, :rows.shape[0]], rows, f"{what}: expert {e}")


def recording(monkeypatch):
    """Record every low-latency launch (spec op and phase) and forbid MPI on the hot path."""
    launched = []
    real_run = moe_low_latency.run

    def run(spec, params, grid, **kw):
        launched.append((spec.op, spec.phase, grid))
        return real_run(spec, params, grid, **kw)

    monkeypatch.setattr(moe_low_latency, "run", run)
    return launched


def no_mpi(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("an MPI call on the low-latency hot path")

    for name in ("allgather", "allgather_array", "barrier"):
        monkeypatch.setattr(Group, name, refuse)


@pytest.mark.parametrize("dtype, hidden, k, weighted", [(torch.bfloat16, 256, 4, True), (torch.float16, 144, 3, False)])
def test_low_latency_matches_plain_dispatch_and_repeats(comm, dtype, hidden, k, weighted, monkeypatch):
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    experts, per = 2 * world + 2 * world, 4        # 4 local experts: some stay empty
    with fmo.comm_sms(3):   # the grid is the communication SM budget when the Buffer is built
        buf = ll_buffer(comm, hidden, experts)
    launched = recording(monkeypatch)
    # Call 0: ragged, rank 1 empty (T = 0); call 1: full (T = max); call 2: rank 0 all -1.
    calls = [[0 if r == 1 else 3 + r for r in range(world)], [8] * world, [8 - r for r in range(world)]]

    def body():
        with fmo.use_backend("sim"), fmo.comm_sms(5):   # not the launch's: the Buffer's grid stays 3
            for call, tokens in enumerate(calls):
                xs, idxs, ws = inputs(world, 30 + call, tokens, k, experts, hidden, dtype, structured=call == 0,
                                      minus_one=0.25 if call else 0.0)
                if call == 2:
                    idxs[0].fill_(-1)
                want = ref.dispatch(xs, idxs, ws, experts)
                weights = ws[rank] if weighted else None
                with monkeypatch.context() as m:
                    no_mpi(m)
                    recv, masked_m, handle = buf.low_latency_dispatch(xs[rank], idxs[rank], weights)
                assert recv.shape == (per, world * 8, hidden) and recv.dtype == dtype
                check_masked(recv, masked_m, expected_rows(want, rank, per), f"call {call}")
                # distinct experts per token: the (token, slot) count of the plain dispatch
                assert masked_m.tolist() == want[rank]["tokens_per_expert"].tolist()
                y = (recv.double() * (rank + 1) - 0.25).to(dtype)   # poisoned rows past masked_m stay unread
                ys = comm.allgather(y)
                with monkeypatch.context() as m:
                    no_mpi(m)
                    out = buf.low_latency_combine(y, handle)
                bitwise(out, ref.low_latency_combine(ys, idxs, ws if weighted else None, experts)[rank], f"combine (call {call})")
                # and the float64 weighted sum, within the fp32 accumulation's rounding
                exact = torch.zeros(tokens[rank], hidden, dtype=torch.float64)
                for t, row in enumerate(idxs[rank].tolist()):
                    for j, e in enumerate(row):
                        if e >= 0:
                            w = float(ws[rank][t, j]) if weighted else 1.0
                            exact[t] += w * (xs[rank][t].double() * (e // per + 1) - 0.25).to(dtype).double()
                tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
                assert torch.allclose(out.double(), exact, rtol=tol, atol=tol * k), f"combine vs float64 (call {call})"
        return "ok"

    run_all(comm, body)
    assert launched == [("moe_ll_dispatch", "both", 3), ("moe_ll_combine", "both", 3)] * len(calls), launched
    buf.destroy()


def test_low_latency_fp8_bitexact_hook_and_memcheck(comm, monkeypatch):
    """use_fp8: e4m3 codes and scales bit for bit quantize_per_token_group then the plain
    dispatch (hidden 272: a partial last group); a duplicate expert id in a row and ids
    outside [0, E) send nothing more; the receive hook; under the simulator's memory checker."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    hidden, experts, k, per = 272, 2 * world, 3, 2
    tokens = [6 + r for r in range(world)]
    cap = max(tokens)   # max_tokens_per_rank: every rank's batch fits (a rank over it refuses alone)
    xs, idxs, ws = inputs(world, 17, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.2)
    idxs[0][0, 2] = idxs[0][0, 0] = 1                 # a duplicate
    idxs[world - 1][1, 1] = experts                   # out of range: no destination
    pairs = [fmo.fp8.quantize_per_token_group(x, 128) for x in xs]
    clean = [torch.where((i >= experts), -1, i) for i in idxs]
    want_q = ref.dispatch([p[0].view(torch.uint8) for p in pairs], clean, ws, experts)
    want_s = ref.dispatch([p[1] for p in pairs], clean, ws, experts)
    launched = recording(monkeypatch)

    def body():
        with fmo.comm_sms(2):
            buf = ll_buffer(comm, hidden, experts, max_tokens=cap, max_topk=3)
        with fmo.use_backend("sim"):
            (xq, xs_), masked_m, handle, hook = buf.low_latency_dispatch(xs[rank], idxs[rank], ws[rank], use_fp8=True,
                                                                         return_recv_hook=True)
            expect_same_error(comm, lambda: buf.low_latency_combine(torch.zeros(per, world * cap, hidden, dtype=torch.bfloat16), handle),
                              fmo.InputError, "received (its recv hook called)")
            hook()
            check_masked(xq.view(torch.uint8), masked_m, expected_rows(want_q, rank, per), "fp8 codes")
            check_masked(xs_, masked_m, expected_rows(want_s, rank, per, want_s[rank]["x"]), "fp8 scales")
            assert xs_.shape == (per, world * cap, 3)
            expect_same_error(comm, hook, fmo.InputError, "recv hook: expected to be called once")
            y = torch.ones(per, world * cap, hidden, dtype=torch.bfloat16)
            out = buf.low_latency_combine(y, handle)
            ys = comm.allgather(y)
            bitwise(out, ref.low_latency_combine(ys, idxs, ws, experts)[rank], "combine after an fp8 dispatch")
        buf.destroy()
        return "ok"

    run_all(comm, body)
    assert launched == [("moe_ll_dispatch", "send", 2), ("moe_ll_dispatch", "recv", 2), ("moe_ll_combine", "both", 2)]


def test_low_latency_bad_input_refused_alike(comm):
    """Local checks, before any kernel, alike on every rank; the Buffer stays usable."""
    need_ranks(comm, 2)
    world = comm.Get_size()
    hidden, experts = 32, 2 * world
    buf = ll_buffer(comm, hidden, experts, max_tokens=4, max_topk=2)
    x, idx = torch.randn(3, hidden, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.int64)
    cases = [
        (lambda: buf.low_latency_dispatch(torch.randn(5, hidden, dtype=torch.bfloat16), torch.zeros(5, 2, dtype=torch.int64)),
         "x: expected at most max_tokens_per_rank=4 tokens, got 5"),
        (lambda: buf.low_latency_dispatch(x, torch.zeros(3, 3, dtype=torch.int64)), "topk_idx: expected 1 <= k <= max_topk=2, got k=3"),
        (lambda: buf.low_latency_dispatch(x.float(), idx), "x: expected dtype in"),
        (lambda: buf.low_latency_dispatch(x.to("meta"), idx), "x: expected a tensor on cpu"),
        (lambda: buf.low_latency_dispatch(x[:, :16], idx), "x: expected shape ('any', 32), got (3, 16)"),
        (lambda: buf.low_latency_dispatch(x, idx.int()), "topk_idx: expected dtype in ['torch.int64']"),
        (lambda: buf.low_latency_dispatch(x, idx, torch.ones(3, 1)), "topk_weights: expected shape (3, 2)"),
        (lambda: buf.low_latency_dispatch(x.requires_grad_(), idx), "not differentiable"),
        (lambda: buf.low_latency_dispatch(x.detach(), idx, use_fp8=1), "use_fp8: expected a bool"),
        (lambda: buf.low_latency_dispatch(x.detach(), idx), "on engine 'sim'"),   # the reference engine
        (lambda: buf.low_latency_combine(torch.zeros(1, 1), None), "handle: expected the handle"),
    ]
    with fmo.use_backend("reference"):
        expect_same_error(comm, cases[-2][0], fmo.InputError, cases[-2][1])
    with fmo.use_backend("sim"):
        for fn, fragment in cases[:-2] + cases[-1:]:
            expect_same_error(comm, fn, fmo.InputError, fragment)
        x = x.detach()
        _, _, handle = buf.low_latency_dispatch(x, idx)      # still usable
        expect_same_error(comm, lambda: buf.low_latency_dispatch(x, idx), fmo.InputError, "has not been combined")
        expect_same_error(comm, lambda: buf.low_latency_combine(torch.zeros(2, 3, hidden, dtype=torch.bfloat16), handle),
                          fmo.InputError, f"y: expected shape (2, {4 * world}, {hidden})")
        out = buf.low_latency_combine(torch.zeros(2, 4 * world, hidden, dtype=torch.bfloat16), handle)
        run_all(comm, lambda: bitwise(out, torch.zeros(3, hidden, dtype=torch.bfloat16), "combine of zeros") or "ok")
        expect_same_error(comm, lambda: buf.low_latency_combine(out, handle), fmo.InputError, "handle of the latest")
    buf.destroy()
    plain = fmo.moe.Buffer(Group(comm), hidden=hidden, num_experts=experts)
    expect_same_error(comm, lambda: plain.low_latency_dispatch(x, idx), fmo.InputError, "low_latency=True")
    plain.destroy()
    expect_same_error(comm, lambda: fmo.moe.Buffer(Group(comm), hidden=hidden, num_experts=experts, low_latency=True),
                      fmo.InputError, "True only with transport='ipc'")
    expect_same_error(comm, lambda: ll_buffer(comm, 40, experts), fmo.InputError, "hidden: expected a multiple of 16")
    with fmo.comm_sms(2 + comm.Get_rank()):   # the counters count CTAs: the grid must agree
        expect_same_error(comm, lambda: ll_buffer(comm, hidden, experts), fmo.InputError, "sm_budget().comm_sms")


def test_low_latency_missing_rank_times_out(comm, monkeypatch):
    """A rank that never calls: the others' kernels give up after FMO_COMM_TIMEOUT and raise
    CommTimeoutError naming it (no hang); the Buffer then refuses further calls."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    buf = ll_buffer(comm, 32, world)
    monkeypatch.setenv("FMO_COMM_TIMEOUT", "0.5")
    x, idx = torch.randn(2, 32, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.int64)
    ok, detail = True, "skipped"
    with fmo.use_backend("sim"):
        if rank != world - 1:
            t0 = time.monotonic()
            try:
                buf.low_latency_dispatch(x, idx)
                ok, detail = False, "dispatch returned"
            except fmo.CommTimeoutError as e:
                ok, detail = f"rank(s) [{world - 1}]" in str(e) and time.monotonic() - t0 < 30, str(e)
            try:
                buf.low_latency_dispatch(x, idx)
                ok, detail = False, "a second call after the timeout was accepted"
            except fmo.CommTimeoutError as e:
                ok = ok and "destroy it" in str(e)
    all_agree(comm, ok, detail)
    comm.Barrier()
    buf.destroy()
