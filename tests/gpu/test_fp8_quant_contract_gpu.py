"""The FP8 quantisation contract (csrc/quant/fp8_scale.cuh) bit for bit on a GPU: every
quantisation kernel on CUDA, the PyTorch reference on CUDA and the reference on the CPU,
each against the independent numpy derivation of tests/fp8_contract.py, on the edge inputs
of the CPU test (ties, saturation, subnormals, zeros and NaN of both signs, +-inf, the eps
floor, ragged groups; bf16/fp16/fp32; pow2 scales; vectorised and scalar paths) and at the
shape where `python -m bench` stopped on the first H200 run (128 x 7168 bf16: the
reference divided by a CPU scalar there, which PyTorch's CUDA division turns into a
reciprocal multiply). Each side is checked on its own, so a failure says which one left
the contract. Needs a CUDA device (skipped otherwise); the kernel's outputs start as poison
(gpu_util.poison_cuda_allocations), so an element it does not write fails."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref

from fp8_contract import assert_matches_contract, contract_quantize, edge_inputs, layout_of
from gpu_util import DEV, needs_cuda, poison_cuda_allocations  # noqa: F401 (autouse fixture)

pytestmark = needs_cuda

OPS = {"token_group": (fmo.fp8.quantize_per_token_group, ref.quantize_per_token_group),
       "block": (fmo.fp8.quantize_per_block, ref.quantize_per_block),
       "transposed": (fmo.fp8.quantize_per_token_group_transposed, ref.quantize_per_token_group_transposed)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def check_every_side(op: str, x_cpu: torch.Tensor, size: int, pow2: bool, eps: float, what: str,
                     layout: str = "contiguous") -> None:
    """Kernel (cuda), reference (cuda), reference (cpu): each against the contract. The
    layout is made on each device (moving a strided view to the GPU would make it dense)."""
    want = contract_quantize(op, x_cpu, size, pow2=pow2, eps=eps)
    x = layout_of(x_cpu.to(DEV), layout)
    fn, reffn = OPS[op]
    got = fn(x, size, pow2_scale=pow2, eps=eps)
    torch.cuda.synchronize()
    assert_matches_contract(got, want, f"kernel (cuda) {what}")
    assert_matches_contract(reffn(x, size, pow2_scale=pow2, eps=eps), want, f"reference (cuda) {what}")
    assert_matches_contract(reffn(layout_of(x_cpu, layout), size, pow2_scale=pow2, eps=eps), want, f"reference (cpu) {what}")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pow2, layout, eps", [(False, "contiguous", 1e-12), (True, "contiguous", 1e-12),
                                               (False, "misaligned", 0.5), (True, "misaligned", 1e-12)])
def test_edge_inputs_on_gpu(op, dtype, pow2, layout, eps):
    check_every_side(op, edge_inputs(dtype), 128, pow2, eps, f"{op} {dtype} pow2={pow2} {layout} eps={eps}", layout)


@pytest.mark.parametrize("op, size", [("token_group", 32), ("block", 32), ("transposed", 64)])
def test_other_group_sizes_on_gpu(op, size):
    x = edge_inputs(torch.bfloat16, seed=1)
    check_every_side(op, x, size, False, 1e-12, f"{op} group {size}")


@pytest.mark.parametrize("shape", [(128, 7168), (300, 7168), (129, 2056)])
@pytest.mark.parametrize("op", list(OPS))
def test_bench_shapes_on_gpu(op, shape):
    """The bench's inputs (bf16 normal values) at its first shape and two ragged ones."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    check_every_side(op, x, 128, False, 1e-12, f"{op} {shape}")
