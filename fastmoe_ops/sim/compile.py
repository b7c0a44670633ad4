"""Host compilation of CUDA C++ for the CPU SIMT simulator.

The generated translation unit is the prelude (`csrc/sim/fmo_sim.h`), the user's code
unchanged, and one pair of entry points per requested kernel name N:

    extern "C" void fmo_sim_body_<i>(const unsigned char* args) { fmo_sim::invoke(&N, args); }
    extern "C" int  fmo_sim_sig_<i>(unsigned* out, int cap) { return fmo_sim::signature(&N, out, cap); }

`N` may be an `extern "C"` name or a C++ name expression (`k<float, 128>`); the parameter
layout is deduced from `void(*)(A...)`, so no signature is ever parsed.

`__shared__` is `thread_local`; `extern __shared__ T name[]` declarations are undefined TLS
symbols of the object file. A second tiny TU defines one 1024-aligned dynamic-shared buffer
(228 KiB, Hopper's maximum) and each such name as an alias of it, so every extern shared array
aliases the one dynamic buffer as on a GPU. The module is cached on disk (kind "sim").
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from .. import env
from ..errors import BackendError, CompileError
from ..runtime import sources
from ..runtime.cache import default_cache, make_key

ABI_VERSION = 5  # keep equal to fmo_sim::kAbiVersion (csrc/sim/abi.h); checked at load
DYNAMIC_SMEM_BYTES = 228 * 1024

# -fno-ipa-reference-addressable: GCC may otherwise drop stores to a function-local static
# (a __shared__ variable) that it proves this "thread" never reads back; other fibers of the
# CTA do read it, and checking builds must see every access.
# -fno-extern-tls-init: `extern __shared__` arrays are extern thread_locals here, and inside a
# template GCC would call their (never defined) dynamic-init wrapper through a null pointer.
# -ffp-contract=off: the emulated __fmul_rn / __fadd_rn must round each operation as the GPU
# does; on a host with FMA (aarch64, or -march=native) GCC would otherwise fuse an inlined
# __fmul_rn(a, b) + c into one rounding, which nvcc never does for the intrinsics.
_BASE_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-fno-strict-aliasing", "-fno-ipa-reference-addressable", "-fno-extern-tls-init",
               "-ffp-contract=off", "-w")
_CHECK_FLAGS = (
    "-fsanitize=thread",
    "--param=tsan-instrument-func-entry-exit=0",
    "--param=tsan-distinguish-volatile=1",
    "-DFMO_SIM_CHECKING=1",
)


def compiler() -> str:
    """FMO_SIM_CXX, else $CXX, else g++ (resolved on PATH)."""
    name = env.raw("FMO_SIM_CXX").strip() or os.environ.get("CXX", "").strip() or "g++"
    found = shutil.which(name)
    if not found:
        raise BackendError(f"simulator host compiler {name!r} not found (set FMO_SIM_CXX)")
    return found


@functools.lru_cache(maxsize=None)
def compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


@functools.lru_cache(maxsize=None)
def cuda_include() -> Path:
    """CUDA's headers (vector types, fp16/bf16/fp8) compile on the host with g++."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    for cand in (Path("/usr/local/cuda/include"), Path("/usr/include")):
        if (cand / "cuda_fp16.h").exists():
            return cand
    raise BackendError("CUDA headers (cuda_fp16.h) not found: set CUDA_HOME")


def translate_options(options) -> list[str]:
    """NVRTC options -> g++ flags: defines, undefines, include paths and -std are kept;
    NVRTC-only options (-arch, --use_fast_math, -lineinfo, ...) are dropped silently."""
    out: list[str] = []
    opts = list(options or ())
    i = 0
    while i < len(opts):
        o = str(opts[i])
        nxt = str(opts[i + 1]) if i + 1 < len(opts) else None
        for short, long in (("-D", "--define-macro"), ("-U", "--undefine-macro"), ("-I", "--include-path")):
            if o == short or o == long:
                if nxt is not None:
                    out.append(short + nxt)
                i += 1
                break
            if o.startswith(long + "="):
                out.append(short + o[len(long) + 1:])
                break
            if o.startswith(short):
                out.append(o)
                break
        else:
            m = re.fullmatch(r"--?std=(c\+\+\d\w*)", o)
            if m:
                out.append("-std=" + m.group(1))
        i += 1
    return out


def checking_build() -> bool:
    return env.flag("FMO_SIM_RACECHECK") or env.flag("FMO_SIM_MEMCHECK")


def generate_source(code: str, names: tuple[str, ...]) -> str:
    parts = ['#include "sim/fmo_sim.h"', '#line 1 "kernel.cu"', code, "", "// ---- simulator entry points ----"]
    for i, name in enumerate(names):
        parts.append(f'extern "C" __attribute__((visibility("default"))) void fmo_sim_body_{i}(const unsigned char* a) '
                     f"{{ ::fmo_sim::invoke(&{name}, a); }}")
        parts.append(f'extern "C" __attribute__((visibility("default"))) int fmo_sim_sig_{i}(unsigned* o, int c) '
                     f"{{ return ::fmo_sim::signature(&{name}, o, c); }}")
    return "\n".join(parts) + "\n"


def _undefined_tls(readelf_out: str) -> list[str]:
    names = []
    for line in readelf_out.splitlines():
        f = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(f) >= 8 and f[3] == "TLS" and f[6] == "UND":
            names.append(f[7])
    return names


def _dynamic_tu(names: list[str]) -> str:
    lines = [
        "// Dynamic shared memory: one buffer; every `extern __shared__` array is an alias of it.",
        f'extern "C" {{ __attribute__((aligned(1024), visibility("hidden"))) __thread unsigned char '
        f"fmo_sim_dynamic_smem_buf[{DYNAMIC_SMEM_BYTES}];",
        '__attribute__((visibility("default"))) unsigned char* fmo_sim_dynamic_smem() '
        "{ return fmo_sim_dynamic_smem_buf; } }",
    ]
    for n in names:
        lines.append(f'asm(".globl {n}\\n.hidden {n}\\n.type {n}, @tls_object\\n'
                     f'.size {n}, {DYNAMIC_SMEM_BYTES}\\n.set {n}, fmo_sim_dynamic_smem_buf\\n");')
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], what: str, kernel: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(
            f"simulator host compile of {kernel} failed ({what}; `kernel.cu:LINE` is a line of the "
            f"module's code)\ncommand: {' '.join(cmd)}\n{proc.stderr[-8000:]}")
    return proc.stdout


def _prelude_pch(cxx: str, flags: list[str], includes: list[str]) -> list[str]:
    """`-I` flags that put a precompiled prelude (`sim/fmo_sim.h.gch`) first on the include
    path: it saves ~0.4 s of CUDA-header parsing per module. GCC checks a PCH's flags and
    silently falls back to the header when they differ; any failure here just means no PCH."""
    key = make_key({
        "pch": 1, "flags": flags, "cxx": cxx, "cxx_version": compiler_version(cxx),
        "kernels": sources.fingerprint(), "abi": ABI_VERSION, "cuda_include": str(cuda_include()),
        "codegen": env.codegen_snapshot(),
    })
    header = sources.kernel_root() / "csrc" / "sim" / "fmo_sim.h"

    def build(out: Path) -> None:
        _run([cxx, *flags, *includes, "-x", "c++-header", str(header), "-o", str(out)], "precompile", "the prelude")

    try:
        gch = default_cache().get_or_build("sim-pch", key, ".gch", build)
        inc = gch.parent / f"{key}.inc"
        link = inc / "sim" / "fmo_sim.h.gch"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(gch, link)
            except FileExistsError:
                pass
        return [f"-I{inc}"]
    except (OSError, CompileError, RuntimeError):
        return []


def build_module(code: str, options, names: tuple[str, ...]) -> Path:
    """Compile and link (or find in the cache) the host module for `names`; returns the .so path."""
    cxx = compiler()
    flags = list(_BASE_FLAGS) + (list(_CHECK_FLAGS) if checking_build() else [])
    includes = [f"-I{cuda_include()}"] + [f"-I{d}" for d in sources.include_dirs()]
    user = translate_options(options)
    src = generate_source(code, names)
    key = make_key({
        "source": src, "options": user, "flags": flags, "cxx": cxx, "cxx_version": compiler_version(cxx),
        "kernels": sources.fingerprint(), "codegen": env.codegen_snapshot(), "abi": ABI_VERSION,
        "cuda_include": str(cuda_include()),
    })
    kernel = ", ".join(names) or "<no kernels>"
    pch: list[str] = []

    def build(out: Path) -> None:
        d = out.parent
        main_cpp, main_o = d / "kernel.cpp", d / "kernel.o"
        dyn_cpp, dyn_o = d / "dynamic_smem.cpp", d / "dynamic_smem.o"
        main_cpp.write_text(src)
        _run([cxx, *flags, *pch, *includes, *user, "-c", str(main_cpp), "-o", str(main_o)], "compile", kernel)
        syms = _run(["readelf", "-sW", str(main_o)], "readelf", kernel)
        dyn_cpp.write_text(_dynamic_tu(_undefined_tls(syms)))
        _run([cxx, *_BASE_FLAGS, "-c", str(dyn_cpp), "-o", str(dyn_o)], "compile dynamic shared memory", kernel)
        _run([cxx, "-shared", "-o", str(out), str(main_o), str(dyn_o)], "link", kernel)

    cache = default_cache()
    if not cache.path_for("sim", key, ".so").exists() and not any(o.startswith("-std=") for o in user):
        # before the module's get_or_build, which holds the cache's (non-reentrant) lock;
        # a PCH is valid for one -std only
        pch = _prelude_pch(cxx, flags, includes)
    return cache.get_or_build("sim", key, ".so", build)
