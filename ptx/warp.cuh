// ptx/warp.cuh: warp leader election and warpgroup register reallocation (PTX ISA, Parallel
// Synchronization and Communication Instructions, "elect.sync"; Miscellaneous Instructions,
// "setmaxnreg"), sm_90.
//
//   elect_one_sync()      elect.sync _|p, 0xffffffff: true in exactly one lane (the lowest)
//   setmaxnreg_inc<N>()   setmaxnreg.inc.sync.aligned.u32 N   (N in 24..256, a multiple of 8)
//   setmaxnreg_dec<N>()   setmaxnreg.dec.sync.aligned.u32 N
//
// elect.sync with a full mask must be executed by all 32 lanes. setmaxnreg is executed by
// every warp of a warpgroup (.aligned); the kernel must be compiled with a register count
// (maxrregcount / launch bounds) that the inc/dec amounts respect.
//
// Emulation (FMO_SIM): elect_one_sync is a full-warp ballot (a lane that exited fails the
// launch, as the collective's mask names it) returning true in its lowest lane; setmaxnreg
// checks N at compile time and is otherwise a no-op (the simulator has no register file).
#pragma once

#include "ptx/common.cuh"

namespace fmo {
namespace ptx {

FMO_DEVICE bool elect_one_sync() {
#ifdef FMO_SIM
  const unsigned all = __ballot_sync(0xffffffffu, 1);
  return fmo_sim::lane_id() == static_cast<unsigned>(__builtin_ctz(all));
#else
  uint32_t pred;
  asm volatile(
      "{\n .reg .b32 r;\n .reg .pred p;\n elect.sync r|p, 0xffffffff;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(pred));
  return pred != 0;
#endif
}

template <uint32_t N>
FMO_DEVICE void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: N in 24..256, a multiple of 8");
#ifndef FMO_SIM
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

template <uint32_t N>
FMO_DEVICE void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: N in 24..256, a multiple of 8");
#ifndef FMO_SIM
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

}  // namespace ptx
}  // namespace fmo
