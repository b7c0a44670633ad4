"""The one door to CUDA below torch: every driver-level call fastmoe_ops makes goes through here.

Loading a cubin, a kernel's handle, its dynamic shared-memory opt-in, the launch, NVRTC, and
CUDA IPC. Built only on CuPy's modules that mirror the CUDA C APIs call for call
(`cupy.cuda.driver`, `cupy.cuda.runtime`, `cupy.cuda.nvrtc`: each function takes the C
function's arguments, handles and pointers as ints), never on CuPy's own objects, whose
attributes move between releases: CuPy 14's RawKernel has no `.ptr`, which failed every launch
of the first GPU run. `CUPY_API` declares every CuPy name used here with the signature
expected; `tests/test_cuda_driver_contract.py` checks it against each CuPy release in
`SUPPORTED_CUPY` (pyproject's `cuda` extra says the same), and `bind()` refuses a CuPy that
lacks any of them. Failures raise LaunchError (CompileError for NVRTC) naming the kernel, or
the CUDA call, and the CuPy version. Raw device memory reaches torch through
`__cuda_array_interface__`, torch's own reader of it, so no CuPy array is ever made.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import CompileError, FmoError, LaunchError

# pip's version range of `cupy-cuda13x` that the contract test covers, both ends included.
SUPPORTED_CUPY = ">=13.6,<15"


@dataclass(frozen=True)
class CupyName:
    path: str             # from the cupy package down: "cupy.cuda.driver.launchKernel"
    signature: str | None  # CuPy's embedded signature (its docstring's first line, Cython's
    #                        `unicode` read as `str`); None: an attribute, not a function

    @property
    def attr(self) -> str:
        return self.path.rsplit(".", 1)[1]


CUPY_API: tuple[CupyName, ...] = (
    CupyName("cupy.__version__", None),
    CupyName("cupy.cuda.driver.moduleLoadData", "moduleLoadData(bytes image) -> intptr_t"),
    CupyName("cupy.cuda.driver.moduleGetFunction", "moduleGetFunction(intptr_t module, str funcname) -> intptr_t"),
    CupyName("cupy.cuda.driver.funcSetAttribute", "funcSetAttribute(intptr_t f, int attribute, int value)"),
    CupyName("cupy.cuda.driver.launchKernel",
             "launchKernel(intptr_t f, unsigned int grid_dim_x, unsigned int grid_dim_y, unsigned int grid_dim_z, "
             "unsigned int block_dim_x, unsigned int block_dim_y, unsigned int block_dim_z, "
             "unsigned int shared_mem_bytes, intptr_t stream, intptr_t kernel_params, intptr_t extra)"),
    CupyName("cupy.cuda.runtime.driverGetVersion", "driverGetVersion() -> int"),
    CupyName("cupy.cuda.runtime.malloc", "malloc(size_t size) -> intptr_t"),
    CupyName("cupy.cuda.runtime.free", "free(intptr_t ptr)"),
    CupyName("cupy.cuda.runtime.ipcGetMemHandle", "ipcGetMemHandle(intptr_t devPtr)"),
    CupyName("cupy.cuda.runtime.ipcOpenMemHandle",
             "ipcOpenMemHandle(bytes handle, unsigned int flags=cudaIpcMemLazyEnablePeerAccess)"),
    CupyName("cupy.cuda.runtime.ipcCloseMemHandle", "ipcCloseMemHandle(intptr_t devPtr)"),
    CupyName("cupy.cuda.nvrtc.getVersion", "getVersion() -> tuple"),
    CupyName("cupy.cuda.nvrtc.createProgram", "createProgram(str src, str name, headers, include_names) -> intptr_t"),
    CupyName("cupy.cuda.nvrtc.compileProgram", "compileProgram(intptr_t prog, options)"),
    CupyName("cupy.cuda.nvrtc.getProgramLog", "getProgramLog(intptr_t prog) -> str"),
    CupyName("cupy.cuda.nvrtc.getCUBIN", "getCUBIN(intptr_t prog) -> bytes"),
    CupyName("cupy.cuda.nvrtc.getPTX", "getPTX(intptr_t prog) -> bytes"),
    CupyName("cupy.cuda.nvrtc.destroyProgram", "destroyProgram(intptr_t prog)"),
)

# CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (cuda.h; the runtime's
# cudaFuncAttributeMaxDynamicSharedMemorySize): above 48 KiB a kernel must opt in.
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DEFAULT_DYNAMIC_SMEM = 48 * 1024


def _resolve(cupy, path: str):
    obj = cupy
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def embedded_signature(fn) -> str:
    """CuPy's signature of `fn` as Cython embeds it: the first line of its docstring."""
    lines = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    return re.sub(r"\bunicode\b", "str", lines[0].strip()) if lines else ""


def _problems(cupy, signatures: bool) -> list[str]:
    out = []
    for name in CUPY_API:
        try:
            obj = _resolve(cupy, name.path)
        except AttributeError:
            out.append(f"{name.path}: missing")
            continue
        if signatures and name.signature is not None and embedded_signature(obj) != name.signature:
            out.append(f"{name.path}: signature {embedded_signature(obj)!r}, expected {name.signature!r}")
    return out


class _Api:
    """The bound CuPy functions, one attribute per declared name (`api.launchKernel`)."""

    def __init__(self, cupy):
        for name in CUPY_API:
            setattr(self, name.attr, _resolve(cupy, name.path))
        self.version = self.__version__


_api: _Api | None = None


def bind(what: str, error: type[FmoError] = LaunchError) -> _Api:
    """CuPy's functions, bound once per process; raises `error` naming `what` (a kernel or a
    CUDA call) when CuPy does not import or lacks a declared name."""
    global _api
    api = _api
    if api is not None:
        return api
    try:
        import cupy  # type: ignore
    except Exception as e:  # ImportError, or CuPy's own error on a broken install
        raise error(f"{what}: needs CuPy (pip install 'fastmoe-ops[cuda]'), which does not import here: {e}") from None
    missing = _problems(cupy, signatures=False)
    if missing:
        raise error(f"{what}: CuPy {getattr(cupy, '__version__', '?')} lacks what fastmoe_ops uses "
                    f"({'; '.join(missing)}); supported: cupy-cuda13x{SUPPORTED_CUPY}") from None
    _api = api = _Api(cupy)
    return api


def cupy_version() -> str | None:
    """The importable CuPy's version, None where none imports (the `cuda` engine needs it)."""
    try:
        import cupy  # type: ignore
    except Exception:
        return None
    return getattr(cupy, "__version__", "?")


def contract_problems() -> list[str]:
    """Every declared name the importable CuPy lacks or whose signature differs (empty: the
    contract holds). Raises ImportError where CuPy does not import."""
    import cupy  # type: ignore

    return _problems(cupy, signatures=True)


# ------------------------------------------------------------------------------ kernels


def _checked(what: str, call: str, version: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # CuPy's CUDADriverError and friends
        raise LaunchError(f"{what}: {call} failed (CuPy {version}): {e}") from None


class Module:
    """A cubin loaded into the current CUDA context (the caller selects the device); it stays
    loaded for the process's life, as the launcher caches what it loads."""

    __slots__ = ("label", "handle", "_api")

    def __init__(self, cubin: bytes, label: str):
        self._api = api = bind(label)
        self.label = label  # names the module in errors: its (first) kernel's name
        self.handle = _checked(label, "cuModuleLoadData", api.version, api.moduleLoadData, cubin)

    def kernel(self, name: str) -> "Kernel":
        return Kernel(self, name)


class Kernel:
    """One `__global__` function of a loaded Module, launched with `launch`."""

    __slots__ = ("name", "module", "handle", "max_dynamic_smem", "_launch", "_set_attribute", "_version")

    def __init__(self, module: Module, name: str):
        api = module._api
        self.name, self.module, self._version = name, module, api.version
        self.handle = _checked(name, "cuModuleGetFunction", api.version, api.moduleGetFunction, module.handle, name)
        self.max_dynamic_smem = DEFAULT_DYNAMIC_SMEM
        self._launch = api.launchKernel  # hoisted: a warm launch looks nothing up
        self._set_attribute = api.funcSetAttribute

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int, stream: int,
               kernel_params: int) -> None:
        """cuLaunchKernel on `stream`; `kernel_params` is the address of the array of pointers
        to each argument's bytes (CUDA's `void** kernelParams`). Dynamic shared memory above
        48 KiB is opted into first, once per size increase."""
        if shared_mem > self.max_dynamic_smem:
            _checked(self.name, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", self._version,
                     self._set_attribute, self.handle, _MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem)
            self.max_dynamic_smem = shared_mem
        try:
            self._launch(self.handle, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem, stream,
                         kernel_params, 0)
        except Exception as e:
            raise LaunchError(f"{self.name}: cuLaunchKernel failed (CuPy {self._version}): {e}") from None


def launch_kernel_address() -> int:
    """The address of the driver's own cuLaunchKernel (libcuda, the library CuPy calls into):
    the C++ fast launch path (runtime/fast_launch.py) calls it with the same CUfunction
    handles `Kernel` holds, so that file links against no CUDA library."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        return ctypes.cast(lib.cuLaunchKernel, ctypes.c_void_p).value
    except (OSError, AttributeError) as e:
        raise LaunchError(f"cuLaunchKernel: libcuda.so.1 not loadable here: {e}") from None


# -------------------------------------------------------------------------------- NVRTC


@dataclass(frozen=True)
class NvrtcOutput:
    cubin: bytes
    ptx: bytes  # empty unless asked for
    log: str


def nvrtc_version() -> str:
    """'nvrtc MAJOR.MINOR', or '' where CuPy or NVRTC cannot be loaded (a cache-key part)."""
    try:
        api = bind("nvrtcGetVersion", CompileError)
        major, minor = api.getVersion()
    except Exception:
        return ""
    return f"nvrtc {major}.{minor}"


def nvrtc_compile(source: str, name: str, options, *, where: str = "", ptx: bool = False) -> NvrtcOutput:
    """Compile `source` (file name `<name>.cu`) with NVRTC; a failure raises CompileError
    naming `name` (`where` adds context, e.g. the arch), the CuPy version and NVRTC's log."""
    api = bind(name, CompileError)
    label = f"{name}{' ' + where if where else ''}"
    try:
        prog = api.createProgram(source, f"{name}.cu", [], [])
    except Exception as e:  # also: libnvrtc not found
        raise CompileError(f"{label}: nvrtcCreateProgram failed (CuPy {api.version}): {e}") from None
    try:
        try:
            api.compileProgram(prog, list(options))
        except Exception as e:
            raise CompileError(f"{label}: NVRTC failed (CuPy {api.version}): {e}\n{api.getProgramLog(prog)}") from None
        return NvrtcOutput(_whole_cubin(api.getCUBIN(prog)), api.getPTX(prog) if ptx else b"", api.getProgramLog(prog))
    except CompileError:
        raise
    except Exception as e:  # reading the results back
        raise CompileError(f"{label}: NVRTC output unreadable (CuPy {api.version}): {e}") from None
    finally:
        api.destroyProgram(prog)


def elf_table_ends(blob: bytes) -> dict[str, int]:
    """Where an ELF64 file's section-header and program-header tables end, from its header
    (e_shoff at 0x28, e_shentsize 0x3A, e_shnum 0x3C; e_phoff 0x20, e_phentsize 0x36, e_phnum 0x38)."""
    def field(at: int, size: int) -> int:
        return int.from_bytes(blob[at:at + size], "little")

    return {"section": field(0x28, 8) + field(0x3A, 2) * field(0x3C, 2),
            "program": field(0x20, 8) + field(0x36, 2) * field(0x38, 2)}


def _whole_cubin(cubin: bytes) -> bytes:
    """CuPy's getCUBIN returns the cubin one byte short (CuPy 13.6 and 14.2 strip a trailing
    NUL that only NVRTC's text outputs have): the driver still loads it, cuobjdump finds "no
    device code" in it. NVRTC writes the ELF program-header table last, so the byte lost is
    the top byte of the last header's p_align, which is zero: put it back exactly when the
    ELF header says that table ends one byte past the blob (a fixed CuPy is left alone)."""
    if cubin[:4] == b"\x7fELF" and len(cubin) >= 64 and elf_table_ends(cubin)["program"] == len(cubin) + 1:
        return cubin + b"\0"
    return cubin


# ---------------------------------------------------------------------- memory and IPC


def _runtime(call: str, fn_name: str, *args):
    api = bind(call)
    return _checked("CUDA runtime", call, api.version, getattr(api, fn_name), *args)


def malloc(nbytes: int) -> int:
    """cudaMalloc on the current device: an allocation of its own (an IPC handle names a
    whole allocation; torch's caching allocator carves blocks out of larger ones)."""
    return _runtime("cudaMalloc", "malloc", nbytes)


def free(ptr: int) -> None:
    _runtime("cudaFree", "free", ptr)


def ipc_get_mem_handle(ptr: int) -> bytes:
    """cudaIpcGetMemHandle: the 64-byte handle a peer process opens."""
    return bytes(_runtime("cudaIpcGetMemHandle", "ipcGetMemHandle", ptr))


def ipc_open_mem_handle(handle: bytes) -> int:
    """cudaIpcOpenMemHandle (flag cudaIpcMemLazyEnablePeerAccess) on the current device."""
    return _runtime("cudaIpcOpenMemHandle", "ipcOpenMemHandle", handle)


def ipc_close_mem_handle(ptr: int) -> None:
    _runtime("cudaIpcCloseMemHandle", "ipcCloseMemHandle", ptr)

def driver_version() -> int | None:
    """The CUDA driver's version (e.g. 13000), None where CuPy or a driver is absent."""
    try:
        return _runtime("cudaDriverGetVersion", "driverGetVersion")
    except FmoError:  # no CuPy, or no driver: the CPU machine has neither
        return None


class _DeviceBytes:
    """`nbytes` of device memory at `ptr` as torch reads foreign memory
    (`__cuda_array_interface__`). torch keeps this object alive with the tensor and frees
    nothing: the memory stays the caller's."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None,
                                         "version": 3}


def device_tensor(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor [nbytes] over device memory the caller owns (no copy)."""
    return torch.as_tensor(_DeviceBytes(ptr, nbytes), device=device)


# ------------------------------------------------------------------------ tensor maps
# CuPy does not expose cuTensorMapEncodeTiled; NVIDIA's cuda-bindings (`cuda.bindings.driver`,
# pip `cuda-bindings`) does, call for call. Declared like CUPY_API: every name used here, with
# what it must be (tests/test_cuda_driver_contract.py checks them where the package imports).
CUDA_BINDINGS_API: tuple[str, ...] = (
    "cuda.bindings.driver.cuTensorMapEncodeTiled",  # (dtype, rank, addr, dims, strides, box,
    #                                                  elem strides, interleave, swizzle, l2, oob) -> (err, map)
    "cuda.bindings.driver.CUresult",
    "cuda.bindings.driver.CUtensorMapDataType",
    "cuda.bindings.driver.CUtensorMapInterleave",
    "cuda.bindings.driver.CUtensorMapSwizzle",
    "cuda.bindings.driver.CUtensorMapL2promotion",
    "cuda.bindings.driver.CUtensorMapFloatOOBfill",
    "cuda.bindings.driver.cuuint32_t",  # the rank, box and element strides (plain ints are refused)
    "cuda.bindings.driver.cuuint64_t",  # the dims and strides
)
# cuda-bindings releases the contract test covers (pip's range; cuda-bindings 13.x matches CUDA 13)
SUPPORTED_CUDA_BINDINGS = ">=13,<14"
_SWIZZLE_ENUM = {0: "CU_TENSOR_MAP_SWIZZLE_NONE", 32: "CU_TENSOR_MAP_SWIZZLE_32B", 64: "CU_TENSOR_MAP_SWIZZLE_64B",
                 128: "CU_TENSOR_MAP_SWIZZLE_128B"}


def cuda_bindings_problems() -> list[str]:
    """Every declared cuda-bindings name that the importable package lacks (ImportError where
    it does not import)."""
    import cuda.bindings.driver as drv  # type: ignore

    return [p for p in CUDA_BINDINGS_API if not hasattr(drv, p.rsplit(".", 1)[1])]


def tensor_map_encode_tiled(cu_dtype: int, address: int, dims: list[int], strides: list[int], box: list[int],
                            swizzle: int) -> bytes:
    """cuTensorMapEncodeTiled: 128 bytes (arguments validated by runtime/tensor_map.py; element
    strides 1, no interleave, L2 promotion 256 B, OOB fill zero)."""
    try:
        import cuda.bindings.driver as drv  # type: ignore
    except Exception as e:
        raise LaunchError(f"cuTensorMapEncodeTiled: needs cuda-bindings (pip install cuda-bindings), which does "
                          f"not import here: {e}") from None
    missing = cuda_bindings_problems()
    if missing:
        raise LaunchError(f"cuTensorMapEncodeTiled: the installed cuda-bindings lacks {missing}")
    rank = len(dims)
    u32 = lambda xs: [drv.cuuint32_t(int(x)) for x in xs]  # noqa: E731
    u64 = lambda xs: [drv.cuuint64_t(int(x)) for x in xs]  # noqa: E731
    try:
        err, tmap = drv.cuTensorMapEncodeTiled(
            drv.CUtensorMapDataType(cu_dtype), drv.cuuint32_t(rank), address, u64(dims), u64(strides), u32(box),
            u32([1] * rank),
            drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, getattr(drv.CUtensorMapSwizzle, _SWIZZLE_ENUM[swizzle]),
            drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    except Exception as e:  # the driver library missing, an argument refused
        raise LaunchError(f"cuTensorMapEncodeTiled: {type(e).__name__}: {e}") from None
    if err != drv.CUresult.CUDA_SUCCESS:
        raise LaunchError(f"cuTensorMapEncodeTiled failed: {err} (dims {dims}, strides {strides}, box {box}, "
                          f"swizzle {swizzle})")
    words = getattr(tmap, "opaque", None)
    if words is not None:
        import struct

        return struct.pack("<16Q", *[int(x) for x in words])
    import ctypes

    return ctypes.string_at(int(tmap.getPtr()), 128)

