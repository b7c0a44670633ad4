"""The ipc transport (ranks of one node): every rank's buffer mapped by every peer, and the
kernels of csrc/moe/ipc.cuh moving rows through them on exactly the communication SM budget.

Mapping (one small interface, two implementations; the bootstrap is shared):
  CudaIpcMapping: device memory from cudaMalloc, exported with cudaIpcGetMemHandle and
                  opened by peers with cudaIpcOpenMemHandle (runtime/cuda_driver.py);
  ShmMapping:     the simulator's stand-in, POSIX shared memory (`fastmoe_ops.comm.shm`).
Handles are exchanged over the Group once, in the Buffer's constructor, and closed in
destroy(). Buffer layout (bytes): [2R int64 counters | static-mode words (static_dispatch,
static_combine: csrc/moe/ipc_static.cuh draws them) | dispatch region: R slots x slot_rows
packed rows | combine region: R * slot_rows rows of hidden fp32-sized elements].

On a GPU the kernels run on the transport's own stream (ordered after the caller's current
stream, which then waits for it). Reuse between calls is safe without extra flags: every
dispatch/combine starts by waiting for this rank's previous transport kernel, then runs the
Buffer's host handshake, which completes only once every peer has done the same, i.e. once
no kernel of the previous call still reads a region the next one writes. The static forms
(num_worst_tokens) have no handshake: their kernels wait for every peer's arrival on the
device instead (ipc_static.cuh), and report errors in status words (`raise_static_errors`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ... import backends, env
from ...comm import Group, shm
from ...errors import CommTimeoutError, InputError, UnsupportedError
from ...ops import moe_ipc
from ...runtime import cuda_driver
from .. import host
from ..validate import SCALE_GROUP

SCALE_EPS = 1e-12   # quantising dispatch: quantize_per_token_group's default eps
STATUS_WORDS = 4    # ipc_static.cuh: lost, bad topk_idx, max_tokens_per_rank and num_worst_tokens overflows
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)   # what the kernels move


def _align(n: int, a: int = 128) -> int:
    return -(-n // a) * a


class ShmMapping:
    """The simulator's buffers: POSIX shared memory seen as CPU tensors."""

    device = torch.device("cpu")
    engine = "sim"

    def create(self, nbytes: int):
        return shm.create(nbytes)                  # zero-filled

    def open(self, handle) -> torch.Tensor:
        return shm.open(handle)

    def close(self, tensor: torch.Tensor, own: bool) -> None:
        shm.close(tensor)


@dataclass(frozen=True)
class CudaIpcHandle:
    """What a peer needs to map a rank's device buffer (pickles)."""

    handle: bytes       # cudaIpcMemHandle_t
    nbytes: int


class CudaIpcMapping:
    """Device buffers shared between the processes of one node through CUDA IPC handles."""

    engine = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self._owned: dict[int, int] = {}           # data_ptr -> cudaMalloc'd pointer to free
        self._opened: set[int] = set()

    def create(self, nbytes: int):
        # Its own cudaMalloc (not torch's caching allocator): an IPC handle names a whole
        # allocation, and this one must live exactly as long as the Buffer.
        with torch.cuda.device(self.device):
            ptr = cuda_driver.malloc(nbytes)
            t = cuda_driver.device_tensor(ptr, nbytes, self.device)
            t.zero_()                              # counters start at zero
            torch.cuda.synchronize(self.device)
            handle = CudaIpcHandle(cuda_driver.ipc_get_mem_handle(ptr), nbytes)
        self._owned[t.data_ptr()] = ptr
        return handle, t

    def open(self, handle: CudaIpcHandle) -> torch.Tensor:
        with torch.cuda.device(self.device):
            ptr = cuda_driver.ipc_open_mem_handle(handle.handle)
        self._opened.add(ptr)
        return cuda_driver.device_tensor(ptr, handle.nbytes, self.device)

    def close(self, tensor: torch.Tensor, own: bool) -> None:
        ptr = tensor.data_ptr()
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)    # no kernel of ours still touches it
            if own:
                cuda_driver.free(self._owned.pop(ptr))
            elif ptr in self._opened:
                self._opened.discard(ptr)
                cuda_driver.ipc_close_mem_handle(ptr)


def mapping_for(device: torch.device):
    return CudaIpcMapping(device) if device.type == "cuda" else ShmMapping()


def map_peers(group: Group, mapping, nbytes: int, what: str):
    """The bootstrap every mapped buffer shares (the transport's, the low-latency mode's):
    create this rank's buffer, exchange handles over the Group, open every peer's, barrier.
    Returns (handle, mine, peers) with peers[rank] = mine."""
    handle, mine = mapping.create(nbytes)
    handles = group.allgather(handle, what)
    peers = [mine if p == group.rank else mapping.open(h) for p, h in enumerate(handles)]
    group.barrier(what)   # every peer has mapped every buffer
    return handle, mine, peers


def unmap_peers(mapping, rank: int, mine, peers) -> None:
    """Close every peer's mapping, then this rank's own buffer (nothing when peers is empty)."""
    for p, t in enumerate(peers):
        if p != rank:
            mapping.close(t, own=False)
    if peers:
        mapping.close(mine, own=True)


class IpcTransport:
    code = 1

    def __init__(self, group: Group, hidden: int, slot_rows: int, max_topk: int, mapping):
        if group.size > moe_ipc.MAX_RANKS:
            raise UnsupportedError(f"transport='ipc': at most {moe_ipc.MAX_RANKS} ranks per node, got {group.size}")
        self.group, self.slot_rows, self.max_topk, self.hidden = group, slot_rows, max_topk, hidden
        r = group.size
        # Widest packed row: fp32 x, or FP8 x + scales (narrower), then ids and weights.
        self.max_row = _align(hidden * 4, 16) + _align(4 * -(-hidden // SCALE_GROUP), 16) + _align(max_topk * 12, 16)
        self.static_region = 2 * r * 8
        # ready [R], data [R], seq (u64) | status [STATUS_WORDS] u32 | matrix [R, R] i64
        self.status_offset = self.static_region + (2 * r + 1) * 8
        self.matrix_offset = self.status_offset + 4 * STATUS_WORDS
        self.dispatch_region = _align(self.matrix_offset + r * r * 8)
        self.combine_region = self.dispatch_region + _align(r * slot_rows * self.max_row)
        nbytes = self.combine_region + _align(r * slot_rows * hidden * 4)
        self.mapping, self.device, self.engine = mapping, mapping.device, mapping.engine
        self.handle, self.mine, self.peers = map_peers(group, mapping, nbytes, "Buffer(transport='ipc')")
        self.expected = [0, 0]                       # counter targets: dispatch, combine
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.done = None                             # event: this rank's last transport kernel
        self.failed: str | None = None               # a static kernel's wait gave up: unusable
        # The status words as host memory where the buffer is (shared memory on `sim`): read
        # after each synchronous kernel without a tensor read.
        status = self.mine[self.status_offset:self.status_offset + 4 * STATUS_WORDS].view(torch.int32)
        self._status_host = status.numpy() if self.device.type == "cpu" else None
        self._status = status
        self.static_limits = (0, 0)                  # (num_experts, num_worst) of the last static dispatch

    def serves(self, tensor) -> bool:
        """Tensors on the mapping's device, of a dtype the kernels move, whose engine is the
        mapping's (`cuda` for device buffers, `sim` for shared memory)."""
        return (tensor.dtype in DTYPES and tensor.device == self.device
                and backends.engine_for(x=tensor) == self.engine)

    def handshake_cells(self) -> int:
        return moe_ipc.comm_grid()   # the kernels' grid: every rank must launch the same

    def layout(self, topk_idx: torch.Tensor, ranks: int, per: int) -> host.Layout:
        return host.layout(topk_idx, ranks, per, host.packed_on_device(topk_idx))

    def close(self) -> None:
        unmap_peers(self.mapping, self.group.rank, self.mine, self.peers)
        self.peers = []

    def quiesce(self) -> None:
        """Wait for this rank's previous transport kernel (before the next call's handshake)."""
        if self.done is not None:
            self.done.synchronize()
            self.done = None

    @contextlib.contextmanager
    def _comm_stream(self, tensors):
        """Run the launch on the transport's stream, ordered after the caller's stream, which
        then waits for it; tensors from the caller's allocator are marked in use there."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        for t in tensors:
            t.record_stream(self.stream)
        caller.wait_stream(self.stream)
        self.done = self.stream.record_event()

    def _params(self, tokens: int, rank: int, grid: int, which: int | None) -> moe_ipc.MoeIpcParams:
        """which: the dynamic counters (0 dispatch, 1 combine) whose host target advances, or
        None for a static kernel (its targets derive from a device word)."""
        if which is not None:
            self.expected[which] += grid
        p = moe_ipc.MoeIpcParams(tokens=tokens, rank=rank, ranks=self.group.size, slot_rows=self.slot_rows,
                                 dispatch_region=self.dispatch_region, combine_region=self.combine_region,
                                 expected=self.expected[which] if which is not None else 0, hidden=self.hidden,
                                 static_region=self.static_region, fill_stream=-1,
                                 timeout_ns=int(env.number("FMO_COMM_TIMEOUT") * 1e9))
        for i, t in enumerate(self.peers):
            p.peers[i] = t.data_ptr()
        return p

    def dispatch(self, payloads, recvs, layout: host.Layout, counts, quantize: bool = False) -> None:
        """payloads: [T, ...] tensors; recvs: [rows, ...] receive tensors; layout.pos [T, R]:
        each token's row within the destination's slot; counts [R, R] (src -> dst).
        quantize: payloads[1] is None and the kernel quantises payloads[0] on the way out."""
        if int(counts.max(initial=0)) > self.slot_rows:
            raise InputError(f"dispatch: a rank would send {int(counts.max())} tokens to one peer, more than "
                             f"max_tokens_per_rank={self.slot_rows} (Buffer(transport='ipc'))")
        streams = [p.contiguous() if p is not None else None for p in payloads]
        p, spec, tensors = self._dispatch(streams, recvs, layout.pos, quantize, None)
        rank = self.group.rank
        for s in range(self.group.size):
            p.recv_counts[s] = int(counts[s, rank])
        self._run(spec, p, tensors, "dispatch")

    def static_dispatch(self, payloads, recvs, send_pos, send_counts, matrix, *, topk_idx=None, num_experts: int = 0,
                        fill_stream: int = -1, quantize: bool = False) -> None:
        """dispatch with every count on the device (csrc/moe/ipc_static.cuh): send_pos [T, R]
        and send_counts [R] int64 this rank's layout; recvs [num_worst, ...] all written
        (padding past the received rows: zero bytes, all-ones in recvs[fill_stream]);
        matrix [R, R] int64 receives every rank's counts (combine's input). topk_idx [T, k]:
        range-checked on the device against num_experts. Errors: `raise_static_errors`."""
        streams = [p.contiguous() if p is not None else None for p in payloads]
        p, spec, tensors = self._dispatch(streams, recvs, send_pos, quantize, recvs[0].shape[0])
        p.send_counts, p.matrix, p.fill_stream = send_counts.data_ptr(), matrix.data_ptr(), fill_stream
        self.static_limits = (num_experts, recvs[0].shape[0])   # for the messages of raise_static_errors
        tensors += (send_counts, matrix)
        if topk_idx is not None:
            topk_idx = topk_idx.contiguous()
            p.topk_idx, p.topk, p.num_experts = topk_idx.data_ptr(), topk_idx.shape[1], num_experts
            tensors += (topk_idx,)
        self._run(spec, p, tensors, "dispatch")

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        out = torch.empty(handle.num_tokens, y.shape[1], dtype=y.dtype, device=y.device)
        p, spec, tensors = self._combine(y, out, handle.combine_index, False)
        rank = self.group.rank
        for s in range(self.group.size):
            p.recv_counts[s] = int(handle.counts[s, rank])
            p.back_offset[s] = int(handle.counts[s, :rank].sum())
        self._run(spec, p, tensors, "combine")
        return out

    def static_combine(self, y: torch.Tensor, num_tokens: int, combine_index: torch.Tensor,
                       matrix: torch.Tensor) -> torch.Tensor:
        """combine with the counts on the device: y [num_worst, W] (rows past the received
        ones unread), matrix [R, R] the static dispatch's -> out [num_tokens, W]."""
        out = torch.empty(num_tokens, y.shape[1], dtype=y.dtype, device=y.device)
        p, spec, tensors = self._combine(y.contiguous(), out, combine_index, True)
        p.matrix = matrix.data_ptr()
        self._run(spec, p, (*tensors, matrix), "combine")
        return out

    def _run(self, spec, p, tensors, what: str) -> None:
        with self._comm_stream(tensors):
            moe_ipc.run(spec, p, moe_ipc.comm_grid(), engine=self.engine, tensors=(*tensors, *self.peers))
        if getattr(spec, "static", False) and self._status_host is not None:   # `sim`: the kernel has finished
            self.raise_static_errors(what)

    def _dispatch(self, streams, outs, send_pos, quantize: bool, num_worst: int | None):
        """The launch of a dispatch (dynamic: num_worst None): (params, spec, tensors)."""
        if self.failed is not None:
            raise CommTimeoutError(f"dispatch: this Buffer's ipc transport timed out earlier ({self.failed}); destroy it")
        seg = [o.shape[1:].numel() * o.element_size() for o in outs]    # bytes of each stream's received row
        offsets, at = [], 0
        for b in seg:
            offsets.append(at)
            at = _align(at + b, 16)
        if at > self.max_row:
            raise InputError(f"dispatch: a packed row needs {at} bytes, the Buffer holds {self.max_row} "
                             f"(x wider than fp32 or k > max_topk={self.max_topk})")
        static = num_worst is not None
        p = self._params(send_pos.shape[0], self.group.rank, moe_ipc.comm_grid(), None if static else 0)
        p.send_pos, p.num_streams, p.row_stride, p.num_worst = send_pos.data_ptr(), len(streams), at, num_worst or 0
        present = [s for s in streams if s is not None]
        for i, (s, o) in enumerate(zip(streams, outs)):
            p.out[i], p.seg_bytes[i], p.seg_offset[i] = o.data_ptr(), seg[i], offsets[i]
            if s is not None:
                p.src[i], p.src_stride[i] = s.data_ptr(), s.shape[1:].numel() * s.element_size()
        chunk = moe_ipc.chunk_bytes(*seg, at, self.dispatch_region, *(t.data_ptr() for t in (*present, *outs, self.mine)))
        spec = moe_ipc.MoeIpcDispatchSpec(chunk_bytes=chunk, static=static)
        if quantize:   # the packed row of the FP8 pair (xq, xs), the kernel quantising x into it
            x = streams[0]
            vec = 16 // x.element_size()
            aligned = x.shape[1] % vec == 0 and x.data_ptr() % 16 == 0 and offsets[0] % 16 == 0 and at % 16 == 0
            p.hidden, p.min_amax = x.shape[1], SCALE_EPS
            spec = moe_ipc.MoeIpcDispatchFp8Spec(dtype=moe_ipc.dtype_name(x.dtype), vec_width=vec if aligned else 1,
                                                 chunk_bytes=chunk, static=static)
        return p, spec, (*present, *outs, send_pos)

    def _combine(self, y, out, combine_index, static: bool):
        """The launch of a combine: y [N, H] contiguous (received rows), out [T, H];
        combine_index [T, R]. Returns (params, spec, tensors)."""
        if self.failed is not None:
            raise CommTimeoutError(f"combine: this Buffer's ipc transport timed out earlier ({self.failed}); destroy it")
        row = y.shape[1] * y.element_size()
        if row > self.hidden * 4:
            raise InputError(f"combine: y rows of {row} bytes exceed the Buffer's {self.hidden * 4} (fp32 at most)")
        p = self._params(out.shape[0], self.group.rank, moe_ipc.comm_grid(), None if static else 1)
        p.hidden = y.shape[1]            # the rows' width (k for the topk-weight gradients)
        p.src[0], p.out[0], p.src_stride[0], p.seg_bytes[0], p.num_streams, p.row_stride = y.data_ptr(), out.data_ptr(), row, row, 1, row
        p.combine_index = combine_index.data_ptr()
        vec = 16 // y.element_size()
        aligned = row % 16 == 0 and self.combine_region % 16 == 0 and out.data_ptr() % 16 == 0
        chunk = moe_ipc.chunk_bytes(row, self.combine_region, y.data_ptr(), self.mine.data_ptr())
        spec = moe_ipc.MoeIpcCombineSpec(dtype=moe_ipc.dtype_name(y.dtype), chunk_bytes=chunk, vec_width=vec if aligned else 1,
                                         static=static)
        return p, spec, (y, out, combine_index)

    # ------------------------------------------------------------------ static-mode errors
    def raise_static_errors(self, what: str) -> None:
        """Raise what the static kernels recorded in this rank's status words, then clear
        them (input errors leave the Buffer usable; a timeout does not). Reads host memory
        on `sim`; on CUDA the caller has synchronised (Buffer.check)."""
        words = [int(w) for w in self._status_host] if self._status_host is not None else self._status.tolist()
        if not any(words):
            return
        if self._status_host is not None:
            self._status_host[:] = 0
        else:
            self._status.zero_()
        lost, bad_idx, slot, worst = (sorted(r for r in range(self.group.size) if w >> r & 1) for w in words)
        if lost:
            self.failed = (f"{what}: timed out after FMO_COMM_TIMEOUT={env.number('FMO_COMM_TIMEOUT'):g} s waiting for "
                           f"rank(s) {lost}")
            raise CommTimeoutError(self.failed)
        if bad_idx:
            raise InputError(f"topk_idx: expected expert ids in [-1, {self.static_limits[0]}) on every rank, got others on rank(s) "
                             f"{bad_idx} (found on the device; this dispatch received padding only)")
        if slot:
            raise InputError(f"max_tokens_per_rank: rank(s) {slot} would send more than max_tokens_per_rank="
                             f"{self.slot_rows} tokens to one peer (Buffer(transport='ipc'); found on the device; this "
                             f"dispatch received padding only)")
        raise InputError(f"num_worst_tokens: rank(s) {worst} would receive more than num_worst_tokens={self.static_limits[1]} tokens "
                         f"(found on the device; this dispatch received padding only)")

