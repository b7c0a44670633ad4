"""FP8 benchmarks. Quantisation: our kernel against the same computation in PyTorch ops
(what a user would write), same inputs, same run; GB/s of bytes actually moved.
GEMM (dense, grouped contiguous, masked): TFLOP/s (2 M N K per problem). On a GPU the
baseline is torch._scaled_mm on the same e4m3 operands (blockwise 1x128 / 128x128 scales
where the installed torch takes them, else rowwise) and the ceiling is _scaled_mm's rate on
an 8192^3 problem measured in the same run; the bf16 torch.matmul time rides in `extra`.
Grouped rows: on a GPU the baseline is the fastest torch alternative measured in the same run
(per-expert bf16 torch.matmul, per-expert torch._scaled_mm, torch._scaled_grouped_mm where the
installed torch runs it: rowwise scales, it takes no block scales); each one's time rides in
`extra`. The SM-budget row (GPU only) times the dense GEMM with 20 SMs reserved for
communication against the same GEMM on every SM.
On the CPU: small shapes through `sim` / `reference` against torch.matmul in fp32 on the
dequantised operands (simulator throughput, not GPU speed).
The launcher picks the kernel by device (wgmma on sm_90a and in the simulator, mma.sync on
sm_89: fastmoe_ops.ops.fp8_gemm.kernel_for); `extra.kernel` names it, and on an sm_90a GPU
the dense rows also time the mma.sync kernel on the same operands (`extra.mma_sync_s`), and each
dense shape gets a second row, `fp8_gemm_tma_store_epilogue`: the wgmma kernel with its staged
TMA-store epilogue against the same kernel with the registers epilogue (bench.stats.compare,
interleaved, same operands and tile), so the GPU run decides fp8_gemm_config.DEFAULT_EPILOGUE."""
from __future__ import annotations

import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops import fp8_gemm as gemm_launcher
from fastmoe_ops.reference import fp8 as ref
from fastmoe_ops.timing import time_fn

from .stats import compare
from .harness import Row

GPU_SHAPES = [(128, 7168), (4096, 7168), (4096, 2048), (16384, 7168)]
CPU_SHAPES = [(16, 512), (64, 2048)]

# DeepSeek-V3 GEMMs (issue 15's targets): M tokens x (N x K) weights; grouped: (layout,
# experts, rows each, N, K): contiguous prefill and masked decode.
GPU_GEMM_SHAPES = [(m, n, k) for m in (128, 4096)
                   for n, k in ((2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048))]
GPU_GROUPED = [("contiguous", 8, 4096, 4096, 7168), ("masked", 4, 256, 4096, 7168)]
CPU_GEMM_SHAPES = [(64, 128, 256), (128, 256, 512)]
CPU_GROUPED = [("contiguous", 2, 128, 128, 256), ("masked", 2, 128, 128, 256)]  # rows: multiples of contiguous_alignment()
# GPU only: the dense GEMM with SMs reserved for communication against itself on every SM
# (target: time grows by at most num_sms / (num_sms - 20) plus 5%).
BUDGET_SHAPE, RESERVED_SMS = (4096, 4096, 7168), 20


def quant_bytes(m: int, k: int, elem: int, group: int = 128) -> int:
    return m * k * elem + m * k + m * (-(-k // group)) * 4


def quant_contract_mismatch(got, want) -> str:
    """'' when the kernel's (codes, scales) equal the reference's bit for bit (the contract
    of csrc/quant/fp8_scale.cuh, which the reference implements on this device too), else
    where they first differ."""
    for name, a, b in (("scales", got[1].view(torch.int32), want[1].view(torch.int32)),
                       ("codes", got[0].view(torch.uint8), want[0].view(torch.uint8))):
        if a.shape != b.shape:
            return f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        diff = (a != b).nonzero()
        if len(diff):
            i = tuple(diff[0].tolist())
            return f"{len(diff)} {name} differ, first at {i}: {a[i].item():#x} vs reference {b[i].item():#x}"
    return ""


def run(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list[Row]:
    """Quantisation rows, then the GEMM rows."""
    rows = (run_quant(device, engine, quick, copy_gbps) + run_quant_backward(device, engine, quick, copy_gbps)
            + run_swiglu_quant(device, engine, quick, copy_gbps))
    ceiling = fp8_ceiling_flops(device) if device.type == "cuda" else 0.0
    return rows + run_gemm(device, engine, quick, ceiling)


def run_quant(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list[Row]:
    rows = []
    shapes = (GPU_SHAPES[:2] if quick else GPU_SHAPES) if device.type == "cuda" else (CPU_SHAPES[:1] if quick else CPU_SHAPES)
    gen = torch.Generator(device=device).manual_seed(0)
    def one(m, k):  # a call per shape: its closures keep this shape's tensors (timed later: spread_over_run)
        x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)

        def ours():
            if engine == "cuda":
                return fmo.fp8.quantize_per_token_group(x, 128)
            with fmo.use_backend(engine):
                return fmo.fp8.quantize_per_token_group(x, 128)

        # Benchmarks print, tests assert: still, never time a wrong kernel.
        bad = quant_contract_mismatch(ours(), ref.quantize_per_token_group(x, 128))
        if bad:
            raise RuntimeError(f"fp8 quantisation ({engine}) disagrees with the reference at {m}x{k} ({bad}): not timing it")
        c = compare(ours, lambda: ref.quantize_per_token_group(x, 128), device=device, max_seconds=3.0 if quick else 5.0)
        rows.append(Row.compared("fp8_quant_token_group", f"{m}x{k} bf16", engine, c,
                                 baseline="torch ops (reference)", bytes_moved=quant_bytes(m, k, 2),
                        ceiling="device copy" if device.type == "cuda" else "", ceiling_rate=copy_gbps * 1e9))
    for m, k in shapes:
        one(m, k)
    return rows


def run_quant_backward(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list[Row]:
    """Per-block (weights) and transposed per-token-group (wgrad) quantisation, same checks."""
    rows = []
    shapes = (GPU_SHAPES[:2] if quick else GPU_SHAPES) if device.type == "cuda" else (CPU_SHAPES[:1] if quick else CPU_SHAPES)
    gen = torch.Generator(device=device).manual_seed(1)
    cases = (("fp8_quant_block", fmo.fp8.quantize_per_block, ref.quantize_per_block),
             ("fp8_quant_token_group_transposed", fmo.fp8.quantize_per_token_group_transposed,
              ref.quantize_per_token_group_transposed))
    def one(m, k):  # a call per shape: its closures keep this shape's tensors (timed later: spread_over_run)
        x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
        for op, fn, reffn in cases:
            def ours(fn=fn):
                if engine == "cuda":
                    return fn(x)
                with fmo.use_backend(engine):
                    return fn(x)

            got, want = ours(), reffn(x)
            bad = quant_contract_mismatch(got, want)
            if bad:
                raise RuntimeError(f"{op} ({engine}) disagrees with the reference at {m}x{k} ({bad}): not timing it")
            c = compare(ours, lambda reffn=reffn: reffn(x), device=device, max_seconds=3.0 if quick else 5.0)
            moved = m * k * 2 + got[0].numel() + got[1].numel() * 4
            rows.append(Row.compared(op, f"{m}x{k} bf16", engine, c,
                                     baseline="torch ops (reference)", bytes_moved=moved,
                            ceiling="device copy" if device.type == "cuda" else "", ceiling_rate=copy_gbps * 1e9))
    for m, k in shapes:
        one(m, k)
    return rows


def dequantised_mismatch(got, want, group: int = 128) -> str:
    """'' when two (codes, scales) pairs dequantise to within one e4m3 step of their group's
    largest value (32 / 448 of it: the top binade's spacing), else where they first differ.
    For the fused SwiGLU quantiser, whose fp32 product may differ from the reference's by a
    few ulps and so round a code the other way (tests/test_fp8_swiglu_quant.py bounds it)."""
    def deq(q, s):
        v = q.float().unflatten(-1, (-1, group)) * s.unsqueeze(-1)
        return v, v.abs().amax(-1, keepdim=True)
    a, amax = deq(*got)
    b, _ = deq(*want)
    bad = ((a - b).abs() > amax * (32 / 448) + 1e-30).nonzero()
    if len(bad):
        i = tuple(bad[0].tolist())
        return f"{len(bad)} values differ by more than one e4m3 step, first at {i}: {a[i].item()} vs {b[i].item()}"
    return ""


def run_swiglu_quant(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list[Row]:
    """The expert MLP's activation (issue 18): silu(gate) * up then per-token-group FP8 in one
    pass, against the same two steps in torch ops (what a user writes)."""
    rows = []
    shapes = (GPU_SHAPES[:2] if quick else GPU_SHAPES) if device.type == "cuda" else (CPU_SHAPES[:1] if quick else CPU_SHAPES)
    gen = torch.Generator(device=device).manual_seed(2)
    def one(m, inter):  # a call per shape: its closures keep this shape's tensors (timed later: spread_over_run)
        h = torch.randn(m, 2 * inter, generator=gen, device=device).to(torch.bfloat16)

        def ours():
            if engine == "cuda":
                return fmo.fp8.swiglu_quantize_per_token_group(h)
            with fmo.use_backend(engine):
                return fmo.fp8.swiglu_quantize_per_token_group(h)

        got = ours()
        bad = dequantised_mismatch(got, ref.swiglu_quantize_per_token_group(h))
        if bad:
            raise RuntimeError(f"fused SwiGLU quantisation ({engine}) disagrees with the reference at {m}x{inter} ({bad})")
        c = compare(ours, lambda: ref.swiglu_quantize_per_token_group(h), device=device, max_seconds=3.0 if quick else 5.0)
        moved = m * 2 * inter * 2 + got[0].numel() + got[1].numel() * 4
        rows.append(Row.compared("fp8_swiglu_quant", f"{m}x{2 * inter} bf16", engine, c,
                                 baseline="silu*up, then quantise (torch ops)", bytes_moved=moved,
                                 ceiling="device copy" if device.type == "cuda" else "", ceiling_rate=copy_gbps * 1e9))
    for m, inter in shapes:
        one(m, inter)
    return rows


# ------------------------------------------------------------------------------ GEMM


def _gemm_operands(m, n, k, device, gen):
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.05).to(torch.bfloat16)
    return x, w, ref.quantize_per_token_group(x), ref.quantize_per_block(w)


def scaled_mm_baseline(xq, xs, wq, ws):
    """torch._scaled_mm on the same e4m3 operands: blockwise scales if this torch/GPU takes
    them, else rowwise (per-row x scale, per-row w scale: the closest it offers). Returns
    (callable, label)."""
    b = wq.t()  # [K, N] column-major, as _scaled_mm wants
    attempts = [("blockwise 1x128/128x128", xs.t().contiguous().t(), ws.t().contiguous().t()),
                ("blockwise 1x128/128x128", xs, ws)]
    for label, sa, sb in attempts:
        try:
            torch._scaled_mm(xq, b, sa, sb, out_dtype=torch.bfloat16)
            return (lambda sa=sa, sb=sb: torch._scaled_mm(xq, b, sa, sb, out_dtype=torch.bfloat16)), label
        except Exception:
            continue
    sa = xs.amax(dim=1, keepdim=True).float().contiguous()
    sb = ws.amax().reshape(1, 1).expand(1, wq.shape[0]).float().contiguous()
    return (lambda: torch._scaled_mm(xq, b, sa, sb, out_dtype=torch.bfloat16)), "rowwise"


def fp8_ceiling_flops(device) -> float:
    """FP8 rate of torch._scaled_mm (per-tensor scales) at 8192^3, measured now."""
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    t = time_fn(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), device=device, reps=10)
    return 2 * n**3 / t.median_s


def _check(y, oracle, what):
    d = ref.calc_diff(y.float(), oracle)
    if not d < 1e-5:  # benchmarks print, tests assert: still, never time a wrong kernel
        raise RuntimeError(f"{what}: calc_diff {d:.3g} vs the float64 oracle: not timing it")


def run_gemm(device: torch.device, engine: str, quick: bool, ceiling_flops: float = 0.0) -> list[Row]:
    rows = []
    gpu = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    reps = 20 if gpu else 3
    shapes = GPU_GEMM_SHAPES if gpu else CPU_GEMM_SHAPES
    if quick:
        shapes = shapes[:2] if gpu else shapes[:1]
    ctx = (lambda: torch.no_grad()) if gpu else (lambda: fmo.use_backend(engine))
    def one(m, n, k):  # a call per shape: its closures keep this shape's tensors (timed later: spread_over_run)
        x, w, (xq, xs), (wq, ws) = _gemm_operands(m, n, k, device, gen)

        def ours():
            with ctx():
                return fmo.fp8.gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16)

        oracle = ref.fp8_gemm_oracle(xq, xs, wq, ws)
        _check(ours(), oracle, f"fp8_gemm ({engine}) at {m}x{n}x{k}")
        extra = {}
        if engine != "reference":
            extra["kernel"] = gemm_launcher.kernel_for(engine, device)
        if gpu and extra.get("kernel") == "wgmma":  # the sm_89 kernel on the same Hopper, same operands

            def mma_sync():
                with ctx():
                    return fmo.fp8.gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, kernel="mma_sync")

            _check(mma_sync(), oracle, f"fp8_gemm mma_sync ({engine}) at {m}x{n}x{k}")
            extra["mma_sync_s"] = time_fn(mma_sync, device=device, reps=reps).median_s
            epilogue_row = _epilogue_row(device, engine, quick, ctx, (xq, xs, wq, ws), oracle, ceiling_flops)
        if gpu:
            base, label = scaled_mm_baseline(xq, xs, wq, ws)
            baseline = f"torch._scaled_mm {label}"
            extra["bf16_matmul_s"] = time_fn(lambda: x @ w.t(), device=device, reps=reps).median_s
        else:
            a, b = ref.dequantize_per_token_group(xq, xs).float(), ref.dequantize_per_block(wq, ws).float()
            baseline = "torch.matmul fp32 (dequantised)"

            def base():
                return a @ b.t()
        c = compare(ours, base, device=device, max_seconds=3.0 if quick else 5.0)
        rows.append(Row.compared("fp8_gemm", f"{m}x{n}x{k}", engine, c, baseline=baseline, flops=2.0 * m * n * k, ceiling="_scaled_mm 8192^3" if gpu else "",
                        ceiling_rate=ceiling_flops, extra=extra))
        if gpu and extra.get("kernel") == "wgmma":
            rows.append(epilogue_row)
    for m, n, k in shapes:
        one(m, n, k)
    rows += _run_grouped(device, engine, quick, ceiling_flops, gen, reps, ctx)
    if gpu:
        rows.append(_budget_row(device, engine, reps, ctx, ceiling_flops, gen))
    return rows


def _epilogue_row(device, engine, quick, ctx, operands, oracle, ceiling_flops) -> Row:
    """The wgmma kernel's two epilogues on the same operands: tma_store (staged in shared memory,
    TMA stores) as `ours`, registers (straight to global) as the baseline; `extra` names the
    spec each ran (the launcher's rule may turn tma_store into registers: then it says so)."""
    xq, xs, wq, ws = operands
    (m, k), n = xq.shape, wq.shape[0]

    def run(epilogue):
        def fn():
            with ctx():
                return fmo.fp8.gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, kernel="wgmma", epilogue=epilogue)
        return fn

    staged, registers = run("tma_store"), run("registers")
    for epilogue, fn in (("tma_store", staged), ("registers", registers)):
        _check(fn(), oracle, f"fp8_gemm wgmma {epilogue} epilogue ({engine}) at {m}x{n}x{k}")
    specs = {e: gemm_launcher.select("dense", "wgmma", m, n, k, "bf16", gemm_launcher.b_scale_kind(ws, n), epilogue=e)[0]
             for e in ("tma_store", "registers")}
    c = compare(staged, registers, device=device, max_seconds=3.0 if quick else 5.0)
    return Row.compared("fp8_gemm_tma_store_epilogue", f"{m}x{n}x{k}", engine, c, baseline="fp8_gemm registers epilogue",
                        flops=2.0 * m * n * k, ceiling="_scaled_mm 8192^3" if device.type == "cuda" else "",
                        ceiling_rate=ceiling_flops, extra={f"{e}_spec": s.entry_name() for e, s in specs.items()})


def _budget_row(device, engine, reps, ctx, ceiling_flops, gen) -> Row:
    """GPU only: ours with RESERVED_SMS SMs held by communication vs ours on every SM."""
    from fastmoe_ops import budget

    m, n, k = BUDGET_SHAPE
    _, _, (xq, xs), (wq, ws) = _gemm_operands(m, n, k, device, gen)

    def ours():
        with ctx():
            return fmo.fp8.gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16)

    full = time_fn(ours, device=device, reps=reps).median_s
    with budget.comm_sms(RESERVED_SMS), budget.communication_in_flight():
        _check(ours(), ref.fp8_gemm_oracle(xq, xs, wq, ws), f"fp8_gemm with {RESERVED_SMS} SMs reserved")
        reserved = time_fn(ours, device=device, reps=reps).median_s
    sms = budget.device_num_sms(device)
    return Row(op=f"fp8_gemm_{RESERVED_SMS}_sms_reserved", shape=f"{m}x{n}x{k}", engine=engine, ours_s=reserved,
               baseline="ours on every SM", baseline_s=full, flops=2.0 * m * n * k, ceiling="_scaled_mm 8192^3",
               ceiling_rate=ceiling_flops,
               extra={"num_sms": sms, "max_slowdown": round(sms / (sms - RESERVED_SMS) * 1.05, 4)})


def scaled_grouped_mm_baseline(xq, wq3, per):
    """torch._scaled_grouped_mm on the same e4m3 operands (rowwise unit scales: it takes no
    block scales), or (None, why) where the installed torch or GPU does not run it."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return None, "absent from this torch"
    g, n, _ = wq3.shape
    b = wq3.transpose(1, 2)  # [G, K, N] column-major
    sa = torch.ones(xq.shape[0], device=xq.device, dtype=torch.float32)
    sb = torch.ones(g, n, device=xq.device, dtype=torch.float32)
    offs = torch.arange(per, g * per + 1, per, device=xq.device, dtype=torch.int32)

    def fn():
        return torch._scaled_grouped_mm(xq, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)

    try:
        fn()
    except (RuntimeError, TypeError, NotImplementedError, ValueError) as e:
        return None, f"refused: {str(e).splitlines()[0][:80]}"
    return fn, ""


def _torch_alternatives(device, reps, x, w, xq3, xs3, wq3, ws3, per) -> tuple[str, float, dict]:
    """The fastest way a torch user runs the g expert GEMMs: (label, seconds, every time)."""
    g = wq3.shape[0]
    xe = x.view(g, per, -1)
    scaled = [scaled_mm_baseline(xq3[i], xs3[i], wq3[i], ws3[i]) for i in range(g)]
    alts = {f"{g} x torch.matmul bf16": lambda: [xe[i] @ w[i].t() for i in range(g)],
            f"{g} x torch._scaled_mm {scaled[0][1]}": lambda: [fn() for fn, _ in scaled]}
    grouped, why = scaled_grouped_mm_baseline(xq3.reshape(g * per, -1), wq3, per)
    extra = {} if grouped else {"scaled_grouped_mm": why}
    if grouped:
        alts["torch._scaled_grouped_mm rowwise"] = grouped
    times = {label: time_fn(fn, device=device, reps=reps).median_s for label, fn in alts.items()}
    best = min(times, key=times.get)
    extra.update({f"{label} s": t for label, t in times.items()})
    return best, times[best], extra


def _run_grouped(device, engine, quick, ceiling_flops, gen, reps, ctx) -> list[Row]:
    rows = []
    gpu = device.type == "cuda"
    shapes = GPU_GROUPED if gpu else CPU_GROUPED
    def one(layout, g, per, n, k):  # a call per shape: its closures keep this shape's tensors (timed later: spread_over_run)
        w = (torch.randn(g, n, k, generator=gen, device=device) * 0.05).to(torch.bfloat16)
        q = [ref.quantize_per_block(w[i]) for i in range(g)]
        wq3, ws3 = torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])
        x = torch.randn(g * per, k, generator=gen, device=device).to(torch.bfloat16)
        xq, xs = ref.quantize_per_token_group(x)
        m_indices = torch.arange(g, device=device, dtype=torch.int32).repeat_interleave(per)
        xq3, xs3 = xq.view(g, per, k), xs.view(g, per, -1)
        masked_m = torch.full((g,), per, dtype=torch.int32, device=device)

        def ours():
            with ctx():
                if layout == "contiguous":
                    return fmo.fp8.grouped_gemm_contiguous(xq, xs, wq3, ws3, m_indices)
                return fmo.fp8.grouped_gemm_masked(xq3, xs3, wq3, ws3, masked_m).reshape(g * per, n)

        oracle = torch.cat([ref.fp8_gemm_oracle(xq3[i], xs3[i], wq3[i], ws3[i]) for i in range(g)])
        _check(ours(), oracle, f"grouped {layout} ({engine}) {g}x{per}x{n}x{k}")
        extra = {"kernel": gemm_launcher.kernel_for(engine, device)} if engine != "reference" else {}
        if gpu:
            baseline, t_base, more = _torch_alternatives(device, reps, x, w, xq3, xs3, wq3, ws3, per)
            extra.update(more)
        else:
            a = torch.stack([ref.dequantize_per_token_group(xq3[i], xs3[i]) for i in range(g)]).float()
            b = torch.stack([ref.dequantize_per_block(wq3[i], ws3[i]) for i in range(g)]).float()
            c = compare(ours, lambda: torch.bmm(a, b.transpose(1, 2)), device=device, max_seconds=3.0 if quick else 5.0)
            rows.append(Row.compared(f"fp8_grouped_{layout}", f"{g}x{per}x{n}x{k}", engine, c,
                                     baseline="torch.bmm fp32 (dequantised)", flops=2.0 * g * per * n * k, extra=extra))
            return
        # GPU: the fastest of several torch alternatives (each timed in _torch_alternatives) is the baseline
        t = time_fn(ours, device=device, reps=reps)
        rows.append(Row(op=f"fp8_grouped_{layout}", shape=f"{g}x{per}x{n}x{k}", engine=engine, ours_s=t.median_s,
                        baseline=baseline, baseline_s=t_base, flops=2.0 * g * per * n * k,
                        ceiling="_scaled_mm 8192^3", ceiling_rate=ceiling_flops, extra=extra))
    for layout, g, per, n, k in (shapes[:1] if quick else shapes):
        one(layout, g, per, n, k)
    return rows
