// The FP8 (e4m3) scale policy shared by every quantisation kernel (per token group, per
// block, transposed): one place for the amax, the scale and the conversion.
//
//   amax  = max |x| over the finite values of the group (NaN and +-inf are ignored)
//   scale = max(amax, min_amax) / 448, rounded up to a power of two when POW2 (UE8M0)
//   q     = e4m3_rn_satfinite(x / scale): +-inf saturates to +-448, NaN stays NaN
// min_amax > 0 gives an all-zero group a tiny positive scale instead of 0 (0/0 = NaN).
// The PyTorch mirror is fastmoe_ops/reference/fp8.py (group_scales, finite_abs, to_e4m3).
#pragma once

#include "csrc/common/types.cuh"

namespace fmo {

// Smallest power of two >= s, for a positive normal s (exact: bit manipulation, no log2).
__device__ __forceinline__ float round_up_pow2(float s) {
    uint32_t bits = __float_as_uint(s);
    if ((bits & 0x7fffffu) != 0) bits = (bits & 0xff800000u) + 0x00800000u;
    return __uint_as_float(bits & 0x7f800000u);
}

// amax = max(amax, |v|) for finite v; the comparison is false for NaN and +-inf.
__device__ __forceinline__ float fold_finite_amax(float amax, float v) {
    const float a = fabsf(v);
    return a <= 3.402823466e38f ? fmaxf(amax, a) : amax;
}

template <bool POW2>
__device__ __forceinline__ float fp8_scale_from_amax(float amax, float min_amax) {
    const float scale = fmaxf(amax, min_amax) / kE4M3Max;
    return POW2 ? round_up_pow2(scale) : scale;
}

// v / scale rounded to nearest even on the e4m3 grid, saturating (cvt.rn.satfinite).
__device__ __forceinline__ __nv_fp8_storage_t fp8_quantize(float v, float scale) {
    return __nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3);
}

}  // namespace fmo
