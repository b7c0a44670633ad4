"""The engine a user gets: CPU tensors run `reference` (plain PyTorch) unless FMO_BACKEND or
use_backend asks for `sim`; the test suite asks for `sim` (tests/conftest.py). Errors that
depend on an environment variable name it (the kernel trace's FMO_TRACE)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmoe_ops as fmo
import fastmoe_ops.trace as ft
from fastmoe_ops import backends
from fastmoe_ops.reference import fp8 as reference
from fastmoe_ops.runtime import launch

from conftest import assert_bitwise_equal

ROOT = Path(__file__).resolve().parent.parent
needs_sim = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")


def test_cpu_tensors_default_to_reference_and_launch_no_kernel(monkeypatch):
    monkeypatch.delenv("FMO_BACKEND")
    seen = []
    monkeypatch.setattr(launch, "launch", lambda *a, **kw: seen.append(a))  # any kernel launch is recorded
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    xq, xs = fmo.fp8.quantize_per_token_group(x)
    rq, rs = reference.quantize_per_token_group(x, 128)
    assert_bitwise_equal(xq.view(torch.uint8), rq.view(torch.uint8), "default engine xq", 4)
    assert_bitwise_equal(xs, rs, "default engine xs", 4)
    assert backends.cpu_engine() == "reference" and seen == []


def test_a_fresh_process_without_the_variable_gets_reference():
    env = {k: v for k, v in os.environ.items() if k != "FMO_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = "import torch, fastmoe_ops.backends as b; print(b.engine_for(x=torch.zeros(1)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["reference"]


@needs_sim
def test_the_suite_runs_sim_and_both_switches_select_it(monkeypatch):
    assert os.environ["FMO_BACKEND"] == "sim" and backends.cpu_engine() == "sim"  # tests/conftest.py
    monkeypatch.delenv("FMO_BACKEND")
    with fmo.use_backend("sim"):
        assert backends.engine_for(x=torch.zeros(1)) == "sim"
    monkeypatch.setenv("FMO_BACKEND", "sim")
    assert backends.engine_for(x=torch.zeros(1)) == "sim"


def test_trace_error_names_fmo_trace_when_it_is_off(monkeypatch):
    monkeypatch.delenv("FMO_TRACE", raising=False)
    ft.clear()
    with pytest.raises(fmo.InputError, match=r"role 'comm'.*FMO_TRACE is not set to 1"):
        ft.overlapped_fraction(ft.collect(), "comm", "compute")


def test_trace_error_names_the_engine_when_tracing_is_on(tracing, monkeypatch):
    monkeypatch.setenv("FMO_BACKEND", "reference")
    fmo.fp8.quantize_per_token_group(torch.randn(2, 128))  # reference: PyTorch, no kernel, no record
    with pytest.raises(fmo.InputError, match=r"FMO_TRACE=1 is set; CPU tensors launch kernels only on the sim engine"):
        ft.in_flight_together(ft.collect(), "comm", "compute")
