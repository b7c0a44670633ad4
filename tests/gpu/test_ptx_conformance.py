"""Conformance of the ptx/ wrappers' CPU emulation with the GPU.

Every case of the wrapper families (tests/ptx_cases/: mma, ldmatrix, cp_async, ld_st, barrier,
wgmma, tma; the same cases tests/test_ptx_*.py run on the simulator) runs twice on the same seeded
inputs: on the device, compiled by the project's NVRTC path for the device's arch (sm_90a on
Hopper) and loaded and launched through the library's driver adapter
(fastmoe_ops/runtime/cuda_driver.py), and on the simulator. Each engine's outputs must pass the
case's own check against its ISA model, and the two engines must agree bit for bit wherever
the outcome is deterministic: data movement, and every MMA, random inputs included. The
simulator's tensor cores compute Hopper's arithmetic bit for bit (ptx/tensor_core_numerics.cuh),
and every MMA case's check asks both engines for exact bits: those of the numpy model of that
arithmetic (fastmoe_ops/reference/tensor_core.py), or float64's on inputs the rule rounds
nowhere. Cases whose outcome depends on which thread wins (atomics' old values, the
store-buffering trials) are held to their model alone, and an output that reads a race on
purpose (cp.async's region read before its group retires: poison in the simulator, whatever
the GPU holds there) is not compared; a case marked `sim_only` is not run here.

Skipped, with the reason, where the cuda engine cannot run (no device visible to torch, or no
CuPy behind the adapter) or the device predates sm_89 (the fp8 mma.sync wrappers); the wgmma
cases need sm_90a. One NVRTC compile per family, then a few dozen tiny launches.
"""
from __future__ import annotations

import pytest
import torch

from gpu_util import WHY_NO_CUDA
from ptx_cases import barrier, cp_async, ld_st, ldmatrix, mma, tma, wgmma, wgmma_e4m3_rs
from ptx_cases.case import assert_equal_bits
from ptx_cases.runners import CudaRunner, SimRunner

pytestmark = pytest.mark.gpu

FAMILIES = {
    "mma": mma,
    "ldmatrix": ldmatrix,
    "cp_async": cp_async,
    "ld_st": ld_st,
    "barrier": barrier,
    "wgmma": wgmma,  # sm_90a only
    "wgmma_e4m3_rs": wgmma_e4m3_rs,  # sm_90a only: the FP8 attention's O += P V (A = P in registers)
    "tma": tma,  # sm_90: TMA loads/stores/reduce-add (maps encoded per engine), mbarrier, elect, stmatrix
}
SM90A_ONLY = {"wgmma", "wgmma_e4m3_rs", "tma"}
SEED = 1234


def _device_arch() -> str:
    if WHY_NO_CUDA is not None:
        pytest.skip(WHY_NO_CUDA)
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
