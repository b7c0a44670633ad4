"""No module of fastmoe_ops/moe/ or fastmoe_ops/comm/ imports the simulator package: the
runtime's engine switch (fastmoe_ops.runtime / backends) is the one door to it, so the
MoE data path runs the same code on `cuda` and `sim`. Static: every import statement,
at any depth (functions included), absolute or relative."""
from __future__ import annotations

import ast
from pathlib import Path

import fastmoe_ops

PACKAGE = Path(fastmoe_ops.__file__).parent
CHECKED = ("moe", "comm")


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, a module of `package`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]   # from .. import sim
    return found


def test_resolver_sees_relative_and_nested_imports(tmp_path):
    """The check can fail: relative, nested and `from .. import sim` forms all resolve."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..sim import compile\n    from .. import sim\nimport fastmoe_ops.sim.launch\n")
    names = [m for _, m in imported_modules(probe, "fastmoe_ops.moe")]
    assert "fastmoe_ops.sim" in names and "fastmoe_ops.sim.compile" in names and "fastmoe_ops.sim.launch" in names


def test_moe_and_comm_do_not_import_the_simulator():
    files = sorted(p for sub in CHECKED for p in (PACKAGE / sub).rglob("*.py"))
    assert files, f"no modules under {CHECKED}"
    bad = [f"{p.relative_to(PACKAGE)}:{line}: {m}" for p in files
           for line, m in imported_modules(p, ".".join(("fastmoe_ops",) + p.relative_to(PACKAGE).parent.parts))
           if m == "fastmoe_ops.sim" or m.startswith("fastmoe_ops.sim.")]
    assert not bad, "imports of fastmoe_ops.sim (go through the runtime's engine switch):\n" + "\n".join(bad)
