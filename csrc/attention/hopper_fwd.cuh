// Fused attention forward on Hopper (sm_90a): TMA + mbarrier ring, warp-specialised, wgmma.
// Same math, Params fields, grid and lse contract as the mma.sync kernel (fwd.cuh, whose
// header defines o, lse, causal bottom-right, GQA and varlen); what differs is the machinery:
//
//   CTA  persistent: grid = min(work tiles, SM budget); a work tile is BM = 64 NC query rows of
//        one (sequence, query head), or, packed (PACK, GQA), BM / G query positions of the G
//        query heads that share one KV head, so their K/V tiles are loaded once, not G times
//        (TileRows); every role walks the same tiles (WorkTiles: causal from the longest, the
//        last query blocks, to the shortest)
//   warpgroup 0    producer: setmaxnreg.dec; warp 0's elected lane, per work tile, TMA-loads Q
//                  (q_full; after q_empty: the previous tile's MMAs reading Q retired), then
//                  every key tile's K and V into the ring (full_k[s], full_v[s], empty[s]);
//                  warps 1-3 exit at once.
//   warpgroup 1+c  consumer c (NC of them, rows 64 c .. 64 c + 63): setmaxnreg.inc; per key tile
//                    wait full_k[s]; S = Q K^T: DQK / 16 x wgmma m64nBNk16 SS (both K-major)
//                    mask (diagonal / ragged tiles only), online softmax (softmax.cuh) in the
//                      accumulator registers, which are the mma.sync C layout per warp
//                    wait full_v[s]; O += P V: BN / 16 x wgmma m64nDVk16 RS, P straight from S's
//                      registers (rounded to T), V read MN-major as TMA stored it
//                    arrive empty[s] (one lane per warp: its MMAs reading s retired)
//                  with tile j's softmax overlapping tile j - 1's P V (consume() below), then
//                  the epilogue (fwd.cuh's fwd_epilogue: o / l, lse).
//   smem           Q [BM][DQK], then the ring: STAGES x { K [BN][DQK], V [BN][DV] } (K and V
//                  land on separate barriers: S = Q K^T starts before V is in), then the
//                  barriers. A tile of D columns is D / 64 panels [rows][64] of 128-byte rows,
//                  each one TMA box with the 128-byte swizzle = wgmma's K-major B128 layout
//                  (SBO 1024, k-step j at +32 j inside the row) and, read along N, its MN-major
//                  B128 layout (LBO = the next panel, SBO = 8 keys). Every panel is a multiple
//                  of 1024 bytes, so all stay 1024-aligned in the 1024-aligned dynamic buffer.
//
// Tensor maps (AttnHopperParams, encoded per call by fastmoe_ops/ops/attention_hopper.py):
// q, k, v viewed as [B, S, H * D] (dense) or [1, total, H * D] (varlen), dims innermost first
// (H * D, S, B), box (64, rows, 1): a box never crosses a dense batch's end (zero fill, as
// the mma.sync kernel's loads). Varlen boxes run into the next sequence's rows: its keys are
// masked (-inf, so P = 0 exactly), its query rows are never stored. Packed, q is viewed as
// [rows, Hq, DQK] (dims DQK, Hq, rows), box (64, G, BM / G): rows past the sequence's (or the
// dense batch's) end are the next one's, masked and never stored likewise.
// The two consumer warpgroups take turns issuing their MMAs (Turns: named barriers), so one's
// softmax runs under the other's GEMMs. The ring's stage and phase carry from one work tile to
// the next (the producer runs ahead into the next tile's keys while the consumers finish).
// The next work tile's Q loads as soon as this tile's last S = Q K^T retired (one Q buffer):
// under the last P V and the epilogue.
// Not yet (issue 16): a varlen-aware order (tiles past a sequence's end are skipped, not
// compacted).
#pragma once

#include "csrc/attention/fwd.cuh"
#include "csrc/common/pipeline.cuh"
#include "ptx/barrier.cuh"
#include "ptx/mbarrier.cuh"
#include "ptx/tma.cuh"
#include "ptx/warp.cuh"
#include "ptx/wgmma_bf16.cuh"

namespace fmo {

struct AttnHopperParams {
    AttnParams a;
    ptx::TmaDescriptor q_map;  // q as [B | 1, S | total, Hq * DQK], box (64, BM, 1), 128B swizzle;
                               // packed: [rows, Hq, DQK], box (64, G, BM / G)
    ptx::TmaDescriptor k_map;  // k as [.., Hkv * DQK], box (64, BN, 1)
    ptx::TmaDescriptor v_map;  // v as [.., Hkv * DV], box (64, BN, 1)
};

namespace attn {

constexpr int kPanel = 64;            // 16-bit elements per 128-byte swizzled row (one TMA box's width)
constexpr int kHopperProducerRegs = 24;
constexpr int kHopperConsumerRegs = 240;  // 128 x 24 + 256 x 240 = 64512 of 65536 (NC = 2)

template <int NC_, int BN_, int DQK_, int DV_, int STAGES_>
struct HopperFwdShape {
    static constexpr int NC = NC_, BM = 64 * NC_, BN = BN_, DQK = DQK_, DV = DV_, STAGES = STAGES_;
    static constexpr int NT = BN / 8, DT = DV / 8;  // n8 column blocks of S and of O (fwd_epilogue's DT)
    static constexpr int kThreads = 128 * (1 + NC);
    static constexpr int kQBytes = BM * DQK * 2, kKBytes = BN * DQK * 2, kVBytes = BN * DV * 2;
    static constexpr int kStageBytes = kKBytes + kVBytes;
    static constexpr int kBarrierOffset = kQBytes + STAGES * kStageBytes;
    static constexpr int kSmemBytes = kBarrierOffset + 8 * (3 * STAGES + 2);
    static_assert(NC == 1 || NC == 2, "one or two consumer warpgroups");
    static_assert(DQK % kPanel == 0 && DV % kPanel == 0, "whole 64-column panels");
    static_assert(BN % 16 == 0 && BN >= 64 && BN <= 256 && (BN == 64 || BN % 64 == 0), "BN: a wgmma N size");
    static_assert(DV == 64 || DV == 128 || DV == 192 || DV == 256, "DV: a wgmma N size of wgmma_bf16.cuh");
    static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0, "1024-aligned panels");
};

// Q, the ring and its barriers in the dynamic buffer.
template <class Shape>
struct HopperSmem {
    uint8_t* base;
    FMO_DEVICE uint8_t* q() const { return base; }
    FMO_DEVICE uint8_t* k(int s) const { return base + Shape::kQBytes + s * Shape::kStageBytes; }
    FMO_DEVICE uint8_t* v(int s) const { return k(s) + Shape::kKBytes; }
    // full_k[s], full_v[s]: stage s's K (V) bytes landed; separate, so S = Q K^T can start while V
    // is still on its way. empty[s]: every consumer warp's MMAs reading stage s retired.
    FMO_DEVICE uint64_t* full_k(int s) const { return reinterpret_cast<uint64_t*>(base + Shape::kBarrierOffset) + s; }
    FMO_DEVICE uint64_t* full_v(int s) const { return full_k(Shape::STAGES) + s; }
    FMO_DEVICE uint64_t* empty(int s) const { return full_k(2 * Shape::STAGES) + s; }
    // q_full: a tile's Q landed; q_empty: every consumer warp's MMAs reading it retired (the
    // persistent CTA then loads the next tile's Q into the same place).
    FMO_DEVICE uint64_t* q_full() const { return full_k(3 * Shape::STAGES); }
    FMO_DEVICE uint64_t* q_empty() const { return full_k(3 * Shape::STAGES + 1); }

    // One thread, before the roles split (then __syncthreads publishes them).
    FMO_DEVICE void init() const {
        for (int s = 0; s < Shape::STAGES; ++s) {
            ptx::mbarrier_init(full_k(s), 1);               // the producer's arrive.expect_tx
            ptx::mbarrier_init(full_v(s), 1);
            ptx::mbarrier_init(empty(s), 4 * Shape::NC);    // one lane per consumer warp
        }
        ptx::mbarrier_init(q_full(), 1);
        ptx::mbarrier_init(q_empty(), 4 * Shape::NC);
        ptx::fence_mbarrier_init();  // the inits, to the async proxy (TMA completes on them)
    }
};

// Where one (sequence, head) lives in the maps' [B | 1, rows, H * D] views.
struct MapRows {
    int32_t q_row, k_row, batch;
};
FMO_DEVICE MapRows map_rows(const AttnParams& p, const SeqView& s, int64_t b, int m0) {
    if (p.cu_seqlens_q != nullptr) return MapRows{int32_t(s.q_start + m0), int32_t(s.k_start), 0};
    return MapRows{m0, 0, int32_t(b)};
}

// A work tile's rows. Unpacked: BM consecutive query positions of one query head. Packed (GQA,
// G = Hq / Hkv query heads per KV head): row r is query position pos0 + r / G of head
// head0 + r % G (head0 = hk G): q's own [rows, Hq, D] order, so one 3-D box loads a panel, and
// each row masks and stores by its own position and head.
template <int BM, bool PACK>
struct TileRows {
    int pack;   // G packed, 1 otherwise
    int pos0;   // the first row's query position in its sequence
    int head0;  // the first row's query head
    FMO_DEVICE int positions() const { return PACK ? BM / pack : BM; }
    FMO_DEVICE int pos(int r) const { return pos0 + (PACK ? r / pack : r); }
    FMO_DEVICE int head(int r) const { return head0 + (PACK ? r % pack : 0); }
};

// `rows` x D of one head as D / 64 boxes (panels) into dst.
template <int D, int ROWS>
FMO_DEVICE void tma_load_panels(uint8_t* dst, const ptx::TmaDescriptor* map, uint64_t* bar, int head, int32_t row,
                                int32_t batch) {
#pragma unroll
    for (int pc = 0; pc < D / kPanel; ++pc)
        ptx::tma_load_3d(dst + pc * ROWS * 128, map, bar, head * D + pc * kPanel, row, batch);
}

// The producer lane's work for one work tile: its Q once the previous tile's consumers are done
// with Q (q_phase: the parity of this CTA's work tiles so far), then its n_tiles key tiles.
template <class Shape, bool PACK>
FMO_DEVICE void produce(const AttnHopperParams& P, const HopperSmem<Shape>& sm, const TileRows<Shape::BM, PACK>& rows,
                        int hk, const SeqView& s, const MapRows& r, int n_tiles, PipelineState& ps, uint32_t q_phase) {
    ptx::mbarrier_wait_parity(sm.q_empty(), q_phase ^ 1);  // the previous tile's MMAs reading Q retired
    ptx::mbarrier_arrive_expect_tx(sm.q_full(), Shape::kQBytes);  // whole boxes, zero-filled rows included
    if (PACK) {  // box (64, G heads, BM / G positions): BM rows of 128 bytes per panel, as unpacked
#pragma unroll
        for (int pc = 0; pc < Shape::DQK / kPanel; ++pc)
            ptx::tma_load_3d(sm.q() + pc * Shape::BM * 128, &P.q_map, sm.q_full(), pc * kPanel, rows.head0,
                             int32_t(s.q_start + rows.pos0));
    } else {
        tma_load_panels<Shape::DQK, Shape::BM>(sm.q(), &P.q_map, sm.q_full(), rows.head0, r.q_row, r.batch);
    }
    for (int j = 0; j < n_tiles; ++j, ps.advance(Shape::STAGES)) {
        ptx::mbarrier_wait_parity(sm.empty(ps.stage), ps.phase ^ 1);  // the stage's last MMAs retired
        const int32_t row = r.k_row + j * Shape::BN;
        ptx::mbarrier_arrive_expect_tx(sm.full_k(ps.stage), Shape::kKBytes);
        tma_load_panels<Shape::DQK, Shape::BN>(sm.k(ps.stage), &P.k_map, sm.full_k(ps.stage), hk, row, r.batch);
        ptx::mbarrier_arrive_expect_tx(sm.full_v(ps.stage), Shape::kVBytes);
        tma_load_panels<Shape::DV, Shape::BN>(sm.v(ps.stage), &P.v_map, sm.full_v(ps.stage), hk, row, r.batch);
    }
}

template <typename T>
struct WgmmaType {
    static constexpr ptx::Wgmma16 value = IsBf16<T>::value ? ptx::Wgmma16::bf16 : ptx::Wgmma16::f16;
};

// S[64 rows of warpgroup wg, BN] = Q K^T over DQK: DQK / 16 SS MMAs, committed, not waited for.
template <typename T, class Shape>
FMO_DEVICE void issue_qk(float (&s)[Shape::BN / 2], const uint8_t* q, const uint8_t* k, int wg) {
#pragma unroll
    for (int ks = 0; ks < Shape::DQK / 16; ++ks) {
        const int pc = ks / 4, off = 32 * (ks % 4);  // panel, byte offset of the k-step in the 128-byte row
        // K-major B128: SBO = 8 rows of 128 bytes; LBO unused ("assumed 1", ISA)
        const uint64_t da = ptx::make_smem_desc(q + pc * Shape::BM * 128 + wg * 64 * 128 + off, 16, 1024, ptx::Swizzle::b128);
        const uint64_t db = ptx::make_smem_desc(k + pc * Shape::BN * 128 + off, 16, 1024, ptx::Swizzle::b128);
        ptx::wgmma_m64nNk16_ss<Shape::BN, WgmmaType<T>::value>(s, da, db, ks > 0 ? 1 : 0);
    }
    ptx::wgmma_commit();
}

// O[64, DV] += P V: P's k-step kk is S's registers 8 kk .. 8 kk + 7 as T pairs (the RS A
// fragment is S's accumulator map for N = 16: ptx/wgmma_bf16.cuh), V [BN keys][DV] read
// MN-major (trans-b): keys 16 kk.. start at +16 kk rows, LBO = the next 64-column panel, SBO =
// 8 keys. The P registers must live until the wait (the ISA reads them asynchronously).
template <typename T, class Shape>
FMO_DEVICE void issue_pv(float (&o)[Shape::DV / 2], const uint32_t (&pa)[Shape::BN / 16][4], const uint8_t* v) {
#pragma unroll
    for (int kk = 0; kk < Shape::BN / 16; ++kk) {
        const uint64_t db = ptx::make_smem_desc(v + kk * 16 * 128, Shape::BN * 128, 1024, ptx::Swizzle::b128);
        ptx::wgmma_m64nNk16_rs<Shape::DV, WgmmaType<T>::value, 1>(o, pa[kk], db, 1);
    }
    ptx::wgmma_commit();
}

// One arrival per warp on a consumer-released barrier (empty[s], q_empty: count 4 NC), after
// every lane's wait that retired the MMAs reading the buffer.
FMO_DEVICE void arrive_per_warp(uint64_t* bar) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) ptx::mbarrier_arrive(bar);
}

template <class Shape>
FMO_DEVICE void release(const HopperSmem<Shape>& sm, uint32_t stage) { arrive_per_warp(sm.empty(stage)); }

template <class Shape>
FMO_DEVICE void release_q(const HopperSmem<Shape>& sm) { arrive_per_warp(sm.q_empty()); }

// Ping-pong between the two consumer warpgroups (FA3's inter-warpgroup schedule): they take
// turns issuing their MMAs, so one's softmax runs while the other's GEMMs use the tensor cores.
// Named barrier kTurnBarrier + w is warpgroup w's turn: it bar.syncs there (128 threads) before
// issuing and bar.arrives (128) at the other's after. Warpgroup 1 opens with an arrival at
// warpgroup 0's barrier and leaves out its arrival after its last issue, so every sync has
// exactly one arrival (both issue n_tiles + 1 times). NC = 1: no-ops. Ids >= 1 (0 is
// __syncthreads).
constexpr unsigned kTurnBarrier = 1;
template <int NC>
struct Turns {
    int wg;
    FMO_DEVICE void open(int n_tiles) const {
        if (NC == 2 && wg == 1 && n_tiles > 0) ptx::bar_arrive(kTurnBarrier, 256);
    }
    FMO_DEVICE void wait() const {
        if (NC == 2) ptx::bar_sync(kTurnBarrier + wg, 256);
    }
    FMO_DEVICE void pass(bool last) const {
        if (NC == 2 && !(wg == 1 && last)) ptx::bar_arrive(kTurnBarrier + (1 - wg), 256);
    }
};

// S's probabilities as the RS A fragments of P's k-steps (pack2 rounds to T).
template <typename T, class Shape>
FMO_DEVICE void pack_p(uint32_t (&pa)[Shape::BN / 16][4], const float (&sc)[Shape::NT][4]) {
#pragma unroll
    for (int kk = 0; kk < Shape::BN / 16; ++kk) {
        pa[kk][0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
        pa[kk][1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
        pa[kk][2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[kk][3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
}

// One consumer warpgroup's key loop. Tile j's softmax overlaps tile j - 1's P V on the tensor
// cores (FA3's intra-warpgroup pipelining):
//
//   j = 0        S = Q K_0, wait; softmax -> P_0
//   j = 1 ..     wait full[j]; S = Q K_j (group 1), O += P_{j-1} V_{j-1} (group 2)
//                wait_group 1: S retired (groups retire in order), O's group may still run
//                mask, softmax of S -> alpha_j, P (fp32, in S's registers)
//                wait_group 0: O retired; release stage j - 1; O *= alpha_j; P_j = T(P)
//   end          O += P_last V_last, wait; release the last stage
//
// P_{j-1} (pa) must stay untouched until the wait that retires its MMAs: P_j is packed after it.
// UNSAFE_EARLY_RELEASE (tests only): free each stage right after issuing the MMAs that read its
// V, before they retired -- the bug this design must not have: the simulator's TMA poisons the
// refilled stage under the pending MMAs (tests/test_attention_hopper.py).
template <typename T, class Shape, bool CAUSAL, bool PACK, bool UNSAFE_EARLY_RELEASE>
FMO_DEVICE void consume(const AttnParams& p, const HopperSmem<Shape>& sm, const SeqView& s,
                        const TileRows<Shape::BM, PACK>& rows, int n_tiles, PipelineState& ps, uint32_t q_phase) {
    const int wg = int(threadIdx.x) / 128 - 1, warp = (int(threadIdx.x) / 32) % 4;
    const int r0 = wg * 64 + warp * 16;  // this warp's 16 rows of the tile (the mma.sync kernel's warp tile)
    const int row0 = rows.pos(r0);       // their first (smallest) query position
    const int g = int(threadIdx.x) % 32 / 4;  // a thread's rows: r0 + g and r0 + g + 8
    const int qi[2] = {rows.pos(r0 + g), rows.pos(r0 + g + 8)};
    float o[Shape::DT][4];
    zero(o);
    OnlineSoftmax softmax;
    float(&of)[Shape::DV / 2] = reinterpret_cast<float(&)[Shape::DV / 2]>(o);
    float sc[Shape::NT][4];
    float(&sf)[Shape::BN / 2] = reinterpret_cast<float(&)[Shape::BN / 2]>(sc);
    uint32_t pa[Shape::BN / 16][4];
    // Scores of tile j -> probabilities; masks only tiles crossing the diagonal or the keys' end.
    auto softmax_tile = [&](int j, float (&alpha)[2]) {
        const int n0 = j * Shape::BN;
        const bool edge = n0 + Shape::BN > s.sk || (CAUSAL && n0 + Shape::BN - 1 > row0 + s.sk - s.sq);
        if (edge) mask_rows(sc, CAUSAL, qi, n0, s.sq, s.sk);
        softmax.scores(sc, p.scale_log2, alpha);
    };
    const Turns<Shape::NC> turns{wg};
    turns.open(n_tiles);
    ptx::mbarrier_wait_parity(sm.q_full(), q_phase);
    PipelineState prev;
    if (n_tiles > 0) {
        float alpha[2];  // o is 0: nothing to rescale
        ptx::mbarrier_wait_parity(sm.full_k(ps.stage), ps.phase);  // K of tile 0 landed
        turns.wait();
        ptx::wgmma_fence();
        issue_qk<T, Shape>(sf, sm.q(), sm.k(ps.stage), wg);
        turns.pass(false);
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operands(sf);
        if (n_tiles == 1) release_q(sm);  // the tile's only MMA reading Q retired
        softmax_tile(0, alpha);
        pack_p<T, Shape>(pa, sc);
    }
    for (int j = 1; j < n_tiles; ++j) {
        prev = ps;
        ps.advance(Shape::STAGES);
        ptx::mbarrier_wait_parity(sm.full_k(ps.stage), ps.phase);     // K of tile j landed
        ptx::mbarrier_wait_parity(sm.full_v(prev.stage), prev.phase);  // V of tile j - 1 landed
        ptx::wgmma_fence_operands(of);
        turns.wait();
        ptx::wgmma_fence();  // o's rescaling and s's reads (register accesses) before the MMAs write them
        issue_qk<T, Shape>(sf, sm.q(), sm.k(ps.stage), wg);
        issue_pv<T, Shape>(of, pa, sm.v(prev.stage));
        turns.pass(false);
        if (UNSAFE_EARLY_RELEASE) release(sm, prev.stage);
        ptx::wgmma_wait<1>();  // S = Q K_j retired; P_{j-1} V_{j-1} may still run
        ptx::wgmma_fence_operands(sf);
        if (j == n_tiles - 1) release_q(sm);  // the tile's last MMA reading Q retired
        float alpha[2];
        softmax_tile(j, alpha);
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operands(of);
        if (!UNSAFE_EARLY_RELEASE) release(sm, prev.stage);  // this warp's MMAs reading stage j - 1 retired
        OnlineSoftmax::rescale(o, alpha);
        pack_p<T, Shape>(pa, sc);
    }
    if (n_tiles > 0) {
        ptx::mbarrier_wait_parity(sm.full_v(ps.stage), ps.phase);  // V of the last tile landed
        ptx::wgmma_fence_operands(of);
        turns.wait();
        ptx::wgmma_fence();
        issue_pv<T, Shape>(of, pa, sm.v(ps.stage));
        turns.pass(true);
        if (UNSAFE_EARLY_RELEASE) release(sm, ps.stage);
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operands(of);
        if (!UNSAFE_EARLY_RELEASE) release(sm, ps.stage);
        ps.advance(Shape::STAGES);  // the next work tile's first stage
    }
    if (n_tiles == 0) release_q(sm);  // no MMA read Q (it landed: q_full was waited for)
    const int hd[2] = {rows.head(r0 + g), rows.head(r0 + g + 8)};
    fwd_epilogue<T, Shape>(p, s, qi, hd, o, softmax);
}

// Persistent work tiles (one query block of one (sequence, head), packed: of one (sequence, KV
// head)), the same walk in every role:
// CTA c takes tiles c, c + G, c + 2G, ... (G = gridDim.x <= the SM budget). Heads and batches run
// fastest; causal walks query blocks from the last (the most keys) to the first, so the
// longest tiles start first and the short ones fill the tail. Varlen: blocks past a sequence's
// end are skipped by every role alike.
template <int BM, bool CAUSAL, bool PACK>
struct WorkTiles {
    int group, pack, m_blocks, heads, batch;  // heads: walked per batch (Hq, packed Hkv)
    FMO_DEVICE explicit WorkTiles(const AttnParams& p)
        : group(int(p.heads_q / p.heads_kv)),
          pack(PACK ? group : 1),
          m_blocks(int((p.seqlen_q + BM / pack - 1) / (BM / pack))),
          heads(int(p.heads_q) / pack),
          batch(int(p.batch)) {}
    FMO_DEVICE int count() const { return m_blocks * heads * batch; }
    FMO_DEVICE void at(int t, int& mb, int& h, int& b) const {
        const int hb = t % (heads * batch), r = t / (heads * batch);
        h = hb % heads;
        b = hb / heads;
        mb = CAUSAL ? m_blocks - 1 - r : r;
    }
    FMO_DEVICE TileRows<BM, PACK> rows(int mb, int h) const { return {pack, mb * (BM / pack), h * pack}; }
    FMO_DEVICE int kv_head(int h) const { return h * pack / group; }
};

// Key tiles a work tile reads (causal: up to its last position's diagonal).
template <class Shape, bool CAUSAL, bool PACK>
FMO_DEVICE int key_tiles(const SeqView& s, const TileRows<Shape::BM, PACK>& rows) {
    return (causal_key_end(CAUSAL, rows.pos0, rows.positions(), s.sq, s.sk) + Shape::BN - 1) / Shape::BN;
}

template <typename T, int NC, int BN, int DQK, int DV, int STAGES, bool CAUSAL, bool PACK,
          bool UNSAFE_EARLY_RELEASE = false>
FMO_DEVICE void attn_fwd_hopper(const AttnHopperParams& P) {
    using Shape = HopperFwdShape<NC, BN, DQK, DV, STAGES>;
    const AttnParams& p = P.a;
    const WorkTiles<Shape::BM, CAUSAL, PACK> tiles(p);
    const HopperSmem<Shape> sm{fmo_attn_smem};
    if (threadIdx.x == 0) sm.init();
    __syncthreads();  // barriers initialised before any role uses them (the last CTA-wide barrier)

    PipelineState ps;
    uint32_t q_phase = 0;  // parity of this CTA's work tiles so far (q_full / q_empty)
    if (threadIdx.x < 128) {  // producer warpgroup
        ptx::setmaxnreg_dec<kHopperProducerRegs>();
        if (threadIdx.x / 32 != 0 || !ptx::elect_one_sync()) return;
        ptx::tma_prefetch_descriptor(&P.q_map);
        ptx::tma_prefetch_descriptor(&P.k_map);
        ptx::tma_prefetch_descriptor(&P.v_map);
        for (int t = int(blockIdx.x); t < tiles.count(); t += int(gridDim.x)) {
            int mb, h, b;
            tiles.at(t, mb, h, b);
            const SeqView s = sequence(p, b);
            const TileRows<Shape::BM, PACK> rows = tiles.rows(mb, h);
            if (rows.pos0 >= s.sq) continue;  // varlen: this sequence is shorter than max_seqlen_q
            produce<Shape>(P, sm, rows, tiles.kv_head(h), s, map_rows(p, s, b, rows.pos0),
                           key_tiles<Shape, CAUSAL>(s, rows), ps, q_phase);
            q_phase ^= 1;
        }
        return;
    }
    ptx::setmaxnreg_inc<kHopperConsumerRegs>();
    for (int t = int(blockIdx.x); t < tiles.count(); t += int(gridDim.x)) {
        int mb, h, b;
        tiles.at(t, mb, h, b);
        const SeqView s = sequence(p, b);
        const TileRows<Shape::BM, PACK> rows = tiles.rows(mb, h);
        if (rows.pos0 >= s.sq) continue;
        consume<T, Shape, CAUSAL, PACK, UNSAFE_EARLY_RELEASE>(p, sm, s, rows, key_tiles<Shape, CAUSAL>(s, rows), ps,
                                                              q_phase);
        q_phase ^= 1;
    }
}

}  // namespace attn
}  // namespace fmo
