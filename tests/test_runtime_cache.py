"""Kernel cache: the key covers every shipped header, options, arch and codegen variables;
concurrent cold-cache compiles from several processes are safe; a warm hit is a lookup."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.errors import CompileError
from fastmoe_ops.ops.fp8_quant import Fp8GroupQuantSpec
from fastmoe_ops.runtime import cache, compiler, sources

SPEC = Fp8GroupQuantSpec(dtype="bf16", group_size=128, vec_width=8, pow2_scale=False)
needs_nvcc = pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")


def key_now(stub=SPEC.stub(), arch="sm_90a", options=("-O3",)):
    return compiler._cache_key(stub, arch, options, "nvcc", compiler.nvcc_version())


@pytest.fixture
def kernel_copy(tmp_path):
    """A private copy of the shipped kernel trees, made the active kernel root."""
    root = tmp_path / "kernels"
    for tree in ("csrc", "ptx"):
        shutil.copytree(sources.kernel_root() / tree, root / tree)
    sources.set_kernel_root(root)
    yield root
    sources.set_kernel_root(None)


@pytest.mark.parametrize("relpath", ["csrc/common/types.cuh", "csrc/quant/fp8_quant.cuh", "ptx/new_wrapper.cuh"])
def test_key_changes_when_any_shipped_file_changes(kernel_copy, relpath):
    before = key_now()
    target = kernel_copy / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a") as f:
        f.write("\n// an edit\n")
    sources.refresh()
    assert key_now() != before, f"editing {relpath} must change the cache key"


def test_key_covers_stub_arch_options_and_codegen_env(monkeypatch):
    base = key_now()
    other = Fp8GroupQuantSpec(dtype="bf16", group_size=128, vec_width=8, pow2_scale=True)
    assert key_now(stub=other.stub()) != base
    assert key_now(arch="sm_89") != base
    assert key_now(options=("-O2",)) != base
    monkeypatch.setenv("FMO_SIM_RACECHECK", "1")
    assert key_now() != base
    monkeypatch.delenv("FMO_SIM_RACECHECK")
    assert key_now() == base, "the key must be a pure function of its inputs"


@needs_nvcc
def test_edited_header_recompiles(fresh_cache, kernel_copy):
    first = compiler.compile_nvcc(SPEC.stub(), SPEC.entry_name(), "sm_90a")
    with open(kernel_copy / "csrc/common/types.cuh", "a") as f:
        f.write("\nnamespace fmo { constexpr int kEdited = 1; }\n")
    sources.refresh()
    second = compiler.compile_nvcc(SPEC.stub(), SPEC.entry_name(), "sm_90a")
    assert first.cubin != second.cubin and first.cubin.exists() and second.cubin.exists()


@pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
def test_edited_kernel_runs_after_refresh_in_the_same_process(fresh_cache, kernel_copy):
    """Launch, edit a header of the active kernel tree, sources.refresh(), launch again in the
    same process: the second launch runs the edited build (refresh drops the launcher's
    loaded kernels, not only the fingerprints)."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    with fmo.use_backend("sim"):
        _, before = fmo.fp8.quantize_per_token_group(x, 128)
    header = kernel_copy / "csrc/quant/fp8_scale.cuh"
    text = header.read_text()
    edited = text.replace("__fdiv_rn(fmaxf(amax, min_amax), kE4M3Max)", "__fdiv_rn(fmaxf(amax, min_amax), 2.0f * kE4M3Max)")
    assert edited != text, "the scale line this test edits has moved"
    header.write_text(edited)
    sources.refresh()
    with fmo.use_backend("sim"):
        _, after = fmo.fp8.quantize_per_token_group(x, 128)
    assert torch.equal(after, before / 2), "the edited kernel (scales halved) must run after refresh()"


def test_memory_hit_skips_disk_and_build(fresh_cache):
    calls = []

    def build(out: Path):
        calls.append(out)
        out.write_bytes(b"artefact")

    c = cache.DiskCache()
    p1 = c.get_or_build("test", "k" * 64, ".bin", build)
    p1.unlink()  # a memory hit must not even look at the disk
    p2 = c.get_or_build("test", "k" * 64, ".bin", build)
    assert p1 == p2 and len(calls) == 1


def test_failed_build_leaves_nothing(fresh_cache):
    c = cache.DiskCache()

    def build(out: Path):
        out.write_bytes(b"half")
        raise CompileError("boom")

    with pytest.raises(CompileError):
        c.get_or_build("test", "f" * 64, ".bin", build)
    leftovers = [p for p in fresh_cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == [], f"a failed build left {leftovers}"


@needs_nvcc
def test_concurrent_cold_cache_compile_four_processes(fresh_cache):
    """Four processes compile the same kernel into the same empty cache at the same moment:
    no error, one identical path everywhere, one complete cubin, no temporary left over."""
    start_at = time.time() + 3.0
    script = textwrap.dedent(f"""
        import time, sys
        from fastmoe_ops.ops.fp8_quant import Fp8GroupQuantSpec
        from fastmoe_ops.runtime import compiler
        spec = Fp8GroupQuantSpec(dtype="bf16", group_size=128, vec_width=8, pow2_scale=False)
        stub = spec.stub()
        while time.time() < {start_at}: time.sleep(0.001)
        r = compiler.compile_nvcc(stub, spec.entry_name(), "sm_90a")
        print(r.cubin)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, f"a compiling process failed:\n{err}"
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1, f"processes disagree on the artefact: {paths}"
    cubins = list(fresh_cache.rglob("*.cubin"))
    assert len(cubins) == 1
    blob = cubins[0].read_bytes()
    assert blob[:4] == b"\x7fELF"
    compiler._check_elf(blob, "concurrent")  # section headers inside the file: not torn
    stray = [p for p in fresh_cache.rglob("*") if p.name.startswith(".build-") or p.suffix == ".tmp"]
    assert stray == [], f"temporaries left behind: {stray}"


def test_truncated_cubin_detected():
    elf = bytearray(b"\x7fELF" + bytes(60))
    elf[0x28:0x30] = (64).to_bytes(8, "little")
    elf[0x3A:0x3C] = (64).to_bytes(2, "little")
    elf[0x3C:0x3E] = (2).to_bytes(2, "little")
    with pytest.raises(CompileError, match="truncated"):
        compiler._check_elf(bytes(elf), "k")


@needs_nvcc
def test_debug_dump_writes_stub_ptx_and_sass(fresh_cache, tmp_path, monkeypatch):
    dump = tmp_path / "dump"
    monkeypatch.setenv("FMO_DEBUG_DUMP", str(dump))
    compiler.compile_nvcc(SPEC.stub(), SPEC.entry_name(), "sm_90a")
    name = SPEC.entry_name()
    assert (dump / f"{name}.cu").read_text() == SPEC.stub()
    assert ".entry " + name in (dump / f"{name}.ptx").read_text()
    if compiler.find_cuobjdump() is not None:
        assert "Function : " + name in (dump / f"{name}.sass").read_text()


def test_a_build_may_use_the_cache_for_another_artefact(fresh_cache):
    """A module build that needs a second artefact (its precompiled header) gets it from the
    same cache without deadlocking."""
    c = cache.DiskCache()

    def build_inner(out: Path):
        out.write_bytes(b"inner")

    def build_outer(out: Path):
        inner = c.get_or_build("test", "i" * 64, ".bin", build_inner)
        out.write_bytes(b"outer+" + inner.read_bytes())

    outer = c.get_or_build("test", "o" * 64, ".bin", build_outer)
    assert outer.read_bytes() == b"outer+inner"
