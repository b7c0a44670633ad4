"""The host-read guard of tests/test_host_syncs.py and tests/mpi: inside no_host_reads(),
every Tensor method that reads values on the host (on a GPU: a stream synchronisation, illegal
in a CUDA-graph capture) raises HostRead."""
from __future__ import annotations

import contextlib

import torch

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Every Tensor method that reads its values on the host raises HostRead inside."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name}() inside the op: on a GPU a host synchronisation")
        return method

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def guarded(fn, *args, **kwargs):
    """fn once unguarded (compiles the kernels: the compiler's own work is not the hot
    path), then guarded: the warm call, what a captured graph or a decode loop repeats."""
    fn(*args, **kwargs)
    with no_host_reads():
        return fn(*args, **kwargs)
