"""Per-signature plans: a warm call looks its launch up instead of rebuilding it in Python.

A call's signature is its options, the engine its tensors get now, the SM budget's state
and each tensor's (dtype, shape, strides, device). Everything a launcher checks and chooses
is a function of it (validation of dtypes, shapes, contiguity and devices; the kernel and
its tiles; the grid; the Params but for the pointers), so a hit skips all of it and only the
pointers are filled in. Tensors whose data matter to validation (offsets read on the host)
or whose alignment does must put that in the options; a launcher caches only what its key
covers. Not plain torch.Tensors (subclasses, anything else): no key, the call runs uncached.
"""
from __future__ import annotations

import torch

from .. import backends
from ..budget import budget_state

LIMIT = 4096  # token counts vary per batch: bound the cache, rebuilding a plan is cheap


class PlanCache:
    __slots__ = ("_plans",)

    def __init__(self):
        self._plans: dict = {}

    def key(self, options: tuple, tensors: tuple):
        """The signature of a call with `tensors` (first one decides the engine) and
        `options`, or None when an operand is not a plain tensor."""
        for t in tensors:
            if t.__class__ is not torch.Tensor:
                return None
        engine = "cuda" if tensors[0].is_cuda else backends.cpu_engine()
        return (options, engine, budget_state(), *[(t.dtype, t.shape, t.stride(), t.get_device(), t.is_cpu) for t in tensors])

    def get(self, key, build):
        """The plan for `key`, built by `build()` (which validates, and raises on bad input:
        nothing is kept then) on a miss or when key is None."""
        try:
            plan = self._plans.get(key) if key is not None else None
        except TypeError:  # an unhashable option (a list where a number belongs): validation refuses it
            key = plan = None
        if plan is None:
            plan = build()
            if key is not None:
                if len(self._plans) >= LIMIT:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()
