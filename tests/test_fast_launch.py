"""The C++ fast launch path (fastmoe_ops/runtime/fast_launch.py, csrc/launcher/fast_launch.cpp):
a hit gives the Python path's outputs bit for bit; anything the key covers, changed, misses
and revalidates; bad input raises as before; FMO_FAST_LAUNCH=0 and a failed build fall back;
the cuda target passes cuLaunchKernel exactly the Python path's grid, block, shared memory
and Params bytes; the CUDA branch compiles.

Outputs of a hit start as 0xFF bytes (NaN in every float format) so an element the
replayed launch did not write fails the comparison."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops import budget
from fastmoe_ops.errors import InputError
from fastmoe_ops.ops import fp8_block_quant, fp8_quant
from fastmoe_ops.runtime import fast_launch

from conftest import assert_bitwise_equal
from host_sync_util import guarded

pytestmark = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    """The extension loaded (built on first use), empty tables, hits' outputs poisoned."""
    monkeypatch.setenv("FMO_FAST_LAUNCH", "1")
    m = fast_launch.module()
    if m is None:
        pytest.skip(f"fast launch extension unavailable: {fast_launch._state.get('error')}")
    fast_launch.clear_all()
    m.poison_outputs(True)
    yield m
    m.poison_outputs(False)


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _fp8_operands(m, n, k, seed):
    """(xq, xs, wq, ws) of random bf16 data, quantised by the reference."""
    from fastmoe_ops.reference import fp8 as ref

    xq, xs = ref.quantize_per_token_group(_bf16(m, k, seed=seed).float())
    wq, ws = ref.quantize_per_block(_bf16(n, k, seed=seed + 1).float())
    return xq, xs, wq, ws


# name -> (the op's Table, make(seed) -> args for call, call(*args) -> outputs)
ROUTED = {
    "fp8.quantize_per_token_group": (
        lambda: fp8_quant._FAST, lambda s: (_bf16(3, 256, seed=s),),
        lambda x: fmo.fp8.quantize_per_token_group(x)),
    "fp8.quantize_per_token_group[pow2, strided rows]": (
        lambda: fp8_quant._FAST, lambda s: (_bf16(5, 264, seed=s)[:, :256],),
        lambda x: fmo.fp8.quantize_per_token_group(x, 64, pow2_scale=True)),
    "fp8.quantize_per_block": (
        lambda: fp8_block_quant._FAST_BLOCK, lambda s: (_bf16(200, 256, seed=s),),
        lambda w: fmo.fp8.quantize_per_block(w)),
    "fp8.quantize_per_token_group_transposed": (
        lambda: fp8_block_quant._FAST_TRANSPOSED, lambda s: (_bf16(40, 256, seed=s),),
        lambda x: fmo.fp8.quantize_per_token_group_transposed(x)),
}


def _outputs(result):
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


@pytest.mark.parametrize("name", list(ROUTED))
def test_hit_is_bitwise_the_python_path(name, monkeypatch):
    table, make, call = ROUTED[name]
    with fmo.use_backend("sim"):
        call(*make(0))                                   # a miss: recorded and filed
        assert len(table()) == 1, f"{name}: the call was not filed for the fast path"
        for seed in (1, 2):                              # fresh data, same signature: hits
            args = make(seed)
            hits = table().counts()[0]
            fast = _outputs(call(*args))
            assert table().counts()[0] == hits + 1, f"{name}: seed {seed} did not hit"
            monkeypatch.setenv("FMO_FAST_LAUNCH", "0")
            slow = _outputs(call(*args))
            monkeypatch.setenv("FMO_FAST_LAUNCH", "1")
            assert len(fast) == len(slow)
            for i, (a, b) in enumerate(zip(fast, slow)):
                assert a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
                assert_bitwise_equal(a, b, f"{name} output {i}", seed)


def test_changes_miss_and_revalidate(monkeypatch):
    validated = []
    real = fp8_quant._validate
    monkeypatch.setattr(fp8_quant, "_validate", lambda *a, **k: (validated.append(a), real(*a, **k)))
    monkeypatch.setattr(fp8_quant, "_shape_plans", {})   # the Python cache must not hide a miss
    table = fp8_quant._FAST
    x = _bf16(3, 256, seed=1)
    with fmo.use_backend("sim"):
        fmo.fp8.quantize_per_token_group(x)
        hits = table.counts()[0]
        fmo.fp8.quantize_per_token_group(x)
        assert len(validated) == 1 and table.counts()[0] == hits + 1
        changed = [(_bf16(3, 264, seed=2)[:, :256],), (x.half(),), (_bf16(4, 256),), (x, 64)]
        for args in changed:                                                     # stride, dtype, shape, option
            fmo.fp8.quantize_per_token_group(*args)
        assert len(validated) == 5
        with pytest.raises(InputError, match="group_size"):
            fmo.fp8.quantize_per_token_group(x, 128.0)                          # an option's type: refused
        assert len(validated) == 6
        fmo.fp8.quantize_per_token_group(x, pow2_scale=True)                    # keyword option
        fmo.fp8.quantize_per_token_group(x, eps=1e-6)
        assert len(validated) == 8
        # State the quantiser's own checks do not read (its Python cache keeps no budget): the
        # C++ table still misses, and the Python path decides.
        misses = table.counts()[1]
        with budget.comm_sms(7):                                                # the SM budget
            fmo.fp8.quantize_per_token_group(x)
        monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")                             # any FMO_* variable
        fmo.fp8.quantize_per_token_group(x)
        monkeypatch.delenv("FMO_SIM_MEMCHECK")
        assert table.counts()[1] == misses + 2
        hits = table.counts()[0]
        fmo.fp8.quantize_per_token_group(x)                                      # the first again: a hit
        assert len(validated) == 8 and table.counts()[0] == hits + 1
    with fmo.use_backend("reference"):                                           # the engine
        fmo.fp8.quantize_per_token_group(x)
        assert table.counts() == (hits + 1, misses + 3)
    misaligned = torch.empty(3 * 256 + 1, dtype=torch.bfloat16)[1:].view(3, 256)  # 16-byte alignment
    misaligned.copy_(x)
    with fmo.use_backend("sim"):
        fmo.fp8.quantize_per_token_group(misaligned)
        assert len(validated) == 9


def test_bad_input_raises_as_before():
    x = _bf16(3, 256, seed=1)
    with fmo.use_backend("sim"):
        fmo.fp8.quantize_per_token_group(x)
        for bad, match in ((x.t(), "contiguous last dimension"), (x[0], "2-D"), (x.int(), "dtype")):
            with pytest.raises(InputError, match=match):
                fmo.fp8.quantize_per_token_group(bad)
        with pytest.raises(InputError, match="eps"):
            fmo.fp8.quantize_per_token_group(x, eps=float("nan"))
        with pytest.raises(InputError, match="pow2_scale"):
            fmo.fp8.quantize_per_token_group(x, pow2_scale=1)


def test_not_keyed_calls_take_the_python_path():
    """A subclass, grad mode with a tensor that requires grad: no key, no hit, right answer."""
    class Sub(torch.Tensor):
        pass

    x = _bf16(3, 256, seed=1)
    with fmo.use_backend("sim"):
        want = fmo.fp8.quantize_per_token_group(x)
        table = fp8_quant._FAST
        before = table.counts()
        got = fmo.fp8.quantize_per_token_group(x.as_subclass(Sub))
        assert table.counts() == before
        assert_bitwise_equal(got[0].as_subclass(torch.Tensor), want[0], "subclass xq")


def test_disabled_takes_the_python_path(monkeypatch):
    x = _bf16(3, 256, seed=1)
    monkeypatch.setenv("FMO_FAST_LAUNCH", "0")
    before = fp8_quant._FAST.counts()
    with fmo.use_backend("sim"):
        fmo.fp8.quantize_per_token_group(x)
        fmo.fp8.quantize_per_token_group(x)
    assert len(fp8_quant._FAST) == 0 and fp8_quant._FAST.counts() == before


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(fast_launch, "_state", {})
    monkeypatch.setattr(fast_launch, "_load", broken)
    table = fast_launch.Table("test.broken")
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert table.call(1) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.call(1) is None          # once: no second warning
        assert table.record(lambda a: a + 1, 1) == 2


def test_no_host_reads_on_a_hit():
    x = _bf16(3, 256, seed=1)
    with fmo.use_backend("sim"):
        guarded(fmo.fp8.quantize_per_token_group, x)
        hits = fp8_quant._FAST.counts()[0]
        guarded(fmo.fp8.quantize_per_token_group, x)
        assert fp8_quant._FAST.counts()[0] > hits


LAUNCH_KERNEL = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


def test_cuda_target_packs_what_the_python_path_launches(fast):
    """A plan filed on `sim` replayed with a cuda target whose cuLaunchKernel is a ctypes
    callback: it gets the function handle, grid, block, shared memory, a null stream (CPU
    build) and exactly the Params bytes the Python path builds for the same tensors."""
    x = _bf16(5, 264, seed=3)[:, :256]
    with fmo.use_backend("sim"):
        recorded = []
        real_file = fast_launch._file
        fast_launch._file = lambda t, args, launches, result: recorded.append(fast_launch.describe(t, args, launches, result))
        try:
            fmo.fp8.quantize_per_token_group(x)
        finally:
            fast_launch._file = real_file
        outputs, launches, result, single = recorded[0]
        launches = [(name, params, patches, grid, block, smem, True, 0xC0FFEE, refs)
                    for name, params, patches, grid, block, smem, _, _, refs in launches]
        table = fast.Table("test.cuda_packing")
        args = (x, 128, False, 1e-12)
        assert table.add(args, (outputs, launches, result, single))

        seen = []

        def fake(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            p = fp8_quant.Fp8GroupQuantParams.from_address(params[0])
            seen.append((f, (gx, gy, gz), (bx, by, bz), smem, stream, bytes(memoryview(p).cast("B")), extra))
            return 0

        callback = LAUNCH_KERNEL(fake)
        fast.set_launch_kernel(ctypes.cast(callback, ctypes.c_void_p).value)
        xq, xs = table.bound_call()(*args)
        _, plan, _, _ = fp8_quant.prepare_quantize_per_token_group(x, 128, False, 1e-12)
        plan.params.xq, plan.params.xs = xq.data_ptr(), xs.data_ptr()
        assert seen == [(0xC0FFEE, plan.config.grid, plan.config.block, plan.config.shared_mem, None,
                         bytes(memoryview(plan.params).cast("B")), None)]

        def failing(*a):
            return 700  # CUDA_ERROR_ILLEGAL_ADDRESS

        callback = LAUNCH_KERNEL(failing)
        fast.set_launch_kernel(ctypes.cast(callback, ctypes.c_void_p).value)
        from fastmoe_ops.errors import LaunchError

        with pytest.raises(LaunchError, match="CUresult 700"):
            table.bound_call()(*args)
        fast.set_launch_kernel(0)


def test_cuda_branch_compiles(tmp_path):
    """The FMO_WITH_CUDA part (torch's current stream) passes the compiler's checks against
    this torch's headers and CUDA's; a CPU torch cannot link it, a CUDA build does."""
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None or not (cuda_include / "cuda_runtime_api.h").exists():
        pytest.skip("no host compiler or CUDA headers")
    from torch.utils.cpp_extension import include_paths

    # A CPU torch ships c10/cuda's headers but not the one its CMake generates in CUDA builds:
    # a stand-in with what that file defines for a shared-library build.
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    source = fast_launch._SOURCE
    cmd = [cxx, f"-idirafter{tmp_path}", "-fsyntax-only", "-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DFMO_WITH_CUDA", "-DTORCH_EXTENSION_NAME=fmo_fast_launch_check",
           f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}",
           *[f"-I{p}" for p in include_paths()], str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
