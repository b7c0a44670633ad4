"""Build report: compile every registered kernel variant offline and show what ptxas made.

    python -m fastmoe_ops.build [--arch sm_90a] [--json FILE] [--op NAME]

One row per kernel: registers, shared memory, spill bytes (stores/loads), stack frame, and
counts of the tensor-core and data-movement instructions in its SASS. Needs nvcc (no GPU);
SASS is read with cuobjdump (PyPI `nvidia-cuda-cuobjdump`, or the toolkit's). Exits non-zero
when a kernel fails to compile or spills.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FmoError
from .runtime import compiler
from .runtime.spec import registered_specs

# SASS opcode families the report counts (prefix match on the opcode).
# Hopper's async machinery (ptx/mbarrier.cuh, tma.cuh, warp.cuh, ldmatrix.cuh's stmatrix):
# SYNCS = mbarrier ops, UTMALDG/UTMASTG/UTMAREDG = TMA load/store/reduce, UBLKCP = bulk copy,
# ELECT = elect.sync, USETMAXREG = setmaxnreg, STSM = stmatrix.
SASS_FAMILIES = ("HMMA", "HGMMA", "QMMA", "QGMMA", "IMMA", "LDSM", "STSM", "LDGSTS", "UTMALDG", "UTMASTG",
                 "UTMAREDG", "UBLKCP", "SYNCS", "ELECT", "USETMAXREG", "LDG", "STG", "LDS", "STS", "SHFL", "BAR")

_PROPS_RE = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Compiling entry function '(\S+)'.*?Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?", re.S)


@dataclass
class KernelReport:
    name: str
    arch: str
    ok: bool
    registers: int = 0
    static_smem: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    sass: dict = field(default_factory=dict)
    error: str = ""


def _load_register_info(log: str, name: str) -> dict:
    info = {"registers": 0, "static_smem": 0, "stack_frame": 0, "spill_stores": 0, "spill_loads": 0}
    for m in _PROPS_RE.finditer(log):
        if m.group(1) == name:
            info["stack_frame"], info["spill_stores"], info["spill_loads"] = (int(m.group(i)) for i in (2, 3, 4))
    for block in log.split("ptxas info    : Compiling entry function")[1:]:
        block = "Compiling entry function" + block
        m = _USED_RE.search(block)
        if m and m.group(1) == name:
            info["registers"] = int(m.group(2))
            info["static_smem"] = int(m.group(3) or 0)
    return info


def sass_counts(cubin: Path, cuobjdump: Path | None) -> dict:
    if cuobjdump is None:
        return {}
    sass = compiler.disassemble(cubin)
    counts: Counter = Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not m:
            continue
        opcode = m.group(1)  # the mnemonic without its .modifiers
        if opcode in SASS_FAMILIES:
            counts[opcode] += 1
    return {fam: counts.get(fam, 0) for fam in SASS_FAMILIES}


def _report(spec, arch: str, cuobjdump: Path | None) -> KernelReport:
    name = spec.entry_name()
    try:
        result = compiler.compile_nvcc(spec.stub(), name, arch)
        info = _load_register_info(result.log, name)
        return KernelReport(name=name, arch=arch, ok=True, sass=sass_counts(result.cubin, cuobjdump), **info)
    except FmoError as e:
        return KernelReport(name=name, arch=arch, ok=False, error=str(e))


def targets(spec, arch: str) -> bool:
    """Whether `spec` is built for `arch`: a spec that names its archs (the wgmma GEMM is
    sm_90a only) is left out elsewhere rather than reported as a failure."""
    archs = getattr(spec, "archs", None)
    return not archs or arch in archs


def build_all(arch: str, op_filter: str | None = None) -> list[KernelReport]:
    """Compile every registered variant for `arch`, one nvcc per core at a time; rows in registry order."""
    cuobjdump = compiler.find_cuobjdump()
    specs = [s for s in registered_specs() if (not op_filter or s.op == op_filter) and targets(s, arch)]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda spec: _report(spec, arch, cuobjdump), specs))


def format_table(reports: list[KernelReport]) -> str:
    shown = [f for f in SASS_FAMILIES if any(r.sass.get(f) for r in reports)] or ["LDG", "STG"]
    header = ["kernel", "regs", "smem", "stack", "spill st", "spill ld"] + shown
    rows = [header]
    for r in reports:
        if not r.ok:
            rows.append([r.name, "FAILED"] + [""] * (len(header) - 2))
            continue
        rows.append([r.name, str(r.registers), str(r.static_smem), str(r.stack_frame), str(r.spill_stores), str(r.spill_loads)]
                    + [str(r.sass.get(f, "?")) for f in shown])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmoe_ops.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90a", help="target, e.g. sm_90a (default), sm_89, sm_80")
    parser.add_argument("--json", type=Path, help="write the report as JSON to this file")
    parser.add_argument("--op", help="only this op's kernels")
    args = parser.parse_args(argv)
    compiler.parse_arch(args.arch)
    # Importing the ops registers their specs.
    from . import ops  # noqa: F401
    from .ops import _all  # noqa: F401

    reports = build_all(args.arch, args.op)
    print(format_table(reports))
    failed = [r for r in reports if not r.ok]
    spilled = [r for r in reports if r.ok and (r.spill_stores or r.spill_loads)]
    for r in failed:
        print(f"\nFAILED {r.name}:\n{r.error}", file=sys.stderr)
    for r in spilled:
        print(f"SPILLS {r.name}: {r.spill_stores} bytes stored, {r.spill_loads} bytes loaded", file=sys.stderr)
    if compiler.find_cuobjdump() is None:
        print("note: cuobjdump not found (pip install nvidia-cuda-cuobjdump): SASS counts omitted", file=sys.stderr)
    print(f"\n{len(reports)} kernels for {args.arch}: {len(reports) - len(failed)} compiled, {len(failed)} failed, {len(spilled)} spill")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return 1 if failed or spilled or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
