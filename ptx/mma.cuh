// ptx/mma.cuh: warp-level tensor-core MMA, mma.sync (PTX ISA, Warp Level Matrix
// Multiply-Accumulate Instructions, "mma").
//
//   D[16x8] = A[16xK] * B[Kx8] + C[16x8], f32 accumulate, A row-major, B column-major.
//   m16n8k16: A, B are bf16 or f16, 2 elements per .b32 register   (sm_80+)
//   m16n8k32: A, B are e4m3 or e5m2, 4 elements per .b32 register  (sm_89+)
//
// Fragment layouts (ISA "Matrix Fragments for mma.m16n8k16 with floating point type",
// "Matrix Fragments for mma.m16n8k32"), g = lane >> 2 (groupID),
// t = lane % 4 (threadID_in_group); element i of a fragment sits in register i / (elements
// per register), lower-indexed element in the lower bits:
//   16-bit A: a0..a7   row = g + 8 * ((i / 2) % 2)   col = 2t + (i % 2) + 8 * (i >= 4)
//   16-bit B: b0..b3   row = 2t + (i % 2) + 8 * (i >= 2)          col = g
//    8-bit A: a0..a15  row = g + 8 * ((i / 4) % 2)   col = 4t + (i % 4) + 16 * (i >= 8)
//    8-bit B: b0..b7   row = 4t + (i % 4) + 16 * (i >= 4)         col = g
//   f32 C/D:  c0..c3   row = g + 8 * (i >= 2)        col = 2t + (i % 2)
//
// Emulation (FMO_SIM): the warp's fragments are exchanged with fmo_sim::warp_allgather and
// every lane rebuilds A and B and computes its own four outputs with the arithmetic Hopper's
// tensor cores use (ptx/tensor_core_numerics.cuh, bit for bit as measured on an H200):
//   bf16, f16: one fused dot-add step over the 16 products and c (HMMA.16816: 25-bit window,
//     result truncated to fp32's 23 fraction bits);
//   e4m3, e5m2: what ptxas makes of the instruction on sm_90, which has no fp8 mma.sync: the
//     elements unpacked exactly to f16 (F2FP.F16.E4M3.UNPACK_B), one HMMA.16816 step from 0
//     over k % 4 in {0, 1} (each register's low half), a second over k % 4 in {2, 3}
//     accumulating the first, then c added in fp32 rounded to nearest even (FADD).
// sm_89's native fp8 mma.sync (QMMA) accumulates differently and is not what this models.
#pragma once

#include "ptx/common.cuh"
#include "ptx/tensor_core_numerics.cuh"

namespace fmo {
namespace ptx {

#ifdef FMO_SIM
namespace sim_detail {

// Element decoders: exact values of the 16- and 8-bit float formats.
FMO_SIM_EMU float decode_bf16(uint32_t bits) { return bit_cast<float>(bits << 16); }

FMO_SIM_EMU float decode_f16(uint32_t h) {  // IEEE binary16: 1-5-10, bias 15
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float mag;
  if (exp == 0)
    mag = static_cast<float>(man) * 0x1p-24f;  // subnormal: man * 2^-24, exact
  else if (exp == 31)
    mag = man ? bit_cast<float>(0x7fc00000u | (man << 13)) : __builtin_inff();
  else
    mag = bit_cast<float>(((exp - 15 + 127) << 23) | (man << 13));
  return sign ? -mag : mag;
}

// FP8 decoding by table: 256 exact values per format, built at compile time (constant
// initialisation: no guard, no start-up cost) from the format definitions:
//   E4M3 (OCP FP8): 1-4-3, bias 7, subnormals m * 2^-9, no infinities, S.1111.111 = NaN
//   E5M2 (OCP FP8): 1-5-2, bias 15, subnormals m * 2^-16, S.11111.00 = inf, S.11111.mm = NaN
constexpr float pow2(int e) {  // exact for the exponents used here
  float r = 1.0f;
  for (; e > 0; --e) r *= 2.0f;
  for (; e < 0; ++e) r *= 0.5f;
  return r;
}
constexpr float fp8_value(unsigned b, bool e4m3) {
  const unsigned mbits = e4m3 ? 3 : 2, ebits = e4m3 ? 4 : 5;
  const int bias = e4m3 ? 7 : 15;
  const unsigned sign = (b >> 7) & 1u, exp = (b >> mbits) & ((1u << ebits) - 1);
  const unsigned man = b & ((1u << mbits) - 1);
  float mag = 0.0f;
  if (e4m3 && exp == 15 && man == 7)
    mag = __builtin_nanf("");
  else if (!e4m3 && exp == 31)
    mag = man ? __builtin_nanf("") : __builtin_inff();
  else if (exp == 0)
    mag = static_cast<float>(man) * pow2(1 - bias - static_cast<int>(mbits));
  else
    mag = (1.0f + static_cast<float>(man) * pow2(-static_cast<int>(mbits))) *
          pow2(static_cast<int>(exp) - bias);
  return sign ? -mag : mag;
}
template <bool E4M3>
struct Fp8Table {
  float v[256];
  constexpr Fp8Table() : v() {
    for (unsigned b = 0; b < 256; ++b) v[b] = fp8_value(b, E4M3);
  }
};
inline constexpr Fp8Table<true> kE4M3{};
inline constexpr Fp8Table<false> kE5M2{};

FMO_SIM_EMU float decode_e4m3(uint32_t b) { return kE4M3.v[b & 0xffu]; }
FMO_SIM_EMU float decode_e5m2(uint32_t b) { return kE5M2.v[b & 0xffu]; }

enum class MmaInput { bf16, f16, e4m3, e5m2 };

template <MmaInput In>
struct MmaTraits {
  static constexpr bool k32 = (In == MmaInput::e4m3 || In == MmaInput::e5m2);
  static constexpr int K = k32 ? 32 : 16;
  static constexpr int bits = k32 ? 8 : 16;
  static constexpr OperandFormat format = In == MmaInput::bf16 ? kBF16Format
                                          : In == MmaInput::f16 ? kF16Format
                                          : In == MmaInput::e4m3 ? kE4M3Format
                                                                 : kE5M2Format;
  FMO_SIM_NOTSAN static float decode(uint32_t v) {
    if constexpr (In == MmaInput::bf16) return decode_bf16(v);
    if constexpr (In == MmaInput::f16) return decode_f16(v);
    if constexpr (In == MmaInput::e4m3) return decode_e4m3(v);
    if constexpr (In == MmaInput::e5m2) return decode_e5m2(v);
  }
  // ISA fragment layouts (see the table at the top of this file).
  static constexpr int a_row(int g, int i) { return k32 ? g + 8 * ((i / 4) % 2) : g + 8 * ((i / 2) % 2); }
  static constexpr int a_col(int t, int i) {
    return k32 ? 4 * t + (i % 4) + 16 * (i >= 8) : 2 * t + (i % 2) + 8 * (i >= 4);
  }
  static constexpr int b_row(int t, int i) {
    return k32 ? 4 * t + (i % 4) + 16 * (i >= 4) : 2 * t + (i % 2) + 8 * (i >= 2);
  }
};

struct MmaFragments {  // one lane's operands, as exchanged across the warp
  uint32_t a[4];
  uint32_t b[2];
};

template <MmaInput In>
FMO_SIM_EMU void mma_emulate(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                        const float (&c)[4]) {
  using Tr = MmaTraits<In>;
  constexpr int K = Tr::K, per_reg = 32 / Tr::bits;
  constexpr uint32_t elem_mask = (Tr::bits == 16) ? 0xffffu : 0xffu;
  MmaFragments mine, all[32];
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  fmo_sim::warp_allgather(0xffffffffu, &mine, all, sizeof(MmaFragments));

  const int lane = static_cast<int>(fmo_sim::lane_id());
  const int g = lane >> 2, t = lane & 3;
  // This lane's outputs are rows g and g+8, columns 2t and 2t+1. By the ISA's maps, rows g
  // and g+8 of A live in lanes 4g..4g+3 and column n of B in lanes 4n..4n+3 (groupID = the
  // row / column); gather just those, placing each element with the fragment maps.
  float arow[2][K], bcol[2][K];
  for (int st = 0; st < 4; ++st) {
    const MmaFragments& f = all[4 * g + st];
    for (int i = 0; i < 4 * per_reg; ++i) {
      const uint32_t v = (f.a[i / per_reg] >> (Tr::bits * (i % per_reg))) & elem_mask;
      arow[Tr::a_row(0, i) >= 8][Tr::a_col(st, i)] = Tr::decode(v);
    }
  }
  for (int j = 0; j < 2; ++j) {
    for (int st = 0; st < 4; ++st) {
      const MmaFragments& f = all[4 * (2 * t + j) + st];
      for (int i = 0; i < 2 * per_reg; ++i) {
        const uint32_t v = (f.b[i / per_reg] >> (Tr::bits * (i % per_reg))) & elem_mask;
        bcol[j][Tr::b_row(st, i)] = Tr::decode(v);
      }
    }
  }
  float out[4];
  SplitVector arow_split[2], bcol_split[2];   // each row and column split once for its two dot-adds
  if constexpr (!Tr::k32)
    for (int j = 0; j < 2; ++j) {
      split_vector(arow[j], K, Tr::format, arow_split[j]);
      split_vector(bcol[j], K, Tr::format, bcol_split[j]);
    }
  for (int i = 0; i < 4; ++i) {  // c_i: row g + 8 * (i >= 2), col 2t + (i % 2)
    const float* ar = arow[i >= 2];
    const float* bc = bcol[i % 2];
    if constexpr (Tr::k32) {  // sm_90's lowering: two f16 HMMA steps over interleaved k, then + c
      float a_half[16], b_half[16];
      float part = 0.0f;
      for (int half = 0; half < 2; ++half) {
        for (int j = 0; j < 16; ++j) {
          const int k = 4 * (j / 2) + 2 * half + j % 2;  // k % 4 in {0, 1}, then {2, 3}
          a_half[j] = ar[k];
          b_half[j] = bc[k];
        }
        part = fused_dot_add(a_half, b_half, 16, part, kF16Format, kHmmaRule);
      }
      out[i] = c[i] + part;
    } else {
      out[i] = fused_dot_add(ar, arow_split[i >= 2], bc, bcol_split[i % 2], K, c[i], Tr::format, kHmmaRule);
    }
  }
  std::memcpy(d, out, sizeof(out));  // d may alias c
}

}  // namespace sim_detail
#endif  // FMO_SIM

// d = a * b + c; a: 4 regs (8 bf16), b: 2 regs (4 bf16), c/d: 4 f32. d may alias c.
FMO_DEVICE void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                  const uint32_t (&b)[2], const float (&c)[4]) {
#ifdef FMO_SIM
  sim_detail::mma_emulate<sim_detail::MmaInput::bf16>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// d = a * b + c with f16 inputs (same fragment layout as bf16).
FMO_DEVICE void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                 const uint32_t (&b)[2], const float (&c)[4]) {
#ifdef FMO_SIM
  sim_detail::mma_emulate<sim_detail::MmaInput::f16>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// d = a * b + c; a: 4 regs (16 e4m3), b: 2 regs (8 e4m3). sm_89+.
FMO_DEVICE void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4],
                                  const uint32_t (&b)[2], const float (&c)[4]) {
#ifdef FMO_SIM
  sim_detail::mma_emulate<sim_detail::MmaInput::e4m3>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// d = a * b + c with e5m2 inputs. sm_89+.
FMO_DEVICE void mma_m16n8k32_e5m2(float (&d)[4], const uint32_t (&a)[4],
                                  const uint32_t (&b)[2], const float (&c)[4]) {
#ifdef FMO_SIM
  sim_detail::mma_emulate<sim_detail::MmaInput::e5m2>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e5m2.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

}  // namespace ptx
}  // namespace fmo
