// Run-time parameters of every fused-attention kernel (forward, backward delta/dQ/dK-dV),
// and the per-sequence view that makes dense batches and packed (varlen) sequences one case.
//
// Tensors are row-indexed: a row is one token, [rows, H, D] with row stride `*_row_stride`
// elements and head stride D (the launcher makes the last two dims contiguous). Dense
// [B, S, H, D] is the packed layout with cu_seqlens = {0, S, 2S, ...} implied.
// lse and delta (fp32) of query row i of sequence b, head h live at
//   b * lse_batch_stride + h * lse_head_stride + (varlen ? cu_seqlens_q[b] + i : i)
// (dense: [B, Hq, Sq]; varlen: [Hq, total_q]).
#pragma once

#include "csrc/common/types.cuh"
#include "ptx/common.cuh"

// Dynamic shared memory of every attention kernel. C linkage at file scope: one plain
// symbol, which the simulator aliases to its dynamic buffer like any `extern __shared__`.
// 1024-aligned: the Hopper kernel's 128B-swizzled TMA boxes and wgmma operands repeat every
// 1024 bytes on absolute address bits (hopper_fwd.cuh).
extern "C" {
extern __shared__ __align__(1024) uint8_t fmo_attn_smem[];
}

namespace fmo {

struct AttnParams {
    const void* q;              // [rows_q, Hq, Dqk]
    const void* k;              // [rows_k, Hkv, Dqk]
    const void* v;              // [rows_k, Hkv, Dv]
    void* o;                    // [rows_q, Hq, Dv]      forward out; backward in
    float* lse;                 // see above             forward out; backward in
    const void* dout;           // [rows_q, Hq, Dv]      backward
    float* delta;               // like lse: rowsum(dout * o), backward
    void* dq;                   // [rows_q, Hq, Dqk]
    void* dk;                   // [rows_k, Hkv, Dqk]
    void* dv;                   // [rows_k, Hkv, Dv]
    const int32_t* cu_seqlens_q;  // [batch + 1] or null (dense)
    const int32_t* cu_seqlens_k;  // [batch + 1] or null (dense)
    int64_t batch;
    int64_t seqlen_q;           // dense: Sq; varlen: max_seqlen_q (sizes the grid only)
    int64_t seqlen_k;           // dense: Sk; varlen: max_seqlen_k
    int64_t rows_q;             // total query rows (dense: B * Sq)
    int64_t heads_q;
    int64_t heads_kv;
    int64_t q_row_stride;       // elements; also dq's
    int64_t k_row_stride;       // also dk's
    int64_t v_row_stride;       // also dv's
    int64_t o_row_stride;       // also dout's
    int64_t lse_batch_stride;
    int64_t lse_head_stride;
    float softmax_scale;        // applied to q . k
    float scale_log2;           // softmax_scale * log2(e): scores go straight to exp2
};

namespace attn {

// One sequence of the batch: where its rows start and how many there are.
struct SeqView {
    int64_t q_start, k_start;
    int sq, sk;
    int64_t lse_base;  // lse/delta offset of (b, h = 0, i = 0)
};

FMO_DEVICE SeqView sequence(const AttnParams& p, int64_t b) {
    SeqView s;
    if (p.cu_seqlens_q != nullptr) {
        s.q_start = p.cu_seqlens_q[b];
        s.k_start = p.cu_seqlens_k[b];
        s.sq = int(p.cu_seqlens_q[b + 1] - s.q_start);
        s.sk = int(p.cu_seqlens_k[b + 1] - s.k_start);
        s.lse_base = s.q_start;
    } else {
        s.q_start = b * p.seqlen_q;
        s.k_start = b * p.seqlen_k;
        s.sq = int(p.seqlen_q);
        s.sk = int(p.seqlen_k);
        s.lse_base = b * p.lse_batch_stride;
    }
    return s;
}

// Keys [0, n_end) that some query row of [m0, m0 + rows) may see (bottom-right causal:
// row i sees j <= i + sk - sq). Key tiles at or past n_end are skipped, never loaded.
FMO_DEVICE int causal_key_end(bool causal, int m0, int rows, int sq, int sk) {
    if (!causal) return sk;
    const int last_row = (m0 + rows < sq ? m0 + rows : sq) - 1;
    const int end = last_row + sk - sq + 1;
    return end < 0 ? 0 : (end < sk ? end : sk);
}

}  // namespace attn
}  // namespace fmo
