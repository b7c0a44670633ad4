"""The kernel runtime across real MPI ranks: every rank compiles the same kernel into one
cold cache at the same moment, then runs it on its own (seed + rank) inputs."""
from __future__ import annotations

import os
import tempfile

import torch

import fastmoe_ops as fmo
from fastmoe_ops.ops.fp8_quant import Fp8GroupQuantSpec
from fastmoe_ops.reference import fp8 as ref
from fastmoe_ops.runtime import cache, compiler

from mpi_util import all_agree, comm, need_ranks  # noqa: F401 (comm: a fixture)


def test_ranks_compile_one_kernel_into_one_cold_cache(comm):
    need_ranks(comm, 2)
    root = tempfile.mkdtemp(prefix="fmo-mpi-cache-") if comm.Get_rank() == 0 else None
    root = comm.bcast(root, root=0)
    os.environ["FMO_CACHE_DIR"] = root
    cache.default_cache().clear_memory()
    spec = Fp8GroupQuantSpec(dtype="fp32", group_size=128, vec_width=4, pow2_scale=True)
    comm.Barrier()
    try:
        path = str(compiler.compile_nvcc(spec.stub(), spec.entry_name(), "sm_90a").cubin)
        ok, detail = True, path
    except Exception as e:  # gathered, then asserted on every rank
        ok, detail = False, repr(e)
    finally:
        del os.environ["FMO_CACHE_DIR"]
        cache.default_cache().clear_memory()
    all_agree(comm, ok, detail)
    paths = set(comm.allgather(detail))
    assert len(paths) == 1, f"ranks got different artefacts: {paths}"
    with open(detail, "rb") as f:
        blob = f.read()
    compiler._check_elf(blob, spec.entry_name())


def test_each_rank_runs_the_kernel_on_its_own_data(comm):
    need_ranks(comm, 2)
    rank = comm.Get_rank()
    x = torch.randn(3 + rank, 300, generator=torch.Generator().manual_seed(1000 + rank)) * (rank + 1)
    try:
        xq, xs = fmo.fp8.quantize_per_token_group(x, 128)
        rq, rs = ref.quantize_per_token_group(x, 128)
        ok = torch.equal(xs, rs) and torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
        detail = f"engine {fmo.available_backends()}: {'match' if ok else 'MISMATCH vs reference'}"
    except Exception as e:
        ok, detail = False, repr(e)
    all_agree(comm, ok, detail)
