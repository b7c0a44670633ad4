// Combine's fixed-order sum for the host transport (CPU tensors): a plain C++ loop, built
// at run time by fastmoe_ops.moe.host_native with the host compiler, called through ctypes.
//
// out[t, :] = sum over r = 0..R-1 ascending, skipping index[t, r] == -1, of row index[t, r] of
// rank r's rows, which start at address base[r] (the receive buffer for most ranks; this rank's
// own rows are read where they already are, in y, so they never cross MPI or get copied),
// accumulated in fp32 from +0 and rounded once to T (round to nearest even; NaN as PyTorch
// writes it). The same bits as the index_add_ formulation in fastmoe_ops/moe/host.py (and
// as moe_gather_reduce in csrc/moe/permute.cuh) in one pass: each token's accumulator row
// stays in L1 instead of three passes over an fp32 [T, H] buffer in memory.
//
// Why not PyTorch: there is no PyTorch op that adds a bf16 row into an fp32 accumulator
// without first materialising the converted rows. Plain adds only (no FMA, no fast-math),
// so vectorising over h cannot change any element's order of operations.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Bf16 {
    static float load(uint16_t v) {
        uint32_t u = uint32_t(v) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    static uint16_t store(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff;   // NaN: what PyTorch's CPU conversion writes
        return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
};

struct Fp16 {
    static float load(uint16_t v) {
        _Float16 h;
        std::memcpy(&h, &v, 2);
        return float(h);
    }
    static uint16_t store(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) & 0x8000u) | 0x7e00u;   // NaN: PyTorch's (sign kept)
        _Float16 h = _Float16(f);   // IEEE conversion: round to nearest even
        uint16_t v;
        std::memcpy(&v, &h, 2);
        return v;
    }
};

struct Fp32 {
    static float load(float v) { return v; }
    static float store(float f) { return f; }
};

// One build serves every x86-64 machine (no -march=native: the cache may be shared), yet
// the loop should use the widest vectors the running CPU has: the compiler clones it for
// AVX-512 and AVX2 and picks one at load time. Each lane still adds in the same order, so
// every clone gives the same bits (about 2x faster than SSE2 on a bf16 row sum).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FMO_WIDEST_VECTORS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FMO_WIDEST_VECTORS
#endif

template <typename Codec, typename T>
FMO_WIDEST_VECTORS void combine(const int64_t* base, const int64_t* index, T* out, int64_t tokens, int64_t ranks, int64_t hidden) {
    std::vector<float> acc(static_cast<size_t>(hidden));
    for (int64_t t = 0; t < tokens; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t r = 0; r < ranks; ++r) {
            const int64_t row = index[t * ranks + r];
            if (row < 0) continue;
            // Integer arithmetic: base[r] may point before rank r's first row (see host.py).
            const T* src = reinterpret_cast<const T*>(static_cast<uintptr_t>(base[r] + row * hidden * int64_t(sizeof(T))));
            for (int64_t h = 0; h < hidden; ++h) acc[h] += Codec::load(src[h]);
        }
        T* dst = out + t * hidden;
        for (int64_t h = 0; h < hidden; ++h) dst[h] = Codec::store(acc[h]);
    }
}

}  // namespace

// dtype: 1 bf16, 2 fp16, 3 fp32 (fastmoe_ops.moe.buffer's codes). Returns 0, or -1 for an
// unknown dtype.
// base: [ranks] addresses (row i of rank r's rows at base[r] + i * hidden * sizeof(element)).
extern "C" int fmo_host_combine(const int64_t* base, const int64_t* index, void* out, int64_t tokens, int64_t ranks,
                                int64_t hidden, int dtype) {
    switch (dtype) {
        case 1: combine<Bf16>(base, index, static_cast<uint16_t*>(out), tokens, ranks, hidden); return 0;
        case 2: combine<Fp16>(base, index, static_cast<uint16_t*>(out), tokens, ranks, hidden); return 0;
        case 3: combine<Fp32>(base, index, static_cast<float*>(out), tokens, ranks, hidden); return 0;
        default: return -1;
    }
}

// Dispatch's send layout for the host transport, in two passes over topk_idx [T, k]
// (the same result as the PyTorch formulation in fastmoe_ops/moe/host.py, which is what
// runs without a host compiler). Token t goes once to each rank owning one of its experts
// (rank = expert / per; -1: no expert). Writes counts [R] (tokens sent to each rank),
// pos [T, R] (the token's row among those sent to r, ascending token, or -1), index [T, R]
// (its row in the rank-major send order, or -1) and send_src [S] (the source token of each
// send row; S = sum(counts) <= T * R).
extern "C" void fmo_host_layout(const int64_t* topk_idx, int64_t tokens, int64_t k, int64_t ranks, int64_t per,
                                int64_t* counts, int64_t* pos, int64_t* index, int64_t* send_src) {
    for (int64_t r = 0; r < ranks; ++r) counts[r] = 0;
    for (int64_t t = 0; t < tokens; ++t) {
        int64_t* p = pos + t * ranks;
        for (int64_t r = 0; r < ranks; ++r) p[r] = -1;
        for (int64_t j = 0; j < k; ++j) {
            const int64_t e = topk_idx[t * k + j];
            if (e < 0) continue;
            const int64_t r = e / per;
            if (p[r] < 0) p[r] = counts[r]++;
        }
    }
    std::vector<int64_t> start(static_cast<size_t>(ranks), 0);
    for (int64_t r = 1; r < ranks; ++r) start[r] = start[r - 1] + counts[r - 1];
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t r = 0; r < ranks; ++r) {
            const int64_t p = pos[t * ranks + r];
            const int64_t row = p < 0 ? -1 : start[r] + p;
            index[t * ranks + r] = row;
            if (row >= 0) send_src[row] = t;
        }
    }
}

// Dispatch's last step on the receiver (CPU tensors), one pass instead of five tensor ops:
// idx [N, k] global expert ids (or -1) -> local_idx (id - first where first <= id < first +
// per, else -1), weights [N, k] -> local_w (the weight there, else +0; weights may be null),
// counts [per] += one per (row, slot) on each local expert. The same values as the PyTorch
// formulation in fastmoe_ops/moe/buffer.py.
extern "C" void fmo_host_localize(const int64_t* idx, const float* weights, int64_t rows, int64_t k, int64_t first,
                                  int64_t per, int64_t* local_idx, float* local_w, int64_t* counts) {
    for (int64_t e = 0; e < per; ++e) counts[e] = 0;
    for (int64_t i = 0; i < rows * k; ++i) {
        const int64_t e = idx[i] - first;
        const bool mine = idx[i] >= first && e < per;
        local_idx[i] = mine ? e : -1;
        if (weights) local_w[i] = mine ? weights[i] : 0.0f;
        if (mine) counts[e]++;
    }
}
