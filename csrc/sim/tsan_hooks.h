// ThreadSanitizer callbacks of a checking build (FMO_SIM_RACECHECK / FMO_SIM_MEMCHECK).
//
// The module is compiled with -fsanitize=thread but linked WITHOUT libtsan: these hidden
// definitions receive every instrumented load and store and forward it to the simulator's
// memcheck/racecheck through the bind table. Atomics are performed here (sequentially
// consistent) and checked as atomics, which never race with each other. Volatile reads also
// yield, so spin loops on volatile flags make progress in checking builds.
#pragma once

#define FMO_TSAN extern "C" __attribute__((visibility("hidden"), no_sanitize_thread, used))

namespace fmo_sim {
FMO_SIM_NOTSAN inline void tsan_check(const volatile void* p, std::size_t n, int kind) {
  g_api->check_access(const_cast<const void*>(p), n, kind);
}
}  // namespace fmo_sim

FMO_TSAN void __tsan_init() {}
FMO_TSAN void __tsan_func_entry(void*) {}
FMO_TSAN void __tsan_func_exit() {}
FMO_TSAN void __tsan_vptr_update(void**, void*) {}
FMO_TSAN void __tsan_vptr_read(void**) {}
FMO_TSAN void __tsan_read_range(void* p, unsigned long n) { ::fmo_sim::tsan_check(p, n, ::fmo_sim::kRead); }
FMO_TSAN void __tsan_write_range(void* p, unsigned long n) { ::fmo_sim::tsan_check(p, n, ::fmo_sim::kWrite); }

#define FMO_TSAN_RW(N)                                                                                          \
  FMO_TSAN void __tsan_read##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kRead); }                       \
  FMO_TSAN void __tsan_write##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kWrite); }                     \
  FMO_TSAN void __tsan_unaligned_read##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kRead); }             \
  FMO_TSAN void __tsan_unaligned_write##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kWrite); }           \
  FMO_TSAN void __tsan_volatile_read##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kRead); ::fmo_sim::yield(); } \
  FMO_TSAN void __tsan_volatile_write##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kWrite); }            \
  FMO_TSAN void __tsan_unaligned_volatile_read##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kRead); ::fmo_sim::yield(); } \
  FMO_TSAN void __tsan_unaligned_volatile_write##N(void* p) { ::fmo_sim::tsan_check(p, N, ::fmo_sim::kWrite); }
FMO_TSAN_RW(1)
FMO_TSAN_RW(2)
FMO_TSAN_RW(4)
FMO_TSAN_RW(8)
FMO_TSAN_RW(16)
#undef FMO_TSAN_RW

#define FMO_TSAN_ATOMIC(BITS, T)                                                                                 \
  FMO_TSAN T __tsan_atomic##BITS##_load(const volatile T* a, int) {                                              \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); ::fmo_sim::yield();                                 \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST); }                                                               \
  FMO_TSAN void __tsan_atomic##BITS##_store(volatile T* a, T v, int) {                                           \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }         \
  FMO_TSAN T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) {                                           \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  FMO_TSAN T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) {                                          \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  FMO_TSAN T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) {                                          \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  FMO_TSAN T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) {                                          \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  FMO_TSAN T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) {                                           \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }  \
  FMO_TSAN T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int) {                                          \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  FMO_TSAN T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int) {                                         \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic); return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  FMO_TSAN int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {               \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic);                                                     \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }                    \
  FMO_TSAN int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                 \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic);                                                     \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }                    \
  FMO_TSAN T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                     \
    ::fmo_sim::tsan_check(a, sizeof(T), ::fmo_sim::kAtomic);                                                     \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
FMO_TSAN_ATOMIC(8, unsigned char)
FMO_TSAN_ATOMIC(16, unsigned short)
FMO_TSAN_ATOMIC(32, unsigned int)
FMO_TSAN_ATOMIC(64, unsigned long long)
#undef FMO_TSAN_ATOMIC
FMO_TSAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
FMO_TSAN void __tsan_atomic_signal_fence(int) {}
