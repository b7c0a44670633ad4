// csrc/common/trace.cuh: per-CTA start/end stamps of every kernel (FMO_TRACE=1).
//
// With tracing compiled in, the generated stub of every kernel (fastmoe_ops/runtime/spec.py)
// takes a second parameter `fmo::trace::Args` and wraps the kernel body:
//     trace::begin(args);  body(p);  trace::end(args);
// Thread 0 of the CTA appends a `start` event (%globaltimer) before the body; after the body
// every thread of the CTA meets at a __syncthreads (threads that returned early from the body
// meet there too: the body is a function call, its `return`s come back to the stub), then
// thread 0 appends the `end` event. Two events instead of one record keep no value live
// across the body: a stamp held in a register through a 255-register GEMM mainloop spills.
// Slots come from an atomic counter that keeps counting past `capacity`: events past the end
// are not written, and the host sees count > capacity and reports the overflow instead of
// returning a truncated trace. The host pairs each CTA's start and end.
//
// Also here: `rendezvous`, a probe kernel of the trace tests and the GPU check. Two launches
// on two streams each announce themselves and wait (bounded by a timeout) for the other, so
// both finishing without a timeout proves they were in flight together. And `clock_probe`,
// which reads %globaltimer once so the host can put device stamps on its own time axis.
#pragma once

#include "ptx/common.cuh"
#include "ptx/ld_st.cuh"
#include "ptx/timer.cuh"

namespace fmo {
namespace trace {

// Mirrored by fastmoe_ops/trace.py (RECORD_DTYPE, TraceArgs); the stub static_asserts Args.
struct Record {
  uint32_t launch_id;
  uint32_t cta;        // linear block index: x + gridDim.x * (y + gridDim.y * z)
  uint32_t smid;
  uint32_t kind;       // kStart or kEnd
  uint64_t time_ns;    // %globaltimer
};
static_assert(sizeof(Record) == 24, "trace::Record: 24 bytes, mirrored in fastmoe_ops/trace.py");
constexpr uint32_t kStart = 1, kEnd = 2;  // 0 never: a slot still holding zeros was never written

struct Args {
  Record* records;               // [capacity]
  unsigned long long* count;     // events appended so far (may exceed capacity: overflow)
  uint32_t capacity;
  uint32_t launch_id;            // host table: launch id -> kernel name, stream role, engine
};

FMO_DEVICE bool is_thread0() { return threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0; }

FMO_DEVICE void append(const Args& a, uint32_t kind) {
  const uint64_t now = ptx::globaltimer();
  const unsigned long long slot = ptx::atom_add(a.count, 1ull);
  if (slot >= a.capacity) return;  // counted, not written: the host reports the overflow
  Record r;
  r.launch_id = a.launch_id;
  r.cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  r.smid = ptx::smid();
  r.kind = kind;
  r.time_ns = now;
  a.records[slot] = r;
}

FMO_DEVICE void begin(const Args& a) {
  if (is_thread0()) append(a, kStart);
}

FMO_DEVICE void end(const Args& a) {
  __syncthreads();  // the CTA's end is its last thread's end
  if (is_thread0()) append(a, kEnd);
}

// ---- rendezvous probe --------------------------------------------------------------------
struct RendezvousParams {
  uint32_t* flags;      // [2] zero before the pair is launched
  uint32_t* met;        // [2] out: 1 = saw the other launch, 2 = timed out
  uint64_t timeout_ns;
  uint32_t me;          // 0 or 1
  uint32_t reserved;
};

FMO_DEVICE void rendezvous(const RendezvousParams& p) {
  if (!is_thread0() || blockIdx.x != 0) return;
  ptx::st_release(p.flags + p.me, 1u);
  const uint64_t t0 = ptx::globaltimer();
  uint32_t seen = 0;
  // ld_acquire yields in the simulator, so the other launch's CTA gets to run.
  while ((seen = ptx::ld_acquire(p.flags + (1 - p.me))) == 0 && ptx::globaltimer() - t0 < p.timeout_ns) {
  }
  p.met[p.me] = seen ? 1u : 2u;
}

// ---- clock probe ---------------------------------------------------------------------------
// One %globaltimer reading; the host brackets the launch with its own clock to map device
// stamps onto host time (fastmoe_ops.trace.clock_offset). Never traced itself.
struct ClockParams {
  unsigned long long* out;  // [1]
};

FMO_DEVICE void clock_probe(const ClockParams& p) {
  if (is_thread0() && blockIdx.x == 0) *p.out = ptx::globaltimer();
}

}  // namespace trace
}  // namespace fmo
