"""Planted bugs the CPU SIMT simulator must catch, each with a message naming the culprit."""
import re

import numpy as np
import pytest

from fastmoe_ops import sim
from fastmoe_ops.errors import InputError, SimError

pytestmark = pytest.mark.skipif(not sim.available(), reason="simulator extension or host compiler missing")

SEED = 99


REVERSE = r'''
extern "C" __global__ void reverse(const float* x, float* y) {
  __shared__ float s[128];
  s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
#ifndef PLANT_BUG
  __syncthreads();
#endif
  y[blockIdx.x * blockDim.x + threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}
'''


def test_missing_syncthreads_is_a_race(monkeypatch):
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    x = np.random.default_rng(SEED).standard_normal(256).astype(np.float32)
    y = np.full(256, np.nan, np.float32)
    good = sim.RawModule(code=REVERSE).get_function("reverse")
    good((2,), (128,), (x, y))
    np.testing.assert_array_equal(y, x.reshape(2, 128)[:, ::-1].ravel())
    bad = sim.RawModule(code=REVERSE, options=("-DPLANT_BUG",)).get_function("reverse")
    with pytest.raises(SimError) as e:
        bad((2,), (128,), (x, y))
    msg = str(e.value)
    # both blocks carry the race and run on parallel workers: whichever meets it first reports
    assert "reverse" in msg and "shared-memory race" in msg and re.search(r"block \([01],0,0\)", msg)
    # threads run in order, so thread 64's write meets thread 63's earlier read of s[64]
    assert "write of 4 bytes at shared variable `reverse::s` byte offset 256" in msg
    assert "conflicts with a read by thread (63,0,0)" in msg


def test_same_warp_without_syncwarp_is_a_race_and_syncwarp_fixes_it(monkeypatch):
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    src = r'''
    extern "C" __global__ void shift(int* out) {
      __shared__ int s[32];
      s[threadIdx.x] = threadIdx.x;
    #ifdef FIX
      __syncwarp();
    #endif
      out[threadIdx.x] = s[(threadIdx.x + 1) % 32];
    }'''
    out = np.full(32, -1, np.int32)
    sim.RawModule(code=src, options=("-DFIX",)).get_function("shift")((1,), (32,), (out,))
    np.testing.assert_array_equal(out, (np.arange(32) + 1) % 32)
    with pytest.raises(SimError, match="shared-memory race"):
        sim.RawModule(code=src).get_function("shift")((1,), (32,), (out,))


OOB = r'''
extern "C" __global__ void fill(float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
#ifdef PLANT_BUG
  y[i] = 1.f;        // no bounds check: the last block writes past the end
#else
  if (i < n) y[i] = 1.f;
#endif
}
'''


def test_out_of_bounds_store_memcheck(monkeypatch):
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    y = np.full(100, np.nan, np.float32)
    sim.RawModule(code=OOB).get_function("fill")((2,), (64,), (y, np.int32(100)))
    assert (y == 1).all()
    bad = sim.RawModule(code=OOB, options=("-DPLANT_BUG",)).get_function("fill")
    with pytest.raises(SimError) as e:
        bad((2,), (64,), (y, np.int32(100)))
    msg = str(e.value)
    assert "fill" in msg and "out-of-bounds global write of 4 bytes" in msg
    assert "block (1,0,0)" in msg and "nearest tensor: argument 0" in msg and "past its end" in msg


WRITE_AT = r'''extern "C" __global__ void write_at(float* y, int i) { y[i] = 1.f; }'''


def test_memcheck_bounds_a_view_not_its_storage(monkeypatch):
    """A slice passed as an argument allows its own elements only: one past its end is
    outside, although the storage behind it goes on (torch and numpy alike)."""
    import torch

    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    f = sim.RawModule(code=WRITE_AT).get_function("write_at")
    for y in (torch.zeros(1024)[:1000], np.zeros(1024, np.float32)[:1000]):
        f((1,), (1,), (y, np.int32(999)))
        assert y[999] == 1
        with pytest.raises(SimError, match=r"write_at.*out-of-bounds global write of 4 bytes.*nearest tensor: argument 0.*past its end"):
            f((1,), (1,), (y, np.int32(1000)))


def test_memcheck_bounds_a_launcher_tensor_view(monkeypatch):
    """The launcher's tensors (behind a Params struct) are bounded the same way: a scale
    output one group short, cut from a larger buffer, is caught at the kernel's store."""
    import torch

    from fastmoe_ops.ops import fp8_quant as q
    from fastmoe_ops.runtime.launch import LaunchConfig, launch

    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    x = torch.randn(4, 256)
    xq = torch.empty(4, 256, dtype=torch.float8_e4m3fn)
    xs = torch.empty(64)[:4 * 2 - 1]  # one scale short; the storage behind it is not
    spec = q.Fp8GroupQuantSpec("fp32", 128, 4, False)
    params = q.Fp8GroupQuantParams(x=x.data_ptr(), xq=xq.data_ptr(), xs=xs.data_ptr(), rows=4, cols=256,
                                   x_row_stride=256, groups=2, min_amax=1e-12, reserved=0)
    with pytest.raises(SimError, match=r"fmo_fp8_quant_token_group_fp32_g128_vec4.*out-of-bounds global write of 4 bytes"):
        launch(spec, LaunchConfig.make(1, 256), params, engine="sim", tensors=(x, xq, xs))


def test_spans_of_views():
    import torch

    from fastmoe_ops.runtime.spans import array_span, tensor_span

    base = torch.zeros(10, 10)
    view = base[2:5, 3:7]                          # elements (2,3) .. (4,6): 2 rows of 10 + 4
    assert tensor_span(view) == (base.data_ptr() + 23 * 4, 24 * 4)
    assert tensor_span(view.t()) == tensor_span(view)
    assert tensor_span(base[:, 0]) == (base.data_ptr(), 91 * 4)
    assert tensor_span(base[3:3])[1] == 0
    a = np.zeros((10, 10), np.float32)
    assert array_span(a[::-1, 2]) == (a.ctypes.data + 8, 91 * 4)  # negative strides reach below the pointer


def test_divergent_syncthreads():
    src = r'''
    extern "C" __global__ void early_exit(float* y) {
      if (threadIdx.x >= 48) return;   // planted: the others then wait at the barrier forever
      __syncthreads();
      y[threadIdx.x] = 1.f;
    }'''
    with pytest.raises(SimError) as e:
        sim.RawModule(code=src).get_function("early_exit")((1,), (64,), (np.zeros(64, np.float32),))
    msg = str(e.value)
    assert "divergent __syncthreads" in msg and "48 of 64 threads wait" in msg and "kernel.cu:4" in msg
    assert "16 thread(s) already exited" in msg


def test_syncthreads_at_different_sites():
    src = r'''
    extern "C" __global__ void two_sites(float* y) {
      if (threadIdx.x < 32) __syncthreads();
      else __syncthreads();
      y[threadIdx.x] = 1.f;
    }'''
    with pytest.raises(SimError, match=r"divergent __syncthreads: this thread waits at kernel.cu:4 "
                       r"while thread \(0,0,0\) waits at kernel.cu:3"):
        sim.RawModule(code=src).get_function("two_sites")((1,), (64,), (np.zeros(64, np.float32),))


def test_warp_collective_naming_an_exited_lane():
    src = r'''
    extern "C" __global__ void partial(int* y) {
      if (threadIdx.x == 5) return;     // planted: lane 5 leaves, the mask still names it
      y[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
    }'''
    with pytest.raises(SimError) as e:
        sim.RawModule(code=src).get_function("partial")((1,), (32,), (np.zeros(32, np.int32),))
    msg = str(e.value)
    assert "partial" in msg and "0xffffffff" in msg and "lane" in msg and "5" in msg and "exited" in msg


def test_kernel_assert():
    src = r'''
    #include <cassert>
    extern "C" __global__ void check(const int* x) {
      assert(x[threadIdx.x] >= 0);
    }'''
    x = np.zeros(64, np.int32)
    x[37] = -1
    with pytest.raises(SimError) as e:
        sim.RawModule(code=src).get_function("check")((1,), (64,), (x,))
    msg = str(e.value)
    assert "check" in msg and "block (0,0,0), thread (37,0,0)" in msg
    assert "x[threadIdx.x] >= 0" in msg and "kernel.cu:4" in msg


def test_uninitialised_shared_memory_reads_nan():
    src = r'''
    extern "C" __global__ void uninit(float* y, float* z) {
      __shared__ float s[64];
      extern __shared__ float dyn[];
      if (threadIdx.x < 32) s[threadIdx.x] = 1.f;   // planted: half is never written
      __syncthreads();
      y[threadIdx.x] = s[threadIdx.x];
      z[threadIdx.x] = dyn[threadIdx.x];
    }'''
    y = np.zeros(64, np.float32)
    z = np.zeros(64, np.float32)
    f = sim.RawModule(code=src).get_function("uninit")
    for _ in range(2):  # poisoned again at every CTA start
        f((1,), (64,), (y, z), shared_mem=256)
        assert (y[:32] == 1).all() and np.isnan(y[32:]).all() and np.isnan(z).all()


def test_argument_of_wrong_size_refused_before_launch():
    src = r'''extern "C" __global__ void k(float* y, int n) { if (threadIdx.x < n) y[threadIdx.x] = 1.f; }'''
    y = np.zeros(4, np.float32)
    f = sim.RawModule(code=src).get_function("k")
    with pytest.raises(InputError, match=r"argument 1: expected 4 bytes .*got 8 bytes \(int\)"):
        f((1,), (4,), (y, 4))  # a Python int is 64-bit, as in CuPy
    with pytest.raises(InputError, match="expected 2 arguments, got 1"):
        f((1,), (4,), (y,))
    with pytest.raises(InputError, match="at most 1024 threads"):
        f((1,), (2048,), (y, np.int32(4)))
    assert (y == 0).all()


def test_spin_forever_times_out(monkeypatch):
    monkeypatch.setenv("FMO_SIM_TIMEOUT", "1")
    src = r'''extern "C" __global__ void hang(int* flag) { while (atomicAdd(flag, 0) == 0) {} }'''
    with pytest.raises(SimError, match="hang.*timed out"):
        sim.RawModule(code=src).get_function("hang")((2,), (32,), (np.zeros(1, np.int32),))


def test_compile_error_names_kernel_and_log():
    from fastmoe_ops.errors import CompileError
    with pytest.raises(CompileError, match=r"broken(.|\n)*error"):
        sim.RawModule(code='extern "C" __global__ void broken(int* x) { x[0] = undefined_name; }').get_function("broken")


def test_spin_without_yield_is_stopped_and_the_simulator_recovers(monkeypatch):
    monkeypatch.setenv("FMO_SIM_TIMEOUT", "1")
    src = r'''
    extern "C" __global__ void vspin(volatile int* flag) { while (*flag == 0) {} }
    extern "C" __global__ void ok(int* x) { x[threadIdx.x] = threadIdx.x; }'''
    mod = sim.RawModule(code=src)
    with pytest.raises(SimError, match="vspin: timed out"):
        mod.get_function("vspin")((2,), (32,), (np.zeros(1, np.int32),))
    x = np.full(32, -1, np.int32)
    mod.get_function("ok")((1,), (32,), (x,))
    np.testing.assert_array_equal(x, np.arange(32))


def test_function_follows_checking_flags_set_after_get_function(monkeypatch):
    f = sim.RawModule(code=OOB, options=("-DPLANT_BUG",)).get_function("fill")
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    with pytest.raises(SimError, match="out-of-bounds global write"):
        f((2,), (64,), (np.zeros(100, np.float32), np.int32(100)))


def test_race_on_a_shared_scalar(monkeypatch):
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    src = r'''
    extern "C" __global__ void scalar(int* out) {
      __shared__ int leader;
    #ifdef FIX
      if (threadIdx.x == 0)
    #endif
      leader = threadIdx.x;      // planted: every thread writes it
      __syncthreads();
      out[threadIdx.x] = leader;
    }'''
    out = np.full(64, -1, np.int32)
    sim.RawModule(code=src, options=("-DFIX",)).get_function("scalar")((1,), (64,), (out,))
    assert (out == 0).all()
    with pytest.raises(SimError, match=r"write of 4 bytes at shared variable `scalar::leader` byte offset 0 .*"
                                       r"conflicts with a write by thread \(0,0,0\)"):
        sim.RawModule(code=src).get_function("scalar")((1,), (64,), (out,))
