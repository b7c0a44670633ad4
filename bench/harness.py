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
        """A row from a bench.stats.Comparison (medians, intervals, the per-pair ratio)."""
        return cls(op, shape, engine, ours_s=c.ours_s, baseline_s=c.base_s, stats=c.as_dict(), **kw)

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
    try:
        import cupy

        info["cupy"] = cupy.__version__
        if device.type == "cuda":
            info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception:  # noqa: BLE001 - CuPy absent or no driver: the CPU machine has neither
        info["cupy"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
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


def plot(rows: list[Row], directory: Path) -> list[Path]:
    """One PNG per (op, engine): rate against problem size, ours and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for op in sorted({r.op for r in rows}):
        for engine in sorted({r.engine for r in rows if r.op == op}):
            sel = [r for r in rows if r.op == op and r.engine == engine]
            use_flops = all(r.flops for r in sel)
            size = [r.flops if use_flops else r.bytes_moved for r in sel]
            if not all(size):
                continue
            unit = 1e12 if use_flops else 1e9
            ours = [s / r.ours_s / unit for s, r in zip(size, sel)]
            base = [s / r.baseline_s / unit for s, r in zip(size, sel)]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(size, ours, "o-", label=f"fastmoe-ops ({engine})")
            ax.plot(size, base, "s--", label=sel[0].baseline)
            ax.set_xscale("log")
            ax.set_yscale("log")  # simulator and GPU rates differ by orders of magnitude
            ax.set_xlabel("FLOP per call" if use_flops else "bytes moved per call")
            ax.set_ylabel("TFLOP/s" if use_flops else "GB/s")
            ax.set_title(f"{op} [{engine}]")
            ax.grid(True, alpha=0.3)
            ax.legend()
            path = directory / f"{op}-{engine}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
