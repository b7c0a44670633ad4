"""The metadata handshake that opens every Buffer exchange: one small allgather in which
each rank tells every peer what it is about to do (operation, sizes, dtype, transport, and
whether it refused its input) and its send counts. It either returns every rank's counts or
raises the same error on every rank, so no rank enters a data exchange its peers skip."""
from __future__ import annotations

import numpy as np
import torch

from ..comm import Group
from ..errors import CommError, InputError
from .validate import same

DISPATCH, COMBINE, DISPATCH_BACKWARD = 1, 2, 3
OP_NAME = {DISPATCH: "dispatch", COMBINE: "combine", DISPATCH_BACKWARD: "combine backward (a dispatch)"}
_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float64: 4, torch.float8_e4m3fn: 5}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
# Metadata every rank sends every peer before an exchange (int64), then R counts.
_META = ("op", "hidden", "dtype", "topk", "num_experts", "has_weights", "error", "transport", "comm_sms")


def handshake(group: Group, op: int, *, hidden: int, dtype, topk: int, num_experts: int, has_weights: bool,
              error: str | None, counts, rows) -> np.ndarray:
    """Every rank's send counts [R, R] (row: source rank); refuses on every rank alike if any
    rank refused its input (error) or the ranks disagree. rows: the transport moving this
    call's rows (its code and cell must match too)."""
    meta = np.zeros(len(_META) + group.size, np.int64)
    meta[: len(_META)] = (op, hidden, _DTYPE_CODE.get(dtype, 0), topk, num_experts, int(has_weights),
                          int(error is not None), rows.code, rows.handshake_cells())
    if error is None:
        meta[len(_META):] = counts
    table = group.allgather_array(meta, OP_NAME[op])
    head = table[:, : len(_META)]
    if not head[0, _META.index("error")] and (head == head[0]).all():   # the common case: no refusal, all agree
        return np.ascontiguousarray(table[:, len(_META):])   # a handle keeps them
    col = {name: head[:, i].tolist() for i, name in enumerate(_META)}
    if any(col["error"]):
        messages = group.allgather(error, OP_NAME[op])
        first = next(r for r, m in enumerate(messages) if m is not None)
        raise InputError(f"{OP_NAME[op]} refused on rank {first}: {messages[first]}")
    if len(set(col["op"])) != 1:
        raise CommError(f"ranks called different operations: { {r: OP_NAME.get(o, o) for r, o in enumerate(col['op'])} }")
    same(col["hidden"], "x: hidden size")
    same([str(_CODE_DTYPE.get(c)) for c in col["dtype"]], "x: dtype")
    same(col["topk"], "topk_idx: k")
    same(col["has_weights"], "topk_weights: given or None")
    same(col["transport"], "transport of this call (0: host over MPI; 1: ipc)")
    same(col["comm_sms"], "sm_budget().comm_sms (the transport kernels' grid)")
    raise CommError(f"{OP_NAME[op]}: the ranks' metadata differ: {head.tolist()} (columns {_META})")   # a column above missed
