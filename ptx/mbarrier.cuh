// ptx/mbarrier.cuh: shared-memory transaction barriers (PTX ISA, Parallel Synchronization and
// Communication Instructions, "mbarrier"), sm_90 for the .expect_tx / transaction forms.
//
//   mbarrier_init(bar, n)              mbarrier.init.shared::cta.b64 [bar], n
//   fence_mbarrier_init()              fence.mbarrier_init.release.cluster
//   mbarrier_arrive(bar)               mbarrier.arrive.shared::cta.b64 state, [bar]
//   mbarrier_arrive_expect_tx(bar, b)  mbarrier.arrive.expect_tx.shared::cta.b64 state, [bar], b
//   mbarrier_expect_tx(bar, b)         mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [bar], b
//   mbarrier_try_wait_parity(bar, p)   mbarrier.try_wait.parity.shared::cta.b64 pred, [bar], p
//   mbarrier_wait_parity(bar, p)       loops on try_wait
//   fence_proxy_async()                fence.proxy.async.shared::cta
//
// A barrier's current phase completes when its pending arrival count reaches 0 and its
// transaction count (bytes announced by expect_tx, minus bytes that TMA reported with
// complete_tx) is 0; then the phase flips and the pending count is reset to the init count.
// try_wait.parity p returns true when the phase with parity p has completed, i.e. when the
// current phase's parity differs from p (the ISA's phaseParity operand). A fresh barrier is in
// phase 0, so waiting on parity 1 returns at once (the "previous phase" of a ring's empty
// barriers). fence.proxy.async orders generic-proxy shared-memory writes before a following
// async-proxy read of them (TMA store from smem written by st.shared).
//
// Emulation (FMO_SIM): per-CTA state kept by the emulation (keyed by the barrier's address;
// the 8-byte word itself holds a token so a barrier overwritten by plain stores is noticed).
// Bytes of a TMA load land (and complete their transaction) only when some thread polls the
// barrier they complete, never at issue: shared memory read before the wait is stale poison.
// It fails the launch, naming the barrier (#k = k-th initialised in the CTA, and its address):
//   - use of a barrier that was never initialised, not in shared memory, or not 8-aligned;
//   - an init count of 0 or above 2^20 - 1, a tx count outside the ISA's range;
//   - a waiter two phases away: this thread's next phase of parity p has already completed
//     and another after it (the parity bit aliases; hardware would wait a phase too long);
//   - more bytes completing than announced once all arrivals are in (tx count < 0);
//   - more arrivals than the count (an arrival while the phase's arrivals are all in and it
//     waits for transaction bytes; an arrival beyond that starts the next phase, which the
//     waiters then find two phases away);
//   - deadlock: every thread of the CTA waits on an mbarrier and nothing changes (report of
//     the barrier: phase, pending arrivals, outstanding tx bytes, loads in flight).
// The deadlock check cannot count threads that exited (a producer warp's idle lanes): then a
// waiter that sees no mbarrier/TMA event in the CTA for 20 s reports the same deadlock.
#pragma once

#include "ptx/common.cuh"

#ifdef FMO_SIM
#include <cstdlib>
#endif

namespace fmo {
namespace ptx {

#ifdef FMO_SIM
namespace sim_detail {

constexpr uint32_t kMbarMaxCount = (1u << 20) - 1;  // ISA: arrive count and tx count range
constexpr unsigned long long kMbarStallNs = 20ull * 1000 * 1000 * 1000;
constexpr uint64_t kMbarToken = 0xfb0a5e1500000000ull;

struct MbarState {
  const void* addr;   // the barrier (nullptr: free entry)
  uint32_t id;        // k-th barrier initialised in this CTA
  uint32_t expected;  // init count
  uint32_t pending;   // arrivals still missing in the current phase
  int64_t tx;         // transaction bytes outstanding in the current phase
  int64_t phase;      // completed phases (current phase index)
  int64_t* seen;      // per thread: the last phase it observed completed (-1: none), heap
};

// A TMA load in flight: bytes read from global at issue, landing in shared memory later.
struct PendingLoad {
  uint64_t* bar;  // nullptr: free entry
  unsigned char* dst;
  unsigned char* data;  // heap, `bytes` long
  size_t bytes;
};

// A TMA store / reduce in a thread's bulk async-group: performed at the wait that retires it.
struct PendingStore {
  unsigned char map[128];  // the tensor map (copied at issue)
  const unsigned char* src;
  int32_t coord[5];
  uint32_t tid;    // issuing thread
  int64_t group;   // its bulk group number (-1: still open); -2: free entry
  bool reduce;
};

// Fixed-size and plain (no STL): emulation state is touched only by no_sanitize_thread code,
// so checking builds (whose user code is instrumented) see none of it.
constexpr int kMaxMbar = 64, kMaxLoads = 64, kMaxStores = 64, kMaxThreadsAsync = 1024;
struct CtaAsyncState {
  MbarState bars[kMaxMbar];
  PendingLoad loads[kMaxLoads];
  PendingStore stores[kMaxStores];
  int64_t groups_committed[kMaxThreadsAsync];  // per thread: bulk groups committed so far
  int64_t groups_retired[kMaxThreadsAsync];    // per thread: groups below this have retired
  uint32_t next_id;
  uint32_t waiting;     // threads inside mbarrier_wait_parity
  uint64_t epoch;       // bumped by every state change
  uint64_t idle_polls;  // failed polls since the last change
};

FMO_SIM_EMU void cta_async_reset(CtaAsyncState* s) {
  for (auto& b : s->bars) free(b.seen);
  for (auto& l : s->loads) free(l.data);
  memset(s, 0, sizeof *s);
  for (auto& st : s->stores) st.group = -2;
}

// Per CTA: the module's thread_local block is the CTA's shared memory, poisoned at each CTA
// start (csrc/sim/device_api.h), so a slot whose magic is gone marks a new CTA on this worker;
// the heap state behind it is reused, found by the slot's address in a small global table.
struct CtaAsyncSlot {
  uint64_t magic;
  CtaAsyncState* state;
};
constexpr uint64_t kCtaAsyncMagic = 0x46'4d'4f'41'53'59'4e'43ull;
// `static` (internal linkage), not a function-local static of an inline function: GCC makes
// those GNU-unique, bound process-wide across modules, outside this module's shared memory
// (never poisoned): see ptx/wgmma.cuh's g_wgmma.
static thread_local CtaAsyncSlot g_cta_async_slot;
constexpr int kAsyncPool = 1024;  // workers (slots) per module
static struct {
  const void* key;
  CtaAsyncState* state;
} g_cta_async_pool[kAsyncPool];
static int g_cta_async_lock;

FMO_SIM_EMU CtaAsyncState& cta_async() {
  CtaAsyncSlot& slot = g_cta_async_slot;
  if (slot.magic != kCtaAsyncMagic) {
    while (__atomic_exchange_n(&g_cta_async_lock, 1, __ATOMIC_ACQUIRE)) {
    }
    CtaAsyncState* s = nullptr;
    int i = 0;
    for (; i < kAsyncPool && g_cta_async_pool[i].key; ++i)
      if (g_cta_async_pool[i].key == &slot) {
        s = g_cta_async_pool[i].state;
        break;
      }
    if (s == nullptr) {
      if (i == kAsyncPool) {
        __atomic_store_n(&g_cta_async_lock, 0, __ATOMIC_RELEASE);
        fmo_sim::fail("mbarrier/TMA emulation: more than %d workers", kAsyncPool);
      }
      s = static_cast<CtaAsyncState*>(calloc(1, sizeof(CtaAsyncState)));
      g_cta_async_pool[i].key = &slot;
      g_cta_async_pool[i].state = s;
    }
    __atomic_store_n(&g_cta_async_lock, 0, __ATOMIC_RELEASE);
    cta_async_reset(s);
    slot.state = s;
    slot.magic = kCtaAsyncMagic;
  }
  return *slot.state;
}

FMO_SIM_EMU MbarState* mbar_find(const void* bar) {
  auto& st = cta_async();
  for (auto& b : st.bars)
    if (b.addr == bar) return &b;
  return nullptr;
}

FMO_SIM_EMU MbarState& mbar(uint64_t* bar, const char* what) {
  if (!fmo_sim::is_shared(bar))
    fmo_sim::fail("%s: mbarrier address %p is not in shared memory", what, static_cast<void*>(bar));
  require_aligned(bar, 8, what);
  MbarState* b = mbar_find(bar);
  if (b == nullptr)
    fmo_sim::fail("%s: mbarrier at %p was never initialised (mbarrier_init)", what, static_cast<void*>(bar));
  uint64_t word;
  memcpy(&word, bar, 8);
  if (word != (kMbarToken | b->id))
    fmo_sim::fail("%s: mbarrier #%u at %p was overwritten by ordinary stores after mbarrier_init", what, b->id,
                  static_cast<void*>(bar));
  return *b;
}

FMO_SIM_EMU void mbar_try_complete(uint64_t* bar, MbarState& b, const char* what) {
  if (b.tx < 0 && b.pending == 0)
    fmo_sim::fail("%s: mbarrier #%u at %p: %lld more transaction bytes completed than expect_tx announced "
                  "(phase %lld)", what, b.id, static_cast<void*>(bar), static_cast<long long>(-b.tx),
                  static_cast<long long>(b.phase));
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
  }
  ++cta_async().epoch;
}

FMO_SIM_EMU void mbar_add_tx(uint64_t* bar, MbarState& b, int64_t bytes, const char* what) {
  b.tx += bytes;
  if (b.tx > kMbarMaxCount || b.tx < -static_cast<int64_t>(kMbarMaxCount))
    fmo_sim::fail("%s: mbarrier #%u at %p: tx count %lld is outside the ISA's range +-(2^20 - 1)", what, b.id,
                  static_cast<void*>(bar), static_cast<long long>(b.tx));
}

FMO_SIM_EMU void mbar_arrive(uint64_t* bar, uint32_t tx, const char* what) {
  MbarState& b = mbar(bar, what);
  if (b.pending == 0)
    fmo_sim::fail("%s: mbarrier #%u at %p: more arrivals than its count %u in phase %lld (all arrived, %lld "
                  "transaction bytes still outstanding)", what, b.id, static_cast<void*>(bar), b.expected,
                  static_cast<long long>(b.phase), static_cast<long long>(b.tx));
  mbar_add_tx(bar, b, tx, what);
  --b.pending;
  mbar_try_complete(bar, b, what);
}

// Land every TMA load in flight to `bar`: its bytes appear in shared memory and complete
// their transaction on the barrier.
FMO_SIM_EMU void mbar_land(uint64_t* bar) {
  auto& st = cta_async();
  for (auto& ld : st.loads) {  // in issue order (slots are taken lowest first)
    if (ld.bar != bar) continue;
    // Not reported to racecheck: the landing runs on whichever thread polls, and racecheck's
    // barrier intervals do not know that the mbarrier wait orders it before every reader (it
    // would report each consumer). The destination's bounds were checked at issue.
    memcpy(ld.dst, ld.data, ld.bytes);
    free(ld.data);
    const size_t bytes = ld.bytes;
    ld = PendingLoad{};
    MbarState& b = mbar(bar, "TMA complete_tx");
    mbar_add_tx(bar, b, -static_cast<int64_t>(bytes), "TMA complete_tx");
    mbar_try_complete(bar, b, "TMA complete_tx");
  }
}

FMO_SIM_EMU bool mbar_try_wait(uint64_t* bar, uint32_t parity, const char* what) {
  if (parity > 1) fmo_sim::fail("%s: parity %u is not 0 or 1", what, parity);
  mbar_land(bar);
  MbarState& b = mbar(bar, what);
  const uint32_t tid = fmo_sim::cur()->linear_tid;
  if (b.seen == nullptr) {
    b.seen = static_cast<int64_t*>(malloc(sizeof(int64_t) * kMaxThreadsAsync));
    for (int i = 0; i < kMaxThreadsAsync; ++i) b.seen[i] = -1;
  }
  if (tid >= static_cast<uint32_t>(kMaxThreadsAsync)) fmo_sim::fail("%s: at most %d threads per CTA", what, kMaxThreadsAsync);
  const int64_t last = b.seen[tid];  // phase -1: parity 1
  // The phase this thread means: the one it observed last if that has parity p (a repeated
  // wait), else the next one with parity p.
  const int64_t want = ((last & 1) == static_cast<int64_t>(parity)) ? last
                       : (((last + 1) & 1) == static_cast<int64_t>(parity) ? last + 1 : last + 2);
  if (want < b.phase - 1)
    fmo_sim::fail("%s: mbarrier #%u at %p: this thread waits on parity %u meaning phase %lld, but phases up to "
                  "%lld have completed: two or more phases away (the parity bit aliases; a missed wait or "
                  "extra arrivals)", what, b.id, static_cast<void*>(bar), parity, static_cast<long long>(want),
                  static_cast<long long>(b.phase - 1));
  const bool done = want < b.phase;
  if (done) b.seen[tid] = want;
  return done;
}

FMO_SIM_EMU void mbar_wait(uint64_t* bar, uint32_t parity) {
  auto& st = cta_async();
  ++st.waiting;
  uint64_t seen_epoch = st.epoch;
  unsigned long long since = fmo_sim::globaltimer();
  for (;;) {
    const uint64_t before = st.epoch;
    if (mbar_try_wait(bar, parity, "mbarrier.try_wait.parity")) break;
    if (st.epoch != before) st.idle_polls = 0;
    if (st.epoch != seen_epoch) {
      seen_epoch = st.epoch;
      since = fmo_sim::globaltimer();
    }
    const uint32_t n = fmo_sim::cur()->nthreads;
    const bool all_wait = st.waiting == n && ++st.idle_polls > 4ull * n + 64;
    // Threads that exited cannot be counted: past kMbarStallNs without any mbarrier or TMA
    // event in the CTA while this thread waits, the CTA is reported stuck as well.
    const bool stalled = fmo_sim::globaltimer() - since > kMbarStallNs;
    if (all_wait || stalled) {
      const MbarState& b = *mbar_find(bar);
      size_t inflight = 0;
      for (auto& l : st.loads) inflight += l.bar == bar;
      fmo_sim::fail("deadlock: %s; this thread waits on mbarrier #%u at %p parity %u: phase %lld has %u of %u "
                    "arrivals missing and %lld transaction bytes outstanding, %zu TMA loads in flight to it",
                    all_wait ? "all threads of the CTA wait on mbarriers and nothing changes"
                             : "no mbarrier or TMA event in the CTA for 20 s while threads wait",
                    b.id, static_cast<void*>(bar), parity, static_cast<long long>(b.phase), b.pending, b.expected,
                    static_cast<long long>(b.tx), inflight);
    }
    fmo_sim::yield();
  }
  --st.waiting;
}

FMO_SIM_EMU void mbar_init(uint64_t* bar, uint32_t arrive_count) {
  if (!fmo_sim::is_shared(bar))
    fmo_sim::fail("mbarrier.init: address %p is not in shared memory", static_cast<void*>(bar));
  require_aligned(bar, 8, "mbarrier.init");
  if (arrive_count == 0 || arrive_count > kMbarMaxCount)
    fmo_sim::fail("mbarrier.init: arrive count %u is not in 1..2^20-1", arrive_count);
  auto& st = cta_async();
  for (auto& l : st.loads)
    if (l.bar == bar) fmo_sim::fail("mbarrier.init: mbarrier at %p re-initialised with TMA loads in flight to it",
                                    static_cast<void*>(bar));
  MbarState* b = mbar_find(bar);
  if (b == nullptr) b = mbar_find(nullptr);
  if (b == nullptr) fmo_sim::fail("mbarrier.init: the emulation holds at most %d mbarriers per CTA", kMaxMbar);
  free(b->seen);
  *b = MbarState{bar, st.next_id++, arrive_count, arrive_count, 0, 0, nullptr};
  const uint64_t word = kMbarToken | b->id;
  fmo_sim::check_access(bar, 8, true);
  memcpy(bar, &word, 8);
  ++st.epoch;
}

FMO_SIM_EMU void mbar_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
  MbarState& b = mbar(bar, "mbarrier.expect_tx");
  mbar_add_tx(bar, b, tx_bytes, "mbarrier.expect_tx");
  ++cta_async().epoch;
}

}  // namespace sim_detail
#endif  // FMO_SIM

// Initialise the barrier for `arrive_count` arrivals per phase (phase 0, tx count 0). One
// thread initialises; fence_mbarrier_init() + a CTA barrier publish it to the others.
FMO_DEVICE void mbarrier_init(uint64_t* bar, uint32_t arrive_count) {
#ifdef FMO_SIM
  sim_detail::mbar_init(bar, arrive_count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrive_count) : "memory");
#endif
}

// Makes mbarrier_init visible to the async proxy (TMA) and other CTAs of the cluster.
FMO_DEVICE void fence_mbarrier_init() {
#ifdef FMO_SIM
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#else
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// fence.proxy.async.shared::cta: generic-proxy smem writes before it are seen by async-proxy
// operations (TMA store/reduce, wgmma operands) after it.
FMO_DEVICE void fence_proxy_async() {
#ifdef FMO_SIM
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#else
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One arrival (release semantics at CTA scope).
FMO_DEVICE void mbarrier_arrive(uint64_t* bar) {
#ifdef FMO_SIM
  sim_detail::mbar_arrive(bar, 0, "mbarrier.arrive");
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// Announce tx_bytes of transactions for the current phase, then arrive.
FMO_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
#ifdef FMO_SIM
  sim_detail::mbar_arrive(bar, tx_bytes, "mbarrier.arrive.expect_tx");
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(tx_bytes)
               : "memory");
#endif
}

// Announce tx_bytes without arriving.
FMO_DEVICE void mbarrier_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
#ifdef FMO_SIM
  sim_detail::mbar_expect_tx(bar, tx_bytes);
#else
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(tx_bytes)
               : "memory");
#endif
}

// True when the phase of parity `parity` has completed (acquire at CTA scope). May return
// false spuriously after a hardware time limit; callers loop.
FMO_DEVICE bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
#ifdef FMO_SIM
  const bool done = sim_detail::mbar_try_wait(bar, parity, "mbarrier.try_wait.parity");
  if (!done) fmo_sim::yield();
  return done;
#else
  uint32_t ok;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return ok != 0;
#endif
}

// Block until the phase of parity `parity` has completed.
FMO_DEVICE void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
#ifdef FMO_SIM
  sim_detail::mbar_wait(bar, parity);
#else
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
#endif
}

}  // namespace ptx
}  // namespace fmo
