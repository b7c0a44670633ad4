// Fused SwiGLU + FP8 (e4m3) quantisation per 1 x GROUP group: DeepSeek-V3's activation path
// between the expert MLP's two grouped GEMMs, in one pass over h.
//
// Computes, for h [rows, 2I] (bf16/fp16/fp32, row stride h_row_stride elements; gate = columns
// 0..I-1, up = columns I..2I-1, the row order of w13 in fastmoe_ops/nn/moe_experts.py):
//   a[r, c]  = silu(gate) * up = RN32(RN32(g / RN32(1 + expf(-g))) * u)     (fp32, never stored)
//   as[r, j] = scale(amax_finite(a[r, j*GROUP : (j+1)*GROUP]))              (fp32 [rows, I/GROUP])
//   aq[r, c] = q(a[r, c], as[r, c / GROUP])                                  (e4m3 [rows, I], contiguous)
// with scale() and q() exactly the quantisation contract of csrc/quant/fp8_scale.cuh (one
// definition of the scale math, shared with quantize_per_token_group): the result is
// bit-identical to quantize_per_token_group(a) of this very fp32 `a`.
//
// Why these roundings: every step is an IEEE operation (__fdiv_rn, __fadd_rn, __fmul_rn: no
// FMA contraction, no reciprocal multiply), so the only non-correctly-rounded step is expf
// (CUDA: at most 2 ulp; the simulator: the host libm). Relative error of `a` against the exact
// silu(g) * u: below 8 * 2^-24 while expf(-g) is finite (g > -88.7); beyond that expf(-g) = inf
// and a = -0 where the exact value is below 2^-120 in magnitude. tests/test_fp8_swiglu_quant.py
// derives its tolerance from this bound.
//
// Roles: a team of TEAM = min(32, GROUP/VEC) lanes owns one (row, group); each lane loads
// GROUP/(TEAM*VEC) chunks of VEC gate and VEC up elements (16-byte accesses when VEC*sizeof(T)
// == 16), the team reduces amax with xor-shuffles, lane 0 of the team writes the scale. Every
// element of h is read once, every output written once. No shared memory.
// Constraints (checked by the launcher): I % GROUP == 0 (no partial group), GROUP a multiple
// of 32, h and aq 16-byte aligned with I and h_row_stride multiples of VEC when VEC > 1.
#pragma once

#include "csrc/quant/fp8_quant.cuh"   // TokenGroupTeam; the scale contract (fp8_scale.cuh)

namespace fmo {

struct SwigluQuantParams {
    const void* h;         // [rows, 2 * inter] T, row stride h_row_stride elements
    void* out_q;           // aq [rows, inter] __nv_fp8_e4m3, contiguous
    float* out_s;          // as [rows, groups] fp32, contiguous
    int64_t rows;
    int64_t inter;         // I: columns of the output (a multiple of GROUP)
    int64_t h_row_stride;
    int64_t groups;        // inter / GROUP
    float min_amax;
    int32_t reserved;      // keeps the struct's size a multiple of 8 on every compiler
};

// silu(g) * u in fp32, each operation rounded once (see the header for the error bound).
__device__ __forceinline__ float silu_mul(float g, float u) {
    const float silu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
    return __fmul_rn(silu, u);
}

template <typename T, int GROUP, int VEC, bool POW2, int BLOCK>
__device__ __forceinline__ void swiglu_quant_token_group(const SwigluQuantParams& p) {
    using Team = TokenGroupTeam<GROUP, VEC, BLOCK>;
    constexpr int CHUNKS = Team::CHUNKS;
    const Team team(p.rows, p.groups);

    const T* gate = static_cast<const T*>(p.h) + team.row * p.h_row_stride;
    const T* up = gate + p.inter;
    float vals[CHUNKS][VEC];
    float amax = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        if (team.active) {  // inter % GROUP == 0: every column of an active group exists
            const Vec<T, VEC> g = load_vec<T, VEC>(gate + team.col(c));
            const Vec<T, VEC> u = load_vec<T, VEC>(up + team.col(c));
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                vals[c][i] = silu_mul(to_float(g.v[i]), to_float(u.v[i]));
                amax = fold_finite_amax(amax, vals[c][i]);
            }
        }
    }
    amax = Team::team_amax(amax);   // inactive teams take part with amax 0

    const float scale = fp8_scale_from_amax<POW2>(amax, p.min_amax);
    if (!team.active) return;

    auto* aq = reinterpret_cast<__nv_fp8_storage_t*>(p.out_q) + team.row * p.inter;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        Vec<__nv_fp8_storage_t, VEC> q;
#pragma unroll
        for (int i = 0; i < VEC; ++i) q.v[i] = fp8_quantize(vals[c][i], scale);
        store_vec<__nv_fp8_storage_t, VEC>(aq + team.col(c), q);
    }
    if (team.team_lane == 0) p.out_s[team.row * p.groups + team.col0 / GROUP] = scale;
}

}  // namespace fmo
