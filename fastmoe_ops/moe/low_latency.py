"""Low-latency (decode) dispatch/combine: DeepEP's second kind, for small batches.

    buf = Buffer(group, hidden=H, num_experts=E, transport="ipc", max_tokens_per_rank=M, low_latency=True)
    recv_x, masked_m, handle = buf.low_latency_dispatch(x, topk_idx, topk_weights)        # [E_l, R*M, H], [E_l]
    (xq, xs), masked_m, handle = buf.low_latency_dispatch(x, topk_idx, use_fp8=True)     # e4m3 + fp32 [E_l, R*M, H/128]
    y = fmo.fp8.grouped_gemm_masked(xq, xs, wq, ws, masked_m)                              # feeds it directly
    out = buf.low_latency_combine(y, handle)                                               # [T, H]

Rows of local expert e: recv_x[e, :masked_m[e]], by source rank then source token (the
plain dispatch's receive order); rows past masked_m[e] are left unwritten. A token goes
once to each distinct expert it names; ids outside [0, E) (-1 among them) go nowhere.
combine: out[t] = sum_j w[t, j] * y[expert of slot j, row of t] in ascending j (fp32, a
rounded product then a rounded sum, rounded once to y's dtype), weights 1 without
topk_weights.

No host synchronisation on the hot path: no handshake, no count read back, no MPI call;
the kernels (csrc/moe/low_latency.cuh) write rows and counts into the peers' buffers
and signal through counters there, so fixed-shape calls are capturable in a CUDA graph.
Input checks are local (shapes, dtypes, devices, T <= M, k <= max_topk): ranks with alike
inputs refuse alike; a rank that refuses (or never calls) leaves its peers' kernels to give
up after FMO_COMM_TIMEOUT: CommTimeoutError on the `sim` engine at once, on CUDA from
`check()` (which synchronises); the Buffer is then unusable. Calls must alternate
dispatch, combine (one pair in flight per Buffer). return_recv_hook=True: the dispatch
only sends; calling the returned hook launches the receive (the rows may travel while the
caller computes, and no SM waits for them). Not differentiable (decode): tensors that
require grad are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends, env
from ..comm import Group
from ..errors import CommTimeoutError, InputError
from ..ops import moe_ipc
from ..ops import moe_low_latency as ll
from .transports import ipc

MAX_TOKENS = 256          # decode batches: the send phase counts earlier tokens per token (O(T^2 k^2 / block))
SCALE_GROUP = 128
SCALE_EPS = 1e-12         # quantize_per_token_group's default eps
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _align(n: int, a: int = 128) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class LowLatencyHandle:
    """What low_latency_combine needs from its dispatch (device tensors, no host counts).

    slot_index [T, k] int64: each slot's row in this rank's combine region or -1;
    recv_counts [E_local, R] int32: rows each source sent each local expert;
    topk_weights [T, k] fp32 or None."""

    buffer_id: int
    call: int
    num_tokens: int
    slot_index: torch.Tensor
    recv_counts: torch.Tensor
    topk_weights: torch.Tensor | None


class LowLatency:
    """The low-latency buffers of one Buffer: one mapped buffer per rank (ipc.map_peers),
    laid out as csrc/moe/low_latency.cuh draws it, and the alternation state."""

    def __init__(self, group: Group, buffer_id: int, *, hidden: int, num_experts: int, max_tokens: int, max_topk: int,
                 mapping):
        r = group.size
        checks = ((r <= ll.MAX_RANKS, "transport='ipc'", f"at most {ll.MAX_RANKS} ranks", r),
                  (hidden % 16 == 0, "hidden", "a multiple of 16 with low_latency=True (16-byte rows of e4m3 codes)", hidden),
                  (max_tokens <= MAX_TOKENS, "max_tokens_per_rank", f"at most {MAX_TOKENS} with low_latency=True (decode batches)", max_tokens),
                  (max_topk <= ll.MAX_TOPK, "max_topk", f"at most {ll.MAX_TOPK} with low_latency=True", max_topk))
        for ok, name, want, got in checks:
            if not ok:
                raise InputError(f"{name}: expected {want}, got {got}")
        grids = group.allgather(moe_ipc.comm_grid(), "Buffer(low_latency=True)")
        if len(set(grids)) != 1:   # the counters count CTAs: every rank launches the same grid
            raise InputError(f"sm_budget().comm_sms: expected the same value on every rank, got {dict(enumerate(grids))}")
        self.grid, self.group, self.buffer_id = grids[0], group, buffer_id
        self.hidden, self.num_experts, self.max_tokens, self.max_topk = hidden, num_experts, max_tokens, max_topk
        self.per, self.ranks, self.rank = num_experts // r, r, group.rank
        # Layout: counters [2R] u64 | status [2] u32 | counts [E_l, R] i32 | rows [E_l, R, M] x
        # 2H bytes (bf16 x, or H e4m3 codes then the scales at H) | combine [E, M, H] 2-byte.
        self.row_stride, self.scale_offset = 2 * hidden, hidden
        self.status_offset = 2 * r * 8
        self.counts_region = _align(self.status_offset + 8)
        self.dispatch_region = self.counts_region + _align(self.per * r * 4)
        self.combine_region = self.dispatch_region + _align(self.per * r * max_tokens * self.row_stride)
        nbytes = self.combine_region + _align(num_experts * max_tokens * hidden * 2)
        self.mapping, self.device, self.engine = mapping, mapping.device, mapping.engine
        self.handle, self.mine, self.peers = ipc.map_peers(group, mapping, nbytes, "Buffer(low_latency=True)")
        self.calls = 0
        self.pending: tuple | None = None    # (call, received) of the dispatch awaiting its combine
        self.failed: str | None = None

    def close(self) -> None:
        ipc.unmap_peers(self.mapping, self.rank, self.mine, self.peers)
        self.peers = []

    # ------------------------------------------------------------------ checks
    def _tensor(self, name, t, dtypes, shape) -> None:
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise InputError(f"{name}: expected a tensor on {self.device} (the Buffer's low-latency buffers), got one on {t.device}")
        if t.dtype not in dtypes:
            raise InputError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
        if t.dim() != len(shape) or any(w is not None and w != g for w, g in zip(shape, t.shape)):
            want = tuple("any" if w is None else w for w in shape)
            raise InputError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise InputError(f"{name}: low-latency mode is not differentiable (decode); got a tensor that requires grad")

    def _ready(self, what: str) -> None:
        if self.failed is not None:
            raise CommTimeoutError(f"{what}: this Buffer's low-latency mode timed out earlier ({self.failed}); destroy it")
        if not self.peers:
            raise InputError(f"{what}: this Buffer was built without low_latency=True")

    def _engine(self, t: torch.Tensor) -> None:
        engine = backends.engine_for(x=t)
        if engine != self.engine:
            raise InputError(f"x: low-latency kernels run on engine {self.engine!r} for tensors on {self.device}, "
                             f"this call would use {engine!r} (on CPU: fmo.use_backend('sim'))")

    # ------------------------------------------------------------------ launches
    def _params(self, x, tokens: int, topk: int) -> ll.MoeLlParams:
        p = ll.MoeLlParams(x=x.data_ptr(), tokens=tokens, topk=topk, hidden=self.hidden, num_experts=self.num_experts,
                           per=self.per, rank=self.rank, ranks=self.ranks, max_tokens=self.max_tokens,
                           row_stride=self.row_stride, scale_offset=self.scale_offset, status_offset=self.status_offset,
                           counts_region=self.counts_region, dispatch_region=self.dispatch_region,
                           combine_region=self.combine_region, signals=self.grid,
                           timeout_ns=int(env.number("FMO_COMM_TIMEOUT") * 1e9), min_amax=SCALE_EPS)
        for i, t in enumerate(self.peers):
            p.peers[i] = t.data_ptr()
        return p

    def _launch(self, spec, p, tensors, what: str) -> None:
        ll.run(spec, p, self.grid, engine=self.engine, tensors=(*tensors, *self.peers))
        if self.device.type == "cpu" and spec.phase != "send":   # the simulator ran it to the end
            self._raise_if_timed_out(what)

    def _raise_if_timed_out(self, what: str) -> None:
        status = self.mine[self.status_offset:self.status_offset + 8].view(torch.int32).tolist()
        lost = sorted({s for word in status for s in range(self.ranks) if word >> s & 1})
        if lost:
            self.failed = (f"{what}: timed out after FMO_COMM_TIMEOUT={env.number('FMO_COMM_TIMEOUT'):g} s waiting for "
                           f"rank(s) {lost}")
            raise CommTimeoutError(self.failed)

    def check(self) -> None:
        """Raise CommTimeoutError if a kernel's wait gave up (synchronises the device)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.failed is None:
            self._raise_if_timed_out("low-latency mode")
        self._ready("low-latency mode")

    # ------------------------------------------------------------------ public
    def dispatch(self, x, topk_idx, topk_weights=None, *, use_fp8: bool = False, return_recv_hook: bool = False):
        """x [T, H] bf16 | fp16, topk_idx [T, k] int64, topk_weights [T, k] fp32 or None ->
        (recv_x [E_l, R*M, H] or (xq e4m3, xs fp32 [E_l, R*M, ceil(H/128)]), masked_m [E_l]
        int32, handle[, hook])."""
        self._ready("low_latency_dispatch")
        for name, flag in (("use_fp8", use_fp8), ("return_recv_hook", return_recv_hook)):
            if flag.__class__ is not bool:
                raise InputError(f"{name}: expected a bool, got {flag!r}")
        if self.pending is not None:
            raise InputError("low_latency_dispatch: the previous low-latency dispatch has not been combined "
                             "(calls alternate dispatch, combine)")
        self._tensor("x", x, tuple(_DTYPES), (None, self.hidden))
        t = x.shape[0]
        if t > self.max_tokens:
            raise InputError(f"x: expected at most max_tokens_per_rank={self.max_tokens} tokens, got {t}")
        self._tensor("topk_idx", topk_idx, (torch.int64,), (t, None))
        k = topk_idx.shape[1]
        if not 1 <= k <= self.max_topk:
            raise InputError(f"topk_idx: expected 1 <= k <= max_topk={self.max_topk}, got k={k}")
        if topk_weights is not None:
            self._tensor("topk_weights", topk_weights, (torch.float32,), (t, k))
        self._engine(x)

        x, topk_idx = _aligned(x), topk_idx.contiguous()
        weights = topk_weights.contiguous() if topk_weights is not None else None
        rows, dev = self.ranks * self.max_tokens, self.device
        if use_fp8:
            recv = (torch.empty(self.per, rows, self.hidden, dtype=torch.float8_e4m3fn, device=dev),
                    torch.empty(self.per, rows, -(-self.hidden // SCALE_GROUP), dtype=torch.float32, device=dev))
        else:
            recv = (torch.empty(self.per, rows, self.hidden, dtype=x.dtype, device=dev),)
        masked_m = torch.empty(self.per, dtype=torch.int32, device=dev)
        recv_counts = torch.empty(self.per, self.ranks, dtype=torch.int32, device=dev)
        slot_index = torch.empty(t, k, dtype=torch.int64, device=dev)
        p = self._params(x, t, k)
        p.topk_idx, p.slot_index, p.out = topk_idx.data_ptr(), slot_index.data_ptr(), recv[0].data_ptr()
        p.masked_m, p.recv_counts = masked_m.data_ptr(), recv_counts.data_ptr()
        if use_fp8:
            p.out_scales = recv[1].data_ptr()
        tensors = (x, topk_idx, slot_index, masked_m, recv_counts, *recv)
        self.calls += 1
        call = self.calls
        handle = LowLatencyHandle(self.buffer_id, call, t, slot_index, recv_counts, weights)
        recv_x = recv if use_fp8 else recv[0]

        def spec(phase):
            return ll.MoeLlDispatchSpec(dtype=_DTYPES[x.dtype], quantize=use_fp8, phase=phase)

        if not return_recv_hook:
            self._launch(spec("both"), p, tensors, "low_latency_dispatch")
            self.pending = (call, True)
            return recv_x, masked_m, handle
        self._launch(spec("send"), p, tensors, "low_latency_dispatch")
        self.pending = (call, False)

        def hook() -> None:
            """Receive this dispatch's rows into recv_x and masked_m (once, before combine)."""
            if self.pending != (call, False):
                raise InputError("recv hook: expected to be called once, after its dispatch and before its combine")
            self._launch(spec("recv"), p, tensors, "low_latency_dispatch (recv hook)")
            self.pending = (call, True)

        return recv_x, masked_m, handle, hook

    def combine(self, y, handle: LowLatencyHandle):
        """y [E_l, R*M, H] bf16 | fp16 (the experts' outputs in recv_x's rows) -> out [T, H] y.dtype."""
        self._ready("low_latency_combine")
        if not isinstance(handle, LowLatencyHandle) or handle.buffer_id != self.buffer_id:
            raise InputError(f"handle: expected the handle of this Buffer's low_latency_dispatch, got {type(handle).__name__}")
        if self.pending != (handle.call, True):
            raise InputError("handle: expected the handle of the latest low_latency_dispatch, received (its recv hook "
                             "called) and not yet combined")
        self._tensor("y", y, tuple(_DTYPES), (self.per, self.ranks * self.max_tokens, self.hidden))
        self._engine(y)
        y = _aligned(y)
        out = torch.empty(handle.num_tokens, self.hidden, dtype=y.dtype, device=self.device)
        p = self._params(y, handle.num_tokens, handle.slot_index.shape[1])
        p.slot_index, p.out, p.recv_counts = handle.slot_index.data_ptr(), out.data_ptr(), handle.recv_counts.data_ptr()
        tensors = (y, out, handle.slot_index, handle.recv_counts)
        if handle.topk_weights is not None:
            p.topk_weights = handle.topk_weights.data_ptr()
            tensors += (handle.topk_weights,)
        spec = ll.MoeLlCombineSpec(dtype=_DTYPES[y.dtype], weighted=handle.topk_weights is not None, phase="both")
        self.pending = None
        self._launch(spec, p, tensors, "low_latency_combine")
        return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, 16-byte aligned (the kernels' 16-byte row accesses)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()
