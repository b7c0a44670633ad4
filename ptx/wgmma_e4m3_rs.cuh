// ptx/wgmma_e4m3_rs.cuh: the register-A (RS) form of the e4m3 warpgroup MMA on Hopper (sm_90a),
// the instruction of the FP8 attention's O += P V (PTX ISA, "wgmma.mma_async"):
//
//   wgmma.mma_async.sync.aligned.m64nNk32.f32.e4m3.e4m3  d, {a0, a1, a2, a3}, b-desc, scale-d, 1, 1;
//     D[64xN] = A[64x32] * B[32xN] + (scale-d ? D : 0), f32 accumulate; A from 4 .b32 registers
//     per thread (16 e4m3 values, lowest byte = lowest k), B in shared memory K-major (8-bit
//     types have no transpose bit: B's N rows each hold their 32 k bytes contiguously).
// A fragment (ISA "Matrix Fragments for wgmma .m64nNk32", register fragment of A for the 8-bit
// types; per warp it is mma.m16n8k32's A map, ptx/mma.cuh): thread t of the warpgroup, warp
// w = t / 32, g = (t % 32) / 4, t4 = t % 4; byte b < 16 of the thread (register b / 4, byte b % 4):
//   row = 16 w + g + 8 ((b / 4) % 2),   k = 4 t4 + (b % 4) + 16 (b / 8)
//   a0: row g, k 4 t4 .. 4 t4 + 3      a1: row g + 8, same k
//   a2: row g, k 16 + 4 t4 ..          a3: row g + 8, k 16 + 4 t4 ..
// This is NOT the f32 accumulator's column map (col = 8 (i / 4) + 2 t4 + i % 2): a score
// accumulator's registers packed in order become P's A fragment only with the keys of B
// permuted to match (csrc/attention/hopper_fwd_fp8.cuh derives the permutation).
//
// Emulation (FMO_SIM), the e4m3 family's queue (ptx/wgmma.cuh: fence check, warp/warpgroup
// uniformity, executed at the wait_group that retires it): at issue each quad's A registers are
// gathered into the thread's two rows of A (the GPU reads them later: a kernel that changes them
// before the wait is wrong on the GPU and not caught here); at retirement B's columns are read
// through the descriptor (kmajor_offset: every swizzle) and each output is one fused step of
// QGMMA's rule (kQgmmaRule, as the SS form), from D or 0.
#pragma once

#include "ptx/wgmma.cuh"
#ifndef FMO_SIM
#include "ptx/wgmma_e4m3_rs_asm.cuh"
#endif

namespace fmo {
namespace ptx {

#ifdef FMO_SIM
namespace sim_detail {
struct WgmmaE4m3RsOp {
  float* d;
  uint64_t b;
  uint8_t a_rows[2][32];  // this thread's rows g, g + 8 of A (e4m3 codes), gathered from its quad at issue
  int n, scale_d;
};

// Element (h, k) of the fragment map above <- (lane 4 g + t4, byte b): the inverse, for the gather.
FMO_SIM_EMU constexpr uint32_t rs_e4m3_row(uint32_t b) { return (b / 4) % 2; }
FMO_SIM_EMU constexpr uint32_t rs_e4m3_k(uint32_t t4, uint32_t b) { return 4 * t4 + b % 4 + 16 * (b / 8); }

FMO_SIM_EMU void gather_a_rows_e4m3(const uint32_t (&a)[4], uint8_t (&rows)[2][32]) {
  uint32_t all[32][4];
  fmo_sim::warp_allgather(0xffffffffu, a, all, sizeof a);
  const uint32_t g = fmo_sim::lane_id() / 4;
  for (uint32_t t4 = 0; t4 < 4; ++t4)
    for (uint32_t b = 0; b < 16; ++b)
      rows[rs_e4m3_row(b)][rs_e4m3_k(t4, b)] = uint8_t(all[4 * g + t4][b / 4] >> (8 * (b % 4)));
}

FMO_SIM_EMU void wgmma_e4m3_rs_execute(const WgmmaE4m3RsOp& op, uint64_t seq) {
  const unsigned char* base = fmo_sim_dynamic_smem();
  const WgmmaDesc db = decode_desc(op.b);
  if (db.base_offset != 0) fmo_sim::fail("wgmma: descriptor base offset %u: only 0 is emulated", db.base_offset);
  float arow[2][32];
  SplitVector arow_split[2];
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 32; ++k) arow[h][k] = decode_e4m3(op.a_rows[h][k]);
    split_vector(arow[h], 32, kE4M3Format, arow_split[h]);
  }
  wgmma_e4m3_rows_times_b(base, db, seq, op.b, arow, arow_split, op.d, op.n, op.scale_d);  // as the SS form
}

// Payload ring, as ptx/wgmma_bf16.cuh's (see there): one slot per pending op, by issue count.
static thread_local WgmmaE4m3RsOp g_wgmma_e4m3_rs[kWgmmaMaxThreads][kWgmmaMaxPending];

FMO_SIM_EMU void wgmma_e4m3_rs_retire(const WgmmaOp& op) {
  wgmma_e4m3_rs_execute(*static_cast<const WgmmaE4m3RsOp*>(op.ext), op.seq);
}

FMO_SIM_EMU void wgmma_e4m3_rs_issue(const WgmmaE4m3RsOp& op) {
  WgmmaThread& s = wgmma_thread();
  if (s.count == kWgmmaMaxPending)
    fmo_sim::fail("wgmma emulation: more than %d MMAs issued and not yet retired", kWgmmaMaxPending);
  WgmmaE4m3RsOp& slot = g_wgmma_e4m3_rs[fmo_sim::cur()->linear_tid][s.issued % kWgmmaMaxPending];
  slot = op;
  wgmma_issue_op(WgmmaOp{op.d, 0, op.b, op.n, op.scale_d, &wgmma_e4m3_rs_retire, &slot});
}
}  // namespace sim_detail
#endif

// D[64xN] (+)= A[64x32] * B[32xN], e4m3 x e4m3 -> f32; A: this thread's 4 registers of packed e4m3
// (fragment map above), B K-major in shared memory. N: 64, 128 (ptx/gen_wgmma_e4m3_rs.py). A's
// registers must not change until the MMA retired (wgmma_wait): the ISA reads them asynchronously.
template <int N>
FMO_DEVICE void wgmma_m64nNk32_e4m3_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma m64nNk32 RS e4m3: N is 64 or 128 (ptx/gen_wgmma_e4m3_rs.py)");
#ifdef FMO_SIM
  sim_detail::WgmmaE4m3RsOp op{};
  op.d = d, op.b = desc_b, op.n = N, op.scale_d = scale_d;
  sim_detail::gather_a_rows_e4m3(a, op.a_rows);  // the whole warp, before any check can fail
  sim_detail::wgmma_e4m3_rs_issue(op);
#else
  WgmmaE4m3RsAsm<N>::mma(d, a, desc_b, scale_d);
#endif
}

}  // namespace ptx
}  // namespace fmo
