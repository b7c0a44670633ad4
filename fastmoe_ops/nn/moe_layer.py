"""fmo.nn.MoELayer: router -> dispatch -> grouped FP8 experts -> combine, with an optional
two-micro-batch schedule that overlaps one micro-batch's communication with the other's
expert GEMMs, forward and backward.

Router (fp32 whatever the activations' dtype, so every rank and the float64 oracle see the
same logits up to fp32 rounding): logits = x W_r^T [T, E]; scores = softmax or sigmoid;
experts = top-k of (scores + expert_bias) (the bias only steers selection: DeepSeek-V3's
auxiliary-loss-free balancing; `update_expert_bias` applies its sign rule); weights = the
unbiased scores at those experts, optionally normalised to sum 1, times route_scale.
Routing is exposed as `last_topk_idx`: the oracle is run with the experts the layer chose,
so a near-tie decided differently in float64 cannot fail a test.

Dispatch with a group sends x as FP8 (Buffer.dispatch(use_fp8=True): quantised inside the ipc
kernel, or before MPI on the host transport), the very quantisation the experts' first GEMM
would apply, so the forward is unchanged and the bytes on the wire halve (bf16) or quarter
(fp32); x's gradient comes back through the FP8 rows' anchor (fmo.moe.autograd.Fp8Rows).
Experts: fmo.moe.permute (segments aligned for the grouped GEMM) -> moe_experts.grouped_experts
(gate/up grouped GEMM, SiLU*up, down grouped GEMM, all FP8) -> fmo.moe.unpermute (weighted sum
of a row's slots); with num_worst_tokens (static shapes) moe_experts.masked_experts instead:
fixed per-expert slots and masked grouped GEMMs, whose shapes depend on no data.
Host synchronisation on CUDA: the layer's own code has none in the forward (routing, load
counts, weight-cache checks, the schedule: streams and events); the contiguous path's permute
reads its segment sizes on the host (fmo.moe.permute) and its backward reads the expert
offsets for the per-expert wgrad loop; the masked path has neither. The host transport itself
exchanges counts through MPI on the host. Rank r of R owns experts [r*E/R, (r+1)*E/R); with group=None one process
owns them all and nothing is exchanged.

Overlap schedule (overlap=True): the tokens are split in two halves; each half's dispatch (D),
experts (X) and combine (C) run as separate autograd sub-graphs on detached inputs inside one
autograd.Function, submitted to two fastmoe_ops.streams streams:
    comm:    D0  D1  C0  C1          backward:  C0' C1' D0' D1'
    compute:     X0  X1                              X0' X1'
A stage waits for its input through the producer's Pending (an event on CUDA, a join on the
CPU worker), never through the host, so X0 runs while D1 moves and C0 while X1 computes; the
backward interleaves torch.autograd.grad of the sub-graphs the same way. Every MPI call is made
by the comm stream alone, in the same order on every rank. Outputs and the input gradients are
bit-identical to overlap=False (every op on the token path is row-wise, and the router runs on
the whole batch before the split); the expert-weight gradients are sums over two halves, whose
wgrad GEMMs group the tokens differently for FP8 quantisation, so they agree to FP8 rounding
(tests/test_moe_layer.py states the bound).
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..budget import communication_in_flight
from ..errors import expect
from ..moe import Buffer, permute, unpermute
from ..moe.autograd import Fp8Rows, with_nones
from ..ops.fp8_gemm import contiguous_alignment
from .. import streams as fs
from .. import trace as ft
from . import moe_experts
from ._fp8_weight_cache import Fp8WeightCache

# One (comm, compute) pair per device, shared by every layer: each rank's MPI calls then
# leave from a single FIFO (the same order on every rank, whatever the number of layers),
# and a model with many layers does not start two worker threads per layer.
_STREAMS: dict = {}


def streams_for(device: torch.device):
    """The (comm, compute) streams of `device`, made on first use."""
    key = str(device)
    if key not in _STREAMS:
        _STREAMS[key] = (fs.Stream(device, role="comm"), fs.Stream(device, role="compute"))
    return _STREAMS[key]


def _host_span(name: str):
    """A host interval in the trace (the MPI exchange of the host transport)."""
    return ft.host_interval(name) if ft.enabled() else contextlib.nullcontext()


class MoELayer(torch.nn.Module):
    """y [..., H] = sum over the top-k routed experts of w * expert(x), x [..., H].

    hidden H and intermediate I: multiples of 16; num_experts E: a multiple of the group's size.
    group: a fastmoe_ops.comm.Group (expert parallel) or None (one process, every expert).
    scoring 'softmax' | 'sigmoid'; normalize_topk: weights / their sum; route_scale: factor.
    expert_bias: keep an [E] selection bias (auxiliary-loss-free balancing).
    overlap: two-micro-batch overlap of communication and expert compute: True, False, or
    'auto' (default): overlap only where it pays, i.e. transport='ipc' with CUDA tensors and a
    group, where the communication kernels run on their own reserved SMs. Elsewhere (the host
    transport, the CPU simulator) both micro-batches compete for the same cores and the split
    only adds work, so 'auto' runs sequentially (bench/README.md, "Why overlap loses on a CPU").
    num_worst_tokens, transport, max_tokens_per_rank (and device: where transport='ipc' maps its
    buffers): passed to fmo.moe.Buffer; num_worst_tokens > 0
    also selects the static-shape experts (moe_experts.masked_experts: per-expert slots of fixed
    size, masked grouped GEMMs, no host synchronisation), with or without a group.
    Parameters: router_weight [E, H] fp32; w13 [E_local, 2I, H] and w2 [E_local, H, I] in dtype."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, group=None,
                 scoring: str = "softmax", normalize_topk: bool = False, route_scale: float = 1.0,
                 expert_bias: bool = False, overlap: bool | str = "auto", num_worst_tokens: int = 0, transport: str = "host",
                 max_tokens_per_rank: int = 0, dtype=torch.bfloat16, device=None):
        super().__init__()
        expect(isinstance(hidden, int) and hidden > 0 and hidden % 16 == 0, "hidden", "a positive multiple of 16 (GEMM K)", hidden)
        expect(isinstance(intermediate, int) and intermediate > 0 and intermediate % 16 == 0, "intermediate",
               "a positive multiple of 16 (GEMM K)", intermediate)
        ranks = group.size if group is not None else 1
        expect(isinstance(num_experts, int) and num_experts > 0 and num_experts % ranks == 0, "num_experts",
               f"a positive multiple of the group size {ranks}", num_experts)
        expect(isinstance(top_k, int) and 1 <= top_k <= num_experts, "top_k", f"an int in [1, {num_experts}]", top_k)
        expect(scoring in ("softmax", "sigmoid"), "scoring", "'softmax' or 'sigmoid'", repr(scoring))
        expect(overlap in (True, False, "auto"), "overlap", "True, False or 'auto'", repr(overlap))
        expect(dtype in (torch.bfloat16, torch.float32), "dtype", "torch.bfloat16 or torch.float32", dtype)
        self.hidden, self.intermediate, self.num_experts, self.top_k = hidden, intermediate, num_experts, top_k
        self.scoring, self.normalize_topk, self.route_scale, self.overlap = scoring, normalize_topk, float(route_scale), overlap
        self.group, self.rank = group, (group.rank if group is not None else 0)
        self.transport = transport
        self.static_shapes = num_worst_tokens > 0
        self.num_local_experts = num_experts // ranks
        self.router_weight = torch.nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=torch.float32))
        self.w13 = torch.nn.Parameter(torch.empty(self.num_local_experts, 2 * intermediate, hidden, device=device, dtype=dtype))
        self.w2 = torch.nn.Parameter(torch.empty(self.num_local_experts, hidden, intermediate, device=device, dtype=dtype))
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device) if expert_bias else None)
        self.register_buffer("expert_load", torch.zeros(num_experts, device=device))
        self.buffer = None
        if group is not None:
            # transport='ipc': the Buffer's mapped memory on the layer's device when one is given
            # (else the Buffer's default, the current GPU where there is one: layers built on
            # the CPU and then moved there with .to() find it)
            self.buffer = Buffer(group, hidden=hidden, num_experts=num_experts, num_worst_tokens=num_worst_tokens,
                                 transport=transport, max_tokens_per_rank=max_tokens_per_rank, max_topk=top_k,
                                 device=device)
        self._fp8_cache = {name: Fp8WeightCache(moe_experts.quantize_expert_weights) for name in ("w13", "w2")}
        self.last_topk_idx = self.last_topk_weights = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Seeded alike on every rank by the caller; each rank then holds its experts' slice.
        bound = 1 / math.sqrt(self.hidden)
        torch.nn.init.uniform_(self.router_weight, -bound, bound)
        torch.nn.init.uniform_(self.w13, -bound, bound)
        torch.nn.init.uniform_(self.w2, -1 / math.sqrt(self.intermediate), 1 / math.sqrt(self.intermediate))

    @torch.no_grad()
    def load_global_weights(self, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy in weights of every expert ([E, 2I, H], [E, H, I]); this rank keeps its own."""
        lo, hi = self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts
        expect(tuple(w13.shape) == (self.num_experts, 2 * self.intermediate, self.hidden), "w13",
               f"shape {(self.num_experts, 2 * self.intermediate, self.hidden)}", tuple(w13.shape))
        expect(tuple(w2.shape) == (self.num_experts, self.hidden, self.intermediate), "w2",
               f"shape {(self.num_experts, self.hidden, self.intermediate)}", tuple(w2.shape))
        self.router_weight.copy_(router_weight)
        self.w13.copy_(w13[lo:hi])
        self.w2.copy_(w2[lo:hi])

    def destroy(self) -> None:
        """Free the Buffer (its communicator and shared memory)."""
        if self.buffer is not None:
            self.buffer.destroy()

    # ------------------------------------------------------------------ router
    def route(self, x: torch.Tensor):
        """x [T, H] -> (topk_idx [T, k] int64, topk_weights [T, k] fp32, differentiable)."""
        logits = torch.nn.functional.linear(x.float(), self.router_weight)           # [T, E] fp32
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        select = scores.detach() if self.expert_bias is None else scores.detach() + self.expert_bias
        topk_idx = select.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, topk_idx)
        if self.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        return topk_idx, weights * self.route_scale

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> torch.Tensor:
        """Auxiliary-loss-free balancing step: bias += rate * sign(mean load - load) with the
        load summed over every rank since the last call (collective). Returns that load [E]."""
        expect(self.expert_bias is not None, "update_expert_bias", "a layer built with expert_bias=True", "expert_bias=False")
        load = self.expert_load.clone()
        if self.group is not None:
            load = torch.as_tensor(sum(self.group.allgather(load.cpu().numpy(), "update_expert_bias")), device=load.device)
        self.expert_bias.add_(rate * torch.sign(load.mean() - load))
        self.expert_load.zero_()
        return load

    # ------------------------------------------------------------------ stages
    def _fp8_weights(self):
        """(w13, w2) quantised per expert and 128x128 block, refreshed when a weight changes."""
        return [self._fp8_cache[name].get(getattr(self, name)) for name in ("w13", "w2")]

    def _dispatch(self, x, topk_idx, weights):
        """-> (recv_x, recv_topk_idx, recv_weights, handle)."""
        if self.buffer is None:
            return x, topk_idx, weights, None
        with _host_span("dispatch"):   # the expert GEMMs read FP8 x: it travels as FP8 (Fp8Rows)
            recv_x, recv_idx, recv_w, _, handle = self.buffer.dispatch(x, topk_idx, weights, use_fp8=True)
        return recv_x, recv_idx, recv_w, handle

    def _experts(self, recv_x, recv_idx, recv_w, w13, w2, fp8):
        if self.static_shapes:   # fixed [E, Mmax, H] slots, counts on the device: no host sync
            return moe_experts.masked_experts(recv_x, recv_idx, recv_w, w13, w2, *fp8)
        x_sorted, pmap = permute(recv_x, recv_idx, self.num_local_experts, alignment=contiguous_alignment())
        y_sorted = moe_experts.grouped_experts(x_sorted, pmap, w13, w2, *fp8)
        return unpermute(y_sorted, pmap, recv_w)

    def _combine(self, y, handle):
        if self.buffer is None:
            return y
        with _host_span("combine"):
            return self.buffer.combine(y, handle)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == self.hidden, "x",
               f"a tensor [..., {self.hidden}]", lambda: tuple(getattr(x, "shape", ())))
        expect(x.dtype == self.w13.dtype, "x", f"dtype {self.w13.dtype} (the layer's dtype)", x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden).contiguous()
        topk_idx, weights = self.route(x2)
        self.last_topk_idx, self.last_topk_weights = topk_idx.detach(), weights.detach()
        with torch.no_grad():   # per-expert load for the bias rule (scatter_add_: no host sync)
            idx = topk_idx.reshape(-1)
            self.expert_load.scatter_add_(0, idx, torch.ones_like(idx, dtype=self.expert_load.dtype))
        fp8 = self._fp8_weights()
        if self.overlaps(x2.device):
            record = torch.is_grad_enabled() and any(t.requires_grad for t in (x2, weights, self.w13, self.w2))
            out = _TwoBatchFn.apply(x2, weights, self.w13, self.w2, _Schedule(self, topk_idx, fp8, x2.device, record))
        else:
            recv_x, recv_idx, recv_w, handle = self._dispatch(x2, topk_idx, weights)
            out = self._combine(self._experts(recv_x, recv_idx, recv_w, self.w13, self.w2, fp8), handle)
        return out.reshape(*lead, self.hidden)

    def overlaps(self, device: torch.device) -> bool:
        """Whether a forward on tensors on `device` runs the two-micro-batch schedule: overlap
        as given, or for 'auto' only with a group on the ipc transport with CUDA tensors."""
        if self.overlap == "auto":
            return self.group is not None and self.transport == "ipc" and torch.device(device).type == "cuda"
        return bool(self.overlap)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, intermediate={self.intermediate}, experts={self.num_experts} "
                f"({self.num_local_experts} local), top_k={self.top_k}, scoring={self.scoring}, overlap={self.overlap}, fp8=e4m3")


def _leaf(t):
    """A stage's input, cut from the previous stage's graph (each stage is its own sub-graph);
    FP8 rows: their gradient anchor is the cut (the pair carries no gradient)."""
    if isinstance(t, Fp8Rows):
        rows = Fp8Rows(t)
        rows.grad_anchor = t.grad_anchor.detach().requires_grad_()
        return rows
    return None if t is None else t.detach().requires_grad_()


def _differentiable(t):
    """What a stage differentiates for `t`: t, or FP8 rows' gradient anchor."""
    return t.grad_anchor if isinstance(t, Fp8Rows) else t


def _grad(outputs, inputs, grads):
    """torch.autograd.grad over one stage's sub-graph; None where an input is unused."""
    outputs, inputs = [_differentiable(o) for o in outputs], [_differentiable(i) for i in inputs]
    pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and o.requires_grad and g is not None]
    wanted = [i for i in inputs if i is not None]
    if not pairs:
        got = [None] * len(wanted)
    else:
        got = list(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    it = iter(got)
    return [next(it) if i is not None else None for i in inputs]


def _cuda_handoff(tensors, producer):
    """CUDA only, inside a stage: this stage's stream first waits for `producer` (the
    caller's stream, whose work made the tensors), and the caching allocator is told the
    tensors are used on this stream too (record_stream), so their memory is not handed to
    new work on the producing stream while this stream may still read it."""
    if producer is None:
        return
    here = torch.cuda.current_stream(producer.device)
    here.wait_stream(producer)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(here)


def _used_here(*tensors):
    """CUDA: tensors made on another stream and read on the current one (see _cuda_handoff);
    a pair (FP8 rows) counts as its tensors."""
    for t in tensors:
        if isinstance(t, tuple):
            _used_here(*t)
        elif isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(torch.cuda.current_stream(t.device))


class _Schedule:
    """One call's two micro-batches: their sub-graphs, built in forward and differentiated in
    backward, each stage on its stream.

    Host submission order: D0 X0 D1 X1 C0 C1 (backward: C0' X0' C1' X1' D0' D1'). On the CPU
    each stream's worker runs its own items in order (comm: D0 D1 C0 C1); on CUDA `submit`
    runs a stage on the host at once, and the host transport blocks the host during its MPI
    exchange, so queueing X0's kernels before D1 is what lets the GPU compute under D1.
    The whole schedule holds `communication_in_flight()`: compute kernels launched in it
    size persistent grids to num_sms - comm_sms (fmo.sm_budget().compute_sms)."""

    def __init__(self, layer: MoELayer, topk_idx, fp8, device, record: bool):
        self.layer, self.topk_idx, self.fp8, self.record = layer, topk_idx, fp8, record
        self.comm, self.compute = streams_for(device)
        self.caller = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def forward(self, x, weights, w13, w2):
        layer, n, caller = self.layer, x.shape[0], self.caller
        cut = (n + 1) // 2
        self.bounds = [(0, cut), (cut, n)]
        leaf = _leaf if self.record else (lambda t: t)   # sub-graphs only when a backward will come

        def dispatch(lo, hi):
            _cuda_handoff((x, weights, self.topk_idx), caller)
            with torch.set_grad_enabled(self.record):
                xi, wi = leaf(x[lo:hi]), leaf(weights[lo:hi])
                recv_x, recv_idx, recv_w, handle = layer._dispatch(xi, self.topk_idx[lo:hi], wi)
                return dict(x=xi, w=wi, recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, handle=handle)

        def experts(d_pending):
            d = d_pending.result()
            _used_here(d["recv_x"], d["recv_idx"], d["recv_w"])
            _cuda_handoff((w13, w2, *self.fp8[0], *self.fp8[1]), caller)
            with torch.set_grad_enabled(self.record), _host_span("experts"):
                rx, rw = leaf(d["recv_x"]), leaf(d["recv_w"])
                a13, a2 = leaf(w13), leaf(w2)
                y = layer._experts(rx, d["recv_idx"], rw, a13, a2, self.fp8)
                return dict(recv_x=rx, recv_w=rw, w13=a13, w2=a2, y=y)

        def combine(e_pending, d_pending):
            e, d = e_pending.result(), d_pending.result()
            _used_here(e["y"])
            with torch.set_grad_enabled(self.record):
                yi = leaf(e["y"])
                return dict(y=yi, out=layer._combine(yi, d["handle"]))

        with communication_in_flight():
            d, e = [], []
            for lo, hi in self.bounds:
                d.append(self.comm.submit(dispatch, lo, hi))
                e.append(self.compute.submit(experts, d[-1]))
            c = [self.comm.submit(combine, e[i], d[i]) for i in range(2)]
            self.stages = [(d[i].result(), e[i].result(), c[i].result()) for i in range(2)]
        outs = [s[2]["out"].detach() for s in self.stages]
        _used_here(*outs)
        if not self.record:
            self.stages = None
        return torch.cat(outs)

    def backward(self, dout):
        caller = self.caller

        def combine_bw(i):
            d, e, c = self.stages[i]
            lo, hi = self.bounds[i]
            _cuda_handoff((dout,), caller)
            with _host_span("combine backward"):
                return _grad([c["out"]], [c["y"]], [dout[lo:hi]])[0]

        def experts_bw(i, dy_pending):
            d, e, c = self.stages[i]
            dy = dy_pending.result()
            _used_here(dy)
            with _host_span("experts backward"):
                return _grad([e["y"]], [e["recv_x"], e["recv_w"], e["w13"], e["w2"]], [dy])

        def dispatch_bw(i, e_pending):
            d, e, c = self.stages[i]
            drx, drw, _, _ = e_pending.result()
            _used_here(drx, drw)
            with _host_span("dispatch backward"):
                return _grad([d["recv_x"], d["recv_w"]], [d["x"], d["w"]], [drx, drw])

        with communication_in_flight():
            cb, eb = [], []
            for i in range(2):
                cb.append(self.comm.submit(combine_bw, i))
                eb.append(self.compute.submit(experts_bw, i, cb[-1]))
            db = [self.comm.submit(dispatch_bw, i, eb[i]) for i in range(2)]
            ex = [p.result() for p in eb]
            dx = [p.result() for p in db]
        self.stages = None   # free the sub-graphs
        for grads in ex + dx:
            _used_here(*grads)

        def cat(parts, like):
            return torch.cat([p if p is not None else torch.zeros_like(like[lo:hi])
                              for p, (lo, hi) in zip(parts, self.bounds)])

        def total(a, b):  # fixed order: half 0 then half 1
            return a if b is None else (b if a is None else a + b)

        return (cat([g[0] for g in dx], self.x_like), cat([g[1] for g in dx], self.w_like),
                total(ex[0][2], ex[1][2]), total(ex[0][3], ex[1][3]))


class _TwoBatchFn(torch.autograd.Function):
    """x [T, H], topk_weights [T, k], w13, w2 -> out [T, H] through the two-micro-batch schedule."""

    @staticmethod
    def forward(ctx, x, weights, w13, w2, schedule):
        schedule.x_like, schedule.w_like = x.detach(), weights.detach()
        ctx.schedule = schedule
        return schedule.forward(x, weights, w13, w2)

    @staticmethod
    def backward(ctx, dout):
        return with_nones(_TwoBatchFn, *ctx.schedule.backward(dout.contiguous()))
