"""One harness for every op's benchmark: rows, the table, geometric means, JSON.

Adding a row: time ours against its baseline with `bench.stats.compare(ours, base, device=...)`
and build it with `Row.compared(op, shape, engine, comparison, baseline=...)`; everything else
(the table's verdict column, per-engine geomeans, strict JSON, plots) follows from the Row."""
from __future__ import annotations

import json
import math
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastmoe_ops.runtime import cuda_driver


@dataclass
class Row:
    op: str
    shape: str
    engine: str            # cuda | sim | reference
    ours_s: float
    baseline: str          # what users would otherwise call, named
    baseline_s: float
    bytes_moved: int = 0   # bytes actually read + written by the op
    flops: float = 0.0
    ceiling: str = ""      # the measured ceiling this row is compared to
    ceiling_rate: float = 0.0
    extra: dict = field(default_factory=dict)
    stats: dict | None = None  # bench.stats.Comparison.as_dict() when ours and baseline were interleaved

    @classmethod
    def compared(cls, op: str, shape: str, engine: str, c, **kw) -> "Row":
        """A row from a bench.stats.Comparison (medians, intervals, the per-pair ratio); from a
        PendingComparison (bench.stats.spread_over_run), a row completed when it is timed."""
        from .stats import PendingComparison

        if isinstance(c, PendingComparison):
            row = cls(op, shape, engine, ours_s=math.nan, baseline_s=math.nan, **kw)
            c.rows.append(row)
            return row
        row = cls(op, shape, engine, ours_s=0.0, baseline_s=0.0, **kw)
        row.take(c)
        return row

    def take(self, c) -> None:
        """Times and statistics from a bench.stats.Comparison."""
        self.ours_s, self.baseline_s, self.stats = c.ours_s, c.base_s, c.as_dict()

    @property
    def speedup(self) -> float:
        if self.stats:
            return self.stats["ratio"]
        return self.baseline_s / self.ours_s if self.ours_s > 0 else float("nan")

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.ours_s / 1e9 if self.bytes_moved and self.ours_s > 0 else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / self.ours_s / 1e12 if self.flops and self.ours_s > 0 else 0.0

    @property
    def pct_of_ceiling(self) -> float:
        rate = self.tflops * 1e12 if self.flops else self.gbps * 1e9
        return 100.0 * rate / self.ceiling_rate if self.ceiling_rate else float("nan")


def geomean(values) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def _spread(r: Row) -> str:
    return f"+-{100 * r.stats['spread'] / 2:.0f}% n={r.stats['pairs']}" if r.stats else ""


# (header, cell, applies): a column is printed only when some row has something to say in it
_COLUMNS = [
    ("op", lambda r: r.op, lambda r: True),
    ("shape", lambda r: r.shape, lambda r: True),
    ("engine", lambda r: r.engine, lambda r: True),
    ("time", lambda r: _fmt_time(r.ours_s), lambda r: True),
    ("spread", _spread, lambda r: r.stats is not None),
    ("rate", lambda r: f"{r.tflops:.3g} TFLOP/s" if r.flops else (f"{r.gbps:.3g} GB/s" if r.bytes_moved else ""),
     lambda r: bool(r.flops or r.bytes_moved)),
    ("% ceil", lambda r: f"{r.pct_of_ceiling:.1f}" if r.ceiling_rate else "", lambda r: bool(r.ceiling_rate)),
    ("baseline", lambda r: r.baseline, lambda r: True),
    ("base time", lambda r: _fmt_time(r.baseline_s), lambda r: True),
    ("speedup (95% CI)", lambda r: speedup_text(r), lambda r: True),
]


def speedup_text(r: Row) -> str:
    from .stats import Comparison, verdict

    c = Comparison(**{k: v for k, v in r.stats.items() if k != "conclusive"}) if r.stats else None
    return verdict(c, r.speedup)


def geomeans(rows: list[Row]) -> dict[str, float | None]:
    """Geometric mean of the speed-ups per (op, engine), keyed 'op [engine]': never across
    engines (a simulator ratio and a reference ratio measure different things)."""
    keys = sorted({(r.op, r.engine) for r in rows})
    out = {}
    for op, engine in keys:
        g = geomean(r.speedup for r in rows if r.op == op and r.engine == engine)
        out[f"{op} [{engine}]"] = g if math.isfinite(g) else None
    return out


def format_table(rows: list[Row]) -> str:
    cols = [c for c in _COLUMNS if any(c[2](r) for r in rows)]
    header = [c[0] for c in cols]
    lines = [header]
    for r in rows:
        lines.append([c[1](r) for c in cols])
    for key, g in geomeans(rows).items():
        lines.append([key, "geomean"] + [""] * (len(cols) - 3) + [f"{g:.3g}x" if g is not None else "n/a"])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)) for l in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine())
    info["cupy"] = cuda_driver.cupy_version()
    if device.type == "cuda":
        info["cuda_driver"] = cuda_driver.driver_version()
    try:
        # cwd: the package's checkout, wherever the run was started from; null outside a git checkout
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                        cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        pass
    return info


SCHEMA_VERSION = 2  # 2: rows carry `stats` (interleaved medians, intervals), geomeans per (op, engine), strict JSON


def strict(obj):
    """obj with every non-finite float as None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def payload(rows: list[Row], device: torch.device, extra: dict | None = None) -> dict:
    def row(r: Row) -> dict:
        d = dict(asdict(r), speedup=r.speedup, gbps=r.gbps, tflops=r.tflops)
        if r.ceiling_rate:
            d["pct_of_ceiling"] = r.pct_of_ceiling
        return d

    return strict({
        "schema_version": SCHEMA_VERSION,
        "environment": environment(device),
        **(extra or {}),
        "geomeans": geomeans(rows),
        "rows": [row(r) for r in rows],
    })


def write_json(path: Path, rows: list[Row], device: torch.device, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload(rows, device, extra), indent=2, allow_nan=False))


def family(op: str) -> str:
    """The figure an op is drawn in: ops that share a size axis and a baseline kind."""
    for prefix in ("attn", "fp8_quant", "fp8_g", "moe_layer", "moe_dispatch", "moe"):
        if op.startswith(prefix):
            return {"fp8_g": "fp8_gemm"}.get(prefix, prefix)
    return op


def _variant(r: Row) -> str:
    """What separates series inside one (op, engine): causal masks, transports, modes, and
    attention's head layouts (GQA "H32/8", MLA's head dims "D192/128": a different problem,
    not a bigger one of the same series)."""
    parts = [r.op]
    words = r.shape.split()
    if any(w.startswith("H") and "/" in w for w in words):
        parts.append("GQA")
    if any(w.startswith("D") and "/" in w for w in words):
        parts.append("MLA")
    if "causal" in words:
        parts.append("causal")
    return " ".join(parts)


def plot(rows: list[Row], directory: Path) -> list[Path]:
    """One PNG per op family: rate against problem size (sorted), one series per (engine,
    variant) for ours and a dashed one for its baseline, each point labelled by its shape;
    and ratios.png: ours/baseline per row with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    drawable = [r for r in rows if (r.flops or r.bytes_moved) and r.ours_s > 0 and r.baseline_s > 0]
    # A figure per (family, size axis): FLOP-counted rows (GEMMs) and byte-counted rows
    # (copies, reductions) never share an axis.
    figures = sorted({(family(r.op), bool(r.flops)) for r in drawable})
    for fam, use_flops in figures:
        sel = [r for r in drawable if family(r.op) == fam and bool(r.flops) == use_flops]
        keys = sorted({(r.engine, _variant(r)) for r in sel})
        if len(sel) == len(keys):
            continue   # one point per series draws no curve: such rows are in ratios.png only
        unit, size_of = (1e12, lambda r: r.flops) if use_flops else (1e9, lambda r: r.bytes_moved)
        # One legend entry per series (its baseline named in it): two per series overflowed the
        # figure at attention's 16 series; 20 distinct colours, then markers tell them apart.
        fig, ax = plt.subplots(figsize=(12, max(5.5, 0.17 * len(keys) + 1.0)))
        palette = plt.get_cmap("tab20")
        for i, key in enumerate(keys):
            series = sorted((r for r in sel if (r.engine, _variant(r)) == key), key=size_of)
            xs = [size_of(r) for r in series]
            color, marker = palette(i % 20), "o^vD"[i // 20 % 4]
            ax.plot(xs, [x / r.ours_s / unit for x, r in zip(xs, series)], marker=marker, linestyle="-", color=color,
                    label=f"{key[1]} [{key[0]}] (dashed: {series[0].baseline})")
            ax.plot(xs, [x / r.baseline_s / unit for x, r in zip(xs, series)], marker="s", linestyle="--", color=color,
                    alpha=0.5, label="_nolegend_")
            for x, r in zip(xs, series):
                ax.annotate(r.shape.replace(" causal", ""), (x, x / r.ours_s / unit), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_yscale("log")  # simulator and GPU rates differ by orders of magnitude
        for axis in (ax.xaxis, ax.yaxis):  # short engineering labels; minor ticks at 2x and 5x only
            axis.set_major_formatter(EngFormatter())
            axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            axis.set_minor_formatter(EngFormatter())
        ax.tick_params(axis="x", which="both", labelrotation=30, labelsize=8)
        ax.tick_params(axis="y", which="both", labelsize=8)
        ax.set_xlabel("FLOP per call" if use_flops else "bytes moved per call")
        ax.set_ylabel("TFLOP/s" if use_flops else "GB/s")
        ax.set_title(f"{fam}: ours (solid) and baseline (dashed)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: never over the points
        fig.tight_layout()
        mixed = sum(f == fam for f, _ in figures) > 1
        path = directory / (f"{fam}-{'flops' if use_flops else 'bytes'}.png" if mixed else f"{fam}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    ratio_rows = [r for r in rows if r.stats]
    if ratio_rows:
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(ratio_rows) + 1.5))
        labels = [f"{r.op} {r.shape} [{r.engine}]" for r in ratio_rows]
        mid = [r.stats["ratio"] for r in ratio_rows]
        err = [[m - r.stats["ratio_lo"] for m, r in zip(mid, ratio_rows)], [r.stats["ratio_hi"] - m for m, r in zip(mid, ratio_rows)]]
        ys = list(range(len(ratio_rows)))
        colors = ["C2" if r.stats["conclusive"] and m > 1 else "C3" if r.stats["conclusive"] else "C7" for r, m in zip(ratio_rows, mid)]
        ax.errorbar(mid, ys, xerr=err, fmt="none", ecolor="k", capsize=3)
        ax.scatter(mid, ys, c=colors, zorder=3)
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(ys, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("baseline time / our time (95% interval; grey: within noise)")
        ax.set_title("ours vs baseline, per row")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        path = directory / "ratios.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
