"""The README's dispatch -> experts -> combine example runs as written under mpirun -n 4
on a CPU-only machine, and its layer equals the same layer computed densely."""
from __future__ import annotations

from mpi_util import all_agree, need_ranks

# Verbatim the README's example (section "MoE: dispatch -> experts -> combine").
EXAMPLE = '''
import torch
from mpi4py import MPI
import fastmoe_ops as fmo

group = fmo.comm.Group(MPI.COMM_WORLD)
T, H, E, K = 64, 256, 16, 4            # tokens on this rank, hidden size, experts, top-k
E_local = E // group.size              # rank r owns experts [r*E_local, (r+1)*E_local)
W = torch.randn(E, H, H, generator=torch.Generator().manual_seed(0)) / H**0.5  # same on every rank
my_W = W[group.rank * E_local:(group.rank + 1) * E_local]

torch.manual_seed(1 + group.rank)
x = torch.randn(T, H, requires_grad=True)
topk_weights, topk_idx = torch.randn(T, E).softmax(-1).topk(K, dim=-1)  # the router

buf = fmo.moe.Buffer(group, hidden=H, num_experts=E)
# Dispatch: each token goes once to every rank that owns one of its experts.
recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = buf.dispatch(x, topk_idx, topk_weights)
# Experts: group the rows by local expert, one matmul per expert, weight and sum back per row.
x_sorted, pmap = fmo.moe.permute(recv_x, recv_topk_idx, E_local)
off = pmap.expert_offsets.tolist()
y_sorted = torch.cat([x_sorted[off[e]:off[e + 1]] @ my_W[e] for e in range(E_local)])
y = fmo.moe.unpermute(y_sorted, pmap, recv_topk_weights)
# Combine: every token's partial results come home, summed in ascending rank order.
out = buf.combine(y, handle)
out.square().sum().backward()          # autograd runs back through combine, experts and dispatch

dense = torch.einsum("tk,th,tkho->to", topk_weights, x, W[topk_idx])  # the same layer, one process
print(f"rank {group.rank}: {recv_x.shape[0]} tokens received, {tokens_per_expert.tolist()} per local expert, "
      f"max |out - dense| = {(out - dense).abs().max().item():.1e}, x.grad {tuple(x.grad.shape)}")
buf.destroy()
'''


def test_readme_example_runs_and_matches_dense(comm):
    need_ranks(comm, 2)
    ns: dict = {}
    try:
        exec(compile(EXAMPLE, "README example", "exec"), ns)
        err = (ns["out"] - ns["dense"]).abs().max().item()
        ok = err < 1e-4 and ns["x"].grad is not None and not ns["buf"].alive
        detail = f"max |out - dense| = {err:.1e}"
    except Exception as e:
        ok, detail = False, f"{type(e).__name__}: {e}"
    all_agree(comm, ok, detail)
