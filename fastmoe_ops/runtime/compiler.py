"""Compile kernel stubs to cubins: nvcc offline (any arch, no GPU needed) or NVRTC.

On a GPU machine the runtime compiles through NVRTC (CuPy's binding) for the device's exact
arch (`sm_90a` on Hopper, so wgmma/TMA are usable); on a CPU-only machine the build report
uses nvcc. Both go through the same disk cache, keyed by everything that changes the code.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import env
from ..errors import CompileError, InputError
from . import cuda_driver, sources
from .cache import default_cache, make_key

_ARCH_RE = re.compile(r"^sm_(\d+)([af]?)$")
BASE_OPTIONS = ("-std=c++17", "-DNDEBUG")


def parse_arch(arch: str) -> tuple[int, str]:
    m = _ARCH_RE.match(arch)
    if not m:
        raise InputError(f"arch: expected a string like 'sm_90a' or 'sm_89', got {arch!r}")
    return int(m.group(1)), m.group(2)


@functools.lru_cache(maxsize=None)
def cuda_home() -> Path | None:
    """The CUDA toolkit used for nvcc and headers: FMO_NVCC's parent, CUDA_HOME, nvcc on
    PATH, /usr/local/cuda, then the include tree of the pip `nvidia-cuda-*` wheels."""
    nvcc = env.path("FMO_NVCC")
    if nvcc is not None and nvcc.exists():
        return nvcc.resolve().parent.parent
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    found = shutil.which("nvcc")
    if found:
        real = Path(found).resolve()
        if real.name == "nvcc" and real.parent.name == "bin":
            home = real.parent.parent
            if (home / "include" / "cuda.h").exists():
                return home
    for candidate in (Path("/usr/local/cuda"),):
        if (candidate / "include" / "cuda.h").exists():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> Path | None:
    home = cuda_home()
    if home is not None and (home / "include" / "cuda_fp8.h").exists():
        return home / "include"
    try:  # pip wheels (nvidia-cuda-runtime / nvidia-cuda-nvrtc) ship the headers
        import nvidia  # type: ignore

        for base in nvidia.__path__:
            for inc in sorted(Path(base).glob("cu*/include")):
                if (inc / "cuda_fp8.h").exists():
                    return inc
    except ImportError:
        pass
    return None


def nvcc_path() -> Path | None:
    explicit = env.path("FMO_NVCC")
    if explicit is not None:
        return explicit
    home = cuda_home()
    if home is not None and (home / "bin" / "nvcc").exists():
        return home / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    nvcc = nvcc_path()
    if nvcc is None:
        return ""
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else ""


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    return cuda_driver.nvrtc_version()


@functools.lru_cache(maxsize=None)
def find_cuobjdump() -> Path | None:
    """cuobjdump from the toolkit, else from the `nvidia-cuda-cuobjdump` wheel, else PATH."""
    home = cuda_home()
    if home is not None and (home / "bin" / "cuobjdump").exists():
        return home / "bin" / "cuobjdump"
    try:
        import nvidia  # type: ignore

        for base in nvidia.__path__:
            for cand in sorted(Path(base).glob("cu*/bin/cuobjdump")):
                return cand
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    return Path(found) if found else None


def disassemble(cubin: Path) -> str:
    tool = find_cuobjdump()
    if tool is None:
        raise CompileError("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    proc = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CompileError(f"cuobjdump failed on {cubin}: {proc.stderr.strip()}")
    return proc.stdout


def include_options() -> list[str]:
    opts = [f"-I{d}" for d in sources.include_dirs()]
    inc = cuda_include_dir()
    if inc is not None:
        opts.append(f"-I{inc}")
        if (inc / "cccl").is_dir():  # CCCL's <cuda/std/...>: NVRTC has no C++ standard headers
            opts.append(f"-I{inc / 'cccl'}")
    return opts


@dataclass(frozen=True)
class CompileResult:
    cubin: Path
    compiler: str  # "nvcc" or "nvrtc"
    log: str


def _cache_key(stub: str, arch: str, options: tuple[str, ...], compiler: str, version: str) -> str:
    return make_key(
        {
            "stub": stub,
            "arch": arch,
            "options": list(options),
            "compiler": compiler,
            "compiler_version": version,
            "sources": sources.fingerprint(),
            "env": env.codegen_snapshot(),
        }
    )


def _dump(name: str, suffix: str, text: str | bytes) -> None:
    target = env.path("FMO_DEBUG_DUMP")
    if target is None:
        return
    target.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(target / f"{name}{suffix}", mode) as f:
        f.write(text)


def compile_nvcc(stub: str, name: str, arch: str, extra_options: tuple[str, ...] = ()) -> CompileResult:
    """Compile `stub` to a cubin for `arch` with nvcc (works without a GPU or driver)."""
    number, suffix = parse_arch(arch)
    nvcc = nvcc_path()
    if nvcc is None:
        raise CompileError(f"{name}: nvcc not found (set FMO_NVCC or CUDA_HOME)")
    # ptxas -v always: its report (registers, spills, stack) is kept beside the cubin.
    options = BASE_OPTIONS + ("-O3", f"-gencode=arch=compute_{number}{suffix},code=sm_{number}{suffix}", "-Xptxas", "-v") + tuple(extra_options)
    version = nvcc_version()
    key = _cache_key(stub, arch, options, "nvcc", version)
    def build(out: Path) -> None:
        src = out.with_suffix(".cu")
        src.write_text(stub)
        cmd = [str(nvcc), "-cubin", *options, *include_options(), "-Xptxas", "-warn-spills", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CompileError(f"{name}: nvcc failed for {arch}\n$ {' '.join(cmd)}\n{proc.stderr}")
        Path(str(out) + ".log").write_text(proc.stdout + proc.stderr)
        _dump(name, ".cu", stub)
        if env.path("FMO_DEBUG_DUMP") is not None:
            ptx = subprocess.run(
                [str(nvcc), "-ptx", *options, *include_options(), "-o", "-", str(src)],
                capture_output=True, text=True, check=False,
            )
            _dump(name, ".ptx", ptx.stdout)
            if find_cuobjdump() is not None:
                _dump(name, ".sass", disassemble(out))

    path = default_cache().get_or_build("cubin", key, ".cubin", build)
    log_path = Path(str(path) + ".log")
    log = log_path.read_text() if log_path.exists() else ""
    if log and env.flag("FMO_PTXAS_VERBOSE"):
        print(log)
    return CompileResult(path, "nvcc", log)


def compile_nvrtc(stub: str, name: str, arch: str, extra_options: tuple[str, ...] = ()) -> CompileResult:
    """Compile `stub` to a cubin with NVRTC (through CuPy's binding), for a GPU machine."""
    parse_arch(arch)
    cuda_driver.bind(name, CompileError)  # without CuPy: refuse here, not after a cache lookup
    options = BASE_OPTIONS + (f"-arch={arch}", "--device-as-default-execution-space") + tuple(extra_options)
    if env.flag("FMO_PTXAS_VERBOSE"):
        options += ("--ptxas-options=-v",)
    version = nvrtc_version()
    key = _cache_key(stub, arch, options, "nvrtc", version)

    def build(out: Path) -> None:
        dump = env.path("FMO_DEBUG_DUMP") is not None
        result = cuda_driver.nvrtc_compile(stub, name, list(options) + include_options(), where=f"for {arch}", ptx=dump)
        _check_elf(result.cubin, name)
        out.write_bytes(result.cubin)
        if dump:
            _dump(name, ".cu", stub)
            _dump(name, ".ptx", result.ptx)
            if find_cuobjdump() is not None:
                _dump(name, ".sass", disassemble(out))

    path = default_cache().get_or_build("cubin", key, ".cubin", build)
    return CompileResult(path, "nvrtc", "")


def _check_elf(cubin: bytes, name: str) -> None:
    """Refuse a truncated cubin before it is cached (CuPy's NVRTC binding returns one byte
    short; runtime/cuda_driver.py restores it): both header tables must fit inside the blob."""
    if cubin[:4] != b"\x7fELF" or len(cubin) < 64:
        raise CompileError(f"{name}: NVRTC returned no ELF cubin")
    for what, end in cuda_driver.elf_table_ends(cubin).items():
        if end > len(cubin):
            raise CompileError(f"{name}: NVRTC cubin is truncated ({len(cubin)} bytes, {what} headers end at {end})")
