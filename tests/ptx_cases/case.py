"""A `Case` of the ptx/ wrapper tests and the comparisons its checks use."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

POISON_BYTE = 0xFF  # NaN as f32/f16/bf16, and what the simulator's un-landed cp.async shows


@dataclass
class Case:
    """One kernel launch. `args` are numpy arrays (become tensors) and numpy scalars
    (passed by value); `outputs` indexes the arrays that are poisoned and read back.
    `check(outs)` asserts the outputs against the model; `deterministic` says whether
    two engines must agree bit for bit (false where atomics' return order varies)."""

    name: str
    kernel: str
    grid: tuple
    block: tuple
    args: list
    outputs: Sequence[int]
    check: Callable[[list], None]
    shared_mem: int = 0
    deterministic: bool = True
    sim_only: bool = False  # relies on the simulator's defined behaviour of a GPU race/UB
    gpu_outputs: Sequence[int] | None = None  # outputs compared across engines (default: all)
    extra: dict = field(default_factory=dict)


def poisoned(shape, dtype) -> np.ndarray:
    a = np.empty(shape, dtype)
    a.view(np.uint8).fill(POISON_BYTE)
    return a


def assert_equal_bits(got: np.ndarray, want: np.ndarray, what: str, seed=None) -> None:
    """Bitwise equality of two arrays of the same dtype; names the first differing index."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g = np.ascontiguousarray(got).view(np.uint8).reshape(got.shape + (-1,)) if got.ndim else got
    w = np.ascontiguousarray(want).view(np.uint8).reshape(want.shape + (-1,)) if want.ndim else want
    bad = (g != w).any(axis=-1) if got.ndim else (g != w)
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ bitwise; first at {idx}: "
            f"got {got[idx]!r}, want {want[idx]!r} (shape {got.shape}, seed {seed})")


def assert_close_f64(got: np.ndarray, want: np.ndarray, tol: np.ndarray | float, what: str, seed=None) -> None:
    """|got - want| <= tol elementwise (NaN never passes); names the worst coordinate."""
    err = np.abs(got.astype(np.float64) - want)
    excess = np.where(np.isnan(err), np.inf, err - tol)
    if np.any(excess > 0):
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
        t = tol[idx] if isinstance(tol, np.ndarray) else tol
        raise AssertionError(
            f"{what}: worst at {idx}: got {got[idx]!r}, want {want[idx]!r}, |err| {err[idx]:.3g} > tol {t:.3g} "
            f"({int((excess > 0).sum())} of {got.size} out of tolerance; shape {got.shape}, seed {seed})")
