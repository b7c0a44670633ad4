"""The kernels and cases of ptx/barrier.cuh's tests (named barriers, fences):
tests/test_ptx_barrier.py says what they check."""
from __future__ import annotations

import numpy as np

from .case import Case, assert_equal_bits, poisoned

SCOPES = ("cta", "gpu", "sys")
PHASES = 6

SOURCE = r"""
extern __shared__ __align__(16) unsigned char smem[];

// 128 threads: warps 0-1 produce into a 64-slot shared buffer, warps 2-3 consume.
// Barrier 1 (FULL): producers arrive, consumers sync. Barrier 2 (EMPTY): consumers arrive,
// producers sync before overwriting. out[p][c] = what consumer c read in phase p.
extern "C" __global__ void producer_consumer(unsigned* out, int phases) {
  unsigned* buf = reinterpret_cast<unsigned*>(smem);
  const int t = threadIdx.x;
  for (int p = 0; p < phases; ++p) {
    if (t < 64) {
      if (p > 0) bar_sync(2, 128);          // wait until the consumers drained phase p-1
      for (int spin = 0; spin < (t % 7) * 3; ++spin) fmo_spin_hint();
      buf[t] = 1000u * p + t;
      bar_arrive(1, 128);                   // phase p is full
    } else {
      bar_sync(1, 128);                     // wait for phase p
      out[p * 64 + (t - 64)] = buf[(t - 64 + 5) % 64];
      bar_arrive(2, 128);                   // drained (the last one is never waited for)
    }
  }
}

// Two 64-thread groups, barrier 3 and barrier 4, each exchanging values in its half of
// the buffer for `phases` rounds; group B starts late so a shared barrier would mix them.
extern "C" __global__ void independent_groups(unsigned* out, int phases) {
  unsigned* buf = reinterpret_cast<unsigned*>(smem);
  const int t = threadIdx.x, grp = t / 64, i = t % 64, id = 3 + grp;
  if (grp == 1) for (int spin = 0; spin < 50; ++spin) fmo_spin_hint();
  unsigned acc = 0;
  for (int p = 0; p < phases; ++p) {
    buf[64 * grp + i] = 100u * p + i + 7u * grp;
    bar_sync(id, 64);
    acc = acc * 31u + buf[64 * grp + (i + 1) % 64];
    bar_sync(id, 64);
  }
  out[t] = acc;
}

// Fence-fence message passing with relaxed flag accesses, thread 0 -> thread 32.
template <Scope S>
__device__ void fenced_message(unsigned* data, unsigned* flag, unsigned* out, int n) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < n; ++i) data[i] = 7u * i + 2u;
    fence_acq_rel<S>();
    st_relaxed<S>(flag, 1u);
  } else if (threadIdx.x == 32) {
    while (ld_relaxed<S>(flag) != 1u) {}
    fence_acq_rel<S>();
    for (int i = 0; i < n; ++i) out[i] = data[i];
  }
}
extern "C" __global__ void fence_mp_cta(unsigned* d, unsigned* f, unsigned* o, int n) { fenced_message<Scope::cta>(d, f, o, n); }
extern "C" __global__ void fence_mp_gpu(unsigned* d, unsigned* f, unsigned* o, int n) { fenced_message<Scope::gpu>(d, f, o, n); }
extern "C" __global__ void fence_mp_sys(unsigned* d, unsigned* f, unsigned* o, int n) { fenced_message<Scope::sys>(d, f, o, n); }

// Store buffering (Dekker): x = 1; fence.sc; r0 = y  ||  y = 1; fence.sc; r1 = x.
// With fence.sc, r0 == r1 == 0 is forbidden. Each trial uses fresh x, y.
extern "C" __global__ void fence_sc_sb(unsigned* xy, unsigned* r, int trials) {
  const int t = threadIdx.x;
  if (t != 0 && t != 32) return;
  const int me = t == 0 ? 0 : 1;
  for (int k = 0; k < trials; ++k) {
    unsigned* x = xy + 2 * k;
    st_relaxed<Scope::gpu>(x + me, 1u);
    fence_sc<Scope::gpu>();
    r[2 * k + me] = ld_relaxed<Scope::gpu>(x + 1 - me);
  }
}

// Error cases.
extern "C" __global__ void bad_count(unsigned* out) { bar_sync(1, 48); out[threadIdx.x] = 1; }
extern "C" __global__ void bad_id(unsigned* out) { bar_sync(16, 64); out[threadIdx.x] = 1; }
extern "C" __global__ void mismatched_count(unsigned* out) {
  bar_sync(5, threadIdx.x < 64 ? 128 : 64);
  out[threadIdx.x] = 1;
}
"""

# A delay the compiler cannot remove: makes threads arrive in varied orders (a yield in the
# simulator, a nanosleep on the GPU).
SPIN_HINT = r"""
#ifdef FMO_SIM
__device__ __forceinline__ void fmo_spin_hint() { fmo_sim::yield(); }
#else
__device__ __forceinline__ void fmo_spin_hint() { __nanosleep(20); }
#endif
"""
SOURCE = SPIN_HINT + SOURCE


def producer_consumer_case(phases: int = PHASES) -> Case:
    want = np.array([[1000 * p + (c + 5) % 64 for c in range(64)] for p in range(phases)], np.uint32).reshape(-1)
    what = f"bar.arrive/bar.sync producer-consumer, {phases} phases"
    return Case(name=what, kernel="producer_consumer", grid=(1,), block=(128,),
                args=[poisoned((phases * 64,), np.uint32), np.int32(phases)], outputs=[0],
                check=lambda outs: assert_equal_bits(outs[0], want, what), shared_mem=64 * 4)


def groups_case(phases: int = PHASES) -> Case:
    want = np.zeros(128, np.uint32)
    for t in range(128):
        grp, i = t // 64, t % 64
        acc = 0
        for p in range(phases):
            acc = (acc * 31 + 100 * p + (i + 1) % 64 + 7 * grp) % 2**32
        want[t] = acc
    what = f"bar.sync on two ids, {phases} phases"
    return Case(name=what, kernel="independent_groups", grid=(1,), block=(128,),
                args=[poisoned((128,), np.uint32), np.int32(phases)], outputs=[0],
                check=lambda outs: assert_equal_bits(outs[0], want, what), shared_mem=128 * 4)


def fence_mp_case(scope: str, n: int = 64) -> Case:
    want = (7 * np.arange(n) + 2).astype(np.uint32)
    what = f"fence.acq_rel.{scope} message passing"
    return Case(name=what, kernel=f"fence_mp_{scope}", grid=(1,), block=(64,),
                args=[poisoned((n,), np.uint32), np.zeros(1, np.uint32), poisoned((n,), np.uint32), np.int32(n)],
                outputs=[2], check=lambda outs: assert_equal_bits(outs[0], want, what))


def fence_sc_case(trials: int = 256) -> Case:
    def check(outs):
        (r,) = outs
        r = r.reshape(trials, 2)
        assert np.all((r == 0) | (r == 1)), "fence.sc store buffering: values other than 0/1 read"
        both_zero = np.flatnonzero((r[:, 0] == 0) & (r[:, 1] == 0))
        assert both_zero.size == 0, f"fence.sc allowed the store-buffering outcome r0 = r1 = 0 in trials {both_zero[:8]}"

    return Case(name="fence.sc store buffering", kernel="fence_sc_sb", grid=(1,), block=(64,),
                args=[np.zeros(2 * trials, np.uint32), poisoned((2 * trials,), np.uint32), np.int32(trials)],
                outputs=[1], check=check, deterministic=False)


def cases(seed: int = 0) -> list[Case]:
    del seed
    return [producer_consumer_case(), groups_case()] + [fence_mp_case(s) for s in SCOPES] + [fence_sc_case()]
