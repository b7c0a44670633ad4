"""One harness for every op's benchmark: rows, the table, geometric means, JSON."""
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

    @property
    def speedup(self) -> float:
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


def format_table(rows: list[Row]) -> str:
    header = ["op", "shape", "engine", "time", "rate", "% ceil", "baseline", "base time", "speedup"]
    lines = [header]
    for r in rows:
        rate = f"{r.tflops:.3g} TFLOP/s" if r.flops else f"{r.gbps:.3g} GB/s"
        pct = f"{r.pct_of_ceiling:.1f}" if math.isfinite(r.pct_of_ceiling) else "-"
        lines.append([r.op, r.shape, r.engine, _fmt_time(r.ours_s), rate, pct, r.baseline, _fmt_time(r.baseline_s), f"{r.speedup:.3g}x"])
    ops = sorted({r.op for r in rows})
    for op in ops:
        sel = [r for r in rows if r.op == op]
        lines.append([op, "geomean", "", "", "", "", "", "", f"{geomean(r.speedup for r in sel):.3g}x"])
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
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        pass
    return info


def payload(rows: list[Row], device: torch.device, extra: dict | None = None) -> dict:
    return {
        "environment": environment(device),
        **(extra or {}),
        "rows": [dict(asdict(r), speedup=r.speedup, gbps=r.gbps, tflops=r.tflops, pct_of_ceiling=r.pct_of_ceiling) for r in rows],
    }


def write_json(path: Path, rows: list[Row], device: torch.device, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload(rows, device, extra), indent=2, default=str))


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
