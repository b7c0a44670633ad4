"""A weight's FP8 form, kept between calls and re-quantised only when the weight changes:
shared by FP8Linear and MoELayer."""
from __future__ import annotations

import torch


class Fp8WeightCache:
    """`cache.get(w)` -> quantize(w), recomputed when `w` changed since the last call: an
    in-place update bumps `w._version`; a new tensor (load_state_dict, .to()) changes its
    address, device, dtype or shape."""

    def __init__(self, quantize):
        self._quantize = quantize
        self._key = None
        self._value = None

    def get(self, w: torch.Tensor):
        if torch.compiler.is_compiling():
            # A compiled graph quantises the weight itself (one node): it cannot keep Python
            # state keyed on the weight's version and address, and must see every optimizer step.
            return self._quantize(w.detach())
        key = (w._version, w.data_ptr(), w.device, w.dtype, tuple(w.shape))
        if key != self._key:
            with torch.no_grad():
                self._value = self._quantize(w.detach())
            self._key = key
        return self._value
