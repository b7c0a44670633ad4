"""The host transport's native loops: combine's fixed-order sum on the CPU in a single pass
and dispatch's send layout in two (csrc/moe/host_combine.cpp), and the node-local
transport's reads and flags (csrc/moe/host_node.cpp, used by fastmoe_ops.moe.node). Built once with the host
compiler (the simulator's: FMO_SIM_CXX, else $CXX, else g++) into the kernel cache, shared
by every rank through the cache's lock and atomic rename; loaded with ctypes.

`combine(back, index, out[, bases])` returns False and `layout(...)` None when no host
compiler is available; the caller then takes the PyTorch formulation, which gives the same
result (tests compare the two)."""
from __future__ import annotations

import ctypes
import functools
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BackendError, CompileError
from ..runtime.cache import default_cache, make_key
from ..runtime.sources import kernel_root

SOURCES = ("csrc/moe/host_combine.cpp", "csrc/moe/host_node.cpp")
# No -march=native (the cache may be shared between machines) and no -ffast-math (the sum's
# order and rounding are the contract).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")
DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


@functools.lru_cache(maxsize=None)
def _library():
    from ..sim.compile import compiler, compiler_version

    try:
        cxx = compiler()
    except BackendError:
        return None
    texts = {name: (kernel_root() / name).read_text() for name in SOURCES}
    key = make_key({"sources": texts, "flags": FLAGS, "cxx": cxx, "cxx_version": compiler_version(cxx)})

    def build(out) -> None:
        files = [out.parent / name.rsplit("/", 1)[-1] for name in texts]   # a private build directory
        for path, text in zip(files, texts.values()):
            path.write_text(text)
        done = subprocess.run([cxx, *FLAGS, *map(str, files), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(f"{', '.join(SOURCES)}: host compile failed:\n{done.stderr[-4000:]}")

    lib = ctypes.CDLL(str(default_cache().get_or_build("host", key, ".so", build)))
    fn = lib.fmo_host_combine
    fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    fn.restype = ctypes.c_int
    lay = lib.fmo_host_layout
    lay.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lay.restype = None
    loc = lib.fmo_host_localize
    loc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    loc.restype = None
    node = {}
    for name, restype, args in _NODE_FUNCTIONS:
        f = getattr(lib, f"fmo_node_{name}")
        f.argtypes, f.restype = args, restype
        node[name] = f
    return _Native(fn, lay, loc, node)


_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_NODE_FUNCTIONS = (   # csrc/moe/host_node.cpp, those called from Python: (name, result, arguments)
    ("control_bytes", _I, [_I, _I]),
    ("handshake", _I, [_P, _I, _I, _I, _I, _P, _D, _P, _P]),
    ("signal_done", None, [_P, _I, _I, _I, _I]),
    ("wait_done", _I, [_P, _I, _I, _D, _P, _P]),
    ("read", ctypes.c_int, [_I, _P, _P, _P, _P, _P]),
    ("pack", None, [_P, _I, _I, _P, _P, _P, _I]),
    ("dispatch", ctypes.c_int, [_P, _I, _I, _I, _P, _P, _P, _P, _I, _P, _I, _P, _I, _I, _P, _P, _P]),
    ("combine_all", ctypes.c_int, [_P, _I, _I, _I, _P, _P, _P, _I, _P, _P, _I, _I, ctypes.c_int, _I, _P, _I, _P]),
)


@dataclass(frozen=True)
class _Native:
    combine: object
    layout: object
    localize: object
    node: dict   # the fmo_node_* functions by name


def node_functions() -> dict | None:
    """The node-local transport's native functions (see csrc/moe/host_node.cpp), or None
    when no host compiler is available."""
    lib = _library()
    return lib.node if lib is not None else None


def available() -> bool:
    return _library() is not None


def combine(back: torch.Tensor, index: torch.Tensor, out: torch.Tensor, bases=None) -> bool:
    """out [T, W] = for each t, the ascending-r fp32 sum of back[index[t, r]] (skipping -1),
    rounded once. back [S, W], out: contiguous CPU, one dtype of DTYPE_CODE; index [T, R]
    int64 contiguous. bases: R addresses replacing back's, row i of rank r's rows at
    bases[r] + i * row bytes (rows read where they lie, e.g. this rank's own in y); the
    caller keeps those tensors alive. False (nothing written) when no host compiler is
    available."""
    lib = _library()
    if lib is None:
        return False
    assert back.is_contiguous() and out.is_contiguous() and index.is_contiguous() and back.dtype == out.dtype
    ranks = index.shape[1]
    addr = (ctypes.c_int64 * max(ranks, 1))(*(bases if bases is not None else [back.data_ptr()] * ranks))
    rc = lib.combine(addr, index.data_ptr(), out.data_ptr(), out.shape[0], ranks, out.shape[1], DTYPE_CODE[out.dtype])
    if rc != 0:
        raise BackendError(f"fmo_host_combine: unsupported dtype {out.dtype}")
    return True


def layout(topk_idx: torch.Tensor, ranks: int, per: int):
    """Dispatch's send layout in one native pass: (counts [R] int64 numpy, pos [T, R],
    combine_index [T, R], send_src [S]) as fastmoe_ops.moe.host.Layout describes them, or
    None when no host compiler is available. topk_idx: [T, k] int64 CPU, values in [-1, ranks * per)."""
    lib = _library()
    if lib is None:
        return None
    idx = topk_idx.contiguous()
    t, k = idx.shape
    counts = np.zeros(ranks, np.int64)
    pos = torch.empty(t, ranks, dtype=torch.int64)
    index = torch.empty(t, ranks, dtype=torch.int64)
    send_src = torch.empty(t * ranks, dtype=torch.int64)
    lib.layout(idx.data_ptr(), t, k, ranks, per, counts.ctypes.data, pos.data_ptr(), index.data_ptr(), send_src.data_ptr())
    return counts, pos, index, send_src[: int(counts.sum())]


def localize(recv_idx: torch.Tensor, recv_w: torch.Tensor | None, first: int, per: int):
    """(local ids [N, k], local weights [N, k] or None, tokens_per_expert [per] int64) of
    received rows, as fastmoe_ops.moe.buffer computes them with tensor ops (ids of experts
    [first, first + per) made local, others -1; weights kept there, +0 elsewhere), in one
    native pass; None when no host compiler is available. recv_idx: contiguous int64 CPU,
    recv_w: contiguous fp32 CPU like it."""
    lib = _library()
    if lib is None:
        return None
    rows, k = recv_idx.shape
    local_idx = torch.empty_like(recv_idx)
    local_w = torch.empty_like(recv_w) if recv_w is not None else None
    counts = torch.empty(per, dtype=torch.int64)
    lib.localize(recv_idx.data_ptr(), recv_w.data_ptr() if recv_w is not None else None, rows, k, first, per,
                 local_idx.data_ptr(), local_w.data_ptr() if local_w is not None else None, counts.data_ptr())
    return local_idx, local_w, counts
