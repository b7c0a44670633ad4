"""Shared test helpers: seeded inputs, poisoning, and error reports that name the worst
coordinate, the shape and the seed."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
import torch._dynamo  # for the trace-rule table built below

import fastmoe_ops


def cpu_engines() -> list[str]:
    """Both CPU engines are always tested; `sim` missing is reported by test_sim_is_built."""
    return [e for e in ("sim", "reference") if e in fastmoe_ops.available_backends()]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache for this test (and no in-process hits from earlier tests)."""
    from fastmoe_ops.runtime import cache

    monkeypatch.setenv("FMO_CACHE_DIR", str(tmp_path / "cache"))
    cache.default_cache().clear_memory()
    yield tmp_path / "cache"
    cache.default_cache().clear_memory()


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or 0x7f bytes (NaN in e4m3, a huge value in integers) so an
    unwritten element fails the check."""
    with torch.no_grad():
        if t.dtype.is_floating_point and t.element_size() > 1:
            t.fill_(float("nan"))
        elif t.dim() > 0 and t.is_contiguous():
            t.view(torch.uint8).fill_(0x7F)
    return t


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor, what: str, seed=None) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    a = out.contiguous().view(torch.uint8).reshape(out.shape + (-1,)) if out.dim() else out
    b = ref.contiguous().view(torch.uint8).reshape(ref.shape + (-1,)) if ref.dim() else ref
    diff = (a != b).reshape(-1, a.shape[-1]).any(dim=-1) if out.dim() else (a != b)
    if bool(diff.any()):
        flat = int(diff.nonzero()[0, 0])
        coord = np.unravel_index(flat, tuple(out.shape))
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {out.numel()} elements differ bitwise; first at {tuple(int(c) for c in coord)}: "
            f"got {out[coord].item()!r}, want {ref[coord].item()!r} (shape {tuple(out.shape)}, seed {seed})"
        )


# torch.compile's table of torch functions is built once, on first use, by looking each one
# up by name: built while the fixture below has torch.empty patched, it would hold the patch
# and miss the real function, which dynamo then refuses to trace. Build it before any patch.
torch._dynamo.trace_rules.get_torch_obj_rule_map()


@pytest.fixture(autouse=True)
def _poison_new_tensors(monkeypatch):
    """Every tensor made with torch.empty / empty_like during a test starts as poison, so an
    element a kernel (or a reference) forgets to write fails the comparison instead of
    passing on whatever the allocator left there: often the previous, identical result."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if torch.compiler.is_compiling() or t.device.type != "cpu" or t.numel() == 0 or t.is_complex():
            return t
        return poison_(t)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))
    yield


def _test_engine() -> str:
    """The CPU engine every test runs unless it names one: the simulator, so tests exercise
    the kernels' own source (users' default is `reference`: fastmoe_ops/backends.py)."""
    return "sim" if "sim" in fastmoe_ops.available_backends() else "reference"


# Set at import too, so collection, session fixtures and subprocesses (mpirun children read
# the same conftest) see it before any per-test fixture runs.
os.environ["FMO_BACKEND"] = _test_engine()


@pytest.fixture(autouse=True)
def _test_backend(monkeypatch):
    """FMO_BACKEND=sim for every test, whatever the caller's shell had (a leak of either
    engine into the suite would change what it tests); tests of the default unset it."""
    monkeypatch.setenv("FMO_BACKEND", _test_engine())
    yield


@pytest.fixture
def tracing(monkeypatch):
    """FMO_TRACE=1 and an empty trace for the test, cleared after it (CPU and GPU trace tests)."""
    import fastmoe_ops.trace as ft

    monkeypatch.setenv("FMO_TRACE", "1")
    ft.clear()
    yield
    ft.clear()


def pytest_report_header(config):
    return f"fastmoe_ops engines: {fastmoe_ops.available_backends()}; torch {torch.__version__}; FMO_CACHE_DIR={os.environ.get('FMO_CACHE_DIR', '(default)')}"


def pytest_collection_finish(session):
    """Freeze what collection left alive (torch, torch._dynamo, the package, every test
    module: objects that live as long as the process) into the collector's permanent
    generation: each full cyclic collection walked them all again, about a quarter of a
    simulator attention test's CPU time (7.3 s -> 5.4 s user measured on one
    test_attention_hopper_bwd case). Garbage is collected first, so none is kept; what the
    tests create is collected as usual."""
    gc.collect()
    gc.freeze()
