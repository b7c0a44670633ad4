// Every fused-attention kernel role, for the generated stubs: the forward (fwd.cuh) and the
// backward's delta, dQ and dK/dV kernels (bwd.cuh), sharing mainloop.cuh and softmax.cuh.
#pragma once

#include "csrc/attention/bwd.cuh"
#include "csrc/attention/fwd.cuh"
