"""The simulator's device API (csrc/sim/device_api.h), as PTX emulation uses it."""
import numpy as np
import pytest

from fastmoe_ops import sim
from fastmoe_ops.errors import SimError

pytestmark = pytest.mark.skipif(not sim.available(), reason="simulator extension or host compiler missing")


def test_allgather_lane_warp_ids_and_partial_masks():
    src = r'''
    extern "C" __global__ void gather(int* out, int* halves) {
      int me = 1000 * fmo_sim::warp_id() + fmo_sim::lane_id();
      int all[32];
      fmo_sim::warp_allgather(0xffffffffu, &me, all, sizeof(int));
      for (int i = 0; i < 32; ++i) out[threadIdx.x * 32 + i] = all[i];
      // two half-warp collectives at once (disjoint masks), shuffles with width 16
      unsigned half = fmo_sim::lane_id() < 16 ? 0x0000ffffu : 0xffff0000u;
      int a = __shfl_sync(half, (int)threadIdx.x, 3, 16);
      int b = __shfl_xor_sync(0xffffffffu, 1, 8, 16);
      halves[threadIdx.x] = a + 100 * b;
      __syncwarp(half);
    }'''
    out = np.full((64, 32), -1, np.int32)
    halves = np.full(64, -1, np.int32)
    sim.RawModule(code=src).get_function("gather")((1,), (64,), (out, halves))
    want = np.array([[1000 * (t // 32) + i for i in range(32)] for t in range(64)])
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(halves, (np.arange(64) // 16) * 16 + 3 + 100)


def test_named_barrier_producer_consumer():
    src = r'''
    // warp 0 produces into shared memory and arrives; warps 1..3 sync on barrier 1 and consume
    extern "C" __global__ void prodcons(int* out) {
      __shared__ int buf[32];
      if (fmo_sim::warp_id() == 0) {
        buf[fmo_sim::lane_id()] = 7 * fmo_sim::lane_id();
        fmo_sim::named_barrier_arrive(1, 128);
      } else {
        fmo_sim::named_barrier(1, 128);
        out[threadIdx.x - 32] = buf[fmo_sim::lane_id()];
      }
    }'''
    out = np.full(96, -1, np.int32)
    sim.RawModule(code=src).get_function("prodcons")((2,), (128,), (out,))
    np.testing.assert_array_equal(out, np.tile(7 * np.arange(32), 3))


CP_ASYNC = r'''
extern "C" __global__ void copy(const float* src, float* out, int wait) {
  __shared__ float s[64];
  fmo_sim::cp_async(&s[threadIdx.x * 2], src + threadIdx.x * 2, 8, threadIdx.x == 31 ? 4 : 8);
  fmo_sim::cp_async_commit();
  if (wait) fmo_sim::cp_async_wait(0);
  __syncthreads();
  out[threadIdx.x * 2] = s[threadIdx.x * 2];
  out[threadIdx.x * 2 + 1] = s[threadIdx.x * 2 + 1];
}
'''


def test_cp_async_lands_at_wait_and_zero_fills():
    src = np.random.default_rng(5).standard_normal(64).astype(np.float32)
    out = np.full(64, -1, np.float32)
    f = sim.RawModule(code=CP_ASYNC).get_function("copy")
    f((1,), (32,), (src, out, np.int32(1)))
    want = src.copy()
    want[63] = 0  # src_bytes = 4 of 8: the rest is zero-filled
    np.testing.assert_array_equal(out, want)
    f((1,), (32,), (src, out, np.int32(0)))  # planted: no wait, shared memory still poisoned
    assert np.isnan(out).all()


def test_fail_and_is_shared():
    src = r'''
    __device__ float global_value;
    extern "C" __global__ void where(int* flags) {
      __shared__ float s;
      extern __shared__ char dyn[];
      float local;
      flags[0] = fmo_sim::is_shared(&s) + 2 * fmo_sim::is_shared(dyn) + 4 * fmo_sim::is_shared(&local)
                 + 8 * fmo_sim::is_shared(&global_value);
      if (blockIdx.x == 1 && threadIdx.x == 3) fmo_sim::fail("bad value %d", 17);
    }'''
    flags = np.zeros(1, np.int32)
    f = sim.RawModule(code=src).get_function("where")
    f((1,), (4,), (flags,))
    assert flags[0] == 3
    with pytest.raises(SimError, match=r"kernel where, block \(1,0,0\), thread \(3,0,0\): bad value 17"):
        f((2,), (4,), (flags,))


def test_check_access_hook_and_dynamic_shared_bounds(monkeypatch):
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    src = r'''
    extern "C" __global__ void emu(const int* p, int n, int over) {
      extern __shared__ int dyn[];
      fmo_sim::check_access(p, n * sizeof(int), false);   // as PTX emulation reports its loads
      if (over) dyn[over] = 1;
    }'''
    x = np.zeros(16, np.int32)
    f = sim.RawModule(code=src).get_function("emu")
    f((1,), (1,), (x, np.int32(16), np.int32(0)), shared_mem=64)
    with pytest.raises(SimError, match="out-of-bounds global read of 68 bytes"):
        f((1,), (1,), (x, np.int32(17), np.int32(0)), shared_mem=64)
    f((1,), (1,), (x, np.int32(1), np.int32(15)), shared_mem=64)
    with pytest.raises(SimError, match="dynamic shared memory write of 4 bytes at offset 64; the launch has shared_mem=64"):
        f((1,), (1,), (x, np.int32(1), np.int32(16)), shared_mem=64)


def test_shared_atomics_do_not_race(monkeypatch):
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    src = r'''
    extern "C" __global__ void hist(const int* keys, int* out) {
      __shared__ int bins[8];
      if (threadIdx.x < 8) bins[threadIdx.x] = 0;
      __syncthreads();
      atomicAdd(&bins[keys[blockIdx.x * blockDim.x + threadIdx.x]], 1);
      __syncthreads();
      if (threadIdx.x < 8) atomicAdd(&out[threadIdx.x], bins[threadIdx.x]);
    }'''
    keys = np.random.default_rng(6).integers(0, 8, 4 * 128).astype(np.int32)
    out = np.zeros(8, np.int32)
    sim.RawModule(code=src).get_function("hist")((4,), (128,), (keys, out))
    np.testing.assert_array_equal(out, np.bincount(keys, minlength=8))


def test_extern_shared_arrays_alias_one_buffer_and_printf():
    src = r'''
    #include <cstdio>
    namespace detail { extern __shared__ __align__(16) unsigned char raw[]; }
    extern "C" __global__ void alias(unsigned long long* out) {
      extern __shared__ float f[];
      f[threadIdx.x] = 1.0f;
      __syncthreads();
      if (threadIdx.x == 0) {
        out[0] = (unsigned long long)(void*)detail::raw == (unsigned long long)(void*)f;
        out[1] = (unsigned long long)(void*)f % 1024;
        out[2] = detail::raw[4 * 3 + 3];   // high byte of 1.0f
        printf("alias kernel: block %d\n", (int)blockIdx.x);
      }
    }'''
    out = np.full(3, 99, np.uint64)
    sim.RawModule(code=src).get_function("alias")((1,), (8,), (out,), shared_mem=32)
    np.testing.assert_array_equal(out, [1, 0, 0x3F])
