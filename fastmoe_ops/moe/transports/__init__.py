"""How a Buffer's rows move between ranks: one small protocol, one module per transport.

    mpi: host/MPI, any machines (CPU tensors moved as they are, CUDA tensors packed and
         summed on their device and staged through pinned host buffers, or handed to a
         CUDA-aware MPI as device buffers);
    ipc: ranks of one node, kernels on the reserved SMs writing into peers' mapped buffers
         (CUDA IPC on a GPU, POSIX shared memory for the simulator).

The Buffer validates, runs the metadata handshake, builds the Handle and the autograd glue;
a transport only moves rows. Every method is collective: all ranks call it alike, after a
handshake in which they agreed on the transport (its `code`) and the counts.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..host import Layout


class Transport(Protocol):
    code: int        # the handshake's "transport" column: every rank must use the same one

    def serves(self, tensor: torch.Tensor) -> bool:
        """Whether this transport can move rows of `tensor` (its device, dtype, engine)."""

    def handshake_cells(self) -> int:
        """The transport's own handshake cell (the ipc kernels' grid; 0 where unused)."""

    def layout(self, topk_idx: torch.Tensor, ranks: int, per: int) -> Layout:
        """Publish where this rank's tokens go (counts per rank, positions, send order)."""

    def dispatch(self, payloads: list, recvs: list, layout: Layout, counts: np.ndarray, quantize: bool = False) -> None:
        """Move rows: payloads[i] [T, ...] -> recvs[i] [rows, ...] in receive order
        (source rank, then source token). counts [R, R]: rows from src to dst. quantize:
        payloads[0] is x [T, H] (bf16/fp16/fp32) and payloads[1] None; recvs[0], recvs[1]
        receive x quantised per 1 x 128 group (e4m3 [rows, H], fp32 [rows, ceil(H/128)]),
        bit for bit quantize_per_token_group(x) then dispatch."""

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        """Sum rows: y [N, W] received rows -> [T, W], each token's copies summed in ascending
        rank order (fp32, fp64 for fp64), rounded once."""

    def quiesce(self) -> None:
        """Wait until this rank's previous transfer no longer touches shared memory."""

    def close(self) -> None:
        """Free what the transport owns (idempotent)."""
