"""The CUDA adapter (fastmoe_ops.runtime.cuda_driver) against a fake CuPy, on a CPU: what
the launch path hands the driver, and that every failure names the kernel and the CuPy
version. The fake's functions carry the signatures CUPY_API declares; that the real CuPy
releases match them is tests/test_cuda_driver_contract.py's job."""
from __future__ import annotations

import ast
import ctypes
import sys
import types
from pathlib import Path

import pytest

from fastmoe_ops.errors import CompileError, LaunchError
from fastmoe_ops.runtime import compiler, cuda_driver, launch

FAKE_VERSION = "13.6.0"


def _fake_cupy(version: str = FAKE_VERSION, leave_out: str = "", **overrides):
    """A module tree shaped like CuPy's: one recording stub per declared function."""
    calls: list[tuple] = []
    cupy = types.ModuleType("cupy")
    cupy.__version__ = version
    cupy.cuda = types.SimpleNamespace(driver=types.SimpleNamespace(), runtime=types.SimpleNamespace(),
                                      nvrtc=types.SimpleNamespace())
    for name in cuda_driver.CUPY_API:
        if name.signature is None or name.path == leave_out:
            continue
        module = getattr(cupy.cuda, name.path.split(".")[2])
        attr = name.attr
        fn = overrides.get(attr)
        if fn is None:
            def fn(*args, _attr=attr):
                calls.append((_attr, *args))
                return {"moduleLoadData": 0x1000, "moduleGetFunction": 0x2000, "malloc": 0x7F0000}.get(_attr)
        fn.__doc__ = name.signature
        setattr(module, attr, fn)
    return cupy, calls


@pytest.fixture
def fake(monkeypatch):
    """Install a fake CuPy (replace it with `fake(...)` again for variants)."""
    def install(*args, **kwargs):
        cupy, calls = _fake_cupy(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        monkeypatch.setattr(cuda_driver, "_api", None)  # bind again, to this CuPy
        return calls
    return install


def _cubin(tmp_path):
    path = tmp_path / "k.cubin"
    path.write_bytes(b"\x7fELF fake cubin")
    return path


class _Args(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64)]


def test_launch_hands_the_driver_what_cuda_expects(fake, tmp_path):
    launches, n_args = [], [1]

    def launch_kernel(*args):
        # kernelParams (args[9]) lives only during the call: read the pointers it holds now
        held = tuple(ctypes.c_void_p.from_address(args[9] + 8 * i).value for i in range(n_args[0]))
        launches.append(args[:9] + (held, args[10]))

    calls = fake(launchKernel=launch_kernel)
    fn = launch._CudaFunction("fmo_probe_kernel", _cubin(tmp_path))
    assert calls == [("moduleLoadData", b"\x7fELF fake cubin"), ("moduleGetFunction", 0x1000, "fmo_probe_kernel")]
    params, trace_args = _Args(5), _Args(6)
    fn.launch(launch.LaunchConfig.make((3, 2), (128,), 1024), params, stream=0xABC)
    n_args[0] = 2
    fn.launch(launch.LaunchConfig.make(7, 64), params, stream=0, trace_args=trace_args)
    p, t = ctypes.addressof(params), ctypes.addressof(trace_args)
    # (function, grid xyz, block xyz, dynamic smem, stream, kernelParams' pointers, extra)
    assert launches == [(0x2000, 3, 2, 1, 128, 1, 1, 1024, 0xABC, (p,), 0),
                        (0x2000, 7, 1, 1, 64, 1, 1, 0, 0, (p, t), 0)]


def test_large_dynamic_smem_opts_in_once_per_size(fake, tmp_path):
    calls = fake()
    fn = launch._CudaFunction("fmo_probe_kernel", _cubin(tmp_path))
    calls.clear()
    for smem in (48 * 1024, 100 * 1024, 100 * 1024, 64 * 1024, 200 * 1024):
        fn.launch(launch.LaunchConfig.make(1, 32, smem), _Args(0), stream=0)
    attrs = [c for c in calls if c[0] == "funcSetAttribute"]
    # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES == 8 (cuda.h)
    assert attrs == [("funcSetAttribute", 0x2000, 8, 100 * 1024), ("funcSetAttribute", 0x2000, 8, 200 * 1024)]
    assert [c[8] for c in calls if c[0] == "launchKernel"] == [48 * 1024, 100 * 1024, 100 * 1024, 64 * 1024, 200 * 1024]


def test_launch_failure_names_kernel_and_cupy_version(fake, tmp_path):
    def refuse(*args):
        raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: too many resources requested for launch")

    fake(launchKernel=refuse)
    fn = launch._CudaFunction("fmo_probe_kernel", _cubin(tmp_path))
    with pytest.raises(LaunchError, match=r"fmo_probe_kernel: cuLaunchKernel failed \(CuPy 13\.6\.0\): "
                                          r"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"):
        fn.launch(launch.LaunchConfig.make(1, 32), _Args(0), stream=0)


def test_load_failure_names_kernel_and_cupy_version(fake, tmp_path):
    def refuse(*args):
        raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available")

    fake("14.2.0", moduleLoadData=refuse)
    with pytest.raises(LaunchError, match=r"fmo_probe_kernel: cuModuleLoadData failed \(CuPy 14\.2\.0\): "
                                          r"CUDA_ERROR_NO_BINARY_FOR_GPU"):
        launch._CudaFunction("fmo_probe_kernel", _cubin(tmp_path))


def test_cupy_lacking_a_declared_name_is_refused_by_name(fake, tmp_path):
    fake("12.3.0", leave_out="cupy.cuda.driver.launchKernel")
    with pytest.raises(LaunchError, match=r"fmo_probe_kernel: CuPy 12\.3\.0 lacks what fastmoe_ops uses "
                                          r"\(cupy\.cuda\.driver\.launchKernel: missing\); supported: cupy-cuda13x>="):
        launch._CudaFunction("fmo_probe_kernel", _cubin(tmp_path))


def test_no_cupy(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    monkeypatch.setattr(cuda_driver, "_api", None)
    assert cuda_driver.cupy_version() is None and cuda_driver.nvrtc_version() == ""
    with pytest.raises(LaunchError, match=r"fmo_probe_kernel: needs CuPy \(pip install 'fastmoe-ops\[cuda\]'\)"):
        launch._CudaFunction("fmo_probe_kernel", _cubin(tmp_path))
    with pytest.raises(CompileError, match=r"k: needs CuPy"):
        cuda_driver.nvrtc_compile("", "k", [])


def test_nvrtc_failure_is_a_compile_error_with_the_log(fake):
    def refuse(prog, options):
        raise RuntimeError("NVRTC_ERROR_COMPILATION (6)")

    calls = fake(compileProgram=refuse, createProgram=lambda *a: 77,
                 getProgramLog=lambda prog: 'k.cu(3): error: identifier "x" is undefined')
    with pytest.raises(CompileError) as info:
        cuda_driver.nvrtc_compile("src", "fmo_probe_kernel", ["-arch=sm_90a"], where="for sm_90a")
    msg = str(info.value)
    assert msg.startswith("fmo_probe_kernel for sm_90a: NVRTC failed (CuPy 13.6.0): NVRTC_ERROR_COMPILATION (6)")
    assert 'identifier "x" is undefined' in msg
    assert calls == [("destroyProgram", 77)]  # the program is freed on failure too


def test_nvrtc_success_returns_cubin_ptx_and_log(fake):
    seen = {}

    def create(src, name, headers, include_names):
        seen["create"] = (src, name, headers, include_names)
        return 5

    calls = fake(createProgram=create, compileProgram=lambda prog, opts: seen.setdefault("opts", opts),
                 getCUBIN=lambda prog: b"\x7fELF...", getPTX=lambda prog: b".entry k", getProgramLog=lambda prog: "")
    out = cuda_driver.nvrtc_compile("src", "k", ("-arch=sm_90a", "-I/x"), ptx=True)
    assert (out.cubin, out.ptx, out.log) == (b"\x7fELF...", b".entry k", "")
    assert seen == {"create": ("src", "k.cu", [], []), "opts": ["-arch=sm_90a", "-I/x"]}
    assert calls == [("destroyProgram", 5)]
    assert cuda_driver.nvrtc_compile("src", "k", ()).ptx == b""  # PTX only when asked for


def test_ipc_failure_names_the_call_and_cupy_version(fake):
    def refuse(handle):
        raise RuntimeError("cudaErrorInvalidDevicePointer")

    fake(ipcOpenMemHandle=refuse)
    with pytest.raises(LaunchError, match=r"cudaIpcOpenMemHandle failed \(CuPy 13\.6\.0\): cudaErrorInvalidDevicePointer"):
        cuda_driver.ipc_open_mem_handle(b"\0" * 64)
    assert cuda_driver.malloc(256) == 0x7F0000


def test_contract_check_reads_cupy_signatures(fake):
    fake()
    assert cuda_driver.contract_problems() == []
    launch_kernel = sys.modules["cupy"].cuda.driver.launchKernel
    launch_kernel.__doc__ = "launchKernel(intptr_t f, dim3 grid, dim3 block, size_t smem, intptr_t stream, args)"
    (problem,) = cuda_driver.contract_problems()
    assert problem.startswith("cupy.cuda.driver.launchKernel: signature 'launchKernel(intptr_t f, dim3 grid")
    # Cython 0.29 spells str `unicode` (CuPy 13); Cython 3 spells it `str` (CuPy 14): the same type
    get_function = sys.modules["cupy"].cuda.driver.moduleGetFunction
    get_function.__doc__ = "moduleGetFunction(intptr_t module, unicode funcname) -> intptr_t\n\nmore text"
    assert cuda_driver.embedded_signature(get_function) == "moduleGetFunction(intptr_t module, str funcname) -> intptr_t"


def test_the_declared_list_is_exactly_what_the_adapter_calls():
    """CUPY_API is what the contract test checks, so every CuPy function the adapter calls
    (`api.<name>`, or a name handed to `_runtime`) must be declared there, and nothing more."""
    used = set()
    for node in ast.walk(ast.parse(Path(cuda_driver.__file__).read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "api":
            used.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_runtime":
            used.add(node.args[1].value)
    declared = {name.attr for name in cuda_driver.CUPY_API if name.signature is not None}
    assert used - {"version"} == declared


def test_only_the_adapter_imports_cupy():
    """Every driver-level call goes through runtime/cuda_driver.py: no other module of the
    library, the benchmarks or the tests imports CuPy or its private `cupy_backends`."""
    root = Path(__file__).resolve().parent.parent
    adapter = Path(cuda_driver.__file__).resolve()
    offenders = []
    for folder in ("fastmoe_ops", "bench", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.resolve() == adapter:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(root)}:{node.lineno}: {n}" for n in names
                              if n.split(".")[0] in ("cupy", "cupy_backends")]
    assert not offenders, "import CuPy through fastmoe_ops.runtime.cuda_driver instead:\n" + "\n".join(offenders)


def _elf(size: int, phoff: int, phentsize: int = 56, phnum: int = 1) -> bytes:
    blob = bytearray(b"\x7fELF" + bytes(size - 4))
    blob[0x20:0x28] = phoff.to_bytes(8, "little")
    blob[0x36:0x38] = phentsize.to_bytes(2, "little")
    blob[0x38:0x3A] = phnum.to_bytes(2, "little")
    blob[0x28:0x30] = (64).to_bytes(8, "little")  # section headers: one 16-byte entry after the ELF header
    blob[0x3A:0x3C], blob[0x3C:0x3E] = (16).to_bytes(2, "little"), (1).to_bytes(2, "little")
    return bytes(blob)


def test_the_byte_cupy_drops_from_a_cubin_is_restored(fake):
    whole = _elf(256, phoff=256 - 2 * 56, phnum=2)  # NVRTC's layout: program headers last
    fake(getCUBIN=lambda prog: whole[:-1], createProgram=lambda *a: 1)  # CuPy 13.6/14.2 strip a "trailing NUL"
    assert cuda_driver.nvrtc_compile("src", "k", ()).cubin == whole
    compiler._check_elf(whole, "k")
    with pytest.raises(CompileError, match=r"k: NVRTC cubin is truncated \(255 bytes, program headers end at 256\)"):
        compiler._check_elf(whole[:-1], "k")
    fake(getCUBIN=lambda prog: whole, createProgram=lambda *a: 1)  # a CuPy that returns it whole: left alone
    assert cuda_driver.nvrtc_compile("src", "k", ()).cubin == whole
    shorter = whole[:-2]  # more than the one byte: not repaired, and refused before caching
    fake(getCUBIN=lambda prog: shorter, createProgram=lambda *a: 1)
    assert cuda_driver.nvrtc_compile("src", "k", ()).cubin == shorter
    with pytest.raises(CompileError, match="truncated"):
        compiler._check_elf(shorter, "k")
