"""The kernels and cases of ptx/cp_async.cuh's tests: tests/test_ptx_cp_async.py says what
they check."""
from __future__ import annotations

import numpy as np

from .case import Case, assert_equal_bits, poisoned

VARIANTS = [("ca", 4), ("ca", 8), ("ca", 16), ("cg", 16)]
THREADS = 64

SOURCE = r"""
extern __shared__ __align__(16) unsigned char smem[];

template <int B, bool CG>
__device__ void issue(void* dst, const void* src, uint32_t n) {
  if constexpr (CG) cp_async_cg16(dst, src, n); else cp_async_ca<B>(dst, src, n);
}

// Each thread copies chunk t (B bytes, src_bytes[t] of them read), waits, barrier, then
// writes chunk (t + 1) % n of shared memory to out[t]. wait_all: use cp.async.wait_all.
template <int B, bool CG>
__device__ void copy_kernel(const unsigned char* src, const unsigned* src_bytes, unsigned char* out, int wait_all) {
  const int t = threadIdx.x, n = blockDim.x;
  issue<B, CG>(smem + B * t, src + B * t, src_bytes[t]);
  if (wait_all) {
    cp_async_wait_all();
  } else {
    cp_async_commit();
    cp_async_wait<0>();
  }
  __syncthreads();
  memcpy(out + B * t, smem + B * ((t + 1) % n), B);
}
#define COPY_KERNEL(NAME, B, CG) \
  extern "C" __global__ void NAME(const unsigned char* s, const unsigned* n, unsigned char* o, int w) { copy_kernel<B, CG>(s, n, o, w); }
COPY_KERNEL(cpa_ca4, 4, false)
COPY_KERNEL(cpa_ca8, 8, false)
COPY_KERNEL(cpa_ca16, 16, false)
COPY_KERNEL(cpa_cg16, 16, true)

// Three groups of 16-byte copies into three regions. wait_group 2 retires group 0 only,
// wait_group 1 group 1, wait_group 0 group 2; each region is read right after its wait.
// `early` = region 2 read after wait_group 1 (not yet retired: poison in the simulator,
// unspecified on a GPU).
extern "C" __global__ void cpa_groups(const unsigned char* src, unsigned char* out, unsigned char* early) {
  const int t = threadIdx.x, n = blockDim.x;
  for (int g = 0; g < 3; ++g) {
    cp_async_cg16(smem + 16 * (g * n + t), src + 16 * (g * n + t));
    cp_async_commit();
  }
  cp_async_wait<2>();
  __syncthreads();
  memcpy(out + 16 * t, smem + 16 * ((t + 1) % n), 16);
  cp_async_wait<1>();
  __syncthreads();
  memcpy(out + 16 * (n + t), smem + 16 * (n + (t + 1) % n), 16);
  memcpy(early + 16 * t, smem + 16 * (2 * n + (t + 1) % n), 16);
  __syncthreads();
  cp_async_wait<0>();
  __syncthreads();
  memcpy(out + 16 * (2 * n + t), smem + 16 * (2 * n + (t + 1) % n), 16);
}

// The bug this guards against: no wait between the copy and the read.
extern "C" __global__ void cpa_missing_wait(const float* src, float* out) {
  const int t = threadIdx.x;
  cp_async_ca<16>(smem + 16 * t, src + 4 * t);
  cp_async_commit();
  __syncthreads();
  memcpy(out + 4 * t, smem + 16 * t, 16);
  cp_async_wait_all();  // retire before exit
}
"""


def model_copy(src: np.ndarray, src_bytes: np.ndarray, size: int, n: int) -> np.ndarray:
    chunks = src.reshape(n, size).copy()
    for t in range(n):
        chunks[t, src_bytes[t]:] = 0  # zero-fill beyond src-size
    return np.roll(chunks, -1, axis=0).reshape(-1)  # thread t reads chunk t + 1


def copy_case(kind: str, size: int, seed: int, wait_all: bool = False, full: bool = False) -> Case:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, size=THREADS * size, dtype=np.uint8)
    if full:
        src_bytes = np.full(THREADS, size, np.uint32)
    else:  # every src-size 0..size appears (ragged tile rows), the rest random
        src_bytes = np.concatenate([np.arange(size + 1), rng.integers(0, size + 1, THREADS - size - 1)]).astype(np.uint32)
        rng.shuffle(src_bytes)
    want = model_copy(src, src_bytes, size, THREADS)
    what = f"cp.async.{kind} {size}B {'wait_all' if wait_all else 'commit+wait_group 0'} {'full' if full else 'src-size'}"
    return Case(name=what, kernel=f"cpa_{kind}{size}", grid=(1,), block=(THREADS,),
                args=[src, src_bytes, poisoned((THREADS * size,), np.uint8), np.int32(wait_all)], outputs=[2],
                check=lambda outs: assert_equal_bits(outs[0], want, what, seed), shared_mem=THREADS * size)


def groups_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, size=3 * THREADS * 16, dtype=np.uint8)
    want = np.concatenate([np.roll(src[g * THREADS * 16:(g + 1) * THREADS * 16].reshape(THREADS, 16), -1, axis=0).reshape(-1)
                           for g in range(3)])
    what = "cp.async groups: wait_group 2/1/0"
    return Case(name=what, kernel="cpa_groups", grid=(1,), block=(THREADS,),
                args=[src, poisoned((3 * THREADS * 16,), np.uint8), poisoned((THREADS * 16,), np.uint8)],
                outputs=[1, 2], check=lambda outs: assert_equal_bits(outs[0], want, what, seed),
                shared_mem=3 * THREADS * 16, gpu_outputs=[0])


def cases(seed: int = 0) -> list[Case]:
    out = []
    for i, (kind, size) in enumerate(VARIANTS):
        out += [copy_case(kind, size, seed + i, full=True), copy_case(kind, size, seed + i),
                copy_case(kind, size, seed + i, wait_all=True)]
    out.append(groups_case(seed))
    return out
