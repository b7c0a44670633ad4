"""Expert-parallel MoE: `Buffer` (dispatch/combine across ranks, with a `Handle`) and the
local `permute`/`unpermute` helpers that feed the grouped GEMM."""
from .buffer import Buffer, Handle  # noqa: F401
from .permute import PermuteMap, permute, unpermute  # noqa: F401
