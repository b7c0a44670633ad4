"""The main job's harness on the CPU: the table, the JSON, the plots, the kept results and
the README section generated from them (benchmarks print; this only checks the plumbing)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parents[1]


def _reject(constant):
    raise ValueError(f"non-strict JSON constant {constant}")


def test_bench_quick_reference_writes_json_and_plots(tmp_path):
    out = tmp_path / "b.json"
    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "fp8", "--engine", "reference",
                           "--json", str(out), "--plot", str(plots)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fp8_quant_token_group" in proc.stdout and "geomean" in proc.stdout
    assert "No GPU here" in proc.stdout, "a CPU run must say that it is not measuring a GPU"
    data = json.loads(out.read_text(), parse_constant=_reject)  # strict: NaN / Infinity raise
    assert data["schema_version"] >= 2 and "cupy" in data["environment"] and "commit" in data["environment"]
    assert "copy_gbps" in data["ceilings"]
    checks = [r for r in data["rows"] if r["op"] == "self_check"]
    assert len(checks) == 1 and checks[0]["stats"]["pairs"] >= 8, "the harness times the baseline against itself"
    rows = [r for r in data["rows"] if r["op"] != "self_check"]
    assert rows and all(r["engine"] == "reference" and r["ours_s"] > 0 and r["baseline_s"] > 0 for r in rows)
    assert all(k.endswith("[reference]") or k.endswith("[torch]") for k in data["geomeans"]), "geomeans per (op, engine)"
    assert "% ceil" not in proc.stdout, "a column no CPU row fills is absent, not '-'"
    assert data["environment"]["device"] == "cpu"
    pngs = sorted(plots.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\n" + report.BEGIN + "\nold\n" + report.END + "\n\ntail\n")
    data["date"] = "2026-01-01"
    summary = report.markdown(data)
    report.update_readme(summary, readme)
    text = readme.read_text()
    assert "old" not in text and "tail" in text and "CPU only" in text and "fp8_quant_token_group" in text
    report.update_readme(summary, readme)
    assert readme.read_text() == text, "regenerating the section must be idempotent"


def test_keep_run_merges_the_main_jobs_files_and_regenerates_the_readme(tmp_path, monkeypatch):
    """`python -m bench.report --keep out/bench.json out/bench_moe*.json`: one kept file with
    the rows of all (single-process and multi-rank), strict JSON, and the README section from it."""
    env = {"device": "cpu", "cpu": "x86_64", "torch": "2.x", "commit": "abc"}
    row = {"op": "self_check", "shape": "s", "engine": "torch", "ours_s": 1.0, "baseline": "b", "baseline_s": 1.0,
           "stats": None}
    files = []
    for i, op in enumerate(("self_check", "moe_layer_step")):
        p = tmp_path / f"b{i}.json"
        p.write_text(json.dumps({"schema_version": 2, "environment": env, "rows": [dict(row, op=op)],
                                 "geomeans": {f"{op} [torch]": 1.0}}))
        files.append(p)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.RUNS_BEGIN}\nold\n{report.RUNS_END}\n\n## Performance\n\n{report.BEGIN}\nold\n{report.END}\n")
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    kept = report.keep_run(files)
    data = json.loads(kept[0].read_text(), parse_constant=_reject)
    assert [r["op"] for r in data["rows"]] == ["self_check", "moe_layer_step"] and len(data["geomeans"]) == 2
    assert "moe_layer_step" in readme.read_text() and "old" not in readme.read_text().split("## Performance")[1]


def test_committed_results_are_strict_json():
    """Every kept results file parses with a strict parser (NaN and Infinity are not JSON)."""
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files
    for path in files:
        json.loads(path.read_text(), parse_constant=_reject)


def test_plots_keep_flop_and_byte_rows_apart_and_skip_single_points(tmp_path):
    from bench.harness import Row, plot

    rows = [Row("fp8_gemm", f"{m}x128x128", "sim", 1e-3 * m, "matmul", 1e-4 * m, flops=2 * m * 128 * 128) for m in (64, 128)]
    rows += [Row("fp8_gemm", "quant", "sim", 1e-3, "torch", 1e-4, bytes_moved=4096),        # a byte row in a GEMM family
             Row("sim_throughput", "reduce", "sim", 1e-3, "torch.sum", 1e-4, bytes_moved=4096)]  # a single point
    names = sorted(p.name for p in plot(rows, tmp_path))
    assert names == ["fp8_gemm-flops.png"], names   # no ratios.png: none of these rows has intervals
