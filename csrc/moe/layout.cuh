// MoE layout: per-bucket counts and exclusive positions of tokens routed by top-k indices.
//
// A bucket is a rank (dispatch: bucket = expert / experts_per_bucket) or a local expert
// (permute: experts_per_bucket = 1). For topk_idx [T, k] int64 in [-1, B * experts_per_bucket):
//   ONCE  (dispatch): counts[b] = tokens with any slot in bucket b;
//                     pos[t, b] ([T, B]) = that token's rank among them (ascending t), or -1.
//   !ONCE (permute):  counts[b] = (token, slot) pairs in bucket b;
//                     pos[t, j] ([T, k]) = the pair's rank among bucket b's pairs (ascending
//                     t, then j), or -1 where topk_idx[t, j] == -1.
// The send positions of dispatch and the sorted rows of permute are these positions plus
// a prefix sum of counts (taken on the host: B values).
//
// Roles: one CTA per bucket (grid = B), BLOCK threads; the CTA walks the tokens in chunks
// of BLOCK, one token per thread: the thread counts its token's slots in the bucket, a
// block-wide exclusive scan (warp shuffles, then the WARPS warp totals through shared
// memory) gives its position, and the running total carries to the next chunk.
// Every output element is written by exactly one thread (slots with -1 by CTA 0).
// Shared memory: WARPS * 8 bytes, dynamic (an `extern __shared__` array: the simulator gives
// each module its own copy of it, where a function-local one in an inline template could be
// bound to another module's). Constraints: BLOCK a multiple of 32, at most 1024.
#pragma once

#include "csrc/common/types.cuh"

extern __shared__ __align__(16) int64_t fmo_moe_layout_smem[];

namespace fmo {

struct MoeLayoutParams {
    const int64_t* topk_idx;     // [tokens, topk]
    int64_t* counts;             // [num_buckets]
    int64_t* pos;                // ONCE: [tokens, num_buckets]; else [tokens, topk]
    int64_t tokens;
    int64_t topk;
    int64_t num_buckets;
    int64_t experts_per_bucket;
};

template <bool ONCE, int BLOCK>
__device__ __forceinline__ void moe_bucket_layout(const MoeLayoutParams& p) {
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "BLOCK must be whole warps, at most 1024 threads");
    constexpr int WARPS = BLOCK / 32;
    int64_t* warp_totals = fmo_moe_layout_smem;  // [WARPS]

    const int64_t bucket = blockIdx.x;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    int64_t running = 0;  // tokens (pairs) of this bucket in earlier chunks

    for (int64_t base = 0; base < p.tokens; base += BLOCK) {
        const int64_t t = base + threadIdx.x;
        const int64_t* row = p.topk_idx + t * p.topk;
        int64_t mine = 0;
        if (t < p.tokens) {
            for (int64_t j = 0; j < p.topk; ++j) {
                const int64_t e = row[j];
                mine += (e >= 0 && e / p.experts_per_bucket == bucket) ? 1 : 0;
            }
            if (ONCE) mine = mine > 0 ? 1 : 0;
        }
        // Inclusive warp scan; lanes past the last token contribute 0.
        int64_t incl = mine;
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
            const int64_t v = __shfl_up_sync(0xffffffffu, incl, offset);
            if (lane >= offset) incl += v;
        }
        if (lane == 31) warp_totals[warp] = incl;
        __syncthreads();
        // WARPS <= 32 values: every thread sums them (a broadcast read) instead of a second scan.
        int64_t before = 0, chunk_total = 0;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const int64_t v = warp_totals[w];
            before += w < warp ? v : 0;
            chunk_total += v;
        }
        const int64_t first = running + before + incl - mine;  // exclusive position
        if (t < p.tokens) {
            if (ONCE) {
                p.pos[t * p.num_buckets + bucket] = mine ? first : -1;
            } else {
                int64_t seen = 0;
                for (int64_t j = 0; j < p.topk; ++j) {
                    const int64_t e = row[j];
                    if (e >= 0 && e / p.experts_per_bucket == bucket) p.pos[t * p.topk + j] = first + seen++;
                    else if (e < 0 && bucket == 0) p.pos[t * p.topk + j] = -1;
                }
            }
        }
        running += chunk_total;
        __syncthreads();  // warp_totals is rewritten by the next chunk
    }
    if (threadIdx.x == 0) p.counts[bucket] = running;
}

}  // namespace fmo
