"""fmo.nn.MoELayer: one training step with the two-micro-batch overlap against the same layer
run sequentially, the compute slowdown from reserving N SMs, and the overlapped fraction.

    mpirun -n 4 python -m bench.bench_moe_layer [--quick] [--json FILE] [--plot DIR]   # CPU tensors
    mpirun -n 8 python -m bench.bench_moe_layer --json out/moe_layer.json       # one GPU, 8 ranks

Rows (one line per configuration, rank 0 prints):
  moe_layer_step     forward + backward of the layer as users get it (overlap='auto', the
                     default) against the same layer with overlap=False, interleaved
                     (bench.stats.compare_across_ranks: a barrier before each call, a call's
                     time the slowest rank's; pairs until the ratio's 95% interval is within 5%
                     or a time cap). On CPU transports 'auto' runs sequentially, so this row
                     must read "within noise".
  moe_layer_overlap  the same with overlap=True (the two-micro-batch schedule forced): what
                     'auto' picks on the ipc transport with CUDA tensors. `saved_over_comm` in
                     extra = (t_seq - t_overlap) / t_comm, t_comm the step's dispatch + combine
                     (and their backward) alone; `traced` = trace.overlapped_fraction of one step
                     under FMO_TRACE=1 (CPU: comm and compute share a clock).
  moe_experts_sms    (GPU only) the expert computation alone (grouped FP8 GEMMs, forward + backward) on
                     rank 0 while N SMs are reserved for communication (fmo.comm_sms(N) with
                     communication in flight: persistent compute grids get num_sms - N), N in
                     {0, 8, 16, 20, 24, 32}; baseline N = 0; `slowdown` = t(N) / t(0).
On a GPU every rank uses device 0 (ranks sharing one GPU, as CUDA IPC allows); on a CPU the
`sim` engine runs the kernels' own source on the simulator: simulator speed, not GPU speed,
and the moe_experts_sms rows there only reflect the smaller persistent grids (the simulator
does not model SM contention) plus the noise of shared cores.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

import torch

import fastmoe_ops as fmo
from fastmoe_ops.budget import communication_in_flight

from . import bench_moe
from .harness import Row, speedup_text, format_table, write_json
from .stats import compare_across_ranks, steady_timing_process

# (tokens per rank, hidden, intermediate, experts, top-k)
CPU_SHAPES = [(64, 256, 256, 8, 2), (128, 512, 256, 16, 4)]
GPU_SHAPES = [(2048, 4096, 1536, 64, 8), (4096, 7168, 2048, 64, 8)]
RESERVED_SMS = (0, 8, 16, 20, 24, 32)


def timed(comm, fn, reps: int, device) -> float:
    """Median over reps of the slowest rank's wall time of fn() (bench_moe.timed, one warm-up)."""
    return bench_moe.timed(comm, fn, reps, device, warmup=1)


def make_layer(group, shape, overlap, device, transport):
    tokens, hidden, inter, experts, k = shape
    torch.manual_seed(0)   # same weights on every rank
    extra = dict(transport="ipc", max_tokens_per_rank=tokens) if transport == "ipc" else {}
    return fmo.nn.MoELayer(hidden, inter, experts, k, group=group, overlap=overlap, dtype=torch.bfloat16,
                           device=device, **extra)


def layer_rows(comm, group, shape, engine, device, transport, max_seconds, plot_dir=None) -> list[Row]:
    """Two rows against the same layer run sequentially (overlap=False), each interleaved with
    it (bench.stats.compare_across_ranks): the default (overlap='auto': what users get) and the
    forced two-micro-batch overlap (overlap=True: what 'auto' chooses on the ipc transport with
    CUDA tensors)."""
    tokens, hidden, inter, experts, k = shape
    rank, world = comm.Get_rank(), comm.Get_size()
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device).requires_grad_()
    dy = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
    layers = {mode: make_layer(group, shape, mode, device, transport) for mode in (False, "auto", True)}

    def step_of(layer):
        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)
        return step

    seq = step_of(layers[False])
    t_comm = comm_time(comm, layers[False], x, dy, 3, device)
    flops = 3 * 2 * 3 * hidden * inter * k * sum(comm.allgather(tokens))   # fwd 3 GEMMs (2I, I widths), bwd 2x
    name = f"R{world} T{tokens} H{hidden} I{inter} E{experts} k{k} {transport}"
    rows = []
    for mode, op in (("auto", "moe_layer_step"), (True, "moe_layer_overlap")):
        c = compare_across_ranks(comm, step_of(layers[mode]), seq, device=device, max_seconds=max_seconds)
        traced = None
        if mode is True and device.type == "cpu" and group is not None:   # one process: nothing to overlap with
            plot = plot_dir / f"moe_layer_timeline_T{tokens}_H{hidden}.png" if plot_dir is not None else None
            traced = traced_fraction(comm, step_of(layers[True]), plot)
        overlapped = layers[mode].overlaps(device)
        rows.append(Row.compared(op, f"{name} overlap={mode}", engine, c, baseline="same layer, overlap=False", flops=flops,
                                 extra={"comm_s": t_comm, "overlapped": overlapped, "traced": traced,
                                        "saved_over_comm": (c.base_s - c.ours_s) / t_comm if t_comm else None}))
    for layer in layers.values():
        layer.destroy()
    return rows


def comm_time(comm, layer, x, dy, reps, device) -> float:
    """The step's communication alone: dispatch + combine of the same routing (identity
    experts) and their backward."""
    if layer.buffer is None:
        return 0.0
    idx, w = layer.route(x.detach())
    w = w.detach().requires_grad_()

    def step():
        recv_x, _, recv_w, _, handle = layer.buffer.dispatch(x, idx, w)
        out = layer.buffer.combine(recv_x * recv_w.sum(1, keepdim=True).to(recv_x.dtype), handle)
        out.backward(dy)

    return timed(comm, step, reps, device)


def traced_fraction(comm, step, plot_path=None):
    """overlapped_fraction of one traced step (FMO_TRACE is a codegen variable: the traced
    kernel variants compile once, then come from the cache); rank 0 draws its timeline to
    plot_path when given."""
    import fastmoe_ops.trace as ft

    previous = os.environ.get("FMO_TRACE")
    os.environ["FMO_TRACE"] = "1"
    try:
        step()
        comm.Barrier()
        ft.clear()
        step()
        ivs = ft.collect()
        ft.clear()
        if plot_path is not None and comm.Get_rank() == 0:
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            ft.plot_timeline(ivs, plot_path)
        fracs = comm.allgather(ft.overlapped_fraction(ivs, "comm", "compute"))
        return statistics.median(fracs)
    finally:
        if previous is None:
            os.environ.pop("FMO_TRACE", None)
        else:
            os.environ["FMO_TRACE"] = previous


def reserved_sms_rows(shape, engine, device, reps) -> list[Row]:
    """Rank 0 alone: the grouped experts' forward + backward under each SM reservation."""
    from fastmoe_ops.nn import moe_experts
    from fastmoe_ops.timing import time_fn

    tokens, hidden, inter, experts, k = shape
    g = torch.Generator().manual_seed(5)
    local = max(1, experts // 4)
    recv_x = torch.randn(tokens * k, hidden, generator=g).to(torch.bfloat16).to(device)
    idx = torch.randint(0, local, (tokens * k, 1), generator=g).to(device)
    w13 = (torch.randn(local, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(torch.bfloat16).to(device).requires_grad_()
    w2 = (torch.randn(local, hidden, inter, generator=g) / inter ** 0.5).to(torch.bfloat16).to(device).requires_grad_()
    xs, pmap = fmo.moe.permute(recv_x, idx, local, alignment=fmo.fp8.contiguous_alignment())
    xs = xs.detach().requires_grad_()
    fp8 = moe_experts.quantize_expert_weights(w13), moe_experts.quantize_expert_weights(w2)
    dy = torch.randn(xs.shape, generator=g).to(torch.bfloat16).to(device)

    def run():
        moe_experts.grouped_experts(xs, pmap, w13, w2, *fp8).backward(dy)

    times = {}
    for n in RESERVED_SMS:
        ctx = contextlib.ExitStack()
        if n:
            ctx.enter_context(fmo.comm_sms(n))
            ctx.enter_context(communication_in_flight())
        with ctx:
            times[n] = time_fn(run, device=device, reps=reps, warmup=1).median_s
    m = xs.shape[0]
    flops = 3 * 2 * 3 * hidden * inter * m
    return [Row(op="moe_experts_sms", shape=f"N={n} M{m} H{hidden} I{inter} E{local}", engine=engine, ours_s=times[n],
                baseline="N=0 (no SMs reserved)", baseline_s=times[0], flops=flops,
                extra={"reserved_sms": n, "slowdown": times[n] / times[0]}) for n in RESERVED_SMS]


def main(argv=None) -> int:
    from mpi4py import MPI

    p = argparse.ArgumentParser(prog="mpirun -n 4 python -m bench.bench_moe_layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the first shape only, fewer repetitions")
    p.add_argument("--engine", choices=["sim", "reference"], default=None, help="CPU engine (default: sim where built)")
    p.add_argument("--transport", choices=["host", "ipc"], default="host", help="Buffer transport (ipc: CUDA IPC on a GPU, the sim engine over shared memory on a CPU)")
    p.add_argument("--json", type=Path, help="write the rows and the environment to this file (rank 0)")
    p.add_argument("--plot", type=Path, help="directory: rank 0's traced timeline per shape (CPU runs)")
    args = p.parse_args(argv)
    steady_timing_process(across_ranks=True)
    comm = MPI.COMM_WORLD
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")   # every rank on device 0
    if cuda:
        torch.cuda.set_device(0)
    engine = "cuda" if cuda else (args.engine or ("sim" if "sim" in fmo.available_backends() else "reference"))
    shapes = (GPU_SHAPES if cuda else CPU_SHAPES)[: 1 if args.quick else None]
    reps = (10 if cuda else 3) if args.quick else (20 if cuda else 5)
    group = fmo.comm.Group(comm) if comm.Get_size() > 1 else None
    rank0 = comm.Get_rank() == 0
    rows = []
    backend = fmo.use_backend(engine) if not cuda else contextlib.nullcontext()
    with backend:
        for shape in shapes:
            rows += layer_rows(comm, group, shape, engine, device, args.transport, 8.0 if args.quick else 20.0, args.plot)
            if rank0:
                for r in rows[-2:]:
                    traced = f", traced overlap {r.extra['traced']:.2f}" if r.extra["traced"] is not None else ""
                    print(f"{r.op} {r.shape} [{engine}]: {'overlapped' if r.extra['overlapped'] else 'sequential'} "
                          f"{r.ours_s * 1e3:.2f} ms vs overlap=False {r.baseline_s * 1e3:.2f} ms: {speedup_text(r)} "
                          f"(comm alone {r.extra['comm_s'] * 1e3:.2f} ms{traced})", flush=True)
            comm.Barrier()
            if rank0 and cuda:   # the simulator does not model SM contention: on a CPU these rows only measured noise
                for r in reserved_sms_rows(shape, engine, device, reps):
                    rows.append(r)
                    print(f"{r.op:<16} {r.shape:<36} {engine:<9} {r.ours_s * 1e3:9.2f} ms  slowdown vs N=0 "
                          f"{r.extra['slowdown']:5.3f}x", flush=True)
            comm.Barrier()
    if rank0:
        print(format_table(rows))
        if args.json:
            write_json(args.json, rows, device, {"ranks": comm.Get_size(), "transport": args.transport})
    if group is not None:
        comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
