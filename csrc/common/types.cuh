// Element types and small vector helpers shared by every kernel.
//
// Kernels are written once for the GPU and the CPU SIMT simulator: the CUDA headers below
// compile for both (the simulator's prelude is force-included before this file on the CPU).
#pragma once

#include "ptx/common.cuh"  // fixed-width integer types under nvcc, NVRTC and the simulator
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace fmo {

// Largest finite e4m3 value (S.1111.110 = 1.75 * 2^8); the FP8 scale maps a group's amax here.
constexpr float kE4M3Max = 448.0f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// N elements of T moved as one aligned access (16 bytes at most: one LDG.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    static_assert((N & (N - 1)) == 0 && sizeof(T) * N <= 16, "Vec: N must be a power of two, at most 16 bytes");
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
    *reinterpret_cast<Vec<T, N>*>(p) = v;
}

}  // namespace fmo
