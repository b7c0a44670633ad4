"""Ordinary CUDA kernels, unchanged, on the CPU SIMT simulator (fastmoe_ops.sim).

Each test asserts against numpy; inputs are seeded and random, outputs poisoned first.
"""
import ctypes

import numpy as np
import pytest
import torch

from fastmoe_ops import sim

pytestmark = pytest.mark.skipif(not sim.available(), reason="simulator extension or host compiler missing")

SEED = 1234


def rng(offset=0):
    return np.random.default_rng(SEED + offset)


REDUCE = r'''
extern "C" __global__ void reduce_sum(const float* __restrict__ x, float* out, int n) {
  __shared__ float warp_sums[32];
  float v = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) v += x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % warpSize == 0) warp_sums[threadIdx.x / warpSize] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / warpSize ? warp_sums[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) atomicAdd(out, v);
  }
}
'''


def test_block_reduction_shuffles_and_atomics():
    x = torch.from_numpy(rng().standard_normal(1 << 20).astype(np.float32))
    out = torch.zeros(1)
    f = sim.RawModule(code=REDUCE).get_function("reduce_sum")
    f((128,), (256,), (x, out, np.int32(x.numel())))
    want = x.double().sum().item()
    assert abs(out.item() - want) <= 1e-5 * x.abs().double().sum().item(), (out.item(), want)


TRANSPOSE = r'''
#define TILE 32
#define ROWS 8
extern "C" __global__ void transpose(const float* in, float* out, int rows, int cols) {
  __shared__ float tile[TILE][TILE + 1];   // +1: no bank conflicts on the column read
  int x = blockIdx.x * TILE + threadIdx.x, y = blockIdx.y * TILE + threadIdx.y;
  for (int j = 0; j < TILE; j += ROWS)
    if (x < cols && y + j < rows) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * cols + x];
  __syncthreads();
  x = blockIdx.y * TILE + threadIdx.x; y = blockIdx.x * TILE + threadIdx.y;
  for (int j = 0; j < TILE; j += ROWS)
    if (x < rows && y + j < cols) out[(y + j) * rows + x] = tile[threadIdx.x][threadIdx.y + j];
}
'''


@pytest.mark.parametrize("rows,cols", [(100, 70), (33, 129)])
def test_tiled_transpose_padded_static_shared(rows, cols):
    a = rng(rows).standard_normal((rows, cols)).astype(np.float32)
    out = np.full((cols, rows), np.nan, np.float32)
    f = sim.RawModule(code=TRANSPOSE).get_function("transpose")
    f(((cols + 31) // 32, (rows + 31) // 32), (32, 8), (a, out, np.int32(rows), np.int32(cols)))
    np.testing.assert_array_equal(out, a.T)


SCAN = r'''
// Hillis-Steele inclusive scan of one segment per block, double-buffered in dynamic shared memory.
extern "C" __global__ void scan(const int* in, int* out, int n) {
  extern __shared__ int buf[];            // [2][blockDim.x]
  int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  int* src = buf; int* dst = buf + blockDim.x;
  src[t] = i < n ? in[i] : 0;
  __syncthreads();
  for (int off = 1; off < blockDim.x; off <<= 1) {
    dst[t] = src[t] + (t >= off ? src[t - off] : 0);
    __syncthreads();
    int* tmp = src; src = dst; dst = tmp;
  }
  if (i < n) out[i] = src[t];
}
'''


def test_inclusive_scan_dynamic_shared():
    block, n = 128, 1000
    x = rng(2).integers(-50, 50, n).astype(np.int32)
    out = np.full(n, -7, np.int32)
    f = sim.RawModule(code=SCAN).get_function("scan")
    f(((n + block - 1) // block,), (block,), (x, out, np.int32(n)), shared_mem=2 * block * 4)
    want = np.concatenate([np.cumsum(x[s:s + block]) for s in range(0, n, block)])
    np.testing.assert_array_equal(out, want)


BALLOT = r'''
extern "C" __global__ void count_positive(const float* x, int* per_warp, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned bits = __ballot_sync(0xffffffffu, i < n && x[i] > 0.f);
  if ((threadIdx.x & 31) == 0) per_warp[i / 32] = __popc(bits);
}
'''


def test_ballot_popc():
    n = 32 * 40
    x = rng(3).standard_normal(n).astype(np.float32)
    out = np.full(n // 32, -1, np.int32)
    sim.RawModule(code=BALLOT).get_function("count_positive")((n // 256,), (256,), (x, out, np.int32(n)))
    np.testing.assert_array_equal(out, (x.reshape(-1, 32) > 0).sum(1))


FLAG = r'''
// CTA 0 waits for a flag that the last CTA raises: only works if CTAs run concurrently.
extern "C" __global__ void last_signals_first(int* flag, int* data, int* out) {
  if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) {
    *data = 42 + gridDim.x;
    __threadfence();
    atomicExch(flag, 1);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) __nanosleep(100);
    __threadfence();
    *out = *data;
  }
}
'''


def test_ctas_communicate_through_global_flag():
    flag, data, out = np.zeros(1, np.int32), np.zeros(1, np.int32), np.full(1, -1, np.int32)
    sim.RawModule(code=FLAG).get_function("last_signals_first")((16,), (64,), (flag, data, out))
    assert out[0] == 42 + 16


COLLECTIVES = r'''
extern "C" __global__ void collectives(const int* keys, int* counts, unsigned* match, unsigned* sums) {
  int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  int k = keys[i];
  int c = __syncthreads_count(k > 2);
  if (t == 0) counts[blockIdx.x] = c;
  match[i] = __match_any_sync(0xffffffffu, k);
  unsigned s = __reduce_add_sync(0xffffffffu, (unsigned)k);
  if ((t & 31) == 0) sums[i / 32] = s;
}
'''


def test_syncthreads_count_match_any_reduce_add():
    blocks, block = 3, 96
    keys = rng(4).integers(0, 5, blocks * block).astype(np.int32)
    counts = np.full(blocks, -1, np.int32)
    match = np.zeros(blocks * block, np.uint32)
    sums = np.zeros(blocks * block // 32, np.uint32)
    sim.RawModule(code=COLLECTIVES).get_function("collectives")((blocks,), (block,), (keys, counts, match, sums))
    np.testing.assert_array_equal(counts, (keys.reshape(blocks, block) > 2).sum(1))
    w = keys.reshape(-1, 32)
    want = np.array([[sum(1 << j for j in range(32) if row[j] == row[l]) for l in range(32)] for row in w],
                    dtype=np.uint32)
    np.testing.assert_array_equal(match.reshape(-1, 32), want)
    np.testing.assert_array_equal(sums, w.sum(1))


HALF = r'''
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void convert(const float* x, __half* h, __nv_bfloat16* b, float* back, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  __half hv = __float2half_rn(x[i]);
  __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
  h[i] = hv; b[i] = bv;
  back[i] = __half2float(hv * __float2half(2.0f)) + __bfloat162float(bv);
}
'''


def test_fp16_bf16_conversions():
    n = 1000
    x = torch.from_numpy((rng(5).standard_normal(n) * 100).astype(np.float32))
    h = torch.full((n,), float("nan"), dtype=torch.float16)
    b = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    back = torch.full((n,), float("nan"))
    sim.RawModule(code=HALF).get_function("convert")((4,), (256,), (x, h, b, back, np.int32(n)))
    assert torch.equal(h.view(torch.int16), x.half().view(torch.int16))
    assert torch.equal(b.view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.equal(back, (x.half() * 2).float() + x.bfloat16().float())


TEMPLATE = r'''
template <typename T, int kUnroll>
__global__ void axpy(T* y, const T* x, T a, int n) {
  int base = (blockIdx.x * blockDim.x + threadIdx.x) * kUnroll;
  #pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    if (base + u < n) y[base + u] += a * x[base + u];
}
'''


def test_templated_kernel_via_name_expressions():
    names = ("axpy<float, 4>", "axpy<double, 2>")
    mod = sim.RawModule(code=TEMPLATE, name_expressions=names)
    n = 777
    for name, dt, unroll in ((names[0], np.float32, 4), (names[1], np.float64, 2)):
        x = rng(6).standard_normal(n).astype(dt)
        y = rng(7).standard_normal(n).astype(dt)
        want = y + dt(0.5) * x
        f = mod.get_function(name)
        f(((n + 64 * unroll - 1) // (64 * unroll),), (64,), (y, x, dt(0.5), np.int32(n)))
        np.testing.assert_allclose(y, want, rtol=1e-6)


INDICES = r'''
extern "C" __global__ void indices(int4* out) {
  int b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  int i = b * blockDim.x * blockDim.y * blockDim.z + t;
  out[i] = make_int4(blockIdx.x * 100 + threadIdx.x, blockIdx.y * 100 + threadIdx.y,
                     blockIdx.z * 100 + threadIdx.z, gridDim.x * 1000 + blockDim.z);
}
'''


def test_3d_grid_and_block_indices():
    grid, block = (3, 2, 2), (4, 3, 2)
    nb, nt = 12, 24
    out = np.full((nb * nt, 4), -1, np.int32)
    sim.RawModule(code=INDICES).get_function("indices")(grid, block, (out,))
    bz, by, bx, tz, ty, tx = np.meshgrid(range(2), range(2), range(3), range(2), range(3), range(4), indexing="ij")
    want = np.stack([bx * 100 + tx, by * 100 + ty, bz * 100 + tz, np.full_like(bx, 3002)], -1).reshape(-1, 4)
    np.testing.assert_array_equal(out, want)


STRUCT = r'''
struct Params { const float* x; float* y; int n; float alpha; double beta; };
extern "C" __global__ void scale(Params p, short tag) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) p.y[i] = p.alpha * p.x[i] + (float)p.beta + tag;
}
'''


class Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p), ("n", ctypes.c_int),
                ("alpha", ctypes.c_float), ("beta", ctypes.c_double)]


def test_by_value_struct_argument():
    n = 300
    x = rng(8).standard_normal(n).astype(np.float32)
    f = sim.RawModule(code=STRUCT).get_function("scale")
    assert f.signature == ((32, 8), (2, 2))
    y = np.full(n, np.nan, np.float32)
    p = Params(x.ctypes.data, y.ctypes.data, n, 2.0, 0.25)
    ranges = [(x.ctypes.data, x.nbytes), (y.ctypes.data, y.nbytes)]  # pointers inside Params: memcheck
    f((3,), (128,), (p, np.int16(3)), extra_ranges=ranges)
    np.testing.assert_allclose(y, 2 * x + 0.25 + 3, rtol=1e-6)
    # the same through a numpy structured scalar
    dt = np.dtype([("x", "<u8"), ("y", "<u8"), ("n", "<i4"), ("alpha", "<f4"), ("beta", "<f8")], align=True)
    y[:] = np.nan
    rec = np.array([(x.ctypes.data, y.ctypes.data, n, -1.0, 0.0)], dtype=dt)[0]
    f((3,), (128,), (rec, np.int16(0)), extra_ranges=ranges)
    np.testing.assert_allclose(y, -x, rtol=1e-6)


def test_get_global_and_sequential_mode():
    src = r'''
    __device__ int counter;
    extern "C" __global__ void bump(int* order) {
      if (threadIdx.x == 0) order[atomicAdd(&counter, 1)] = blockIdx.x;
    }
    '''
    mod = sim.RawModule(code=src)
    f = mod.get_function("bump")
    counter = mod.get_global("counter").view(np.int32)
    counter[0] = 0
    order = np.full(8, -1, np.int32)
    f((8,), (32,), (order,), sequential=True)
    np.testing.assert_array_equal(order, np.arange(8))
    assert counter[0] == 8


def test_context_switch_is_cheap():
    assert sim.switch_ns(200_000) < 200


def test_extern_shared_inside_a_function_template():
    """`extern __shared__` declared in a device function template aliases the one dynamic
    shared buffer like any other (it once called a null TLS-init wrapper)."""
    src = r'''
    template <int N> __device__ void rotate(float* out) {
      extern __shared__ float buf[];
      buf[threadIdx.x] = N * 100 + threadIdx.x;
      __syncthreads();
      out[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
    }
    extern "C" __global__ void rotate3(float* out) { rotate<3>(out); }
    '''
    out = torch.full((64,), float("nan"))
    sim.RawModule(code=src).get_function("rotate3")((1,), (64,), (out,), shared_mem=64 * 4)
    want = torch.tensor([300.0 + (i + 1) % 64 for i in range(64)])
    assert torch.equal(out, want)
