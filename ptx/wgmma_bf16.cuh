// ptx/wgmma_bf16.cuh: warpgroup MMA with 16-bit inputs on Hopper (sm_90a), the instructions
// attention's two GEMMs need (PTX ISA, "wgmma.mma_async"):
//
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16  d, a-desc, b-desc, scale-d, 1, 1, tA, tB;  (SS)
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16  d, {a0..a3}, b-desc, scale-d, 1, 1, tB;    (RS)
//     (and .f16.f16): D[64xN] = A[64x16] * B[16xN] + (scale-d ? D : 0), f32 accumulate.
//   SS: A and B in shared memory by matrix descriptors (make_smem_desc, ptx/wgmma.cuh).
//   RS: A from registers, 4 x .b32 per thread = 8 16-bit values (the P of O += P V: the
//       softmax output never goes through shared memory).
//   imm-trans: 0 = K-major (the e4m3 family's only layout), 1 = MN-major ("transposed"). For
//       16-bit types both are allowed for B, and for A when it comes from shared memory. S = Q K^T
//       reads Q [rows, d] and K [keys, d] K-major (tA = tB = 0); O += P V reads V [keys, d] as
//       stored, contiguous along N = d: tB = 1, so V is never transposed in shared memory.
// Fragments (ISA "Matrix Fragments for wgmma .m64nNk16"): thread t of the warpgroup, warp
// w = t / 32, g = (t % 32) / 4, q = t % 4.
//   D (f32), register i < N / 2:  row = 16 w + g + 8 ((i / 2) % 2),  col = 8 (i / 4) + 2 q + (i % 2)
//     (the layout of ptx/wgmma.cuh: one accumulator map for every wgmma).
//   A (RS), 16-bit element e < 8 (a[e / 2], low half first):
//     row = 16 w + g + 8 ((e / 2) % 2),  k = 2 q + (e % 2) + 8 (e / 4)
//     which is D's map for N = 16: an S accumulator's registers, k-step j = columns 16 j..16 j + 15,
//     converted pairwise to bf16 ARE the A fragment of P's k-step j (FA3's register reuse).
// fence / commit / wait and the descriptor helpers are the e4m3 family's (ptx/wgmma.cuh): one
// queue of in-flight MMAs per warpgroup, whatever the input type.
//
// Emulation (FMO_SIM): NOT YET. The queue that wgmma.commit_group / wait_group retire lives in
// ptx/wgmma.cuh (sim_detail::WgmmaOp), and it executes every op as e4m3 x e4m3 from two
// descriptors; a 16-bit op (its type, transpose bits, and for RS the A registers captured at
// issue) needs a per-op executor there. That hook is requested in /work/notes/ptx-requests.md
// (2026-12-05, issue 16). Until it lands, every call below fails on the simulator with a message
// saying so, rather than computing at issue time (which would hide the asynchronous errors the
// e4m3 emulation catches). The arithmetic the emulation will use, for the record: one fused
// dot-add step per k16 instruction (ptx/tensor_core_numerics.cuh) with HMMA bf16/f16's rule
// (window 25, result 23 fraction bits): ASSUMED from mma.sync's fitted rule, to be confirmed by
// the GPU conformance run (ptx/README.md).
#pragma once

#include "ptx/wgmma.cuh"
#ifndef FMO_SIM
#include "ptx/wgmma_bf16_asm.cuh"
#endif

namespace fmo {
namespace ptx {

enum class Wgmma16 { bf16, f16 };  // the 16-bit input type of both operands

#ifdef FMO_SIM
namespace sim_detail {
FMO_SIM_EMU void wgmma16_not_emulated(const char* form) {
  fmo_sim::fail("%s: the simulator does not emulate 16-bit wgmma yet (its queue in ptx/wgmma.cuh executes only "
                "e4m3 ops; the per-op executor hook is requested in /work/notes/ptx-requests.md)", form);
}
}  // namespace sim_detail
#endif

// D[64xN] (+)= A[64x16] * B[16xN], both operands in shared memory. TransA / TransB: 0 K-major,
// 1 MN-major. N: 64, 128, 192, 256 (ptx/gen_wgmma_bf16.py; the ISA allows multiples of 8 to 256).
template <int N, Wgmma16 T = Wgmma16::bf16, int TransA = 0, int TransB = 0>
FMO_DEVICE void wgmma_m64nNk16_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma m64nNk16: N is a multiple of 8 up to 256");
  static_assert((TransA == 0 || TransA == 1) && (TransB == 0 || TransB == 1), "wgmma: transpose bits are 0 or 1");
#ifdef FMO_SIM
  (void)d, (void)desc_a, (void)desc_b, (void)scale_d;
  sim_detail::wgmma16_not_emulated("wgmma.mma_async m64nNk16 (SS)");
#else
  if constexpr (T == Wgmma16::bf16)
    WgmmaBf16Asm<N, TransA, TransB>::ss(d, desc_a, desc_b, scale_d);
  else
    WgmmaF16Asm<N, TransA, TransB>::ss(d, desc_a, desc_b, scale_d);
#endif
}

// D[64xN] (+)= A[64x16] * B[16xN], A from this thread's 4 registers (fragment map above), B in
// shared memory (TransB: 0 K-major, 1 MN-major). A's registers must not change until the MMA has
// retired (wgmma_wait): the ISA reads them asynchronously.
template <int N, Wgmma16 T = Wgmma16::bf16, int TransB = 0>
FMO_DEVICE void wgmma_m64nNk16_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma m64nNk16: N is a multiple of 8 up to 256");
  static_assert(TransB == 0 || TransB == 1, "wgmma: transpose bits are 0 or 1");
#ifdef FMO_SIM
  (void)d, (void)a, (void)desc_b, (void)scale_d;
  sim_detail::wgmma16_not_emulated("wgmma.mma_async m64nNk16 (RS)");
#else
  if constexpr (T == Wgmma16::bf16)
    WgmmaBf16Asm<N, 0, TransB>::rs(d, a, desc_b, scale_d);
  else
    WgmmaF16Asm<N, 0, TransB>::rs(d, a, desc_b, scale_d);
#endif
}

}  // namespace ptx
}  // namespace fmo
