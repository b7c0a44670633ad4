"""The MPI transport: rows over MPI messages (fastmoe_ops.moe.host holds the exchanges).
Serves every tensor the Buffer accepts, on any set of machines; also the transport of
combine's backward (a dispatch of the saved handle's rows). CUDA tensors' packed rows are
staged through pinned host buffers, or handed to MPI as device buffers when every rank's
MPI is CUDA-aware (`mpi_reads_device_memory`, FMO_MPI_CUDA_AWARE)."""
from __future__ import annotations

import torch

from ... import env
from ...comm import Group
from ...errors import InputError
from ...ops.fp8_quant import quantize_per_token_group
from .. import host
from ..validate import SCALE_GROUP


CUDA_AWARE_SETTINGS = ("auto", "0", "1")


def library_is_cuda_aware() -> bool:
    """What the MPI library says of itself (Open MPI's MPIX_Query_cuda_support, which
    mpi4py exposes as MPI.Query_cuda_support where its build has it); False where it
    cannot say."""
    from mpi4py import MPI

    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:   # the extension is there but the query failed: stage, which always works
        return False


def mpi_reads_device_memory(group: Group) -> bool:
    """Whether CUDA tensors' packed rows go to MPI as device buffers (else staged through
    pinned host memory). Each rank's choice (FMO_MPI_CUDA_AWARE: 1, 0, or auto: ask the
    library), then one vote: device buffers only when every rank chose them (ranks whose
    libraries disagree are a mixed installation; staging works on every one, and one path
    on all ranks is the path the tests run). Collective; a bad setting on any rank is
    refused on every rank."""
    setting = env.raw("FMO_MPI_CUDA_AWARE").strip().lower()
    mine = setting == "1" or (setting == "auto" and library_is_cuda_aware())
    votes = group.allgather((setting, mine), "Buffer(): FMO_MPI_CUDA_AWARE")   # refusals alike on every rank
    for rank, (theirs, _) in enumerate(votes):
        if theirs not in CUDA_AWARE_SETTINGS:
            raise InputError(f"FMO_MPI_CUDA_AWARE: expected one of {list(CUDA_AWARE_SETTINGS)}, got {theirs!r} on rank {rank}")
    return all(vote for _, vote in votes)


class MpiTransport:
    code = 0

    def __init__(self, group: Group, device_buffers: bool):
        """device_buffers: mpi_reads_device_memory's decision (the same on every rank)."""
        self.group = group
        self.device_buffers = device_buffers
        self._host = host.HostTransport(group, device_buffers)

    def serves(self, tensor) -> bool:
        return True

    def handshake_cells(self) -> int:
        return 0

    def layout(self, topk_idx: torch.Tensor, ranks: int, per: int) -> host.Layout:
        return host.layout(topk_idx, ranks, per, host.packed_on_device(topk_idx))

    def dispatch(self, payloads, recvs, layout: host.Layout, counts, quantize: bool = False) -> None:
        """Host tensors: each payload's rows straight from it into its output. Staged: two
        exchanges in flight at once, x's rows and the small per-row extras (scales, ids,
        weights) packed side by side, unpacked after. quantize: payloads[1] is None; x is
        quantised first by quantize_per_token_group (on its device), then sent as the pair."""
        if quantize:
            payloads = [*quantize_per_token_group(payloads[0], SCALE_GROUP), *payloads[2:]]
        me = self.group.rank
        send_counts, recv_counts = counts[me].tolist(), counts[:, me].tolist()
        staged = host.packed_on_device(payloads[0])
        if not staged or len(payloads) == 1:   # every stream straight from its tensor into its output
            self._host.dispatch_rows(payloads, layout.send_src, send_counts, recv_counts, recvs, "dispatch payload",
                                     staged)
            return
        extras = torch.cat([host.rows_bytes(p) for p in payloads[1:]], 1)
        packed = torch.empty(recvs[0].shape[0], extras.shape[1], dtype=torch.uint8, device=extras.device)
        self._host.dispatch_rows([payloads[0], extras], layout.send_src, send_counts, recv_counts, [recvs[0], packed],
                                 "dispatch payload", staged)
        at = 0
        for out in recvs[1:]:
            width = host.row_bytes(out)
            host.rows_bytes(out).copy_(packed[:, at:at + width])
            at += width

    def dispatch_rows(self, g: torch.Tensor, handle) -> torch.Tensor:
        """Combine's backward: g [T, W] -> [rows, W], each received row its source token's g
        (padding rows zero)."""
        out = torch.empty(handle.num_recv_rows, g.shape[1], dtype=g.dtype, device=g.device)
        self._host.dispatch_rows([g], handle.send_src, handle.send_counts, handle.recv_counts, [out],
                                 "combine backward payload", host.packed_on_device(g))
        out[handle.num_recv:].zero_()
        return out

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        return self._host.combine(y, handle.send_src, handle.combine_index, handle.send_counts, handle.recv_counts,
                                  handle.num_tokens, host.packed_on_device(y))   # the fixed ascending-rank sum

    def quiesce(self) -> None:
        pass

    def close(self) -> None:
        self._host.release()
