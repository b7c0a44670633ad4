// csrc/common/pipeline.cuh: the position in a multi-stage smem ring (STYLE.md: the stage index
// and the phase bit travel together). `phase` is the parity to wait on for the stage's
// "full" barrier; it flips each time the ring wraps. Producers waiting on "empty" barriers
// start at phase 1 (a fresh barrier's previous phase counts as completed: ptx/mbarrier.cuh).
#pragma once

#include "ptx/common.cuh"

namespace fmo {

struct PipelineState {
  uint32_t stage = 0;
  uint32_t phase = 0;

  FMO_DEVICE void advance(uint32_t num_stages) {
    if (++stage == num_stages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

}  // namespace fmo
