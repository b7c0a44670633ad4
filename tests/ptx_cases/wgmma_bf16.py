"""The test kernels of ptx/wgmma_bf16.cuh (16-bit wgmma, SS and RS forms), the numpy layout models
and the case builder: tests/test_ptx_wgmma_bf16.py says what they check. gpu_cases(seed): the
device's HGMMA against the numpy model (tests/gpu/test_ptx_wgmma_bf16_gpu.py); not in the
conformance test's families yet, since that runs every case on the simulator too, where the
wrappers refuse until the queue hook exists (ptx/wgmma_bf16.cuh)."""
from __future__ import annotations

import numpy as np

from fastmoe_ops.reference import tensor_core

from .case import Case, assert_equal_bits, poisoned

SIZES = (64, 128, 192, 256)

# One warpgroup, one wgmma per launch, with the executor kernel's signature below (so a case built by
# exec_case runs on either: kernel name -> wrapper instantiation). Per N an SS kernel (S = Q K^T:
# both K-major) and an RS kernel (O += P V: A from registers, B MN-major); f16, RS with K-major B,
# and SS with both operands MN-major at N 128. The runtime n / f16 / rs / trans arguments must
# match the instantiation (otherwise the kernel returns at once and D stays poisoned).
SOURCE = r"""
#include "ptx/wgmma_bf16.cuh"
extern __shared__ __align__(1024) unsigned char wg16_smem[];

template <int N, Wgmma16 T, int RS, int TA, int TB>
__device__ void wg16_run(const unsigned char* image, int image_bytes, const uint32_t* a_regs, const float* C, float* D,
                         int a_off, int b_off, int a_lbo, int a_sbo, int a_sw, int b_lbo, int b_sbo, int b_sw, int n,
                         int f16, int rs, int scale_d, int trans_a, int trans_b) {
  if (n != N || f16 != (T == Wgmma16::f16) || rs != RS || trans_a != TA || trans_b != TB) return;  // D stays poisoned
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg16_smem[i] = image[i];
  fence_proxy_async_shared();  // generic-proxy stores -> wgmma's async-proxy reads
  __syncthreads();
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  float acc[N / 2];
  for (int i = 0; i < N / 2; ++i) acc[i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + (i % 2)];
  const uint32_t a[4] = {a_regs[4 * t], a_regs[4 * t + 1], a_regs[4 * t + 2], a_regs[4 * t + 3]};
  wgmma_fence_operands(acc);
  wgmma_fence();
  const uint64_t da = make_smem_desc(wg16_smem + a_off, a_lbo, a_sbo, static_cast<Swizzle>(a_sw));
  const uint64_t db = make_smem_desc(wg16_smem + b_off, b_lbo, b_sbo, static_cast<Swizzle>(b_sw));
  if constexpr (RS)
    wgmma_m64nNk16_rs<N, T, TB>(acc, a, db, scale_d);
  else
    wgmma_m64nNk16_ss<N, T, TA, TB>(acc, da, db, scale_d);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  for (int i = 0; i < N / 2; ++i) D[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + (i % 2)] = acc[i];
}

#define WG16_ENTRY(NAME, N, T, RS, TA, TB)                                                                         \
  extern "C" __global__ void NAME(const unsigned char* image, int image_bytes, const uint32_t* a_regs,             \
                                  const float* C, float* D, int a_off, int b_off, int a_lbo, int a_sbo, int a_sw,  \
                                  int b_lbo, int b_sbo, int b_sw, int n, int f16, int rs, int scale_d,            \
                                  int trans_a, int trans_b) {                                                      \
    wg16_run<N, Wgmma16::T, RS, TA, TB>(image, image_bytes, a_regs, C, D, a_off, b_off, a_lbo, a_sbo, a_sw, b_lbo, \
                                        b_sbo, b_sw, n, f16, rs, scale_d, trans_a, trans_b);                      \
  }
WG16_ENTRY(wgmma_bf16_ss_n64, 64, bf16, 0, 0, 0)
WG16_ENTRY(wgmma_bf16_ss_n128, 128, bf16, 0, 0, 0)
WG16_ENTRY(wgmma_bf16_ss_n192, 192, bf16, 0, 0, 0)
WG16_ENTRY(wgmma_bf16_ss_n256, 256, bf16, 0, 0, 0)
WG16_ENTRY(wgmma_bf16_rs_n64_tb, 64, bf16, 1, 0, 1)
WG16_ENTRY(wgmma_bf16_rs_n128_tb, 128, bf16, 1, 0, 1)
WG16_ENTRY(wgmma_bf16_rs_n192_tb, 192, bf16, 1, 0, 1)
WG16_ENTRY(wgmma_bf16_rs_n256_tb, 256, bf16, 1, 0, 1)
WG16_ENTRY(wgmma_bf16_rs_n128, 128, bf16, 1, 0, 0)
WG16_ENTRY(wgmma_bf16_ss_n128_ta_tb, 128, bf16, 0, 1, 1)
WG16_ENTRY(wgmma_f16_ss_n128, 128, f16, 0, 0, 0)
"""

# Simulator only: the execution half of the 16-bit emulation (ptx/wgmma_bf16.cuh's
# sim_detail::wgmma16_execute) called synchronously, one op per launch, until the queue hook
# exists. rs = 1: A from registers a_regs[4 * t + r] (gathered across each quad as at issue).
SIM_EXEC_SOURCE = r"""
#include "ptx/wgmma_bf16.cuh"
extern __shared__ __align__(1024) unsigned char wg16_smem[];
extern "C" __global__ void wgmma16_exec(const unsigned char* image, int image_bytes, const uint32_t* a_regs,
                                        const float* C, float* D, int a_off, int b_off, int a_lbo, int a_sbo,
                                        int a_sw, int b_lbo, int b_sbo, int b_sw, int n, int f16, int rs,
                                        int scale_d, int trans_a, int trans_b) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg16_smem[i] = image[i];
  __syncthreads();
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  float acc[128];
  for (int i = 0; i < n / 2; ++i) acc[i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * n + 8 * (i / 4) + 2 * q + (i % 2)];
  sim_detail::Wgmma16Op op{};
  op.d = acc;
  op.a = make_smem_desc(wg16_smem + a_off, a_lbo, a_sbo, static_cast<Swizzle>(a_sw));
  op.b = make_smem_desc(wg16_smem + b_off, b_lbo, b_sbo, static_cast<Swizzle>(b_sw));
  op.n = n, op.scale_d = scale_d, op.f16 = f16, op.a_in_regs = rs, op.trans_a = trans_a, op.trans_b = trans_b;
  if (rs) {
    const uint32_t a[4] = {a_regs[4 * t], a_regs[4 * t + 1], a_regs[4 * t + 2], a_regs[4 * t + 3]};
    sim_detail::gather_a_rows(a, op.a_rows);
  }
  sim_detail::wgmma16_execute(op);
  for (int i = 0; i < n / 2; ++i) D[(16 * w + g + 8 * ((i / 2) % 2)) * n + 8 * (i / 4) + 2 * q + (i % 2)] = acc[i];
}
"""


# Simulator only (appended to SOURCE): what reading or writing around the async window does, which
# the GPU leaves undefined and the emulation defines as the ISA's queue semantics. Same signature as
# the executor kernel plus `mode`; A [64, 16] and B [64, 16] K-major (SS) or A from registers and B
# MN-major (RS), N = 64.
#   mode 0 (RS): three groups, one accumulator each (acc[k] starts at C): D [6][64][64] = the three
#          accumulators after wait_group 2, then acc[1], acc[2] after wait_group 1, acc[2] after wait 0.
#   mode 1 (SS): D [2][64][64] = the accumulator stored after commit and before the wait, then after it.
#   mode 2 (SS): A's bytes (all below b_off) zeroed after the issue and before the wait; D [1][64][64] after the wait.
#   mode 3 (SS): no wgmma.fence before the MMA (must fail).
#   mode 4 (RS): A's registers changed (to 0) after the issue, before the wait; D [1][64][64].
ASYNC_SOURCE = r"""
__device__ void wg16_store64(float* D, const float (&acc)[32]) {
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < 32; ++i) D[(16 * w + g + 8 * ((i / 2) % 2)) * 64 + 8 * (i / 4) + 2 * q + (i % 2)] = acc[i];
}
extern "C" __global__ void wgmma16_async(const unsigned char* image, int image_bytes, const uint32_t* a_regs,
                                         const float* C, float* D, int a_off, int b_off, int a_lbo, int a_sbo,
                                         int a_sw, int b_lbo, int b_sbo, int b_sw, int n, int f16, int rs,
                                         int scale_d, int trans_a, int trans_b, int mode) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg16_smem[i] = image[i];
  fence_proxy_async_shared();
  __syncthreads();
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  float acc[3][32];
  for (int k = 0; k < 3; ++k)
    for (int i = 0; i < 32; ++i) acc[k][i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * 64 + 8 * (i / 4) + 2 * q + (i % 2)];
  uint32_t a[4] = {a_regs[4 * t], a_regs[4 * t + 1], a_regs[4 * t + 2], a_regs[4 * t + 3]};
  const uint64_t da = make_smem_desc(wg16_smem + a_off, a_lbo, a_sbo, static_cast<Swizzle>(a_sw));
  const uint64_t db = make_smem_desc(wg16_smem + b_off, b_lbo, b_sbo, static_cast<Swizzle>(b_sw));
  if (mode != 3) wgmma_fence();
  if (mode == 0) {
    for (int k = 0; k < 3; ++k) {
      wgmma_m64nNk16_rs<64, Wgmma16::bf16, 1>(acc[k], a, db, 1);
      wgmma_commit();
    }
    wgmma_wait<2>();
    for (int k = 0; k < 3; ++k) wg16_store64(D + k * 64 * 64, acc[k]);
    wgmma_wait<1>();
    wg16_store64(D + 3 * 64 * 64, acc[1]);
    wg16_store64(D + 4 * 64 * 64, acc[2]);
    wgmma_wait<0>();
    wg16_store64(D + 5 * 64 * 64, acc[2]);
    return;
  }
  if (mode == 4) {
    wgmma_m64nNk16_rs<64, Wgmma16::bf16, 1>(acc[0], a, db, 1);
    a[0] = a[1] = a[2] = a[3] = 0;
  } else {
    wgmma_m64nNk16_ss<64>(acc[0], da, db, 1);
  }
  wgmma_commit();
  if (mode == 1) wg16_store64(D, acc[0]);
  if (mode == 2) {
    __syncthreads();
    for (int i = t; i < b_off; i += blockDim.x) wg16_smem[i] = 0;  // A lies below B
    __syncthreads();
  }
  wgmma_wait<0>();
  wg16_store64(D + (mode == 1 ? 64 * 64 : 0), acc[0]);
  if (a[0] == 12345u) D[0] = 0.f;  // keeps the zeroed registers live
}
"""

def bits16(x: np.ndarray, fmt: str) -> np.ndarray:
    """uint16 codes of float values (bf16: float32's top half, truncated: the value is what the code says)."""
    if fmt == "f16":
        return np.asarray(x, np.float16).view(np.uint16)
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def values16(codes: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "f16":
        return codes.view(np.float16).astype(np.float64)
    return (codes.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def a_registers(a_codes: np.ndarray) -> np.ndarray:
    """A [64, 16] codes as the RS fragment: thread t's 4 registers (rows g / g + 8, k 2q.. / 2q + 8..)."""
    regs = np.zeros((128, 4), np.uint32)
    for t in range(128):
        w, g, q = t // 32, t % 32 // 4, t % 4
        for r in range(4):
            row, k = 16 * w + g + 8 * (r % 2), 2 * q + 8 * (r // 2)
            regs[t, r] = int(a_codes[row, k]) | (int(a_codes[row, k + 1]) << 16)
    return regs.ravel()


PITCH = {"b128": 128, "b64": 64, "b32": 32}


def mn_offset(sw: str, start: int, lbo: int, sbo: int, mn, k):
    """ISA canonical MN-major layout of 16-bit elements (T = 8 elements = 16 bytes), byte offset of
    (mn, k): none ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)); P-byte swizzle ((T,W,m),(8,k)):((1,T,LBO),(WT,SBO))
    with W = P / 16, then the swizzle XOR on address bits (vectorised)."""
    mn, k = np.asarray(mn), np.asarray(k)
    if sw == "none":
        return start + 2 * (mn % 8) + 16 * (k % 8) + sbo * (mn // 8) + lbo * (k // 8)
    p = PITCH[sw]
    u = start + 2 * (mn % (p // 2)) + p * (k % 8) + lbo * (mn // (p // 2)) + sbo * (k // 8)
    return u ^ (((u >> 7) & (p // 16 - 1)) << 4)


def mn_layout(sw: str, rows: int, base: int, padded: bool):
    """(lbo, sbo, bytes used from base) of an MN-major operand [rows, 16]: two k-groups of 8."""
    if sw == "none":
        sbo = 256 if padded else 128                 # 8-element MN groups
        lbo = sbo * (rows // 8) + (128 if padded else 0)  # the second k-group
        return lbo, sbo, lbo + sbo * (rows // 8)
    p = PITCH[sw]
    lbo = 8 * p * (2 if padded else 1)               # next P-byte pattern along MN (keeps 8P alignment)
    sbo = lbo * -(-rows // (p // 2))                 # the second k-group
    return lbo, sbo, 2 * sbo


def place_mn(image: np.ndarray, sw, lbo, sbo, start, codes: np.ndarray) -> None:
    """Writes codes [rows, 16] (uint16) MN-major into image; asserts no two elements collide."""
    rows = codes.shape[0]
    r, k = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
    off = mn_offset(sw, start, lbo, sbo, r, k)
    assert len(set(off.ravel().tolist())) == off.size, "layout model: overlapping elements"
    image[off] = codes & 0xff
    image[off + 1] = codes >> 8


def exec_case(seed: int, *, n: int = 128, fmt: str = "bf16", rs: bool = False, sw: str = "b128",
              b_sw: str | None = None, padded: bool = False, exact: bool = False, scale_d: bool = True,
              trans_a: bool = False, trans_b: bool = False) -> Case:
    """One m64nNk16 op on the executor: D = A B^T (+ C), A [64, 16], B [n, 16], each K-major or
    (trans) MN-major in shared memory."""
    from .wgmma import SWIZZLE, layout, place

    rng = np.random.default_rng(seed)
    b_sw = b_sw or sw
    if exact:  # small integers: every partial sum exact in fp32, so the rule drops nothing
        a_val, b_val = rng.integers(-8, 9, (64, 16)), rng.integers(-8, 9, (n, 16))
        c = rng.integers(-64, 65, (64, n)).astype(np.float32)
    else:
        a_val = rng.standard_normal((64, 16)) * 2.0 ** rng.integers(-6, 7, (64, 16))
        b_val = rng.standard_normal((n, 16)) * 2.0 ** rng.integers(-6, 7, (n, 16))
        c = rng.standard_normal((64, n)).astype(np.float32)
    a_codes, b_codes = bits16(a_val, fmt), bits16(b_val, fmt)
    a64, b64 = values16(a_codes, fmt), values16(b_codes, fmt)
    if trans_a:
        a_lbo, a_sbo, a_bytes = mn_layout(sw, 64, 0, padded)
        a_start = 0
    else:
        a_lbo, a_sbo, a_starts, a_bytes = layout(sw, 64, 1, 0, padded)
        a_start = a_starts[0]
    b_base = -(-a_bytes // 1024) * 1024
    if trans_b:
        b_lbo, b_sbo, b_bytes = mn_layout(b_sw, n, b_base, padded)
        b_start = b_base
    else:
        b_lbo, b_sbo, b_starts, b_bytes = layout(b_sw, n, 1, b_base, padded)
        b_start = b_starts[0]
    image = np.full(b_base + b_bytes, 0xff, np.uint8)  # 0xffff: NaN in both formats, wherever the layout leaves holes
    if not rs:
        if trans_a:
            place_mn(image, sw, a_lbo, a_sbo, a_start, a_codes)
        else:
            place(image, sw, a_lbo, a_sbo, [a_start], a_codes.view(np.uint8).reshape(64, 32))
    if trans_b:
        place_mn(image, b_sw, b_lbo, b_sbo, b_start, b_codes)
    else:
        place(image, b_sw, b_lbo, b_sbo, [b_start], b_codes.view(np.uint8).reshape(n, 32))
    want = tensor_core.dot_add(a64[:, None, :], b64[None, :, :], c if scale_d else np.zeros_like(c), fmt,
                               tensor_core.HMMA)
    want64 = a64 @ b64.T + (c if scale_d else 0)
    what = (f"wgmma m64n{n}k16 {fmt} {'RS' if rs else 'SS'} A:{sw}{'^T' if trans_a else ''} "
            f"B:{b_sw}{'^T' if trans_b else ''}{' padded' if padded else ''}{' exact' if exact else ''}"
            f"{'' if scale_d else ' scale-d=0'}")

    def check(outs):
        (d,) = outs
        assert_equal_bits(d, want, what, seed)
        if exact:
            assert_equal_bits(d, want64.astype(np.float32), what + " vs float64", seed)

    args = [image, np.int32(image.size), a_registers(a_codes), c, poisoned((64, n), np.float32),
            np.int32(a_start), np.int32(b_start), np.int32(a_lbo), np.int32(a_sbo), np.int32(SWIZZLE[sw]),
            np.int32(b_lbo), np.int32(b_sbo), np.int32(SWIZZLE[b_sw]), np.int32(n), np.int32(fmt == "f16"),
            np.int32(rs), np.int32(scale_d), np.int32(trans_a), np.int32(trans_b)]
    return Case(name=what, kernel="wgmma16_exec", grid=(1,), block=(128,), args=args, outputs=[4], check=check,
                shared_mem=image.size, sim_only=True)


def wrapper_kernel(n: int, fmt: str, rs: bool, trans_a: bool, trans_b: bool) -> str:
    """The SOURCE entry instantiating this combination (KeyError where none does)."""
    name = {(False, False, False): f"wgmma_{fmt}_ss_n{n}", (True, False, True): f"wgmma_{fmt}_rs_n{n}_tb",
            (True, False, False): f"wgmma_{fmt}_rs_n{n}", (False, True, True): f"wgmma_{fmt}_ss_n{n}_ta_tb"}
    return name[(rs, trans_a, trans_b)]


def gpu_cases(seed: int = 0) -> list[Case]:
    """One-op launches through the wrappers, each held to the numpy model's bits (HMMA's rule,
    assumed for HGMMA: a failure here on random inputs is the measurement that corrects it; the
    exact ones must match float64 whatever the rule)."""
    specs = [dict(n=n, exact=e) for n in SIZES for e in (True, False)]
    specs += [dict(n=n, rs=True, trans_b=True, exact=e) for n in SIZES for e in (True, False)]
    specs += [dict(n=128, sw=sw, padded=p) for sw in ("b64", "b32", "none") for p in (False, True)]
    specs += [dict(n=128, rs=True, trans_b=True, sw=sw, padded=True) for sw in ("b64", "b32", "none")]
    specs += [dict(n=128, rs=True), dict(n=128, trans_a=True, trans_b=True), dict(n=128, fmt="f16"),
              dict(n=128, scale_d=False)]
    out = []
    for i, spec in enumerate(specs):
        case = exec_case(seed + i, **spec)
        case.kernel = wrapper_kernel(spec["n"], spec.get("fmt", "bf16"), spec.get("rs", False),
                                     spec.get("trans_a", False), spec.get("trans_b", False))
        case.sim_only = False
        out.append(case)
    return out
