"""bench/gpu_check.sh on a CPU-only machine: argument handling, the build step, result
files, and GPU steps skipped with a clear message (never reported as passed)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fastmoe_ops.runtime import compiler

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")
def test_gpu_check_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    env["OUT"] = str(tmp_path / "not-this-one")  # an explicit argument wins over $OUT
    args = ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    assert "| build report sm_90a | PASS |" in summary
    assert "| GPU tests | SKIP | no CUDA device" in summary
    assert "| benchmarks | SKIP | no CUDA device" in summary
    assert "| multi-rank | SKIP | no CUDA device" in summary
    assert "PASS | " in summary and "FAIL" not in summary
    rows = json.loads((out / "build.json").read_text())
    assert rows and all(r["ok"] for r in rows)
    assert "torch" in (out / "env.txt").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, f"a lent machine returns at most 8 files, the check wrote {len(files)}"
    assert not (tmp_path / "not-this-one").exists()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1]), "the summary must be printed last"
