// ptx/timer.cuh: the global timer and the SM id (PTX ISA, "Special Registers").
//
//   globaltimer()   mov.u64 %0, %globaltimer;   nanoseconds, one clock for every SM of the GPU
//   smid()          mov.u32 %0, %smid;          the SM running this CTA
//
// %globaltimer is what makes start/end stamps of CTAs on different SMs (and of kernels on
// different streams) comparable; clock64 is per SM and is not. Its resolution is coarse on
// some drivers (updates every ~1 us), fine for kernels that run for microseconds or more.
// %smid is informative only: the ISA allows it to change during a thread's life (preemption).
//
// Emulation (FMO_SIM): globaltimer is the simulator's steady clock (fmo_sim::globaltimer,
// CLOCK_MONOTONIC nanoseconds, the clock Python's time.monotonic_ns reads), shared by all
// CTAs and by host code. smid is the OS worker thread running the CTA (its kernel thread
// id): in the simulator a worker plays the part of an SM.
#pragma once

#include "ptx/common.cuh"

#ifdef FMO_SIM
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fmo {
namespace ptx {

FMO_DEVICE uint64_t globaltimer() {
#ifdef FMO_SIM
  return fmo_sim::globaltimer();
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

FMO_DEVICE uint32_t smid() {
#ifdef FMO_SIM
  return static_cast<uint32_t>(::syscall(SYS_gettid));
#else
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
#endif
}

}  // namespace ptx
}  // namespace fmo
