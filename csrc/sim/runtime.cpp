// Scheduler, barriers, warp collectives and the worker pool of the SIMT simulator.
// See runtime.h for the execution model.
#include "runtime.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <new>
#include <stdexcept>
#include <thread>

namespace fmo_sim {

namespace {
thread_local Worker* tl_worker = nullptr;

// ---- fiber stacks: aligned to their size; the Fiber sits at the top (abi.h: kCtlOffset) --
constexpr std::size_t kPage = 4096;
constexpr std::size_t kGuardedStacks = 16384;
constexpr std::size_t kChunk = 64;
std::size_t g_guarded = 0;  // under g_stack_mutex
static_assert(sizeof(Fiber) <= kCtlBytes, "Fiber control block must fit kCtlBytes");
static_assert(offsetof(Fiber, abi) == 0, "modules read FiberAbi at the control block's start");
std::mutex g_stack_mutex;
std::vector<Fiber*>* g_free_stacks = new std::vector<Fiber*>();  // leaked: outlives workers

// ---- a persistent pool of OS threads; grows whenever every thread is busy ---------------
class Pool {
 public:
  void submit(std::function<void()> fn) {
    std::lock_guard<std::mutex> g(m_);
    q_.push_back(std::move(fn));
    if (q_.size() > idle_) {
      std::thread([this] { loop(); }).detach();
    } else {
      cv_.notify_one();
    }
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> g(m_);
    for (;;) {
      while (q_.empty()) {
        ++idle_;
        cv_.wait(g);
        --idle_;
      }
      auto fn = std::move(q_.front());
      q_.pop_front();
      g.unlock();
      fn();
      g.lock();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  std::size_t idle_ = 0;
};
Pool* g_pool = new Pool();  // leaked: detached threads wait on it until exit
}  // namespace

// Stacks come in chunks of kChunk adjacent regions, so unguarded ones merge into one mapping.
Fiber* alloc_fiber() {
  std::lock_guard<std::mutex> g(g_stack_mutex);
  if (g_free_stacks->empty()) {
    std::size_t len = (kChunk + 1) * kStackBytes;
    void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED)
      throw std::runtime_error("cannot map fiber stacks (too many threads in flight? lower FMO_SIM_WORKERS)");
    std::uintptr_t r = reinterpret_cast<std::uintptr_t>(raw);
    std::uintptr_t base = (r + kStackBytes - 1) & ~(std::uintptr_t)(kStackBytes - 1);
    if (base > r) munmap(raw, base - r);
    std::uintptr_t end = base + kChunk * kStackBytes;
    if (r + len > end) munmap(reinterpret_cast<void*>(end), r + len - end);
    for (std::size_t i = kChunk; i-- > 0;) {
      std::uintptr_t b = base + i * kStackBytes;
      // Guard page at the bottom, where the stack overflows. Each guard splits the mapping
      // (vm.max_map_count is ~65530 per process), so only the first kGuardedStacks get one.
      if (g_guarded < kGuardedStacks) {
        g_guarded++;
        mprotect(reinterpret_cast<void*>(b), kPage, PROT_NONE);
      }
      g_free_stacks->push_back(new (reinterpret_cast<void*>(b + kCtlOffset)) Fiber());
    }
  }
  Fiber* f = g_free_stacks->back();
  g_free_stacks->pop_back();
  return f;
}

void free_fibers(std::vector<Fiber*>& fibers) {
  std::lock_guard<std::mutex> g(g_stack_mutex);
  for (Fiber* f : fibers) g_free_stacks->push_back(f);
  fibers.clear();
}

Worker* this_worker() { return tl_worker; }

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void Launch::set_error(const std::string& msg) {
  std::lock_guard<std::mutex> g(m);
  if (error.empty()) error = msg;
  abort.store(true);
}

std::string where(const Worker* w, const Fiber* f) {
  char buf[256];
  if (f)
    std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", w->L->kernel.c_str(),
                  w->bid[0], w->bid[1], w->bid[2], f->abi.tid[0], f->abi.tid[1], f->abi.tid[2]);
  else
    std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", w->L->kernel.c_str(), w->bid[0], w->bid[1],
                  w->bid[2]);
  return buf;
}

static std::string tid_str(const Fiber* f) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", f->abi.tid[0], f->abi.tid[1], f->abi.tid[2]);
  return buf;
}

// Give control back to the worker's scheduler.
static inline void to_scheduler(Fiber* f, Why why) {
  f->why = why;
  fmo_sim_switch(&f->sp, f->worker->sched_sp);
}

[[noreturn]] void fail_current(const std::string& msg) {
  Worker* w = tl_worker;
  Fiber* f = w->current;
  w->L->set_error(where(w, f) + ": " + msg);
  f->state = FState::Exited;
  to_scheduler(f, Why::Dead);
  __builtin_unreachable();
}

// ---- the API table handed to modules ---------------------------------------------------
static void api_yield() {
  Fiber* f = tl_worker->current;
  to_scheduler(f, Why::Yield);
}

[[noreturn]] static void api_fail(const char* msg) { fail_current(msg); }

static int api_barrier(unsigned id, unsigned nthreads, int pred, const char* file, int line, int arrive_only) {
  Worker* w = tl_worker;
  Fiber* f = w->current;
  if (id >= 16) fail_current("barrier id " + std::to_string(id) + " out of range (0..15)");
  unsigned n = nthreads ? nthreads : w->nthreads;
  if (n > w->nthreads)
    fail_current("barrier " + std::to_string(id) + " expects " + std::to_string(n) + " threads but the CTA has " +
                 std::to_string(w->nthreads));
  Barrier& b = w->bars[id];
  if (b.arrived == 0) {
    b.expected = n;
    b.file = file;
    b.line = line;
  } else {
    if (b.expected != n)
      fail_current("barrier " + std::to_string(id) + " used with thread counts " + std::to_string(b.expected) +
                   " and " + std::to_string(n));
    if (line > 0 && b.line > 0 && !b.waiters.empty() && (b.line != line || std::strcmp(b.file, file) != 0))
      fail_current(std::string("divergent __syncthreads: this thread waits at ") + file + ":" + std::to_string(line) +
                   " while thread " + tid_str(b.waiters.front()) + " waits at " + b.file + ":" +
                   std::to_string(b.line));
  }
  b.arrived++;
  b.count += pred ? 1 : 0;
  if (b.arrived == b.expected) {
    int result = b.count;
    for (Fiber* o : b.waiters) {
      o->bar_result = result;
      o->state = FState::Runnable;
      o->wait_kind = 0;
    }
    b.waiters.clear();
    b.arrived = 0;
    b.count = 0;
    w->epoch++;
    return result;
  }
  if (arrive_only) return 0;
  b.waiters.push_back(f);
  f->state = FState::Blocked;
  f->wait_kind = 1;
  f->wait_id = id;
  f->wait_file = file;
  f->wait_line = line;
  to_scheduler(f, Why::Block);
  return f->bar_result;
}

static std::string mask_str(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

static std::string lanes_str(unsigned m) {
  std::string s;
  for (unsigned i = 0; i < 32; ++i)
    if ((m >> i) & 1) s += (s.empty() ? "" : ",") + std::to_string(i);
  return s;
}

static void api_warp_allgather(unsigned mask, const void* in, void* out, std::size_t bytes) {
  Worker* w = tl_worker;
  Fiber* f = w->current;
  WarpState& ws = w->warps[f->abi.warp];
  unsigned bit = 1u << f->abi.lane;
  unsigned eff = mask & ws.exists;  // lanes past the end of a partial warp do not exist
  if (!(eff & bit)) fail_current("warp collective with mask " + mask_str(mask) + " called by lane " +
                                 std::to_string(f->abi.lane) + ", which the mask does not name");
  if (eff & ws.exited)
    fail_current("warp collective with mask " + mask_str(mask) + " names lane(s) " + lanes_str(eff & ws.exited) +
                 " of warp " + std::to_string(f->abi.warp) + ", which already exited");
  // Join the pending collective with the same mask; collectives with other (even overlapping)
  // masks may be pending at the same time, as when half-warps shuffle on their own before a
  // whole-warp shuffle. Mismatched masks that can never complete end as a reported stall.
  Collective* c = nullptr;
  for (Collective& a : ws.active) {
    if (a.mask == eff && !(a.arrived & bit)) {
      if (a.bytes != bytes)
        fail_current("warp collective of " + std::to_string(bytes) + " bytes per lane meets one of " +
                     std::to_string(a.bytes) + " bytes (lanes of the mask called different collectives)");
      c = &a;
      break;
    }
  }
  if (!c) {
    ws.active.emplace_back();
    c = &ws.active.back();
    c->mask = eff;
    c->arrived = 0;
    c->bytes = bytes;
  }
  unsigned lane = f->abi.lane;
  c->in[lane] = in;
  c->out[lane] = out;
  c->fibers[lane] = f;
  c->arrived |= bit;
  if (c->arrived == c->mask) {
    if (bytes) {
      alignas(16) unsigned char tmp[32 * 256];
      std::vector<unsigned char> big;
      unsigned char* g = tmp;
      if (32 * bytes > sizeof tmp) {
        big.resize(32 * bytes);
        g = big.data();
      }
      std::memset(g, 0xff, 32 * bytes);
      for (unsigned i = 0; i < 32; ++i)
        if ((c->mask >> i) & 1) std::memcpy(g + i * bytes, c->in[i], bytes);
      for (unsigned i = 0; i < 32; ++i)
        if ((c->mask >> i) & 1) std::memcpy(c->out[i], g, 32 * bytes);
    }
    for (unsigned i = 0; i < 32; ++i)
      if (((c->mask >> i) & 1) && i != lane) {
        c->fibers[i]->state = FState::Runnable;
        c->fibers[i]->wait_kind = 0;
      }
    ws.active.erase(ws.active.begin() + (c - ws.active.data()));
    ws.epoch++;
    return;
  }
  f->state = FState::Blocked;
  f->wait_kind = 2;
  f->wait_id = eff;
  to_scheduler(f, Why::Block);
}

static void api_warp_sync_epoch() {
  Worker* w = tl_worker;
  w->warps[w->current->abi.warp].epoch++;
}

static unsigned long long api_nanotime() {
  return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

static void api_check_access(const void* p, std::size_t bytes, int kind) { check_access(p, bytes, kind); }
static int api_is_shared(const void* p) { return is_shared(p); }

const RuntimeApi* runtime_api() {
  static const RuntimeApi api = {
      kAbiVersion,     api_barrier,     api_warp_allgather, api_yield,          api_fail,     api_is_shared,
      cp_async,        cp_async_commit, cp_async_wait,      api_check_access,   api_nanotime, api_warp_sync_epoch,
  };
  return &api;
}

// ---- running a CTA ------------------------------------------------------------------------
static void fiber_main(Fiber* f) {
  Worker* w = f->worker;
  w->L->body(w->L->args.data());
  f->state = FState::Exited;
  to_scheduler(f, Why::Exit);
  __builtin_unreachable();
}

static void start_fiber(Fiber* f) {
  // initial frame popped by fmo_sim_switch: [mxcsr|fcw] r15 r14 r13 r12 rbx rbp ret
  std::uintptr_t top = reinterpret_cast<std::uintptr_t>(f);  // the stack grows down below the Fiber
  std::uint64_t* sp = reinterpret_cast<std::uint64_t*>(top);
  *--sp = reinterpret_cast<std::uint64_t>(&fmo_sim_fiber_start);  // at top-8: rsp is 16-aligned after ret
  *--sp = 0;                                                        // rbp
  *--sp = 0;                                                        // rbx
  *--sp = reinterpret_cast<std::uint64_t>(f);                       // r12: argument
  *--sp = reinterpret_cast<std::uint64_t>(&fiber_main);             // r13: function
  *--sp = 0;                                                        // r14
  *--sp = 0;                                                        // r15
  std::uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::uint64_t word;
  std::memcpy(&word, csr, 8);
  *--sp = word;
  f->sp = sp;
}

// Who waits where, when no thread of the CTA can run.
static std::string describe_stall(Worker* w) {
  unsigned exited = 0;
  const Fiber* first_exited = nullptr;
  for (Fiber* f : w->fibers)
    if (f->state == FState::Exited) {
      if (!first_exited) first_exited = f;
      exited++;
    }
  std::string s;
  for (unsigned id = 0; id < 16; ++id) {
    Barrier& b = w->bars[id];
    if (!b.arrived) continue;
    bool sync = id == 0 && b.line > 0;
    s += std::to_string(b.arrived) + " of " + std::to_string(b.expected) + " threads wait at " +
         (sync ? "__syncthreads" : "barrier " + std::to_string(id)) + (b.line > 0 ? std::string(" at ") + b.file + ":" + std::to_string(b.line) : "") +
         (b.waiters.empty() ? std::string("; ") : " (first: thread " + tid_str(b.waiters.front()) + "); ");
  }
  for (std::size_t wi = 0; wi < w->warps.size(); ++wi)
    for (Collective& c : w->warps[wi].active)
      s += "warp " + std::to_string(wi) + ": lanes " + lanes_str(c.arrived) + " wait in a collective with mask " +
           mask_str(c.mask) + " for lanes " + lanes_str(c.mask & ~c.arrived) + "; ";
  if (exited)
    s += std::to_string(exited) + " thread(s) already exited (first: thread " + tid_str(first_exited) + ")";
  std::string head = exited && w->bars[0].arrived ? "divergent __syncthreads: " : "deadlock: ";
  return head + "no thread of the CTA can run: " + s;
}

static void grow(Launch* L);

static void run_cta(Worker* w, unsigned cta) {
  Launch* L = w->L;
  w->cta = cta;
  w->bid[0] = cta % L->grid[0];
  w->bid[1] = (cta / L->grid[0]) % L->grid[1];
  w->bid[2] = cta / (L->grid[0] * L->grid[1]);
  unsigned n = L->nthreads;
  w->nthreads = n;
  // shared memory starts poisoned (0xFF: NaN in fp32/fp16/bf16), as far as this launch can use it
  unsigned char* dyn_end = w->dyn_lo + L->shared_mem;
  std::memset(w->tls_lo, 0xff, dyn_end - w->tls_lo);
  unsigned char* dyn_hi = w->dyn_lo + kDynamicSmemBytes;
  if (w->tls_hi > dyn_hi) std::memset(dyn_hi, 0xff, w->tls_hi - dyn_hi);
  w->epoch++;
  for (auto& b : w->bars) b = Barrier();
  unsigned nwarps = (n + 31) / 32;
  w->warps.assign(nwarps, WarpState());
  for (unsigned i = 0; i < nwarps; ++i) {
    unsigned live = n - i * 32 >= 32 ? 32 : n - i * 32;
    w->warps[i].exists = live == 32 ? 0xffffffffu : ((1u << live) - 1);
  }
  for (unsigned t = 0; t < n; ++t) {
    Fiber* f = w->fibers[t];
    f->abi.tid[0] = t % L->block[0];
    f->abi.tid[1] = (t / L->block[0]) % L->block[1];
    f->abi.tid[2] = t / (L->block[0] * L->block[1]);
    std::memcpy(f->abi.bid, w->bid, sizeof w->bid);
    std::memcpy(f->abi.bdim, L->block, sizeof L->block);
    std::memcpy(f->abi.gdim, L->grid, sizeof L->grid);
    f->abi.linear_tid = t;
    f->abi.lane = t % 32;
    f->abi.warp = t / 32;
    f->abi.nthreads = n;
    f->state = FState::Runnable;
    f->why = Why::None;
    f->worker = w;
    f->wait_kind = 0;
    f->copies.clear();
    f->copy_data.clear();
    f->open_group = 1;
    start_fiber(f);
  }
  unsigned alive = n;
  unsigned spin_rounds = 0;
  while (alive) {
    bool ran = false, only_yields = true;
    for (unsigned t = 0; t < n; ++t) {
      Fiber* f = w->fibers[t];
      if (f->state != FState::Runnable) continue;
      w->current = f;
      fmo_sim_switch(&w->sched_sp, f->sp);
      w->current = nullptr;
      ran = true;
      if (L->abort.load(std::memory_order_relaxed)) return;
      if (f->why == Why::Exit) {
        alive--;
        only_yields = false;
        WarpState& ws = w->warps[f->abi.warp];
        ws.exited |= 1u << f->abi.lane;
        for (Collective& c : ws.active)
          if ((c.mask >> f->abi.lane) & 1) {
            L->set_error(where(w, c.fibers[__builtin_ctz(c.arrived)]) + ": warp collective with mask " +
                         mask_str(c.mask) + " names lane " + std::to_string(f->abi.lane) +
                         ", which exited without joining it");
            return;
          }
      } else if (f->why != Why::Yield) {
        only_yields = false;
      }
    }
    if (!alive) break;
    if (!ran) {
      L->set_error(where(w, nullptr) + ": " + describe_stall(w));
      return;
    }
    if (!only_yields) {
      spin_rounds = 0;
      continue;
    }
    // Every live thread yielded: after a few such rounds the CTA spins. Let other workers
    // (CTAs, processes) run, and let waiting CTAs become resident.
    ++spin_rounds;
    if (spin_rounds >= 2) sched_yield();
    if (spin_rounds >= 8 && (spin_rounds & 7) == 0) grow(L);
    if ((spin_rounds & 63) == 0 && now_s() > L->deadline) {
      L->set_error(where(w, nullptr) + ": timed out after FMO_SIM_TIMEOUT seconds; threads still spin");
      return;
    }
  }
}

static void worker_main(std::shared_ptr<Launch> L);

// Stopping a thread that spins without ever yielding (a volatile spin in a plain build): on
// time-out the launcher signals each worker; the handler, running on the spinning fiber's
// stack, switches straight back to the scheduler, which sees the abort and ends the CTA. The
// handler frame is abandoned with the fiber (SA_NODEFER: the signal stays unblocked).
static int abort_signal() { return SIGRTMIN + 7; }

static void on_abort_signal(int) {
  Worker* w = tl_worker;
  if (!w || !w->current || !w->L->abort.load()) return;
  Fiber* f = w->current;
  f->state = FState::Exited;
  to_scheduler(f, Why::Dead);
}

static void install_abort_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_abort_signal;
    sa.sa_flags = SA_NODEFER | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(abort_signal(), &sa, nullptr);
  });
}

// A CTA only spins: if CTAs still wait to start, add a worker so they become resident (a
// CTA may spin on a flag that a later CTA sets, as on a GPU where all of them fit).
static void grow(Launch* L) {
  std::lock_guard<std::mutex> g(L->m);
  if (L->workers >= L->max_workers || L->next_cta.load() >= L->nctas || L->abort.load()) return;
  std::shared_ptr<Launch> sp = L->self.lock();
  if (!sp) return;
  L->workers++;
  g_pool->submit([sp] { worker_main(sp); });
}

static void worker_main(std::shared_ptr<Launch> L) {
  Worker w;
  w.L = L.get();
  tl_worker = &w;
  {
    std::lock_guard<std::mutex> g(L->m);
    L->threads.push_back(pthread_self());
  }
  Module* mod = L->mod;
  w.dyn_lo = mod->dynamic_smem();  // also allocates this thread's TLS block of the module
  extern unsigned char* module_tls_block(Module*);
  w.tls_lo = module_tls_block(mod);
  w.tls_hi = w.tls_lo + mod->tls_size;
  if (L->racecheck) w.shadow.assign(w.tls_hi - w.tls_lo, Shadow{});
  try {
    for (unsigned t = 0; t < L->nthreads; ++t) w.fibers.push_back(alloc_fiber());
    while (!L->abort.load()) {
      unsigned cta = L->next_cta.fetch_add(1);
      if (cta >= L->nctas) break;
      run_cta(&w, cta);
    }
  } catch (const std::exception& e) {
    L->set_error(std::string("simulator worker failed: ") + e.what());
  }
  free_fibers(w.fibers);
  tl_worker = nullptr;
  std::lock_guard<std::mutex> g(L->m);
  L->finished++;
  L->threads.erase(std::find(L->threads.begin(), L->threads.end(), pthread_self()));
  L->cv.notify_all();
}

std::string launch(std::shared_ptr<Launch> L, unsigned workers, double timeout_s) {
  if (workers < 1) workers = 1;
  if (workers > L->nctas) workers = L->nctas;
  unsigned start = std::max(1u, std::thread::hardware_concurrency());
  if (start > workers) start = workers;
  L->max_workers = workers;
  install_abort_handler();
  L->self = L;
  L->deadline = now_s() + timeout_s;
  std::unique_lock<std::mutex> g(L->m);
  L->workers = start;
  for (unsigned i = 0; i < start; ++i) g_pool->submit([L] { worker_main(L); });
  auto done = [&] { return L->finished == L->workers; };
  if (!L->cv.wait_for(g, std::chrono::duration<double>(timeout_s), done)) {
    if (L->error.empty())
      L->error = "kernel " + L->kernel + ": timed out after " + std::to_string((int)timeout_s) +
                 " s (FMO_SIM_TIMEOUT); a thread spins without yielding (spin on atomics, __nanosleep or "
                 "fmo_sim::yield()) or waits for a CTA that cannot become resident";
    L->abort.store(true);
    // threads that spin through yields notice the abort; give them a moment
    for (pthread_t t : L->threads) pthread_kill(t, abort_signal());
    L->cv.wait_for(g, std::chrono::seconds(2), done);
  }
  return L->error;
}

}  // namespace fmo_sim
