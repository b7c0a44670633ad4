// ptx/ldmatrix.cuh: warp-collective 8x8 b16 matrix loads from shared memory,
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 (PTX ISA, Warp Level
// Matrix Multiply-Accumulate Instructions, "ldmatrix"), sm_75+.
//
// Addresses: lanes 8j .. 8j+7 each give the address of one 16-byte row (row = lane % 8) of
// matrix j (j < 1, 2, 4 for .x1, .x2, .x4); the other lanes' addresses are ignored. Each
// row must be in shared memory and 16-byte aligned.
// Result: register j of lane l holds two b16 elements of matrix j, lower bits first:
//   plain:  M_j[l / 4][2 (l % 4)],        M_j[l / 4][2 (l % 4) + 1]
//   .trans: M_j[2 (l % 4)][l / 4],        M_j[2 (l % 4) + 1][l / 4]
// i.e. exactly the A (x4) / B (x2) / C-shaped fragment layouts mma.m16n8k16 consumes.
//
// Emulation (FMO_SIM): the 32 row addresses are exchanged with fmo_sim::warp_allgather;
// each lane then reads its own 2 elements per matrix, through fmo_sim::check_access.
#pragma once

#include "ptx/common.cuh"

namespace fmo {
namespace ptx {

#ifdef FMO_SIM
namespace sim_detail {
template <int N, bool Trans>
FMO_SIM_EMU void ldmatrix_emulate(uint32_t* r, const void* row_addr) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix: .x1, .x2 or .x4");
  const unsigned char* addrs[32];
  const unsigned char* mine = static_cast<const unsigned char*>(row_addr);
  fmo_sim::warp_allgather(0xffffffffu, &mine, addrs, sizeof(mine));
  const unsigned lane = fmo_sim::lane_id();
  for (int i = 0; i < 8 * N; ++i) {  // validate the rows that are used, in every lane
    if (!fmo_sim::is_shared(addrs[i]))
      fmo_sim::fail("ldmatrix.x%d%s: lane %d's row address %p is not in shared memory", N,
                    Trans ? ".trans" : "", i, static_cast<const void*>(addrs[i]));
    require_aligned(addrs[i], 16, "ldmatrix row");
  }
  const unsigned g = lane >> 2, t = lane & 3;
  for (int j = 0; j < N; ++j) {
    uint16_t lo, hi;
    if (!Trans) {  // row g, columns 2t, 2t+1: one 4-byte word of that row
      const unsigned char* p = addrs[8 * j + g] + 4 * t;
      fmo_sim::check_access(p, 4, false);
      std::memcpy(&lo, p, 2);
      std::memcpy(&hi, p + 2, 2);
    } else {  // column g of rows 2t and 2t+1
      const unsigned char* p0 = addrs[8 * j + 2 * t] + 2 * g;
      const unsigned char* p1 = addrs[8 * j + 2 * t + 1] + 2 * g;
      fmo_sim::check_access(p0, 2, false);
      fmo_sim::check_access(p1, 2, false);
      std::memcpy(&lo, p0, 2);
      std::memcpy(&hi, p1, 2);
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}
}  // namespace sim_detail
#endif  // FMO_SIM

// One 8x8 matrix; lanes 0-7 give the row addresses.
FMO_DEVICE void ldmatrix_x1(uint32_t& r0, const void* smem_row) {
#ifdef FMO_SIM
  sim_detail::ldmatrix_emulate<1, false>(&r0, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(smem_addr(smem_row)));
#endif
}

// Two 8x8 matrices; lanes 0-15 give the row addresses.
FMO_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
#ifdef FMO_SIM
  sim_detail::ldmatrix_emulate<2, false>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
#endif
}

// Four 8x8 matrices; all 32 lanes give row addresses.
FMO_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef FMO_SIM
  sim_detail::ldmatrix_emulate<4, false>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
#endif
}

// Transposed forms: lane l receives column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1.
FMO_DEVICE void ldmatrix_x1_trans(uint32_t& r0, const void* smem_row) {
#ifdef FMO_SIM
  sim_detail::ldmatrix_emulate<1, true>(&r0, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(smem_addr(smem_row)));
#endif
}

FMO_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
#ifdef FMO_SIM
  sim_detail::ldmatrix_emulate<2, true>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
#endif
}

FMO_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef FMO_SIM
  sim_detail::ldmatrix_emulate<4, true>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
#endif
}

#ifdef FMO_SIM
namespace sim_detail {
// stmatrix.x4: lane l's register j holds row l / 4, columns 2 (l % 4), +1 of matrix j; lanes
// 8j..8j+7 give matrix j's row addresses. Each lane writes the row whose address it gave
// (16 bytes), assembled from the four lanes holding it (.trans: the column of that index).
template <bool Trans>
FMO_SIM_EMU void stmatrix_x4_emulate(void* row_addr, const uint32_t (&r)[4]) {
  struct Mine {
    unsigned char* addr;
    uint32_t r[4];
  } mine{static_cast<unsigned char*>(row_addr), {r[0], r[1], r[2], r[3]}}, all[32];
  fmo_sim::warp_allgather(0xffffffffu, &mine, all, sizeof(Mine));
  const unsigned lane = fmo_sim::lane_id();
  const unsigned j = lane / 8, row = lane % 8;
  unsigned char* p = all[lane].addr;
  if (!fmo_sim::is_shared(p))
    fmo_sim::fail("stmatrix.x4%s: lane %u's row address %p is not in shared memory", Trans ? ".trans" : "", lane,
                  static_cast<void*>(p));
  require_aligned(p, 16, "stmatrix row");
  uint16_t out[8];
  for (unsigned c = 0; c < 8; ++c) {
    // element (i, k) of matrix j is in lane 4 i + k / 2, half k % 2
    const unsigned i = Trans ? c : row, k = Trans ? row : c;
    out[c] = static_cast<uint16_t>(all[4 * i + k / 2].r[j] >> (16 * (k % 2)));
  }
  fmo_sim::check_access(p, 16, true);
  memcpy(p, out, 16);
}
}  // namespace sim_detail
#endif  // FMO_SIM

// stmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA, "stmatrix"), sm_90: the inverse of
// ldmatrix_x4: lane l's r_j = row l / 4, columns 2 (l % 4), +1 of matrix j; lane l gives the
// address of row l % 8 of matrix l / 8 (16-byte aligned).
FMO_DEVICE void stmatrix_x4(void* smem_row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#ifdef FMO_SIM
  const uint32_t r[4] = {r0, r1, r2, r3};
  sim_detail::stmatrix_x4_emulate<false>(smem_row_addr, r);
#else
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(smem_row_addr)),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#endif
}

// .trans: each matrix is stored transposed (the fragment's column c becomes row c).
FMO_DEVICE void stmatrix_x4_trans(void* smem_row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#ifdef FMO_SIM
  const uint32_t r[4] = {r0, r1, r2, r3};
  sim_detail::stmatrix_x4_emulate<true>(smem_row_addr, r);
#else
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   smem_addr(smem_row_addr)),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#endif
}

}  // namespace ptx
}  // namespace fmo
