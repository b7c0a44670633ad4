"""Helpers shared by the tests in tests/gpu (a helper module, not a test file: test files
import from here, never from each other).

- `needs_cuda`: the one marker of a test that needs a CUDA device. Every test file here
  starts with `pytestmark = needs_cuda`: it marks the tests `gpu` and skips them, saying why,
  where the `cuda` engine cannot run (no device visible to torch, or no CuPy).
- `poison_cuda_allocations`: an autouse fixture (import it into a test file to use it) that
  poisons every CUDA tensor made by torch.empty / empty_like during a test, as
  tests/conftest.py does for CPU tensors, so an output element a kernel forgets to write
  fails the check instead of passing on what the caching allocator left there (often the
  previous, identical result)."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo

from conftest import poison_

DEV = torch.device("cuda")


def _why_no_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    if "cuda" not in fmo.available_backends():
        return "CuPy is not importable, and the cuda engine needs it (pip install 'fastmoe-ops[cuda]')"
    return None


WHY_NO_CUDA = _why_no_cuda()
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(WHY_NO_CUDA is not None, reason=str(WHY_NO_CUDA))]


@pytest.fixture(autouse=True)
def poison_cuda_allocations(monkeypatch):
    empty, empty_like = torch.empty, torch.empty_like   # already poisoning CPU tensors (tests/conftest.py)

    def poisoned(t):
        # fill_ runs on the current stream, the one the allocation belongs to: ordered before the kernel
        if t.device.type == "cuda" and t.numel() and not t.is_complex() and not torch.compiler.is_compiling():
            poison_(t)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(empty_like(*a, **kw)))
    yield
