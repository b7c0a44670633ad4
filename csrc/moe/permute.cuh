// MoE row movement: gather (permute, dispatch's send packing) and gather-reduce (unpermute,
// combine's fixed-order sum).
//
// moe_gather_rows:   out[m, :] = src[index[m], :] as raw bytes, zeros where index[m] == -1.
//                    Dtype-agnostic (bf16, fp32, e4m3 payloads, fp32 scales, int64 ids).
// moe_gather_reduce: out[m, :] = sum over j = 0..J-1 ascending, skipping index[m, j] == -1,
//                    of w[m, j] * y[index[m, j], :] (w = 1 without WEIGHTED), accumulated in
//                    fp32 from 0 and rounded once to T. __fmul_rn/__fadd_rn forbid FMA
//                    contraction so the bits equal the PyTorch reference's (a rounded
//                    product, then a rounded sum) and are the same run to run.
//
// Roles: a CTA owns one output row at a time (grid-stride over rows); its BLOCK threads
// stride over the row in chunks of one vector (W bytes for the gather, VEC elements for the
// reduce): 16-byte accesses (LDG.128 / STG.128) when the launcher found rows, strides and
// pointers 16-byte aligned, narrower ones otherwise. Payloads are read once: ld.global.nc
// without L1 allocation, stores without L1 allocation. No shared memory.
#pragma once

#include "csrc/common/types.cuh"
#include "ptx/ld_st.cuh"

namespace fmo {

struct MoeGatherParams {
    const void* src;         // [src_rows, row_bytes], row stride src_stride bytes
    void* out;               // [rows, row_bytes] contiguous
    const int64_t* index;    // [rows] source row or -1
    int64_t rows;
    int64_t row_bytes;       // a multiple of sizeof(Chunk)
    int64_t src_stride;      // bytes, a multiple of sizeof(Chunk)
};

struct MoeGatherReduceParams {
    const void* y;           // [y_rows, hidden] T contiguous
    void* out;               // [rows, hidden] T contiguous
    const int64_t* index;    // [rows, fanin] row of y or -1
    const float* weights;    // [rows, fanin] fp32, read only when WEIGHTED
    int64_t rows;
    int64_t hidden;          // a multiple of VEC
    int64_t fanin;
};

// Streaming vector access: the ld/st wrappers move 4, 8 or 16 bytes; narrower chunks
// (2- or 1-byte rows) use plain accesses.
// NC: the data is read-only for the whole kernel (ld.global.nc); false for buffers that
// peers write while this kernel runs (the IPC regions), where only a coherent load is valid.
template <typename V, bool NC = true>
__device__ __forceinline__ V load_stream(const V* p) {
    if constexpr (sizeof(V) >= 4) {
        if constexpr (NC) return ptx::ld_nc_na(p);
        else return ptx::ld_global(p);
    } else {
        return *p;
    }
}

template <typename V>
__device__ __forceinline__ void store_stream(V* p, const V& v) {
    if constexpr (sizeof(V) >= 4) ptx::st_global_na(p, v);
    else *p = v;
}

template <typename E, int N, int BLOCK>
__device__ __forceinline__ void moe_gather_rows(const MoeGatherParams& p) {
    using Chunk = Vec<E, N>;
    static_assert(sizeof(Chunk) == 16 || sizeof(Chunk) == 8 || sizeof(Chunk) == 4 || sizeof(Chunk) == 2 || sizeof(Chunk) == 1,
                  "a chunk is 1, 2, 4, 8 or 16 bytes");
    const int64_t chunks = p.row_bytes / int64_t(sizeof(Chunk));
    for (int64_t m = blockIdx.x; m < p.rows; m += gridDim.x) {
        const int64_t src_row = p.index[m];
        Chunk* dst = reinterpret_cast<Chunk*>(static_cast<char*>(p.out) + m * p.row_bytes);
        if (src_row < 0) {
            Chunk zero;
#pragma unroll
            for (int i = 0; i < N; ++i) zero.v[i] = E(0);
            for (int64_t c = threadIdx.x; c < chunks; c += BLOCK) store_stream(dst + c, zero);
        } else {
            const Chunk* src = reinterpret_cast<const Chunk*>(static_cast<const char*>(p.src) + src_row * p.src_stride);
            for (int64_t c = threadIdx.x; c < chunks; c += BLOCK) store_stream(dst + c, load_stream(src + c));
        }
    }
}

__device__ __forceinline__ void from_float(float v, float& out) { out = v; }
__device__ __forceinline__ void from_float(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void from_float(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }

template <typename T, int VEC, bool WEIGHTED, int BLOCK, bool NC = true>
__device__ __forceinline__ void moe_gather_reduce(const MoeGatherReduceParams& p) {
    using Chunk = Vec<T, VEC>;
    const int64_t chunks = p.hidden / VEC;
    for (int64_t m = blockIdx.x; m < p.rows; m += gridDim.x) {
        const int64_t* idx = p.index + m * p.fanin;
        Chunk* dst = reinterpret_cast<Chunk*>(static_cast<T*>(p.out) + m * p.hidden);
        for (int64_t c = threadIdx.x; c < chunks; c += BLOCK) {
            float acc[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
            for (int64_t j = 0; j < p.fanin; ++j) {  // ascending j: the fixed summation order
                const int64_t r = idx[j];
                if (r < 0) continue;
                const Chunk v = load_stream<Chunk, NC>(reinterpret_cast<const Chunk*>(static_cast<const T*>(p.y) + r * p.hidden) + c);
                if (WEIGHTED) {
                    const float w = p.weights[m * p.fanin + j];
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, to_float(v.v[i])));
                } else {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], to_float(v.v[i]));
                }
            }
            Chunk o;
#pragma unroll
            for (int i = 0; i < VEC; ++i) from_float(acc[i], o.v[i]);
            store_stream(dst + c, o);
        }
    }
}

}  // namespace fmo
