// Low-latency (decode) MoE dispatch/combine over peers' buffers: DeepEP's second kind of
// kernel, for small batches. Fixed shapes, no host synchronisation, capturable in a CUDA
// graph: every count the receiver needs travels through the peers' buffers with the rows.
//
// Every rank owns one buffer, mapped by every peer (CUDA IPC, or POSIX shared memory in the
// simulator). Byte layout (offsets in MoeLlParams):
//   [0]               dispatch counters [R] u64, combine counters [R] u64 (one per source);
//   [status_offset]   status [2] u32: sources a wait gave up on (bit s), dispatch / combine;
//   [counts_region]   counts [E_local, R] i32: rows source s sent to local expert e;
//   [dispatch_region] rows [E_local, R, M] packed (x row, or e4m3 codes + fp32 scales);
//   [combine_region]  rows [E, M, H] T: expert outputs coming back, slot (e, pos) of a token
//                     that this rank sent to global expert e at position pos.
// M = max_tokens (per rank), R ranks, E experts, E_local = E / R per rank.
//
// moe_ll_dispatch: SEND: CTA c takes tokens c, c+G, ...; for each slot j naming expert e
//   (the first slot of the row naming it; ids outside [0, E) are no destination) the
//   token's position pos among this rank's tokens naming e (a block-wide count of the
//   earlier tokens: no atomics, so the order is the token order, deterministic); slot_index
//   [t, j] = e * M + pos (a duplicate slot gets its first slot's); the row (quantised per
//   1 x 128 group with QUANT, bit for bit quantize_per_token_group) goes to rows[e % E_local,
//   rank, pos] at rank e / E_local. CTA c also counts the tokens of experts c, c+G, ... into
//   counts[e, rank] at their owners. Then it signals: bar.sync, fence.acq_rel.sys (every
//   write of the CTA, cumulative over the barrier), red.release.sys +1 on counter[rank] at
//   every peer. RECV: thread 0 waits (ld.acquire.sys) until every source's counter reaches
//   G (the grid: every CTA of every source signalled), bar.sync; then rows from source s
//   for expert e land at recv_x[e, sum_{s' < s} counts[e, s'] + i] (source rank, then
//   token order: the plain dispatch's receive order), masked_m[e] = sum_s counts[e, s] and
//   recv_counts (combine's copy of counts) written by CTA 0.
// moe_ll_combine: SEND: y[e, first(e, s) + i] goes back to source s's combine region at
//   (rank * E_local + e, i); signal the combine counters. RECV: wait, then out[t] =
//   sum_j w[t, j] * region[slot_index[t, j]] in ascending j (moe_gather_reduce: fp32,
//   __fmul_rn/__fadd_rn, rounded once).
//
// Counter reuse without host state (graphs replay the same launches): counters are zeroed
// by their owner in the *next* kernel of the other kind (dispatch SEND zeroes this rank's
// combine counters, combine SEND its dispatch counters), before that kernel's signal. Calls
// must alternate dispatch, combine on every rank (the Python layer refuses otherwise): a
// peer's next increment then always follows the zeroing (it waits, through the counters,
// for a signal issued after it), and no peer writes rows a receiver is still reading.
// Waits give up after timeout_ns (%globaltimer), record the missing sources in status and
// return: the launcher reports CommTimeoutError (no rank hangs on a peer that never came).
//
// Grid: G CTAs of BLOCK threads, all co-resident when SEND and RECV share a launch (the
// wait needs every CTA of every rank to have signalled). Dynamic shared memory: (BLOCK/32 + 1) i32.
// Constraints: R <= kLlMaxRanks, k <= kLlMaxTopk, hidden * sizeof(T) and the code rows
// multiples of 16 bytes, rows and pointers 16-byte aligned (the launcher checks).
#pragma once

#include "csrc/common/types.cuh"
#include "csrc/moe/ipc.cuh"
#include "csrc/moe/permute.cuh"
#include "csrc/quant/fp8_quant.cuh"
#include "ptx/barrier.cuh"
#include "ptx/ld_st.cuh"
#include "ptx/timer.cuh"

// Dynamic shared memory, (BLOCK/32 + 1) int32 (the launcher's shared_mem): an `extern
// __shared__` array, so the simulator gives each module its own (a function-local static one
// in an inline template is one GNU-unique symbol, bound to the first module loaded).
extern __shared__ __align__(16) int32_t fmo_moe_ll_smem[];

namespace fmo {

constexpr int kLlMaxRanks = 8;
constexpr int kLlMaxTopk = 16;

struct MoeLlParams {
    void* peers[kLlMaxRanks];     // every rank's buffer base, mapped here (own one at [rank])
    const void* x;                // dispatch: x [tokens, hidden] T; combine: y [E_local, R*M, hidden] T
    const int64_t* topk_idx;      // dispatch: [tokens, topk]
    int64_t* slot_index;          // dispatch writes, combine reads: [tokens, topk] row of the combine region or -1
    const float* topk_weights;    // combine: [tokens, topk] (WEIGHTED)
    void* out;                    // dispatch: recv_x [E_local, R*M, hidden] (T or e4m3); combine: out [tokens, hidden]
    float* out_scales;            // dispatch with QUANT: [E_local, R*M, groups]
    int32_t* masked_m;            // dispatch: [E_local]
    int32_t* recv_counts;         // dispatch writes, combine reads: [E_local, R]
    int64_t tokens;
    int64_t topk;
    int64_t hidden;
    int64_t num_experts;
    int64_t per;                  // E_local
    int64_t rank;
    int64_t ranks;
    int64_t max_tokens;           // M
    int64_t row_stride;           // bytes of a packed dispatch row
    int64_t scale_offset;         // QUANT: the scales' byte offset in the packed row
    int64_t status_offset;        // byte offsets inside each buffer
    int64_t counts_region;
    int64_t dispatch_region;
    int64_t combine_region;
    int64_t signals;              // G: a source's counter reaching it completes its part
    int64_t timeout_ns;
    float min_amax;               // QUANT: eps of the quantisation contract
    int32_t reserved;             // keeps the struct's size a multiple of 8
};

using LlChunk = Vec<uint32_t, 4>;   // 16-byte copies (rows are multiples of 16 bytes)
using LlScaleChunk = Vec<uint32_t, 1>;

__device__ __forceinline__ unsigned long long* ll_counter(const MoeLlParams& p, int64_t r, int which) {
    return static_cast<unsigned long long*>(p.peers[r]) + which * p.ranks;
}

// Whether token row `row` ([k] expert ids) names expert e.
__device__ __forceinline__ int32_t ll_names(const int64_t* row, int64_t k, int64_t e) {
    for (int64_t j = 0; j < k; ++j)
        if (row[j] == e) return 1;
    return 0;
}

// The first slot of `row` naming row[j], or -1 when row[j] is no expert in [0, E).
__device__ __forceinline__ int64_t ll_first_slot(const int64_t* row, int64_t j, int64_t num_experts) {
    const int64_t e = row[j];
    if (e < 0 || e >= num_experts) return -1;
    for (int64_t i = 0; i < j; ++i)
        if (row[i] == e) return i;
    return j;
}

// Sum of v over the block (every thread gets it); scratch: BLOCK/32 shared ints.
template <int BLOCK>
__device__ __forceinline__ int32_t ll_block_sum(int32_t v, int32_t* scratch) {
    static_assert(BLOCK % 32 == 0, "whole warps");
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();   // scratch is free (a previous sum's readers are done)
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    int32_t sum = 0;
#pragma unroll
    for (int w = 0; w < BLOCK / 32; ++w) sum += scratch[w];
    return sum;
}

// Publish this CTA's writes, then +1 on counter `which`[rank] at every peer.
__device__ __forceinline__ void ll_signal(const MoeLlParams& p, int which) {
    __syncthreads();
    if (threadIdx.x == 0) {
        ptx::fence_acq_rel<ptx::Scope::sys>();   // the CTA's row and count stores, before the counter
        for (int64_t r = 0; r < p.ranks; ++r) ptx::red_add<ptx::Sem::release, ptx::Scope::sys>(ll_counter(p, r, which) + p.rank, 1ull);
    }
}

// Wait until every source's counter `which` here reaches G; false (block-uniform) when a
// source did not arrive within timeout_ns (recorded in status[which]). missing: a shared int.
__device__ __forceinline__ bool ll_wait(const MoeLlParams& p, int which, int32_t& missing) {
    if (threadIdx.x == 0) {
        const unsigned long long* mine = ll_counter(p, p.rank, which);
        const uint64_t start = ptx::globaltimer();
        uint32_t lost = 0;
        for (int64_t s = 0; s < p.ranks; ++s)
            while (ptx::ld_acquire<ptx::Scope::sys>(mine + s) < static_cast<unsigned long long>(p.signals)) {
                if (ptx::globaltimer() - start > static_cast<uint64_t>(p.timeout_ns)) {
                    lost |= 1u << s;
                    break;
                }
            }
        if (lost) ptx::atom_or<ptx::Sem::relaxed, ptx::Scope::sys>(reinterpret_cast<uint32_t*>(static_cast<char*>(p.peers[p.rank]) + p.status_offset) + which, lost);
        missing = lost != 0;
    }
    __syncthreads();
    return missing == 0;
}

// Zero this rank's counters `which` (the previous call's waits on them are done: stream order).
__device__ __forceinline__ void ll_reset(const MoeLlParams& p, int which) {
    if (blockIdx.x == 0 && threadIdx.x < p.ranks) ptx::st_relaxed<ptx::Scope::sys>(ll_counter(p, p.rank, which) + threadIdx.x, 0ull);
}

// x's row quantised per 1 x kScaleGroup group into every non-null packed row dst[j] (codes
// at 0, scales at scale_offset): each group once, stored at every destination. Every
// thread runs the same rounds (the team shuffles need whole warps).
template <typename T, int VEC, int BLOCK>
__device__ __forceinline__ void ll_quantize_row(const MoeLlParams& p, const T* x, char* const* dst, int64_t n) {
    quantize_row_by_groups<kScaleGroup, VEC, BLOCK>(x, p.hidden, p.min_amax, [&](const auto& team, int64_t g,
                                                                                 const auto& q, float scale) {
        for (int64_t j = 0; j < n; ++j) {
            if (dst[j] == nullptr) continue;
            store_group_codes<TokenGroupTeam<kScaleGroup, VEC, BLOCK>, VEC>(
                team, g, q, scale, reinterpret_cast<__nv_fp8_storage_t*>(dst[j]),
                reinterpret_cast<float*>(dst[j] + p.scale_offset), p.hidden);
        }
    });
}

template <typename T, bool QUANT, int VEC, int BLOCK>
__device__ __forceinline__ void moe_ll_dispatch_send(const MoeLlParams& p, int32_t* scratch) {
    ll_reset(p, 1);   // this rank's combine counters, for this call's combine
    const int64_t k = p.topk;
    const int64_t row_bytes = p.hidden * int64_t(sizeof(T));
    for (int64_t t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        const int64_t* row = p.topk_idx + t * k;
        char* dst[kLlMaxTopk];
        int64_t slot[kLlMaxTopk];
        bool any = false;
        for (int64_t j = 0; j < k; ++j) {   // block-uniform: every thread reads the same row
            const int64_t first = ll_first_slot(row, j, p.num_experts);
            dst[j] = nullptr;
            if (first != j) {   // no expert (-1), or a duplicate taking its first slot's row
                slot[j] = first < 0 ? -1 : slot[first];
                continue;
            }
            const int64_t e = row[j];
            int32_t before = 0;
            for (int64_t u = threadIdx.x; u < t; u += BLOCK) before += ll_names(p.topk_idx + u * k, k, e);
            const int64_t pos = ll_block_sum<BLOCK>(before, scratch);
            slot[j] = e * p.max_tokens + pos;
            const int64_t local = e % p.per;
            dst[j] = static_cast<char*>(p.peers[e / p.per]) + p.dispatch_region +
                     ((local * p.ranks + p.rank) * p.max_tokens + pos) * p.row_stride;
            any = true;
        }
        if (threadIdx.x == 0)
            for (int64_t j = 0; j < k; ++j) p.slot_index[t * k + j] = slot[j];
        if constexpr (QUANT) {
            if (any) ll_quantize_row<T, VEC, BLOCK>(p, static_cast<const T*>(p.x) + t * p.hidden, dst, k);
        } else {
            for (int64_t j = 0; j < k; ++j)
                if (dst[j] != nullptr)
                    copy_bytes<LlChunk, BLOCK, true>(dst[j], static_cast<const char*>(p.x) + t * row_bytes, row_bytes);
        }
    }
    // counts[e, rank] at e's owner, for experts blockIdx.x, +G, ...: tokens naming e.
    for (int64_t e = blockIdx.x; e < p.num_experts; e += gridDim.x) {
        int32_t n = 0;
        for (int64_t u = threadIdx.x; u < p.tokens; u += BLOCK) n += ll_names(p.topk_idx + u * k, k, e);
        n = ll_block_sum<BLOCK>(n, scratch);
        if (threadIdx.x == 0)
            reinterpret_cast<int32_t*>(static_cast<char*>(p.peers[e / p.per]) + p.counts_region)[(e % p.per) * p.ranks + p.rank] = n;
    }
    ll_signal(p, 0);
}

// Work items (expert e, source s, row i < counts[e, s]) in (e, s, i) order, item n to CTA
// n % G; fn(e, s, i, first) with first = the rows of e from sources before s.
template <typename Fn>
__device__ __forceinline__ void ll_for_rows(const MoeLlParams& p, const int32_t* counts, Fn fn) {
    int64_t item = 0;
    for (int64_t e = 0; e < p.per; ++e) {
        int64_t first = 0;
        for (int64_t s = 0; s < p.ranks; ++s) {
            const int64_t n = counts[e * p.ranks + s];
            for (int64_t i = (blockIdx.x + gridDim.x - item % gridDim.x) % gridDim.x; i < n; i += gridDim.x) fn(e, s, i, first);
            item += n;
            first += n;
        }
    }
}

template <typename T, bool QUANT, int BLOCK>
__device__ __forceinline__ void moe_ll_dispatch_recv(const MoeLlParams& p, int32_t& missing) {
    if (!ll_wait(p, 0, missing)) return;
    const char* mine = static_cast<const char*>(p.peers[p.rank]);
    const int32_t* counts = reinterpret_cast<const int32_t*>(mine + p.counts_region);
    const int64_t cap = p.ranks * p.max_tokens;
    const int64_t code_bytes = QUANT ? p.hidden : p.hidden * int64_t(sizeof(T));
    const int64_t scale_bytes = 4 * ((p.hidden + kScaleGroup - 1) / kScaleGroup);
    ll_for_rows(p, counts, [&](int64_t e, int64_t s, int64_t i, int64_t first) {
        const char* row = mine + p.dispatch_region + ((e * p.ranks + s) * p.max_tokens + i) * p.row_stride;
        const int64_t at = e * cap + first + i;
        copy_bytes<LlChunk, BLOCK, false>(static_cast<char*>(p.out) + at * code_bytes, row, code_bytes);
        if constexpr (QUANT)
            copy_bytes<LlScaleChunk, BLOCK, false>(reinterpret_cast<char*>(p.out_scales) + at * scale_bytes, row + p.scale_offset, scale_bytes);
    });
    if (blockIdx.x == 0) {
        for (int64_t c = threadIdx.x; c < p.per * p.ranks; c += BLOCK) p.recv_counts[c] = counts[c];
        for (int64_t e = threadIdx.x; e < p.per; e += BLOCK) {
            int32_t m = 0;
            for (int64_t s = 0; s < p.ranks; ++s) m += counts[e * p.ranks + s];
            p.masked_m[e] = m;
        }
    }
}

// SEND and RECV: the phases of this launch (both, or the send with a later receive hook).
template <typename T, bool QUANT, int VEC, int BLOCK, bool SEND, bool RECV>
__device__ __forceinline__ void moe_ll_dispatch(const MoeLlParams& p) {
    static_assert(SEND || RECV, "a launch runs at least one phase");
    int32_t* smem = fmo_moe_ll_smem;   // [BLOCK/32] block sums, then [1] the wait's flag
    if constexpr (SEND) moe_ll_dispatch_send<T, QUANT, VEC, BLOCK>(p, smem);
    if constexpr (RECV) moe_ll_dispatch_recv<T, QUANT, BLOCK>(p, smem[BLOCK / 32]);
}

template <typename T, int VEC, bool WEIGHTED, int BLOCK, bool SEND, bool RECV>
__device__ __forceinline__ void moe_ll_combine(const MoeLlParams& p) {
    static_assert(SEND || RECV, "a launch runs at least one phase");
    int32_t& missing = fmo_moe_ll_smem[0];   // the wait's flag
    const int64_t row_bytes = p.hidden * int64_t(sizeof(T));
    if constexpr (SEND) {
        ll_reset(p, 0);   // this rank's dispatch counters, for the next dispatch
        const int64_t cap = p.ranks * p.max_tokens;
        ll_for_rows(p, p.recv_counts, [&](int64_t e, int64_t s, int64_t i, int64_t first) {
            char* back = static_cast<char*>(p.peers[s]) + p.combine_region + ((p.rank * p.per + e) * p.max_tokens + i) * row_bytes;
            copy_bytes<LlChunk, BLOCK, true>(back, static_cast<const char*>(p.x) + (e * cap + first + i) * row_bytes, row_bytes);
        });
        ll_signal(p, 1);
    }
    if constexpr (RECV) {
        if (!ll_wait(p, 1, missing)) return;
        MoeGatherReduceParams q;
        q.y = static_cast<const char*>(p.peers[p.rank]) + p.combine_region;
        q.out = p.out;
        q.index = p.slot_index;
        q.weights = p.topk_weights;
        q.rows = p.tokens;
        q.hidden = p.hidden;
        q.fanin = p.topk;
        moe_gather_reduce<T, VEC, WEIGHTED, BLOCK, /*NC=*/false>(q);
    }
}

}  // namespace fmo
