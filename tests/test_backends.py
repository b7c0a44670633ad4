"""Engine selection, the SM budget, and launch-configuration validation."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import backends
from fastmoe_ops.runtime.launch import LaunchConfig


def test_reference_always_available():
    assert fmo.available_backends()[-1] == "reference"


def test_sim_is_built():
    """The simulator ships with the package: a CPU install that lacks it is broken."""
    assert "sim" in fmo.available_backends(), "fastmoe_ops.sim._simrt is not built: run `pip install -e .`"


def test_cpu_default_is_reference(monkeypatch):
    monkeypatch.delenv("FMO_BACKEND")  # tests/conftest.py sets sim for every test
    assert backends.engine_for(x=torch.zeros(1)) == "reference"


def test_use_backend_overrides_and_nests():
    x = torch.zeros(2)
    with fmo.use_backend("reference"):
        assert backends.engine_for(x=x) == "reference"
        if "sim" in fmo.available_backends():
            with fmo.use_backend("sim"):
                assert backends.engine_for(x=x) == "sim"
            assert backends.engine_for(x=x) == "reference"


def test_env_variable_selects_engine(monkeypatch):
    monkeypatch.setenv("FMO_BACKEND", "reference")
    assert backends.engine_for(x=torch.zeros(1)) == "reference"
    with fmo.use_backend("reference"):  # the context wins over the environment
        assert backends.engine_for(x=torch.zeros(1)) == "reference"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(fmo.InputError, match=r"use_backend\(name\): expected one of \('sim', 'reference'\).*got 'cuda'"):
        with fmo.use_backend("cuda"):
            pass
    monkeypatch.setenv("FMO_BACKEND", "tpu")
    with pytest.raises(fmo.InputError, match="FMO_BACKEND: expected one of .* got 'tpu'"):
        backends.engine_for(x=torch.zeros(1))


def test_engine_for_needs_a_tensor():
    with pytest.raises(fmo.InputError, match="engine_for: expected at least one tensor"):
        backends.engine_for(x=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_no_cuda_engine_without_gpu():
    assert "cuda" not in fmo.available_backends()


def test_sm_budget_defaults_and_overrides(monkeypatch):
    b = fmo.sm_budget()
    assert b.comm_sms == 20 and b.compute_sms == b.num_sms and b.compute_sms_during_comm == b.num_sms - 20
    monkeypatch.setenv("FMO_COMM_SMS", "24")
    assert fmo.sm_budget().comm_sms == 24
    with fmo.comm_sms(8):
        assert fmo.sm_budget().comm_sms == 8
        from fastmoe_ops.budget import communication_in_flight
        with communication_in_flight():
            assert fmo.sm_budget().compute_sms == fmo.sm_budget().num_sms - 8
        assert fmo.sm_budget().compute_sms == fmo.sm_budget().num_sms
    assert fmo.sm_budget().comm_sms == 24


def test_set_comm_sms_validates(monkeypatch):
    import fastmoe_ops.budget as smb

    monkeypatch.setattr(smb, "_comm_sms", None)
    for bad in (0, -3, 10_000, 2.5, True):
        with pytest.raises(fmo.InputError, match=r"set_comm_sms\(n\): expected"):
            fmo.set_comm_sms(bad)
    fmo.set_comm_sms(16)
    assert fmo.sm_budget().comm_sms == 16
    monkeypatch.setenv("FMO_COMM_SMS", "not-a-number")
    monkeypatch.setattr(smb, "_comm_sms", None)
    with pytest.raises(fmo.InputError, match="FMO_COMM_SMS: expected an integer"):
        fmo.sm_budget()


@pytest.mark.parametrize("grid, block, smem, fragment", [
    (0, 32, 0, "grid: expected 1 to 3 positive ints"),
    ((1, 2, 3, 4), 32, 0, "grid: expected 1 to 3 positive ints"),
    (1, 2048, 0, "block: expected at most 1024 threads, got 2048"),
    (1, (32, 32, 2), 0, "block: expected at most 1024 threads"),
    ((1, 70000), 32, 0, "grid: expected x < 2\\^31 and y, z <= 65535"),
    (1, 32, 300 * 1024, "shared_mem: expected 0..232448 bytes, got 307200"),
])
def test_launch_config_validation(grid, block, smem, fragment):
    with pytest.raises(fmo.InputError, match=fragment):
        LaunchConfig.make(grid, block, smem)


def test_launch_config_normalises():
    assert LaunchConfig.make(4, (32, 2)) == LaunchConfig((4, 1, 1), (32, 2, 1), 0)


def test_unsupported_spec_refused_by_its_check():
    from fastmoe_ops.ops.fp8_quant import Fp8GroupQuantSpec

    with pytest.raises(fmo.UnsupportedError, match="group_size must be a power of two"):
        Fp8GroupQuantSpec(dtype="bf16", group_size=96, vec_width=8, pow2_scale=False).stub()
    with pytest.raises(fmo.UnsupportedError, match="vec_width must be 1 or 4 for fp32"):
        Fp8GroupQuantSpec(dtype="fp32", group_size=128, vec_width=8, pow2_scale=False).stub()


def test_errors_form_one_hierarchy():
    for cls in (fmo.InputError, fmo.UnsupportedError, fmo.BackendError, fmo.CompileError, fmo.LaunchError,
                fmo.SimError, fmo.CommError, fmo.CommTimeoutError):
        assert issubclass(cls, fmo.FmoError)
    assert issubclass(fmo.InputError, ValueError) and issubclass(fmo.CommTimeoutError, TimeoutError)
