"""MoE dispatch + combine across MPI ranks against a raw MPI Alltoallv of the same bytes.

    mpirun -n 4 python -m bench.bench_moe [--quick] [--json FILE]        # CPU
    mpirun -n 2 python -m bench.bench_moe [--quick] [--json FILE]        # GPU (ranks may share one)

Each row times one dispatch + combine (layout, metadata handshake, packing, transfers, the
fixed-order combine sum) on every rank and, in the same run, two raw `comm.Alltoallv` calls
moving exactly the same bytes between pre-packed host buffers (no layout, no handshake, no
sum): what the exchange costs without the library. The two are timed by
bench.stats.compare_across_ranks: interleaved pairs until the ratio's 95% interval is narrow
enough or the time budget ends, a call's time the slowest rank's (barrier before each, warm-up
first). Speedup = raw time / ours (1.5x slower is 0.67x), printed with its interval. GB/s counts the payload bytes all ranks send
(dispatch rows + their ids/weights/scales, then combine rows).

CPU tensors: the host transport (packing and the sum on the CPU; no kernel, so the engine
does not apply): host rows (MPI messages per peer), plus one transport='ipc' row: the
intra-node kernels on the simulator over shared memory (simulator speed, not GPU speed).
CUDA tensors: the host transport staged through pinned memory (kernels pack and sum on the
device) and transport='ipc' (CUDA IPC, kernels on comm_sms SMs); "% ceil" compares their
rate with the device copy bandwidth measured in the same run.

moe_low_latency rows (transport='ipc', low_latency=True; decode: T=128 per rank, 256 experts,
top-8 on a GPU, a small shape on the simulator): low_latency_dispatch + low_latency_combine
(masked layout out, y back in it) against the normal ipc dispatch + combine of the same x,
topk_idx and weights, timed the same way; both combines are first checked against a float64
reference (a wrong result raises on every rank, untimed). GB/s counts the payload rows: one
per (token, expert) each way.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref_fp8

from .harness import Row, format_table, write_json
from .stats import compare_across_ranks, steady_timing_process

# (tokens per rank, hidden, experts, top-k, payload): "fp8" sends rows the caller quantised,
# "bf16->fp8" passes bf16 x with use_fp8=True (quantised inside the dispatch, issue 18).
CPU_SHAPES = [(512, 2048, 32, 4, "bf16"), (256, 7168, 64, 8, "bf16"), (256, 7168, 64, 8, "fp8"),
              (256, 7168, 64, 8, "bf16->fp8")]
GPU_SHAPES = [(4096, 7168, 256, 8, "bf16"), (4096, 7168, 256, 8, "fp8"), (4096, 7168, 256, 8, "bf16->fp8")]


def timed(comm, fn, reps: int, device: torch.device, warmup: int = 3) -> float:
    """Median over reps of the slowest rank's wall time for fn() (a barrier before each; on a
    GPU each repetition ends synchronised). For one function alone; a comparison of two goes
    through bench.stats.compare_across_ranks."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    wall = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
    return statistics.median(np.max(np.array(comm.allgather(wall)), axis=0).tolist())


def routed_inputs(rank: int, device: torch.device, tokens: int, hidden: int, experts: int, k: int):
    """This rank's x [T, H] bf16, topk_idx [T, k] (k distinct experts per token) and weights
    [T, k], from a seed of the rank: what every row of this module sends."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)
    w = torch.rand(tokens, k, generator=g).to(device)
    return x, idx, w


def ipc_buffer(comm, device: torch.device, tokens: int, hidden: int, experts: int, k: int, **kw):
    return fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts, transport="ipc",
                          max_tokens_per_rank=tokens, max_topk=k, device=device, **kw)


def engine_scope(device: torch.device, transport: str):
    """(engine name, context to run the calls in): the ipc kernels of CPU tensors run on the
    simulator; the host transport of CPU tensors runs no kernel."""
    if device.type == "cuda":
        return "cuda", contextlib.nullcontext()
    if transport == "ipc":
        return "sim", fmo.use_backend("sim")
    return fmo.backends.cpu_engine(), contextlib.nullcontext()


def run_shape(comm, device: torch.device, tokens: int, hidden: int, experts: int, k: int, payload: str,
              max_seconds: float, transport: str = "host", ceiling: float = 0.0) -> Row:
    rank, world = comm.Get_rank(), comm.Get_size()
    x, idx, w = routed_inputs(rank, device, tokens, hidden, experts, k)
    # Quantised where the rows are: on a GPU by the kernel, not by the CPU engine (the simulator).
    xin = fmo.fp8.quantize_per_token_group(x, 128) if payload == "fp8" else x
    fp8_on_wire = payload in ("fp8", "bf16->fp8")
    dispatch_kw = {"use_fp8": True} if payload == "bf16->fp8" else {}
    if transport == "ipc":
        buf = ipc_buffer(comm, device, tokens, hidden, experts, k)
    else:
        buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=hidden, num_experts=experts)
    engine, scope = engine_scope(device, transport)

    with scope:
        recv_x, _, _, _, handle = buf.dispatch(xin, idx, w, **dispatch_kw)
        y = torch.ones(handle.num_recv, hidden, dtype=torch.bfloat16, device=device)

        def ours():
            _, _, _, _, h = buf.dispatch(xin, idx, w, **dispatch_kw)
            buf.combine(y, h)

        # The same bytes through raw Alltoallv: dispatch rows (payload + ids + weights), then combine rows.
        row_in = hidden * (1 if fp8_on_wire else 2) + (4 * -(-hidden // 128) if fp8_on_wire else 0) + 12 * k
        row_back = hidden * 2
        send_rows, recv_rows = np.array(handle.send_counts), np.array(handle.recv_counts)
        a_send = np.zeros(int(send_rows.sum()) * row_in, np.uint8)
        a_recv = np.zeros(int(recv_rows.sum()) * row_in, np.uint8)
        b_send = np.zeros(int(recv_rows.sum()) * row_back, np.uint8)
        b_recv = np.zeros(int(send_rows.sum()) * row_back, np.uint8)

        def spec(rows, width):
            counts = rows * width
            return (counts, np.concatenate(([0], np.cumsum(counts)[:-1])))

        def raw():
            from mpi4py import MPI

            comm.Alltoallv([a_send, spec(send_rows, row_in), MPI.BYTE], [a_recv, spec(recv_rows, row_in), MPI.BYTE])
            comm.Alltoallv([b_send, spec(recv_rows, row_back), MPI.BYTE], [b_recv, spec(send_rows, row_back), MPI.BYTE])

        # CPU seconds per call beside the wall time: they separate the work done from waiting
        # for a core or a peer on a machine whose cores the ranks share.
        cpu_ours, cpu_raw = [], []
        c = compare_across_ranks(comm, with_cpu_time(ours, cpu_ours), with_cpu_time(raw, cpu_raw), device=device,
                                 max_seconds=max_seconds)
    moved = sum(comm.allgather(a_send.size + b_send.size))
    buf.destroy()
    return Row.compared("moe_dispatch_combine", f"R{world} T{tokens} H{hidden} E{experts} k{k} {payload} {transport}", engine,
                        c, baseline="MPI Alltoallv x2 (same bytes)", bytes_moved=moved,
                        ceiling="device copy" if ceiling else "", ceiling_rate=ceiling,
                        extra={"cpu_s": _mean_over_ranks(comm, cpu_ours), "baseline_cpu_s": _mean_over_ranks(comm, cpu_raw)})


def with_cpu_time(fn, seconds: list):
    """fn, appending the CPU time of each call to `seconds`."""
    def run():
        c0 = time.process_time()
        fn()
        seconds.append(time.process_time() - c0)
    return run


def _mean_over_ranks(comm, seconds: list) -> float:
    """The ranks' mean of their median CPU time per call."""
    return comm.allreduce(statistics.median(seconds)) / comm.Get_size()


# --- low-latency (decode) dispatch + combine against the normal ipc mode of the same inputs ---

# (tokens per rank, hidden, experts, top-k, payload): DeepSeek-V3 decode on a GPU; on the CPU the
# simulator over shared memory is slow, so a small shape.
LL_CPU_SHAPES = [(16, 256, 16, 4, "bf16"), (16, 256, 16, 4, "bf16->fp8")]
LL_GPU_SHAPES = [(128, 7168, 256, 8, "bf16"), (128, 7168, 256, 8, "bf16->fp8")]
FP8_GROUP = 128


def expert_scale(experts) -> torch.Tensor:
    """The stand-in expert e multiplies its rows by (-1)^e * 2^(e % 7 - 3): exact in bf16 (a power
    of two), and any two experts closer than 14 apart differ in sign or by 2x at least, so a row
    summed under the wrong expert (or a wrong token's row) fails the check below."""
    e = experts.double()
    return (1 - 2 * torch.remainder(e, 2)) * torch.pow(2.0, torch.remainder(e, 7) - 3)


def sent_rows(x, use_fp8: bool) -> torch.Tensor:
    """The float64 value of x's rows as they travel: x, or its e4m3 codes times their scales
    (use_fp8 quantises inside the dispatch, bit for bit quantize_per_token_group)."""
    if not use_fp8:
        return x.double()
    if isinstance(x, torch.Tensor):
        x = ref_fp8.quantize_per_token_group(x, FP8_GROUP)
    xq, xs = x
    flat = ref_fp8.dequantize_per_token_group(xq.reshape(-1, xq.shape[-1]), xs.reshape(-1, xs.shape[-1]), FP8_GROUP)
    return flat.reshape(xq.shape)


def expert_output(rows: torch.Tensor, experts) -> torch.Tensor:
    """bf16(rows * expert_scale(e)): what expert e returns for a received row (float64 rows)."""
    return (rows * expert_scale(experts)[..., None]).to(torch.bfloat16)


def normal_mode_y(recv_x, recv_idx, recv_w, use_fp8: bool, first_expert: int) -> torch.Tensor:
    """The normal mode's y [N, H] bf16, one row per received token: its weighted sum over this
    rank's experts (local ids in recv_idx, -1 elsewhere), rounded once to bf16."""
    experts = recv_idx.clamp(min=0) + first_expert
    terms = recv_w.double()[..., None] * expert_output(sent_rows(recv_x, use_fp8)[:, None, :], experts).double()
    return (terms * (recv_idx >= 0)[..., None]).sum(1).to(torch.bfloat16)


def masked_y(recv, masked_m, use_fp8: bool, first_expert: int) -> torch.Tensor:
    """The low-latency y [E_local, R*M, H] bf16: local expert e's output for each of its
    masked_m[e] rows; the rows past masked_m are NaN, so a combine that read one fails the check.
    Expert by expert (the float64 rows of the whole layout would be 2 GB at the GPU shape)."""
    xq = recv[0] if use_fp8 else recv
    y = torch.full(xq.shape, float("nan"), dtype=torch.bfloat16, device=xq.device)
    for e, m in enumerate(masked_m.tolist()):
        rows = (recv[0][e, :m], recv[1][e, :m]) if use_fp8 else recv[e, :m]
        y[e, :m] = expert_output(sent_rows(rows, use_fp8), torch.tensor(first_expert + e, device=xq.device))
    return y


def check_low_latency_combine(comm, outs: dict, x, idx, w, use_fp8: bool) -> None:
    """Every rank: each combine output (name -> [T, H]) against the float64 weighted sum of the
    expert outputs, sum_j w[t, j] * bf16(x[t] * s(e_j)); raise on every rank if any is off.
    Bound: the low-latency combine rounds each fp32 product (2^-24) and its fp32 sum once to
    bf16 (2^-8 of |out|); the normal mode rounds each rank's partial sum to bf16 (2^-8 of
    |partial|) and the sum of partials again (2^-8): at most 2^-7 of sum_j |w y_j|, per element.
    NaN fails (a comparison with NaN is false)."""
    terms = w.double()[..., None] * expert_output(sent_rows(x, use_fp8)[:, None, :], idx).double()
    exact, bound = terms.sum(1), terms.abs().sum(1) * 2.0 ** -7 * 1.001
    bad = []
    for name, out in outs.items():
        err = (out.double() - exact).abs()
        if out.shape != exact.shape or not bool((err <= bound).all()):
            worst = float(torch.nan_to_num((err - bound), nan=float("inf")).max()) if out.shape == exact.shape else "shape"
            bad.append(f"{name} (worst excess over the bound {worst})")
    failures = [(r, b) for r, b in enumerate(comm.allgather(bad)) if b]
    if failures:
        raise RuntimeError("moe_low_latency: combine output differs from the float64 reference: "
                           + "; ".join(f"rank {r}: {', '.join(b)}" for r, b in failures))


def run_low_latency(comm, device: torch.device, tokens: int, hidden: int, experts: int, k: int, payload: str,
                    max_seconds: float, ceiling: float = 0.0) -> Row:
    """One low_latency_dispatch + low_latency_combine (masked layout out, y back in it) against
    the normal ipc dispatch + combine of the same x, topk_idx and weights on the same Buffer,
    both checked against the float64 reference once before any timing."""
    rank, world = comm.Get_rank(), comm.Get_size()
    x, idx, w = routed_inputs(rank, device, tokens, hidden, experts, k)
    use_fp8 = payload == "bf16->fp8"
    buf = ipc_buffer(comm, device, tokens, hidden, experts, k, low_latency=True)
    per = experts // world
    engine, scope = engine_scope(device, "ipc")
    try:
        with scope:
            recv_x, recv_idx, recv_w, _, handle = buf.dispatch(x, idx, w, use_fp8=use_fp8)
            y = normal_mode_y(recv_x, recv_idx, recv_w, use_fp8, first_expert=rank * per)
            recv_ll, masked_m, ll_handle = buf.low_latency_dispatch(x, idx, w, use_fp8=use_fp8)
            y_ll = masked_y(recv_ll, masked_m, use_fp8, first_expert=rank * per)
            outs = {"low_latency_combine": buf.low_latency_combine(y_ll, ll_handle), "combine": buf.combine(y, handle)}
            check_low_latency_combine(comm, outs, x, idx, w, use_fp8)

            def low_latency():
                _, _, h = buf.low_latency_dispatch(x, idx, w, use_fp8=use_fp8)
                buf.low_latency_combine(y_ll, h)

            def normal():
                _, _, _, _, h = buf.dispatch(x, idx, w, use_fp8=use_fp8)
                buf.combine(y, h)

            cpu_ours, cpu_normal = [], []
            c = compare_across_ranks(comm, with_cpu_time(low_latency, cpu_ours), with_cpu_time(normal, cpu_normal),
                                     device=device, max_seconds=max_seconds)
    finally:   # also when the check raises (on every rank alike)
        buf.destroy()
    # The payload the ranks send: a row per (token, expert) each way, e4m3 codes and their scales
    # with use_fp8 (weights stay with the sender, which applies them in the combine).
    row_in = hidden + 4 * -(-hidden // FP8_GROUP) if use_fp8 else 2 * hidden
    moved = comm.allreduce(tokens * k * (row_in + 2 * hidden))
    return Row.compared("moe_low_latency", f"R{world} T{tokens} H{hidden} E{experts} k{k} {payload} ipc", engine, c,
                        baseline="normal ipc dispatch+combine (same inputs)", bytes_moved=moved,
                        ceiling="device copy" if ceiling else "", ceiling_rate=ceiling,
                        extra={"cpu_s": _mean_over_ranks(comm, cpu_ours), "baseline_cpu_s": _mean_over_ranks(comm, cpu_normal)})


def _done(comm, row: Row) -> None:
    if comm.Get_rank() == 0:
        print(f"done: {row.op} {row.shape} {row.engine}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from mpi4py import MPI

    p = argparse.ArgumentParser(prog="mpirun -n 4 python -m bench.bench_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the first shape only, fewer repetitions")
    p.add_argument("--cpu", action="store_true", help="CPU tensors even where a GPU is available")
    p.add_argument("--no-ipc", action="store_true", help="skip the transport='ipc' rows")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="timing budget per row (default 20 s, 8 s with --quick; bench.stats.compare_across_ranks)")
    p.add_argument("--json", type=Path, help="write the rows and the environment to this file (rank 0)")
    args = p.parse_args(argv)
    steady_timing_process(across_ranks=True)
    comm = MPI.COMM_WORLD
    gpu = not args.cpu and torch.cuda.is_available() and "cuda" in fmo.available_backends()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    shapes = shapes[:1] if args.quick else shapes
    max_seconds = args.max_seconds or (8.0 if args.quick else 20.0)
    runs = [(shape, "host") for shape in shapes]
    if not args.no_ipc and (gpu or "sim" in fmo.available_backends()):
        runs += [(shape, "ipc") for shape in (shapes if gpu else shapes[:1])]   # the simulator is slow
    low_latency = []
    if not args.no_ipc and (gpu or "sim" in fmo.available_backends()):
        low_latency = LL_GPU_SHAPES if gpu else LL_CPU_SHAPES
        low_latency = low_latency[:1] if args.quick else low_latency
    from .__main__ import copy_bandwidth_gbps   # the suite's measurement (imported late: it imports this module)

    ceiling = copy_bandwidth_gbps(device) * 1e9   # bytes/s; 0 on the CPU
    rows = []
    for shape, transport in runs:
        rows.append(run_shape(comm, device, *shape, max_seconds=max_seconds, transport=transport, ceiling=ceiling))
        _done(comm, rows[-1])
    for shape in low_latency:
        rows.append(run_low_latency(comm, device, *shape, max_seconds=max_seconds, ceiling=ceiling))
        _done(comm, rows[-1])
    if comm.Get_rank() == 0:
        if gpu:
            print(f"{comm.Get_size()} ranks, CUDA tensors on {torch.cuda.get_device_name(device)}; device copy bandwidth "
                  f"(measured now): {ceiling / 1e9:.0f} GB/s. host rows: staged through pinned memory; ipc rows: CUDA IPC.")
        else:
            print(f"{comm.Get_size()} ranks, CPU tensors: host rows pack and sum on the CPU (what users run); the ipc rows "
                  "run the intra-node transport kernels on the simulator over shared memory (simulator speed, not GPU "
                  "speed). Speedup < 1: slower than the baseline (the raw Alltoallv; for moe_low_latency the normal ipc "
                  "mode); 0.67x is 1.5x slower.")
        print(format_table(rows))
        print("CPU time per rank and call (median; the rest of the wall time is waiting for a core or a peer):")
        for r in rows:
            print(f"  {r.op:<21} {r.shape:<34} {r.engine:<9} ours {r.extra['cpu_s'] * 1e3:8.2f} ms   "
                  f"baseline {r.extra['baseline_cpu_s'] * 1e3:8.2f} ms")
        if args.json:
            write_json(args.json, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
