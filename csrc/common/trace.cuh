// csrc/common/trace.cuh: per-CTA start/end stamps of every kernel (FMO_TRACE=1).
//
// With tracing compiled in, the generated stub of every kernel (fastmoe_ops/runtime/spec.py)
// takes a second parameter `fmo::trace::Args` and wraps the kernel body:
//     t0 = trace::begin();  body(p);  trace::end(args, t0);
// Thread 0 of the CTA reads %globaltimer before the body; after the body every thread of the
// CTA meets at a __syncthreads (threads that returned early from the body meet there too:
// the body is a function call, its `return`s come back to the stub), then thread 0 reads the
// timer again and appends one Record. The slot comes from an atomic counter that keeps
// counting past `capacity`: records past the end are not written, and the host sees
// count > capacity and reports the overflow instead of returning a truncated trace.
//
// Also here: `rendezvous`, a probe kernel of the trace tests and the GPU check. Two launches
// on two streams each announce themselves and wait (bounded by a timeout) for the other, so
// both finishing without a timeout proves they were in flight together.
#pragma once

#include "ptx/common.cuh"
#include "ptx/ld_st.cuh"
#include "ptx/timer.cuh"

namespace fmo {
namespace trace {

// Mirrored by fastmoe_ops/trace.py (_Record, TraceArgs); the stub static_asserts the layout.
struct Record {
  uint32_t launch_id;
  uint32_t cta;        // linear block index: x + gridDim.x * (y + gridDim.y * z)
  uint32_t smid;
  uint32_t reserved;
  uint64_t start_ns;   // %globaltimer before the body (thread 0)
  uint64_t end_ns;     // %globaltimer after the CTA-wide barrier that follows the body
};
static_assert(sizeof(Record) == 32, "trace::Record: 32 bytes, mirrored in fastmoe_ops/trace.py");

struct Args {
  Record* records;               // [capacity]
  unsigned long long* count;     // records appended so far (may exceed capacity: overflow)
  uint32_t capacity;
  uint32_t launch_id;            // host table: launch id -> kernel name, stream role, engine
};

FMO_DEVICE bool is_thread0() { return threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0; }

FMO_DEVICE uint64_t begin() { return is_thread0() ? ptx::globaltimer() : 0; }

FMO_DEVICE void end(const Args& a, uint64_t start_ns) {
  __syncthreads();  // the CTA's end is its last thread's end
  if (!is_thread0()) return;
  const uint64_t end_ns = ptx::globaltimer();
  const unsigned long long slot = ptx::atom_add(a.count, 1ull);
  if (slot >= a.capacity) return;  // counted, not written: the host reports the overflow
  Record r;
  r.launch_id = a.launch_id;
  r.cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  r.smid = ptx::smid();
  r.reserved = 0;
  r.start_ns = start_ns;
  r.end_ns = end_ns;
  a.records[slot] = r;
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

}  // namespace trace
}  // namespace fmo
