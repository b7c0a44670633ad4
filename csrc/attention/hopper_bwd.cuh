// Fused attention backward on Hopper (sm_90a): TMA + mbarrier ring, a producer warp and NWG = 2
// consumer warpgroups of wgmma (1 where the launcher's consumer_warpgroups says two do not fit).
// Same math, Params fields and lse/delta contract as the mma.sync backward (bwd.cuh, whose header
// gives the formulas; delta comes from its attn_bwd_delta pre-pass); what differs is that dQ is
// not a separate pass: each consumer warpgroup adds its share of dQ into an fp32 buffer with
// red.global.add (non-deterministic summation order), and the launcher converts that buffer to
// the output dtype.
//
//   CTA  one per (key tile of BN = 64 NWG keys, KV head, sequence); it walks the query tiles
//        (BM = 64 rows) of the G = Hq / Hkv query heads sharing its KV head (causal: from the
//        first tile that sees one of its keys), so dK / dV of GQA are summed in registers. Both
//        warpgroups read each query tile's one Q / dO stage: per key, half the loads of BN 64, and
//        half the CTAs adding into a dQ row.
//   warpgroup 0  producer (setmaxnreg.dec 24): warp 0's elected lane TMA-loads K and V [BN rows]
//                once (kv_full), then per query tile Q and dO into the ring (full[s]; after
//                empty[s], which counts the 4 warps of every consumer warpgroup); warps 1-3 exit.
//   warpgroup 1 + wg  consumer wg (setmaxnreg.inc 240) owns keys nw = n0 + 64 wg .. nw + 63, its
//                warp w keys nw + 16 w .. + 15; its own dS^T, lse / delta, dK panels and named
//                barrier (kDsBarrier + wg), so the two never wait on each other (but for the ring and,
//                deterministic, the dQ turn). Keys all past sk (ragged): it runs every tile as the
//                other does (its P = 0: adds zeros into dQ, arrives on empty[s], takes its turn) and
//                stores nothing. Per query tile:
//                  wait full[s]
//                  S^T = K Q^T, dP^T = V dO^T: wgmma SS (all operands K-major), one group, waited
//                  P^T = exp2(S^T scale log2e - lse log2e) (masked: ragged keys, rows past sq,
//                    causal bottom-right), dS^T = P^T (dP^T - delta)   (lse / delta per column)
//                  dS^T to shared memory (T, 128-byte swizzle, the layout of a TMA box), then
//                  dV += P^T dO: wgmma RS, P^T straight from the S^T accumulator registers (the
//                    RS A fragment is the accumulator map, as in the forward's P V), dO read
//                    MN-major as TMA stored it
//                  dK += dS^T Q: wgmma SS, A = the staged dS^T (K-major), Q read MN-major
//                    (columns past DK_REG, MLA's 128..191: a panel MMA, added to shared memory)
//                  per 64-column panel of DQK: dQ = dS K, wgmma SS with A = dS read MN-major out
//                    of the staged dS^T and B = K read MN-major; retired, its fp32 values (times
//                    the softmax scale) red.global.add-ed into dq_accum
//                  arrive empty[s] (every MMA reading Q and dO retired)
//                then dK (times the scale) and dV stored as T.
//   smem  K [BN][DQK], V [BN][DV], STAGES x { Q [BM][DQK], dO [BM][DV] }, then per consumer
//         warpgroup: dS^T [64][BM], dK's fp32 panels past DK_REG [(DQK - DK_REG) / 64][32][128
//         threads], lse / delta [BM]; barriers. STAGES 2: NWG 2 D 64 82984 B, D 128 148520 B; MLA
//         (192, 128) NWG 1: 24 + 16 + 2 x 40 + 8 + 16 + 0.5 KiB + 40 B = 148008 B (NWG 2: 214056 B).
//         Tiles of D columns are D / 64 panels [rows][64] of 128-byte swizzled rows
//         (hopper_fwd.cuh's layout: K-major B128 along D, MN-major B128 along the rows).
//
// Register budget (fp32 values per consumer thread; a 64-row wgmma accumulator of N columns is
// N / 2 per thread): dK DQK / 2 + dV DV / 2 + S^T 32 + dP^T 32 live together while S^T and dP^T
// are computed and turned into P^T / dS^T, plus ~20 for addresses, indices and the ring state.
// D 128: 64 + 64 + 64 = 192 (ptxas, one warpgroup: 251-254 of 255, 0 spills). MLA (192, 128)
// so: 96 + 64 + 64 = 224, which spilled (254 registers, 8-16 spill stores). Options: (a) more
// consumer warpgroups cannot split the 64 key rows (a wgmma's M is 64 rows: each warpgroup still
// holds its own dK 64 x 192), only dK's columns, with S^T / dP^T computed twice or passed through shared memory;
// (b) BN 32 per warpgroup: no M-32 wgmma, half of every accumulator idle; (c) dK in panels:
// columns 0..DK_REG-1 (128) in registers, the rest (64) as fp32 in shared memory, each tile's
// panel MMA into the dQ panel's 32 registers (free then) and added by each thread into its own
// 32 slots (thread-private: no barrier), 16 KiB. Taken: (c), the peak is D 128's 192 again
// (254 registers, 0 spills); it costs one more 64-column MMA (K 64, waited at once) and 32
// shared-memory read-adds per thread per query tile.
// Two consumer warpgroups: a warpgroup cannot split its 64 key rows (option (a) above), so the
// second one takes 64 more keys with its own accumulators; 384 threads launch with 168 registers
// each, then setmaxnreg moves the producer warpgroup to 24 and the consumers to 240 (128 x 24 +
// 256 x 240 = 64512 of 65536). D 64 / 128: the 192-value peak fits (ptxas: 168 registers at
// launch, 0 spills). MLA (192, 128) stays on one warpgroup (NWG 1, 256 threads, no setmaxnreg: 255
// registers at launch): its smem fits two (214056 B of 227 KiB) but at 240 registers its causal
// deterministic variants spilled 8 bytes (the other MLA variants: 0); the launcher's
// consumer_warpgroups chooses. NWG 2 is correct for MLA in the simulator all the same.
// Not yet (issue 16): overlap of the dQ atomics with the next tile's MMAs, TMA for
// lse / delta (their rows are not 16-byte aligned for every Sq: the consumer reads them from
// global memory), persistent CTAs; MLA: the dK panel's MMA and read-adds overlapped with the dQ
// panels' (now waited one after another), and a GPU timing.
// DETERMINISTIC: the dQ adds of the key tiles go in key-tile order (DqTurn), so dq is the same
// bit for bit from run to run; the tiles then wait on one another.
#pragma once

#include "csrc/attention/bwd.cuh"
#include "csrc/attention/hopper_fwd.cuh"
#include "ptx/ld_st.cuh"

namespace fmo {

struct AttnHopperBwdParams {
    AttnParams a;               // o, lse, dout, delta, dk, dv used; dq unused (dq_accum instead)
    float* dq_accum;            // [rows_q, Hq, DQK] fp32, zeroed by the launcher: sum of scale dS K
    int32_t* dq_semaphore;      // deterministic: [batch, Hq, ceil(max_sq / BM)], zeroed: key tiles done
    ptx::TmaDescriptor q_map;   // q as [B | 1, S | total, Hq * DQK], box (64, BM, 1), 128B swizzle
    ptx::TmaDescriptor k_map;   // k as [.., Hkv * DQK], box (64, BN, 1)
    ptx::TmaDescriptor v_map;   // v as [.., Hkv * DV], box (64, BN, 1)
    ptx::TmaDescriptor do_map;  // dout as [.., Hq * DV], box (64, BM, 1)
};

namespace attn {

// Consumer warpgroups of two (setmaxnreg): the producer's warpgroup gives its registers to them.
constexpr int kBwdProducerRegs = 24;
constexpr int kBwdConsumerRegs = 240;  // 128 x 24 + 256 x 240 = 64512 of 65536 (NWG = 2)

template <int DQK_, int DV_, int STAGES_, int NWG_ = 1>
struct HopperBwdShape {
    // NWG consumer warpgroups, each owning WN = 64 of the CTA's BN keys (a wgmma's M)
    static constexpr int BM = 64, WN = 64, NWG = NWG_, BN = WN * NWG, DQK = DQK_, DV = DV_, STAGES = STAGES_;
    static constexpr int MT = BM / 8;  // n8 column blocks of S^T (query columns)
    static constexpr int kThreads = 128 * (1 + NWG);
    static constexpr int kKBytes = BN * DQK * 2, kVBytes = BN * DV * 2;
    static constexpr int kQBytes = BM * DQK * 2, kDoBytes = BM * DV * 2, kStageBytes = kQBytes + kDoBytes;
    // dK columns in registers (the budget above: at most 128), the rest as fp32 panels in shared memory
    static constexpr int DK_REG = DQK < 128 ? DQK : 128, DK_SMEM_PANELS = (DQK - DK_REG) / kPanel;
    // per consumer warpgroup: dS^T [WN][BM] T, dK's panels past DK_REG, lse log2 [BM] + delta [BM] fp32
    static constexpr int kDsBytes = WN * BM * 2, kDkBytes = DK_SMEM_PANELS * WN * kPanel * 4, kRowsBytes = 2 * BM * 4;
    static constexpr int kDsOffset = kKBytes + kVBytes + STAGES * kStageBytes;
    static constexpr int kDkOffset = kDsOffset + NWG * kDsBytes;  // DK_SMEM_PANELS x [kPanel / 2][128 threads] fp32
    static constexpr int kRowsOffset = kDkOffset + NWG * kDkBytes;
    static constexpr int kBarrierOffset = kRowsOffset + NWG * kRowsBytes;
    static constexpr int kSmemBytes = kBarrierOffset + 8 * (1 + 2 * STAGES);
    static_assert(BM == kPanel, "dS^T rows are one 128-byte swizzled panel: BM = 64 query columns");
    static_assert(DQK % kPanel == 0 && DV % kPanel == 0, "whole 64-column panels");
    static_assert(DQK == 64 || DQK == 128 || DQK == 192, "DQK: 64, 128 or 192 (MLA; the register budget above)");
    static_assert(DV == 64 || DV == 128, "DV: 64 or 128 (the register budget above)");
    static_assert(NWG == 1 || NWG == 2, "one or two consumer warpgroups");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory: 227 KiB per CTA at most");
};

template <class Shape>
struct HopperBwdSmem {
    uint8_t* base;
    FMO_DEVICE uint8_t* k() const { return base; }
    FMO_DEVICE uint8_t* v() const { return base + Shape::kKBytes; }
    FMO_DEVICE uint8_t* q(int s) const { return base + Shape::kKBytes + Shape::kVBytes + s * Shape::kStageBytes; }
    FMO_DEVICE uint8_t* dout(int s) const { return q(s) + Shape::kQBytes; }
    // consumer warpgroup wg's own buffers
    FMO_DEVICE uint8_t* ds(int wg) const { return base + Shape::kDsOffset + wg * Shape::kDsBytes; }
    // dK panel DK_REG / 64 + pe: consumer thread i's 32 accumulator values at [pe][j][i] (thread-private)
    FMO_DEVICE float* dk_panels(int wg) const {
        return reinterpret_cast<float*>(base + Shape::kDkOffset + wg * Shape::kDkBytes);
    }
    FMO_DEVICE float* lse2(int wg) const {
        return reinterpret_cast<float*>(base + Shape::kRowsOffset + wg * Shape::kRowsBytes);
    }
    FMO_DEVICE float* delta(int wg) const { return lse2(wg) + Shape::BM; }
    // kv_full: K and V landed (once per CTA). full[s]: stage s's Q and dO landed. empty[s]: every
    // consumer warp's MMAs reading stage s retired.
    FMO_DEVICE uint64_t* kv_full() const { return reinterpret_cast<uint64_t*>(base + Shape::kBarrierOffset); }
    FMO_DEVICE uint64_t* full(int s) const { return kv_full() + 1 + s; }
    FMO_DEVICE uint64_t* empty(int s) const { return kv_full() + 1 + Shape::STAGES + s; }

    FMO_DEVICE void init() const {  // one thread, before the roles split
        ptx::mbarrier_init(kv_full(), 1);  // the producer's arrive.expect_tx
        for (int s = 0; s < Shape::STAGES; ++s) {
            ptx::mbarrier_init(full(s), 1);
            ptx::mbarrier_init(empty(s), 4 * Shape::NWG);  // one lane per consumer warp, both warpgroups
        }
        ptx::fence_mbarrier_init();  // the inits, to the async proxy (TMA completes on them)
    }
};

// The query tiles a key tile's CTA walks: for each of the G query heads of its KV head, the tiles
// from the first one that sees a key of [n0, n0 + BN) (bottom-right causal: query i sees key j iff
// j <= i + sk - sq) to the last. Iteration it: head hk G + it / per_head, tile m_first + it % per_head.
struct QueryTiles {
    int group, m_first, per_head;
    FMO_DEVICE QueryTiles(const AttnParams& p, const SeqView& s, int n0, int bm, bool causal) {
        group = int(p.heads_q / p.heads_kv);
        const int first_q = causal && n0 - (s.sk - s.sq) > 0 ? n0 - (s.sk - s.sq) : 0;
        m_first = first_q / bm;
        const int m_tiles = (s.sq + bm - 1) / bm;
        per_head = m_tiles > m_first ? m_tiles - m_first : 0;
    }
    FMO_DEVICE int count() const { return group * per_head; }
    FMO_DEVICE int head(int it, int hk) const { return hk * group + it / per_head; }
    FMO_DEVICE int m0(int it, int bm) const { return (m_first + it % per_head) * bm; }
};

template <class Shape>
FMO_DEVICE void produce_bwd(const AttnHopperBwdParams& P, const HopperBwdSmem<Shape>& sm, const SeqView& s,
                            const QueryTiles& qt, int hk, int n0, int64_t b) {
    const AttnParams& p = P.a;
    const MapRows kr = map_rows(p, s, b, 0);
    ptx::mbarrier_arrive_expect_tx(sm.kv_full(), Shape::kKBytes + Shape::kVBytes);  // whole boxes
    tma_load_panels<Shape::DQK, Shape::BN>(sm.k(), &P.k_map, sm.kv_full(), hk, kr.k_row + n0, kr.batch);
    tma_load_panels<Shape::DV, Shape::BN>(sm.v(), &P.v_map, sm.kv_full(), hk, kr.k_row + n0, kr.batch);
    PipelineState ps;
    for (int it = 0; it < qt.count(); ++it, ps.advance(Shape::STAGES)) {
        ptx::mbarrier_wait_parity(sm.empty(ps.stage), ps.phase ^ 1);  // the stage's last MMAs retired
        const MapRows r = map_rows(p, s, b, qt.m0(it, Shape::BM));
        const int h = qt.head(it, hk);
        ptx::mbarrier_arrive_expect_tx(sm.full(ps.stage), Shape::kStageBytes);
        tma_load_panels<Shape::DQK, Shape::BM>(sm.q(ps.stage), &P.q_map, sm.full(ps.stage), h, r.q_row, r.batch);
        tma_load_panels<Shape::DV, Shape::BM>(sm.dout(ps.stage), &P.do_map, sm.full(ps.stage), h, r.q_row, r.batch);
    }
}

// acc[64 keys, BM] = A[keys][D] B[BM][D]^T over D: both operands K-major panels (S^T = K Q^T,
// dP^T = V dO^T), issued without commit.
template <typename T, class Shape, int D>
FMO_DEVICE void issue_nt(float (&acc)[Shape::BM / 2], const uint8_t* a, const uint8_t* b) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const int pc = ks / 4, off = 32 * (ks % 4);  // panel, byte offset of the k-step in the 128-byte row
        const uint64_t da = ptx::make_smem_desc(a + pc * Shape::BN * 128 + off, 16, 1024, ptx::Swizzle::b128);
        const uint64_t db = ptx::make_smem_desc(b + pc * Shape::BM * 128 + off, 16, 1024, ptx::Swizzle::b128);
        ptx::wgmma_m64nNk16_ss<Shape::BM, WgmmaType<T>::value>(acc, da, db, ks > 0 ? 1 : 0);
    }
}

// acc[64 keys, N] += A^T-fragments[64 keys, BM] . B[BM][N]: A from registers (P^T or dS^T), B
// (dO or Q) read MN-major as stored (the forward's issue_pv with queries in the keys' place).
template <typename T, class Shape, int N>
FMO_DEVICE void issue_tn(float (&acc)[N / 2], const uint32_t (&a)[Shape::BM / 16][4], const uint8_t* b) {
#pragma unroll
    for (int kk = 0; kk < Shape::BM / 16; ++kk) {
        const uint64_t db = ptx::make_smem_desc(b + kk * 16 * 128, Shape::BM * 128, 1024, ptx::Swizzle::b128);
        ptx::wgmma_m64nNk16_rs<N, WgmmaType<T>::value, 1>(acc, a[kk], db, 1);
    }
}

// dK[64 keys, N] += dS^T[keys, BM] Q[BM, N]: A = the staged dS^T, K-major (queries along its
// 128-byte rows); B = Q read MN-major (issue_tn's B). Staged, dS^T's registers are free before
// the MMAs run (as an RS operand they would stay live until the wait: D 128 spilled).
// N columns of dK from Q's panel pc0 on; accumulate: add to acc (else the first k-step overwrites it).
template <typename T, class Shape, int N>
FMO_DEVICE void issue_ds_q(float (&acc)[N / 2], const uint8_t* ds, const uint8_t* q, int pc0, bool accumulate) {
#pragma unroll
    for (int kk = 0; kk < Shape::BM / 16; ++kk) {
        const uint64_t da = ptx::make_smem_desc(ds + 32 * kk, 16, 1024, ptx::Swizzle::b128);
        const uint64_t db =
            ptx::make_smem_desc(q + pc0 * Shape::BM * 128 + kk * 16 * 128, Shape::BM * 128, 1024, ptx::Swizzle::b128);
        ptx::wgmma_m64nNk16_ss<N, WgmmaType<T>::value, 0, 1>(acc, da, db, accumulate || kk > 0 ? 1 : 0);
    }
}

// dS^T [64 keys][BM] into shared memory as T, the 128-byte swizzle of a TMA box: key row r at
// 128 r, 16-byte chunk c at (c ^ r % 8) 16 (the forward's V layout, so dS reads MN-major like V).
template <typename T, class Shape>
FMO_DEVICE void stage_ds(uint8_t* ds, const uint32_t (&da)[Shape::BM / 16][4]) {
    const int warp = (int(threadIdx.x) / 32) % 4, g = int(threadIdx.x) % 32 / 4, t = int(threadIdx.x) % 4;
#pragma unroll
    for (int kk = 0; kk < Shape::BM / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // RS fragment register r: row g + 8 (r % 2), columns 16 kk + 8 (r / 2) + 2t..
            const int key = 16 * warp + g + 8 * (r % 2), chunk = 2 * kk + r / 2;
            *reinterpret_cast<uint32_t*>(ds + key * 128 + ((chunk ^ (key % 8)) * 16) + 4 * t) = da[kk][r];
        }
}

// One 64-column panel of dQ[BM, 64] = dS[BM, 64 keys] K[keys, 64 cols]: A = dS read MN-major out
// of dS^T (query m contiguous, keys 16 kk.. at +16 kk rows), B = K's panel pc read MN-major (k: the
// warpgroup's first key row inside K's panels of BN rows).
template <typename T, class Shape>
FMO_DEVICE void issue_dq(float (&acc)[kPanel / 2], const uint8_t* ds, const uint8_t* k, int pc) {
#pragma unroll
    for (int kk = 0; kk < Shape::WN / 16; ++kk) {
        const uint64_t da = ptx::make_smem_desc(ds + kk * 16 * 128, Shape::WN * 128, 1024, ptx::Swizzle::b128);
        const uint64_t db =
            ptx::make_smem_desc(k + pc * Shape::BN * 128 + kk * 16 * 128, Shape::BN * 128, 1024, ptx::Swizzle::b128);
        ptx::wgmma_m64nNk16_ss<kPanel, WgmmaType<T>::value, 1, 1>(acc, da, db, kk > 0 ? 1 : 0);
    }
}

constexpr unsigned kDsBarrier = 1;  // + wg: consumer warpgroup wg's 128 threads around its own shared buffers

// The tile's lse (log2 domain) and delta into shared memory, one consumer thread per value (lanes
// 0..63 lse, 64..127 delta). Columns past sq: lse +inf (their scores are masked to -inf too), so
// P = 0 and dS = 0 there. Read from global, not by TMA: a row of lse is Sq floats, not 16-byte
// aligned for every Sq. Staged rather than loaded per column in registers: 32 values per thread,
// which ptxas hoisted and D 128 spilled. No thread still reads the previous tile's values: every
// thread read them before the previous tile's first dS^T barrier, which this thread passed.
template <class Shape>
FMO_DEVICE void load_rows(const AttnParams& p, const HopperBwdSmem<Shape>& sm, const SeqView& s, int wg, int h,
                          int m0) {
    const int i = int(threadIdx.x) % 128, col = i % Shape::BM;
    const bool valid = m0 + col < s.sq;
    const int64_t idx = s.lse_base + int64_t(h) * p.lse_head_stride + m0 + col;
    if (i < Shape::BM)
        sm.lse2(wg)[col] = valid ? lse_log2_for_backward(p.lse[idx]) : -neg_inf();
    else
        sm.delta(wg)[col] = valid ? p.delta[idx] : 0.0f;
}

// Deterministic mode: the 64-key tiles of a (sequence, KV head) (one per consumer warpgroup: CTA n's
// warpgroup wg owns tile NWG n + wg) add into a query tile's dQ rows in key-tile order. The tiles
// that touch query tile m are 0 .. n_max(m) (causal: a later CTA starts at a later query tile, and
// both warpgroups of a CTA walk the same query tiles, a warpgroup past sk too, adding zeros; so the
// set has no holes), so tile n waits until the tile's semaphore reads n, adds, and sets it to
// n + 1. Tile n only waits for lower tiles: its own CTA's warpgroup 0 (resident with it) or lower
// CTAs, which a GPU starts first (grid x runs fastest), so the chain always ends at tile 0.
struct DqTurn {
    int32_t* sem;  // null: atomics in any order
    int n_block;   // this warpgroup's 64-key tile
    unsigned bar;  // its warpgroup's named barrier
    FMO_DEVICE void wait() const {
        if (sem != nullptr)
            while (ptx::ld_acquire(sem) != n_block) {
            }  // every thread acquires: its adds come after the previous tile's
    }
    FMO_DEVICE void pass() const {
        if (sem == nullptr) return;
        ptx::bar_sync(bar, 128);  // every thread of the warpgroup issued its adds
        if (threadIdx.x % 128 == 0) {
            ptx::fence_acq_rel();  // the warpgroup's adds (ordered before by the barrier), then the flag
            ptx::st_release(sem, n_block + 1);
        }
    }
};

template <typename T, class Shape, bool CAUSAL, bool DETERMINISTIC>
FMO_DEVICE void consume_bwd(const AttnHopperBwdParams& P, const HopperBwdSmem<Shape>& sm, const SeqView& s,
                            const QueryTiles& qt, int hk, int n0) {
    const AttnParams& p = P.a;
    constexpr int MT = Shape::MT;
    const int warp = (int(threadIdx.x) / 32) % 4, g = int(threadIdx.x) % 32 / 4, t = int(threadIdx.x) % 4;
    // consumer warpgroup wg: keys nw .. nw + 63 of the CTA's BN (all past sk possible: every barrier
    // still arrived at, dQ adds of zeros, nothing stored)
    const int wg = Shape::NWG == 1 ? 0 : int(threadIdx.x) / 128 - 1;  // NWG 1: a constant (MLA spilled else)
    const int nw = n0 + Shape::WN * wg;
    const unsigned ds_bar = kDsBarrier + unsigned(wg);
    uint8_t* const ds = sm.ds(wg);
    const uint8_t* const k_rows = sm.k() + wg * Shape::WN * 128;  // its keys' rows in K's and V's panels
    const uint8_t* const v_rows = sm.v() + wg * Shape::WN * 128;
    constexpr int DKR = Shape::DK_REG;
    float dk[DKR / 8][4], dv[Shape::DV / 8][4];
    zero(dk);
    zero(dv);
    float(&dkf)[DKR / 2] = reinterpret_cast<float(&)[DKR / 2]>(dk);
    float* dk_mine = sm.dk_panels(wg) + threadIdx.x % 128;  // this thread's slots of the fp32 dK panels
#pragma unroll 1
    for (int j = 0; j < Shape::DK_SMEM_PANELS * kPanel / 2; ++j) dk_mine[128 * j] = 0.0f;
    float(&dvf)[Shape::DV / 2] = reinterpret_cast<float(&)[Shape::DV / 2]>(dv);
    if (qt.count() > 0) ptx::mbarrier_wait_parity(sm.kv_full(), 0);
    PipelineState ps;
    for (int it = 0; it < qt.count(); ++it, ps.advance(Shape::STAGES)) {
        const int h = qt.head(it, hk), m0 = qt.m0(it, Shape::BM);
        float st[MT][4], dpt[MT][4];
        float(&stf)[Shape::BM / 2] = reinterpret_cast<float(&)[Shape::BM / 2]>(st);
        float(&dptf)[Shape::BM / 2] = reinterpret_cast<float(&)[Shape::BM / 2]>(dpt);
        load_rows<Shape>(p, sm, s, wg, h, m0);
        ptx::mbarrier_wait_parity(sm.full(ps.stage), ps.phase);  // Q and dO of this tile landed
        ptx::wgmma_fence();  // the previous tile's reads of st / dpt before the MMAs overwrite them
        issue_nt<T, Shape, Shape::DQK>(stf, k_rows, sm.q(ps.stage));
        issue_nt<T, Shape, Shape::DV>(dptf, v_rows, sm.dout(ps.stage));
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operands(stf);
        ptx::wgmma_fence_operands(dptf);
        ptx::bar_sync(ds_bar, 128);  // the tile's lse / delta in shared memory (load_rows)

        apply_mask<MT, true>(st, CAUSAL, nw + 16 * warp, m0, s.sq, s.sk);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = mi * 8 + 2 * t + c;  // the query column
                const float lse2 = sm.lse2(wg)[col], delta = sm.delta(wg)[col];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int e = 2 * hh + c;
                    st[mi][e] = exp2f(fmaf(st[mi][e], p.scale_log2, -lse2));  // P^T
                    dpt[mi][e] = st[mi][e] * (dpt[mi][e] - delta);               // dS^T
                }
            }
        uint32_t pa[Shape::BM / 16][4], da[Shape::BM / 16][4];
        pack_p<T, HopperFwdShape<1, Shape::BM, 64, 64, 2>>(pa, st);  // the forward's S -> RS fragments
        pack_p<T, HopperFwdShape<1, Shape::BM, 64, 64, 2>>(da, dpt);
        ptx::bar_sync(ds_bar, 128);  // every warp's MMAs of the previous tile reading dS^T retired
        stage_ds<T, Shape>(ds, da);
        ptx::fence_proxy_async();    // dS^T's st.shared, to the async proxy the wgmma reads through
        ptx::bar_sync(ds_bar, 128);  // the whole dS^T written before any warp's MMA reads it
        ptx::wgmma_fence();  // pa written before the MMAs read it
        issue_tn<T, Shape, Shape::DV>(dvf, pa, sm.dout(ps.stage));
        issue_ds_q<T, Shape, DKR>(dkf, ds, sm.q(ps.stage), 0, true);
        ptx::wgmma_commit();
        float dq[kPanel / 8][4];  // a 64-column panel's accumulator: dK's shared-memory panels, then dQ's
        float(&dqf)[kPanel / 2] = reinterpret_cast<float(&)[kPanel / 2]>(dq);
#pragma unroll 1
        for (int pe = 0; pe < Shape::DK_SMEM_PANELS; ++pe) {  // dK's columns past DK_REG (MLA: 128..191)
            ptx::wgmma_fence();  // the previous panel's reads of dq before the MMAs overwrite it
            issue_ds_q<T, Shape, kPanel>(dqf, ds, sm.q(ps.stage), DKR / kPanel + pe, false);
            ptx::wgmma_commit();
            ptx::wgmma_wait<0>();  // also retires dV / dK's group
            ptx::wgmma_fence_operands(dqf);
#pragma unroll
            for (int j = 0; j < kPanel / 2; ++j) dk_mine[128 * (pe * kPanel / 2 + j)] += dqf[j];
        }
        float* dq_rows = P.dq_accum + (s.q_start + m0) * p.q_row_stride + int64_t(h) * Shape::DQK;
        const int m_blocks = int((p.seqlen_q + Shape::BM - 1) / Shape::BM);
        const DqTurn turn{DETERMINISTIC ? P.dq_semaphore + (int64_t(blockIdx.z) * p.heads_q + h) * m_blocks + m0 / Shape::BM
                                        : nullptr,
                          nw / Shape::WN, ds_bar};
        turn.wait();
#pragma unroll 1
        for (int pc = 0; pc < Shape::DQK / kPanel; ++pc) {
            ptx::wgmma_fence();  // the previous panel's reads of dq before the MMAs overwrite it
            issue_dq<T, Shape>(dqf, ds, k_rows, pc);
            ptx::wgmma_commit();
            ptx::wgmma_wait<0>();  // also retires dV / dK's group: pa, da and stage s are free
            ptx::wgmma_fence_operands(dqf);
            if (pc == 0) arrive_per_warp(sm.empty(ps.stage));  // this warp's MMAs reading Q and dO retired
                                                               // (dK's panels above read Q too: retired)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = 16 * warp + g + 8 * hh;  // dQ's row: a query of the tile
                if (m0 + r >= s.sq) continue;
#pragma unroll
                for (int ni = 0; ni < kPanel / 8; ++ni)
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        ptx::red_add(dq_rows + r * p.q_row_stride + pc * kPanel + ni * 8 + 2 * t + c,
                                     dq[ni][2 * hh + c] * p.softmax_scale);
            }
        }
        turn.pass();
    }
    ptx::wgmma_fence_operands(dkf);
    ptx::wgmma_fence_operands(dvf);
    T* dkp = static_cast<T*>(p.dk) + (s.k_start + nw) * p.k_row_stride + int64_t(hk) * Shape::DQK;
    T* dvp = static_cast<T*>(p.dv) + (s.k_start + nw) * p.v_row_stride + int64_t(hk) * Shape::DV;
    store_rows<T>(dkp, p.k_row_stride, 16 * warp, s.sk - nw, dk, p.softmax_scale);
#pragma unroll 1
    for (int pe = 0; pe < Shape::DK_SMEM_PANELS; ++pe) {
        float panel[kPanel / 8][4];
#pragma unroll
        for (int j = 0; j < kPanel / 2; ++j) panel[j / 4][j % 4] = dk_mine[128 * (pe * kPanel / 2 + j)];
        store_rows<T>(dkp + DKR + pe * kPanel, p.k_row_stride, 16 * warp, s.sk - nw, panel, p.softmax_scale);
    }
    store_rows<T>(dvp, p.v_row_stride, 16 * warp, s.sk - nw, dv, 1.0f);
}

// grid (ceil(max_sk / BN), Hkv, batch), 128 (1 + NWG) threads.
// REVERSE_GRID (tests only): CTA x takes key tile gridDim.x - 1 - x, so the simulator starts the
// last key tiles first and dQ's adds arrive out of key-tile order unless DETERMINISTIC orders them.
template <typename T, int DQK, int DV, int STAGES, int NWG, bool CAUSAL, bool DETERMINISTIC,
          bool REVERSE_GRID = false>
FMO_DEVICE void attn_bwd_hopper(const AttnHopperBwdParams& P) {
    using Shape = HopperBwdShape<DQK, DV, STAGES, NWG>;
    const AttnParams& p = P.a;
    const int n_block = REVERSE_GRID ? int(gridDim.x - 1 - blockIdx.x) : int(blockIdx.x);
    const int n0 = n_block * Shape::BN, hk = int(blockIdx.y);
    const SeqView s = sequence(p, blockIdx.z);
    if (n0 >= s.sk) return;  // varlen: this sequence has fewer keys than max_seqlen_k (every thread)
    const QueryTiles qt(p, s, n0, Shape::BM, CAUSAL);
    const HopperBwdSmem<Shape> sm{fmo_attn_smem};
    if (threadIdx.x == 0) sm.init();
    __syncthreads();  // barriers initialised before any role uses them (the last CTA-wide barrier)
    if (threadIdx.x < 128) {  // producer warpgroup
        if (NWG == 2) ptx::setmaxnreg_dec<kBwdProducerRegs>();  // every warp of the warpgroup (.aligned)
        if (threadIdx.x / 32 != 0 || !ptx::elect_one_sync() || qt.count() == 0) return;
        ptx::tma_prefetch_descriptor(&P.q_map);
        ptx::tma_prefetch_descriptor(&P.k_map);
        ptx::tma_prefetch_descriptor(&P.v_map);
        ptx::tma_prefetch_descriptor(&P.do_map);
        produce_bwd<Shape>(P, sm, s, qt, hk, n0, blockIdx.z);
        return;
    }
    if (NWG == 2) ptx::setmaxnreg_inc<kBwdConsumerRegs>();  // one warpgroup: 255 already at launch
    consume_bwd<T, Shape, CAUSAL, DETERMINISTIC>(P, sm, s, qt, hk, n0);
}

}  // namespace attn
}  // namespace fmo
