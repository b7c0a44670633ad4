// The FP8 (e4m3) quantisation contract: the one definition that every quantisation kernel
// (per token group, per block, transposed) and the PyTorch reference
// (fastmoe_ops/reference/fp8.py) implement bit for bit, on a GPU and on the CPU.
//
//   x      every element widened to fp32 (exact for bf16, fp16 and fp32 inputs)
//   amax   max |x| over the group's finite elements; NaN and +-inf are ignored, 0 if none
//          (exact: a maximum rounds nothing, so the reduction order cannot matter)
//   m      fp32(eps), rounded to nearest; the launchers require 448 * 2^-126 <= m <= FLT_MAX
//          so that every scale below is a positive normal fp32 number
//   scale  RN32(max(amax, m) / 448): the correctly rounded IEEE fp32 quotient. Not
//          amax * RN32(1/448), which differs in the last bit for about half of all amax.
//          POW2 (UE8M0): then the smallest power of two >= that fp32 scale (by its bits)
//   q      e4m3(RN32(x / scale)): the correctly rounded fp32 quotient, then rounded to
//          nearest even onto the e4m3 grid (3 mantissa bits, normals from 2^-6, subnormals in
//          steps of 2^-9): two roundings in a row, not one rounding of the exact quotient.
//          Magnitudes above 448, +-inf included, saturate to +-448 (0x7e / 0xfe: satfinite);
//          a zero keeps its sign (-0 and negative values rounding to zero give 0x80); NaN
//          gives 0x7f whatever its sign and payload.
//
// Each point is spelled out because it is where a GPU and a CPU implementation differ
// silently. The division is __fdiv_rn: IEEE whatever -prec-div or --use_fast_math say, and
// never a reciprocal multiply for the constant 448. PyTorch's CUDA `div` does multiply by the
// reciprocal when the divisor is a CPU scalar (ATen's BinaryDivTrueKernel.cu), so the
// reference divides by a tensor of the dividend's shape. NaN: GPU arithmetic returns a
// canonical NaN where the host keeps the operand's sign, and c10's e4m3 conversion keeps the
// sign (0xff), so the code is set explicitly on both sides. No a * b + c appears, so FMA
// contraction (nvcc's default -fmad=true) cannot change a bit; an fp32-subnormal quotient is
// far below half of e4m3's smallest step and gives +-0 with or without flush-to-zero.
// Tests: tests/test_fp8_quant_contract.py (sim and reference against an independent numpy
// derivation, on CPU) and tests/gpu/test_fp8_quant_contract_gpu.py (the same on CUDA).
#pragma once

#include "csrc/common/types.cuh"

namespace fmo {

// The e4m3 NaN code of the contract (S.1111.111 with S = 0).
constexpr __nv_fp8_storage_t kE4M3NaN = 0x7f;

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
    const float scale = __fdiv_rn(fmaxf(amax, min_amax), kE4M3Max);
    return POW2 ? round_up_pow2(scale) : scale;
}

// e4m3(RN32(v / scale)): cvt.rn.satfinite on the fp32 quotient; NaN pinned to kE4M3NaN
// (`q != q`: true only for NaN, and kept by every compiler without fast-math).
__device__ __forceinline__ __nv_fp8_storage_t fp8_quantize(float v, float scale) {
    const float q = __fdiv_rn(v, scale);
    return q != q ? kE4M3NaN : __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
}

}  // namespace fmo
