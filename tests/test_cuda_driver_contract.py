"""The CUDA adapter's contract with the real CuPy releases, on a CPU.

For each CuPy release in TESTED (the ends of the range pyproject's `cuda` extra allows), a
subprocess imports that CuPy and checks that every name `fastmoe_ops.runtime.cuda_driver`
uses (its CUPY_API) exists with the signature declared there, that the adapter binds to it
without a GPU, and that NVRTC compiles a kernel through the adapter (and reports a broken one
as CompileError with its log). So a change of the adapter that uses something a supported
release lacks fails here.

Each release is pip-installed once (`--no-deps` plus its non-numpy requirements) into the
kernel cache's folder, `$FMO_CACHE_DIR/cupy/` (default ~/.cache/fastmoe_ops), and reused
afterwards: ~5 s per release the first time, then only the subprocesses run. That install
needs the package index; without one these tests FAIL, naming pip's error, rather than
skip. To leave them out deliberately (a machine without the index), deselect them:
`pytest -m "not package_index"`.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fastmoe_ops import env
from fastmoe_ops.runtime import compiler, cuda_driver

TESTED = ("13.6.0", "14.2.0")  # oldest 13.x and newest 14.x release of cupy-cuda13x on the index
REPO = Path(__file__).resolve().parent.parent

needs_index = pytest.mark.package_index  # deselect with -m "not package_index"

# Run in a subprocess whose path puts the CuPy under test first; prints one JSON object.
PROBE = r'''
import json, sys
from pathlib import Path

import cupy
from fastmoe_ops.errors import CompileError
from fastmoe_ops.runtime import compiler, cuda_driver

out = {"version": cupy.__version__, "file": cupy.__file__, "problems": cuda_driver.contract_problems()}
try:
    out["bound_version"] = cuda_driver.bind("contract probe").version
except Exception as e:
    out["bound_version"] = repr(e)
# The check must notice a name the adapter might start to use that CuPy lacks, and a
# signature that differs: add one of each to the declared list and check again.
real = cuda_driver.CUPY_API
cuda_driver.CUPY_API = real + (
    cuda_driver.CupyName("cupy.cuda.driver.fmoNoSuchCall", "fmoNoSuchCall()"),
    cuda_driver.CupyName("cupy.cuda.nvrtc.getCUBIN", "getCUBIN(intptr_t prog, int flags) -> bytes"))
out["mutant_problems"] = cuda_driver.contract_problems()
cuda_driver.CUPY_API = real

out["nvrtc_version"] = cuda_driver.nvrtc_version()
if out["nvrtc_version"]:
    src = 'extern "C" __global__ void fmo_contract_probe(float* x) { x[threadIdx.x] = 2.0f * x[threadIdx.x]; }'
    res = cuda_driver.nvrtc_compile(src, "fmo_contract_probe", ["-arch=sm_90a"], ptx=True)
    out["cubin_head"] = res.cubin[:4].hex()
    out["cubin_size_and_table_ends"] = [len(res.cubin), cuda_driver.elf_table_ends(res.cubin)]
    out["ptx_has_entry"] = b".entry fmo_contract_probe" in res.ptx
    if compiler.find_cuobjdump() is not None:  # the whole cubin: cuobjdump reads its SASS
        path = Path(sys.argv[1]) / "probe.cubin"
        path.write_bytes(res.cubin)
        out["sass_has_function"] = "Function : fmo_contract_probe" in compiler.disassemble(path)
    try:
        cuda_driver.nvrtc_compile("__global__ void broken() { undeclared_name = 1; }", "fmo_broken", ["-arch=sm_90a"],
                                  where="for sm_90a")
        out["compile_error"] = None
    except CompileError as e:
        out["compile_error"] = str(e)
print(json.dumps(out))
'''


def _nvrtc_lib_dirs() -> list[str]:
    """Folders holding libnvrtc in this environment: the pip wheels (nvidia-cuda-nvrtc, which
    the build-report extra installs) and the toolkit. CuPy 14 finds the wheel by itself; CuPy
    13 looks only on the loader's path, so the probe gets these on LD_LIBRARY_PATH."""
    dirs = []
    try:
        import nvidia  # type: ignore

        dirs += sorted({str(p.parent) for base in nvidia.__path__ for p in Path(base).glob("*/lib/libnvrtc.so*")})
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    dirs += [str(d) for d in (Path(home) / "lib64",) if any(d.glob("libnvrtc.so*"))]
    return dirs


def _pip_install(target: Path, *requirements: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"could not install {' '.join(requirements)} (this test needs the package index; where there "
                    f"is none, deselect it with -m 'not package_index'):\n$ {' '.join(cmd)}\n{proc.stderr[-3000:]}",
                    pytrace=False)


def cupy_dir(version: str) -> Path:
    """cupy-cuda13x==version with its requirements except numpy (the environment's numpy is
    the one fastmoe_ops runs with), installed once under the cache folder."""
    target = env.cache_dir().expanduser() / "cupy" / f"cupy-cuda13x-{version}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _pip_install(tmp, f"cupy-cuda13x=={version}")
        (info,) = tmp.glob("cupy_cuda13x-*.dist-info")
        needs = [r for r in importlib.metadata.PathDistribution(info).requires or ()
                 if ";" not in r and re.match(r"[A-Za-z0-9_.-]+", r).group().lower() != "numpy"]
        if needs:
            _pip_install(tmp, *needs)
        os.rename(tmp, target)  # whole or not at all: a half-done install is never taken for a done one
    except OSError:
        if not target.is_dir():  # not a concurrent run that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="module", params=TESTED)
def probe(request):
    version = request.param
    target = cupy_dir(version)
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO)] + [p for p in [environ.get("PYTHONPATH")] if p])
    environ["LD_LIBRARY_PATH"] = os.pathsep.join(_nvrtc_lib_dirs() + [p for p in [environ.get("LD_LIBRARY_PATH")] if p])
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run([sys.executable, "-c", PROBE, scratch], capture_output=True, text=True, env=environ,
                              timeout=300)
    assert proc.returncode == 0, f"CuPy {version} from {target}: the probe failed:\n{proc.stderr[-4000:]}"
    return version, target, json.loads(proc.stdout.strip().splitlines()[-1])


@needs_index
def test_every_cupy_name_the_adapter_uses_exists_with_its_signature(probe):
    version, target, out = probe
    assert out["version"] == version and out["file"].startswith(str(target)), out  # the CuPy under test, not another
    assert out["problems"] == [], f"CuPy {version} breaks the adapter's contract:\n" + "\n".join(out["problems"])
    assert out["bound_version"] == version


@needs_index
def test_the_check_catches_a_missing_name_and_a_changed_signature(probe):
    version, _, out = probe
    assert out["mutant_problems"] == [
        "cupy.cuda.driver.fmoNoSuchCall: missing",
        "cupy.cuda.nvrtc.getCUBIN: signature 'getCUBIN(intptr_t prog) -> bytes', "
        "expected 'getCUBIN(intptr_t prog, int flags) -> bytes'"], out["mutant_problems"]


@needs_index
def test_nvrtc_compiles_through_the_adapter(probe):
    version, _, out = probe
    if not _nvrtc_lib_dirs():
        pytest.skip("no libnvrtc in this environment (pip install 'fastmoe-ops[build-report]')")
    assert out["nvrtc_version"].startswith("nvrtc 13."), out
    assert out["cubin_head"] == "7f454c46" and out["ptx_has_entry"], out  # an ELF cubin, and the PTX asked for
    # whole: NVRTC puts the program headers last, so they end where the cubin does (CuPy's
    # getCUBIN drops that last byte; the adapter restores it)
    size, ends = out["cubin_size_and_table_ends"]
    assert ends["program"] == size and ends["section"] <= size, out
    if compiler.find_cuobjdump() is not None:  # the build-report extra's; cuobjdump refuses a truncated cubin
        assert out["sass_has_function"] is True, out
    err = out["compile_error"]
    assert err is not None and err.startswith(f"fmo_broken for sm_90a: NVRTC failed (CuPy {version}): ")
    assert '"undeclared_name" is undefined' in err, err  # NVRTC's log rides along


def test_pyproject_declares_the_tested_range():
    text = (REPO / "pyproject.toml").read_text()
    assert (f'cuda = ["cupy-cuda13x{cuda_driver.SUPPORTED_CUPY}", '
            f'"cuda-bindings{cuda_driver.SUPPORTED_CUDA_BINDINGS}"]') in text
    low, next_major = re.fullmatch(r">=(\d+\.\d+),<(\d+)", cuda_driver.SUPPORTED_CUPY).groups()
    assert TESTED[0].startswith(low + "."), f"the range starts at {low}: test its first release"
    assert TESTED[-1].split(".")[0] == str(int(next_major) - 1), f"the range ends before {next_major}: test its last major"


# cuda-bindings (cuTensorMapEncodeTiled for TMA maps): the declared names exist in the newest
# 13.x release, and a call with our argument types gets past the binding's conversions to the
# driver (here, without one, the driver library is reported missing: a LaunchError naming it,
# never a TypeError from an argument the binding refuses).
BINDINGS_PROBE = r'''
import json
from fastmoe_ops.errors import LaunchError
from fastmoe_ops.runtime import cuda_driver
import cuda.bindings
out = {"version": cuda.bindings.__version__, "problems": cuda_driver.cuda_bindings_problems()}
try:
    out["bytes"] = len(cuda_driver.tensor_map_encode_tiled(7, 0x10000, [32, 16], [128], [32, 8], 128))
except LaunchError as e:
    out["error"] = str(e)
print(json.dumps(out))
'''


@needs_index
def test_cuda_bindings_tensor_map_call(tmp_path):
    target = env.cache_dir().expanduser() / "cuda-bindings" / "cuda-bindings-13"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".cuda-bindings-", dir=target.parent))
        try:
            _pip_install(tmp, "cuda-bindings" + cuda_driver.SUPPORTED_CUDA_BINDINGS, "cuda-pathfinder")
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO)])
    proc = subprocess.run([sys.executable, "-c", BINDINGS_PROBE], capture_output=True, text=True, env=environ,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["problems"] == [], out
    if "error" in out:  # no driver here: the call reached it
        assert "TypeError" not in out["error"] and "cuTensorMapEncodeTiled" in out["error"], out
    else:
        assert out["bytes"] == 128, out
