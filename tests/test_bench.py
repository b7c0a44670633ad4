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
