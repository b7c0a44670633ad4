// Static-shape (num_worst_tokens) intra-node dispatch/combine: the kernels of csrc/moe/ipc.cuh
// with every count exchanged on the device, so a call needs no host handshake and no host
// read (capturable in a CUDA graph; a replay repeats the same launches).
//
// Static-mode words of every buffer (byte offset static_region, after the dynamic counters):
//   ready [R] u64: static calls each source has started here (one +1 per call, from its CTA 0);
//   data  [R] u64: CTAs of each source done sending here (G per call);
//   seq   u64:     static calls this rank has completed (its CTA 0 adds 1 at the end);
//   status [kIpcStatusWords] u32: bitmasks over ranks (kIpcLost ... kIpcWorstOverflow);
//   matrix [R, R] i64: rows src -> dst, row s written by source s into every peer.
// Counters only grow and targets derive from seq, a device word: no host state, no reset.
//
// A call (dispatch or combine; every rank makes the same sequence of calls):
//   (0) arrive: CTA 0 adds 1 to ready[rank] at every peer (this rank's earlier kernels are
//       done, stream order: its regions are free for the peers' writes of this call); every
//       CTA waits until ready[s] >= seq + 1 for every source s before writing anything into
//       a peer's buffer.
//   dispatch (1) check and publish: ids of this rank's topk_idx outside [-1, E) set bit rank
//       of status[kIpcBadIdx] at every peer, a destination sent more than slot_rows rows sets
//       it in status[kIpcSlotOverflow]; CTA 0 writes send_counts into row `rank` of every
//       peer's matrix. (2) send rows as ipc.cuh does (past slot_rows: not sent). (3) signal
//       data, wait until data[s] >= (seq + 1) * G. (4) receive: every CTA reads the matrix:
//       rank r receives sum_s matrix[s, r]; any rank over num_worst sets status[kIpcWorstOverflow]
//       (so every rank finds every error, alike); rows of source s land at the prefix of the
//       counts from sources before s; rows past the received ones (all of them after any
//       error) are padding: zero bytes, all-ones bytes in fill_stream (ids -1). CTA 0 copies
//       the matrix out (zeros after an error) for combine, and stores seq + 1.
//   combine (1) received row i of source s (y row prefix_s + i) goes to s's combine region at
//       row sum_{c < rank} matrix[s, c] + i. (3) signal, wait. (4) the fixed ascending-rank
//       gather-reduce of ipc.cuh.
// A wait that gives up after timeout_ns records the missing sources in status[kIpcLost] and
// the CTA returns: the launcher reports CommTimeoutError (no rank hangs on a peer that never
// came). Status bits stay set until the host reads and clears them (the `sim` engine right
// after the kernel; on CUDA, check()); while an error bit is set every dispatch receives
// padding only, so an unread error is never a silent partial answer.
//
// Grid: G = the communication SM budget, co-resident (the waits need every CTA of every
// rank). No shared memory. Constraints: those of ipc.cuh.
#pragma once

#include "csrc/moe/ipc.cuh"
#include "ptx/timer.cuh"

namespace fmo {

constexpr int kIpcLost = 0;            // sources a wait gave up on (this rank only)
constexpr int kIpcBadIdx = 1;          // sources whose topk_idx holds ids outside [-1, E)
constexpr int kIpcSlotOverflow = 2;    // sources sending one peer more than slot_rows rows
constexpr int kIpcWorstOverflow = 3;   // ranks receiving more than num_worst rows
constexpr int kIpcStatusWords = 4;

struct IpcStaticWords {
    unsigned long long* ready;
    unsigned long long* data;
    unsigned long long* seq;
    uint32_t* status;
    int64_t* matrix;
};

__device__ __forceinline__ IpcStaticWords ipc_static_words(const MoeIpcParams& p, int64_t r) {
    IpcStaticWords w;
    char* base = static_cast<char*>(p.peers[r]) + p.static_region;
    w.ready = reinterpret_cast<unsigned long long*>(base);
    w.data = w.ready + p.ranks;
    w.seq = w.data + p.ranks;
    w.status = reinterpret_cast<uint32_t*>(w.seq + 1);
    w.matrix = reinterpret_cast<int64_t*>(w.status + kIpcStatusWords);
    return w;
}

// Set bit `rank` of status word `word` at every peer.
__device__ __forceinline__ void ipc_flag_everywhere(const MoeIpcParams& p, int word) {
    for (int64_t r = 0; r < p.ranks; ++r)
        ptx::atom_or<ptx::Sem::relaxed, ptx::Scope::sys>(ipc_static_words(p, r).status + word, 1u << p.rank);
}

// Thread 0 waits until counters[s] >= target for every source s, giving up after timeout_ns
// (the sources that never came go to status[kIpcLost]). Block-uniform: false when any CTA of
// this rank gave up (every thread reads the word after the barrier).
__device__ __forceinline__ bool ipc_static_wait(const MoeIpcParams& p, const unsigned long long* counters,
                                                unsigned long long target) {
    const IpcStaticWords mine = ipc_static_words(p, p.rank);
    if (threadIdx.x == 0) {
        const uint64_t start = ptx::globaltimer();
        uint32_t lost = 0;
        for (int64_t s = 0; s < p.ranks; ++s)
            while (ptx::ld_acquire<ptx::Scope::sys>(counters + s) < target) {
                if (ptx::globaltimer() - start > static_cast<uint64_t>(p.timeout_ns)) {
                    lost |= 1u << s;
                    break;
                }
            }
        if (lost) ptx::atom_or<ptx::Sem::relaxed, ptx::Scope::sys>(mine.status + kIpcLost, lost);
    }
    __syncthreads();
    return ptx::ld_relaxed<ptx::Scope::sys>(mine.status + kIpcLost) == 0;
}

// (0) arrive; returns false when a peer never arrived. seq: this rank's completed static calls.
__device__ __forceinline__ bool ipc_static_arrive(const MoeIpcParams& p, unsigned long long seq) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        ptx::fence_acq_rel<ptx::Scope::sys>();   // this rank's earlier reads of its regions, before peers may write
        for (int64_t r = 0; r < p.ranks; ++r)
            ptx::red_add<ptx::Sem::release, ptx::Scope::sys>(ipc_static_words(p, r).ready + p.rank, 1ull);
    }
    return ipc_static_wait(p, ipc_static_words(p, p.rank).ready, seq + 1);
}

// (3) publish this CTA's writes (rows, counts, status bits), +1 on data[rank] at every peer,
// then wait for every source's G signals of this call.
__device__ __forceinline__ bool ipc_static_signal_and_wait(const MoeIpcParams& p, unsigned long long seq) {
    __syncthreads();
    if (threadIdx.x == 0) {
        ptx::fence_acq_rel<ptx::Scope::sys>();   // cumulative over the barrier: every thread's stores
        for (int64_t r = 0; r < p.ranks; ++r)
            ptx::red_add<ptx::Sem::release, ptx::Scope::sys>(ipc_static_words(p, r).data + p.rank, 1ull);
    }
    return ipc_static_wait(p, ipc_static_words(p, p.rank).data, (seq + 1) * static_cast<unsigned long long>(gridDim.x));
}

// This call's end on this rank: every CTA of it has read seq (they all signalled before the
// waits passed), so CTA 0 may advance it for the next call.
__device__ __forceinline__ void ipc_static_finish(const MoeIpcParams& p, unsigned long long seq) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *ipc_static_words(p, p.rank).seq = seq + 1;
}

// dispatch (1): the device-side checks of this rank's input and its counts row at every peer.
template <int BLOCK>
__device__ __forceinline__ void ipc_static_publish(const MoeIpcParams& p) {
    if (p.topk_idx != nullptr) {
        bool bad = false;
        for (int64_t i = blockIdx.x * int64_t(BLOCK) + threadIdx.x; i < p.tokens * p.topk; i += gridDim.x * int64_t(BLOCK)) {
            const int64_t e = p.topk_idx[i];
            bad = bad || e < -1 || e >= p.num_experts;
        }
        if (bad) ipc_flag_everywhere(p, kIpcBadIdx);
    }
    if (blockIdx.x == 0 && threadIdx.x < p.ranks) {
        const int64_t n = p.send_counts[threadIdx.x];
        for (int64_t r = 0; r < p.ranks; ++r) ipc_static_words(p, r).matrix[p.rank * p.ranks + threadIdx.x] = n;
        if (n > p.slot_rows) ipc_flag_everywhere(p, kIpcSlotOverflow);
    }
}

// Fill `bytes` at dst with `byte` (padding rows): 4-byte stores where dst and bytes allow.
template <int BLOCK>
__device__ __forceinline__ void ipc_fill_bytes(char* dst, int64_t bytes, unsigned char byte) {
    if ((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(bytes)) % 4 == 0) {
        const uint32_t word = byte * 0x01010101u;
        for (int64_t c = threadIdx.x; c < bytes / 4; c += BLOCK) reinterpret_cast<uint32_t*>(dst)[c] = word;
        return;
    }
    for (int64_t c = threadIdx.x; c < bytes; c += BLOCK) dst[c] = static_cast<char>(byte);
}

// dispatch (4): every output row i < num_worst, received or padding.
template <typename Chunk, int BLOCK>
__device__ __forceinline__ void ipc_static_receive(const MoeIpcParams& p, unsigned long long seq) {
    const IpcStaticWords mine = ipc_static_words(p, p.rank);
    const uint32_t refused = ptx::ld_relaxed<ptx::Scope::sys>(mine.status + kIpcBadIdx) |
                             ptx::ld_relaxed<ptx::Scope::sys>(mine.status + kIpcSlotOverflow);
    uint32_t worst = 0;   // every rank's receive total, from the same matrix on every rank
    for (int64_t r = 0; r < p.ranks; ++r) {
        int64_t total = 0;
        for (int64_t s = 0; s < p.ranks; ++s) total += mine.matrix[s * p.ranks + r];
        if (total > p.num_worst) worst |= 1u << r;
    }
    const bool failed = refused != 0 || worst != 0 ||
                        ptx::ld_relaxed<ptx::Scope::sys>(mine.status + kIpcWorstOverflow) != 0;   // an unread earlier error
    int64_t first[kMaxRanks + 1];
    first[0] = 0;
    for (int64_t s = 0; s < p.ranks; ++s) first[s + 1] = first[s] + (failed ? 0 : mine.matrix[s * p.ranks + p.rank]);
    for (int64_t i = blockIdx.x; i < p.num_worst; i += gridDim.x) {
        if (i < first[p.ranks]) {
            int64_t s = 0;
            while (i >= first[s + 1]) ++s;
            const char* row = static_cast<const char*>(p.peers[p.rank]) + p.dispatch_region +
                              (s * p.slot_rows + i - first[s]) * p.row_stride;
            for (int64_t k = 0; k < p.num_streams; ++k)
                copy_bytes<Chunk, BLOCK, false>(static_cast<char*>(p.out[k]) + i * p.seg_bytes[k], row + p.seg_offset[k], p.seg_bytes[k]);
        } else {
            for (int64_t k = 0; k < p.num_streams; ++k)
                ipc_fill_bytes<BLOCK>(static_cast<char*>(p.out[k]) + i * p.seg_bytes[k], p.seg_bytes[k], k == p.fill_stream ? 0xff : 0);
        }
    }
    if (blockIdx.x == 0) {
        for (int64_t c = threadIdx.x; c < p.ranks * p.ranks; c += BLOCK) p.matrix[c] = failed ? 0 : mine.matrix[c];
        if (threadIdx.x == 0 && worst) ptx::atom_or<ptx::Sem::relaxed, ptx::Scope::sys>(mine.status + kIpcWorstOverflow, worst);
    }
    ipc_static_finish(p, seq);
}

template <typename Chunk, int BLOCK, bool QUANT, typename T = float, int VEC = 1>
__device__ __forceinline__ void moe_ipc_static_dispatch(const MoeIpcParams& p) {
    const unsigned long long seq = ptx::ld_relaxed<ptx::Scope::sys>(ipc_static_words(p, p.rank).seq);
    if (!ipc_static_arrive(p, seq)) return;
    ipc_static_publish<BLOCK>(p);
    moe_ipc_dispatch_send<Chunk, BLOCK, QUANT, T, VEC>(p);
    if (!ipc_static_signal_and_wait(p, seq)) return;
    ipc_static_receive<Chunk, BLOCK>(p, seq);
}

template <typename T, typename Chunk, int VEC, int BLOCK>
__device__ __forceinline__ void moe_ipc_static_combine(const MoeIpcParams& p) {
    const unsigned long long seq = ptx::ld_relaxed<ptx::Scope::sys>(ipc_static_words(p, p.rank).seq);
    if (!ipc_static_arrive(p, seq)) return;
    // (1) p.matrix: the dispatch's counts (this rank's memory, written by that dispatch).
    int64_t first = 0;
    for (int64_t s = 0; s < p.ranks; ++s) {
        const int64_t n = p.matrix[s * p.ranks + p.rank];
        int64_t back = 0;
        for (int64_t c = 0; c < p.rank; ++c) back += p.matrix[s * p.ranks + c];
        char* region = static_cast<char*>(p.peers[s]) + p.combine_region;
        for (int64_t i = blockIdx.x; i < n; i += gridDim.x)
            copy_bytes<Chunk, BLOCK, true>(region + (back + i) * p.row_stride,
                                           static_cast<const char*>(p.src[0]) + (first + i) * p.src_stride[0], p.seg_bytes[0]);
        first += n;
    }
    if (!ipc_static_signal_and_wait(p, seq)) return;
    MoeGatherReduceParams q;
    q.y = static_cast<const char*>(p.peers[p.rank]) + p.combine_region;
    q.out = p.out[0];
    q.index = p.combine_index;
    q.weights = nullptr;
    q.rows = p.tokens;
    q.hidden = p.hidden;
    q.fanin = p.ranks;
    moe_gather_reduce<T, VEC, false, BLOCK, /*NC=*/false>(q);
    ipc_static_finish(p, seq);
}

}  // namespace fmo
