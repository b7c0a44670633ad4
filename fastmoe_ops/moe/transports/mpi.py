"""The MPI transport: rows over MPI messages between host buffers (fastmoe_ops.moe.host
holds the exchanges). Serves every tensor the Buffer accepts, on any set of machines;
also the transport of combine's backward (a dispatch of the saved handle's rows)."""
from __future__ import annotations

import torch

from ...comm import Group
from ...ops.fp8_quant import quantize_per_token_group
from .. import host
from ..validate import SCALE_GROUP


class MpiTransport:
    code = 0

    def __init__(self, group: Group):
        self.group = group
        self._host = host.HostTransport(group)

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
