"""The README's dispatch -> experts -> combine example runs as written under mpirun -n 4
on a CPU-only machine, and its layer equals the same layer computed densely."""
from __future__ import annotations

import re
from pathlib import Path

from mpi_util import all_agree, comm, need_ranks  # noqa: F401 (comm: a fixture)

# The README's example, read from the README itself so the two cannot drift apart.
_README = Path(__file__).resolve().parents[2] / "README.md"
_SECTION = _README.read_text().split("## MoE: dispatch -> experts -> combine", 1)[1]
EXAMPLE = re.search(r"```python\n(.*?)```", _SECTION, re.S).group(1)


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
