"""The simulator's tensor-core arithmetic against the hardware, bit for bit, on a CPU.

tests/data/ptx_mma_gpu_capture.npz holds the exact inputs and the H200's outputs of 222
launches of the ptx/ MMA test kernels (wgmma e4m3 m64n128k32 / m64n64k32 in every shared-memory
layout, with and without the accumulator; mma.sync bf16, f16, e4m3, e5m2; structured, exactly
representable, random and every-finite-code inputs; seeds 1234..1239), captured on
2026-12-04 (../shared/gpu-runs/h200-2026-12-04/README.md describes the run). The kernels that
ran are kept beside it (ptx_mma_gpu_capture_{wgmma,mma}.cu), so each launch is replayed here
through the simulator exactly as it ran there, and every output must have the device's bits.

Before the emulation modelled the hardware's rule (ptx/tensor_core_numerics.cuh), fp32
accumulation in k order disagreed with the device on 15 wgmma cases and on most random mma.sync
outputs; the "exact" cases differed too (-1702.0 on the device, -1702.125 emulated).
"""
from __future__ import annotations

import ast
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
CAPTURE = DATA / "ptx_mma_gpu_capture"
FAMILIES = ("wgmma", "mma")


def launches() -> list[dict]:
    return json.loads(CAPTURE.with_suffix(".json").read_text())


@lru_cache(maxsize=None)
def stored_arrays():
    with np.load(CAPTURE.with_suffix(".npz")) as z:
        return {k: z[k] for k in z.files}


def scalar(text: str):
    """'np.int32(12288)' -> np.int32(12288): the launch's by-value arguments as recorded."""
    call = ast.parse(text, mode="eval").body
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute), text
    return getattr(np, call.func.attr)(ast.literal_eval(call.args[0]))


def arguments(launch: dict) -> list:
    arrays = stored_arrays()
    key = launch["key"]
    count = 1 + max([int(i) for i in launch["scalars"]] +
                    [int(k.rsplit("|in", 1)[1]) for k in arrays if k.startswith(key + "|in")])
    args = []
    for j in range(count):
        if str(j) in launch["scalars"]:
            args.append(scalar(launch["scalars"][str(j)]))
        else:
            args.append(arrays[f"{key}|in{j}"])
    return args


@pytest.fixture(scope="module")
def modules():
    from fastmoe_ops.runtime.compiler import include_options

    sim = pytest.importorskip("fastmoe_ops.sim")
    if not sim.available():
        pytest.skip("the simulator runtime is not built (pip install -e .)")
    return {fam: sim.RawModule(code=(DATA / f"ptx_mma_gpu_capture_{fam}.cu").read_text(), options=tuple(include_options()))
            for fam in FAMILIES}


def test_capture_is_complete():
    """222 launches, each with its inputs and every output it names (a truncated copy fails)."""
    arrays = stored_arrays()
    all_launches = launches()
    assert len(all_launches) == 222
    assert {launch["key"].split("|")[0] for launch in all_launches} == set(FAMILIES)
    for launch in all_launches:
        for k in range(len(launch["outputs"])):
            assert f"{launch['key']}|gpu{k}" in arrays, launch["key"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_matches_the_device_bit_for_bit(modules, family):
    import torch

    arrays = stored_arrays()
    mismatches = []
    replayed = 0
    for launch in launches():
        if not launch["key"].startswith(family + "|"):
            continue
        args = arguments(launch)
        tensors = [torch.from_numpy(np.ascontiguousarray(a).copy()) if isinstance(a, np.ndarray) else a for a in args]
        for i in launch["outputs"]:  # poisoned: an output the kernel does not write fails
            tensors[i].view(torch.uint8).fill_(0xFF)
        fn = modules[family].get_function(launch["kernel"])
        fn(tuple(launch["grid"]), tuple(launch["block"]), tuple(tensors), shared_mem=launch["shared_mem"])
        for k, i in enumerate(launch["outputs"]):
            got = tensors[i].numpy()
            want = arrays[f"{launch['key']}|gpu{k}"]
            assert got.dtype == want.dtype and got.shape == want.shape, launch["key"]
            differ = got.view(np.uint32) != want.view(np.uint32)
            if differ.any():
                idx = np.unravel_index(int(np.argmax(differ)), got.shape)
                mismatches.append(f"{launch['key']} ({launch['name']}): {int(differ.sum())} of {got.size} elements, "
                                  f"first at {idx}: simulator {got[idx]!r}, device {want[idx]!r}")
        replayed += 1
    assert replayed == {"wgmma": 90, "mma": 132}[family]
    assert not mismatches, f"{len(mismatches)} launches differ from the H200:\n" + "\n".join(mismatches[:10])


def test_numpy_model_matches_the_device_bit_for_bit():
    """The tolerances of the GEMM tests come from fastmoe_ops/reference/tensor_core.py: it must
    be the hardware's rule too, independently of the C++ emulation. Operands are read back out
    of each wgmma launch's shared-memory image with the ISA's layout model."""
    from fastmoe_ops.reference import tensor_core

    from ptx_cases.formats import decode_bits
    from ptx_cases.wgmma import kmajor_offset

    arrays = stored_arrays()
    swizzle_names = {0: "none", 1: "b128", 2: "b64", 3: "b32"}
    checked = 0
    for launch in launches():
        family = launch["key"].split("|")[0]
        if launch["kernel"].startswith("mma_ldm"):
            continue  # operands pass through shared memory transposed: covered by the replay above
        args = arguments(launch)
        if family == "wgmma":
            image, c, a_off, b_off = args[0], args[2], args[4], args[5]
            ksteps, (a_lbo, a_sbo, a_sw, b_lbo, b_sbo, b_sw, accumulate) = int(args[6]), map(int, args[7:14])
            n = 128 if launch["kernel"] == "wgmma_e4m3" else 64

            def operand(rows, lbo, sbo, sw, offsets):
                r, k = np.meshgrid(np.arange(rows), np.arange(32), indexing="ij")
                return np.concatenate([image[kmajor_offset(swizzle_names[sw], int(offsets[s]), lbo, sbo, r, k)]
                                       for s in range(ksteps)], axis=1)

            a = decode_bits(operand(64, a_lbo, a_sbo, a_sw, a_off), "e4m3")
            b = decode_bits(operand(n, b_lbo, b_sbo, b_sw, b_off), "e4m3")
            model = tensor_core.wgmma_fp8(a, b, c if accumulate else None)
        else:
            fmt = launch["kernel"].split("_")[1]
            model = tensor_core.mma_sync(decode_bits(args[0], fmt), decode_bits(args[1], fmt), args[2], fmt)
        want = arrays[launch["key"] + "|gpu0"]
        assert np.array_equal(model.view(np.uint32), want.view(np.uint32)), \
            f"{launch['key']} ({launch['name']}): numpy model differs from the device in {int((model.view(np.uint32) != want.view(np.uint32)).sum())} elements"
        checked += 1
    assert checked == 222 - 12  # the 12 ldmatrix-fed launches (2 per seed) are replayed above only
