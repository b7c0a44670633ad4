"""Device provenance check for code paths that only CUDA tensors take, run on the CPU.

A machine without a GPU runs the device branches of the MoE code (staged transport, layout
and permute on the tensors' device) on CPU tensors, where a tensor made on the host by
mistake is on the same device as everything else and nothing fails. `DeviceTags` tells the
two apart by provenance: the tensors a test marks (the "device" inputs) are tagged, tags
follow every torch call made on tagged tensors, and a factory call (`torch.zeros`,
`torch.arange`, ...) gives a tagged tensor only when it names a device (`device=x.device`);
`.to(device)` tags too, except to the string "cpu"; `.cpu()` and pinned host buffers stay
untagged. Calls that mix the two are recorded where
CUDA would refuse them:
  * a host tensor indexed by device indices (`cpu[cuda_idx]`, what the first H200 run hit);
  * any other op over tensors of both kinds, except host scalars (0-d) with device tensors;
  * `.numpy()` of a device tensor (e.g. a device tensor handed to MPI as host memory).

Custom autograd Functions' backward run under the check too (their incoming gradients
are device tensors); torch's own backward nodes are not checked. Not a fake GPU: kernels,
streams and events are not modelled; only where tensors are made and how they are mixed.

    with device_tags() as tags:
        x, idx = tags.mark(x, idx)
        run_the_device_path(x, idx)
    assert not tags.violations, tags.report()
"""
from __future__ import annotations

import contextlib
import traceback

import torch
import torch.autograd.function as autograd_function
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_T = torch.Tensor
_TO_HOST = {_T.cpu, _T.numpy}
_MOVES = {_T.to}
_INDEXING = {_T.__getitem__, _T.__setitem__, _T.index_put_, _T.index_put, torch.index_put}
_CROSS_DEVICE = {_T.copy_, _T.record_stream}   # legal between host and device


class DeviceTags(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    # ------------------------------------------------------------------ tags
    def mark(self, *tensors):
        """Tag tensors (None and non-tensors pass) as device tensors; returns them (one, or a tuple)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t._fmo_on_device = True
        return tensors[0] if len(tensors) == 1 else tensors

    @staticmethod
    def on_device(t) -> bool:
        return isinstance(t, torch.Tensor) and getattr(t, "_fmo_on_device", False)

    def report(self) -> str:
        return f"{len(self.violations)} device mix-up(s):\n" + "\n".join(self.violations[:10])

    # ------------------------------------------------------------------ the check
    def _violation(self, func, why: str) -> None:
        """Recorded where the library (fastmoe_ops, bench) made the call; a test's own
        checks mix freely (on a GPU they compare after .cpu())."""
        caller = next((f for f in reversed(traceback.extract_stack()[:-3])
                       if "/torch/" not in f.filename and not f.filename.endswith("device_tags.py")), None)
        if caller is None or not ("/fastmoe_ops/" in caller.filename or "/bench/" in caller.filename):
            return
        where = f"{caller.filename}:{caller.lineno} ({caller.line})"
        name = getattr(func, "__qualname__", "")
        name = name if name and "pybind11" not in name else getattr(func, "__name__", str(func))   # torch.ops: bare name
        self.violations.append(f"{name}: {why} at {where}")

    def _check(self, func, args, kwargs, tensors) -> None:
        if func is _T.numpy and self.on_device(args[0]):
            self._violation(func, "numpy() of a device tensor")
        if func in _CROSS_DEVICE or func in _MOVES or func in _TO_HOST:
            return
        if func in _INDEXING:
            self_, rest = args[0], [t for t in tensors if t is not args[0]]
            if not self.on_device(self_) and any(self.on_device(t) for t in rest):
                self._violation(func, "a host tensor indexed by (or assigned from) device tensors")
            value = args[2] if len(args) > 2 else kwargs.get("values")
            if self.on_device(self_) and isinstance(value, torch.Tensor) and value.dim() and not self.on_device(value):
                self._violation(func, "a host tensor assigned into a device tensor")
            return
        device = [t for t in tensors if self.on_device(t)]
        host = [t for t in tensors if not self.on_device(t) and t.dim() > 0]
        if device and host:
            self._violation(func, f"device {[tuple(t.shape) for t in device]} and host {[tuple(t.shape) for t in host]} tensors together")

    def _tag_outputs(self, func, args, kwargs, tensors, out):
        """out, tagged; a move between host and device that torch answered with the same
        tensor (both are the CPU here) is given a copy, as a real transfer would be."""
        if func in _TO_HOST or func in _MOVES:
            named = [a for a in (kwargs.get("device"), *args[1:]) if isinstance(a, (torch.device, str))]
            if func in _TO_HOST:
                to_device = False
            elif named:   # .to(x.device) follows a tensor's device; .to("cpu") means the host
                to_device = not (isinstance(named[0], str) and named[0].startswith("cpu"))
            else:         # .to(dtype): stays where it was
                to_device = self.on_device(args[0])
            if out is args[0] and to_device != self.on_device(out):
                out = out.clone()
            if to_device:
                out._fmo_on_device = True
            return out
        if kwargs.get("device") is not None or any(self.on_device(t) for t in tensors):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and not any(t is i for i in tensors):   # in-place: keeps its tag
                    t._fmo_on_device = True
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self._check(func, args, kwargs, tensors)
        return self._tag_outputs(func, args, kwargs, tensors, func(*args, **kwargs))


@contextlib.contextmanager
def device_tags():
    """A DeviceTags mode, also active in custom autograd Functions' backward (whose incoming
    gradients it tags: autograd makes them on the forward outputs' device)."""
    tags = DeviceTags()
    real_apply = autograd_function.BackwardCFunction.apply

    def checked_apply(node, *grads):
        tags.mark(*grads)
        with tags:
            return real_apply(node, *grads)

    autograd_function.BackwardCFunction.apply = checked_apply
    try:
        with tags:
            yield tags
    finally:
        autograd_function.BackwardCFunction.apply = real_apply
