"""The README's single-process examples run as written (the MoE one runs under mpirun:
tests/mpi/test_moe_example.py)."""
import pytest
import torch

import fastmoe_ops

from readme_util import run_readme_example

pytestmark = pytest.mark.skipif("sim" not in fastmoe_ops.available_backends(),
                                reason="simulator not built (test_sim_is_built fails instead)")


def test_readme_sim_example_runs():
    ns = run_readme_example("## Run and test your CUDA kernels on a CPU")
    assert not ns["out"].isnan().any()


def test_readme_fp8_example_runs():
    ns = run_readme_example("## FP8 GEMM with fine-grained scaling")
    assert ns["layer"].weight.grad is not None


def test_readme_attention_example_runs():
    ns = run_readme_example("## Fused attention")
    assert ns["q"].grad is not None and not ns["q"].grad.isnan().any()
    assert ns["o"].shape == (20, 8, 64) and not ns["o"].isnan().any()


def test_readme_streams_and_trace_example_runs(monkeypatch):
    monkeypatch.setenv("FMO_TRACE", "1")
    ns = run_readme_example("### Streams and the kernel trace")
    assert torch.equal(ns["xq"].view(torch.uint8), ns["yq"].view(torch.uint8)) and torch.equal(ns["xs"], ns["ys"])
    roles = {iv.role for iv in ns["intervals"]}
    assert {"comm", "compute"} <= roles, roles   # the module runs on the sim engine (skipped without it)
