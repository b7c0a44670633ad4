// ptx/barrier.cuh: memory fences and named CTA barriers.
//
//   fence_acq_rel<S>()    fence.acq_rel.{cta,gpu,sys}   (PTX ISA, "membar / fence")
//   fence_sc<S>()         fence.sc.{cta,gpu,sys}
//   bar_sync(id, n)       bar.sync id, n     (PTX ISA, "bar, barrier"; = barrier.sync.aligned)
//   bar_arrive(id, n)     bar.arrive id, n   (= barrier.arrive.aligned)
//
// Named barriers: 16 per CTA (id 0..15), n threads, n a multiple of the warp size (32).
// bar.sync waits until n threads have arrived at barrier `id` (counting both bar.sync and
// bar.arrive), bar.arrive counts itself and goes on: the producer/consumer pattern of
// warp-specialised kernels (producers arrive, consumers sync). __syncthreads() is barrier 0
// with all threads; keep named barriers at id >= 1 so the two never share a phase.
// The .aligned forms require every thread of a warp to execute the same instruction.
//
// Emulation (FMO_SIM): fences are __atomic_thread_fence (seq_cst for .sc, acq_rel for
// .acq_rel) - the simulator is one process, so scopes coincide. Named barriers keep
// per-CTA state (arrival count, phase) in thread_local storage of the CTA's worker thread;
// waiters call fmo_sim::yield() until their phase completes. They are the simulator
// runtime's barriers only for id 0 via __syncthreads: the runtime has no "arrive", so
// racecheck builds do not see named-barrier phases as synchronisation (see README). Arrivals are counted
// per thread (hardware counts a warp as 32 when it arrives, which is the same when whole
// warps arrive, as .aligned requires). A phase whose arrivals disagree on n fails the
// launch, as do ids >= 16 and n not a positive multiple of 32.
#pragma once

#include "ptx/common.cuh"

namespace fmo {
namespace ptx {

#ifdef FMO_SIM
namespace sim_detail {
// Not instrumented: TSan does not model standalone fences (-Wtsan).
FMO_SIM_EMU void thread_fence(bool sc) {
  if (sc)
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
  else
    __atomic_thread_fence(__ATOMIC_ACQ_REL);
}
}  // namespace sim_detail
#endif

// fence.acq_rel.{scope}: a lightweight fence; with relaxed accesses on both sides it gives
// release/acquire synchronisation (the "fence + relaxed flag" pattern).
template <Scope S = Scope::gpu>
FMO_DEVICE void fence_acq_rel() {
#ifdef FMO_SIM
  sim_detail::thread_fence(false);
#else
  FMO_PTX_SCOPED(S, "fence.acq_rel", ";\n", ::: "memory");
#endif
}

// fence.sc.{scope}: sequentially consistent fence (slower; needed for store->load order,
// e.g. Dekker-style flags).
template <Scope S = Scope::gpu>
FMO_DEVICE void fence_sc() {
#ifdef FMO_SIM
  sim_detail::thread_fence(true);
#else
  FMO_PTX_SCOPED(S, "fence.sc", ";\n", ::: "memory");
#endif
}

#ifdef FMO_SIM
namespace sim_detail {
struct NamedBarrier {
  unsigned arrived;   // arrivals in the current phase
  unsigned expected;  // n of the current phase (0: no arrival yet)
  unsigned phase;     // completed phases; waiters watch it change
};

// A CTA's fibers all run on one OS worker thread, one CTA at a time per worker (the
// simulator's `__shared__` is thread_local for the same reason), so per-worker state is
// per-CTA state and needs no lock. It must start clean in every CTA: a CTA may exit with a
// phase half-arrived (a consumer's last bar.arrive with no producer left to sync), which
// hardware allows. The state lives in the module's TLS block, which the runtime re-poisons
// (0xFF) at every CTA start, so `owner` never matches a real blockIdx then and the state is
// cleared; a change of blockIdx on the worker clears it too. Plain data, zero-initialised:
// no TLS guard variable.
struct CtaBarriers {
  unsigned owner[3];
  NamedBarrier bar[16];
};

// Internal linkage on purpose: a function-local static of an inline function would be one
// object shared by every loaded module (GNU_UNIQUE), outside the launching module's TLS.
namespace {
thread_local CtaBarriers cta_barrier_state;
}  // namespace

FMO_SIM_EMU NamedBarrier* cta_barriers() {
  CtaBarriers& state = cta_barrier_state;
  const uint3 b = blockIdx;
  if (state.owner[0] != b.x || state.owner[1] != b.y || state.owner[2] != b.z) {
    std::memset(&state, 0, sizeof(state));
    state.owner[0] = b.x;
    state.owner[1] = b.y;
    state.owner[2] = b.z;
  }
  return state.bar;
}

FMO_SIM_EMU void named_barrier(unsigned id, unsigned n, bool wait, const char* what) {
  if (id >= 16) fmo_sim::fail("%s: barrier id %u is not in 0..15", what, id);
  if (n == 0 || n % 32 != 0)
    fmo_sim::fail("%s %u: thread count %u is not a positive multiple of the warp size", what,
                  id, n);
  NamedBarrier& b = cta_barriers()[id];
  if (b.expected == 0) b.expected = n;
  if (b.expected != n)
    fmo_sim::fail("%s %u: thread count %u differs from %u given by other threads of this "
                  "phase", what, id, n, b.expected);
  const unsigned my_phase = b.phase;
  if (++b.arrived == n) {  // the last arrival completes the phase
    b.arrived = 0;
    b.expected = 0;
    __atomic_store_n(&b.phase, my_phase + 1, __ATOMIC_RELEASE);
    return;
  }
  if (!wait) return;
  while (__atomic_load_n(&b.phase, __ATOMIC_ACQUIRE) == my_phase) fmo_sim::yield();
}
}  // namespace sim_detail
#endif  // FMO_SIM

// Wait at named barrier `id` until `nthreads` threads (a multiple of 32) have arrived.
// Also orders the participating threads' memory accesses (like __syncthreads).
FMO_DEVICE void bar_sync(unsigned id, unsigned nthreads) {
#ifdef FMO_SIM
  sim_detail::named_barrier(id, nthreads, true, "bar.sync");
#else
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
#endif
}

// Arrive at named barrier `id` (expecting `nthreads` in all) without waiting.
FMO_DEVICE void bar_arrive(unsigned id, unsigned nthreads) {
#ifdef FMO_SIM
  sim_detail::named_barrier(id, nthreads, false, "bar.arrive");
#else
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
#endif
}

}  // namespace ptx
}  // namespace fmo
