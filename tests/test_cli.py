"""The `fastmoe-ops` console script: pyproject's entry point exists, `--help` lists the
commands, and each command receives its arguments unchanged."""
from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastmoe_ops import build, cli

REPO = Path(__file__).resolve().parent.parent


def test_the_declared_console_script_exists():
    ((module, function),) = re.findall(r'^fastmoe-ops = "([\w.]+):(\w+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert getattr(importlib.import_module(module), function) is cli.main


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "fastmoe_ops.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("build", "bench", "gpu-check"):
        assert re.search(rf"^  {command} +\S", proc.stdout, re.M), proc.stdout
    assert "python -m fastmoe_ops.build" in proc.stdout and "bench/gpu_check.sh" in proc.stdout


def test_build_gets_its_arguments_unchanged(monkeypatch):
    seen = []
    monkeypatch.setattr(build, "main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["build", "--arch", "sm_89", "--op", "fp8_gemm", "--json", "out/b.json"]) == 3  # its exit status
    assert cli.main(["build", "--help"]) == 3  # the build report's own help, not the CLI's
    assert seen == [["--arch", "sm_89", "--op", "fp8_gemm", "--json", "out/b.json"], ["--help"]]


def test_bench_runs_the_checkouts_bench_with_its_arguments(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # what cli._bench does, restored after the test
    bench_main = importlib.import_module("bench.__main__")
    seen = []
    monkeypatch.setattr(bench_main, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--quick", "--json", "out/bench.json"]) == 0
    assert seen == [["--quick", "--json", "out/bench.json"]]
    assert bench_main.__file__ == str(REPO / "bench" / "__main__.py")


def test_gpu_check_runs_the_script_with_the_callers_out_dir(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["gpu-check", "results"]) == 0
    assert seen == [["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "results")]]


def test_bench_and_gpu_check_need_a_source_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_CHECKOUT", tmp_path / "site-packages")  # an installed wheel: no bench/ beside it
    for command in ("bench", "gpu-check"):
        with pytest.raises(SystemExit) as info:
            cli.main([command])
        assert info.value.code == 2
        assert f"fastmoe-ops {command}: needs a source checkout" in capsys.readouterr().err


def test_gpu_check_help_is_the_scripts_usage_and_options_are_refused(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    assert cli.main(["gpu-check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "bash bench/gpu_check.sh [OUT_DIR]" in out and "summary.md" in out and not out.startswith("#")
    assert cli.main(["gpu-check", "--quick"]) == 2       # the script takes one folder, no options
    assert cli.main(["gpu-check", "a", "b"]) == 2
    assert "expected at most one argument, the output folder" in capsys.readouterr().err
    assert seen == [], "nothing may run (a '--help' folder was made before)"


def test_the_installed_console_script_runs():
    exe = shutil.which("fastmoe-ops")
    if exe is None:
        pytest.skip("the package is not installed here (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "build" in proc.stdout and "gpu-check" in proc.stdout
