// Masking and the online (streaming) softmax of FlashAttention-2, on a warp's m16 row tile:
// a thread holds rows g = lane / 4 and g + 8 (h = 0, 1), columns 2t, 2t + 1 of each n8 tile.
//
// Why exp2: the scores are scaled once by scale * log2(e) (folded into one FMA with the
// running max), and exp2 is the hardware's native MUFU.EX2; exp(x) would be a multiply plus
// the same EX2. lse is kept in the log2 domain and converted to a natural log on store.
#pragma once

#include "csrc/attention/params.cuh"

namespace fmo {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

FMO_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

// The masking rule, in one place: -inf for the score of query position qi and key kj when kj is
// at or past sk (zero-filled tile rows), qi is at or past sq (rows past the sequence: never
// stored), or, causal, kj is after qi's bottom-right-aligned diagonal. (It writes the score
// itself: as a bool function whose result the caller tests, the same rule cost the backward's
// dQ kernel registers, D 192 sm_80 230 -> 253.)
FMO_DEVICE void hide_key(float& score, int qi, int kj, bool causal, int sq, int sk) {
    const bool hidden = kj >= sk || qi >= sq || (causal && kj > qi + sk - sq);
    if (hidden) score = neg_inf();
}

// -inf for the scores a thread's two rows (h = 0, 1 at query positions qi[h]) may not see; col0:
// the key position of the tile's first column. Each row brings its own position, so the rows of
// one warp need not be consecutive (hopper_fwd.cuh's GQA-packed rows: position, head pairs).
template <int NT>
FMO_DEVICE void mask_rows(float (&s)[NT][4], bool causal, const int (&qi)[2], int col0, int sq, int sk) {
    const int t = int(threadIdx.x) % 4;
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            hide_key(s[ni][e], qi[e / 2], col0 + ni * 8 + 2 * t + e % 2, causal, sq, sk);
}

// A thread's two query positions when the warp tile's 16 rows are consecutive from row0.
FMO_DEVICE void consecutive_rows(int (&qi)[2], int row0) {
    const int g = int(threadIdx.x) % 32 / 4;
    qi[0] = row0 + g;
    qi[1] = row0 + g + 8;
}

// The backward's mask of a warp tile of consecutive rows: `row0`/`col0` the sequence positions of
// its first row and column. TRANSPOSED: rows are keys and columns queries (the dK/dV kernel's
// S^T), so the query position varies along a row and the rule applies per element.
template <int NT, bool TRANSPOSED = false>
FMO_DEVICE void apply_mask(float (&s)[NT][4], bool causal, int row0, int col0, int sq, int sk) {
    const int lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + g + 8 * (e / 2), col = col0 + ni * 8 + 2 * t + e % 2;
            hide_key(s[ni][e], TRANSPOSED ? col : row, TRANSPOSED ? row : col, causal, sq, sk);
        }
}

// Running state of two rows. m: max of the scaled scores (log2 domain), l: this thread's
// partial sum of exp2(score - m) (the quad's four partials are added in finish()).
struct OnlineSoftmax {
    float m[2], l[2];

    FMO_DEVICE OnlineSoftmax() {
        m[0] = m[1] = neg_inf();
        l[0] = l[1] = 0.0f;
    }

    // s: one key tile's raw scores (masked ones -inf) -> probabilities exp2(s * c - m);
    // o (the output accumulator) is rescaled by exp2(m_old - m_new).
    template <int NT, int DT>
    FMO_DEVICE void update(float (&s)[NT][4], float (&o)[DT][4], float scale_log2) {
        float alpha[2];
        scores(s, scale_log2, alpha);
        rescale(o, alpha);
    }

    // update() in two halves, for a kernel whose o is still being accumulated by an
    // asynchronous MMA while the next tile's scores are exponentiated (hopper_fwd.cuh):
    // scores() updates m and l and turns s into probabilities; alpha[h] = exp2(m_old - m_new)
    // is what o's row h must be multiplied by, by rescale(), once o is readable.
    template <int NT>
    FMO_DEVICE void scores(float (&s)[NT][4], float scale_log2, float (&alpha)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = neg_inf();
#pragma unroll
            for (int ni = 0; ni < NT; ++ni) mx = fmaxf(mx, fmaxf(s[ni][2 * h], s[ni][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the quad shares the row
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[h], mx * scale_log2);
            // A row that has seen only masked keys so far has m_new = -inf, and
            // exp2(-inf - (-inf)) would be NaN: subtract 0 instead, so every p is
            // exp2(-inf) = 0, alpha is 0 and the row stays empty (l = 0, o = 0).
            const float m_use = m_new == neg_inf() ? 0.0f : m_new;
            alpha[h] = exp2f(m[h] - m_use);  // m[h] = -inf -> 0
            float sum = 0.0f;
#pragma unroll
            for (int ni = 0; ni < NT; ++ni)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float pv = exp2f(fmaf(s[ni][2 * h + c], scale_log2, -m_use));
                    s[ni][2 * h + c] = pv;
                    sum += pv;
                }
            l[h] = l[h] * alpha[h] + sum;
            m[h] = m_new;
        }
    }

    template <int DT>
    FMO_DEVICE static void rescale(float (&o)[DT][4], const float (&alpha)[2]) {
#pragma unroll
        for (int di = 0; di < DT; ++di)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[di][e] *= alpha[e / 2];
    }

    // Totals over the quad; inv_l[h]: 1 / l (0 for a row that saw no key, whose output is
    // then 0), lse[h]: natural-log log-sum-exp of the scaled scores (-inf for such a row).
    FMO_DEVICE void finish(float (&inv_l)[2], float (&lse)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float tot = l[h];
            tot += __shfl_xor_sync(0xffffffffu, tot, 1);
            tot += __shfl_xor_sync(0xffffffffu, tot, 2);
            const bool empty = !(tot > 0.0f);
            inv_l[h] = empty ? 0.0f : 1.0f / tot;
            lse[h] = empty ? neg_inf() : (m[h] + log2f(tot)) * kLn2;
        }
    }
};

// Backward: P = exp2(s * c - lse * log2e) from the saved natural-log lse. A row with
// lse = -inf saw no key; all its scores are masked (-inf), and -inf - (-inf) would be NaN:
// use +inf instead, so p = exp2(-inf) = 0.
FMO_DEVICE float lse_log2_for_backward(float lse) { return lse == neg_inf() ? -neg_inf() : lse * kLog2e; }

}  // namespace attn
}  // namespace fmo
