"""`python -m fastmoe_ops.build`: compiles every registered kernel offline, reports
registers/spills/SASS, and fails loudly on a compile error or a spill."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

from fastmoe_ops import build
from fastmoe_ops.ops.fp8_quant import Fp8GroupQuantSpec
from fastmoe_ops.runtime import compiler, cuda_driver, spec as spec_mod

pytestmark = pytest.mark.skipif(compiler.nvcc_path() is None, reason="nvcc not installed")


def test_build_report_all_kernels_sm90a(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "fastmoe_ops.build", "--arch", "sm_90a", "--json", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    names = {r["name"] for r in rows}
    assert "fmo_fp8_quant_token_group_bf16_g128_vec8" in names
    for r in rows:
        assert r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] > 0, f"{r['name']}: register count not parsed"
    if compiler.find_cuobjdump() is not None:
        quant = [r for r in rows if r["name"].startswith("fmo_fp8_quant")]
        assert all(r["sass"]["LDG"] >= 1 and r["sass"]["STG"] >= 2 and r["sass"]["SHFL"] >= 1 for r in quant), quant
    assert "kernels for sm_90a" in proc.stdout


@dataclass(frozen=True)
class _BrokenSpec(Fp8GroupQuantSpec):
    op: ClassVar[str] = "broken_for_test"

    def device_call(self) -> str:
        return "this_function_does_not_exist(p)"


def test_compile_failure_fails_the_report(monkeypatch, fresh_cache, capsys):
    monkeypatch.setattr(spec_mod, "_registry", {"broken_for_test": lambda: [_BrokenSpec("bf16", 128, 8, False)]})
    rc = build.main(["--arch", "sm_90a"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAILED fmo_broken_for_test_bf16_g128_vec8" in captured.err
    assert "this_function_does_not_exist" in captured.err


def test_register_info_parsing():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem
"""
    info = build._load_register_info(log, "k")
    assert info == {"registers": 40, "static_smem": 1024, "stack_frame": 16, "spill_stores": 8, "spill_loads": 4}


def test_bad_arch_refused():
    with pytest.raises(Exception, match="arch: expected a string like 'sm_90a'"):
        build.main(["--arch", "hopper"])


@pytest.mark.skipif(not cuda_driver.nvrtc_version(), reason="NVRTC not loadable (pip install nvidia-cuda-nvrtc cupy-cuda13x)")
def test_one_variant_of_every_op_compiles_with_nvrtc(fresh_cache):
    """The GPU path compiles with NVRTC, which has no C++ standard library: every op's
    headers must build there too (one variant per op covers its headers)."""
    from fastmoe_ops.ops import _all  # noqa: F401

    seen = {}
    for spec in spec_mod.registered_specs():
        seen.setdefault(spec.op, spec)
    failures = []
    for op, spec in sorted(seen.items()):
        try:
            result = compiler.compile_nvrtc(spec.stub(), spec.entry_name(), "sm_90a")
            compiler._check_elf(result.cubin.read_bytes(), spec.entry_name())
        except Exception as e:
            failures.append(f"{op}: {str(e)[:800]}")
    assert not failures, "\n".join(failures)


def test_arch_specific_specs_are_left_out_of_other_archs():
    from fastmoe_ops.ops import _all  # noqa: F401  (registers every op's specs)
    from fastmoe_ops.ops.fp8_gemm import Fp8GemmWgmmaSpec

    wgmma = [s for s in spec_mod.registered_specs() if isinstance(s, Fp8GemmWgmmaSpec)]
    assert wgmma, "no wgmma GEMM variant registered"
    assert all(build.targets(s, "sm_90a") and not build.targets(s, "sm_89") for s in wgmma)
    # build_all compiles nothing for an op that has no variant for the arch
    assert build.build_all("sm_89", wgmma[0].op) == []
