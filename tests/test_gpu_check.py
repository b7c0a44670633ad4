"""bench/gpu_check.sh on a CPU-only machine (argument handling, the build step, result files,
GPU steps skipped with a clear message, never reported as passed, and the repository left
alone), what it runs on a GPU, and the results file it ends with there: assembled from its
step folder by bench.report on fake step outputs, kept in bench/results, and README's
performance section and GPU-run list regenerated from the kept files (CPU rows labelled CPU).
The README in this checkout must be what the kept results files generate."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from bench import report
from fastmoe_ops.runtime import compiler

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _repo_state() -> tuple[str, list[str]]:
    return (ROOT / "README.md").read_text(), sorted(p.name for p in (ROOT / "bench" / "results").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")
def test_gpu_check_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    env["OUT"] = str(tmp_path / "not-this-one")  # an explicit argument wins over $OUT
    before = _repo_state()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    assert "| build report sm_90a | PASS |" in summary
    assert "| GPU tests | SKIP | no CUDA device" in summary
    assert "| benchmarks | SKIP | no CUDA device" in summary
    assert "| multi-rank | SKIP | no CUDA device" in summary
    assert "| results file | SKIP | no CUDA device" in summary
    assert "PASS | " in summary and "FAIL" not in summary
    assert all(re.search(r"\| \d+ s \|$", line) for line in summary.splitlines() if line.startswith("| ") and "---" not in line
               and not line.startswith("| step")), "every step row says how long it took"
    rows = json.loads((out / "build.json").read_text())
    assert rows and all(r["ok"] for r in rows)
    assert "torch" in (out / "env.txt").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, f"a lent machine returns at most 8 files, the check wrote {len(files)}"
    with tarfile.open(out / "raw.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"steps.tsv", "build.log"} <= names, names
    assert not list(out.glob("*-20*.json")), "no results file without a GPU"
    assert _repo_state() == before, "a CPU run must not touch README.md or bench/results"
    assert not (tmp_path / "not-this-one").exists()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1]), "the summary must be printed last"


def test_the_check_runs_every_gpu_test():
    """All of tests/gpu in one process (no selection that could leave a test out), and the
    multi-rank step under mpirun -n 2; tests/test_gpu_tests_location.py keeps every CUDA test
    in tests/gpu or named by that step."""
    text = SCRIPT.read_text()
    single = re.search(r"-m pytest tests/gpu (?P<opts>[^\n]*)", text)
    assert single and not re.search(r"(^|\s)(-k|-m|--deselect|--ignore)\b", single["opts"]), single
    assert re.search(r"-n 2\b", text) and "tests/gpu/test_moe_gpu.py" in text and "-m bench --quick" in text
    limits = dict(re.findall(r"\b(T_[A-Z_]+)=(\d+)", text))
    assert sum(map(int, limits.values())) <= 8 * 60 - 20, f"the step limits {limits} leave no room in 8 minutes"
    assert all(f'"${name}"' in text for name in limits), "every limit is used"


STEPS = "versions\tPASS\tenv.txt\t2\ncuda engine\tPASS\tcupy 14.2.0\t1\nGPU tests\tPASS\t120 passed in 60.0s\t70\n" \
        "benchmarks\tFAIL\ttimed out; last line: x\t75\n"
GPU_ENV = {"torch": "2.11.0+cu130", "python": "3.12.3", "machine": "x86_64", "device": "cuda", "gpu": "NVIDIA H200",
           "sms": 132, "cuda": "13.0", "commit": "0123456789abcdef0123", "capability": "sm_90", "driver": "580.159.04",
           "nvcc": "13.0.88", "cupy": "14.2.0", "numpy": "2.5.2", "mpi4py": "4.1.2"}


def _row(op, engine="cuda", **kw):
    return {"op": op, "shape": "4096x7168", "engine": engine, "ours_s": 1e-3, "baseline": "torch", "baseline_s": 2e-3,
            "bytes_moved": 10**9, "flops": 0.0, "ceiling": "", "ceiling_rate": 0.0, "extra": {}, **kw}


def _fake_step_dir(tmp_path) -> Path:
    step = tmp_path / "steps"
    step.mkdir()
    (step / "steps.tsv").write_text(STEPS)
    (step / "bench.json").write_text(json.dumps({"environment": {"gpu": "NVIDIA H200"}, "ceilings": {"copy_gbps": 4256.0},
                                                 "host_overhead_us": 30.0, "rows": [_row("fp8_gemm")]}))
    (step / "bench_moe.json").write_text(json.dumps({"environment": {}, "rows": [_row("moe_dispatch_combine")]}))
    (step / "bench_moe_layer.json").write_text(json.dumps({"environment": {}, "ranks": 2, "transport": "host",
                                                           "rows": [_row("moe_layer_step")]}))
    return step


def test_results_file_from_the_step_folder(tmp_path):
    data = report.gpu_check_results(_fake_step_dir(tmp_path), GPU_ENV, "2026-12-24")
    assert [r["op"] for r in data["rows"]] == ["fp8_gemm", "moe_dispatch_combine", "moe_layer_step"]
    assert data["steps"][3] == {"step": "benchmarks", "result": "FAIL", "detail": "timed out; last line: x", "seconds": 75}
    assert data["environment"] == GPU_ENV and data["date"] == "2026-12-24"
    assert data["ceilings"] == {"copy_gbps": 4256.0} and data["parts"]["bench_moe_layer"]["ranks"] == 2
    assert report._device_slug(GPU_ENV) == "h200"
    assert report._device_slug({"machine": "x86_64"}) == "cpu-x86-64"


def test_save_gpu_check_keeps_the_file_and_regenerates_the_readme(tmp_path, monkeypatch):
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir(), out.mkdir()
    cpu = json.loads((ROOT / "bench" / "results" / "cpu-x86-64-2026-11-28.json").read_text())
    (results / "cpu-x86-64-2026-11-28.json").write_text(json.dumps(cpu))
    (results / "cpu-x86-64-2026-11-28-moe-run1.json").write_text(json.dumps({"environment": {}, "rows": []}))  # not a single run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nGPU runs:\n\n{report.RUNS_BEGIN}\nold\n{report.RUNS_END}\n\n## Performance\n\n"
                      f"{report.BEGIN}\nold\n{report.END}\n\ntail\n")
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report, "gpu_environment", lambda: dict(GPU_ENV))
    written = report.save_gpu_check(_fake_step_dir(tmp_path), out)
    name = written[0].name
    assert re.fullmatch(r"h200-\d{4}-\d{2}-\d{2}\.json", name) and written[0] == out / name
    assert (results / name).read_text() == (out / name).read_text() and (results / name).with_suffix(".md").exists()
    text = readme.read_text()
    assert "old" not in text and "tail" in text
    runs = text[text.index(report.RUNS_BEGIN):text.index(report.RUNS_END)]
    for fact in ("NVIDIA H200 (132 SMs, sm_90)", "driver 580.159.04", "CUDA 13.0", "torch 2.11.0+cu130", "CuPy 14.2.0",
                 "nvcc 13.0.88", "commit `0123456789ab`", "not PASS: benchmarks FAIL", f"bench/results/{name}"):
        assert fact in runs, f"{fact!r} missing from the GPU-run list: {runs}"
    perf = text[text.index(report.BEGIN):text.index(report.END)]
    gpu_part, cpu_part = perf.split("**CPU**")
    assert gpu_part.startswith(report.BEGIN + "\n**GPU** (`bench/results/h200-") and "fp8_gemm" in gpu_part
    assert "moe_dispatch_combine" in gpu_part and "moe_layer_step" in gpu_part
    assert "CPU only" in cpu_part and "cpu-x86-64-2026-11-28.json" in cpu_part and "CPU only" not in gpu_part
    report.regenerate_readme()
    assert readme.read_text() == text, "regenerating is idempotent"


def test_readme_without_gpu_runs_says_so(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.RUNS_BEGIN}\n{report.RUNS_END}\n{report.BEGIN}\n{report.END}\n")
    (tmp_path / "results").mkdir()
    report.regenerate_readme(readme, tmp_path / "results")
    text = readme.read_text()
    assert "No GPU run is kept in `bench/results/` yet." in text and "**GPU**: no GPU run is kept" in text


def test_readme_is_what_the_kept_results_generate(tmp_path):
    """README's performance section and GPU-run list are regenerated, never typed: after
    adding a results file, run `python -m bench.report`."""
    copy = tmp_path / "README.md"
    copy.write_text((ROOT / "README.md").read_text())
    report.regenerate_readme(copy)
    assert copy.read_text() == (ROOT / "README.md").read_text(), "README is stale: run python -m bench.report"
    assert report.RUNS_BEGIN in copy.read_text(), "README's support matrix has no generated GPU-run list"
