// ABI shared by the simulator runtime (the `_simrt` extension) and every simulated module.
//
// The extension is loaded RTLD_LOCAL, so a module cannot link against it: the runtime hands
// the module a table of function pointers (`RuntimeApi`) through the module's exported
// `fmo_sim_bind`. Hot paths (thread/block indices) do not go through the table: each fiber
// keeps a `FiberAbi` at the top of its stack region (the stack grows down from below it, so
// both share the hot page), and the region is aligned to `kStackBytes`: the current thread is
// `(rsp & ~(kStackBytes - 1)) + kCtlOffset` -- an AND and an add, no TLS lookup.
// Bump kAbiVersion whenever anything in this file changes (it is part of the cache key).
#pragma once
#include <cstddef>
#include <cstdint>

namespace fmo_sim {

constexpr int kAbiVersion = 5;
constexpr std::size_t kStackBytes = 256 * 1024;       // fiber stack region, a power of two
constexpr std::size_t kCtlBytes = 1024;                // fiber control block, top of the region
constexpr std::size_t kCtlOffset = kStackBytes - kCtlBytes;
constexpr std::size_t kDynamicSmemBytes = 228 * 1024;  // Hopper's largest shared memory per CTA
constexpr unsigned kWarpSize = 32;

// Lives at the top of each fiber's stack region (a guard page is the region's lowest page).
struct FiberAbi {
  unsigned tid[3];
  unsigned bid[3];
  unsigned bdim[3];
  unsigned gdim[3];
  unsigned linear_tid;
  unsigned lane;
  unsigned warp;
  unsigned nthreads;  // threads in the CTA
};

enum BarrierOp : int { kBarSync = 0, kBarCount = 1 };

enum AccessKind : int { kRead = 0, kWrite = 1, kAtomic = 2 };

struct RuntimeApi {
  int abi_version;
  // Barrier `id` over `nthreads` threads (0: the whole CTA). Returns how many arrivals had
  // pred != 0. `file`/`line` name the call site (divergence diagnostics; line 0: none).
  // arrive_only: count this thread's arrival and go on (bar.arrive).
  int (*barrier)(unsigned id, unsigned nthreads, int pred, const char* file, int line, int arrive_only);
  void (*warp_allgather)(unsigned mask, const void* in, void* out, std::size_t bytes);
  void (*yield)();
  [[noreturn]] void (*fail)(const char* message);
  int (*is_shared)(const void* p);
  void (*cp_async)(void* dst, const void* src, unsigned bytes, unsigned src_bytes);
  void (*cp_async_commit)();
  void (*cp_async_wait)(int n);
  void (*check_access)(const void* p, std::size_t bytes, int kind);
  unsigned long long (*nanotime)();
  void (*warp_sync_epoch)();  // a __syncwarp happened (racecheck epochs)
};

}  // namespace fmo_sim
