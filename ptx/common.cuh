// ptx/common.cuh: shared definitions for the inline-PTX wrappers under ptx/.
//
// Every inline PTX statement of the project lives in a wrapper in ptx/<family>.cuh. Each
// wrapper has two bodies: the `asm volatile` one for the GPU, and a CPU emulation written
// from the PTX ISA's definition of the instruction, selected by `FMO_SIM` (defined when a
// kernel is compiled for the host SIMT simulator, whose prelude csrc/sim/fmo_sim.h is
// force-included before these headers and provides namespace `fmo_sim`).
//
// Kernels include these headers and call `fmo::ptx::...`; they never write PTX themselves.
#pragma once

#ifdef __CUDACC_RTC__
// NVRTC has no C++ standard library headers; CCCL's (CUDA's include/cccl, which must be on
// the include path) define the fixed-width types. memcpy is a device builtin.
#include <cuda/std/cstddef>
#include <cuda/std/cstdint>
#else
#include <cstddef>
#include <cstdint>
#include <cstring>
#endif

// Device functions, in both builds (the simulator's prelude maps `__device__` to nothing
// and `__forceinline__` to `inline __attribute__((always_inline))`).
#define FMO_DEVICE __device__ __forceinline__

#ifdef FMO_SIM
// Emulation helpers (namespace sim_detail) touch memory on behalf of the emulated
// instruction: they are not sanitizer-instrumented (checking builds instrument user code
// with -fsanitize=thread) and report their accesses explicitly with fmo_sim::check_access.
// Not always_inline: GCC refuses to force-inline across differing sanitizer attributes.
#ifndef FMO_SIM_NOTSAN
#define FMO_SIM_NOTSAN __attribute__((no_sanitize_thread))
#endif
#define FMO_SIM_EMU inline FMO_SIM_NOTSAN
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastmoe-ops ptx/ wrappers target sm_80+ (cp.async, bf16 mma); fp8 mma needs sm_89+"
#endif

namespace fmo {
namespace ptx {

// Memory-consistency scope of an operation (PTX ISA, Memory Consistency Model, "Scope").
enum class Scope { cta, gpu, sys };

// Memory-ordering semantics of an atomic or a load/store (PTX ISA, Memory Consistency
// Model, "Memory Operations"; instructions "ld", "st", "atom", "red").
enum class Sem { relaxed, acquire, release, acq_rel };

// Bit casts without UB (memcpy is folded into register moves on both sides). Plain
// `inline` in sim builds so that the non-instrumented emulation helpers may use it.
template <typename To, typename From>
#ifdef FMO_SIM
inline
#else
FMO_DEVICE
#endif
To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

#ifdef FMO_SIM
namespace sim_detail {
// std::memory_order-style constant for the GCC/Clang __atomic builtins. In the simulator
// all threads share one process, so every scope maps to the same (strongest needed) host
// ordering; the scope only matters on the GPU.
constexpr int host_order(Sem s) {
  return s == Sem::relaxed   ? __ATOMIC_RELAXED
         : s == Sem::acquire ? __ATOMIC_ACQUIRE
         : s == Sem::release ? __ATOMIC_RELEASE
                             : __ATOMIC_ACQ_REL;
}

FMO_SIM_EMU void require_aligned(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0)
    fmo_sim::fail("%s: address %p is not %zu-byte aligned (misaligned address on the GPU)",
                  what, p, align);
}
}  // namespace sim_detail
#else
// 32-bit shared-memory address of a generic pointer into shared memory (for the
// `.shared` state-space forms, whose address operand is a shared-window offset).
FMO_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

}  // namespace ptx
}  // namespace fmo

// Emits one of three `asm volatile` statements that differ only in a `.cta`/`.gpu`/`.sys`
// qualifier chosen at compile time; PTX qualifiers must be literal text. Usage:
//   FMO_PTX_SCOPED(S, "ld.acquire", ".b32 %0, [%1];", : "=r"(v) : "l"(p) : "memory");
#define FMO_PTX_SCOPED(SCOPE, HEAD, TAIL, ...)                           \
  do {                                                                   \
    if constexpr ((SCOPE) == ::fmo::ptx::Scope::cta) {                   \
      asm volatile(HEAD ".cta" TAIL __VA_ARGS__);                        \
    } else if constexpr ((SCOPE) == ::fmo::ptx::Scope::gpu) {            \
      asm volatile(HEAD ".gpu" TAIL __VA_ARGS__);                        \
    } else {                                                             \
      asm volatile(HEAD ".sys" TAIL __VA_ARGS__);                        \
    }                                                                    \
  } while (0)
