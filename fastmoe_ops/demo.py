"""A short demo on whatever device exists: `python -m fastmoe_ops.demo`.

Quantises a bf16 activation to FP8 with per-token-group scales through every engine this
machine has, checks each against the PyTorch reference bit for bit, and prints the SM budget.
"""
from __future__ import annotations

import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref


def main() -> int:
    engines = fmo.available_backends()
    print(f"fastmoe-ops {fmo.__version__}: engines here: {', '.join(engines)}")
    budget = fmo.sm_budget()
    print(f"SM budget: {budget.num_sms} SMs{' (simulated Hopper)' if not torch.cuda.is_available() else ''}, "
          f"{budget.comm_sms} reserved for communication, {budget.compute_sms_during_comm} for compute while it runs")
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want_q, want_s = ref.quantize_per_token_group(x, 128)
    for engine in engines:
        if engine == "cuda":
            xq, xs = fmo.fp8.quantize_per_token_group(x.cuda(), 128)
            xq, xs = xq.cpu(), xs.cpu()
        else:
            with fmo.use_backend(engine):
                xq, xs = fmo.fp8.quantize_per_token_group(x, 128)
        same = torch.equal(xs, want_s) and torch.equal(xq.view(torch.uint8), want_q.view(torch.uint8))
        err = ((xq.double() * xs.double().repeat_interleave(128, 1)[:, :1000] - x.double()).abs().max()).item()
        print(f"  {engine:9s} quantize_per_token_group(8x1000 bf16): bit-exact vs reference: {same}; max |x - xq*xs| = {err:.3g}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
