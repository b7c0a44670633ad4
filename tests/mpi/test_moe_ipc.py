"""fmo.moe.Buffer(transport='ipc') across real MPI ranks: the transport kernels of
csrc/moe/ipc.cuh on the `sim` engine, every rank's buffer POSIX shared memory mapped by
every peer. Bit-exact against the oracle and the host transport, repeated calls (the
completion counters never reset), FP8 pairs, the grid equal to the communication SM
budget, and a run under the simulator's memory checker."""
from __future__ import annotations

import contextlib
import os
import time
import traceback

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import moe_ipc
from fastmoe_ops.reference import moe as ref

from mpi_util import (  # noqa: F401 (comm: a fixture)
    all_agree, bitwise, buffer_inputs_on_device, comm, expect_same_error, experts_for, inputs, need_ranks, run_all,
)

pytestmark = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="the ipc transport runs on the sim engine here")


def ipc_buffer(comm, hidden, experts, max_tokens=64, **kw):
    return fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, transport="ipc",
                          max_tokens_per_rank=max_tokens, **kw)


@pytest.mark.parametrize("dtype, hidden, k", [(torch.bfloat16, 256, 4), (torch.float32, 72, 3), (torch.bfloat16, 200, 8),
                                             (torch.float16, 136, 2)])
def test_ipc_dispatch_combine_bitexact_and_repeatable(comm, dtype, hidden, k, monkeypatch):
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    experts = experts_for(world, k)
    grids = []
    real_run = moe_ipc.run

    def recording_run(spec, params, grid, **kw):
        grids.append(grid)
        return real_run(spec, params, grid, **kw)

    monkeypatch.setattr(moe_ipc, "run", recording_run)

    def body():
        buf = ipc_buffer(comm, hidden, experts)
        with fmo.use_backend("sim"), fmo.comm_sms(6):
            for call in range(3):          # counters accumulate across calls
                tokens = [(5 + 3 * r + call) if r != 1 or call != 1 else 0 for r in range(world)]
                xs, idxs, ws = inputs(world, 40 + call, tokens, k, experts, hidden, dtype, minus_one=0.2)
                want = ref.dispatch(xs, idxs, ws, experts)
                recv_x, recv_idx, recv_w, tpe, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
                bitwise(recv_x, want[rank]["x"], f"ipc recv_x (call {call})")
                bitwise(recv_idx, want[rank]["topk_idx"], "ipc recv_topk_idx")
                bitwise(recv_w, want[rank]["topk_weights"], "ipc recv_topk_weights")
                assert tpe.tolist() == want[rank]["tokens_per_expert"].tolist()
                ys = [(want[r]["x"].double() * (r + 1) - 0.5).to(dtype) for r in range(world)]
                out = buf.combine(ys[rank], handle)
                bitwise(out, ref.combine(ys, [w["src"] for w in want], tokens)[rank], f"ipc combine (call {call})")
        assert grids == [6] * 6, f"transport kernels must launch exactly comm_sms CTAs, got grids {grids}"
        buf.destroy()
        return "ok"

    run_all(comm, body)


def test_ipc_fp8_pairs_and_memcheck(comm, monkeypatch):
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 384, 2 * world, 2
    tokens = [7 + r for r in range(world)]
    xs, idxs, ws = inputs(world, 9, tokens, k, experts, hidden, torch.float32)
    pairs = [fmo.fp8.quantize_per_token_group(x, 128) for x in xs]
    want_q = ref.dispatch([p[0].view(torch.uint8) for p in pairs], idxs, ws, experts)
    want_s = ref.dispatch([p[1] for p in pairs], idxs, ws, experts)

    def body():
        buf = ipc_buffer(comm, hidden, experts, max_tokens=16, max_topk=2)
        with fmo.use_backend("sim"):
            (rq, rs), ridx, _, _, handle = buf.dispatch(pairs[rank], idxs[rank], ws[rank])
            bitwise(rq.view(torch.uint8), want_q[rank]["x"], "ipc fp8 values")
            bitwise(rs, want_s[rank]["x"], "ipc fp8 scales")
            out = buf.combine(rs.new_ones(rq.shape[0], hidden), handle)
        sent_to = torch.tensor([[len({e // (experts // world) for e in row if e >= 0})] for row in idxs[rank].tolist()], dtype=torch.float32)
        bitwise(out, sent_to.expand(-1, hidden).contiguous(), "ipc combine of ones")
        buf.destroy()
        return "ok"

    run_all(comm, body)


def test_ipc_capacity_refused_alike(comm):
    need_ranks(comm, 2)
    world = comm.Get_size()
    buf = ipc_buffer(comm, 32, world, max_tokens=2)
    try:
        with fmo.use_backend("sim"):
            buf.dispatch(torch.randn(5, 32), torch.zeros(5, 1, dtype=torch.int64), None)
        msg = "no error"
    except fmo.InputError as e:
        msg = str(e)
    messages = comm.allgather(msg)
    all_agree(comm, "more than max_tokens_per_rank=2" in msg and len(set(messages)) == 1, msg)
    path = buf._transport.handle.path
    buf.destroy()
    comm.Barrier()
    all_agree(comm, not os.path.exists(path), f"{path} still exists after destroy()")


def test_ipc_gradients_equal_host_gradients(comm, monkeypatch):
    """Backward through the ipc transport (dispatch's backward combines on it) gives the
    host transport's gradients bit for bit."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 48, 2 * world, 3
    xs, idxs, ws = inputs(world, 71, [6 + r for r in range(world)], k, experts, hidden, torch.float32, minus_one=0.2)
    launched = []
    real_run = moe_ipc.run

    def recording_run(spec, params, grid, **kw):
        launched.append(type(spec).__name__)
        return real_run(spec, params, grid, **kw)

    monkeypatch.setattr(moe_ipc, "run", recording_run)

    def grads(transport):
        extra = dict(transport="ipc", max_tokens_per_rank=16, max_topk=k) if transport == "ipc" else {}
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, **extra)
        x = xs[rank].clone().requires_grad_()
        w = ws[rank].clone().requires_grad_()
        with fmo.use_backend("sim"):
            recv_x, _, recv_w, _, handle = buf.dispatch(x, idxs[rank], w)
            out = buf.combine(recv_x * recv_w.sum(1, keepdim=True) * (rank + 2), handle)
            (out * torch.arange(hidden, dtype=torch.float32)).sum().backward()
        buf.destroy()
        return out.detach(), x.grad, w.grad

    def body():
        launched.clear()
        on_ipc = grads("ipc")
        # The ipc run must really be on the ipc kernels (else this compares host with host):
        # forward dispatch and combine, and dispatch's backward (grad x, grad w) as combines.
        assert launched == ["MoeIpcDispatchSpec"] + ["MoeIpcCombineSpec"] * 3, f"ipc kernels launched: {launched}"
        for a, b, what in zip(on_ipc, grads("host"), ("out", "grad x", "grad w")):
            bitwise(a, b, f"ipc vs host: {what}")
        return "ok"

    run_all(comm, body)


def test_ipc_device_path_keeps_tensors_on_the_device(comm, monkeypatch):
    """The ipc transport as CUDA tensors take it (layout by the kernel on the tensors'
    device, received ids made local with tensor ops), forced on CPU tensors on the sim
    engine: the tests above, bit for bit, under DeviceTags (tests/device_tags.py) with every
    tensor handed to the Buffer taken as a device tensor: nothing the library makes on the
    host is mixed with them where CUDA would refuse."""
    from device_tags import device_tags

    from fastmoe_ops.moe import host

    need_ranks(comm, 2)
    monkeypatch.setattr(host, "packed_on_device", lambda t: True)
    with device_tags() as tags:
        buffer_inputs_on_device(monkeypatch, tags)
        for dtype, hidden, k in ((torch.bfloat16, 256, 4), (torch.float32, 72, 3)):
            test_ipc_dispatch_combine_bitexact_and_repeatable(comm, dtype, hidden, k, monkeypatch)
        test_ipc_gradients_equal_host_gradients(comm, monkeypatch)
    all_agree(comm, not tags.violations, tags.report())


def test_mapping_bootstrap_shared_by_both_mappings(comm):
    """The bootstrap every mapping shares (create, exchange handles over the Group, open
    every peer's, barrier; close in destroy), run with the shared-memory mapping: each rank
    writes into its own buffer and reads every peer's through its mapping; destroy() closes
    each peer's mapping and then its own, exactly once."""
    from fastmoe_ops.moe.transports import ipc

    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()

    class Recording(ipc.ShmMapping):
        def __init__(self):
            self.log = []

        def create(self, nbytes):
            self.log.append("create")
            return super().create(nbytes)

        def open(self, handle):
            self.log.append("open")
            return super().open(handle)

        def close(self, tensor, own):
            self.log.append("close own" if own else "close peer")
            super().close(tensor, own)

    def body():
        mapping = Recording()
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=32, num_experts=world, transport="ipc", max_tokens_per_rank=4,
                             max_topk=2, device="cpu")
        buf._transport.close()   # swap in the recording mapping over a fresh bootstrap
        t = ipc.IpcTransport(buf.group, 32, 4, 2, mapping)
        assert mapping.log == ["create"] + ["open"] * (world - 1)
        assert all(p.device.type == "cpu" and p.numel() == t.mine.numel() for p in t.peers)
        assert bool((t.mine == 0).all()), "a new buffer must start zeroed (the counters)"
        t.mine[-1] = rank + 1
        buf.group.barrier("written")
        seen = [int(p[-1]) for p in t.peers]
        assert seen == list(range(1, world + 1)), f"rank {rank} sees {seen} through its mappings"
        buf.group.barrier("read")
        t.close()
        assert mapping.log[world:] == ["close peer"] * (world - 1) + ["close own"], mapping.log
        buf.destroy()
        return "ok"

    run_all(comm, body)


def test_ipc_device_refused_alike(comm):
    """transport='ipc' on a device this machine cannot map is refused on every rank."""
    need_ranks(comm, 2)
    for device, fragment in (("meta", "device: expected a CPU or CUDA device, got meta"),
                             ("not a device", "device: expected a torch.device")):
        try:
            fmo.moe.Buffer(fmo.comm.Group(comm), hidden=8, num_experts=comm.Get_size(), transport="ipc",
                           max_tokens_per_rank=2, device=device)
            msg = "no error"
        except fmo.InputError as e:
            msg = str(e)
        messages = comm.allgather(msg)
        all_agree(comm, fragment in msg and len(set(messages)) == 1, msg)


def test_ipc_bad_input_and_missing_rank(comm, monkeypatch):
    """The ipc transport refuses bad input alike on every rank before any kernel runs (an
    expert id out of range on one rank), stays usable after, and a rank that never calls
    dispatch makes the others raise CommTimeoutError naming it after FMO_COMM_TIMEOUT
    (the handshake precedes every transfer kernel, so no kernel waits on the missing rank)."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    buf = ipc_buffer(comm, 32, world, max_tokens=4)
    x, idx = torch.randn(3, 32), torch.zeros(3, 1, dtype=torch.int64)
    bad = torch.full_like(idx, world) if rank == world - 1 else idx
    with fmo.use_backend("sim"):
        expect_same_error(comm, lambda: buf.dispatch(x, bad, None), fmo.InputError,
                          f"dispatch refused on rank {world - 1}: topk_idx: expected expert ids in [-1, {world})")
        run_all(comm, lambda: buf.dispatch(x, idx, None)[0].shape)
        monkeypatch.setenv("FMO_COMM_TIMEOUT", "0.5")
        if rank == world - 1:
            ok, detail = True, "skipped"
        else:
            t0 = time.monotonic()
            try:
                buf.dispatch(x, idx, None)
                ok, detail = False, "dispatch returned"
            except fmo.CommTimeoutError as e:
                ok, detail = f"rank(s) [{world - 1}]" in str(e) and time.monotonic() - t0 < 10, str(e)
    all_agree(comm, ok, detail)
    buf.destroy()


def test_ipc_static_path_reads_nothing_on_the_host(comm):
    """Issue 17 (CUDA graphs): the ipc transport with num_worst_tokens, dispatch then combine and
    the whole MoELayer forward + backward, with every host read of a tensor made to raise
    (tests/host_sync_util.py): the static path a captured decode step replays. The sim engine
    runs the launchers the cuda engine runs (only the final launch differs). Warm calls: the
    first call of each compiles its kernels. Checked against the oracle after the guarded call
    (padding rows too: zeros, topk_idx -1, weight 0)."""
    from host_sync_util import HostRead, no_host_reads

    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, k = 256, 2
    experts = experts_for(world, k)
    tokens = [7 + 2 * r for r in range(world)]
    cap = sum(tokens)

    def body():
        buf = ipc_buffer(comm, hidden, experts, num_worst_tokens=cap)
        layer = None
        try:
            with fmo.use_backend("sim"):
                for call in range(2):      # call 0 compiles; call 1 is guarded
                    xs, idxs, ws = inputs(world, 70 + call, tokens, k, experts, hidden, torch.bfloat16, minus_one=0.1)
                    want = ref.dispatch(xs, idxs, ws, experts)
                    guard = no_host_reads() if call else contextlib.nullcontext()
                    with guard:
                        recv_x, recv_idx, recv_w, _, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
                        out = buf.combine(recv_x, handle)
                    n = want[rank]["x"].shape[0]
                    assert recv_x.shape == (cap, hidden)
                    bitwise(recv_x[:n], want[rank]["x"], f"static ipc recv_x (call {call})")
                    bitwise(recv_idx[:n], want[rank]["topk_idx"], f"static ipc recv_topk_idx (call {call})")
                    bitwise(recv_w[:n], want[rank]["topk_weights"], f"static ipc recv_topk_weights (call {call})")
                    assert bool((recv_x[n:] == 0).all()) and bool((recv_idx[n:] == -1).all()) and bool((recv_w[n:] == 0).all()), \
                        f"static ipc padding rows {n}..{cap} (call {call})"
                    ys = [want[r]["x"] for r in range(world)]
                    bitwise(out, ref.combine(ys, [w["src"] for w in want], tokens)[rank], f"static ipc combine ({call})")
                torch.manual_seed(5)
                layer = fmo.nn.MoELayer(128, 128, 2 * world, 2, group=fmo.comm.Group(comm), transport="ipc",
                                        max_tokens_per_rank=16, num_worst_tokens=16 * world, dtype=torch.bfloat16)
                x = torch.randn(9, 128).to(torch.bfloat16).requires_grad_()
                for call in range(2):
                    guard = no_host_reads() if call else contextlib.nullcontext()
                    with guard:
                        layer(x).float().square().sum().backward()
                assert x.grad is not None and not x.grad.isnan().any()
        except HostRead:
            raise AssertionError(f"rank {rank}: a host read on the static ipc path:\n{traceback.format_exc(limit=-4)}") from None
        finally:
            buf.destroy()
            if layer is not None:
                layer.destroy()
        return "ok"

    run_all(comm, body)


def test_ipc_static_path_reports_bad_data_from_the_device(comm, monkeypatch):
    """The static path checks nothing data-dependent on the host: out-of-range expert ids (on
    one rank, above and below), a rank receiving more than num_worst_tokens and a rank sending
    one peer more than max_tokens_per_rank are found by the kernels and raised on every rank
    alike, naming the argument and the rank (the `sim` engine: by the call itself), with the
    dispatch's outputs all padding; the Buffer stays usable (a good call after each is
    bit-exact). A rank that never calls makes the others raise CommTimeoutError naming it.
    No rank hangs: every refusal is gathered from every rank (and the run is under a timeout)."""
    need_ranks(comm, 2)
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 32, 2 * world, 2
    buf = ipc_buffer(comm, hidden, experts, max_tokens=4, num_worst_tokens=3 * world)
    last = world - 1
    to_rank0 = torch.zeros(3, 1, dtype=torch.int64)            # every rank: 3 tokens to rank 0

    def refused(idx, tokens, fragment):
        x = torch.randn(tokens, hidden)
        expect_same_error(comm, lambda: buf.dispatch(x, idx, None), fmo.InputError, fragment)

    def good_call(seed):
        tokens = [2 + r for r in range(world)]
        xs, idxs, ws = inputs(world, seed, tokens, k, experts, hidden, torch.float32, minus_one=0.2)
        want = ref.dispatch(xs, idxs, ws, experts)
        recv_x, recv_idx, recv_w, _, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
        n = want[rank]["x"].shape[0]
        bitwise(recv_x[:n], want[rank]["x"], f"static recv_x after a refusal (seed {seed})")
        bitwise(recv_idx[:n], want[rank]["topk_idx"], f"static recv_topk_idx after a refusal (seed {seed})")
        out = buf.combine(recv_x, handle)
        bitwise(out, ref.combine([w["x"] for w in want], [w["src"] for w in want], tokens)[rank], "static combine after a refusal")
        return "ok"

    with fmo.use_backend("sim"):
        for bad_id in (experts, -2):
            idx = torch.full((2, k), bad_id, dtype=torch.int64) if rank == last else torch.zeros(2, k, dtype=torch.int64)
            refused(idx, 2, f"topk_idx: expected expert ids in [-1, {experts}) on every rank, got others on rank(s) [{last}]")
            run_all(comm, lambda: good_call(80 + bad_id))
        # 3 tokens from every rank to rank 0: 3 * world > 3 * world - 1 only with an extra one on rank 0.
        extra = torch.cat([to_rank0, torch.zeros(1, 1, dtype=torch.int64)]) if rank == 0 else to_rank0
        refused(extra, extra.shape[0], f"num_worst_tokens: rank(s) [0] would receive more than num_worst_tokens={3 * world}")
        run_all(comm, lambda: good_call(90))
        five = torch.zeros(5, 1, dtype=torch.int64) if rank == last else torch.zeros(1, 1, dtype=torch.int64)
        refused(five, five.shape[0], f"max_tokens_per_rank: rank(s) [{last}] would send more than max_tokens_per_rank=4")
        run_all(comm, lambda: good_call(91))
        # As on CUDA (the call returns, the error waits in the status word for check()): the
        # refused dispatch's outputs, and those of a good one while the error is unread, are
        # padding only; check() then raises the error on every rank, and the Buffer goes on.
        monkeypatch.setattr(buf._transport, "raise_static_errors", lambda what: None)
        bad = torch.full((2, 1), experts if rank == 0 else 0, dtype=torch.int64)
        for idx in (bad, torch.zeros(2, 1, dtype=torch.int64)):
            recv_x, recv_idx, _, _, _ = buf.dispatch(torch.randn(2, hidden) + 1, idx, None)
            all_agree(comm, bool((recv_x == 0).all()) and bool((recv_idx == -1).all()),
                      f"outputs of a dispatch with an unread error: {recv_x.abs().sum()} {recv_idx.unique().tolist()}")
        monkeypatch.undo()
        expect_same_error(comm, buf.check, fmo.InputError, "topk_idx: expected expert ids in [-1, ")
        run_all(comm, lambda: good_call(92))
        monkeypatch.setenv("FMO_COMM_TIMEOUT", "0.5")
        if rank == last:
            ok, detail = True, "skipped"
        else:
            t0 = time.monotonic()
            try:
                buf.dispatch(torch.randn(2, hidden), torch.zeros(2, 1, dtype=torch.int64), None)
                ok, detail = False, "dispatch returned"
            except fmo.CommTimeoutError as e:
                ok, detail = f"rank(s) [{last}]" in str(e) and time.monotonic() - t0 < 10, str(e)
    all_agree(comm, ok, detail)
    buf.destroy()


def test_ipc_static_path_under_memcheck(comm, monkeypatch):
    """The static kernels under the simulator's memory checker: a dispatch with padding rows
    and its combine, bit-exact, then a dispatch sending rank 0 more than max_tokens_per_rank
    rows: the rows past the slot are never written (refused, never out of bounds)."""
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    world, rank = comm.Get_size(), comm.Get_rank()
    hidden, experts, k = 48, 2 * world, 2
    tokens = [3 + r for r in range(world)]
    xs, idxs, ws = inputs(world, 13, tokens, k, experts, hidden, torch.float32, minus_one=0.2)
    want = ref.dispatch(xs, idxs, ws, experts)

    def body():
        buf = ipc_buffer(comm, hidden, experts, max_tokens=8, max_topk=k, num_worst_tokens=sum(tokens) + 2)
        try:
            with fmo.use_backend("sim"):
                recv_x, recv_idx, _, _, handle = buf.dispatch(xs[rank], idxs[rank], ws[rank])
                n = want[rank]["x"].shape[0]
                bitwise(recv_x[:n], want[rank]["x"], "static recv_x under memcheck")
                bitwise(recv_idx[:n], want[rank]["topk_idx"], "static recv_topk_idx under memcheck")
                out = buf.combine(recv_x, handle)
                bitwise(out, ref.combine([w["x"] for w in want], [w["src"] for w in want], tokens)[rank],
                        "static combine under memcheck")
                with pytest.raises(fmo.InputError, match="max_tokens_per_rank=8"):
                    buf.dispatch(torch.randn(9, hidden), torch.zeros(9, 1, dtype=torch.int64), None)
        finally:
            buf.destroy()
        return "ok"

    run_all(comm, body)
