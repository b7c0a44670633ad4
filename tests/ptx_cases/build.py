"""A ptx/ test kernel built offline for sm_90a with nvcc (no GPU needed), as
tests/test_ptx_build.py and tests/test_ptx_wgmma.py check it: ptxas's verbose log gives each
kernel's stack frame and spill bytes."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from fastmoe_ops.runtime import compiler, sources

# (name, stack frame bytes, spill store bytes, spill load bytes) per kernel of `ptxas -v`
PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_sm90a(source: str, tmp: Path) -> tuple[str, Path]:
    """(ptxas's log, the cubin) of `source` compiled in `tmp`; an nvcc failure fails the test."""
    cu, cubin = tmp / "k.cu", tmp / "k.cubin"
    cu.write_text(source)
    cmd = [str(compiler.nvcc_path()), "-arch=sm_90a", "-cubin", "-std=c++17", "-Xptxas", "-v",
           f"-I{sources.kernel_root()}", "-o", str(cubin), str(cu)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for sm_90a:\n{proc.stderr[-4000:]}"
    return proc.stderr, cubin
