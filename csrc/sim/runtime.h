// Internal structures of the SIMT simulator runtime (the `_simrt` extension).
//
// A launch (`Launch`) runs its CTAs on OS worker threads taken from a persistent pool; each
// worker runs one CTA at a time as one fiber per CUDA thread, switched cooperatively
// (switch.S). A fiber runs until it blocks (barrier, warp collective), yields (atomics,
// fences, fmo_sim::yield) or exits; the worker's scheduler then runs the next runnable
// fiber round-robin. Shared memory is the module's TLS block on that worker.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "abi.h"

extern "C" void fmo_sim_switch(void** save_sp, void* load_sp);
extern "C" void fmo_sim_fiber_start();

namespace fmo_sim {

struct Module;
struct Launch;
struct Worker;

enum class FState : int { Runnable, Blocked, Exited };
enum class Why : int { None, Yield, Block, Exit, Dead };

struct PendingCopy {
  void* dst;
  unsigned bytes;
  std::uint64_t group;  // commit group number (committed when <= committed_groups)
  std::size_t data_off;
};

// Lives in the first page of its stack region; FiberAbi must come first (read by modules).
struct Fiber {
  FiberAbi abi;
  void* sp = nullptr;
  FState state = FState::Runnable;
  Why why = Why::None;
  Worker* worker = nullptr;
  // what it waits for (diagnostics)
  int wait_kind = 0;  // 1: barrier, 2: warp collective
  unsigned wait_id = 0;
  const char* wait_file = nullptr;
  int wait_line = 0;
  int bar_result = 0;
  // cp.async
  std::vector<PendingCopy> copies;
  std::vector<unsigned char> copy_data;
  std::uint64_t open_group = 1;  // group that the next cp_async joins
};

struct Barrier {
  unsigned expected = 0, arrived = 0;
  int count = 0;
  const char* file = nullptr;
  int line = 0;
  std::vector<Fiber*> waiters;
};

struct Collective {
  unsigned mask = 0, arrived = 0;
  std::size_t bytes = 0;
  const void* in[32];
  void* out[32];
  Fiber* fibers[32];
};

struct WarpState {
  unsigned exists = 0;  // lanes present in the CTA
  unsigned exited = 0;
  std::uint16_t epoch = 1;  // warp-sync epoch (racecheck)
  std::vector<Collective> active;
};

struct ShadowRec {
  std::uint32_t epoch;
  std::uint16_t tid1;  // linear thread id + 1; 0 = none
  std::uint16_t wepoch;
};
struct Shadow {
  ShadowRec w, r1, r2;
};

struct Worker {
  Launch* L = nullptr;
  void* sched_sp = nullptr;
  Fiber* current = nullptr;
  std::vector<Fiber*> fibers;  // stack regions owned while running
  std::vector<WarpState> warps;
  Barrier bars[16];
  unsigned cta = 0;
  unsigned bid[3] = {0, 0, 0};
  unsigned nthreads = 0;
  // module TLS block on this worker = shared memory of the CTA it runs
  unsigned char* tls_lo = nullptr;
  unsigned char* tls_hi = nullptr;
  unsigned char* dyn_lo = nullptr;
  // racecheck
  std::vector<Shadow> shadow;
  std::uint32_t epoch = 1;
};

struct Range {
  std::uintptr_t lo, hi;
  int index;  // argument index (-1: extra range)
};

struct TlsSymbol {  // a static __shared__ variable: offset in the module's TLS block
  std::size_t offset, size;
  std::string name;
};

struct Module {
  void* handle = nullptr;
  std::vector<TlsSymbol> shared_vars;
  std::string path;
  std::size_t tls_size = 0;
  unsigned char* (*dynamic_smem)() = nullptr;
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> segments;  // PT_LOAD ranges
};

struct Launch {
  Module* mod = nullptr;
  void (*body)(const unsigned char*) = nullptr;
  std::string kernel;
  std::vector<unsigned char> args;
  unsigned grid[3], block[3];
  unsigned nctas = 0, nthreads = 0;
  std::size_t shared_mem = 0;
  bool memcheck = false, racecheck = false;
  std::vector<Range> ranges;
  double deadline = 0;  // steady-clock seconds
  std::atomic<unsigned> next_cta{0};
  std::atomic<bool> abort{false};
  std::mutex m;
  std::condition_variable cv;
  unsigned workers = 0, finished = 0;
  unsigned max_workers = 1;   // the launch starts with one worker per core and grows up to
                              // this while CTAs spin and others still wait to become resident
  std::weak_ptr<Launch> self;
  std::vector<unsigned long> threads;  // pthread_t of the workers running now
  std::string error;  // first failure

  void set_error(const std::string& msg);
};

// runtime.cpp
const RuntimeApi* runtime_api();
std::string launch(std::shared_ptr<Launch> L, unsigned workers, double timeout_s);
Worker* this_worker();
double now_s();
std::string where(const Worker* w, const Fiber* f);  // "kernel K, block (..), thread (..)"
[[noreturn]] void fail_current(const std::string& msg);

// checks.cpp
void check_access(const void* p, std::size_t bytes, int kind);
int is_shared(const void* p);
void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes);
void cp_async_commit();
void cp_async_wait(int n);

// stacks.cpp
Fiber* alloc_fiber();
void free_fibers(std::vector<Fiber*>& fibers);

}  // namespace fmo_sim
