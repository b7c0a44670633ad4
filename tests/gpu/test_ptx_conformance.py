"""Conformance of the ptx/ wrappers' CPU emulation with the GPU.

Every case of tests/test_ptx_{mma,ldmatrix,cp_async,ld_st,barrier,wgmma}.py runs through
cupy.RawModule (NVRTC, the device's arch; sm_90a on Hopper) and through the simulator on
the same seeded inputs. Each engine's outputs must pass the case's own ISA-model check, and
the two engines must agree bit for bit wherever the outcome is deterministic: data
movement always, MMAs on exactly representable inputs (small integers times powers of two,
so every partial sum is exact in fp32 whatever the hardware's accumulation order).
Random-input MMAs are order-dependent in the last bits: both engines are held to the
fp32-accumulation bound instead. Cases that read a GPU race on purpose (the simulator's
poison after a missing cp.async wait) are simulator-only and not run here.

Skipped, with the reason, without a CUDA device or without CuPy. Runs in well under two
minutes on one H200 (one NVRTC compile per source file, a few dozen tiny launches).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the case modules

import test_ptx_barrier  # noqa: E402
import test_ptx_cp_async  # noqa: E402
import test_ptx_ld_st  # noqa: E402
import test_ptx_ldmatrix  # noqa: E402
import test_ptx_mma  # noqa: E402
import test_ptx_wgmma  # noqa: E402
from test_ptx_support import CudaRunner, SimRunner, assert_equal_bits  # noqa: E402

pytestmark = pytest.mark.gpu

FAMILIES = {
    "mma": test_ptx_mma,
    "ldmatrix": test_ptx_ldmatrix,
    "cp_async": test_ptx_cp_async,
    "ld_st": test_ptx_ld_st,
    "barrier": test_ptx_barrier,
    "wgmma": test_ptx_wgmma,  # sm_90a only
}
SM90A_ONLY = {"wgmma"}
SEED = 1234


def _device_arch() -> str:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch (torch.cuda.is_available() is False)")
    try:
        import cupy
    except ImportError as e:
        pytest.skip(f"CuPy is not installed ({e}); pip install 'fastmoe-ops[cuda]'")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy sees no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as e:
        pytest.skip(f"CuPy cannot reach a CUDA device: {e}")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        pytest.skip(f"device is sm_{major}{minor}; the fp8 mma.sync wrappers need sm_89 or newer")
    # Hopper's architecture-specific target (wgmma and friends live behind sm_90a).
    return f"sm_{major}{minor}a" if major == 9 else f"sm_{major}{minor}"


@pytest.fixture(scope="module")
def arch() -> str:
    return _device_arch()


@pytest.fixture(scope="module")
def runners(arch):
    """(cuda, sim) runner per family, built once."""
    return {name: (CudaRunner(mod.SOURCE, arch), SimRunner(mod.SOURCE)) for name, mod in FAMILIES.items()
            if name not in SM90A_ONLY or arch == "sm_90a"}


def _cases():
    for name, mod in FAMILIES.items():
        for i, case in enumerate(mod.cases(SEED)):
            if not case.sim_only:
                yield pytest.param(name, i, id=f"{name}-{i}-{case.name}")


@pytest.mark.parametrize("family,index", list(_cases()))
def test_gpu_matches_model_and_simulator(runners, family, index):
    case = FAMILIES[family].cases(SEED)[index]
    if family not in runners:
        pytest.skip(f"{family}: needs sm_90a (wgmma), the device is not Hopper")
    cuda, sim = runners[family]
    got_gpu = cuda.run(case)
    got_sim = sim.run(case)
    if case.check is not None:
        try:
            case.check(got_gpu)
        except AssertionError as e:
            raise AssertionError(f"[GPU {cuda.engine}] {case.name}: {e}") from None
        case.check(got_sim)
    if case.deterministic:
        keep = case.gpu_outputs if case.gpu_outputs is not None else range(len(got_gpu))
        for k in keep:
            assert_equal_bits(got_sim[k], got_gpu[k], f"{case.name}: simulator vs GPU, output {k}", SEED)


def test_every_family_has_cases():
    """A family whose cases() went empty would pass silently above."""
    for name, mod in FAMILIES.items():
        assert len([c for c in mod.cases(SEED) if not c.sim_only]) > 0, f"{name}: no GPU cases"
