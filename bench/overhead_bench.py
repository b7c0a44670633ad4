"""Host time per call of every public op, side by side with a PyTorch elementwise op of the
same input in the same process: the target is ours / torch <= 1 (the library launches like
a built-in op).

    python -m bench.overhead_bench [--engine cuda|sim|reference] [--calls N]
    python -m pytest bench/overhead_bench.py --benchmark-only -q   # the FP8 quantiser alone, pytest-benchmark

What is timed, per engine (decode-sized inputs: at MoE decode sizes every op is this small):
- cuda: N warm calls back to back, one synchronisation at the end, divided by N: the host
  time per call (the kernels, microseconds each, run under it). torch.abs the same way.
- sim: the whole public call with the simulator's kernel execution skipped (its loaded
  function replaced by a no-op after the real lookup, and no memory-check ranges computed):
  validation, engine choice, output allocation, heuristics, Params, the function lookup:
  what the cuda engine does on the host but reading the current stream and cuLaunchKernel.
  A warm call takes the fast launch path (runtime/fast_launch.py) as it would on a GPU: its
  signature looked up, outputs allocated and Params patched in C++, then the launch handed
  to the simulator's hook, which is the no-op here (where the cuda engine calls
  cuLaunchKernel). The outputs are then garbage: this times, it does not check.
  torch.abs runs its (CPU) kernel, so the ratio is pessimistic for us.
- reference: the whole public call (PyTorch ops: several per FP8 op, so above 1 by nature).
`python -m bench` adds these rows ("host_time_per_call", area "host") to its table, each
engine measured in a fresh process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import fp8_quant
from fastmoe_ops.reference import fp8 as ref
from fastmoe_ops.runtime import fast_launch, launch

BASELINE = "torch.abs (same input)"
SAMPLE_S = 0.02    # the longest timed sample (a batch of calls) aimed at
PROBE_CALLS = 10   # calls timed once to size the batches


def _bf16(*shape, device):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g).to(torch.bfloat16).to(device)


def cases(device):
    """name -> (shape label, our call, the torch op of the same input). Inputs are made once."""
    x = _bf16(1, 128, device=device)                      # one decode token, one 128-group
    w = _bf16(128, 128, device=device)
    xq, xs = (t.to(device) for t in ref.quantize_per_token_group(x.cpu().float()))
    wq, ws = (t.to(device) for t in ref.quantize_per_block(w.cpu().float()))
    wq3, ws3 = torch.stack([wq, wq]), torch.stack([ws, ws])
    xq_c, xs_c = xq.expand(128, 128).contiguous(), xs.expand(128, 1).contiguous()
    m_indices = torch.tensor([0] * 1 + [-1] * 127, dtype=torch.int32, device=device)
    xq3, xs3 = xq_c[:32].view(2, 16, 128), xs_c[:32].view(2, 16, 1)
    masked_m = torch.tensor([1, 0], dtype=torch.int32, device=device)
    q, k, v = _bf16(1, 1, 8, 128, device=device), _bf16(1, 128, 1, 128, device=device), _bf16(1, 128, 1, 128, device=device)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 64, 128], dtype=torch.int32, device=device)
    torch.manual_seed(0)
    linear = fmo.nn.FP8Linear(128, 128, device=device).requires_grad_(False)  # inference: no autograd node
    moe = fmo.nn.MoELayer(128, 128, 8, 2, num_worst_tokens=8, dtype=torch.bfloat16, device=device).requires_grad_(False)
    k1, v1 = k[0], v[0]
    q2 = _bf16(2, 8, 128, device=device)
    return {
        "fp8.quantize_per_token_group": ("1x128 bf16", lambda: fmo.fp8.quantize_per_token_group(x), x.abs),
        "fp8.quantize_per_block": ("128x128 bf16", lambda: fmo.fp8.quantize_per_block(w), w.abs),
        "fp8.quantize_per_token_group_transposed": ("128x128 bf16", lambda: fmo.fp8.quantize_per_token_group_transposed(w), w.abs),
        "fp8.gemm": ("1x128x128", lambda: fmo.fp8.gemm(xq, xs, wq, ws), x.abs),
        "fp8.grouped_gemm_contiguous": ("G2 128x128x128", lambda: fmo.fp8.grouped_gemm_contiguous(xq_c, xs_c, wq3, ws3, m_indices), w.abs),
        "fp8.grouped_gemm_masked": ("G2 16x128x128", lambda: fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m), x.abs),
        "flash_attn": ("B1 Sq1 Sk128 H8/1 D128", lambda: fmo.flash_attn(q, k, v, causal=True), q.abs),
        "flash_attn_varlen": ("2 seqs q1 k64 H8/1 D128", lambda: fmo.flash_attn_varlen(q2, k1, v1, cu_q, cu_k, 1, 64, causal=True), q2.abs),
        "nn.FP8Linear": ("1x128 -> 128", lambda: linear(x), x.abs),
        "nn.MoELayer[num_worst_tokens]": ("1x128, E8 top2", lambda: moe(x), x.abs),
    }


@contextlib.contextmanager
def sim_kernels_skipped():
    """The sim engine with each kernel's execution replaced by a no-op (after the real lookup
    of its loaded function): what remains of a call is its host path."""
    real = launch.sim_function
    stubs = {}

    class Skipped:
        __slots__ = ("num_params",)

        def __init__(self, fn):
            self.num_params = fn.num_params

        def __call__(self, *args, **kwargs):
            return None

    def sim_function(spec, traced=False):
        fn = real(spec, traced)
        stub = stubs.get(fn)
        if stub is None:
            stub = stubs[fn] = Skipped(fn)
        return stub

    real_span = launch.tensor_span
    launch.sim_function = sim_function
    launch.tensor_span = _no_span  # the simulator's memory-check ranges: sim-only bookkeeping
    try:
        with fast_launch.sim_launch_replaced(_no_launch):  # a fast-path hit's launch: a no-op too
            yield
    finally:
        launch.sim_function, launch.tensor_span = real, real_span


def _no_span(t):
    return None


def _no_launch(target, params, tensors):
    return None


def batch_of(fn, calls: int, device):
    """fn called `calls` times back to back, then one synchronisation: one timed sample."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        for _ in range(calls):
            fn()
        sync()
    return run


def measure(device, engine: str, calls: int = 2000, only=None, max_seconds: float = 2.0):
    """[(op, shape, Comparison per call)] for every case: batches of ours and of torch.abs
    interleaved by bench.stats.compare (same process, same moment: machine noise hits both),
    timed on the host clock (what is measured is host time, so never CUDA events). Inside
    bench.stats.spread_over_run (as main() runs it) each is a PendingComparison, timed in rounds
    over every op when the context closes: so each closure enters its engine itself."""
    from bench.stats import compare

    def engine_ctx():
        return contextlib.nullcontext() if engine == "cuda" else fmo.use_backend(engine)

    skip = sim_kernels_skipped if engine == "sim" else contextlib.nullcontext

    def one(name, shape, ours, theirs):   # a function per op: each row's closures keep their own op
        with engine_ctx():
            ours()  # compile and load outside the timing (the simulator runs it once, for real)

        def ours_skipping_kernels():   # reads ours_batch when called: the probe's, then the sized one
            with engine_ctx(), skip():
                ours_batch()

        # Calls per sample: up to `calls`, but a sample of about SAMPLE_S at most, so every
        # round's slice still holds its MIN_PAIRS pairs in time (the MoE layer's host path is
        # ~0.7 ms a call: 2000 calls a sample made its four slices alone last 90 s).
        ours_batch = batch_of(ours, PROBE_CALLS, device)
        start = time.perf_counter()
        ours_skipping_kernels()
        per_call = (time.perf_counter() - start) / PROBE_CALLS
        n = max(PROBE_CALLS, min(calls, int(SAMPLE_S / max(per_call, 1e-9))))
        ours_batch, theirs_batch = batch_of(ours, n, device), batch_of(theirs, n, device)

        c = compare(ours_skipping_kernels, theirs_batch, device=torch.device("cpu"), max_seconds=max_seconds,
                    warmup=1)
        return name, shape, c.per_call(n)

    with engine_ctx():
        items = cases(device)
    return [one(name, shape, ours, theirs) for name, (shape, ours, theirs) in items.items() if not only or name in only]


def rows(device, engine: str, calls: int = 2000, max_seconds: float = 2.0):
    """The measurements as bench harness rows: op "host_time_per_call", the public op in the
    shape column; speedup = torch / ours (target >= 1, i.e. ours / torch <= 1)."""
    from bench.harness import Row

    return [Row.compared("host_time_per_call", f"{name} {shape}", engine, c, baseline=BASELINE)
            for name, shape, c in measure(device, engine, calls, max_seconds=max_seconds)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["cuda", "sim", "reference"], action="append",
                   help="default: cuda on a GPU, else sim and reference")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--max-seconds", type=float, default=2.0, help="timing budget per op (bench.stats.compare)")
    p.add_argument("--json", type=Path, help="also write the rows here (a list of harness Row fields)")
    args = p.parse_args(argv)
    from bench.stats import spread_over_run, steady_timing_process

    steady_timing_process(across_ranks=False)
    on_gpu = torch.cuda.is_available() and "cuda" in fmo.available_backends()
    engines = args.engine or (["cuda"] if on_gpu else [e for e in ("sim", "reference") if e in fmo.available_backends()])
    out = []
    # Every op of every engine registered, then timed in rounds over all of them (the slow noise
    # of a CPU lasts seconds to tens of seconds: one 2 s window per op left two runs apart).
    with spread_over_run(report=lambda msg: None):
        for engine in engines:
            out += rows(torch.device("cuda" if engine == "cuda" else "cpu"), engine, args.calls, args.max_seconds)
    print(f"{'op':<42} {'shape':<26} {'engine':<10} {'ours':>9} {'torch.abs':>10} {'ours/torch':>10}")
    for r in out:
        name, shape = r.shape.split(" ", 1)
        print(f"{name:<42} {shape:<26} {r.engine:<10} {r.ours_s * 1e6:>7.2f}us {r.baseline_s * 1e6:>8.2f}us "
              f"{r.ours_s / r.baseline_s:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in out], indent=1))
    return 0


def run(device, engine: str, quick: bool, ceiling: float = 0.0):
    """The bench area "host" (python -m bench): this engine's rows, from a fresh process. On a
    GPU it runs inside the one-shot check's time limit: 500 calls, at most 30 s."""
    if engine == "cuda":
        return rows_in_subprocess([engine], calls=500, timeout_s=30.0)
    return rows_in_subprocess([engine], calls=500 if quick else 2000)


def rows_in_subprocess(engines, calls: int = 2000, timeout_s: float = 300.0, max_seconds: float = 2.0):
    """rows() for each engine, measured in a fresh process (inside a process that holds every
    benchmark's tensors and threads, host times read about 1.5x higher) -> harness Rows."""
    import subprocess
    import tempfile

    from bench.harness import Row

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "bench.overhead_bench", "--calls", str(calls), "--max-seconds", str(max_seconds),
               "--json", str(path)]
        for engine in engines:
            cmd += ["--engine", engine]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"host time per call benchmark: no rows, it ran past {timeout_s:.0f} s ({' '.join(cmd[1:])})")
            return []
        if proc.returncode != 0 or not path.exists():
            print(f"host time per call benchmark failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            return []
        return [Row(**r) for r in json.loads(path.read_text())]


# ------------------------------------------------------------------- pytest-benchmark


def _host_path(x: torch.Tensor, engine: str):
    """The FP8 quantiser's host path, stopped before the kernel: validation (cached per
    shape), engine choice, output allocation, Params, then the loaded-function lookup."""
    _, plan, _, _ = fp8_quant.prepare_quantize_per_token_group(x, 128, False, 1e-12)
    if plan is not None:
        launch.lookup(plan.spec, engine, x.device)  # warm: one dictionary lookup
    return plan


def test_fp8_quant_host_overhead(benchmark):
    x = torch.randn(64, 1024).to(torch.bfloat16)
    if torch.cuda.is_available() and "cuda" in fmo.available_backends():
        x, engine = x.cuda(), "cuda"  # the GPU path: CUDA tensors, the loaded-cubin lookup
    else:
        engine = "sim" if "sim" in fmo.available_backends() else "reference"
    with fmo.use_backend(engine) if engine != "cuda" else contextlib.nullcontext():
        if engine != "reference":
            _host_path(x, engine).run(engine)  # compile and load outside the timing
        benchmark.extra_info["engine"] = engine
        benchmark(_host_path, x, engine)


if __name__ == "__main__":
    sys.exit(main())
