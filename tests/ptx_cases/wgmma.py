"""The kernels, the ISA's shared-memory layout model and the cases of ptx/wgmma.cuh's tests:
tests/test_ptx_wgmma.py says what they check."""
from __future__ import annotations

import numpy as np

from fastmoe_ops.reference import tensor_core

from .case import Case, assert_equal_bits, poisoned
from .formats import decode_bits, encode

M, N, KSTEP = 64, 128, 32  # N: the default shape; m64n64k32 is tested too (n=64)
KERNEL_OF_N = {128: "wgmma_e4m3", 64: "wgmma_e4m3_n64", 96: "wgmma_e4m3_n96", 192: "wgmma_e4m3_n192",
               256: "wgmma_e4m3_n256", 16: "wgmma_e4m3_n16", 24: "wgmma_e4m3_n24", 40: "wgmma_e4m3_n40",
               56: "wgmma_e4m3_n56"}  # 16..56: the GEMM's decode tiles (24, 40, 56: an odd number of 8-row groups)
SWIZZLE = {"none": 0, "b128": 1, "b64": 2, "b32": 3}
PITCH = {"b128": 128, "b64": 64, "b32": 32}
SMEM_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without opting in (the GPU runner does not)

# One warpgroup. The image (A's and B's bytes, laid out by the test) is copied to dynamic
# shared memory; k-step s multiplies the operands at a_off[s] / b_off[s]. mode 0: normal;
# 1: D is stored before wait_group (reads the old D); 2: A's bytes are overwritten with
# `poke` after the issue and before wait_group; 3: no wgmma.fence (must fail); 4: warp 3's B
# descriptor differs from the other warps' (must fail).
SOURCE = r"""
#include "ptx/wgmma.cuh"
extern __shared__ __align__(1024) unsigned char wg_smem[];

template <int N>
__device__ void store_d(float* D, const float (&acc)[N / 2]) {
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < N / 2; ++i) D[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + (i % 2)] = acc[i];
}

// N = 128 and 64 through their old names, the others through the template.
__device__ void mma_n(float (&d)[64], uint64_t a, uint64_t b, int s) { wgmma_m64n128k32_e4m3(d, a, b, s); }
__device__ void mma_n(float (&d)[32], uint64_t a, uint64_t b, int s) { wgmma_m64n64k32_e4m3(d, a, b, s); }
template <int R>
__device__ void mma_n(float (&d)[R], uint64_t a, uint64_t b, int s) { wgmma_m64nNk32_e4m3<2 * R>(d, a, b, s); }

template <int N>
__device__ void wgmma_run(const unsigned char* image, int image_bytes, const float* C, float* D,
                          const int* a_off, const int* b_off, int ksteps, int a_lbo, int a_sbo, int a_sw,
                          int b_lbo, int b_sbo, int b_sw, int accumulate_c, int mode, int poke_off,
                          int poke_bytes, const unsigned char* poke) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg_smem[i] = image[i];
  fence_proxy_async_shared();  // generic-proxy stores -> wgmma's async-proxy reads
  __syncthreads();
  float acc[N / 2];
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < N / 2; ++i) acc[i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + (i % 2)];
  wgmma_fence_operands(acc);  // the loads of C stay before the fence
  if (mode != 3) wgmma_fence();
  for (int s = 0; s < ksteps; ++s) {
    const uint64_t da = make_smem_desc(wg_smem + a_off[s], a_lbo, a_sbo, static_cast<Swizzle>(a_sw));
    const int b_skew = (mode == 4 && w == 3) ? 16 : 0;  // warp 3 names other B bytes
    const uint64_t db = make_smem_desc(wg_smem + b_off[s] + b_skew, b_lbo, b_sbo, static_cast<Swizzle>(b_sw));
    mma_n(acc, da, db, (s > 0 || accumulate_c) ? 1 : 0);
  }
  wgmma_commit();
  if (mode == 1) store_d<N>(D, acc);
  if (mode == 2) {
    __syncthreads();
    for (int i = threadIdx.x; i < poke_bytes; i += blockDim.x) wg_smem[poke_off + i] = poke[i];
    fence_proxy_async_shared();
    __syncthreads();
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  if (mode != 1) store_d<N>(D, acc);
}

#define WGMMA_ENTRY(NAME, N)                                                                                   \
  extern "C" __global__ void NAME(const unsigned char* image, int image_bytes, const float* C, float* D,        \
                                  const int* a_off, const int* b_off, int ksteps, int a_lbo, int a_sbo, int a_sw, \
                                  int b_lbo, int b_sbo, int b_sw, int accumulate_c, int mode, int poke_off,    \
                                  int poke_bytes, const unsigned char* poke) {                                 \
    wgmma_run<N>(image, image_bytes, C, D, a_off, b_off, ksteps, a_lbo, a_sbo, a_sw, b_lbo, b_sbo, b_sw,       \
                 accumulate_c, mode, poke_off, poke_bytes, poke);                                              \
  }
WGMMA_ENTRY(wgmma_e4m3, 128)
WGMMA_ENTRY(wgmma_e4m3_n64, 64)
WGMMA_ENTRY(wgmma_e4m3_n96, 96)
WGMMA_ENTRY(wgmma_e4m3_n192, 192)
WGMMA_ENTRY(wgmma_e4m3_n256, 256)
WGMMA_ENTRY(wgmma_e4m3_n16, 16)
WGMMA_ENTRY(wgmma_e4m3_n24, 24)
WGMMA_ENTRY(wgmma_e4m3_n40, 40)
WGMMA_ENTRY(wgmma_e4m3_n56, 56)

// Two accumulators, one commit group each: after wait_group 1 the first group has retired
// (D1 = A B + C) and the second has not (D2 still C); after wait_group 0 both have.
// D: [3][64][128] = D1 after wait 1, D2 after wait 1, D2 after wait 0.
extern "C" __global__ void wgmma_two_groups(const unsigned char* image, int image_bytes, const float* C, float* D,
                                            int a_off, int b_off, int sbo) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg_smem[i] = image[i];
  fence_proxy_async_shared();
  __syncthreads();
  float acc1[64], acc2[64];
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < 64; ++i)
    acc1[i] = acc2[i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * 128 + 8 * (i / 4) + 2 * q + (i % 2)];
  wgmma_fence_operands(acc1);
  wgmma_fence_operands(acc2);
  wgmma_fence();
  const uint64_t da = make_smem_desc(wg_smem + a_off, 16, sbo, Swizzle::b128);
  const uint64_t db = make_smem_desc(wg_smem + b_off, 16, sbo, Swizzle::b128);
  wgmma_m64n128k32_e4m3(acc1, da, db, 1);
  wgmma_commit();
  wgmma_m64n128k32_e4m3(acc2, da, db, 1);
  wgmma_commit();
  wgmma_wait<1>();
  store_d<128>(D, acc1);
  store_d<128>(D + 64 * 128, acc2);
  wgmma_wait<0>();
  store_d<128>(D + 2 * 64 * 128, acc2);
}

// Three groups (m64n64k32, one accumulator each, same operands): D [6][64][64] = the three
// accumulators after wait_group 2, then D2, D3 after wait_group 1, then D3 after wait_group 0.
// In order: wait 2 retires group 1 only, wait 1 group 2, wait 0 group 3.
extern "C" __global__ void wgmma_three_groups(const unsigned char* image, int image_bytes, const float* C, float* D,
                                              int a_off, int b_off, int sbo) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg_smem[i] = image[i];
  fence_proxy_async_shared();
  __syncthreads();
  float acc[3][32];
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int k = 0; k < 3; ++k)
    for (int i = 0; i < 32; ++i) acc[k][i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * 64 + 8 * (i / 4) + 2 * q + (i % 2)];
  for (int k = 0; k < 3; ++k) wgmma_fence_operands(acc[k]);
  wgmma_fence();
  const uint64_t da = make_smem_desc(wg_smem + a_off, 16, sbo, Swizzle::b128);
  const uint64_t db = make_smem_desc(wg_smem + b_off, 16, sbo, Swizzle::b128);
  for (int k = 0; k < 3; ++k) {
    wgmma_m64nNk32_e4m3<64>(acc[k], da, db, 1);
    wgmma_commit();
  }
  wgmma_wait<2>();
  for (int k = 0; k < 3; ++k) store_d<64>(D + k * 64 * 64, acc[k]);
  wgmma_wait<1>();
  store_d<64>(D + 3 * 64 * 64, acc[1]);
  store_d<64>(D + 4 * 64 * 64, acc[2]);
  wgmma_wait<0>();
  store_d<64>(D + 5 * 64 * 64, acc[2]);
}
"""


def kmajor_offset(sw: str, start: int, lbo: int, sbo: int, row, k):
    """ISA K-major layout of 8-bit elements: byte offset of (row, k-byte) (vectorised)."""
    row, k = np.asarray(row), np.asarray(k)
    if sw == "none":
        return start + (row % 8) * 16 + (row // 8) * sbo + (k // 16) * lbo + k % 16
    p = PITCH[sw]
    u = start + (row % 8) * p + (row // 8) * sbo + k
    return u ^ (((u >> 7) & (p // 16 - 1)) << 4)


def layout(sw: str, rows: int, ksteps: int, base: int, padded: bool):
    """(lbo, sbo, [start of k-step s], bytes used) of one operand [rows, 32 * ksteps].
    Swizzled rows hold P / 32 k-steps (the descriptor start advances 32 bytes inside the row,
    as the GEMM does); further k-steps take a new region. padded: gaps between 8-row groups
    (and, unswizzled, between the K core matrices) so that SBO/LBO are not the dense values."""
    if sw == "none":
        lbo = 128 if not padded else rows // 8 * 128 + 256     # K core matrices: adjacent, or far
        sbo = 256 if not padded else 128                        # 8-row groups
        region = rows // 8 * 256 if not padded else 2 * lbo
        starts = [base + s * region for s in range(ksteps)]
        return lbo, sbo, starts, region * ksteps
    p = PITCH[sw]
    sbo = 8 * p * (2 if padded else 1)  # multiples of the 8 * P pattern keep its alignment
    per_row = p // KSTEP
    region = rows // 8 * sbo
    starts = [base + (s // per_row) * region + (s % per_row) * KSTEP for s in range(ksteps)]
    return 16, sbo, starts, region * (-(-ksteps // per_row))  # LBO: "not used, assumed 1" (ISA)


def place(image: np.ndarray, sw, lbo, sbo, starts, mat: np.ndarray) -> None:
    """Writes mat [rows, 32 * ksteps] bytes into image; asserts no two elements collide."""
    rows = mat.shape[0]
    r, k = np.meshgrid(np.arange(rows), np.arange(KSTEP), indexing="ij")
    seen = set()
    for s, start in enumerate(starts):
        off = kmajor_offset(sw, start, lbo, sbo, r, k)
        assert len(set(off.ravel().tolist()) & seen) == 0, "layout model: overlapping elements"
        seen |= set(off.ravel().tolist())
        image[off] = mat[:, KSTEP * s:KSTEP * (s + 1)]


def model_bits(a, b, c, accumulate_c: bool) -> np.ndarray:
    """The hardware's result (QGMMA's rule, one step per k32 instruction), from D = C or 0."""
    return tensor_core.wgmma_fp8(decode_bits(a, "e4m3"), decode_bits(b, "e4m3"), c if accumulate_c else None)


def rule_exact_values(rng: np.random.Generator, shape) -> np.ndarray:
    """Integers in [-3, 3] times 2^-2 or 2^-1: products are multiples of 2^-4 of at most 2.25,
    so with |C| <= 4 every partial sum over K <= 128 is a multiple of 2^-4 below 2^9. With a
    largest term below 2^9 the 13-bit window's quantum is at most 2^-4 and a 14-bit result
    holds 2^9 / 2^-4: the hardware's truncations drop nothing, so D equals float64 A @ B + C."""
    return rng.integers(-3, 4, size=shape).astype(np.float64) * 2.0 ** rng.integers(-2, 0, size=shape)


def wgmma_case(sw: str, seed: int, *, ksteps: int = 1, padded: bool = False, exact: bool = True,
               accumulate_c: bool = True, b_sw: str | None = None, n: int = N) -> Case:
    rng = np.random.default_rng(seed)
    K = KSTEP * ksteps
    if exact:
        a, b = encode(rule_exact_values(rng, (M, K)), "e4m3"), encode(rule_exact_values(rng, (n, K)), "e4m3")
        c = (rng.integers(-64, 65, size=(M, n)) / 16.0).astype(np.float32)
    else:  # every finite e4m3 code (0x7f / 0xff are NaN): the truncations matter
        a = rng.choice([x for x in range(256) if x & 0x7f != 0x7f], size=(M, K)).astype(np.uint8)
        b = rng.choice([x for x in range(256) if x & 0x7f != 0x7f], size=(n, K)).astype(np.uint8)
        c = rng.standard_normal((M, n)).astype(np.float32)
    what = (f"wgmma m64n{n}k32 e4m3 A:{sw} B:{b_sw or sw} ksteps={ksteps}{' padded' if padded else ''}"
            f"{' exact' if exact else ' random'}{'' if accumulate_c else ' scale-d=0'}")
    return laid_out_case(a, b, c, what, seed, sw=sw, b_sw=b_sw or sw, padded=padded, exact=exact,
                         accumulate_c=accumulate_c)


def laid_out_case(a: np.ndarray, b: np.ndarray, c: np.ndarray, what: str, seed: int, *, sw: str = "b128",
                  b_sw: str = "b128", padded: bool = False, exact: bool = False, accumulate_c: bool = True) -> Case:
    """The launch of D = A B^T (+ C) for e4m3 codes a [64, K], b [N, K] laid out in shared memory
    with the given swizzles; the check wants the model's bits (and float64's when `exact`)."""
    n, k = b.shape
    ksteps = k // KSTEP
    a_lbo, a_sbo, a_starts, a_bytes = layout(sw, M, ksteps, 0, padded)
    b_base = -(-a_bytes // 1024) * 1024
    b_lbo, b_sbo, b_starts, b_bytes = layout(b_sw, n, ksteps, b_base, padded)
    if padded and b_base + 1024 + b_bytes <= SMEM_LIMIT:  # a gap before B too, where it fits
        b_base += 1024
        b_lbo, b_sbo, b_starts, b_bytes = layout(b_sw, n, ksteps, b_base, padded)
    assert b_base + b_bytes <= SMEM_LIMIT
    image = np.full(b_base + b_bytes, 0x7f, np.uint8)  # NaN wherever the layout leaves holes
    place(image, sw, a_lbo, a_sbo, a_starts, a)
    place(image, b_sw, b_lbo, b_sbo, b_starts, b)
    want_bits = model_bits(a, b, c, accumulate_c)
    want64 = decode_bits(a, "e4m3") @ decode_bits(b, "e4m3").T + (c if accumulate_c else 0)

    def check(outs):
        (d,) = outs
        assert_equal_bits(d, want_bits, what, seed)
        if exact:  # the rule drops nothing on these inputs: also float64's result
            assert_equal_bits(d, want64.astype(np.float32), what + " vs float64", seed)

    args = [image, np.int32(image.size), c, poisoned((M, n), np.float32),
            np.array(a_starts, np.int32), np.array(b_starts, np.int32), np.int32(ksteps),
            np.int32(a_lbo), np.int32(a_sbo), np.int32(SWIZZLE[sw]), np.int32(b_lbo), np.int32(b_sbo),
            np.int32(SWIZZLE[b_sw]), np.int32(accumulate_c), np.int32(0), np.int32(0), np.int32(0),
            np.zeros(1, np.uint8)]
    return Case(name=what, kernel=KERNEL_OF_N[n], grid=(1,), block=(128,), args=args, outputs=[3], check=check,
                shared_mem=image.size, extra={"c": c, "a_sbo": a_sbo, "want_bits": want_bits})


def rule_probe_cases(seed: int) -> list[Case]:
    """Inputs aimed at the corners of the accumulation rule (the designs of the 2026-12-04
    run's wgmma_fp8_probe.py), each held to the model's bits on the GPU:
    gaps: per row a large term and a smaller one 0..20 binades below (where the window cuts);
    many_small: one power of two and 31 equal small terms (truncation of each, not of their sum);
    big_c: small products into a large C with a fraction (is C cut to the window?);
    small_c: a small C under large products (C truncated against them);
    ksteps: one large and one small product per k32 step over 4 steps (the fp32 hand-over)."""
    rng = np.random.default_rng(seed)
    mant = 1.0 + np.arange(8) / 8.0
    sign = lambda shape: rng.choice([-1.0, 1.0], shape)  # noqa: E731
    zeros_c = np.zeros((M, N), np.float32)
    out = []
    a, b = np.zeros((M, KSTEP)), np.zeros((N, KSTEP))
    a[:, 0] = mant[rng.integers(0, 8, M)] * 2.0 ** rng.integers(4, 9, M) * sign(M)
    a[:, 1] = mant[rng.integers(0, 8, M)] * sign(M)
    b[:, 0] = 1.0
    b[:, 1] = mant[np.arange(N) % 8] * 2.0 ** -(np.arange(N) // 8 % 16) * sign(N)
    out.append(("gaps", a, b, zeros_c, False, 1))
    a, b = np.zeros((M, KSTEP)), np.ones((N, KSTEP))
    a[:, 0] = 2.0 ** rng.integers(4, 9, M)
    a[:, 1:] = (mant[rng.integers(0, 8, M)] * 2.0 ** rng.integers(-6, 0, M))[:, None]
    b[:, 1:] = (mant[np.arange(N) % 8] * 2.0 ** -(np.arange(N) // 8 % 8))[:, None]
    out.append(("many_small", a, b, zeros_c, False, 1))
    c = ((rng.integers(1, 4096, (M, N)) + rng.integers(0, 64, (M, N)) / 64.0) * sign((M, N))).astype(np.float32)
    a, b = np.zeros((M, KSTEP)), np.zeros((N, KSTEP))
    a[:, 0] = mant[rng.integers(0, 8, M)] * 2.0 ** rng.integers(-6, 3, M)
    b[:, 0] = mant[rng.integers(0, 8, N)] * 2.0 ** rng.integers(-6, 3, N)
    out.append(("big_c", a, b, c, True, 1))
    c = (rng.standard_normal((M, N)) * 2.0**-4).astype(np.float32)
    a, b = np.zeros((M, KSTEP)), np.zeros((N, KSTEP))
    a[:, :2] = mant[rng.integers(0, 8, (M, 2))] * 2.0 ** rng.integers(4, 9, (M, 2))
    b[:, :2] = 1.0
    out.append(("small_c", a, b, c, True, 1))
    a, b = np.zeros((M, 4 * KSTEP)), np.zeros((N, 4 * KSTEP))
    for s in range(4):
        a[:, s * KSTEP] = mant[rng.integers(0, 8, M)] * 2.0 ** rng.integers(0, 9, M) * sign(M)
        a[:, s * KSTEP + 5] = mant[rng.integers(0, 8, M)] * 2.0 ** rng.integers(-6, 2, M)
        b[:, s * KSTEP] = 1.0
        b[:, s * KSTEP + 5] = mant[np.arange(N) % 8] * 2.0 ** -(np.arange(N) // 16) * sign(N)
    out.append(("ksteps", a, b, zeros_c, False, 4))
    return [laid_out_case(encode(a, "e4m3"), encode(b, "e4m3"), c, f"wgmma rule probe {name}", seed,
                          accumulate_c=acc) for name, a, b, c, acc, _ in out]


def cases(seed: int = 0) -> list[Case]:
    """Every wgmma case, for the GPU conformance test (all compared bit for bit)."""
    out = []
    for i, sw in enumerate(SWIZZLE):
        out.append(wgmma_case(sw, seed + i, ksteps=4 if sw != "none" else 2))
        out.append(wgmma_case(sw, seed + 10 + i, ksteps=2, padded=True))
        out.append(wgmma_case(sw, seed + 20 + i, ksteps=1, exact=False, accumulate_c=False))
    # random codes onto a random fp32 C (24 significant bits): whether the accumulator is cut to
    # the 13-bit window like a product (the model's rule, as MMA-Sim has it) is decided here;
    # the 2026-12-04 capture had no such case (its C values have at most 14 significant bits)
    out.append(wgmma_case("b128", seed + 25, ksteps=2, exact=False))
    out.append(wgmma_case("b128", seed + 30, ksteps=2, b_sw="none"))
    out.append(wgmma_case("b128", seed + 40, ksteps=4, n=64))
    out.append(wgmma_case("none", seed + 41, ksteps=2, padded=True, n=64))
    for i, n in enumerate((96, 192, 256)):  # the template's other sizes
        out.append(wgmma_case("b128", seed + 42 + i, ksteps=2, exact=False, n=n))
    for i, n in enumerate((16, 24, 40, 56)):  # decode sizes: random codes and rule-exact, swizzled and not
        out.append(wgmma_case("b128", seed + 60 + i, ksteps=4, exact=False, n=n))
        out.append(wgmma_case("none", seed + 64 + i, ksteps=2, padded=True, n=n))
    return out + rule_probe_cases(seed + 50)
