"""Shared test helpers: seeded inputs, poisoning, and error reports that name the worst
coordinate, the shape and the seed."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

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
    """Fill with NaN (floats) or 0x7f.. bytes so an unwritten element fails the check."""
    if t.dtype.is_floating_point and t.element_size() > 1:
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(0x7F)  # 0x7f is NaN in e4m3
    return t


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor, what: str, seed=None) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
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


@pytest.fixture(autouse=True)
def _no_backend_env_leak(monkeypatch):
    monkeypatch.delenv("FMO_BACKEND", raising=False)
    yield


def pytest_report_header(config):
    return f"fastmoe_ops engines: {fastmoe_ops.available_backends()}; torch {torch.__version__}; FMO_CACHE_DIR={os.environ.get('FMO_CACHE_DIR', '(default)')}"
