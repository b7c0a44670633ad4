"""Build script: the pybind11 SIMT runtime, and the kernel sources as package data.

`csrc/` and `ptx/` live at the top of the repository (the design's layout) and are
reached from the package through the `fastmoe_ops/_kernels/{csrc,ptx}` symlinks. An
editable install reads them through the links; a wheel gets real copies, made here,
so run-time lookup is always `importlib.resources.files("fastmoe_ops") / "_kernels"`.
"""
import os
import shutil
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNEL_TREES = ("csrc", "ptx")
KERNEL_SUFFIXES = {".cuh", ".h", ".hpp", ".cpp", ".cu", ".S"}


class BuildPyWithKernels(build_py):
    """Copy the kernel trees into the built package (symlinks resolved)."""

    def run(self):
        super().run()
        for tree in KERNEL_TREES:
            src = ROOT / tree
            dst = Path(self.build_lib) / "fastmoe_ops" / "_kernels" / tree
            if dst.is_symlink() or dst.is_file():
                dst.unlink()
            elif dst.exists():
                shutil.rmtree(dst)
            for path in sorted(src.rglob("*")):
                if path.is_file() and path.suffix in KERNEL_SUFFIXES:
                    out = dst / path.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, out)


sim_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "sim").glob("*.cpp"))
sim_asm = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "sim").glob("*.S"))

ext_modules = []
if sim_sources:
    ext_modules.append(
        Pybind11Extension(
            "fastmoe_ops.sim._simrt",
            sim_sources + sim_asm,
            include_dirs=["csrc/sim"],
            cxx_std=17,
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            extra_link_args=["-ldl", "-pthread"],
        )
    )

setup(
    # bench: `python -m bench` from any directory (the editable install maps it like fastmoe_ops)
    packages=find_packages(include=["fastmoe_ops", "fastmoe_ops.*", "bench"]),
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithKernels, "build_ext": build_ext},
    zip_safe=False,
)
