// ptx/ld_st.cuh: loads, stores and atomics with explicit caching and memory-model semantics.
//
//   ld_nc<T>, ld_nc_na<T>        ld.global.nc[.L1::no_allocate.L2::128B]    (ISA "ld.global.nc")
//   ld_global<T>, st_global<T>,  ld.global / st.global[.L1::no_allocate]    (ISA "ld", "st")
//   st_global_na<T>
//   ld_shared<T>, st_shared<T>   ld.shared / st.shared
//   ld_acquire<S>, ld_relaxed<S> ld.acquire / ld.relaxed .{cta,gpu,sys}     (ISA "ld"/"st", Memory Model)
//   st_release<S>, st_relaxed<S> st.release / st.relaxed .{cta,gpu,sys}
//   red_add<M,S>                 red{.relaxed,.release}.{scope}.add         (ISA "red")
//   atom_{add,exch,max,min,or,and,cas}<M,S>  atom{.sem}.{scope}.op          (ISA "atom")
// T is any trivially copyable type of 4, 8 or 16 bytes (uint32_t, float, uint2, uint4,
// float4, int4, ...); vector forms are used for 8 and 16 bytes, so the address must be
// aligned to sizeof(T). Ordered loads/stores are 4 or 8 bytes. Atomics and ordered
// operations use generic addresses (global or shared).
//
// Emulation (FMO_SIM): plain accesses go through fmo_sim::check_access and memcpy; ordered
// accesses and atomics use the host's __atomic builtins with the matching C++ ordering
// (every scope maps to the same host ordering: the simulator is one process).
// ld.acquire / ld.relaxed / atom first call fmo_sim::yield(), so a spin loop on a flag
// lets the fiber that will set it run. Atomic accesses to shared memory skip check_access
// (they are not data races); global ones are bounds-checked.
#pragma once

#include "ptx/common.cuh"

#ifdef FMO_SIM
#include <cmath>
#include <type_traits>
#endif

// Like FMO_PTX_SCOPED, with a `.relaxed/.acquire/.release/.acq_rel` qualifier first.
#define FMO_PTX_SEM_SCOPED(SEM, SCOPE, HEAD, TAIL, ...)                            \
  do {                                                                             \
    if constexpr ((SEM) == ::fmo::ptx::Sem::relaxed) {                             \
      FMO_PTX_SCOPED(SCOPE, HEAD ".relaxed", TAIL, __VA_ARGS__);                   \
    } else if constexpr ((SEM) == ::fmo::ptx::Sem::acquire) {                      \
      FMO_PTX_SCOPED(SCOPE, HEAD ".acquire", TAIL, __VA_ARGS__);                   \
    } else if constexpr ((SEM) == ::fmo::ptx::Sem::release) {                      \
      FMO_PTX_SCOPED(SCOPE, HEAD ".release", TAIL, __VA_ARGS__);                   \
    } else {                                                                       \
      FMO_PTX_SCOPED(SCOPE, HEAD ".acq_rel", TAIL, __VA_ARGS__);                   \
    }                                                                              \
  } while (0)

namespace fmo {
namespace ptx {

#ifdef FMO_SIM
namespace sim_detail {
template <typename T>
FMO_SIM_EMU void plain_access(const void* p, bool is_write, int space, const char* what) {
  // space: 0 global, 1 shared
  const bool shared = fmo_sim::is_shared(p);
  if (space == 0 && shared) fmo_sim::fail("%s: %p is a shared-memory address", what, p);
  if (space == 1 && !shared) fmo_sim::fail("%s: %p is not a shared-memory address", what, p);
  require_aligned(p, sizeof(T), what);
  fmo_sim::check_access(p, sizeof(T), is_write);
}
template <typename T>
FMO_SIM_EMU T plain_load(const void* p, int space, const char* what) {
  plain_access<T>(p, false, space, what);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
FMO_SIM_EMU void plain_store(void* p, const T& v, int space, const char* what) {
  plain_access<T>(p, true, space, what);
  std::memcpy(p, &v, sizeof(T));
}

template <typename T>
FMO_SIM_EMU void atomic_access(const void* p, bool is_write, const char* what) {
  require_aligned(p, sizeof(T), what);
  if (!fmo_sim::is_shared(p)) fmo_sim::check_access(p, sizeof(T), is_write);
}

// Host storage type for an atomic access of T.
template <typename T>
using word_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

constexpr int fail_order(Sem m) {  // a failed CAS is a load: no release part
  return (m == Sem::acquire || m == Sem::acq_rel) ? __ATOMIC_ACQUIRE : __ATOMIC_RELAXED;
}

// atom/red .add.f32 round to nearest even and flush subnormal inputs and results to
// sign-preserving zero (PTX ISA "atom" and "red", notes on .add.f32; the sm_90 SASS is
// ATOM.E.ADD.F32.FTZ.RN).
FMO_SIM_EMU float ftz(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}

// Read-modify-write through a CAS loop: new = f(old). Returns old.
template <Sem M, typename T, typename F>
FMO_SIM_EMU T atomic_rmw_cas(T* p, F f, bool returns, const char* what) {
  if (returns) fmo_sim::yield();  // atom (not red): its result may be polled in a loop
  atomic_access<T>(p, true, what);
  using W = word_t<T>;
  W* w = reinterpret_cast<W*>(p);
  W old = __atomic_load_n(w, __ATOMIC_RELAXED);
  for (;;) {
    const W next = bit_cast<W>(f(bit_cast<T>(old)));
    if (__atomic_compare_exchange_n(w, &old, next, false, host_order(M), fail_order(M)))
      return bit_cast<T>(old);
  }
}

template <Sem M, typename T>
FMO_SIM_EMU T atomic_cas(T* p, T cmp, T val, const char* what) {
  fmo_sim::yield();
  atomic_access<T>(p, true, what);
  T expected = cmp;
  __atomic_compare_exchange_n(p, &expected, val, false, host_order(M), fail_order(M));
  return expected;
}

template <Sem M, typename T>
FMO_SIM_EMU T ordered_load(const T* p, const char* what) {
  fmo_sim::yield();  // spin loops on this load must let the writer run
  atomic_access<T>(p, false, what);
  return bit_cast<T>(__atomic_load_n(reinterpret_cast<const word_t<T>*>(p), host_order(M)));
}

template <Sem M, typename T>
FMO_SIM_EMU void ordered_store(T* p, T v, const char* what) {
  atomic_access<T>(p, true, what);
  __atomic_store_n(reinterpret_cast<word_t<T>*>(p), bit_cast<word_t<T>>(v), host_order(M));
}
}  // namespace sim_detail
#endif  // FMO_SIM

// ---------------------------------------------------------------------------------------
// Weak (non-synchronising) loads and stores, 4 / 8 / 16 bytes.
// ---------------------------------------------------------------------------------------
#ifndef FMO_SIM
#define FMO_LD_SIZED(T, P, OPC)                                                         \
  if constexpr (sizeof(T) == 4) {                                                       \
    uint32_t r;                                                                         \
    asm volatile(OPC ".b32 %0, [%1];\n" : "=r"(r) : "l"(P));                            \
    return bit_cast<T>(r);                                                              \
  } else if constexpr (sizeof(T) == 8) {                                                \
    uint2 r;                                                                            \
    asm volatile(OPC ".v2.b32 {%0, %1}, [%2];\n" : "=r"(r.x), "=r"(r.y) : "l"(P));      \
    return bit_cast<T>(r);                                                              \
  } else {                                                                              \
    uint4 r;                                                                            \
    asm volatile(OPC ".v4.b32 {%0, %1, %2, %3}, [%4];\n"                                \
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)                           \
                 : "l"(P));                                                             \
    return bit_cast<T>(r);                                                              \
  }
#define FMO_ST_SIZED(T, P, V, OPC)                                                      \
  if constexpr (sizeof(T) == 4) {                                                       \
    asm volatile(OPC ".b32 [%0], %1;\n" ::"l"(P), "r"(bit_cast<uint32_t>(V)) : "memory"); \
  } else if constexpr (sizeof(T) == 8) {                                                \
    const uint2 r = bit_cast<uint2>(V);                                                 \
    asm volatile(OPC ".v2.b32 [%0], {%1, %2};\n" ::"l"(P), "r"(r.x), "r"(r.y) : "memory"); \
  } else {                                                                              \
    const uint4 r = bit_cast<uint4>(V);                                                 \
    asm volatile(OPC ".v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(P), "r"(r.x), "r"(r.y),  \
                 "r"(r.z), "r"(r.w)                                                     \
                 : "memory");                                                           \
  }
#endif

#define FMO_CHECK_LDST_TYPE(T)                                                          \
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16,                    \
                "ld/st wrappers move 4, 8 or 16 bytes")

// Read-only (non-coherent) global load: the data must not be written by any thread while
// the kernel runs (ISA: ld.global.nc). Goes through the texture/L1 path.
template <typename T>
FMO_DEVICE T ld_nc(const T* p) {
  FMO_CHECK_LDST_TYPE(T);
#ifdef FMO_SIM
  return sim_detail::plain_load<T>(p, 0, "ld.global.nc");
#else
  FMO_LD_SIZED(T, p, "ld.global.nc")
#endif
}

// ld.global.nc that does not allocate in L1 and prefetches 128 B into L2: streaming reads
// of data used once (token payloads in dispatch/combine) that should not evict reused data.
template <typename T>
FMO_DEVICE T ld_nc_na(const T* p) {
  FMO_CHECK_LDST_TYPE(T);
#ifdef FMO_SIM
  return sim_detail::plain_load<T>(p, 0, "ld.global.nc.L1::no_allocate");
#else
  FMO_LD_SIZED(T, p, "ld.global.nc.L1::no_allocate.L2::128B")
#endif
}

// Ordinary (weak) global load / store.
template <typename T>
FMO_DEVICE T ld_global(const T* p) {
  FMO_CHECK_LDST_TYPE(T);
#ifdef FMO_SIM
  return sim_detail::plain_load<T>(p, 0, "ld.global");
#else
  FMO_LD_SIZED(T, p, "ld.global")
#endif
}

template <typename T>
FMO_DEVICE void st_global(T* p, const T& v) {
  FMO_CHECK_LDST_TYPE(T);
#ifdef FMO_SIM
  sim_detail::plain_store<T>(p, v, 0, "st.global");
#else
  FMO_ST_SIZED(T, p, v, "st.global")
#endif
}

// Global store that does not allocate in L1 (written once, read elsewhere).
template <typename T>
FMO_DEVICE void st_global_na(T* p, const T& v) {
  FMO_CHECK_LDST_TYPE(T);
#ifdef FMO_SIM
  sim_detail::plain_store<T>(p, v, 0, "st.global.L1::no_allocate");
#else
  FMO_ST_SIZED(T, p, v, "st.global.L1::no_allocate")
#endif
}

// Shared-memory load / store (generic pointer into shared memory).
template <typename T>
FMO_DEVICE T ld_shared(const T* p) {
  FMO_CHECK_LDST_TYPE(T);
#ifdef FMO_SIM
  return sim_detail::plain_load<T>(p, 1, "ld.shared");
#else
  const uint32_t a = smem_addr(p);
  if constexpr (sizeof(T) == 4) {
    uint32_t r;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(r) : "r"(a));
    return bit_cast<T>(r);
  } else if constexpr (sizeof(T) == 8) {
    uint2 r;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(r.x), "=r"(r.y) : "r"(a));
    return bit_cast<T>(r);
  } else {
    uint4 r;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(a));
    return bit_cast<T>(r);
  }
#endif
}

template <typename T>
FMO_DEVICE void st_shared(T* p, const T& v) {
  FMO_CHECK_LDST_TYPE(T);
#ifdef FMO_SIM
  sim_detail::plain_store<T>(p, v, 1, "st.shared");
#else
  const uint32_t a = smem_addr(p);
  if constexpr (sizeof(T) == 4) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(bit_cast<uint32_t>(v)) : "memory");
  } else if constexpr (sizeof(T) == 8) {
    const uint2 r = bit_cast<uint2>(v);
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(a), "r"(r.x), "r"(r.y) : "memory");
  } else {
    const uint4 r = bit_cast<uint4>(v);
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(r.x), "r"(r.y),
                 "r"(r.z), "r"(r.w)
                 : "memory");
  }
#endif
}

// ---------------------------------------------------------------------------------------
// Ordered (memory-model) loads and stores, 4 or 8 bytes, generic address.
// ---------------------------------------------------------------------------------------
#define FMO_CHECK_ORDERED_TYPE(T) \
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "ordered ld/st and atomics are 4 or 8 bytes")

namespace detail {
template <Sem M, Scope S, typename T>
FMO_DEVICE T ld_ordered(const T* p) {
  FMO_CHECK_ORDERED_TYPE(T);
  static_assert(M == Sem::relaxed || M == Sem::acquire, "ld: .relaxed or .acquire");
#ifdef FMO_SIM
  return sim_detail::ordered_load<M>(p, M == Sem::acquire ? "ld.acquire" : "ld.relaxed");
#else
  if constexpr (sizeof(T) == 4) {
    uint32_t r;
    FMO_PTX_SEM_SCOPED(M, S, "ld", ".b32 %0, [%1];\n", : "=r"(r) : "l"(p) : "memory");
    return bit_cast<T>(r);
  } else {
    uint64_t r;
    FMO_PTX_SEM_SCOPED(M, S, "ld", ".b64 %0, [%1];\n", : "=l"(r) : "l"(p) : "memory");
    return bit_cast<T>(r);
  }
#endif
}

template <Sem M, Scope S, typename T>
FMO_DEVICE void st_ordered(T* p, T v) {
  FMO_CHECK_ORDERED_TYPE(T);
  static_assert(M == Sem::relaxed || M == Sem::release, "st: .relaxed or .release");
#ifdef FMO_SIM
  sim_detail::ordered_store<M>(p, v, M == Sem::release ? "st.release" : "st.relaxed");
#else
  if constexpr (sizeof(T) == 4) {
    FMO_PTX_SEM_SCOPED(M, S, "st", ".b32 [%0], %1;\n",
                       ::"l"(p), "r"(bit_cast<uint32_t>(v)) : "memory");
  } else {
    FMO_PTX_SEM_SCOPED(M, S, "st", ".b64 [%0], %1;\n",
                       ::"l"(p), "l"(bit_cast<uint64_t>(v)) : "memory");
  }
#endif
}
}  // namespace detail

// ld.acquire.{scope}: later accesses of this thread are ordered after it (pairs with a
// st.release / fence + store of the same or wider scope on the writer's side).
template <Scope S = Scope::gpu, typename T>
FMO_DEVICE T ld_acquire(const T* p) { return detail::ld_ordered<Sem::acquire, S>(p); }

// ld.relaxed.{scope}: a morally-strong (non-torn, coherent) load with no ordering.
template <Scope S = Scope::gpu, typename T>
FMO_DEVICE T ld_relaxed(const T* p) { return detail::ld_ordered<Sem::relaxed, S>(p); }

// st.release.{scope}: earlier accesses of this thread are ordered before it.
template <Scope S = Scope::gpu, typename T>
FMO_DEVICE void st_release(T* p, T v) { detail::st_ordered<Sem::release, S>(p, v); }

template <Scope S = Scope::gpu, typename T>
FMO_DEVICE void st_relaxed(T* p, T v) { detail::st_ordered<Sem::relaxed, S>(p, v); }

// ---------------------------------------------------------------------------------------
// Reductions (red: no result) and atomics (atom: returns the old value).
// ---------------------------------------------------------------------------------------
// One atom/red overload per (operation, type); PTXT is the PTX type suffix, RC the
// register constraint of T ("r" 32-bit integer, "l" 64-bit, "f" f32).
#ifdef FMO_SIM
#define FMO_DEFINE_ATOM(NAME, OPSTR, T, PTXT, RC, EXPR)                                  \
  template <Sem M = Sem::relaxed, Scope S = Scope::gpu>                                  \
  FMO_DEVICE T NAME(T* p, T v) {                                                         \
    return sim_detail::atomic_rmw_cas<M>(                                                \
        p, [v](T old) -> T { (void)old; return EXPR; }, true, "atom" OPSTR PTXT);                   \
  }
#define FMO_DEFINE_RED(NAME, OPSTR, T, PTXT, RC, EXPR)                                   \
  template <Sem M = Sem::relaxed, Scope S = Scope::gpu>                                  \
  FMO_DEVICE void NAME(T* p, T v) {                                                      \
    static_assert(M == Sem::relaxed || M == Sem::release, "red: .relaxed or .release");  \
    sim_detail::atomic_rmw_cas<M>(                                                       \
        p, [v](T old) -> T { (void)old; return EXPR; }, false, "red" OPSTR PTXT);                   \
  }
#else
#define FMO_DEFINE_ATOM(NAME, OPSTR, T, PTXT, RC, EXPR)                                  \
  template <Sem M = Sem::relaxed, Scope S = Scope::gpu>                                  \
  FMO_DEVICE T NAME(T* p, T v) {                                                         \
    T old;                                                                               \
    FMO_PTX_SEM_SCOPED(M, S, "atom", OPSTR PTXT " %0, [%1], %2;\n",                      \
                       : "=" RC(old) : "l"(p), RC(v) : "memory");                        \
    return old;                                                                          \
  }
#define FMO_DEFINE_RED(NAME, OPSTR, T, PTXT, RC, EXPR)                                   \
  template <Sem M = Sem::relaxed, Scope S = Scope::gpu>                                  \
  FMO_DEVICE void NAME(T* p, T v) {                                                      \
    static_assert(M == Sem::relaxed || M == Sem::release, "red: .relaxed or .release");  \
    FMO_PTX_SEM_SCOPED(M, S, "red", OPSTR PTXT " [%0], %1;\n",                           \
                       ::"l"(p), RC(v) : "memory");                                      \
  }
#endif

// 64-bit overloads for both `unsigned long` and `unsigned long long` (64-bit each on LP64,
// and distinct types), so uint64_t matches whichever it is (unsigned long with glibc,
// unsigned long long under NVRTC) and CUDA's atomicAdd type matches too.
// Integer arithmetic wraps (two's complement), as on the GPU; computed unsigned on the
// host so that signed overflow is not undefined behaviour there.
#define FMO_WRAP_ADD(T) static_cast<T>(static_cast<std::make_unsigned_t<T>>(old) + \
                                       static_cast<std::make_unsigned_t<T>>(v))

FMO_DEFINE_ATOM(atom_add, ".add", uint32_t, ".u32", "r", FMO_WRAP_ADD(uint32_t))
FMO_DEFINE_ATOM(atom_add, ".add", int32_t, ".s32", "r", FMO_WRAP_ADD(int32_t))
FMO_DEFINE_ATOM(atom_add, ".add", unsigned long, ".u64", "l", old + v)
FMO_DEFINE_ATOM(atom_add, ".add", unsigned long long, ".u64", "l", old + v)
FMO_DEFINE_ATOM(atom_add, ".add", float, ".f32", "f",
                sim_detail::ftz(sim_detail::ftz(old) + sim_detail::ftz(v)))
FMO_DEFINE_ATOM(atom_exch, ".exch", uint32_t, ".b32", "r", v)
FMO_DEFINE_ATOM(atom_exch, ".exch", unsigned long, ".b64", "l", v)
FMO_DEFINE_ATOM(atom_exch, ".exch", unsigned long long, ".b64", "l", v)
FMO_DEFINE_ATOM(atom_max, ".max", uint32_t, ".u32", "r", old > v ? old : v)
FMO_DEFINE_ATOM(atom_max, ".max", int32_t, ".s32", "r", old > v ? old : v)
FMO_DEFINE_ATOM(atom_min, ".min", uint32_t, ".u32", "r", old < v ? old : v)
FMO_DEFINE_ATOM(atom_min, ".min", int32_t, ".s32", "r", old < v ? old : v)
FMO_DEFINE_ATOM(atom_or, ".or", uint32_t, ".b32", "r", old | v)
FMO_DEFINE_ATOM(atom_and, ".and", uint32_t, ".b32", "r", old & v)

FMO_DEFINE_RED(red_add, ".add", uint32_t, ".u32", "r", FMO_WRAP_ADD(uint32_t))
FMO_DEFINE_RED(red_add, ".add", int32_t, ".s32", "r", FMO_WRAP_ADD(int32_t))
FMO_DEFINE_RED(red_add, ".add", unsigned long, ".u64", "l", old + v)
FMO_DEFINE_RED(red_add, ".add", unsigned long long, ".u64", "l", old + v)
FMO_DEFINE_RED(red_add, ".add", float, ".f32", "f",
               sim_detail::ftz(sim_detail::ftz(old) + sim_detail::ftz(v)))

// atom.cas: if (*p == cmp) *p = val; returns the old value.
#define FMO_DEFINE_CAS(T, PTXT, RC)                                                      \
  template <Sem M = Sem::relaxed, Scope S = Scope::gpu>                                  \
  FMO_DEVICE T atom_cas(T* p, T cmp, T val) {                                            \
    FMO_CAS_BODY(T, PTXT, RC)                                                            \
  }
#ifdef FMO_SIM
#define FMO_CAS_BODY(T, PTXT, RC) return sim_detail::atomic_cas<M>(p, cmp, val, "atom.cas" PTXT);
#else
#define FMO_CAS_BODY(T, PTXT, RC)                                                        \
  T old;                                                                                 \
  FMO_PTX_SEM_SCOPED(M, S, "atom", ".cas" PTXT " %0, [%1], %2, %3;\n",                   \
                     : "=" RC(old) : "l"(p), RC(cmp), RC(val) : "memory");               \
  return old;
#endif
FMO_DEFINE_CAS(uint32_t, ".b32", "r")
FMO_DEFINE_CAS(unsigned long, ".b64", "l")
FMO_DEFINE_CAS(unsigned long long, ".b64", "l")

}  // namespace ptx
}  // namespace fmo
