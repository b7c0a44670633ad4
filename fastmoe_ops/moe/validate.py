"""The Buffer's input checks: each returns or raises InputError with a message naming the
argument, what was expected and what came. Dispatch and combine collect a refusal as a
string instead of raising, so the handshake can refuse on every rank alike (no rank is left
waiting in a collective its peer never enters)."""
from __future__ import annotations

import torch

from .. import backends
from ..errors import InputError

SCALE_GROUP = 128  # FP8 pairs: one fp32 scale per 1 x 128 group (fmo.fp8.quantize_per_token_group)
ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)   # x and y as rows of values
QUANTIZABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)          # what use_fp8 quantises


def same(values, what: str) -> None:
    """Refuse unless every rank's value (one per rank, rank order) is the same."""
    if len(set(values)) != 1:
        raise InputError(f"{what}: expected the same value on every rank, got {dict(enumerate(values))}")


def tensor_2d(name: str, t, dtypes, device: torch.device | None = None) -> None:
    """t: a 2-D CPU or CUDA torch.Tensor of one of `dtypes` (on `device` where given)."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise InputError(f"{name}: expected a CPU or CUDA tensor, got one on {t.device}")
    if device is not None and t.device != device:
        raise InputError(f"{name}: expected a tensor on {device} (like x), got one on {t.device}")
    if t.dim() != 2:
        raise InputError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise InputError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def dispatch_error(x, topk_idx, topk_weights, fp8: bool, use_fp8, hidden: int, num_experts: int,
                   check_range: bool = True) -> str | None:
    """Why this rank refuses dispatch's arguments (None: accepted). fp8: x is a pair (xq, xs).
    check_range=False: no host read of topk_idx's values (the static path's kernels check
    the range on the device: fastmoe_ops.moe.static)."""
    try:
        if use_fp8.__class__ is not bool or (use_fp8 and fp8):
            raise InputError(f"use_fp8: expected a bool, False when x is already an FP8 pair, got {use_fp8!r}")
        if use_fp8:
            tensor_2d("x", x, QUANTIZABLE_DTYPES)
        elif fp8:
            if len(x) != 2:
                raise InputError(f"x: expected a pair (xq, xs), got {len(x)} items")
            xq, xs = x
            tensor_2d("x[0] (xq)", xq, (torch.float8_e4m3fn,))
            tensor_2d("x[1] (xs)", xs, (torch.float32,), xq.device)
            groups = -(-hidden // SCALE_GROUP)
            if tuple(xs.shape) != (xq.shape[0], groups):
                raise InputError(f"x[1] (xs): expected shape ({xq.shape[0]}, {groups}) (one scale per 1x{SCALE_GROUP} group), got {tuple(xs.shape)}")
            x = xq
        else:
            tensor_2d("x", x, ROW_DTYPES)
        if x.shape[1] != hidden:
            raise InputError(f"x: expected hidden size {hidden} (Buffer(hidden=...)), got shape {tuple(x.shape)}")
        tensor_2d("topk_idx", topk_idx, (torch.int64,), x.device)
        t, k = topk_idx.shape
        if t != x.shape[0] or k < 1:
            raise InputError(f"topk_idx: expected shape ({x.shape[0]}, k >= 1), got {tuple(topk_idx.shape)}")
        lo, hi = torch.stack(torch.aminmax(topk_idx)).tolist() if t and check_range else (0, 0)   # one host read
        if lo < -1 or hi >= num_experts:
            bad = topk_idx[(topk_idx < -1) | (topk_idx >= num_experts)][0].item()
            raise InputError(f"topk_idx: expected expert ids in [-1, {num_experts}), got {bad}")
        if topk_weights is not None:
            tensor_2d("topk_weights", topk_weights, (torch.float32,), x.device)
            if topk_weights.shape != topk_idx.shape:
                raise InputError(f"topk_weights: expected shape {tuple(topk_idx.shape)} like topk_idx, got {tuple(topk_weights.shape)}")
    except InputError as e:
        return str(e)
    return None


def combine_input(y, handle, width: int) -> None:
    """y: dispatch's received rows (num_recv or num_recv_rows of them) of `width`, where
    that dispatch ran (handle: an already checked Handle)."""
    tensor_2d("y", y, ROW_DTYPES)
    if y.shape[0] not in (handle.num_recv, handle.num_recv_rows) or y.shape[1] != width:
        raise InputError(f"y: expected shape ({handle.num_recv_rows}, {width}) like dispatch's recv_x, got {tuple(y.shape)}")
    if y.device != handle.device:
        raise InputError(f"y: expected a tensor on {handle.device} (where its dispatch ran), got one on {y.device}")


def ipc_device(device) -> torch.device:
    """Where transport='ipc' buffers live (see Buffer)."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if "cuda" in backends.available_backends() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device: expected a torch.device, 'cpu' or 'cuda[:n]', got {device!r}") from None
    if device.type == "cuda":
        if "cuda" not in backends.available_backends():
            raise InputError(f"device: {device} given, but CUDA with CuPy is not available here")
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu":
        raise InputError(f"device: expected a CPU or CUDA device, got {device}")
    return device
