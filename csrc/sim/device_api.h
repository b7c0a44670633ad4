// The simulator's device API: what PTX emulation (`ptx/*.cuh`) and hand-written device code
// may call when compiled for the CPU SIMT simulator (`FMO_SIM` is defined). Everything here
// is valid only inside a kernel launched by `fastmoe_ops.sim` (it runs on a simulated thread).
//
//   unsigned lane_id();   // lane within the warp: linear thread id % 32
//   unsigned warp_id();   // warp index within the CTA: linear thread id / 32
//
//   // All lanes in `mask` call it with the same mask and size; returns after all arrived.
//   // `out` receives 32*bytes: slot i = lane i's `in` (slots of lanes not in mask: unspecified).
//   // Lanes past the end of a partial last warp are dropped from `mask`. A mask naming a lane
//   // that exited stops the launch with SimError; collectives with other masks may be pending
//   // at the same time, and ones that can never complete end as a reported deadlock.
//   void warp_allgather(unsigned mask, const void* in, void* out, size_t bytes);
//
//   void yield();         // call inside spin loops: lets other threads and CTAs run
//   [[noreturn]] void fail(const char* fmt, ...);  // stop the launch with SimError; the message
//                                                  // gets a kernel/block/thread prefix
//   bool is_shared(const void* p);  // p lies in this CTA's shared memory (static or dynamic)
//
//   // cp.async emulation. Source bytes are read at issue time; they land in shared memory only
//   // at the wait that retires their group, so a missing wait reads poison (0xFF bytes).
//   // Bytes in [src_bytes, bytes) are zero-filled.
//   void cp_async(void* dst_shared, const void* src_global, unsigned bytes, unsigned src_bytes);
//   void cp_async_commit();
//   void cp_async_wait(int n);  // retire all committed groups except the newest n (n=0: all)
//
//   // Checking hook for memory touched by emulation code (which is not instrumented): in
//   // checking builds (FMO_SIM_RACECHECK/FMO_SIM_MEMCHECK) runs the same memcheck/racecheck as
//   // an instrumented access; otherwise compiles to nothing.
//   void check_access(const void* p, size_t bytes, bool is_write);
//
// All are in namespace fmo_sim, defined inline in this header. The prelude (fmo_sim.h) adds
// named barriers, which racecheck and the deadlock diagnostics understand:
//   void named_barrier(unsigned id, unsigned nthreads);         // bar.sync id, n (0: all threads)
//   void named_barrier_arrive(unsigned id, unsigned nthreads);  // bar.arrive id, n
// Note: module-level `thread_local` variables live in the module's TLS block, which is the
// CTA's shared memory: they are per worker = per CTA in flight and poisoned at each CTA start.
#pragma once
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "sim/abi.h"

#define FMO_SIM_NOTSAN __attribute__((no_sanitize_thread))

namespace fmo_sim {

// Set by the module's exported fmo_sim_bind before any launch.
inline const RuntimeApi* g_api = nullptr;

FMO_SIM_NOTSAN inline FiberAbi* cur() {
  std::uintptr_t sp;
  asm("mov %%rsp, %0" : "=r"(sp));
  return reinterpret_cast<FiberAbi*>((sp & ~(std::uintptr_t)(kStackBytes - 1)) + kCtlOffset);
}

FMO_SIM_NOTSAN inline unsigned lane_id() { return cur()->lane; }
FMO_SIM_NOTSAN inline unsigned warp_id() { return cur()->warp; }

FMO_SIM_NOTSAN inline void warp_allgather(unsigned mask, const void* in, void* out, size_t bytes) {
  g_api->warp_allgather(mask, in, out, bytes);
}

FMO_SIM_NOTSAN inline void yield() { g_api->yield(); }

[[noreturn]] FMO_SIM_NOTSAN inline void fail(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  g_api->fail(buf);
}

FMO_SIM_NOTSAN inline bool is_shared(const void* p) { return g_api->is_shared(p) != 0; }

FMO_SIM_NOTSAN inline void cp_async(void* dst_shared, const void* src_global, unsigned bytes,
                                    unsigned src_bytes) {
  g_api->cp_async(dst_shared, src_global, bytes, src_bytes);
}
FMO_SIM_NOTSAN inline void cp_async_commit() { g_api->cp_async_commit(); }
FMO_SIM_NOTSAN inline void cp_async_wait(int n) { g_api->cp_async_wait(n); }

FMO_SIM_NOTSAN inline void check_access(const void* p, size_t bytes, bool is_write) {
#if defined(FMO_SIM_CHECKING)
  g_api->check_access(p, bytes, is_write ? kWrite : kRead);
#else
  (void)p; (void)bytes; (void)is_write;
#endif
}

}  // namespace fmo_sim
