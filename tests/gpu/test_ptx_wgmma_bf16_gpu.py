"""ptx/wgmma_bf16.cuh on a Hopper GPU: every case of tests/ptx_cases/wgmma_bf16.py's gpu_cases()
(SS and RS, N 64..256, K-major and MN-major operands in every swizzle, bf16 and f16, scale-d)
launched through the wrappers and held to the numpy model's bits: one fused dot-add step per
k16 with HMMA's (25, 23) rule, ASSUMED for HGMMA (ptx/README.md). A failure on a random case
with the exact cases passing is the measurement that corrects the rule; a failing exact case is
a layout or fragment error. The simulator runs the same cases (same seed) through the same
wrappers against the same model (tests/test_ptx_wgmma_bf16.py), so passing here means device ==
model == simulator."""
from __future__ import annotations

import pytest
import torch

from gpu_util import WHY_NO_CUDA
from ptx_cases.runners import CudaRunner
from ptx_cases.wgmma_bf16 import SOURCE, gpu_cases

pytestmark = pytest.mark.gpu
SEED = 4321


@pytest.fixture(scope="module")
def runner():
    if WHY_NO_CUDA is not None:
        pytest.skip(WHY_NO_CUDA)
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma needs sm_90a (a Hopper GPU)")
    return CudaRunner(SOURCE, "sm_90a")


@pytest.mark.parametrize("index", range(len(gpu_cases(SEED))), ids=[c.name for c in gpu_cases(SEED)])
def test_gpu_hgmma_matches_model(runner, index):
    case = gpu_cases(SEED)[index]
    case.check(runner.run(case))
