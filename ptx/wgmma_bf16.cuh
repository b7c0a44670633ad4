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
// Emulation (FMO_SIM), asynchronous like the e4m3 family's: the wrappers queue the op in
// ptx/wgmma.cuh's per-thread queue (sim_detail::wgmma_issue_op: warp/warpgroup uniformity, fence
// check) with this file's executor; the wait_group that retires its group runs
// sim_detail::wgmma16_execute (K-major operands through every swizzle and LBO/SBO, A from shared
// memory or from the RS fragment). So D read before that wait is the old D, and shared memory
// overwritten before it is what gets multiplied, as on the GPU. The op's payload (Wgmma16Op) lives
// in a per-thread ring of kWgmmaMaxPending slots indexed by the thread's issue count: the queue
// holds at most that many unretired ops and retires them in issue order, so a slot is free again
// when it comes round. RS: A's registers are gathered across each quad at issue (the GPU reads
// them later: a kernel that changes them before the wait is wrong on the GPU but not caught here).
// MN-major (trans = 1) operands are read by the ISA's canonical layouts (mnmajor_offset16).
// Arithmetic: one fused dot-add step per k16 instruction (ptx/tensor_core_numerics.cuh) with
// HMMA bf16/f16's rule (window 25, result 23 fraction bits): ASSUMED from mma.sync's fitted
// rule, to be confirmed by a GPU conformance run (ptx/README.md).
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
// What a retired 16-bit op computes: thread t's N / 2 outputs of one m64nNk16 op. A 16-bit K-major row is the e4m3
// family's byte layout with 2 bytes per element (k16 = 32 bytes per row), read through
// kmajor_offset; MN-major operands through mnmajor_offset16 (below). A from
// registers: a_regs as captured (fragment map at the top). Arithmetic: one fused dot-add step
// over 16 products and the accumulator, HMMA's (25, 23) rule (ASSUMED for HGMMA, see above).
struct Wgmma16Op {
  float* d;
  uint64_t a, b;
  uint16_t a_rows[2][16];  // RS: this thread's rows g, g + 8 of A (codes), gathered from its quad at issue
  int n, scale_d, f16, a_in_regs, trans_a, trans_b;
};

// RS: the quad of lanes 4g..4g+3 holds rows g and g + 8 of A between them (fragment map at the
// top); gathered when the warp issues (all lanes arrive together, .sync.aligned). The GPU reads
// the registers later, so a kernel that changes them before the wait differs from this capture:
// not caught here.
FMO_SIM_EMU void gather_a_rows(const uint32_t (&a)[4], uint16_t (&rows)[2][16]) {
  uint32_t all[32][4];
  fmo_sim::warp_allgather(0xffffffffu, a, all, sizeof a);
  const uint32_t g = fmo_sim::lane_id() / 4;
  for (uint32_t qq = 0; qq < 4; ++qq)
    for (uint32_t e = 0; e < 8; ++e) {
      const uint32_t reg = all[4 * g + qq][e / 2], bits = (e % 2) ? reg >> 16 : reg & 0xffffu;
      const uint32_t h = (e / 2) % 2, k = 2 * qq + e % 2 + 8 * (e / 4);
      rows[h][k] = static_cast<uint16_t>(bits);
    }
}

FMO_SIM_EMU void read_kmajor_row16(const unsigned char* base, const WgmmaDesc& d, uint32_t row, bool f16,
                                   float (&out)[16]) {
  for (uint32_t c = 0; c < 2; ++c) {  // two 16-byte chunks: k 0..7, 8..15
    const uint32_t off = kmajor_offset(d, row, 16 * c);
    if (off + 16 > fmo_sim::kDynamicSmemBytes)
      fmo_sim::fail("wgmma: operand row %u reaches shared offset %u, past the dynamic buffer", row, off + 16);
    fmo_sim::check_access(base + off, 16, false);
    for (uint32_t j = 0; j < 8; ++j) {
      const uint32_t bits = base[off + 2 * j] | (uint32_t(base[off + 2 * j + 1]) << 8);
      out[8 * c + j] = f16 ? decode_f16(bits) : decode_bf16(bits);
    }
  }
}

// Shared-window byte offset of element (mn, k) of an MN-major 16-bit operand (trans = 1), from the
// ISA's canonical layouts ("Asynchronous Warpgroup Level ... Canonical Layouts", in CuTe
// notation with T = 8 16-bit elements = 16 bytes):
//   none:      ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))  -> 2 (mn % 8) + 16 (k % 8) + SBO (mn / 8) + LBO (k / 8)
//   P-byte swizzle (P = 32, 64, 128; W = P / 16): ((T,W,m),(8,k)):((1,T,LBO),(WT,SBO))
//              -> u = 2 (mn % 8W) + P (k % 8) + LBO (mn / 8W) + SBO (k / 8), then the same XOR as K-major.
// (Note the roles: MN-major swizzled LBO steps along MN, SBO along K; unswizzled the reverse.)
FMO_SIM_EMU uint32_t mnmajor_offset16(const WgmmaDesc& d, uint32_t mn, uint32_t k) {
  if (d.sw == Swizzle::none) return d.start + 2 * (mn % 8) + 16 * (k % 8) + d.sbo * (mn / 8) + d.lbo * (k / 8);
  const uint32_t pitch = d.sw == Swizzle::b128 ? 128 : d.sw == Swizzle::b64 ? 64 : 32, per = pitch / 2;
  const uint32_t u = d.start + 2 * (mn % per) + pitch * (k % 8) + d.lbo * (mn / per) + d.sbo * (k / 8);
  return u ^ (((u >> 7) & (pitch / 16 - 1)) << 4);
}

// Row/column `mn` of an operand over k = 0..15, either major-ness.
FMO_SIM_EMU void read_operand16(const unsigned char* base, const WgmmaDesc& d, bool mn_major, uint32_t mn, bool f16,
                                float (&out)[16]) {
  if (!mn_major) return read_kmajor_row16(base, d, mn, f16, out);
  for (uint32_t k = 0; k < 16; ++k) {
    const uint32_t off = mnmajor_offset16(d, mn, k);
    if (off + 2 > fmo_sim::kDynamicSmemBytes)
      fmo_sim::fail("wgmma: operand element (%u, %u) at shared offset %u, past the dynamic buffer", mn, k, off);
    fmo_sim::check_access(base + off, 2, false);
    const uint32_t bits = base[off] | (uint32_t(base[off + 1]) << 8);
    out[k] = f16 ? decode_f16(bits) : decode_bf16(bits);
  }
}

// seq: the op's MMA number (WgmmaOp::seq), which names its B cache entry; a direct call (tests) may pass any:
// an entry is used only when its bytes still match.
FMO_SIM_EMU void wgmma16_execute(const Wgmma16Op& op, uint64_t seq = 0) {
  const unsigned char* base = fmo_sim_dynamic_smem();
  const WgmmaDesc db = decode_desc(op.b);
  const unsigned t = fmo_sim::cur()->linear_tid % 128;
  const uint32_t w = t / 32, g = (t % 32) / 4, q = t % 4;
  float arow[2][16], bcol[16];
  if (op.a_in_regs) {
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) arow[h][k] = op.f16 ? decode_f16(op.a_rows[h][k]) : decode_bf16(op.a_rows[h][k]);
  } else {
    const WgmmaDesc da = decode_desc(op.a);
    if (da.base_offset != 0)
      fmo_sim::fail("wgmma: descriptor base offset %u: only 0 is emulated", da.base_offset);
    read_operand16(base, da, op.trans_a, 16 * w + g, op.f16, arow[0]);
    read_operand16(base, da, op.trans_a, 16 * w + g + 8, op.f16, arow[1]);
  }
  if (db.base_offset != 0) fmo_sim::fail("wgmma: descriptor base offset %u: only 0 is emulated", db.base_offset);
  const OperandFormat fmt = op.f16 ? kF16Format : kBF16Format;
  SplitVector arow_split[2], bcol_split;
  for (int h = 0; h < 2; ++h) split_vector(arow[h], 16, fmt, arow_split[h]);
  // B's columns split once per warpgroup (ptx/wgmma.cuh's wgmma_b_split; kinds 1..4: the format and
  // B's major-ness). The chunks: K-major, column mn's two 16-byte halves; MN-major, 8 consecutive
  // columns at one k (contiguous under every swizzle: it permutes whole 16-byte chunks).
  const WgmmaBEntry* cache = wgmma_b_split(
      base, seq, op.b, op.n, 1 + op.f16 + 2 * op.trans_b, 16, fmt,
      [&](uint32_t mn, float (&v)[32]) {
        float v16[16];
        read_operand16(base, db, op.trans_b, mn, op.f16, v16);
        std::memcpy(v, v16, sizeof v16);
      },
      [&](int i) {
        const uint32_t u = static_cast<uint32_t>(i);
        return op.trans_b ? mnmajor_offset16(db, 8 * (u / 16), u % 16) : kmajor_offset(db, u / 2, 16 * (u % 2));
      });
  const bool a_finite = arow_split[0].finite && arow_split[1].finite;
  for (int j = 0; j < op.n / 8; ++j)
    for (int c = 0; c < 2; ++c) {
      const uint32_t col = 8 * j + 2 * q + c;
      bool have_col = false;
      for (int h = 0; h < 2; ++h) {
        float* dst = op.d + 4 * j + 2 * h + c;  // register i = 4j + 2h + c
        const float acc = op.scale_d ? *dst : 0.0f;
        if (cache && a_finite && cache->finite[col] && std::isfinite(acc)) {  // all finite: b's floats unused
          *dst = fused_dot_add(arow[h], arow_split[h], arow[h], wgmma_b_column(*cache, 16, col), 16, acc, fmt, kHmmaRule);
          continue;
        }
        if (!have_col) {
          read_operand16(base, db, op.trans_b, col, op.f16, bcol);
          split_vector(bcol, 16, fmt, bcol_split);
          have_col = true;
        }
        *dst = fused_dot_add(arow[h], arow_split[h], bcol, bcol_split, 16, acc, fmt, kHmmaRule);
      }
    }
}

// The payloads of this thread's queued 16-bit ops (see the top of the file). Module thread_locals
// are the CTA's shared memory in the simulator: per CTA in flight. `static` for the reason given
// at g_wgmma (ptx/wgmma.cuh).
static thread_local Wgmma16Op g_wgmma16[kWgmmaMaxThreads][kWgmmaMaxPending];

FMO_SIM_EMU void wgmma16_retire(const WgmmaOp& op) { wgmma16_execute(*static_cast<const Wgmma16Op*>(op.ext), op.seq); }

// Queues one 16-bit op: its payload into the thread's next ring slot, then the shared queue's
// checks and push (op.a = 0 for RS: the warp-uniformity check then compares B, N and scale-d).
FMO_SIM_EMU void wgmma16_issue(const Wgmma16Op& op) {
  WgmmaThread& s = wgmma_thread();
  if (s.count == kWgmmaMaxPending)  // before the slot write: that slot still belongs to a pending op
    fmo_sim::fail("wgmma emulation: more than %d MMAs issued and not yet retired", kWgmmaMaxPending);
  Wgmma16Op& slot = g_wgmma16[fmo_sim::cur()->linear_tid][s.issued % kWgmmaMaxPending];
  slot = op;
  wgmma_issue_op(WgmmaOp{op.d, op.a, op.b, op.n, op.scale_d, &wgmma16_retire, &slot});
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
  sim_detail::Wgmma16Op op{};
  op.d = d, op.a = desc_a, op.b = desc_b, op.n = N, op.scale_d = scale_d, op.f16 = T == Wgmma16::f16;
  op.trans_a = TransA, op.trans_b = TransB;
  sim_detail::wgmma16_issue(op);
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
  sim_detail::Wgmma16Op op{};
  op.d = d, op.a = 0, op.b = desc_b, op.n = N, op.scale_d = scale_d, op.f16 = T == Wgmma16::f16;
  op.a_in_regs = 1, op.trans_b = TransB;
  sim_detail::gather_a_rows(a, op.a_rows);  // the whole warp, before any check can fail
  sim_detail::wgmma16_issue(op);
#else
  if constexpr (T == Wgmma16::bf16)
    WgmmaBf16Asm<N, 0, TransB>::rs(d, a, desc_b, scale_d);
  else
    WgmmaF16Asm<N, 0, TransB>::rs(d, a, desc_b, scale_d);
#endif
}

}  // namespace ptx
}  // namespace fmo
