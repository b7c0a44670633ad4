"""Launchers of the backward's FP8 quantisations: per block (csrc/quant/fp8_block_quant.cuh)
and x^T per token group (csrc/quant/fp8_quant_transposed.cuh, at the end of this module).

w: [N, K] bf16 | fp16 | fp32, last dim contiguous (rows may be strided)
-> wq: [N, K] float8_e4m3fn contiguous, ws: [ceil(N / block_size), ceil(K / block_size)] fp32.
Same scale policy as the per-token-group quantisation (csrc/quant/fp8_scale.cuh).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import backends
from ..errors import UnsupportedError, expect
from ..reference import fp8 as reference
from ..runtime import fast_launch
from ..runtime.launch import LaunchConfig, launch
from ..runtime.plans import PlanCache
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, check_element_type, check_vector_width, register_op
from .fp8_quant import validate_eps

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
BLOCK_SIZES = (32, 64, 128)


class Fp8BlockQuantParams(Params):
    cpp_name = "fmo::Fp8BlockQuantParams"
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("wq", ctypes.c_void_p),
        ("ws", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("w_row_stride", ctypes.c_int64),
        ("min_amax", ctypes.c_float),
        ("reserved", ctypes.c_int32),
    ]


@dataclass(frozen=True)
class Fp8BlockQuantSpec(KernelSpec):
    dtype: str            # input element type: bf16 | fp16 | fp32
    block_size: int       # BLOCK x BLOCK elements per scale
    vec_width: int        # elements per access: 16 bytes when aligned, else 1
    pow2_scale: bool      # UE8M0 scales (powers of two)

    op: ClassVar[str] = "fp8_quant_block"
    header: ClassVar[str] = "csrc/quant/fp8_block_quant.cuh"
    params: ClassVar[type[Params]] = Fp8BlockQuantParams

    def check(self) -> None:
        super().check()
        check_element_type(self.op, self.dtype)
        if self.block_size not in BLOCK_SIZES:
            raise UnsupportedError(f"{self.op}: block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        check_vector_width(self.op, self.dtype, self.vec_width)

    def block_threads(self) -> int:  # mirrors BlockQuantShape::kThreads
        return min(256, self.block_size * self.block_size // self.vec_width)

    def device_call(self) -> str:
        return (f"fmo::fp8_quant_block<{CUDA_TYPE[self.dtype]}, {self.block_size}, {self.vec_width}, "
                f"{'true' if self.pow2_scale else 'false'}>(p)")


def choose_spec(w: torch.Tensor, block_size: int, pow2_scale: bool) -> Fp8BlockQuantSpec:
    """Pure function of (dtype, shape, strides, alignment): identical on every rank."""
    vec = 16 // w.element_size()
    aligned = w.shape[1] % vec == 0 and w.stride(0) % vec == 0 and w.data_ptr() % 16 == 0
    return Fp8BlockQuantSpec(dtype=_DTYPES[w.dtype], block_size=block_size, vec_width=vec if aligned else 1,
                             pow2_scale=pow2_scale)


@register_op("fp8_quant_block")
def standard_specs():
    """Every variant the heuristic picks for the standard shapes (DeepSeek: 128 x 128 blocks)."""
    for dtype in ("bf16", "fp32"):
        for pow2 in (False, True):
            yield Fp8BlockQuantSpec(dtype=dtype, block_size=128, vec_width=16 // (4 if dtype == "fp32" else 2), pow2_scale=pow2)


def _validate(w, block_size, eps) -> None:
    expect(isinstance(w, torch.Tensor), "w", "a torch.Tensor", type(w).__name__)
    expect(w.dim() == 2, "w", "a 2-D tensor [N, K]", f"shape {tuple(w.shape)}")
    expect(w.dtype in _DTYPES, "w", "dtype bfloat16, float16 or float32", w.dtype)
    expect(w.shape[1] == 0 or w.stride(1) == 1, "w", "a contiguous last dimension (stride 1)", f"strides {w.stride()}")
    expect(w.shape[0] <= 1 or w.stride(0) >= w.shape[1], "w", "non-overlapping rows (stride(0) >= K)", f"strides {w.stride()}")
    expect(block_size in BLOCK_SIZES, "block_size", f"one of {BLOCK_SIZES}", block_size)
    validate_eps(eps)


def quantize_per_block(w: torch.Tensor, block_size: int = 128, *, pow2_scale: bool = False, eps: float = 1e-12):
    """Quantise weights to e4m3 with one fp32 scale per block_size x block_size block.

    w: [N, K] bf16/fp16/fp32 -> (wq [N, K] float8_e4m3fn, ws [ceil(N/bs), ceil(K/bs)] fp32),
    w ~= wq * ws[n // bs, k // bs]. Scale = max(finite amax, eps) / 448 (a power of two with
    pow2_scale); +-inf saturates to +-448, NaN gives NaN (0x7f) and does not spread. Bit for
    bit the contract of csrc/quant/fp8_scale.cuh on every engine."""
    if torch.compiler.is_compiling():  # traced as one opaque node: ops/fp8_library.py
        return torch.ops.fmo.fp8_quant_per_block(w, block_size, pow2_scale, eps)
    hit = _FAST_BLOCK.call(w, block_size, pow2_scale, eps)  # a warm signature: replayed in C++
    if hit is not None:
        return hit
    return _FAST_BLOCK.record(_quantize_per_block, w, block_size, pow2_scale, eps)


def _quantize_per_block(w, block_size, pow2_scale, eps):
    """The Python path: what a fast-launch miss runs (and records)."""
    plan = _plans.get(_plans.key(_options("block", w, block_size, pow2_scale, eps), (w,)),
                      lambda: _block_plan(w, block_size, pow2_scale, eps))
    if plan.engine == "reference":
        return reference.quantize_per_block(w, block_size, pow2_scale=pow2_scale, eps=eps)
    return plan.run(w)


def _block_plan(w, block_size, pow2_scale, eps) -> "QuantPlan":
    _validate(w, block_size, eps)
    expect(pow2_scale.__class__ is bool, "pow2_scale", "a bool", lambda: type(pow2_scale).__name__)
    engine = backends.engine_for(w=w)
    n, k = w.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    plan = QuantPlan(engine, (n, k), (nb, kb), w.device)
    if engine == "reference" or nb * kb == 0:
        return plan
    expect(nb <= 65535, "w", "at most 65535 * block_size rows", n)
    spec = choose_spec(w, block_size, pow2_scale)
    plan.spec, plan.config = spec, LaunchConfig.make(grid=(kb, nb), block=spec.block_threads())
    plan.params = Fp8BlockQuantParams(rows=n, cols=k, w_row_stride=w.stride(0), min_amax=eps, reserved=0)
    return plan


@dataclass(slots=True)
class QuantPlan:
    """A quantiser call but for its three pointers (input, values, scales): what the call's
    signature fixes. spec None: nothing to launch (reference engine, or an empty output)."""

    engine: str
    q_shape: tuple
    s_shape: tuple
    device: torch.device
    spec: KernelSpec | None = None
    config: LaunchConfig | None = None
    params: Params | None = None      # every field but the pointers (the first three)

    def run(self, x):
        # sizes as varargs: torch parses them ~0.7 us faster than one tuple argument
        q = torch.empty(*self.q_shape, dtype=torch.float8_e4m3fn, device=self.device)
        s = torch.empty(*self.s_shape, dtype=torch.float32, device=self.device)
        if self.spec is None:
            return q, s
        p = type(self.params).from_buffer_copy(self.params)
        (a, _), (b, _), (c, _) = p._fields_[:3]
        setattr(p, a, x.data_ptr()), setattr(p, b, q.data_ptr()), setattr(p, c, s.data_ptr())
        launch(self.spec, self.config, p, engine=self.engine, tensors=(x, q, s))
        return q, s


def _options(kind, x, size, pow2_scale, eps) -> tuple:
    """The options of a quantiser's key: the values and their classes (128.0 or 1 must not hit
    the entry of 128 or True; a NaN eps never equals itself), and x's 16-byte alignment (the
    kernel's vector width). Everything its validation checks is a function of the key."""
    aligned = x.data_ptr() & 15 == 0 if x.__class__ is torch.Tensor else None
    return (kind, size, size.__class__, pow2_scale, pow2_scale.__class__, eps, eps.__class__, aligned)


_plans = PlanCache()
_FAST_BLOCK = fast_launch.table("fp8.quantize_per_block")
_FAST_TRANSPOSED = fast_launch.table("fp8.quantize_per_token_group_transposed")


# --------------------------------------------- transposed per-token-group (wgrad operands)


class Fp8TransposedQuantParams(Params):
    cpp_name = "fmo::Fp8TransposedQuantParams"
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("xq_t", ctypes.c_void_p),
        ("xs_t", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("x_row_stride", ctypes.c_int64),
        ("out_cols", ctypes.c_int64),
        ("groups", ctypes.c_int64),
        ("min_amax", ctypes.c_float),
        ("reserved", ctypes.c_int32),
    ]


TRANSPOSED_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Fp8TransposedQuantSpec(KernelSpec):
    dtype: str            # input element type: bf16 | fp16 | fp32
    group_size: int       # rows of x per scale
    vec_width: int        # elements per load: 16 bytes when aligned, else 1
    pow2_scale: bool

    op: ClassVar[str] = "fp8_quant_token_group_transposed"
    header: ClassVar[str] = "csrc/quant/fp8_quant_transposed.cuh"
    params: ClassVar[type[Params]] = Fp8TransposedQuantParams

    def check(self) -> None:
        super().check()
        check_element_type(self.op, self.dtype)
        if self.group_size not in TRANSPOSED_GROUPS:
            raise UnsupportedError(f"{self.op}: group_size must be one of {TRANSPOSED_GROUPS}, got {self.group_size}")
        check_vector_width(self.op, self.dtype, self.vec_width)

    def tile_cols(self) -> int:  # 256 threads x 16-byte stores cover the tile exactly
        return max(64, 4096 // self.group_size)

    def block_threads(self) -> int:
        return 256

    def device_call(self) -> str:
        return (f"fmo::fp8_quant_token_group_transposed<{CUDA_TYPE[self.dtype]}, {self.group_size}, {self.tile_cols()}, "
                f"{self.vec_width}, {'true' if self.pow2_scale else 'false'}>(p)")


@register_op("fp8_quant_token_group_transposed")
def standard_transposed_specs():
    for dtype in ("bf16", "fp32"):
        yield Fp8TransposedQuantSpec(dtype=dtype, group_size=128, vec_width=16 // (4 if dtype == "fp32" else 2), pow2_scale=False)


def quantize_per_token_group_transposed(x: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False, eps: float = 1e-12):
    """Quantise x^T per 1 x group_size group along x's rows (tokens), without forming x^T.

    x: [M, K] bf16/fp16/fp32 (last dim contiguous) -> (xq_t [K, Mp] float8_e4m3fn,
    xs_t [K, ceil(M/group_size)] fp32) with Mp = M rounded up to 16 and zero columns past M:
    bit-identical to quantize_per_token_group(x.t().contiguous()) on the first M columns.
    The wgrad operands of FP8Linear (dW = dy^T x)."""
    if torch.compiler.is_compiling():  # traced as one opaque node: ops/fp8_library.py
        return torch.ops.fmo.fp8_quant_token_group_transposed(x, group_size, pow2_scale, eps)
    hit = _FAST_TRANSPOSED.call(x, group_size, pow2_scale, eps)  # a warm signature: replayed in C++
    if hit is not None:
        return hit
    return _FAST_TRANSPOSED.record(_quantize_per_token_group_transposed, x, group_size, pow2_scale, eps)


def _quantize_per_token_group_transposed(x, group_size, pow2_scale, eps):
    """The Python path: what a fast-launch miss runs (and records)."""
    plan = _plans.get(_plans.key(_options("transposed", x, group_size, pow2_scale, eps), (x,)),
                      lambda: _transposed_plan(x, group_size, pow2_scale, eps))
    if plan.engine == "reference":
        return reference.quantize_per_token_group_transposed(x, group_size, pow2_scale=pow2_scale, eps=eps)
    return plan.run(x)


def _transposed_plan(x, group_size, pow2_scale, eps) -> QuantPlan:
    expect(isinstance(x, torch.Tensor), "x", "a torch.Tensor", type(x).__name__)
    expect(x.dim() == 2, "x", "a 2-D tensor [M, K]", f"shape {tuple(x.shape)}")
    expect(x.dtype in _DTYPES, "x", "dtype bfloat16, float16 or float32", x.dtype)
    expect(x.shape[1] <= 1 or x.stride(1) == 1, "x", "a contiguous last dimension (stride 1)", f"strides {x.stride()}")
    expect(group_size in TRANSPOSED_GROUPS, "group_size", f"one of {TRANSPOSED_GROUPS}", group_size)
    validate_eps(eps)
    expect(pow2_scale.__class__ is bool, "pow2_scale", "a bool", lambda: type(pow2_scale).__name__)
    engine = backends.engine_for(x=x)
    m, k = x.shape
    mp, groups = -(-m // 16) * 16, -(-m // group_size)
    plan = QuantPlan(engine, (k, mp), (k, groups), x.device)
    if engine == "reference" or m * k == 0:
        return plan
    expect(groups <= 65535, "x", f"at most {65535 * group_size} rows", m)
    vec = 16 // x.element_size()
    aligned = k % vec == 0 and x.stride(0) % vec == 0 and x.data_ptr() % 16 == 0
    spec = Fp8TransposedQuantSpec(dtype=_DTYPES[x.dtype], group_size=group_size, vec_width=vec if aligned else 1,
                                  pow2_scale=pow2_scale)
    plan.spec, plan.config = spec, LaunchConfig.make(grid=(-(-k // spec.tile_cols()), groups), block=256)
    plan.params = Fp8TransposedQuantParams(rows=m, cols=k, x_row_stride=x.stride(0), out_cols=mp, groups=groups,
                                           min_amax=eps, reserved=0)
    return plan
