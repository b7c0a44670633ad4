"""FMO_COMPILER picks the cuda engine's run-time compiler (checked without a GPU by
recording which compiler the launcher asks for)."""
from __future__ import annotations

import pytest

from fastmoe_ops.errors import InputError
from fastmoe_ops.runtime import launch


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake(which, fail=False):
        def compile_(stub, name, arch):
            seen.append(which)
            if fail:
                raise RuntimeError(f"{which} failed")
            return which
        return compile_

    monkeypatch.setattr(launch, "compile_nvrtc", fake("nvrtc", fail=True))
    monkeypatch.setattr(launch, "compile_nvcc", fake("nvcc"))
    return seen


@pytest.mark.parametrize("choice, expected", [("nvcc", ["nvcc"]), ("auto", ["nvrtc", "nvcc"])])
def test_choice(monkeypatch, calls, choice, expected):
    monkeypatch.setenv("FMO_COMPILER", choice)
    monkeypatch.setenv("FMO_NVCC", "/usr/local/cuda/bin/nvcc")  # auto falls back only where nvcc is named
    assert launch._compile_for_device("stub", "k", "sm_90a") == "nvcc"
    assert calls == expected


def test_nvrtc_only_does_not_fall_back(monkeypatch, calls):
    monkeypatch.setenv("FMO_COMPILER", "nvrtc")
    with pytest.raises(RuntimeError, match="nvrtc failed"):
        launch._compile_for_device("stub", "k", "sm_90a")
    assert calls == ["nvrtc"]


def test_unknown_choice_is_refused(monkeypatch, calls):
    monkeypatch.setenv("FMO_COMPILER", "clang")
    with pytest.raises(InputError, match="FMO_COMPILER: expected 'auto', 'nvrtc' or 'nvcc', got 'clang'"):
        launch._compile_for_device("stub", "k", "sm_90a")
    assert calls == []
