// ptx/cp_async.cuh: asynchronous global -> shared copies (PTX ISA, Data Movement
// and Conversion Instructions, "cp.async", "cp.async.commit_group", "cp.async.wait_group /
// cp.async.wait_all"), sm_80+.
//
//   cp.async.ca.shared.global [dst], [src], cp-size, src-size;   cp-size in {4, 8, 16}
//   cp.async.cg.shared.global [dst], [src], 16, src-size;        (.cg: L2 only, 16 bytes)
// Only src-size bytes (0 <= src-size <= cp-size) are read; bytes [src-size, cp-size) of the
// destination are zero-filled: the idiom for out-of-bounds tile rows (src-size = 0). dst
// and src must be aligned to cp-size. The copy is visible to the issuing thread only after
// a cp.async.wait_group / wait_all that retires its group; other threads also need a
// barrier (__syncthreads / bar.sync) after that wait.
//
// Emulation (FMO_SIM): fmo_sim::cp_async reads the source at issue and lands the data at
// the wait that retires its group, so a kernel that forgets the wait reads stale shared
// memory, as on the GPU.
#pragma once

#include "ptx/common.cuh"

namespace fmo {
namespace ptx {

#ifdef FMO_SIM
namespace sim_detail {
FMO_SIM_EMU void cp_async_emulate(void* dst, const void* src, unsigned bytes, unsigned src_bytes,
                             const char* what) {
  if (!fmo_sim::is_shared(dst))
    fmo_sim::fail("%s: destination %p is not in shared memory", what, dst);
  require_aligned(dst, bytes, what);
  require_aligned(src, bytes, what);
  if (src_bytes > bytes)
    fmo_sim::fail("%s: src-size %u exceeds cp-size %u", what, src_bytes, bytes);
  fmo_sim::cp_async(dst, src, bytes, src_bytes);
}
}  // namespace sim_detail
#endif

// cp.async.ca (cache at all levels) of Bytes in {4, 8, 16}; reads src_bytes of them.
template <int Bytes>
FMO_DEVICE void cp_async_ca(void* smem_dst, const void* gmem_src, uint32_t src_bytes = Bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async.ca: cp-size is 4, 8 or 16");
#ifdef FMO_SIM
  sim_detail::cp_async_emulate(smem_dst, gmem_src, Bytes, src_bytes, "cp.async.ca");
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "n"(Bytes), "r"(src_bytes)
               : "memory");
#endif
}

// cp.async.cg (bypass L1, cache in L2), 16 bytes; reads src_bytes of them.
FMO_DEVICE void cp_async_cg16(void* smem_dst, const void* gmem_src, uint32_t src_bytes = 16) {
#ifdef FMO_SIM
  sim_detail::cp_async_emulate(smem_dst, gmem_src, 16, src_bytes, "cp.async.cg");
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
               : "memory");
#endif
}

// Close the current group of this thread's outstanding cp.async (may be empty).
FMO_DEVICE void cp_async_commit() {
#ifdef FMO_SIM
  fmo_sim::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's most recent committed groups are pending.
template <int N>
FMO_DEVICE void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group: N is a non-negative integer constant");
#ifdef FMO_SIM
  fmo_sim::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Wait for all of this thread's cp.async, committed or not (ISA: equivalent to
// cp.async.commit_group followed by cp.async.wait_group 0).
FMO_DEVICE void cp_async_wait_all() {
#ifdef FMO_SIM
  fmo_sim::cp_async_commit();
  fmo_sim::cp_async_wait(0);
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace ptx
}  // namespace fmo
