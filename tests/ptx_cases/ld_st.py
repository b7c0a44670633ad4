"""The kernels and cases of ptx/ld_st.cuh's tests (loads, stores, release/acquire, atom/red):
tests/test_ptx_ld_st.py says what they check."""
from __future__ import annotations

import numpy as np

from .case import Case, assert_equal_bits, poisoned

SIZES = {4: "uint32_t", 8: "uint2", 16: "uint4"}
MODES = {0: "ld.global.nc -> st.global", 1: "ld.global.nc.L1::no_allocate.L2::128B -> st.global.L1::no_allocate",
         2: "ld.global -> st.global", 3: "ld.global -> st.shared -> ld.shared -> st.global"}
SCOPES = ("cta", "gpu", "sys")
CTAS, THREADS = 4, 64

SOURCE = r"""
extern __shared__ __align__(16) unsigned char smem[];

template <typename T>
__device__ void copy(const T* in, T* out, int n, int mode) {
  const int tid = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  if (mode == 3) {  // one CTA: through shared memory, reading the next thread's element
    T* s = reinterpret_cast<T*>(smem);
    st_shared(s + threadIdx.x, ld_global(in + threadIdx.x));
    __syncthreads();
    st_global(out + threadIdx.x, ld_shared(s + (threadIdx.x + 1) % blockDim.x));
    return;
  }
  for (int i = tid; i < n; i += stride) {
    if (mode == 0) st_global(out + i, ld_nc(in + i));
    if (mode == 1) st_global_na(out + i, ld_nc_na(in + i));
    if (mode == 2) st_global(out + i, ld_global(in + i));
  }
}
extern "C" __global__ void copy4(const uint32_t* i, uint32_t* o, int n, int m) { copy(i, o, n, m); }
extern "C" __global__ void copy8(const uint2* i, uint2* o, int n, int m) { copy(i, o, n, m); }
extern "C" __global__ void copy16(const uint4* i, uint4* o, int n, int m) { copy(i, o, n, m); }

// Message passing: thread 0 writes data[0..n) with plain stores, then st.release(flag);
// thread 32 (another warp) spins on ld.acquire(flag), then reads data into out.
template <Scope S, typename F>
__device__ void message(unsigned* data, F* flag, unsigned* out, int n) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < n; ++i) data[i] = 3u * i + 1u;
    st_release<S>(flag, F(1));
  } else if (threadIdx.x == 32) {
    while (ld_acquire<S>(flag) != F(1)) {}
    for (int i = 0; i < n; ++i) out[i] = data[i];
  }
}
#define MP(NAME, S, F) \
  extern "C" __global__ void NAME(unsigned* d, F* f, unsigned* o, int n) { message<S>(d, f, o, n); }
MP(mp_cta_32, Scope::cta, uint32_t)
MP(mp_gpu_32, Scope::gpu, uint32_t)
MP(mp_sys_32, Scope::sys, uint32_t)
MP(mp_cta_64, Scope::cta, unsigned long long)
MP(mp_gpu_64, Scope::gpu, unsigned long long)
MP(mp_sys_64, Scope::sys, unsigned long long)

// Counting atomics over the whole grid. u[0..3]: atom.add.u32 by 1 (olds kept);
// u[4]: red.add.u32 gid; u[5]: red.release.sys.add.u32 1; s[0]: atom.add.s32 (gid - 100);
// s[1]: red.add.s32 -gid; l[0]: atom.add.u64 2^33 + gid; l[1]: red.add.u64 gid;
// f[0]: atom.add.f32 (gid % 8) / 2; f[1 + cta]: red.relaxed.cta.add.f32 1 (per-CTA counter).
extern "C" __global__ void atom_counts(unsigned* u, int* s, unsigned long long* l, float* f, unsigned* olds) {
  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
  olds[gid] = atom_add<Sem::acq_rel, Scope::gpu>(u + gid % 4, 1u);
  red_add(u + 4, gid);
  red_add<Sem::release, Scope::sys>(u + 5, 1u);
  atom_add<Sem::relaxed, Scope::sys>(s, int(gid) - 100);
  red_add(s + 1, -int(gid));
  atom_add(l, (1ull << 33) + gid);
  red_add<Sem::relaxed, Scope::gpu>(l + 1, (unsigned long long)gid);
  atom_add(f, float(gid % 8) * 0.5f);
  red_add<Sem::relaxed, Scope::cta>(f + 1 + blockIdx.x, 1.0f);
}

// Bitwise and ordering atomics with per-thread values v[gid]:
// u[0]: exch (olds in xo), u[1]: max.u32, u[2]: min.u32, u[3]: or, u[4]: and,
// s[0]: max.s32, s[1]: min.s32, l[0]: cas.b64 0 -> gid + 1 (olds in co, one winner),
// l[1]: exch.b64.
extern "C" __global__ void atom_bits(const unsigned* v, unsigned* u, int* s, unsigned long long* l,
                                     unsigned* xo, unsigned long long* co, unsigned long long* lxo) {
  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
  xo[gid] = atom_exch(u, v[gid]);
  atom_max<Sem::acquire, Scope::gpu>(u + 1, v[gid]);
  atom_min<Sem::release, Scope::gpu>(u + 2, v[gid]);
  atom_or(u + 3, 1u << (v[gid] % 32));
  atom_and(u + 4, ~(1u << (v[gid] % 29)));
  atom_max(s, int(v[gid]) - (1 << 30));
  atom_min(s + 1, int(v[gid]) - (1 << 30));
  co[gid] = atom_cas<Sem::acq_rel, Scope::gpu>(l, 0ull, (unsigned long long)gid + 1);
  lxo[gid] = atom_exch(l + 1, (unsigned long long)gid << 20);
}

// A CAS spin lock around a non-atomic increment: every thread of the grid enters once.
extern "C" __global__ void atom_lock(unsigned* lock, unsigned* counter) {
  bool done = false;
  while (!done) {  // the loop form stays deadlock-free under independent thread scheduling
    if (atom_cas<Sem::acquire, Scope::gpu>(lock, 0u, 1u) == 0u) {
      st_relaxed<Scope::gpu>(counter, ld_relaxed<Scope::gpu>(counter) + 1u);
      st_release<Scope::gpu>(lock, 0u);
      done = true;
    }
  }
}

// f[0] += subnormal (each thread): stays +0 with FTZ. f[1] = 2^-125 - 1.5 * 2^-126 = 2^-127
// (subnormal result): flushed to +0. f[2] = -2^-125 + 1.5 * 2^-126: flushed to -0.
extern "C" __global__ void atom_ftz(float* f, float* olds) {
  red_add(f, 1e-40f);
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    olds[0] = atom_add(f + 1, -1.5f * 0x1p-126f);
    olds[1] = atom_add(f + 2, 1.5f * 0x1p-126f);
  }
}
"""


def copy_case(size: int, mode: int, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    n = THREADS if mode == 3 else 1000
    src = rng.integers(0, 1 << 32, size=(n, size // 4), dtype=np.uint32)
    src[: min(n, 4), 0] = [0x7FC00000, 0xFFFFFFFF, 0x00000001, 0x80000000]  # NaN, poison, denormal, -0 bits
    want = np.roll(src, -1, axis=0) if mode == 3 else src
    what = f"{MODES[mode]} ({size} B)"
    return Case(name=what, kernel=f"copy{size}", grid=(1,) if mode == 3 else (3,), block=(THREADS,),
                args=[src, poisoned(src.shape, np.uint32), np.int32(n), np.int32(mode)], outputs=[1],
                check=lambda outs: assert_equal_bits(outs[0], want, what, seed), shared_mem=THREADS * size)


def message_case(scope: str, bits: int, n: int = 100) -> Case:
    ft = np.uint32 if bits == 32 else np.uint64
    want = (3 * np.arange(n) + 1).astype(np.uint32)
    what = f"st.release/ld.acquire .{scope} ({bits}-bit flag)"
    return Case(name=what, kernel=f"mp_{scope}_{bits}", grid=(1,), block=(64,),
                args=[poisoned((n,), np.uint32), np.zeros(1, ft), poisoned((n,), np.uint32), np.int32(n)], outputs=[2],
                check=lambda outs: assert_equal_bits(outs[0], want, what))


def counts_case() -> Case:
    nthreads = CTAS * THREADS
    gid = np.arange(nthreads)

    def check(outs):
        u, s, l, f, olds = outs
        for c in range(4):
            got = np.sort(olds[gid % 4 == c])
            assert np.array_equal(got, np.arange(nthreads // 4)), \
                f"atom.add.u32 counter {c}: returned old values {got[:10]}... are not 0..{nthreads // 4 - 1}"
        assert np.array_equal(u[:4], np.full(4, nthreads // 4)), f"atom.add.u32 finals {u[:4]}"
        assert u[4] == gid.sum() % 2**32, f"red.add.u32: {u[4]} != {gid.sum()}"
        assert u[5] == nthreads, f"red.release.sys.add.u32: {u[5]} != {nthreads}"
        assert s[0] == (gid - 100).sum() and s[1] == -gid.sum(), f"s32 adds: {s[:2]}"
        assert l[0] == nthreads * 2**33 + gid.sum() and l[1] == gid.sum(), f"u64 adds: {l[:2]}"
        assert f[0] == ((gid % 8) * 0.5).sum(), f"atom.add.f32: {f[0]} != {((gid % 8) * 0.5).sum()}"
        assert np.array_equal(f[1:1 + CTAS], np.full(CTAS, THREADS, np.float32)), f"red.cta.add.f32: {f[1:1 + CTAS]}"

    return Case(name="atom/red add counts", kernel="atom_counts", grid=(CTAS,), block=(THREADS,),
                args=[np.zeros(8, np.uint32), np.zeros(2, np.int32), np.zeros(2, np.uint64), np.zeros(8, np.float32),
                      poisoned((nthreads,), np.uint32)],
                outputs=[0, 1, 2, 3, 4], check=check, deterministic=False)


def bits_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    nthreads = CTAS * THREADS
    v = rng.integers(1, 1 << 31, size=nthreads, dtype=np.uint32)
    u0 = np.array([7, 5, 0xFFFFFFF0, 0, 0xFFFFFFFF], np.uint32)
    s0 = np.array([-(1 << 31), (1 << 31) - 1], np.int32)
    l0 = np.array([0, 12345], np.uint64)

    def check(outs):
        u, s, l, xo, co, lxo = outs
        # exch: the olds plus the final value are the initial value plus every written value
        assert sorted(np.append(xo, u[0]).tolist()) == sorted([int(u0[0])] + v.tolist()), "atom.exch.b32 lost or duplicated a value"
        assert u[1] == max(int(u0[1]), int(v.max())) and u[2] == min(int(u0[2]), int(v.min())), f"max/min.u32: {u[1:3]}"
        want_or = np.bitwise_or.reduce(np.uint32(1) << (v % 32))
        want_and = np.uint32(0xFFFFFFFF)
        for x in v:
            want_and &= ~(np.uint32(1) << np.uint32(x % 29))
        assert u[3] == want_or and u[4] == want_and, f"or/and.b32: {u[3]:#x} {u[4]:#x}, want {want_or:#x} {want_and:#x}"
        sv = v.astype(np.int64) - (1 << 30)
        assert s[0] == max(int(s0[0]), sv.max()) and s[1] == min(int(s0[1]), sv.min()), f"max/min.s32: {s}"
        winners = np.flatnonzero(co == 0)
        assert len(winners) == 1, f"atom.cas.b64: {len(winners)} threads saw the initial 0"
        assert l[0] == winners[0] + 1 and np.all(co[co != 0] == l[0]), "atom.cas.b64: losers must see the winner's value"
        written = (np.arange(nthreads, dtype=np.uint64) << np.uint64(20)).tolist()
        assert sorted(np.append(lxo, l[1]).tolist()) == sorted([int(l0[1])] + written), "atom.exch.b64 lost a value"

    return Case(name="atom bitwise/exch/cas", kernel="atom_bits", grid=(CTAS,), block=(THREADS,),
                args=[v, u0.copy(), s0.copy(), l0.copy(), poisoned((nthreads,), np.uint32), poisoned((nthreads,), np.uint64),
                      poisoned((nthreads,), np.uint64)],
                outputs=[1, 2, 3, 4, 5, 6], check=check, deterministic=False)


def lock_case() -> Case:
    def check(outs):
        lock, counter = outs
        assert lock[0] == 0 and counter[0] == CTAS * THREADS, f"spin lock: lock {lock[0]}, counter {counter[0]}"

    return Case(name="atom.cas spin lock", kernel="atom_lock", grid=(CTAS,), block=(THREADS,),
                args=[np.zeros(1, np.uint32), np.zeros(1, np.uint32)], outputs=[0, 1], check=check)


def ftz_case() -> Case:
    def check(outs):
        f, olds = outs
        assert f[0] == 0.0, f"red.add.f32 of subnormals must flush to 0, got {f[0]!r}"
        assert f[1] == 0.0 and not np.signbit(f[1]), f"subnormal positive result must flush to +0, got {f[1]!r}"
        assert f[2] == 0.0 and np.signbit(f[2]), f"subnormal negative result must flush to -0, got {f[2]!r}"
        assert olds[0] == np.float32(2.0**-125) and olds[1] == np.float32(-(2.0**-125)), f"atom olds {olds}"

    f0 = np.array([0.0, 2.0**-125, -(2.0**-125)], np.float32)
    return Case(name="atom/red .add.f32 flush-to-zero", kernel="atom_ftz", grid=(2,), block=(THREADS,),
                args=[f0, poisoned((2,), np.float32)], outputs=[0, 1], check=check)


def cases(seed: int = 0) -> list[Case]:
    out = [copy_case(size, mode, seed) for size in SIZES for mode in MODES]
    out += [message_case(s, b) for s in SCOPES for b in (32, 64)]
    out += [counts_case(), bits_case(seed), lock_case(), ftz_case()]
    return out
