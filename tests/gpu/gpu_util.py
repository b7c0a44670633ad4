"""Helpers shared by the tests in tests/gpu (a helper module, not a test file: test files
import from here, never from each other).

- `needs_cuda`: the one marker of a test that needs a CUDA device. Every test file here
  starts with `pytestmark = needs_cuda`: it marks the tests `gpu` and skips them, saying why,
  where the `cuda` engine cannot run (no device visible to torch, or no CuPy).
- `capture_replay_check`: an op captured by torch.cuda.graph and replayed on new inputs under
  torch.cuda.set_sync_debug_mode("error"), bit for bit an eager call (test_cuda_graphs_gpu.py,
  and the multi-rank ipc static path in test_moe_gpu.py).
- `poison_cuda_allocations`: an autouse fixture (import it into a test file to use it) that
  poisons every CUDA tensor made by torch.empty / empty_like during a test, as
  tests/conftest.py does for CPU tensors, so an output element a kernel forgets to write
  fails the check instead of passing on what the caching allocator left there (often the
  previous, identical result)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastmoe_ops as fmo

from conftest import assert_bitwise_equal, poison_

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


@contextlib.contextmanager
def sync_debug_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def capture_replay_check(what, fn, inputs, fresh, seed, *, eager_reads_host=False):
    """Warm fn up on a side stream, capture it over `inputs` (static buffers), copy `fresh`
    into them, poison the captured outputs, replay, and compare with fn(*fresh) run eagerly.
    The warm-up runs in sync-debug mode too unless the op's eager call reads the host by
    design (eager_reads_host: varlen's offset check, skipped under capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), (contextlib.nullcontext() if eager_reads_host else sync_debug_error()):
        for _ in range(2):  # compiles and loads the kernels outside the capture
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), sync_debug_error():   # the graph's own set-up synchronises first
        outs = as_list(fn(*inputs))
    for static, new in zip(inputs, fresh):
        if isinstance(static, torch.Tensor):
            static.copy_(new)
    for o in outs:
        poison_(o)
    with sync_debug_error():
        graph.replay()
        graph.replay()  # twice: a replay must not depend on state the first one left
    torch.cuda.synchronize()
    got_all = [o.clone() for o in outs]   # before the eager call: an out= buffer is shared with it
    want = as_list(fn(*fresh))
    torch.cuda.synchronize()
    assert len(got_all) == len(want), what
    for i, (got, w) in enumerate(zip(got_all, want)):
        assert_bitwise_equal(bits(got).cpu(), bits(w).cpu(), f"{what}: replayed output {i}", seed)
