// ptx/tma.cuh: the Tensor Memory Accelerator's tiled copies (PTX ISA, Data Movement and
// Conversion Instructions, "cp.async.bulk.tensor", "cp.reduce.async.bulk.tensor",
// "cp.async.bulk.commit_group", "cp.async.bulk.wait_group"; "prefetch.tensormap"), sm_90.
//
//   tma_load_2d/3d(dst, desc, bar, x, y[, z])
//     cp.async.bulk.tensor.{2,3}d.shared::cluster.global.mbarrier::complete_tx::bytes
//   tma_store_2d(desc, src, x, y)        cp.async.bulk.tensor.2d.global.shared::cta.bulk_group
//   tma_reduce_add_2d(desc, src, x, y)   cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group
//   tma_store_commit()                   cp.async.bulk.commit_group
//   tma_store_wait<N>()                  cp.async.bulk.wait_group.read N
//   tma_prefetch_descriptor(desc)        prefetch.tensormap
//
// Coordinates are element indices, x innermost; a box may start outside the tensor (negative
// coordinates included): elements outside it read as the map's OOB fill (zero) and are not
// written by stores. A load completes box bytes (all of them, OOB ones too) as transactions on
// `bar`: announce them with mbarrier_arrive_expect_tx. Shared memory holds the box densely,
// x fastest, with the map's swizzle (PTX ISA, "Tensor Memory Access" > "Tensor-copy
// swizzling modes": within each 8 x 128-byte span the 16-byte chunk index is XORed with the
// 128-byte row index mod 8 (128B), mod 4 over 512 bytes (64B), mod 2 over 256 bytes (32B);
// address bits [4:6] ^= [7:9], [4:5] ^= [7:8], [4] ^= [7]).
// A TmaDescriptor is the driver's CUtensorMap (fastmoe_ops/runtime/tensor_map.py encodes it);
// kernels take it inside their Params passed `const __grid_constant__` so its address is a
// parameter-space address the TMA unit can read.
// Stores read shared memory asynchronously: wait_group.read before overwriting the source,
// and fence_proxy_async() (ptx/mbarrier.cuh) between st.shared writes and the store.
//
// Emulation (FMO_SIM): the map is the simulator encoder's layout (tensor_map.py, engine sim;
// a driver-encoded map fails with a clear message). A load reads global memory at issue,
// poisons its shared destination (0xFF: contents are undefined until it lands) and lands,
// completing its bytes on `bar`, only when a thread polls `bar` (ptx/mbarrier.cuh). Stores
// and reductions go into the issuing thread's open bulk group and happen (shared memory read,
// global written) at the tma_store_wait that retires the group; a store never waited for is
// lost (strict: the kernel must wait before exiting or before reusing the source).
#pragma once

#include "ptx/common.cuh"
#include "ptx/mbarrier.cuh"

namespace fmo {
namespace ptx {

// 128 bytes, 64-aligned: the driver's CUtensorMap.
struct alignas(64) TmaDescriptor {
  uint64_t opaque[16];
};
static_assert(sizeof(TmaDescriptor) == 128, "TmaDescriptor is CUtensorMap's 128 bytes");

#ifdef FMO_SIM
namespace sim_detail {

// The simulator encoder's layout (fastmoe_ops/runtime/tensor_map.py: _encode_sim).
constexpr uint64_t kTmaMagic = 0x31'50'41'4d'54'4f'4d'46ull;  // "FMOTMAP1"
struct TmaMap {
  const unsigned char* base;
  int rank, esize, swizzle, dtype;  // swizzle: span bytes (0, 32, 64, 128); dtype: 1 f32
  uint64_t dim[5];
  uint64_t stride[5];  // bytes; stride[0] = esize
  uint32_t box[5];
};

FMO_SIM_EMU TmaMap tma_decode(const void* desc, const char* what) {
  uint64_t w[16];
  memcpy(w, desc, sizeof w);
  if (w[0] != kTmaMagic)
    fmo_sim::fail("%s: the tensor map is not one the simulator's encoder made (engine sim: "
                  "fastmoe_ops.runtime.tensor_map.encode_tiled(..., engine='sim'))", what);
  TmaMap m{};
  m.base = reinterpret_cast<const unsigned char*>(w[1]);
  m.rank = static_cast<int>(w[2] & 0xff);
  m.esize = static_cast<int>((w[2] >> 8) & 0xff);
  m.swizzle = static_cast<int>((w[2] >> 16) & 0xff) * 32;
  m.dtype = static_cast<int>((w[2] >> 32) & 0xff);
  for (int d = 0; d < 5; ++d) {
    m.dim[d] = d < m.rank ? w[3 + d] : 1;
    m.stride[d] = d == 0 ? m.esize : (d < m.rank ? w[7 + d] : 0);
    m.box[d] = d < m.rank ? static_cast<uint32_t>((w[12 + d / 4] >> (16 * (d % 4))) & 0xffff) : 1;
  }
  return m;
}

FMO_SIM_EMU size_t tma_swizzle(size_t off, int swizzle) {
  const size_t mask = swizzle == 128 ? 7 : swizzle == 64 ? 3 : swizzle == 32 ? 1 : 0;
  return off ^ (((off >> 7) & mask) << 4);
}

FMO_SIM_EMU size_t tma_box_bytes(const TmaMap& m) {
  size_t n = m.esize;
  for (int d = 0; d < 5; ++d) n *= m.box[d];
  return n;
}

FMO_SIM_EMU void tma_check_smem(const void* smem, const TmaMap& m, int rank, const char* what) {
  if (rank != m.rank) fmo_sim::fail("%s: the tensor map has rank %d, the instruction %d", what, m.rank, rank);
  if (!fmo_sim::is_shared(smem)) fmo_sim::fail("%s: shared address %p is not in shared memory", what, smem);
  const size_t align = m.swizzle == 0 ? 128 : 8 * static_cast<size_t>(m.swizzle);
  require_aligned(smem, align, what);  // swizzled: the pattern's repeat (the ISA's address bits)
}

// Copy every element of the box at coordinates c between shared memory `smem` (the swizzled
// box image) and global memory. kLoad: global -> smem (out-of-bounds elements: zero);
// kStore / kReduce: smem -> global (f32 add), out-of-bounds elements skipped. One plain
// function (no callbacks): emulation code stays uninstrumented in checking builds.
enum TmaMode { kTmaLoad, kTmaStore, kTmaReduce };
FMO_SIM_EMU void tma_copy(const TmaMap& m, const int32_t* c, unsigned char* smem, TmaMode mode) {
  size_t lin = 0;
  for (uint32_t i4 = 0; i4 < m.box[4]; ++i4)
    for (uint32_t i3 = 0; i3 < m.box[3]; ++i3)
      for (uint32_t i2 = 0; i2 < m.box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < m.box[1]; ++i1)
          for (uint32_t i0 = 0; i0 < m.box[0]; ++i0, lin += m.esize) {
            const uint32_t idx[5] = {i0, i1, i2, i3, i4};
            unsigned char* g = const_cast<unsigned char*>(m.base);
            for (int d = 0; d < 5 && g; ++d) {
              const int64_t x = static_cast<int64_t>(c[d]) + idx[d];
              if (x < 0 || static_cast<uint64_t>(x) >= m.dim[d])
                g = nullptr;
              else
                g += static_cast<uint64_t>(x) * m.stride[d];
            }
            unsigned char* s = smem + tma_swizzle(lin, m.swizzle);
            if (mode == kTmaLoad) {
              if (g) {
                fmo_sim::check_access(g, m.esize, false);
                memcpy(s, g, m.esize);
              } else {
                memset(s, 0, m.esize);
              }
              continue;
            }
            if (!g) continue;
            fmo_sim::check_access(s, m.esize, false);
            fmo_sim::check_access(g, m.esize, true);
            if (mode == kTmaReduce) {
              float a, b;
              memcpy(&a, g, 4);
              memcpy(&b, s, 4);
              a += b;
              memcpy(g, &a, 4);
            } else {
              memcpy(g, s, m.esize);
            }
          }
}

FMO_SIM_EMU void tma_load(void* dst, const void* desc, uint64_t* bar, int rank, const int32_t* coord,
                          const char* what) {
  const TmaMap m = tma_decode(desc, what);
  int32_t c[5] = {0, 0, 0, 0, 0};  // dimensions past the rank: coordinate 0 of extent 1
  for (int d = 0; d < rank && d < 5; ++d) c[d] = coord[d];
  tma_check_smem(dst, m, rank, what);
  mbar(bar, what);  // initialised barrier in shared memory
  auto& st = cta_async();
  PendingLoad* ld = nullptr;
  for (auto& l : st.loads)
    if (l.bar == nullptr) {
      ld = &l;
      break;
    }
  if (ld == nullptr) fmo_sim::fail("%s: the emulation holds at most %d TMA loads in flight per CTA", what, kMaxLoads);
  const size_t bytes = tma_box_bytes(m);
  if (!fmo_sim::is_shared(static_cast<unsigned char*>(dst) + bytes - 1))
    fmo_sim::fail("%s: the %zu-byte box at shared address %p runs past the CTA's shared memory", what, bytes, dst);
  // the box image, staged on the heap (read now, lands when `bar` is polled)
  unsigned char* data = static_cast<unsigned char*>(malloc(bytes));
  tma_copy(m, c, data, kTmaLoad);
  *ld = PendingLoad{bar, static_cast<unsigned char*>(dst), data, bytes};
  memset(dst, 0xff, bytes);  // undefined until the bytes land
  ++st.epoch;
}

FMO_SIM_EMU void tma_store(const void* desc, const void* src, int rank, const int32_t* c, bool reduce,
                           const char* what) {
  const TmaMap m = tma_decode(desc, what);
  tma_check_smem(src, m, rank, what);
  if (reduce && m.dtype != 1)
    fmo_sim::fail("%s: the emulation reduces f32 tensor maps only (this map's dtype code %d)", what, m.dtype);
  auto& st = cta_async();
  PendingStore* s = nullptr;
  for (auto& p : st.stores)
    if (p.group == -2) {
      s = &p;
      break;
    }
  if (s == nullptr) fmo_sim::fail("%s: the emulation holds at most %d TMA stores pending per CTA", what, kMaxStores);
  memcpy(s->map, desc, 128);
  s->src = static_cast<const unsigned char*>(src);
  for (int d = 0; d < 5; ++d) s->coord[d] = d < rank ? c[d] : 0;
  s->tid = fmo_sim::cur()->linear_tid;
  s->group = -1;
  s->reduce = reduce;
}

FMO_SIM_EMU uint32_t tma_tid() {
  const uint32_t t = fmo_sim::cur()->linear_tid;
  if (t >= static_cast<uint32_t>(kMaxThreadsAsync))
    fmo_sim::fail("TMA store emulation: at most %d threads per CTA", kMaxThreadsAsync);
  return t;
}

FMO_SIM_EMU void tma_commit() {
  auto& st = cta_async();
  const uint32_t t = tma_tid();
  const int64_t g = st.groups_committed[t]++;
  for (auto& p : st.stores)
    if (p.group == -1 && p.tid == t) p.group = g;
}

// Retire this thread's groups but the newest n, oldest first (stores in issue order within a
// group: slots are taken lowest first and performed in slot order per group).
FMO_SIM_EMU void tma_wait(int n) {
  auto& st = cta_async();
  const uint32_t t = tma_tid();
  const int64_t upto = st.groups_committed[t] - n;  // groups < upto retire
  for (int64_t g = st.groups_retired[t]; g < upto; ++g)
    for (auto& p : st.stores)
      if (p.group == g && p.tid == t) {
        const TmaMap m = tma_decode(p.map, "TMA store");
        tma_copy(m, p.coord, const_cast<unsigned char*>(p.src), p.reduce ? kTmaReduce : kTmaStore);
        p.group = -2;
      }
  if (upto > st.groups_retired[t]) st.groups_retired[t] = upto;
}

}  // namespace sim_detail
#endif  // FMO_SIM

FMO_DEVICE void tma_load_2d(void* smem_dst, const TmaDescriptor* desc, uint64_t* bar, int32_t x, int32_t y) {
#ifdef FMO_SIM
  const int32_t c[2] = {x, y};
  sim_detail::tma_load(smem_dst, desc, bar, 2, c, "cp.async.bulk.tensor.2d");
#else
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(x), "r"(y)
      : "memory");
#endif
}

FMO_DEVICE void tma_load_3d(void* smem_dst, const TmaDescriptor* desc, uint64_t* bar, int32_t x, int32_t y,
                            int32_t z) {
#ifdef FMO_SIM
  const int32_t c[3] = {x, y, z};
  sim_detail::tma_load(smem_dst, desc, bar, 3, c, "cp.async.bulk.tensor.3d");
#else
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(x), "r"(y), "r"(z)
      : "memory");
#endif
}

FMO_DEVICE void tma_store_2d(const TmaDescriptor* desc, const void* smem_src, int32_t x, int32_t y) {
#ifdef FMO_SIM
  const int32_t c[2] = {x, y};
  sim_detail::tma_store(desc, smem_src, 2, c, false, "cp.async.bulk.tensor.2d (store)");
#else
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(desc)),
               "r"(smem_addr(smem_src)), "r"(x), "r"(y)
               : "memory");
#endif
}

// Element-wise global += box (f32 maps in the emulation; the ISA also has f16/bf16 .add).
FMO_DEVICE void tma_reduce_add_2d(const TmaDescriptor* desc, const void* smem_src, int32_t x, int32_t y) {
#ifdef FMO_SIM
  const int32_t c[2] = {x, y};
  sim_detail::tma_store(desc, smem_src, 2, c, true, "cp.reduce.async.bulk.tensor.2d.add");
#else
  asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(desc)),
               "r"(smem_addr(smem_src)), "r"(x), "r"(y)
               : "memory");
#endif
}

// Close this thread's current bulk async-group (stores and reductions issued since the last).
FMO_DEVICE void tma_store_commit() {
#ifdef FMO_SIM
  sim_detail::tma_commit();
#else
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's bulk groups still read their shared source.
template <int N>
FMO_DEVICE void tma_store_wait() {
  static_assert(N >= 0, "cp.async.bulk.wait_group: N is a non-negative constant");
#ifdef FMO_SIM
  sim_detail::tma_wait(N);
#else
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}

FMO_DEVICE void tma_prefetch_descriptor(const TmaDescriptor* desc) {
#ifdef FMO_SIM
  sim_detail::tma_decode(desc, "prefetch.tensormap");
#else
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(desc)) : "memory");
#endif
}

}  // namespace ptx
}  // namespace fmo
