// Intra-node MoE dispatch/combine over peers' buffers (CUDA IPC on a GPU; POSIX shared
// memory between MPI processes in the simulator).
//
// Every rank owns one buffer, mapped by every peer: R dispatch counters, R combine counters
// (int64, monotonically increasing: no reset between calls), then a dispatch region of R
// slots x slot_rows packed rows (slot s holds what rank s sent here), then a combine region
// of rows coming back (in this rank's send order).
//
// moe_ipc_dispatch: (1) send: CTA c takes tokens c, c+G, ...; for each destination r with
//   send_pos[t, r] >= 0 it writes the token's packed row (up to 4 streams: x, FP8 scales,
//   topk ids, weights, each at a 16-byte aligned offset) into slot `rank` of r's dispatch
//   region. (2) signal: bar.sync, then thread 0 makes the CTA's writes visible system-wide
//   (fence.acq_rel.sys; cumulative over the barrier) and adds 1 to its counter at every
//   destination (red.release.sys). (3) wait: thread 0 spins with ld.acquire.sys until every
//   source's counter here reaches `expected` (= calls so far x G), bar.sync. (4) receive:
//   the CTAs copy the received rows out of the slots into the contiguous outputs, ordered
//   by source rank, then by token.
// moe_ipc_dispatch_fp8: the same, but stream 0 of the source is x [tokens, hidden] (bf16 /
//   fp16 / fp32) and the send phase quantises each row once, per 1 x 128 group (the contract
//   of csrc/quant/fp8_scale.cuh, bit for bit quantize_per_token_group), writing the e4m3
//   codes as stream 0 and the fp32 scales as stream 1 of the packed row at every
//   destination: a team of 128/VEC lanes per group, BLOCK/TEAM groups of a row at a time.
//   The packed row is the one an FP8 pair (xq, xs) dispatch sends, so receivers cannot tell.
// moe_ipc_combine: (1) each received row i from source s goes back to s's combine region
//   at row back_offset[s] + i, (2)-(3) as above with the combine counters, (4) the fixed
//   ascending-rank gather-reduce of this rank's combine region (moe_gather_reduce).
//
// Grid: exactly the communication SM budget (G persistent CTAs, all co-resident: the wait
// in (3) needs every CTA of every rank to reach (2)). No shared memory. Constraints: at
// most kMaxRanks ranks; rows, offsets, strides and pointers multiples of sizeof(Chunk).
#pragma once

#include "csrc/common/types.cuh"
#include "csrc/moe/permute.cuh"
#include "csrc/quant/fp8_quant.cuh"
#include "ptx/barrier.cuh"
#include "ptx/ld_st.cuh"

namespace fmo {

constexpr int kMaxRanks = 8;
constexpr int kMaxStreams = 4;

struct MoeIpcParams {
    void* peers[kMaxRanks];              // every rank's buffer base, mapped here (own one at [rank])
    const void* src[kMaxStreams];        // dispatch: stream rows on this rank; combine: y
    void* out[kMaxStreams];              // dispatch: receive outputs; combine: out [T, H]
    int64_t src_stride[kMaxStreams];     // bytes between source rows
    int64_t seg_bytes[kMaxStreams];      // bytes of a stream's row
    int64_t seg_offset[kMaxStreams];     // offset inside the packed row
    int64_t recv_counts[kMaxRanks];      // rows received from each source
    int64_t back_offset[kMaxRanks];      // combine: this rank's first row in source s's send order
    const int64_t* send_pos;             // dispatch: [tokens, ranks] row in the destination slot or -1
    const int64_t* combine_index;        // combine: [tokens, ranks] row of the combine region or -1
    int64_t tokens;
    int64_t rank;
    int64_t ranks;
    int64_t num_streams;
    int64_t row_stride;                  // bytes of a packed row
    int64_t slot_rows;                   // rows per source slot
    int64_t dispatch_region;             // byte offsets inside each buffer
    int64_t combine_region;
    int64_t expected;                    // counter value that completes this call
    int64_t hidden;                      // combine: elements per row; dispatch_fp8: of x
    // Static mode only (csrc/moe/ipc_static.cuh: counts exchanged on the device):
    const int64_t* topk_idx;             // dispatch: [tokens, topk], range-checked on the device (or null)
    const int64_t* send_counts;          // dispatch: [ranks] rows this rank sends each destination
    int64_t* matrix;                     // [ranks, ranks] rows src -> dst: dispatch writes it, combine reads it
    int64_t topk;
    int64_t num_experts;
    int64_t num_worst;                   // dispatch: rows of every output (padding past the received ones)
    int64_t fill_stream;                 // dispatch: the stream whose padding rows are all-ones bytes (ids -1), or -1
    int64_t static_region;               // byte offset of the static-mode words in each buffer
    int64_t timeout_ns;                  // waits give up after this long (FMO_COMM_TIMEOUT)
    float min_amax;                      // dispatch_fp8: eps of the quantisation contract
    int32_t reserved;                    // keeps the struct's size a multiple of 8
};

constexpr int kScaleGroup = 128;         // dispatch_fp8: one scale per 1 x 128 group

// NC: the source is read-only during the kernel (this rank's payloads); the receive
// regions are written by peers' kernels running concurrently and need coherent loads.
template <typename Chunk, int BLOCK, bool NC>
__device__ __forceinline__ void copy_bytes(void* dst, const void* src, int64_t bytes) {
    Chunk* d = static_cast<Chunk*>(dst);
    const Chunk* s = static_cast<const Chunk*>(src);
    for (int64_t c = threadIdx.x; c < bytes / int64_t(sizeof(Chunk)); c += BLOCK) store_stream(d + c, load_stream<Chunk, NC>(s + c));
}

// (2) + (3): publish this CTA's writes to every peer's counter `which`, then wait for all.
template <int BLOCK>
__device__ __forceinline__ void signal_and_wait(const MoeIpcParams& p, int which) {
    __syncthreads();
    if (threadIdx.x == 0) {
        ptx::fence_acq_rel<ptx::Scope::sys>();
        for (int64_t r = 0; r < p.ranks; ++r) {
            auto* counters = static_cast<unsigned long long*>(p.peers[r]) + which * p.ranks;
            ptx::red_add<ptx::Sem::release, ptx::Scope::sys>(counters + p.rank, 1ull);
        }
        const auto* mine = static_cast<const unsigned long long*>(p.peers[p.rank]) + which * p.ranks;
        for (int64_t s = 0; s < p.ranks; ++s)
            while (ptx::ld_acquire<ptx::Scope::sys>(mine + s) < static_cast<unsigned long long>(p.expected)) {
            }
    }
    __syncthreads();
}

// Token t's packed row in slot `rank` of destination r's dispatch region, or null when t
// does not go to r, or would land past the slot (static mode: an overflow the kernel reports
// instead of the host refusing it first; never a write outside the buffer).
__device__ __forceinline__ char* dispatch_row(const MoeIpcParams& p, int64_t t, int64_t r) {
    const int64_t pos = p.send_pos[t * p.ranks + r];
    return pos < 0 || pos >= p.slot_rows ? nullptr
                   : static_cast<char*>(p.peers[r]) + p.dispatch_region + (p.rank * p.slot_rows + pos) * p.row_stride;
}

// (1) of dispatch_fp8 for token t: x's row quantised per 1 x kScaleGroup group into streams
// 0 (codes) and 1 (scales) of its packed row at every destination. Every thread of the
// block runs the same number of rounds (the team shuffles need whole warps).
template <typename T, int VEC, int BLOCK>
__device__ __forceinline__ void quantize_row_to_peers(const MoeIpcParams& p, int64_t t) {
    bool sent = false;   // block-uniform: every thread reads the same send_pos row
    for (int64_t r = 0; r < p.ranks; ++r) sent = sent || p.send_pos[t * p.ranks + r] >= 0;
    if (!sent) return;   // a token with no expert anywhere: nothing to quantise
    const T* x = reinterpret_cast<const T*>(static_cast<const char*>(p.src[0]) + t * p.src_stride[0]);
    quantize_row_by_groups<kScaleGroup, VEC, BLOCK>(x, p.hidden, p.min_amax, [&](const auto& team, int64_t g,
                                                                                 const auto& q, float scale) {
        for (int64_t r = 0; r < p.ranks; ++r) {
            char* row = dispatch_row(p, t, r);
            if (row == nullptr) continue;
            store_group_codes<TokenGroupTeam<kScaleGroup, VEC, BLOCK>, VEC>(
                team, g, q, scale, reinterpret_cast<__nv_fp8_storage_t*>(row + p.seg_offset[0]),
                reinterpret_cast<float*>(row + p.seg_offset[1]), p.hidden);
        }
    });
}

// (1) send: packed rows into slot `rank` of each destination; with QUANT, streams 0 and 1
// come from quantize_row_to_peers and the copies start at stream 2.
template <typename Chunk, int BLOCK, bool QUANT, typename T = float, int VEC = 1>
__device__ __forceinline__ void moe_ipc_dispatch_send(const MoeIpcParams& p) {
    for (int64_t t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        if constexpr (QUANT) quantize_row_to_peers<T, VEC, BLOCK>(p, t);
        for (int64_t r = 0; r < p.ranks; ++r) {
            char* row = dispatch_row(p, t, r);
            if (row == nullptr) continue;
            for (int64_t s = QUANT ? 2 : 0; s < p.num_streams; ++s)
                copy_bytes<Chunk, BLOCK, true>(row + p.seg_offset[s], static_cast<const char*>(p.src[s]) + t * p.src_stride[s], p.seg_bytes[s]);
        }
    }
}

// (4) receive: slot s row i -> output row (rows from earlier sources) + i.
template <typename Chunk, int BLOCK>
__device__ __forceinline__ void moe_ipc_dispatch_receive(const MoeIpcParams& p) {
    int64_t first = 0;
    for (int64_t s = 0; s < p.ranks; ++s) {
        for (int64_t i = blockIdx.x; i < p.recv_counts[s]; i += gridDim.x) {
            const char* row = static_cast<const char*>(p.peers[p.rank]) + p.dispatch_region + (s * p.slot_rows + i) * p.row_stride;
            for (int64_t k = 0; k < p.num_streams; ++k)
                copy_bytes<Chunk, BLOCK, false>(static_cast<char*>(p.out[k]) + (first + i) * p.seg_bytes[k], row + p.seg_offset[k], p.seg_bytes[k]);
        }
        first += p.recv_counts[s];
    }
}

template <typename Chunk, int BLOCK>
__device__ __forceinline__ void moe_ipc_dispatch(const MoeIpcParams& p) {
    moe_ipc_dispatch_send<Chunk, BLOCK, false>(p);
    signal_and_wait<BLOCK>(p, 0);
    moe_ipc_dispatch_receive<Chunk, BLOCK>(p);
}

template <typename T, int VEC, typename Chunk, int BLOCK>
__device__ __forceinline__ void moe_ipc_dispatch_fp8(const MoeIpcParams& p) {
    moe_ipc_dispatch_send<Chunk, BLOCK, true, T, VEC>(p);
    signal_and_wait<BLOCK>(p, 0);
    moe_ipc_dispatch_receive<Chunk, BLOCK>(p);
}
template <typename T, typename Chunk, int VEC, int BLOCK>
__device__ __forceinline__ void moe_ipc_combine(const MoeIpcParams& p) {
    // (1) received row i from source s -> row back_offset[s] + i of s's combine region.
    int64_t first = 0;
    for (int64_t s = 0; s < p.ranks; ++s) {
        char* region = static_cast<char*>(p.peers[s]) + p.combine_region;
        for (int64_t i = blockIdx.x; i < p.recv_counts[s]; i += gridDim.x)
            copy_bytes<Chunk, BLOCK, true>(region + (p.back_offset[s] + i) * p.row_stride,
                                     static_cast<const char*>(p.src[0]) + (first + i) * p.src_stride[0], p.seg_bytes[0]);
        first += p.recv_counts[s];
    }
    signal_and_wait<BLOCK>(p, 1);
    // (4) out[t] = ascending-rank sum of the rows that came back for t.
    MoeGatherReduceParams q;
    q.y = static_cast<const char*>(p.peers[p.rank]) + p.combine_region;
    q.out = p.out[0];
    q.index = p.combine_index;
    q.weights = nullptr;
    q.rows = p.tokens;
    q.hidden = p.hidden;
    q.fanin = p.ranks;
    moe_gather_reduce<T, VEC, false, BLOCK, /*NC=*/false>(q);
}

}  // namespace fmo
