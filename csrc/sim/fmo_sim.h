// Prelude of every module compiled for the CPU SIMT simulator (force-included first).
//
// It maps CUDA C++'s device dialect onto host C++ run by `csrc/sim/runtime.cpp`:
//   - each CUDA thread is a fiber; a CTA's fibers share one OS worker thread;
//   - `__shared__` is `thread_local`, so shared memory is the module's TLS block, private to
//     each worker = each CTA in flight (extern __shared__ arrays alias one dynamic buffer,
//     linked in by the compiler driver, fastmoe_ops/sim/compile.py);
//   - barriers, warp collectives and yields call the runtime through `fmo_sim::g_api`.
// Functions touching runtime state are no_sanitize_thread: checking builds instrument the
// user's code with -fsanitize=thread and route each access to the runtime's checker.
#pragma once
#define FMO_SIM 1

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <vector_types.h>
#include <vector_functions.h>

#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "sim/device_api.h"

// ---- execution-space keywords ------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __forceinline__
#undef __noinline__
#undef __restrict__
#undef __launch_bounds__
#undef __align__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __shared__ thread_local
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH_SIM__ 1

// ---- thread indices ------------------------------------------------------------------------
namespace fmo_sim {
FMO_SIM_NOTSAN inline uint3 thread_idx() { auto* f = cur(); return make_uint3(f->tid[0], f->tid[1], f->tid[2]); }
FMO_SIM_NOTSAN inline uint3 block_idx() { auto* f = cur(); return make_uint3(f->bid[0], f->bid[1], f->bid[2]); }
FMO_SIM_NOTSAN inline dim3 block_dim() { auto* f = cur(); return dim3(f->bdim[0], f->bdim[1], f->bdim[2]); }
FMO_SIM_NOTSAN inline dim3 grid_dim() { auto* f = cur(); return dim3(f->gdim[0], f->gdim[1], f->gdim[2]); }
}  // namespace fmo_sim
#define threadIdx (::fmo_sim::thread_idx())
#define blockIdx (::fmo_sim::block_idx())
#define blockDim (::fmo_sim::block_dim())
#define gridDim (::fmo_sim::grid_dim())
static constexpr int warpSize = 32;

// ---- barriers ------------------------------------------------------------------------------
namespace fmo_sim {
FMO_SIM_NOTSAN inline int barrier_at(unsigned id, unsigned n, int pred, const char* file, int line) {
  return g_api->barrier(id, n, pred, file, line, 0);
}
// bar.sync id, nthreads (nthreads = 0: the whole CTA): wait until nthreads threads arrived.
FMO_SIM_NOTSAN inline void named_barrier(unsigned id, unsigned nthreads) {
  g_api->barrier(id, nthreads, 0, "named barrier", 0, 0);
}
// bar.arrive id, nthreads: count this thread towards the phase and go on.
FMO_SIM_NOTSAN inline void named_barrier_arrive(unsigned id, unsigned nthreads) {
  g_api->barrier(id, nthreads, 0, "named barrier", 0, 1);
}
}  // namespace fmo_sim
#define __syncthreads() ((void)::fmo_sim::barrier_at(0, 0, 0, __FILE__, __LINE__))
#define __syncthreads_count(p) (::fmo_sim::barrier_at(0, 0, (p) ? 1 : 0, __FILE__, __LINE__))
#define __syncthreads_and(p) \
  (::fmo_sim::barrier_at(0, 0, (p) ? 1 : 0, __FILE__, __LINE__) == (int)::fmo_sim::cur()->nthreads)
#define __syncthreads_or(p) (::fmo_sim::barrier_at(0, 0, (p) ? 1 : 0, __FILE__, __LINE__) != 0)

// ---- warp collectives (all built on warp_allgather) ----------------------------------------
FMO_SIM_NOTSAN inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::fmo_sim::warp_allgather(mask, nullptr, nullptr, 0);
  ::fmo_sim::g_api->warp_sync_epoch();
}
FMO_SIM_NOTSAN inline unsigned __activemask() {
  unsigned n = ::fmo_sim::cur()->nthreads, w = ::fmo_sim::cur()->warp;
  unsigned live = n - w * 32 >= 32 ? 32u : n - w * 32;
  return live == 32 ? 0xffffffffu : ((1u << live) - 1);
}
namespace fmo_sim {
template <class T>
struct Gathered {
  alignas(16) unsigned char bytes[32 * sizeof(T)];
  FMO_SIM_NOTSAN T at(unsigned i) const { T v; std::memcpy(&v, bytes + i * sizeof(T), sizeof(T)); return v; }
};
template <class T>
FMO_SIM_NOTSAN inline void gather(unsigned mask, const T& v, Gathered<T>& g) {
  warp_allgather(mask, &v, g.bytes, sizeof(T));
}
}  // namespace fmo_sim

template <class T>
FMO_SIM_NOTSAN inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  ::fmo_sim::Gathered<T> g; ::fmo_sim::gather(mask, v, g);
  unsigned lane = ::fmo_sim::lane_id(), base = lane & ~(unsigned)(width - 1);
  return g.at(base + ((unsigned)src & (unsigned)(width - 1)));
}
template <class T>
FMO_SIM_NOTSAN inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::fmo_sim::Gathered<T> g; ::fmo_sim::gather(mask, v, g);
  unsigned lane = ::fmo_sim::lane_id(), base = lane & ~(unsigned)(width - 1);
  return (int)lane - (int)delta >= (int)base ? g.at(lane - delta) : v;
}
template <class T>
FMO_SIM_NOTSAN inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::fmo_sim::Gathered<T> g; ::fmo_sim::gather(mask, v, g);
  unsigned lane = ::fmo_sim::lane_id(), base = lane & ~(unsigned)(width - 1);
  return lane + delta < base + (unsigned)width ? g.at(lane + delta) : v;
}
template <class T>
FMO_SIM_NOTSAN inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::fmo_sim::Gathered<T> g; ::fmo_sim::gather(mask, v, g);
  unsigned lane = ::fmo_sim::lane_id(), base = lane & ~(unsigned)(width - 1);
  unsigned s = lane ^ (unsigned)lane_mask;
  return s < base + (unsigned)width ? g.at(s) : v;
}
FMO_SIM_NOTSAN inline unsigned __ballot_sync(unsigned mask, int pred) {
  ::fmo_sim::Gathered<unsigned char> g; ::fmo_sim::gather(mask, (unsigned char)(pred != 0), g);
  unsigned r = 0;
  for (unsigned i = 0; i < 32; ++i) if (((mask >> i) & 1) && g.at(i)) r |= 1u << i;
  return r;
}
FMO_SIM_NOTSAN inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
FMO_SIM_NOTSAN inline int __all_sync(unsigned mask, int pred) {
  unsigned live = mask & __activemask();
  return (__ballot_sync(mask, pred) & live) == live;
}
#define FMO_SIM_REDUCE(NAME, T, INIT, OP)                                         \
  FMO_SIM_NOTSAN inline T NAME(unsigned mask, T v) {                              \
    ::fmo_sim::Gathered<T> g; ::fmo_sim::gather(mask, v, g);                      \
    unsigned live = mask & __activemask(); T r = INIT;                            \
    for (unsigned i = 0; i < 32; ++i) if ((live >> i) & 1) { T x = g.at(i); r = OP; } \
    return r;                                                                     \
  }
FMO_SIM_REDUCE(__reduce_add_sync, unsigned, 0u, r + x)
FMO_SIM_REDUCE(__reduce_add_sync, int, 0, (int)((unsigned)r + (unsigned)x))
FMO_SIM_REDUCE(__reduce_min_sync, unsigned, UINT_MAX, (x < r ? x : r))
FMO_SIM_REDUCE(__reduce_min_sync, int, INT_MAX, (x < r ? x : r))
FMO_SIM_REDUCE(__reduce_max_sync, unsigned, 0u, (x > r ? x : r))
FMO_SIM_REDUCE(__reduce_max_sync, int, INT_MIN, (x > r ? x : r))
FMO_SIM_REDUCE(__reduce_and_sync, unsigned, ~0u, r & x)
FMO_SIM_REDUCE(__reduce_or_sync, unsigned, 0u, r | x)
FMO_SIM_REDUCE(__reduce_xor_sync, unsigned, 0u, r ^ x)
#undef FMO_SIM_REDUCE
template <class T>
FMO_SIM_NOTSAN inline unsigned __match_any_sync(unsigned mask, T v) {
  ::fmo_sim::Gathered<T> g; ::fmo_sim::gather(mask, v, g);
  unsigned live = mask & __activemask(), r = 0;
  for (unsigned i = 0; i < 32; ++i) {
    T x = g.at(i);
    if (((live >> i) & 1) && std::memcmp(&x, &v, sizeof(T)) == 0) r |= 1u << i;
  }
  return r;
}
template <class T>
FMO_SIM_NOTSAN inline unsigned __match_all_sync(unsigned mask, T v, int* pred) {
  unsigned live = mask & __activemask();
  unsigned same = __match_any_sync(mask, v);
  *pred = same == live;
  return same == live ? live : 0u;
}

// ---- atomics: GCC builtins, then a yield so spin loops on atomics make progress ----------
namespace fmo_sim {
FMO_SIM_NOTSAN inline void check_atomic(const void* p, std::size_t bytes) {
#if defined(FMO_SIM_CHECKING)
  g_api->check_access(p, bytes, kAtomic);
#else
  (void)p; (void)bytes;
#endif
}
template <class T, class F>
FMO_SIM_NOTSAN inline T cas_loop(T* p, F f) {  // for types without a native fetch-op
  using U = std::conditional_t<sizeof(T) == 2, unsigned short,
            std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long>>;
  static_assert(sizeof(T) == sizeof(U), "atomic CAS loop needs a 2, 4 or 8 byte type");
  U* q = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(q, __ATOMIC_RELAXED), want;
  for (;;) {
    T o; std::memcpy(&o, &old, sizeof(T));
    T n = f(o);
    std::memcpy(&want, &n, sizeof(T));
    if (__atomic_compare_exchange_n(q, &old, want, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
      check_atomic(p, sizeof(T));
      yield();
      return o;
    }
  }
}
template <class T>
FMO_SIM_NOTSAN inline T after_atomic(T* p, T old) { check_atomic(p, sizeof(T)); yield(); return old; }
}  // namespace fmo_sim

#define FMO_SIM_ATOMIC_INT(NAME, BUILTIN, T)                                  \
  FMO_SIM_NOTSAN inline T NAME(T* p, T v) {                                    \
    return ::fmo_sim::after_atomic(p, BUILTIN(p, v, __ATOMIC_SEQ_CST));        \
  }                                                                            \
  FMO_SIM_NOTSAN inline T NAME##_block(T* p, T v) { return NAME(p, v); }       \
  FMO_SIM_NOTSAN inline T NAME##_system(T* p, T v) { return NAME(p, v); }
#define FMO_SIM_ATOMIC_ALL(T)                                  \
  FMO_SIM_ATOMIC_INT(atomicAdd, __atomic_fetch_add, T)         \
  FMO_SIM_ATOMIC_INT(atomicSub, __atomic_fetch_sub, T)         \
  FMO_SIM_ATOMIC_INT(atomicExch, __atomic_exchange_n, T)       \
  FMO_SIM_ATOMIC_INT(atomicAnd, __atomic_fetch_and, T)         \
  FMO_SIM_ATOMIC_INT(atomicOr, __atomic_fetch_or, T)           \
  FMO_SIM_ATOMIC_INT(atomicXor, __atomic_fetch_xor, T)         \
  FMO_SIM_NOTSAN inline T atomicMin(T* p, T v) {               \
    return ::fmo_sim::cas_loop(p, [v](T o) { return v < o ? v : o; }); } \
  FMO_SIM_NOTSAN inline T atomicMax(T* p, T v) {               \
    return ::fmo_sim::cas_loop(p, [v](T o) { return v > o ? v : o; }); } \
  FMO_SIM_NOTSAN inline T atomicMin_block(T* p, T v) { return atomicMin(p, v); }   \
  FMO_SIM_NOTSAN inline T atomicMax_block(T* p, T v) { return atomicMax(p, v); }   \
  FMO_SIM_NOTSAN inline T atomicMin_system(T* p, T v) { return atomicMin(p, v); }  \
  FMO_SIM_NOTSAN inline T atomicMax_system(T* p, T v) { return atomicMax(p, v); }  \
  FMO_SIM_NOTSAN inline T atomicCAS(T* p, T cmp, T v) {        \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    return ::fmo_sim::after_atomic(p, cmp); }                  \
  FMO_SIM_NOTSAN inline T atomicCAS_block(T* p, T c, T v) { return atomicCAS(p, c, v); } \
  FMO_SIM_NOTSAN inline T atomicCAS_system(T* p, T c, T v) { return atomicCAS(p, c, v); }
FMO_SIM_ATOMIC_ALL(int)
FMO_SIM_ATOMIC_ALL(unsigned int)
FMO_SIM_ATOMIC_ALL(unsigned long long)
FMO_SIM_ATOMIC_ALL(long long)
#undef FMO_SIM_ATOMIC_ALL
#undef FMO_SIM_ATOMIC_INT
FMO_SIM_NOTSAN inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return ::fmo_sim::after_atomic(p, cmp);
}
#define FMO_SIM_ATOMIC_FLOAT(T)                                                                \
  FMO_SIM_NOTSAN inline T atomicAdd(T* p, T v) { return ::fmo_sim::cas_loop(p, [v](T o) { return o + v; }); } \
  FMO_SIM_NOTSAN inline T atomicAdd_block(T* p, T v) { return atomicAdd(p, v); }              \
  FMO_SIM_NOTSAN inline T atomicAdd_system(T* p, T v) { return atomicAdd(p, v); }             \
  FMO_SIM_NOTSAN inline T atomicExch(T* p, T v) { return ::fmo_sim::cas_loop(p, [v](T) { return v; }); }
FMO_SIM_ATOMIC_FLOAT(float)
FMO_SIM_ATOMIC_FLOAT(double)
FMO_SIM_ATOMIC_FLOAT(__half)
FMO_SIM_ATOMIC_FLOAT(__half2)
FMO_SIM_ATOMIC_FLOAT(__nv_bfloat16)
FMO_SIM_ATOMIC_FLOAT(__nv_bfloat162)
#undef FMO_SIM_ATOMIC_FLOAT
FMO_SIM_NOTSAN inline unsigned atomicInc(unsigned* p, unsigned lim) {
  return ::fmo_sim::cas_loop(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
FMO_SIM_NOTSAN inline unsigned atomicDec(unsigned* p, unsigned lim) {
  return ::fmo_sim::cas_loop(p, [lim](unsigned o) { return (o == 0 || o > lim) ? lim : o - 1; });
}

// ---- fences, sleeps, clocks, loads --------------------------------------------------------
FMO_SIM_NOTSAN inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); ::fmo_sim::yield(); }
FMO_SIM_NOTSAN inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); ::fmo_sim::yield(); }
FMO_SIM_NOTSAN inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); ::fmo_sim::yield(); }
FMO_SIM_NOTSAN inline void __nanosleep(unsigned) { ::fmo_sim::yield(); }
FMO_SIM_NOTSAN inline long long clock64() { return (long long)::fmo_sim::g_api->nanotime(); }
namespace fmo_sim {
// %globaltimer: nanoseconds of a steady clock shared by all CTAs (and processes on the machine)
FMO_SIM_NOTSAN inline unsigned long long globaltimer() { return g_api->nanotime(); }
}  // namespace fmo_sim
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---- math and bit intrinsics -------------------------------------------------------------
namespace fmo_sim {
template <class To, class From>
inline To bits(From f) { static_assert(sizeof(To) == sizeof(From), "size"); To t; std::memcpy(&t, &f, sizeof t); return t; }
}  // namespace fmo_sim
inline int __float_as_int(float x) { return fmo_sim::bits<int>(x); }
inline unsigned __float_as_uint(float x) { return fmo_sim::bits<unsigned>(x); }
inline float __int_as_float(int x) { return fmo_sim::bits<float>(x); }
inline float __uint_as_float(unsigned x) { return fmo_sim::bits<float>(x); }
inline long long __double_as_longlong(double x) { return fmo_sim::bits<long long>(x); }
inline double __longlong_as_double(long long x) { return fmo_sim::bits<double>(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)std::floor(x); }
inline int __float2int_ru(float x) { return (int)std::ceil(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)std::nearbyint(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  return (unsigned)(((((unsigned long long)hi << 32) | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return (unsigned)((((unsigned long long)hi << 32) | lo) >> (s & 31));
}
inline unsigned __sad(int a, int b, unsigned c) { return (unsigned)(a > b ? a - b : b - a) + c; }

// CUDA's global min/max overloads (mixed types promote as in C++).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) { using C = std::common_type_t<A, B>; return (C)a < (C)b ? (C)a : (C)b; }
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) { using C = std::common_type_t<A, B>; return (C)a > (C)b ? (C)a : (C)b; }
using std::fminf;
using std::fmaxf;
using std::exp2f;

// ---- kernel assertions: assert() fails the launch with SimError, naming the site ---------
extern "C" __attribute__((visibility("hidden"), noreturn)) FMO_SIM_NOTSAN void
__assert_fail(const char* expr, const char* file, unsigned int line, const char* func) noexcept {
  ::fmo_sim::fail("assertion `%s` failed at %s:%u in %s", expr, file, line, func);
}

// ---- module glue: binding and argument unpacking (used by the generated entry points) ----
extern "C" __attribute__((visibility("default"))) FMO_SIM_NOTSAN int fmo_sim_bind(const ::fmo_sim::RuntimeApi* api) {
  ::fmo_sim::g_api = api;
  return ::fmo_sim::kAbiVersion;
}

namespace fmo_sim {
constexpr std::size_t align_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

template <class... A>
FMO_SIM_NOTSAN int signature(void (*)(A...), unsigned* out, int cap) {
  const unsigned sizes[] = {0u, (unsigned)sizeof(A)...};
  const unsigned aligns[] = {0u, (unsigned)alignof(A)...};
  int n = (int)sizeof...(A);
  for (int i = 0; i < n && 2 * i + 1 < cap; ++i) { out[2 * i] = sizes[i + 1]; out[2 * i + 1] = aligns[i + 1]; }
  return n;
}

template <class T>
FMO_SIM_NOTSAN inline T load_arg(const unsigned char* args, std::size_t off) {
  static_assert(std::is_trivially_copyable_v<T>, "kernel parameters must be trivially copyable");
  T v;
  std::memcpy(&v, args + off, sizeof(T));
  return v;
}

template <class... A, std::size_t... I>
void invoke_impl(void (*k)(A...), const unsigned char* args, std::index_sequence<I...>) {
  std::size_t offs[sizeof...(A) + 1] = {0};
  {
    const std::size_t sizes[] = {0, sizeof(A)...};
    const std::size_t aligns[] = {1, alignof(A)...};
    std::size_t off = 0;
    for (std::size_t i = 0; i < sizeof...(A); ++i) {
      off = align_up(off, aligns[i + 1]);
      offs[i] = off;
      off += sizes[i + 1];
    }
  }
  k(load_arg<A>(args, offs[I])...);
}

template <class... A>
void invoke(void (*k)(A...), const unsigned char* args) {
  invoke_impl(k, args, std::index_sequence_for<A...>{});
}
}  // namespace fmo_sim

#if defined(FMO_SIM_CHECKING)
#include "sim/tsan_hooks.h"
#endif
