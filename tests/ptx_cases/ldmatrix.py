"""The kernels, model and cases of ptx/ldmatrix.cuh's tests: tests/test_ptx_ldmatrix.py says
what they check."""
from __future__ import annotations

import numpy as np

from .case import Case, assert_equal_bits, poisoned

SHAPES = [(n, t) for n in (1, 2, 4) for t in (False, True)]
PITCH = 32  # bytes between stored rows: 16 of data, 16 of padding

SOURCE = r"""
extern __shared__ __align__(16) unsigned char smem[];

// src: [32][8] b16 = up to 4 matrices of 8 rows; perm: [32] smem slot of each row;
// out: [32 lanes][N] .b32; `shift` misaligns the row addresses (error test).
template <int N, bool T>
__device__ void ldm(const uint16_t* src, const int* perm, uint32_t* out, int shift) {
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 8; ++i) memcpy(smem + perm[lane] * 32 + 2 * i, src + lane * 8 + i, 2);
  __syncthreads();
  // lanes < 8N address their row; the others point at some other row, which must be ignored
  const int row = lane < 8 * N ? lane : (lane * 7 + 3) % 32;
  const void* p = smem + perm[row] * 32 + shift;
  uint32_t r[4] = {0xdeadbeef, 0xdeadbeef, 0xdeadbeef, 0xdeadbeef};
  if (N == 1) { if (T) ldmatrix_x1_trans(r[0], p); else ldmatrix_x1(r[0], p); }
  if (N == 2) {
    uint32_t q[2];
    if (T) ldmatrix_x2_trans(q, p); else ldmatrix_x2(q, p);
    r[0] = q[0]; r[1] = q[1];
  }
  if (N == 4) {
    uint32_t q[4];
    if (T) ldmatrix_x4_trans(q, p); else ldmatrix_x4(q, p);
    for (int j = 0; j < 4; ++j) r[j] = q[j];
  }
  for (int j = 0; j < N; ++j) out[lane * N + j] = r[j];
}

#define LDM_KERNEL(NAME, N, T) \
  extern "C" __global__ void NAME(const uint16_t* s, const int* p, uint32_t* o, int shift) { ldm<N, T>(s, p, o, shift); }
LDM_KERNEL(ldm_x1, 1, false)
LDM_KERNEL(ldm_x2, 2, false)
LDM_KERNEL(ldm_x4, 4, false)
LDM_KERNEL(ldm_x1_trans, 1, true)
LDM_KERNEL(ldm_x2_trans, 2, true)
LDM_KERNEL(ldm_x4_trans, 4, true)

// A global-memory row address: ldmatrix needs shared memory.
extern "C" __global__ void ldm_global_address(const uint16_t* src, uint32_t* out) {
  uint32_t r;
  ldmatrix_x1(r, src + 8 * (threadIdx.x % 8));
  out[threadIdx.x] = r;
}
"""


def model(src: np.ndarray, n: int, trans: bool) -> np.ndarray:
    """[32, n] uint32: what each lane's registers hold (PTX ISA "ldmatrix")."""
    m = src.reshape(4, 8, 8)  # [matrix, row, col] b16
    out = np.empty((32, n), np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(n):
            if trans:
                lo, hi = m[j, 2 * t, g], m[j, 2 * t + 1, g]
            else:
                lo, hi = m[j, g, 2 * t], m[j, g, 2 * t + 1]
            out[lane, j] = np.uint32(lo) | (np.uint32(hi) << np.uint32(16))
    return out


def ldmatrix_case(n: int, trans: bool, seed: int, structured: bool = False) -> Case:
    rng = np.random.default_rng(seed)
    if structured:  # element (matrix j, row r, col c) = j*256 + r*16 + c: a misplaced one reads as its coordinates
        src = (np.arange(4)[:, None, None] * 256 + np.arange(8)[None, :, None] * 16 + np.arange(8)[None, None, :])
        src = src.reshape(32, 8).astype(np.uint16)
        perm = np.arange(32, dtype=np.int32)
    else:
        src = rng.integers(0, 1 << 16, size=(32, 8), dtype=np.uint16)
        perm = rng.permutation(32).astype(np.int32)
    want = model(src, n, trans)
    kernel = f"ldm_x{n}" + ("_trans" if trans else "")
    what = f"ldmatrix.x{n}{'.trans' if trans else ''} ({'structured' if structured else 'random'})"
    return Case(name=what, kernel=kernel, grid=(1,), block=(32,),
                args=[src, perm, poisoned((32 * n,), np.uint32), np.int32(0)], outputs=[2],
                check=lambda outs: assert_equal_bits(outs[0].reshape(32, n), want, what, seed),
                shared_mem=32 * PITCH)


def cases(seed: int = 0) -> list[Case]:
    return [ldmatrix_case(n, t, seed + i, structured=s) for i, (n, t) in enumerate(SHAPES) for s in (True, False)]
