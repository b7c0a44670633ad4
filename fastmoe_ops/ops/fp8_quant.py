"""Launcher of the per-token-group FP8 quantisation kernel (csrc/quant/fp8_quant.cuh).

x: [M, K] bf16 | fp16 | fp32, last dim contiguous (rows may be strided)
-> xq: [M, K] float8_e4m3fn contiguous, xs: [M, ceil(K / group_size)] fp32 contiguous.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import backends
from ..errors import UnsupportedError, expect
from ..reference import fp8 as reference
from ..runtime import fast_launch
from ..runtime.launch import LaunchConfig, Plan
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, check_element_type, check_vector_width, register_op, vector_width

BLOCK_THREADS = 256
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Fp8GroupQuantParams(Params):
    cpp_name = "fmo::Fp8GroupQuantParams"
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("xq", ctypes.c_void_p),
        ("xs", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("x_row_stride", ctypes.c_int64),
        ("groups", ctypes.c_int64),
        ("min_amax", ctypes.c_float),
        ("reserved", ctypes.c_int32),
    ]


@dataclass(frozen=True)
class Fp8GroupQuantSpec(KernelSpec):
    dtype: str            # input element type: bf16 | fp16 | fp32
    group_size: int       # elements per scale (power of two, 32..1024)
    vec_width: int        # elements per access: 16 bytes when aligned, else 1
    pow2_scale: bool      # UE8M0 scales (powers of two)

    op: ClassVar[str] = "fp8_quant_token_group"
    header: ClassVar[str] = "csrc/quant/fp8_quant.cuh"
    params: ClassVar[type[Params]] = Fp8GroupQuantParams

    def check(self) -> None:
        super().check()
        check_element_type(self.op, self.dtype)
        if not (32 <= self.group_size <= 1024 and self.group_size & (self.group_size - 1) == 0):
            raise UnsupportedError(f"{self.op}: group_size must be a power of two in [32, 1024], got {self.group_size}")
        check_vector_width(self.op, self.dtype, self.vec_width)

    def block_threads(self) -> int:
        return BLOCK_THREADS

    def team(self) -> int:
        return min(32, self.group_size // self.vec_width)

    def device_call(self) -> str:
        return (
            f"fmo::fp8_quant_token_group<{CUDA_TYPE[self.dtype]}, {self.group_size}, {self.vec_width}, "
            f"{'true' if self.pow2_scale else 'false'}, {BLOCK_THREADS}>(p)"
        )


def choose_spec(x: torch.Tensor, group_size: int, pow2_scale: bool) -> Fp8GroupQuantSpec:
    """Pure function of (dtype, shape, strides, alignment): identical on every rank."""
    vec = 16 // x.element_size()
    aligned = x.shape[1] % vec == 0 and x.stride(0) % vec == 0 and x.data_ptr() % 16 == 0
    return _spec(_DTYPES[x.dtype], group_size, vec if aligned else 1, pow2_scale)


@functools.lru_cache(maxsize=None)
def _spec(dtype: str, group_size: int, vec_width: int, pow2_scale: bool) -> Fp8GroupQuantSpec:
    """One spec object per variant: later lookups keyed by it hash a cached instance."""
    return Fp8GroupQuantSpec(dtype=dtype, group_size=group_size, vec_width=vec_width, pow2_scale=pow2_scale)


@register_op("fp8_quant_token_group")
def standard_specs():
    """Every variant the heuristic picks for the standard shapes (DeepSeek: group 128)."""
    for dtype in ("bf16", "fp16", "fp32"):
        for vec in (1, vector_width(dtype)):
            for pow2 in (False, True):
                yield Fp8GroupQuantSpec(dtype=dtype, group_size=128, vec_width=vec, pow2_scale=pow2)


def validate_eps(eps) -> None:
    """eps floors a group's amax; fp32(eps) / 448 must be a normal fp32 number, so that every
    scale of the quantisation contract (csrc/quant/fp8_scale.cuh) is positive and normal."""
    expect(eps.__class__ is float and reference.EPS_MIN <= eps <= reference.FP32_MAX, "eps",
           f"a positive finite float in [{reference.EPS_MIN:.4g}, {reference.FP32_MAX:.4g}] (eps / 448 a normal fp32)", eps)


def _validate(x, group_size, eps, pow2_scale=False) -> None:
    expect(isinstance(x, torch.Tensor), "x", "a torch.Tensor", lambda: type(x).__name__)
    expect(x.dim() == 2, "x", "a 2-D tensor [M, K]", lambda: f"shape {tuple(x.shape)}")
    expect(x.dtype in _DTYPES, "x", "dtype bfloat16, float16 or float32", x.dtype)
    m, k = x.shape
    row_stride, col_stride = x.stride()
    expect(k == 0 or col_stride == 1, "x", "a contiguous last dimension (stride 1)", lambda: f"strides {x.stride()}")
    expect(m <= 1 or row_stride >= k, "x", "non-overlapping rows (stride(0) >= K)", lambda: f"strides {x.stride()}")
    expect(group_size.__class__ is int and 32 <= group_size <= 1024 and group_size & (group_size - 1) == 0,
           "group_size", "a power of two in [32, 1024]", group_size)
    validate_eps(eps)
    expect(pow2_scale.__class__ is bool, "pow2_scale", "a bool", lambda: type(pow2_scale).__name__)


@dataclass(slots=True, frozen=True)
class _ShapePlan:
    """What a call's (dtype, shape, strides, alignment, options) fix: validated once."""

    spec: Fp8GroupQuantSpec
    config: LaunchConfig
    rows: int
    groups: int
    params: Fp8GroupQuantParams  # every field but the three pointers; copied per call (never mutated)

    def make_params(self, x, xq, xs) -> Fp8GroupQuantParams:
        p = Fp8GroupQuantParams.from_buffer_copy(self.params)  # a third cheaper than constructing
        p.x, p.xq, p.xs = x.data_ptr(), xq.data_ptr(), xs.data_ptr()
        return p


_shape_plans: dict[tuple, _ShapePlan] = {}
_MAX_SHAPE_PLANS = 4096  # token counts vary per batch: bound the cache, rebuilding is cheap


def _shape_plan(x, group_size, pow2_scale, eps) -> _ShapePlan:
    """The per-shape plan, from the cache when this (dtype, shape, strides, 16-byte
    alignment, options) was validated before. Every input `_validate` checks is a function
    of the key (the classes of group_size, eps and pow2_scale included, so 128.0 or 1 do not
    hit the entry of 128 or True; a NaN eps never equals itself and always revalidates)."""
    if x.__class__ is not torch.Tensor and not isinstance(x, torch.Tensor):
        _validate(x, group_size, eps, pow2_scale)  # raises
    key = (x.dtype, x.shape, x.stride(), x.data_ptr() & 15 == 0, group_size, group_size.__class__,
           pow2_scale, pow2_scale.__class__, eps, eps.__class__)
    plan = _shape_plans.get(key)
    if plan is None:
        _validate(x, group_size, eps, pow2_scale)
        m, k = x.shape
        groups = -(-k // group_size)
        spec = choose_spec(x, group_size, pow2_scale)
        groups_per_block = BLOCK_THREADS // spec.team()
        config = LaunchConfig.make(grid=max(1, -(-(m * groups) // groups_per_block)), block=BLOCK_THREADS)
        params = Fp8GroupQuantParams(x=0, xq=0, xs=0, rows=m, cols=k, x_row_stride=x.stride(0), groups=groups,
                                     min_amax=eps, reserved=0)
        plan = _ShapePlan(spec, config, m, groups, params)
        if len(_shape_plans) >= _MAX_SHAPE_PLANS:
            _shape_plans.clear()
        _shape_plans[key] = plan
    return plan


def prepare_quantize_per_token_group(x: torch.Tensor, group_size: int, pow2_scale: bool, eps: float):
    """Everything a call does on the host before the kernel: validation (cached per shape),
    engine choice, output allocation, Params. -> (engine, plan or None, xq, xs); plan is None
    when there is nothing to launch (reference engine or an empty output)."""
    sp = _shape_plan(x, group_size, pow2_scale, eps)
    engine = backends.engine_for(x=x)
    if engine == "reference":
        xq, xs = reference.quantize_per_token_group(x, group_size, pow2_scale=pow2_scale, eps=eps)
        return engine, None, xq, xs
    # empty_like: x's shape and device in one call (the cheapest allocation torch offers);
    # contiguous_format so xq is row-major even when x's rows are padded
    xq = torch.empty_like(x, dtype=torch.float8_e4m3fn, memory_format=torch.contiguous_format)
    xs = torch.empty(sp.rows, sp.groups, dtype=torch.float32, device=x.device)
    if sp.rows * sp.groups == 0:
        return engine, None, xq, xs
    return engine, Plan(sp.spec, sp.config, sp.make_params(x, xq, xs), (x, xq, xs)), xq, xs


_FAST = fast_launch.table("fp8.quantize_per_token_group")


def _quantize_per_token_group(x, group_size, pow2_scale, eps):
    """The Python path: what a fast-launch miss runs (and records)."""
    engine, plan, xq, xs = prepare_quantize_per_token_group(x, group_size, pow2_scale, eps)
    if plan is not None:
        plan.run(engine)
    return xq, xs


def quantize_per_token_group(x: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False, eps: float = 1e-12):
    """Quantise activations to e4m3 with one fp32 scale per 1 x group_size group.

    x: [M, K] bf16/fp16/fp32 -> (xq [M, K] float8_e4m3fn, xs [M, ceil(K/group_size)] fp32),
    x ~= xq * xs. Scale = max(finite amax, eps) / 448 (rounded up to a power of two with
    pow2_scale); +-inf saturates to +-448, NaN gives NaN (0x7f). Bit for bit the contract of
    csrc/quant/fp8_scale.cuh on every engine."""
    if torch.compiler.is_compiling():  # traced as one opaque node: ops/fp8_library.py
        return torch.ops.fmo.fp8_quant_token_group(x, group_size, pow2_scale, eps)
    hit = _FAST.call(x, group_size, pow2_scale, eps)  # a warm signature: replayed in C++
    if hit is not None:
        return hit
    return _FAST.record(_quantize_per_token_group, x, group_size, pow2_scale, eps)
