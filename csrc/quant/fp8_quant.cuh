// FP8 (e4m3) quantisation per 1 x GROUP group of a row (DeepSeek-V3's activation recipe).
//
// Computes, for x [rows, cols] (bf16/fp16/fp32, row stride x_row_stride elements):
//   xs[r, g] = scale(amax_finite(x[r, g*GROUP : (g+1)*GROUP]))                  (fp32)
//   xq[r, c] = q(x[r, c], xs[r, c / GROUP])                                      (contiguous)
// so that x ~= xq * xs, with scale() and q() exactly as the contract in
// csrc/quant/fp8_scale.cuh defines them (amax ignores NaN and +-inf, min_amax floors an
// all-zero group, POW2 = UE8M0 scales, +-inf saturates to +-448, NaN gives 0x7f).
//
// Roles: a team of TEAM = min(32, GROUP/VEC) lanes owns one group; each lane loads
// GROUP/(TEAM*VEC) chunks of VEC contiguous elements (one 16-byte access when VEC*sizeof(T)
// == 16), the team reduces amax with xor-shuffles, lane 0 of the team writes the scale.
// One pass over x: every element is read once, written once. No shared memory.
// Constraints: GROUP is a multiple of 32, cols % VEC == 0 and x/xq 16-byte aligned when
// VEC > 1 (the launcher picks VEC = 1 otherwise). Scale policy: csrc/quant/fp8_scale.cuh.
#pragma once

#include "csrc/quant/fp8_scale.cuh"

namespace fmo {

struct Fp8GroupQuantParams {
    const void* x;         // [rows, cols] T, row stride x_row_stride elements
    void* xq;              // [rows, cols] __nv_fp8_e4m3, contiguous
    float* xs;             // [rows, groups] fp32, contiguous
    int64_t rows;
    int64_t cols;
    int64_t x_row_stride;
    int64_t groups;        // ceil(cols / GROUP)
    float min_amax;
    int32_t reserved;      // keeps the struct's size a multiple of 8 on every compiler
};

// Which (row, group) a lane's team owns, for a team of TEAM = min(32, GROUP/VEC) lanes per
// 1 x GROUP group of a [rows, groups * GROUP] output: shared by the per-token-group quantisers
// (fp8_quant_token_group below, swiglu_quant_token_group in csrc/quant/swiglu_quant.cuh).
template <int GROUP, int VEC, int BLOCK>
struct TokenGroupTeam {
    static_assert(GROUP % 32 == 0, "GROUP must be a multiple of 32");
    static constexpr int TEAM = (GROUP / VEC) < 32 ? (GROUP / VEC) : 32;
    static constexpr int CHUNKS = GROUP / (TEAM * VEC);   // VEC-wide chunks per lane
    static_assert(CHUNKS * TEAM * VEC == GROUP, "GROUP must split evenly into TEAM lanes x VEC elements");
    static_assert(BLOCK % 32 == 0 && BLOCK % TEAM == 0, "BLOCK must be whole warps of whole teams");

    int team_lane;
    bool active;     // whole teams are active or not
    int64_t row;     // 0 for inactive teams, which still join the shuffles of team_amax
    int64_t col0;    // the group's first column

    // Team (blockIdx.x * BLOCK/TEAM + threadIdx.x / TEAM) of a grid over rows x groups.
    __device__ __forceinline__ TokenGroupTeam(int64_t rows, int64_t groups) {
        team_lane = threadIdx.x % TEAM;
        const int64_t group = int64_t(blockIdx.x) * (BLOCK / TEAM) + threadIdx.x / TEAM;
        active = group < rows * groups;
        row = active ? group / groups : 0;
        col0 = active ? (group % groups) * GROUP : 0;
    }

    // A team placed by its caller (csrc/moe/ipc.cuh walks a row's groups in rounds).
    __device__ __forceinline__ TokenGroupTeam(int lane, int64_t first_col, bool is_active)
        : team_lane(lane), active(is_active), row(0), col0(is_active ? first_col : 0) {}

    // First column of this lane's chunk c.
    __device__ __forceinline__ int64_t col(int c) const { return col0 + (int64_t(c) * TEAM + team_lane) * VEC; }

    // This lane's elements of the group in x_row (cols wide), widened to fp32 (0 past cols
    // or when inactive); returns their finite amax (fold_finite_amax), before team_amax.
    template <typename T>
    __device__ __forceinline__ float load(const T* x_row, int64_t cols, float (&vals)[CHUNKS][VEC]) const {
        float amax = 0.0f;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            if (active && col(c) < cols) {  // VEC > 1 implies cols % VEC == 0: all or none
                const Vec<T, VEC> v = load_vec<T, VEC>(x_row + col(c));
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    vals[c][i] = to_float(v.v[i]);
                    amax = fold_finite_amax(amax, vals[c][i]);
                }
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) vals[c][i] = 0.0f;
            }
        }
        return amax;
    }

    // max over the team's lanes by xor-shuffles: every lane of the warp must call it
    // (full-mask collectives), inactive teams with a neutral amax.
    __device__ __forceinline__ static float team_amax(float amax) {
#pragma unroll
        for (int offset = TEAM / 2; offset > 0; offset /= 2)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        return amax;
    }
};

// One row of `cols` elements quantised per 1 x GROUP group by the whole block, in rounds of
// BLOCK / TEAM groups (every thread runs every round: the team shuffles need whole warps).
// For each group, store(team, group, codes, scale) is called by its team's lanes with their
// chunks' e4m3 codes: the caller writes them wherever the row goes (one or several places).
// Used by the dispatch kernels that quantise while sending (csrc/moe/ipc.cuh, low_latency.cuh).
template <int GROUP, int VEC, int BLOCK, typename T, typename Store>
__device__ __forceinline__ void quantize_row_by_groups(const T* x, int64_t cols, float min_amax, Store&& store) {
    using Team = TokenGroupTeam<GROUP, VEC, BLOCK>;
    constexpr int CHUNKS = Team::CHUNKS;
    constexpr int TEAMS = BLOCK / Team::TEAM;
    const int lane = threadIdx.x % Team::TEAM;
    const int64_t groups = (cols + GROUP - 1) / GROUP;
    for (int64_t g0 = 0; g0 < groups; g0 += TEAMS) {
        const int64_t g = g0 + threadIdx.x / Team::TEAM;
        const Team team(lane, g * GROUP, g < groups);
        float vals[CHUNKS][VEC];
        const float amax = Team::team_amax(team.load(x, cols, vals));
        if (!team.active) continue;
        const float scale = fp8_scale_from_amax<false>(amax, min_amax);
        Vec<__nv_fp8_storage_t, VEC> q[CHUNKS];
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) q[c].v[i] = fp8_quantize(vals[c][i], scale);
        store(team, g, q, scale);
    }
}

// The codes of one team's chunks written into a row of e4m3 codes (cols wide) and the group's
// scale into its fp32 scales (by the team's lane 0): the store of quantize_row_by_groups.
template <typename Team, int VEC>
__device__ __forceinline__ void store_group_codes(const Team& team, int64_t group,
                                                  const Vec<__nv_fp8_storage_t, VEC> (&q)[Team::CHUNKS], float scale,
                                                  __nv_fp8_storage_t* codes, float* scales, int64_t cols) {
#pragma unroll
    for (int c = 0; c < Team::CHUNKS; ++c)
        if (team.col(c) < cols) store_vec<__nv_fp8_storage_t, VEC>(codes + team.col(c), q[c]);
    if (team.team_lane == 0) scales[group] = scale;
}

template <typename T, int GROUP, int VEC, bool POW2, int BLOCK>
__device__ __forceinline__ void fp8_quant_token_group(const Fp8GroupQuantParams& p) {
    using Team = TokenGroupTeam<GROUP, VEC, BLOCK>;
    constexpr int CHUNKS = Team::CHUNKS;
    const Team team(p.rows, p.groups);
    const int64_t row = team.row;

    float vals[CHUNKS][VEC];
    const float amax = Team::team_amax(team.load(static_cast<const T*>(p.x) + row * p.x_row_stride, p.cols, vals));

    const float scale = fp8_scale_from_amax<POW2>(amax, p.min_amax);
    if (!team.active) return;

    __nv_fp8_e4m3* xq = static_cast<__nv_fp8_e4m3*>(p.xq) + row * p.cols;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int64_t col = team.col(c);
        if (col < p.cols) {
            Vec<__nv_fp8_storage_t, VEC> q;
#pragma unroll
            for (int i = 0; i < VEC; ++i)
                q.v[i] = fp8_quantize(vals[c][i], scale);
            store_vec<__nv_fp8_storage_t, VEC>(reinterpret_cast<__nv_fp8_storage_t*>(xq) + col, q);
        }
    }
    if (team.team_lane == 0) p.xs[row * p.groups + team.col0 / GROUP] = scale;
}

}  // namespace fmo
