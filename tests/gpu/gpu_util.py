"""Helpers shared by the tests in tests/gpu (a helper module, not a test file: test files
import from here, never from each other).

Every test file here starts with `pytestmark = needs_cuda`: the one marker of a test that
needs a CUDA device. It marks the tests `gpu` and skips them, saying why, where the `cuda`
engine cannot run (no device visible to torch, or no CuPy)."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo

DEV = torch.device("cuda")


def _why_no_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    if "cuda" not in fmo.available_backends():
        return "CuPy is not importable, and the cuda engine needs it (pip install 'fastmoe-ops[cuda]')"
    return None


WHY_NO_CUDA = _why_no_cuda()
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(WHY_NO_CUDA is not None, reason=str(WHY_NO_CUDA))]
