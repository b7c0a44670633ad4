"""The kernels, models and cases of ptx/mma.cuh's tests (mma.sync, fed from global memory
and through ldmatrix): tests/test_ptx_mma.py says what they check."""
from __future__ import annotations

import numpy as np

from fastmoe_ops.reference import tensor_core

from .case import Case, assert_close_f64, assert_equal_bits, poisoned
from .formats import decode_bits, encode, exact_values

FORMATS = ("bf16", "f16", "e4m3", "e5m2")
K_OF = {"bf16": 16, "f16": 16, "e4m3": 32, "e5m2": 32}
WRAPPER = {"bf16": "mma_m16n8k16_bf16", "f16": "mma_m16n8k16_f16",
           "e4m3": "mma_m16n8k32_e4m3", "e5m2": "mma_m16n8k32_e5m2"}

# A: [16, K*ksteps] row-major, B: [K*ksteps, 8] row-major (k, n), C, D: [16, 8] f32.
# One warp; d = c aliasing across the k-steps is part of what is tested.
SOURCE = r"""
template <typename E, int K, typename Mma>
__device__ void mma_from_global(const E* A, const E* B, const float* C, float* D, int ksteps, Mma mma) {
  constexpr int per = 4 / sizeof(E);  // elements per .b32 register
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3, KK = K * ksteps;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)];
  for (int s = 0; s < ksteps; ++s) {
    uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    for (int i = 0; i < 4 * per; ++i) {  // ISA fragment map of A
      const int row = per == 2 ? g + 8 * ((i / 2) % 2) : g + 8 * ((i / 4) % 2);
      const int col = per == 2 ? 2 * t + (i % 2) + 8 * (i >= 4) : 4 * t + (i % 4) + 16 * (i >= 8);
      a[i / per] |= uint32_t(A[row * KK + K * s + col]) << (8 * sizeof(E) * (i % per));
    }
    for (int i = 0; i < 2 * per; ++i) {  // ISA fragment map of B
      const int k = per == 2 ? 2 * t + (i % 2) + 8 * (i >= 2) : 4 * t + (i % 4) + 16 * (i >= 4);
      b[i / per] |= uint32_t(B[(K * s + k) * 8 + g]) << (8 * sizeof(E) * (i % per));
    }
    mma(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}

#define MMA_KERNEL(NAME, E, K, FN)                                                       \
  extern "C" __global__ void NAME(const E* A, const E* B, const float* C, float* D, int ksteps) { \
    mma_from_global<E, K>(A, B, C, D, ksteps,                                            \
        [](float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) { \
          FN(d, a, b, c); });                                                            \
  }
MMA_KERNEL(mma_bf16, uint16_t, 16, mma_m16n8k16_bf16)
MMA_KERNEL(mma_f16, uint16_t, 16, mma_m16n8k16_f16)
MMA_KERNEL(mma_e4m3, uint8_t, 32, mma_m16n8k32_e4m3)
MMA_KERNEL(mma_e5m2, uint8_t, 32, mma_m16n8k32_e5m2)

// 16-bit inputs through ldmatrix: A [16][16] and B^T [8][16] (n, k) staged in shared memory
// with a 48-byte row pitch (rows stay 16-byte aligned, not contiguous); ldmatrix.x4 gives
// A's fragment, ldmatrix.x2 of B^T (= B column-major) gives B's.
extern __shared__ __align__(16) unsigned char smem[];

template <bool BF16>
__device__ void mma_ldmatrix(const uint16_t* A, const uint16_t* Bt, const float* C, float* D) {
  constexpr int pitch = 48;
  unsigned char* sa = smem;
  unsigned char* sb = smem + 16 * pitch;
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 16 * 16; i += 32) memcpy(sa + (i / 16) * pitch + 2 * (i % 16), A + i, 2);
  for (int i = lane; i < 8 * 16; i += 32) memcpy(sb + (i / 16) * pitch + 2 * (i % 16), Bt + i, 2);
  __syncthreads();
  // x4 matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  const int m = lane / 8, r = lane % 8;
  uint32_t a[4], b[2];
  ldmatrix_x4(a, sa + ((m % 2) * 8 + r) * pitch + (m / 2) * 16);
  // x2 matrices: (n 0-7, k 0-7), (n 0-7, k 8-15); lanes 16-31 repeat valid addresses
  ldmatrix_x2(b, sb + r * pitch + (m % 2) * 16);
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)];
  if (BF16) mma_m16n8k16_bf16(acc, a, b, acc); else mma_m16n8k16_f16(acc, a, b, acc);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}
extern "C" __global__ void mma_ldm_bf16(const uint16_t* A, const uint16_t* Bt, const float* C, float* D) {
  mma_ldmatrix<true>(A, Bt, C, D);
}
extern "C" __global__ void mma_ldm_f16(const uint16_t* A, const uint16_t* Bt, const float* C, float* D) {
  mma_ldmatrix<false>(A, Bt, C, D);
}
"""


def model(a_bits, b_bits, c, fmt):
    return decode_bits(a_bits, fmt) @ decode_bits(b_bits, fmt) + c.astype(np.float64)


def accumulation_bound(a_bits, b_bits, c, fmt):
    """Error bound of fp32 accumulation of exact products in any order: (terms) * 2^-24
    * sum |terms| per output, doubled for the final rounding and slack."""
    terms = np.abs(decode_bits(a_bits, fmt)) @ np.abs(decode_bits(b_bits, fmt)) + np.abs(c)
    n = a_bits.shape[1] + 1
    return 2.0 * n * 2.0**-24 * terms


def mma_case(fmt: str, seed: int, ksteps: int = 1, exact: bool = True, structured: bool = False) -> Case:
    rng = np.random.default_rng(seed)
    K = K_OF[fmt] * ksteps
    if structured:  # A = row index + column/16, B = identity-like: layout bugs show as moved values
        av = (np.arange(16)[:, None] + np.arange(K)[None, :] / 16.0) * 0.25
        av = np.round(av * 4) / 4 % 7  # keep e5m2-representable: multiples of 1/4 below 7
        av = np.array([[float(decode_bits(encode(np.array([x]), fmt), fmt)[0]) for x in row] for row in av])
        bv = np.zeros((K, 8))
        bv[np.arange(8) * (K // 8), np.arange(8)] = 1.0
        cv = np.arange(128, dtype=np.float64).reshape(16, 8) / 8.0
    elif exact:
        av, bv = exact_values(rng, (16, K), fmt), exact_values(rng, (K, 8), fmt)
        cv = rng.integers(-64, 65, size=(16, 8)) / 16.0
    else:
        scale = 1.0 if fmt in ("bf16", "f16") else 4.0
        av, bv = rng.standard_normal((16, K)) * scale, rng.standard_normal((K, 8)) * scale
        cv = rng.standard_normal((16, 8))
    a, b = encode(av, fmt), encode(bv, fmt)
    c = cv.astype(np.float32)
    want = model(a, b, c, fmt)
    what = f"{WRAPPER[fmt]} ksteps={ksteps} {'structured' if structured else 'exact' if exact else 'random'}"

    def check(outs):
        (d,) = outs
        if exact or structured:
            assert_equal_bits(d, want.astype(np.float32), what, seed)
        else:  # the hardware's bits (sm_90's rule), and within fp32 accumulation of float64
            assert_equal_bits(d, tensor_core.mma_sync(decode_bits(a, fmt), decode_bits(b, fmt), c, fmt), what + " (sm_90 rule)", seed)
            assert_close_f64(d, want, accumulation_bound(a, b, c, fmt), what, seed)

    return Case(name=what, kernel=f"mma_{fmt}", grid=(1,), block=(32,),
                args=[a, b, c, poisoned((16, 8), np.float32), np.int32(ksteps)], outputs=[3],
                check=check)  # the model is the hardware's: random inputs too are compared bit for bit


def mma_ldmatrix_case(fmt: str, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    av, bv = exact_values(rng, (16, 16), fmt), exact_values(rng, (16, 8), fmt)
    a, b = encode(av, fmt), encode(bv, fmt)
    c = (rng.integers(-64, 65, size=(16, 8)) / 16.0).astype(np.float32)
    want = model(a, b, c, fmt).astype(np.float32)
    what = f"ldmatrix.x4/x2 -> {WRAPPER[fmt]}"
    return Case(name=what, kernel=f"mma_ldm_{fmt}", grid=(1,), block=(32,),
                args=[a, np.ascontiguousarray(b.T), c, poisoned((16, 8), np.float32)], outputs=[3],
                check=lambda outs: assert_equal_bits(outs[0], want, what, seed), shared_mem=24 * 48)


def fp8_all_codes_case(fmt: str, part: int) -> Case:
    """Finite fp8 codes 128 * part .. 128 * part + 127 of the format (wrapping), one per
    output: B selects column k = 4n of A for output column n (a single 1, zeros elsewhere),
    so D[i, n] = A[i, 4n] exactly. Parts 0 and 1 cover every finite code: subnormals, both
    zeros, the largest values."""
    codes = np.array([c for c in range(256) if np.isfinite(decode_bits(np.array([c], np.uint8), fmt)[0])], np.uint8)
    chunk = codes[(128 * part + np.arange(128)) % codes.size].reshape(8, 16)  # [n, row]
    a = np.zeros((16, 32), np.uint8)
    a[:, 4 * np.arange(8)] = chunk.T
    b = np.zeros((32, 8), np.uint8)
    b[4 * np.arange(8), np.arange(8)] = encode(np.array([1.0]), fmt)[0]
    c = np.zeros((16, 8), np.float32)
    want = model(a, b, c, fmt).astype(np.float32)  # = A[i, 4n], except -0 + 0 = +0 (IEEE)
    what = f"{WRAPPER[fmt]} finite codes part {part}"
    return Case(name=what, kernel=f"mma_{fmt}", grid=(1,), block=(32,),
                args=[a, b, c, poisoned((16, 8), np.float32), np.int32(1)], outputs=[3],
                check=lambda outs: assert_equal_bits(outs[0], want, what))


def cases(seed: int = 0) -> list[Case]:
    """Every mma case, for the GPU conformance test (deterministic ones are compared bitwise)."""
    out = []
    for i, fmt in enumerate(FORMATS):
        out.append(mma_case(fmt, seed + i, structured=True))
        out.append(mma_case(fmt, seed + i, ksteps=1))
        out.append(mma_case(fmt, seed + i, ksteps=2))
        out.append(mma_case(fmt, seed + i, exact=False))
    out += [mma_ldmatrix_case(fmt, seed + 7) for fmt in ("bf16", "f16")]
    out += [fp8_all_codes_case(fmt, part) for fmt in ("e4m3", "e5m2") for part in (0, 1)]
    return out
