"""Every module of fastmoe_ops/moe/transports/ implements the one protocol: each method
of `Transport` with the same parameters, and a distinct handshake code (the Buffer's
handshake refuses ranks that picked different transports by that code). The transports'
behaviour is tested through the Buffer under mpirun (tests/mpi/test_moe_dispatch.py for
mpi, tests/mpi/test_moe_ipc.py for ipc on the simulator)."""
from __future__ import annotations

import inspect

import pytest

from fastmoe_ops.moe.transports import Transport
from fastmoe_ops.moe.transports.ipc import IpcTransport
from fastmoe_ops.moe.transports.mpi import MpiTransport

TRANSPORTS = [MpiTransport, IpcTransport]
METHODS = [name for name, v in vars(Transport).items() if inspect.isfunction(v) and not name.startswith("_")]


def test_protocol_names_the_operations():
    assert set(METHODS) == {"serves", "handshake_cells", "layout", "dispatch", "combine", "quiesce", "close"}, METHODS


@pytest.mark.parametrize("cls", TRANSPORTS, ids=lambda c: c.__name__)
def test_transport_implements_the_protocol(cls):
    for name in METHODS:
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__}.{name}: missing"
        want = list(inspect.signature(getattr(Transport, name)).parameters)
        got = list(inspect.signature(method).parameters)
        assert got == want, f"{cls.__name__}.{name}{tuple(got)}: expected parameters {tuple(want)}"
    assert isinstance(cls.code, int)


def test_codes_are_distinct():
    codes = [cls.code for cls in TRANSPORTS]
    assert len(set(codes)) == len(codes), codes
