"""The ptx/ wrapper tests' kernels and cases, shared by tests/test_ptx_*.py (the simulator),
tests/test_ptx_build.py (nvcc for sm_90a), tests/test_mma_capture_replay.py and
tests/gpu/test_ptx_conformance.py (a real GPU): a helper package, so test files never import
each other.

- `case`: a `Case` (one launch of a small test kernel with seeded inputs, poisoned outputs and
  a check against a numpy model of the PTX ISA's definition) and the comparisons the checks use;
- `formats`: the models of the input formats (bf16, f16, e4m3, e5m2): encoders and decoders;
- `runners`: `SimRunner` (the CPU SIMT simulator) and `CudaRunner` (the current CUDA device),
  which run the same case, so the GPU conformance test can also compare the two engines;
- `build`: a test kernel compiled offline for sm_90a with nvcc, and ptxas's report;
- one module per wrapper family (`mma`, `ldmatrix`, `cp_async`, `ld_st`, `barrier`, `wgmma`):
  its kernel `SOURCE`, its models and case builders, and `cases(seed)`, every case of the
  family, which the GPU conformance test runs.
"""
