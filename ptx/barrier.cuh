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
// .acq_rel) - the simulator is one process, so scopes coincide. Named barriers are the
// simulator runtime's barriers (fmo_sim::named_barrier / named_barrier_arrive: per-CTA
// arrival counts per id, racecheck-aware), after the ISA's operand checks: ids >= 16 and n
// not a positive multiple of 32 fail the launch, and so (in the runtime) does a phase whose
// arrivals disagree on n. Arrivals are counted per thread (hardware counts a warp as 32 when
// it arrives, the same when whole warps arrive, as .aligned requires).
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
// bar.sync / bar.arrive on the simulator runtime's barriers (the prelude's named_barrier /
// named_barrier_arrive), which racecheck and the deadlock diagnostics understand and which
// __syncthreads() shares as id 0, as on the GPU. The ISA's operand rules are checked here.
FMO_SIM_EMU void named_barrier(unsigned id, unsigned n, bool wait, const char* what) {
  if (id >= 16) fmo_sim::fail("%s: barrier id %u is not in 0..15", what, id);
  if (n == 0 || n % 32 != 0)
    fmo_sim::fail("%s %u: thread count %u is not a positive multiple of the warp size", what,
                  id, n);
  if (wait)
    fmo_sim::named_barrier(id, n);
  else
    fmo_sim::named_barrier_arrive(id, n);
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
