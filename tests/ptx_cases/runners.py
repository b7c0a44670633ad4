"""Where a `Case` runs: `SimRunner` on the CPU SIMT simulator, `CudaRunner` on the current CUDA
device (tests/gpu/test_ptx_conformance.py), with the same source and the same arguments."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from .case import Case

HEADERS = """
#include "ptx/common.cuh"
#include "ptx/mma.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/cp_async.cuh"
#include "ptx/ld_st.cuh"
#include "ptx/barrier.cuh"
#include "ptx/mbarrier.cuh"
#include "ptx/tma.cuh"
#include "ptx/warp.cuh"
#include "csrc/common/pipeline.cuh"
using namespace fmo::ptx;
"""


def sim_or_skip():
    """The simulator module, or a skip with the reason it cannot be used."""
    try:
        from fastmoe_ops import sim
    except ImportError as e:  # the simulator is part of the package; missing = not built
        pytest.skip(f"fastmoe_ops.sim cannot be imported ({e}); build it with `pip install -e .`")
    if hasattr(sim, "available") and not sim.available():
        pytest.skip("fastmoe_ops.sim is present but its runtime is not built (pip install -e .)")
    return sim


def include_options() -> tuple[str, ...]:
    from fastmoe_ops.runtime.compiler import include_options as inc

    return tuple(inc())


class SimRunner:
    """Compiles `HEADERS + source` for the CPU SIMT simulator and runs cases on it."""

    engine = "sim"

    def __init__(self, source: str):
        sim = sim_or_skip()
        self.module = sim.RawModule(code=HEADERS + source, options=include_options())

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).copy())

    def launch(self, case: Case, tensors: list) -> None:
        fn = self.module.get_function(case.kernel)
        fn(case.grid, case.block, tuple(tensors), shared_mem=case.shared_mem)

    def prepare(self, case: Case) -> list:
        """The case's arguments on this engine; TMA descriptors (case.extra["tma"]: (descriptor
        argument, tensor argument, box, swizzle)) encoded for this engine's copy of the tensor."""
        tensors = [self.to_device(a) if isinstance(a, np.ndarray) else a for a in case.args]
        for di, ti, box, swizzle in case.extra.get("tma", ()):
            from fastmoe_ops.runtime.tensor_map import descriptor, encode_tiled

            tensors[di] = descriptor(encode_tiled(tensors[ti], box, swizzle=swizzle, engine=self.engine))
        return tensors

    def run(self, case: Case) -> list[np.ndarray]:
        tensors = self.prepare(case)
        self.launch(case, tensors)
        return [tensors[i].numpy().copy() for i in case.outputs]


class CudaRunner(SimRunner):
    """The same source on the current CUDA device: compiled for `arch` by the project's NVRTC
    path (disk-cached), loaded and launched through `fastmoe_ops.runtime.cuda_driver`, the
    library's one door to the driver. Arguments follow the simulator's (and CuPy's)
    convention: tensors pass as pointers, numpy scalars by value."""

    engine = "cuda"

    def __init__(self, source: str, arch: str):
        from fastmoe_ops.runtime import cuda_driver
        from fastmoe_ops.runtime.compiler import compile_nvrtc, cuda_include_dir

        extra = []
        inc = cuda_include_dir()
        if inc is not None:  # NVRTC has no C++ standard headers: ptx/ uses CCCL's (include/cccl)
            extra.append(f"-I{inc / 'cccl'}")
        self.cubin = compile_nvrtc(HEADERS + source, "ptx_conformance", arch, tuple(extra)).cubin
        self.module = cuda_driver.Module(self.cubin.read_bytes(), "ptx_conformance")
        self.kernels = {}  # name -> cuda_driver.Kernel

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).copy()).cuda()

    def launch(self, case: Case, tensors: list) -> None:
        from fastmoe_ops.runtime.launch import LaunchConfig
        from fastmoe_ops.sim.launch import pack_one

        kernel = self.kernels.get(case.kernel)
        if kernel is None:
            kernel = self.kernels[case.kernel] = self.module.kernel(case.kernel)
        config = LaunchConfig.make(case.grid, case.block, case.shared_mem)
        args = [np.uint64(t.data_ptr()) if isinstance(t, torch.Tensor) else t for t in tensors]
        blobs = [(ctypes.c_char * len(data)).from_buffer_copy(data) for data in (pack_one(i, a).data for i, a in enumerate(args))]
        params = (ctypes.c_void_p * len(blobs))(*(ctypes.addressof(b) for b in blobs))
        torch.cuda.synchronize()
        kernel.launch(config.grid, config.block, config.shared_mem, torch.cuda.current_stream().cuda_stream,
                      ctypes.addressof(params))
        torch.cuda.synchronize()

    def run(self, case: Case) -> list[np.ndarray]:
        tensors = self.prepare(case)
        self.launch(case, tensors)
        return [tensors[i].cpu().numpy().copy() for i in case.outputs]
