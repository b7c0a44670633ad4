// ptx/tensor_core_numerics.cuh: the arithmetic of one tensor-core dot-add step, bit for bit as
// Hopper (sm_90, measured on an H200) computes it; used by the emulations of ptx/mma.cuh and
// ptx/wgmma.cuh. Simulator builds only: on the GPU the instruction itself does this.
//
// One step computes d = c + sum_k a_k * b_k (c fp32, a_k and b_k in an input format) as a
// single fused addition of all the terms, not as a chain of fp32 adds:
//   1. each term is written as significand x 2^exponent; a product's exponent is the sum of its
//      factors' exponents, each factor's exponent clamped at its format's minimum (a subnormal
//      keeps the minimum and a significand below 1); c's exponent is clamped at fp32's -126;
//   2. with emax the largest exponent among the nonzero terms, every term is truncated toward
//      zero to a multiple of 2^(emax - window_bits);
//   3. the truncated terms are added exactly;
//   4. the sum is normalised and truncated toward zero to out_fraction_bits fraction bits in
//      fp32's range (below 2^-126 the quantum stays 2^(-126 - out_fraction_bits); an exponent
//      above 127 is an infinity); an exact zero is +0.
// A NaN or infinite operand makes the result what the exact sum gives in IEEE arithmetic: NaN
// (0x7fffffff) or the infinity.
// The rules per instruction (window_bits, out_fraction_bits):
//   wgmma ... .e4m3/.e5m2 (QGMMA): one step over the 32 products of a k32 instruction and the
//     accumulator: (13, 13): the ~14 bits of accumulation DeepSeek-V3's report describes, the
//     reason FP8 GEMMs promote partial sums to fp32 registers every 128 K;
//   mma.sync m16n8k16 .bf16/.f16 (HMMA.16816): one step over 16 products and c: (25, 23);
//   mma.sync m16n8k32 .e4m3/.e5m2 on sm_90: ptxas lowers it to an exact unpack to f16, two
//     HMMA.16816 steps from 0 (k % 4 in {0, 1}, then k % 4 in {2, 3}) and an fp32 add of c
//     rounded to nearest (FADD): see mma.cuh.
// Where the rule comes from: fitted on the 222 launches captured on an H200 (tests/data/
// ptx_mma_gpu_capture.npz; tests/test_mma_capture_replay.py replays every one bit for bit), and
// the same algorithm as the published bit-accurate models (Xie et al., "MMA-Sim", arXiv
// 2511.10909; Khattak and Mikaitis, arXiv 2512.07004). sm_89's native fp8 mma.sync (QMMA) is
// not modelled: the simulator stands for the Hopper device the project is tested on.
#pragma once

#include "ptx/common.cuh"

#ifdef FMO_SIM
namespace fmo {
namespace ptx {
namespace sim_detail {

// Rounding of one dot-add step: bits kept below the largest term's exponent, and fraction bits
// kept in the normalised result.
struct DotAddRule {
  int window_bits;
  int out_fraction_bits;
};
constexpr DotAddRule kQgmmaRule{13, 13};  // wgmma fp8
constexpr DotAddRule kHmmaRule{25, 23};   // mma.sync / HMMA bf16, f16

// An input format's exponent floor and fraction width (value = integer significand x 2^(e - fraction_bits)).
struct OperandFormat {
  int min_exponent;
  int fraction_bits;
};
constexpr OperandFormat kE4M3Format{-6, 3};
constexpr OperandFormat kE5M2Format{-14, 2};
constexpr OperandFormat kF16Format{-14, 10};
constexpr OperandFormat kBF16Format{-126, 7};
constexpr OperandFormat kF32Format{-126, 23};

// A finite nonzero v of format f as significand x 2^(exponent - f.fraction_bits), the exponent
// clamped at the format's minimum (so a subnormal's significand is below 2^fraction_bits).
struct SplitValue {
  int64_t significand;  // signed, exact
  int exponent;
};
FMO_SIM_EMU SplitValue split_value(float v, OperandFormat f) {
  // Read straight from the fp32 bits (frexp / ldexp were a third of the simulator's time in
  // attention tests): |v| = m 2^p with m an integer of at most 24 bits.
  const uint32_t bits = bit_cast<uint32_t>(v);
  const uint32_t biased = (bits >> 23) & 0xffu, fraction = bits & 0x7fffffu;
  const int64_t m = biased ? static_cast<int64_t>(fraction | 0x800000u) : static_cast<int64_t>(fraction);
  const int p = (biased ? static_cast<int>(biased) : 1) - 150;
  const int floor_log2 = p + 63 - __builtin_clzll(static_cast<uint64_t>(m));  // v != 0: callers skip zeros
  const int exponent = floor_log2 > f.min_exponent ? floor_log2 : f.min_exponent;
  // v 2^(fraction_bits - exponent) truncated toward zero (exact for a value of format f).
  const int shift = p + f.fraction_bits - exponent;
  const int64_t magnitude = shift >= 0 ? m << shift : (-shift >= 64 ? 0 : m >> -shift);
  return SplitValue{bits >> 31 ? -magnitude : magnitude, exponent};
}

// |x| truncated to a multiple of 2^shift_right (shift_right may be negative: exact left shift).
FMO_SIM_EMU uint64_t shift_toward_zero(uint64_t magnitude, int shift_right) {
  if (shift_right <= 0) return magnitude << -shift_right;
  return shift_right >= 64 ? 0 : magnitude >> shift_right;
}

// Up to 32 operand values split once (split_value) for every dot-add that reads them: an
// emulated wgmma reads each row of A and column of B in many dot-adds (32 rows x N columns).
struct SplitVector {
  int64_t significand[32];  // 0 for a zero (no term)
  int exponent[32];
  bool finite;  // every value finite (else the dot-add takes the IEEE path on the floats)
};
FMO_SIM_EMU void split_vector(const float* v, int n, OperandFormat f, SplitVector& out) {
  out.finite = true;
  for (int k = 0; k < n; ++k) {
    if (!std::isfinite(v[k])) {
      out.finite = false;
      return;
    }
    const SplitValue s = v[k] == 0.0f ? SplitValue{0, 0} : split_value(v[k], f);
    out.significand[k] = s.significand, out.exponent[k] = s.exponent;
  }
}

// c + sum_{k < n} a[k] * b[k] under `rule` (top of file), n <= 32, with sa / sb = split_vector
// of a / b in the format `in` (a and b hold exact values of it). SA / SB: SplitVector or any type
// with the same fields (significand[], exponent[], finite) holding the same values, e.g. ptx/wgmma.cuh's
// WgmmaBColumn (3 bytes a value: every operand format's significand and exponent fit).
template <class SA, class SB>
FMO_SIM_EMU float fused_dot_add(const float* a, const SA& sa, const float* b, const SB& sb, int n, float c,
                                OperandFormat in, DotAddRule rule) {
  if (!(sa.finite && sb.finite && std::isfinite(c))) {  // IEEE on the exact terms decides NaN or the infinity
    double s = c;
    for (int k = 0; k < n; ++k) s += static_cast<double>(a[k]) * static_cast<double>(b[k]);
    return std::isnan(s) ? bit_cast<float>(0x7fffffffu) : static_cast<float>(s);
  }
  // The products first, branch-free (this loop is most of an emulated MMA's time): p_k = sa_k sb_k
  // exactly (a zero factor: p_k = 0, no term) and its alignment exponent e_k = ea_k + eb_k, the
  // exponent of its last bit e_k - 2 f. Truncated to the window's quantum emax - W, |p_k| becomes
  // |p_k| 2^(e_k - 2f - emax + W) toward zero = (|p_k| << L) >> (emax - e_k + 2f - W + L): with
  // L = W - 2f >= 0 (every rule and format here) the right shift is emax - e_k >= 0, and |p_k| << L
  // stays below 2^35 (|p_k| < 2^24), so a shift of 63 or more gives 0 as the exact truncation does.
  constexpr int kNoTerm = -(1 << 20);  // the exponent of a zero product: never emax, shifts to 0
  int64_t prod[32];
  int pexp[32];
  int emax = kNoTerm;
  for (int k = 0; k < n; ++k) {
    const int64_t p = int64_t(sa.significand[k]) * int64_t(sb.significand[k]);
    const int e = p != 0 ? int(sa.exponent[k]) + int(sb.exponent[k]) : kNoTerm;
    prod[k] = p, pexp[k] = e;
    emax = e > emax ? e : emax;
  }
  int64_t c_sig = 0;
  int c_exp = 0;
  if (c != 0.0f) {
    const SplitValue sc = split_value(c, kF32Format);
    c_sig = sc.significand, c_exp = sc.exponent;
    emax = c_exp > emax ? c_exp : emax;
  }
  if (emax == kNoTerm) return 0.0f;  // no term at all
  const int quantum = emax - rule.window_bits;  // exponent of the window's last bit
  const int lift = rule.window_bits - 2 * in.fraction_bits;  // L above
  static_assert(kQgmmaRule.window_bits >= 2 * kE5M2Format.fraction_bits &&
                    kQgmmaRule.window_bits >= 2 * kE4M3Format.fraction_bits &&
                    kHmmaRule.window_bits >= 2 * kF16Format.fraction_bits &&
                    kHmmaRule.window_bits >= 2 * kBF16Format.fraction_bits,
                "fused_dot_add: the product path needs window_bits >= 2 * fraction_bits");
  if (lift < 0) __builtin_trap();  // a new rule/format pair: see the static_assert
  // Each |term| < 2^(window + 3) quanta (a product's significand is below 4), 33 of them: the
  // sum fits an int64 for every window used here (<= 25 bits).
  int64_t sum = 0;
  for (int k = 0; k < n; ++k) {
    const int64_t p = prod[k];
    const uint64_t mag = static_cast<uint64_t>(p < 0 ? -p : p) << lift;
    const int d = emax - pexp[k];  // >= 0
    const uint64_t kept = mag >> (d < 63 ? d : 63);
    sum += p < 0 ? -static_cast<int64_t>(kept) : static_cast<int64_t>(kept);
  }
  if (c_sig != 0) {
    const uint64_t mag = shift_toward_zero(static_cast<uint64_t>(c_sig < 0 ? -c_sig : c_sig),
                                           quantum - (c_exp - kF32Format.fraction_bits));
    sum += c_sig < 0 ? -static_cast<int64_t>(mag) : static_cast<int64_t>(mag);
  }
  if (sum == 0) return 0.0f;
  const uint64_t mag = static_cast<uint64_t>(sum < 0 ? -sum : sum);
  const int lead = quantum + 63 - __builtin_clzll(mag);  // exponent of the sum's leading bit
  if (lead > 127) return sum < 0 ? -__builtin_inff() : __builtin_inff();
  const int out_quantum = (lead > -126 ? lead : -126) - rule.out_fraction_bits;
  const uint64_t kept = shift_toward_zero(mag, out_quantum - quantum);
  if (kept == 0) return 0.0f;
  // kept (<= 24 bits) times 2^out_quantum, out_quantum in [-149, 114]: both factors and the
  // product are exact fp32 values (2^out_quantum subnormal below -126).
  const float unit = out_quantum >= -126 ? bit_cast<float>(static_cast<uint32_t>(out_quantum + 127) << 23)
                                         : bit_cast<float>(1u << (out_quantum + 149));
  const float r = static_cast<float>(kept) * unit;
  return sum < 0 ? -r : r;
}

// The same for one pair of vectors read once.
FMO_SIM_EMU float fused_dot_add(const float* a, const float* b, int n, float c, OperandFormat in, DotAddRule rule) {
  SplitVector sa, sb;
  split_vector(a, n, in, sa);
  split_vector(b, n, in, sb);
  return fused_dot_add(a, sa, b, sb, n, c, in, rule);
}

}  // namespace sim_detail
}  // namespace ptx
}  // namespace fmo
#endif  // FMO_SIM
