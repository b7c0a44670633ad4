// FP8 (e4m3) fused attention forward on Hopper (sm_90a): hopper_fwd.cuh's machinery with QGMMA.
//
//   o[i, h] = sum_j softmax_j(scale dq dk q8[i, h] . k8[j, hk]) dv v8[j, hk]     (out bf16)
//   lse[h, i] as hopper_fwd.cuh (natural log of the dequantised, scaled scores)
// dq = descale_q[b, h]; dk / dv = descale_k / descale_v[b, hk] or, per block of 128 keys (one key
// tile), [b, hk, j] (fastmoe_ops/ops/attention_fp8.py). Dense batches only; causal bottom-right; GQA.
//
//   CTA  persistent over WorkTiles (hopper_fwd.cuh; never GQA-packed here)
//   warpgroup 0    warp 0, one elected lane: producer, TMA-loads Q (q_full / q_empty) and every
//                  key tile's K and V into the ring (full_k[s], full_v[s]; refills after empty[s])
//                  warps 1-3: transposers: wait full_v[s], write V[s]^T into Vt[s] (keys permuted,
//                  below), fence.proxy.async, arrive vt_full[s] (every thread) and empty[s] (one
//                  lane per warp: the warp's V[s] reads are done)
//   warpgroup 1+c  consumer c (rows 64 c .. 64 c + 63), per key tile:
//                    wait full_k[s]; S = Q K^T: D / 32 x wgmma m64nBNk32 SS e4m3 (both K-major)
//                    mask, online softmax (softmax.cuh) with scale * dq * dk_j folded into scale_log2
//                      (once per tile); P * kPScale * dv_j / dv_max rounded to e4m3 in registers (pack_p8)
//                    wait vt_full[s]; O += P Vt: BN / 32 x wgmma m64nDk32 RS e4m3 (A = P's registers)
//                    wait, arrive empty[s] (one lane per warp)
//                  with tile j's softmax overlapping tile j - 1's P V (consume_fp8 below)
//                  epilogue: o * dv_max / kPScale, then hopper_fwd.cuh's fwd_epilogue (o / l, lse).
//   smem  Q [BM][D], then STAGES x { K [BN][D], V [BN][D], Vt [D][BN] } e4m3, then the barriers.
//         Q, K, V rows are D bytes: one TMA box per tile with the D-byte swizzle (D 128: 128B,
//         D 64: 64B) = wgmma's K-major layout of that swizzle (SBO = 8 rows, k-step j at +32 j).
//         Vt rows are BN = 128 bytes (128B swizzle, SBO 1024), the K-major B of O += P V.
//         Bytes: BM D + STAGES (2 BN D + D BN) + 8 (4 STAGES + 2); D 128, BM 128, BN 128, 2 stages:
//         112 KB + barriers.
//
// Why V is transposed: 8-bit wgmma takes only K-major operands, and for O += P V the K dimension
// is the keys, so B must hold each output column d's keys contiguously: V^T. TMA lands V as
// stored ([keys][d]); the transposer warps rewrite it. V[s] is never refilled before the transpose
// read it: the refill waits for empty[s], whose consumer arrivals follow their P Vt MMAs on Vt[s],
// which waited for vt_full[s], i.e. for the transpose; the transposers arrive on empty[s] as well
// (4 NC consumer warps + 3 transposer warps), so the guard holds on its own, not only through that
// chain. Vt[s] is rewritten only after the next full_v[s], which follows that empty[s]: no separate
// vt_empty barrier is needed.
// The key permutation (FA3's trick to avoid a register shuffle). Within one k32 step (32 keys):
//   S's f32 accumulator: thread (g, t4) holds, for row g, key 8 n + 2 t4 + e (n8 block n = 0..3,
//     e = 0, 1) in register 4 n + e (row g + 8: 4 n + 2 + e): keys {2t4, 2t4+1, 8+2t4, 9+2t4,
//     16+2t4, 17+2t4, 24+2t4, 25+2t4}
//   P's e4m3 A fragment (ptx/wgmma_e4m3_rs.cuh): byte b of the thread is row g + 8 ((b / 4) % 2),
//     k = 4 t4 + b % 4 + 16 (b / 8): k {4t4..4t4+3, 16+4t4..16+4t4+3}
//   pack_p8 packs S's registers in their natural order: A register 0 (row g) = S blocks n = 0, 1
//     (e = 0, 1 each), register 2 = blocks 2, 3; 1 and 3 the same for row g + 8. So A's k holds
//     the probability of key  perm(k) = 16 (k / 16) + 8 ((k % 4) / 2) + 2 ((k % 16) / 4) + k % 2.
//   A * B sums over k, so B's row k must be V's key perm(k): Vt[d][32 kk + k] = V[32 kk + perm(k)][d].
//   (perm on 0..15: 0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15, then the same + 16.)
// BROKEN_PERMUTATION (tests only): Vt[d][k] = V[k][d], the mistake the tests must catch.
//
// Scales: P is multiplied by kPScale = 256 before rounding (P <= 1, so P * 256 <= 448, e4m3's max:
// small probabilities keep 3 mantissa bits down to 2^-14 instead of going subnormal at 2^-6); l
// sums the unrounded fp32 P, so o / l is off by P's rounding only (relative 2^-4 per term). Per-block
// V scales: tile j's P is also multiplied by dv_j / dv_max <= 1 (the sum over j of P_j dv_j V8_j is
// dv_max sum_j (P_j dv_j / dv_max) V8_j), so blocks with scales far below the largest lose P's
// precision into e4m3's subnormals; per-block K scales change only the tile's softmax scale (the
// running max is kept in the scaled log2 domain, so tiles with different scales combine exactly).
// The two consumer warpgroups ping-pong their MMA issues (hopper_fwd.cuh's Turns, named barriers 1, 2).
#pragma once

#include "csrc/attention/hopper_fwd.cuh"
#include "ptx/wgmma_e4m3_rs.cuh"

namespace fmo {

struct AttnFp8Params {
    AttnParams a;
    ptx::TmaDescriptor q_map;  // q8 as [B, Sq, Hq * D], box (D, BM, 1), D-byte swizzle
    ptx::TmaDescriptor k_map;  // k8 as [B, Sk, Hkv * D], box (D, BN, 1)
    ptx::TmaDescriptor v_map;  // v8 likewise
    const float* descale_q;    // [B, Hq]
    const float* descale_k;    // [B, Hkv, k_scale_blocks]: per (batch, head) when k_scale_blocks = 1,
    const float* descale_v;    // [B, Hkv, v_scale_blocks]  else per block of 128 keys (= key tile j)
    int32_t k_scale_blocks;
    int32_t v_scale_blocks;
};

namespace attn {

constexpr int kFp8ProducerRegs = 40;   // the transposer warps share the producer warpgroup's budget
constexpr int kFp8ConsumerRegs = 232;  // 128 x 40 + 256 x 232 = 64512 of 65536 (NC = 2)
constexpr int kTransposeWarps = 3;
constexpr float kPScale = 256.0f;

template <int NC_, int BN_, int D_, int STAGES_>
struct HopperFp8Shape {
    static constexpr int NC = NC_, BM = 64 * NC_, BN = BN_, D = D_, DQK = D_, DV = D_, STAGES = STAGES_;
    static constexpr int NT = BN / 8, DT = D / 8;
    static constexpr int kThreads = 128 * (1 + NC);
    static constexpr int kQBytes = BM * D, kKBytes = BN * D, kVBytes = BN * D, kVtBytes = D * BN;
    static constexpr int kStageBytes = kKBytes + kVBytes + kVtBytes;
    static constexpr int kBarrierOffset = kQBytes + STAGES * kStageBytes;
    static constexpr int kSmemBytes = kBarrierOffset + 8 * (4 * STAGES + 2);
    static constexpr ptx::Swizzle kRowSwizzle = D == 128 ? ptx::Swizzle::b128 : ptx::Swizzle::b64;
    static_assert(NC == 1 || NC == 2, "one or two consumer warpgroups");
    static_assert(D == 64 || D == 128, "D: one TMA box row of 64 or 128 bytes (the 64B / 128B swizzle)");
    static_assert(BN == 128, "BN: Vt rows are 128 bytes (one 128B-swizzled row of keys)");
    static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0 && kVtBytes % 1024 == 0, "1024-aligned tiles");
};

template <class Shape>
struct HopperFp8Smem {
    uint8_t* base;
    FMO_DEVICE uint8_t* q() const { return base; }
    FMO_DEVICE uint8_t* k(int s) const { return base + Shape::kQBytes + s * Shape::kStageBytes; }
    FMO_DEVICE uint8_t* v(int s) const { return k(s) + Shape::kKBytes; }
    FMO_DEVICE uint8_t* vt(int s) const { return v(s) + Shape::kVBytes; }
    FMO_DEVICE uint64_t* full_k(int s) const { return reinterpret_cast<uint64_t*>(base + Shape::kBarrierOffset) + s; }
    FMO_DEVICE uint64_t* full_v(int s) const { return full_k(Shape::STAGES) + s; }
    // vt_full[s]: the transposer threads (each arrives) wrote Vt[s] and fenced it to the async proxy.
    FMO_DEVICE uint64_t* vt_full(int s) const { return full_k(2 * Shape::STAGES) + s; }
    // empty[s]: every consumer warp's MMAs reading stage s retired and the transposers read V[s].
    FMO_DEVICE uint64_t* empty(int s) const { return full_k(3 * Shape::STAGES) + s; }
    FMO_DEVICE uint64_t* q_full() const { return full_k(4 * Shape::STAGES); }
    FMO_DEVICE uint64_t* q_empty() const { return full_k(4 * Shape::STAGES + 1); }

    FMO_DEVICE void init() const {
        for (int s = 0; s < Shape::STAGES; ++s) {
            ptx::mbarrier_init(full_k(s), 1);
            ptx::mbarrier_init(full_v(s), 1);
            ptx::mbarrier_init(vt_full(s), 32 * kTransposeWarps);  // every transposer thread, after its fence
            ptx::mbarrier_init(empty(s), 4 * Shape::NC + kTransposeWarps);
        }
        ptx::mbarrier_init(q_full(), 1);
        ptx::mbarrier_init(q_empty(), 4 * Shape::NC);
        ptx::fence_mbarrier_init();  // the inits, to the async proxy (TMA completes on them)
    }
};

// The key whose probability P's A fragment holds at k (0..31) of a k32 step (derivation above).
FMO_DEVICE constexpr int p_key_of_k(int k) { return 16 * (k / 16) + 8 * ((k % 4) / 2) + 2 * ((k % 16) / 4) + k % 2; }

// Byte offset of (row, byte) in a K-major tile of P-byte rows with the P-byte swizzle (ptx/wgmma.cuh),
// the tile 8 P-aligned.
template <int P>
FMO_DEVICE int swizzled(int row, int byte) {
    const int u = row * P + byte;
    return u ^ (((u >> 7) & (P / 16 - 1)) << 4);
}

// The producer lane, one work tile: Q, then its n_tiles key tiles' K and V.
template <class Shape>
FMO_DEVICE void produce_fp8(const AttnFp8Params& P, const HopperFp8Smem<Shape>& sm, int h, int hk, int m0, int b,
                            int n_tiles, PipelineState& ps, uint32_t q_phase) {
    ptx::mbarrier_wait_parity(sm.q_empty(), q_phase ^ 1);  // the previous tile's MMAs reading Q retired
    ptx::mbarrier_arrive_expect_tx(sm.q_full(), Shape::kQBytes);
    ptx::tma_load_3d(sm.q(), &P.q_map, sm.q_full(), h * Shape::D, m0, b);
    for (int j = 0; j < n_tiles; ++j, ps.advance(Shape::STAGES)) {
        ptx::mbarrier_wait_parity(sm.empty(ps.stage), ps.phase ^ 1);  // MMAs and the transpose done with s
        ptx::mbarrier_arrive_expect_tx(sm.full_k(ps.stage), Shape::kKBytes);
        ptx::tma_load_3d(sm.k(ps.stage), &P.k_map, sm.full_k(ps.stage), hk * Shape::D, j * Shape::BN, b);
        ptx::mbarrier_arrive_expect_tx(sm.full_v(ps.stage), Shape::kVBytes);
        ptx::tma_load_3d(sm.v(ps.stage), &P.v_map, sm.full_v(ps.stage), hk * Shape::D, j * Shape::BN, b);
    }
}

// The transposer warps (96 threads), one work tile: Vt[s][d][32 kk + k] = V[s][32 kk + perm(k)][d].
// A unit is a 4 x 4 byte block: 4 keys (one 32-bit store of Vt per d) x 4 d (one 32-bit load of V
// per key), transposed in registers by byte permutes: 4 loads and 4 stores move 16 bytes.
template <class Shape, bool BROKEN_PERMUTATION>
FMO_DEVICE void transpose_fp8(const HopperFp8Smem<Shape>& sm, int n_tiles, PipelineState& ps) {
    const int t = int(threadIdx.x) - 32;  // 0 .. 95
    constexpr int kKeyGroups = Shape::BN / 4, kUnits = (Shape::D / 4) * kKeyGroups;
    for (int j = 0; j < n_tiles; ++j, ps.advance(Shape::STAGES)) {
        ptx::mbarrier_wait_parity(sm.full_v(ps.stage), ps.phase);  // V[s] landed (so Vt[s]'s last readers retired)
        const uint8_t* v = sm.v(ps.stage);
        uint8_t* vt = sm.vt(ps.stage);
        for (int u = t; u < kUnits; u += 32 * kTransposeWarps) {
            const int d = 4 * (u / kKeyGroups), kp = 4 * (u % kKeyGroups);  // consecutive threads: consecutive keys
            uint32_t w[4];  // w[i]: bytes d .. d + 3 of the key at Vt position kp + i
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int k = kp + i;
                const int key = BROKEN_PERMUTATION ? k : 32 * (k / 32) + p_key_of_k(k % 32);
                w[i] = *reinterpret_cast<const uint32_t*>(v + swizzled<Shape::D>(key, d));
            }
            const uint32_t lo01 = __byte_perm(w[0], w[1], 0x5140), hi01 = __byte_perm(w[0], w[1], 0x7362);
            const uint32_t lo23 = __byte_perm(w[2], w[3], 0x5140), hi23 = __byte_perm(w[2], w[3], 0x7362);
            // byte c of w[i] -> byte i of row d + c
            *reinterpret_cast<uint32_t*>(vt + swizzled<Shape::BN>(d + 0, kp)) = __byte_perm(lo01, lo23, 0x5410);
            *reinterpret_cast<uint32_t*>(vt + swizzled<Shape::BN>(d + 1, kp)) = __byte_perm(lo01, lo23, 0x7632);
            *reinterpret_cast<uint32_t*>(vt + swizzled<Shape::BN>(d + 2, kp)) = __byte_perm(hi01, hi23, 0x5410);
            *reinterpret_cast<uint32_t*>(vt + swizzled<Shape::BN>(d + 3, kp)) = __byte_perm(hi01, hi23, 0x7632);
        }
        ptx::fence_proxy_async();  // this thread's Vt[s] stores, to the async proxy (wgmma reads Vt[s])
        ptx::mbarrier_arrive(sm.vt_full(ps.stage));  // each writer releases its own stores
        arrive_per_warp(sm.empty(ps.stage));         // this warp's reads of V[s] are done
    }
}

// P (fp32 probabilities in S's registers) * factor as e4m3 A fragments, in S's register order.
template <class Shape>
FMO_DEVICE void pack_p8(uint32_t (&pa)[Shape::BN / 32][4], const float (&sc)[Shape::NT][4], float factor) {
    auto e4m3 = [factor](float x) { return uint32_t(__nv_cvt_float_to_fp8(x * factor, __NV_SATFINITE, __NV_E4M3)); };
#pragma unroll
    for (int kk = 0; kk < Shape::BN / 32; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // r: (n8 pair r / 2, row half r % 2)
            const float(&lo)[4] = sc[4 * kk + 2 * (r / 2)];
            const float(&hi)[4] = sc[4 * kk + 2 * (r / 2) + 1];
            const int e = 2 * (r % 2);
            pa[kk][r] = e4m3(lo[e]) | e4m3(lo[e + 1]) << 8 | e4m3(hi[e]) << 16 | e4m3(hi[e + 1]) << 24;
        }
}

template <class Shape>
FMO_DEVICE void issue_qk_fp8(float (&s)[Shape::BN / 2], const uint8_t* q, const uint8_t* k, int wg) {
#pragma unroll
    for (int ks = 0; ks < Shape::D / 32; ++ks) {  // k-step ks: +32 ks bytes in the D-byte rows; SBO = 8 rows
        const uint64_t da = ptx::make_smem_desc(q + wg * 64 * Shape::D + 32 * ks, 16, 8 * Shape::D, Shape::kRowSwizzle);
        const uint64_t db = ptx::make_smem_desc(k + 32 * ks, 16, 8 * Shape::D, Shape::kRowSwizzle);
        ptx::wgmma_m64nNk32_e4m3<Shape::BN>(s, da, db, ks > 0 ? 1 : 0);
    }
    ptx::wgmma_commit();
}

template <class Shape>
FMO_DEVICE void issue_pv_fp8(float (&o)[Shape::D / 2], const uint32_t (&pa)[Shape::BN / 32][4], const uint8_t* vt) {
#pragma unroll
    for (int kk = 0; kk < Shape::BN / 32; ++kk) {  // Vt [D][BN]: keys 32 kk.. at +32 kk bytes; SBO = 8 rows of 128
        const uint64_t db = ptx::make_smem_desc(vt + 32 * kk, 16, 1024, ptx::Swizzle::b128);
        ptx::wgmma_m64nNk32_e4m3_rs<Shape::D>(o, pa[kk], db, 1);
    }
    ptx::wgmma_commit();
}

// One consumer warpgroup, one work tile (query head h of batch b, rows m0..m0 + BM - 1).
template <class Shape, bool CAUSAL>
FMO_DEVICE void consume_fp8(const AttnFp8Params& P, const HopperFp8Smem<Shape>& sm, const SeqView& s, int h, int hk,
                            int b, int m0, int n_tiles, PipelineState& ps, uint32_t q_phase) {
    const AttnParams& p = P.a;
    const int wg = int(threadIdx.x) / 128 - 1, warp = (int(threadIdx.x) / 32) % 4;
    const int row0 = m0 + wg * 64 + warp * 16;
    int qi[2];
    consecutive_rows(qi, row0);
    // descale_q and the softmax scale, times the tile's descale_k below; descale_v's largest block
    static_assert(Shape::BN == 128, "a key tile is one 128-key scale block (fastmoe_ops/ops/attention_fp8.py)");
    const float base_log2 = p.scale_log2 * P.descale_q[b * p.heads_q + h];
    const float* dk = P.descale_k + (int64_t(b) * p.heads_kv + hk) * P.k_scale_blocks;
    const float* dv = P.descale_v + (int64_t(b) * p.heads_kv + hk) * P.v_scale_blocks;
    float dv_max = 0.0f;
    for (int i = 0; i < P.v_scale_blocks; ++i) dv_max = fmaxf(dv_max, dv[i]);
    float o[Shape::DT][4];
    zero(o);
    float(&of)[Shape::D / 2] = reinterpret_cast<float(&)[Shape::D / 2]>(o);
    float sc[Shape::NT][4];
    float(&sf)[Shape::BN / 2] = reinterpret_cast<float(&)[Shape::BN / 2]>(sc);
    uint32_t pa[Shape::BN / 32][4];
    OnlineSoftmax softmax;
    // Tile j's scores -> probabilities (masking only tiles crossing the diagonal or the keys' end)
    // with its K block's scale; alpha: what o must be multiplied by.
    auto softmax_tile = [&](int j, float (&alpha)[2]) {
        const int n0 = j * Shape::BN;
        if (n0 + Shape::BN > s.sk || (CAUSAL && n0 + Shape::BN - 1 > row0 + s.sk - s.sq))
            mask_rows(sc, CAUSAL, qi, n0, s.sq, s.sk);
        softmax.scores(sc, base_log2 * dk[P.k_scale_blocks > 1 ? j : 0], alpha);
    };
    auto p_factor = [&](int j) { return kPScale * (dv[P.v_scale_blocks > 1 ? j : 0] / dv_max); };
    ptx::mbarrier_wait_parity(sm.q_full(), q_phase);
    // Tile j's softmax overlaps tile j - 1's P V (as hopper_fwd.cuh's consume()):
    //   j = 0    S = Q K_0, wait; softmax -> P_0 (e4m3 registers)
    //   j = 1..  wait full_k[j], vt_full[j - 1]; S = Q K_j (group 1), O += P_{j-1} Vt_{j-1} (group 2)
    //            wait_group 1: S retired; mask, softmax -> alpha_j, P (fp32, in S's registers)
    //            wait_group 0: O retired; release stage j - 1; O *= alpha_j; pack P_j
    //   end      O += P_last Vt_last, wait; release the last stage
    // P_{j-1}'s registers (pa) stay untouched until the wait that retires the MMAs reading them.
    // The two consumer warpgroups take turns issuing (hopper_fwd.cuh's Turns: one's softmax under the
    // other's GEMMs); both issue n_tiles + 1 times.
    const Turns<Shape::NC> turns{wg};
    turns.open(n_tiles);
    PipelineState prev;
    if (n_tiles > 0) {
        float alpha[2];  // o is 0: nothing to rescale
        ptx::mbarrier_wait_parity(sm.full_k(ps.stage), ps.phase);  // K of tile 0 landed
        turns.wait();
        ptx::wgmma_fence();
        issue_qk_fp8<Shape>(sf, sm.q(), sm.k(ps.stage), wg);
        turns.pass(false);
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operands(sf);
        if (n_tiles == 1) arrive_per_warp(sm.q_empty());  // the tile's only MMA reading Q retired
        softmax_tile(0, alpha);
        pack_p8<Shape>(pa, sc, p_factor(0));
    }
    for (int j = 1; j < n_tiles; ++j) {
        prev = ps;
        ps.advance(Shape::STAGES);
        ptx::mbarrier_wait_parity(sm.full_k(ps.stage), ps.phase);       // K of tile j landed
        ptx::mbarrier_wait_parity(sm.vt_full(prev.stage), prev.phase);  // Vt of tile j - 1 written and fenced
        ptx::wgmma_fence_operands(of);
        turns.wait();
        ptx::wgmma_fence();  // o's rescaling, P's packing and s's reads (register accesses) before the MMAs
        issue_qk_fp8<Shape>(sf, sm.q(), sm.k(ps.stage), wg);
        issue_pv_fp8<Shape>(of, pa, sm.vt(prev.stage));
        turns.pass(false);
        ptx::wgmma_wait<1>();  // S = Q K_j retired; P_{j-1} Vt_{j-1} may still run
        ptx::wgmma_fence_operands(sf);
        if (j == n_tiles - 1) arrive_per_warp(sm.q_empty());  // the tile's last MMA reading Q retired
        float alpha[2];
        softmax_tile(j, alpha);
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operands(of);
        arrive_per_warp(sm.empty(prev.stage));  // this warp's MMAs reading stage j - 1 retired
        OnlineSoftmax::rescale(o, alpha);
        pack_p8<Shape>(pa, sc, p_factor(j));
    }
    if (n_tiles > 0) {
        ptx::mbarrier_wait_parity(sm.vt_full(ps.stage), ps.phase);  // Vt of the last tile
        ptx::wgmma_fence_operands(of);
        turns.wait();
        ptx::wgmma_fence();
        issue_pv_fp8<Shape>(of, pa, sm.vt(ps.stage));
        turns.pass(true);
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operands(of);
        arrive_per_warp(sm.empty(ps.stage));
        ps.advance(Shape::STAGES);  // the next work tile's first stage
    }
    if (n_tiles == 0) arrive_per_warp(sm.q_empty());  // no MMA read Q (it landed)
    const float o_scale = dv_max / kPScale;  // descale_v (its largest block), and P's 256 back out
#pragma unroll
    for (int di = 0; di < Shape::DT; ++di)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[di][e] *= o_scale;
    // fwd_epilogue's lse is m + log2(l) in the log2 domain of scale_log2: the dequantised scores'
    const int hd[2] = {h, h};
    fwd_epilogue<__nv_bfloat16, Shape>(p, s, qi, hd, o, softmax);
}

template <int NC, int BN, int D, int STAGES, bool CAUSAL, bool BROKEN_PERMUTATION = false>
FMO_DEVICE void attn_fwd_hopper_fp8(const AttnFp8Params& P) {
    using Shape = HopperFp8Shape<NC, BN, D, STAGES>;
    const AttnParams& p = P.a;
    const WorkTiles<Shape::BM, CAUSAL, false> tiles(p);
    const HopperFp8Smem<Shape> sm{fmo_attn_smem};
    if (threadIdx.x == 0) sm.init();
    __syncthreads();  // barriers initialised before any role uses them (the last CTA-wide barrier)

    PipelineState ps;
    uint32_t q_phase = 0;
    auto walk = [&](auto&& role) {  // every role: the same tiles, the same key-tile counts
        for (int t = int(blockIdx.x); t < tiles.count(); t += int(gridDim.x)) {
            int mb, h, b;
            tiles.at(t, mb, h, b);
            const SeqView s = sequence(p, b);
            const TileRows<Shape::BM, false> rows = tiles.rows(mb, h);
            if (rows.pos0 >= s.sq) continue;
            role(s, h, tiles.kv_head(h), b, rows.pos0, key_tiles<Shape, CAUSAL>(s, rows));
        }
    };
    if (threadIdx.x < 128) {  // producer warpgroup: warp 0 loads, warps 1-3 transpose V
        ptx::setmaxnreg_dec<kFp8ProducerRegs>();
        if (threadIdx.x >= 32) {
            walk([&](const SeqView&, int, int, int, int, int n_tiles) {
                transpose_fp8<Shape, BROKEN_PERMUTATION>(sm, n_tiles, ps);
            });
            return;
        }
        if (!ptx::elect_one_sync()) return;
        ptx::tma_prefetch_descriptor(&P.q_map);
        ptx::tma_prefetch_descriptor(&P.k_map);
        ptx::tma_prefetch_descriptor(&P.v_map);
        walk([&](const SeqView&, int h, int hk, int b, int m0, int n_tiles) {
            produce_fp8<Shape>(P, sm, h, hk, m0, b, n_tiles, ps, q_phase);
            q_phase ^= 1;
        });
        return;
    }
    ptx::setmaxnreg_inc<kFp8ConsumerRegs>();
    walk([&](const SeqView& s, int h, int hk, int b, int m0, int n_tiles) {
        consume_fp8<Shape, CAUSAL>(P, sm, s, h, hk, b, m0, n_tiles, ps, q_phase);
        q_phase ^= 1;
    });
}

}  // namespace attn
}  // namespace fmo
