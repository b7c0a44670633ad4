"""One SM budget shared by every kernel.

Communication kernels launch exactly `comm_sms` persistent CTAs; compute kernels with
persistent grids size them to `num_sms - comm_sms` while communication is in flight and to
`num_sms` otherwise. DeepSeek-V3 reserved 20 of the H800's 132 SMs this way, hence the
default (FMO_COMM_SMS). The budget is process-wide and plain data, so a config heuristic
that reads it is a pure function of (shape, budget, world size) and identical on every rank.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from . import env
from .errors import InputError

# A CPU-only machine has no SMs; the simulator models an H100/H200 SXM (132 SMs), so grids
# chosen on the CPU are the grids a Hopper GPU would get.
SIMULATED_NUM_SMS = 132


@dataclass(frozen=True)
class SmBudget:
    num_sms: int
    comm_sms: int
    comm_in_flight: bool

    @property
    def compute_sms(self) -> int:
        """SMs a persistent compute kernel may fill now."""
        return self.num_sms - self.comm_sms if self.comm_in_flight else self.num_sms

    @property
    def compute_sms_during_comm(self) -> int:
        return self.num_sms - self.comm_sms


_lock = threading.Lock()
_comm_sms: int | None = None
_in_flight = 0


def device_num_sms(device: torch.device | int | None = None) -> int:
    """SMs of the CUDA device (current one by default); the simulated count elsewhere."""
    if not torch.cuda.is_available():
        return SIMULATED_NUM_SMS
    if device is None:
        index = torch.cuda.current_device()
    else:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            return SIMULATED_NUM_SMS
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _validated(n: int, num_sms: int, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool):
        raise InputError(f"{what}: expected an int, got {type(n).__name__}")
    if not 1 <= n < num_sms:
        raise InputError(f"{what}: expected 1 <= n < {num_sms} (the device's SMs; compute needs at least one), got {n}")
    return n


def set_comm_sms(n: int) -> None:
    """Reserve `n` SMs for communication kernels (process-wide)."""
    global _comm_sms
    _validated(n, device_num_sms(), "set_comm_sms(n)")
    with _lock:
        _comm_sms = n


def sm_budget(device: torch.device | int | None = None) -> SmBudget:
    num = device_num_sms(device)
    comm = _comm_sms if _comm_sms is not None else _validated(env.integer("FMO_COMM_SMS"), num, "FMO_COMM_SMS")
    return SmBudget(num_sms=num, comm_sms=min(comm, num - 1), comm_in_flight=_in_flight > 0)


def budget_state() -> tuple:
    """What sm_budget() reads besides the device, without reading the device: a plan cache's
    key part (fastmoe_ops/runtime/plans.py), cheap enough for every call."""
    return (_comm_sms, env.raw("FMO_COMM_SMS"), _in_flight > 0)


@contextlib.contextmanager
def comm_sms(n: int):
    """Temporarily reserve `n` SMs for communication."""
    global _comm_sms
    _validated(n, device_num_sms(), "comm_sms(n)")
    with _lock:
        previous, _comm_sms = _comm_sms, n
    try:
        yield
    finally:
        with _lock:
            _comm_sms = previous


@contextlib.contextmanager
def communication_in_flight():
    """Marks the span in which communication kernels hold their SMs (entered by the comm
    layer around its kernels); compute heuristics read it through `sm_budget()`."""
    global _in_flight
    with _lock:
        _in_flight += 1
    try:
        yield
    finally:
        with _lock:
            _in_flight -= 1
