"""Where tests live, read from each test file's syntax tree (nothing is imported or run):

1. Every test that needs a CUDA device is in tests/gpu/, the folder `bench/gpu_check.sh`
   runs whole, so no GPU test goes unrun on the one-shot check (the first H200 run never ran
   the CUDA cases then spread over tests/).
2. No test file imports another test file: shared helpers live in helper modules
   (tests/*_util.py, tests/fp8_contract.py, tests/ptx_cases/, tests/gpu/gpu_util.py,
   tests/mpi/mpi_util.py, conftest.py).

A test needs CUDA when it, its class, the module's top-level code (pytestmark included) or a
helper of the same file that it names (transitively; fixtures by parameter name)
- is marked `gpu`, or the file imports tests/gpu's helper module gpu_util;
- is skipped unless CUDA is there: `skipif(<no CUDA>)`, `pytest.skip` under `if <no CUDA>:`,
  `pytest.importorskip("cupy")`, where <no CUDA> is `not torch.cuda.is_available()`,
  `"cuda" not in ...` (available_backends) or `torch.cuda.device_count() < n`;
- uses a device: `.cuda(...)`, `torch.cuda.<anything but is_available / device_count>`, or
  the string "cuda" / "cuda:N" passed to a call (device=, .to(), torch.device, Stream,
  engine=) or assigned to a name.
Not counted: code that runs only without CUDA (the body of `if <no CUDA>:`, the else of
`if <CUDA>:`, a test skipped where CUDA is: `skipif(torch.cuda.is_available())`), and code
inside `with pytest.raises(...)`: a refusal checked on every machine (one that needed CUDA
would fail there, on CPU CI, instead of hiding).

tests/mpi: multi-rank tests run only under mpirun, with tests/mpi's fixtures (comm,
need_ranks, run_all), so a multi-rank CUDA test may stay there on one condition: the
multi-rank step of bench/gpu_check.sh names it (`path` or `path::test`), so the one-shot
check still runs it.
"""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GPU_CHECK = TESTS.parent / "bench" / "gpu_check.sh"
PROBES = {"is_available", "device_count"}           # torch.cuda.X that only ask
DEVICE = re.compile(r"cuda(:\d+)?")


# ------------------------------------------------------------------------ the analysis


def _dotted(node) -> str:
    """'torch.cuda.is_available' for a Name/Attribute chain, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _is_call(node, suffix: str) -> bool:
    return isinstance(node, ast.Call) and (_dotted(node.func) == suffix or _dotted(node.func).endswith("." + suffix))


def cuda_condition(node) -> str | None:
    """'absent' for a condition true where CUDA is missing, 'present' for one true where it
    is there, None for anything else."""
    flip = {"absent": "present", "present": "absent", None: None}
    if _is_call(node, "cuda.is_available"):
        return "present"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return flip[cuda_condition(node.operand)]
    if isinstance(node, ast.BoolOp):
        kinds = [cuda_condition(v) for v in node.values]
        want = "absent" if isinstance(node.op, ast.Or) else "present"   # skipif(no_cuda or x) still needs CUDA
        return want if want in kinds else None
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        op, left = node.ops[0], node.left
        if isinstance(left, ast.Constant) and left.value == "cuda" and isinstance(op, (ast.In, ast.NotIn)):
            return "present" if isinstance(op, ast.In) else "absent"
        if _is_call(left, "cuda.device_count"):
            return "absent" if isinstance(op, (ast.Lt, ast.LtE, ast.Eq)) else "present"
    return None


def _mark_reasons(node, assigned: dict) -> tuple[list[str], bool]:
    """(why a decorator / pytestmark value needs CUDA, whether it skips where CUDA is there)."""
    reasons, cpu_only = [], False
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in assigned:   # @SIM where SIM = pytest.mark.skipif(...)
            more, cpu = _mark_reasons(assigned[sub.id], {})
            reasons += more
            cpu_only |= cpu
        if isinstance(sub, ast.Attribute) and sub.attr == "gpu" and _dotted(sub.value).endswith("mark"):
            reasons.append(f"line {sub.lineno}: marked gpu")
        if _is_call(sub, "mark.skipif") and sub.args:
            kind = cuda_condition(sub.args[0])
            if kind == "absent":
                reasons.append(f"line {sub.lineno}: skipped unless CUDA is there")
            cpu_only |= kind == "present"
    return reasons, cpu_only


class _Uses(ast.NodeVisitor):
    """CUDA uses in a piece of code, and the names it refers to; `assigned` resolves module
    names used as decorators (@SIM where SIM = pytest.mark.skipif(...))."""

    def __init__(self, assigned: dict):
        self.assigned = assigned
        self.reasons: list[str] = []
        self.names: set[str] = set()

    def visit_FunctionDef(self, node):
        marks, cpu_only = _mark_reasons(ast.Module(body=list(node.decorator_list), type_ignores=[]), self.assigned)
        if not cpu_only:   # a test skipped where CUDA is never runs with it
            self.reasons += marks
            params = node.args.args if hasattr(node, "args") else node.bases
            for part in [*node.decorator_list, *params, *node.body]:
                self.visit(part)

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_arg(self, node):   # a parameter names a fixture
        self.names.add(node.arg)

    def visit_If(self, node):
        kind = cuda_condition(node.test)
        if kind == "absent" and any(_is_call(s, "skip") for b in node.body for s in ast.walk(b)):
            self.reasons.append(f"line {node.lineno}: pytest.skip unless CUDA is there")
        for part in ([] if kind == "absent" else node.body) + ([] if kind == "present" else node.orelse):
            self.visit(part)

    def visit_With(self, node):
        if not any(_is_call(item.context_expr, "raises") for item in node.items):
            self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            self.reasons.append(f"line {node.lineno}: .cuda()")
        if _is_call(node, "importorskip") and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).startswith("cupy"):
            self.reasons.append(f"line {node.lineno}: importorskip('cupy')")
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and DEVICE.fullmatch(arg.value):
                self.reasons.append(f"line {node.lineno}: {arg.value!r} passed to {_dotted(node.func) or 'a call'}")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        parts = _dotted(node).split(".")
        if parts[:2] == ["torch", "cuda"] and len(parts) == 3 and parts[2] not in PROBES:
            self.reasons.append(f"line {node.lineno}: torch.cuda.{parts[2]}")
        self.generic_visit(node)

    def visit_Assign(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) and DEVICE.fullmatch(node.value.value):
            self.reasons.append(f"line {node.lineno}: {node.value.value!r} assigned")
        self.generic_visit(node)

    def visit_Name(self, node):
        self.names.add(node.id)


def cuda_tests(source: str) -> dict[str, list[str]]:
    """{test (or Test class) name: why it needs CUDA} for one test file's source."""
    tree = ast.parse(source)
    assigned = {t.id: s.value for s in tree.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)}
    defs = {s.name: s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    is_test = lambda name: name.startswith(("test_", "Test"))   # noqa: E731

    def uses(nodes) -> _Uses:
        u = _Uses(assigned)
        for n in nodes:
            u.visit(n)
        return u

    module = uses([s for s in tree.body if s.__class__ not in (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)]).reasons
    module += [f"line {s.lineno}: imports tests/gpu's gpu_util" for s in ast.walk(tree)
               if isinstance(s, (ast.Import, ast.ImportFrom)) and "gpu_util" in _imported_modules(s)]
    marks, module_cpu_only = _mark_reasons(assigned["pytestmark"], assigned) if "pytestmark" in assigned else ([], False)
    if module_cpu_only:
        return {}
    module += marks
    helpers = {name: uses([d]) for name, d in defs.items() if not is_test(name)}
    reasons = {name: list(u.reasons) for name, u in helpers.items()}
    changed = True
    while changed:   # a helper naming a helper that uses CUDA uses it too
        changed = False
        for name, u in helpers.items():
            via = [f"via {n}()" for n in sorted(u.names & helpers.keys() - {name}) if reasons[n]]
            if via and not reasons[name]:
                reasons[name], changed = via, True
    found = {}
    for name, d in defs.items():
        if is_test(name):
            u = uses([d])
            via = [f"via {n}: {reasons[n][0]}" for n in sorted(u.names & helpers.keys()) if reasons[n]]
            why = list(dict.fromkeys(module + u.reasons + via))
            if why:
                found[name] = why
    return found


def _imported_modules(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[-1] for a in node.names]
    if node.module and node.module.split(".")[-1] != "tests":
        return [node.module.split(".")[-1]]
    return [a.name for a in node.names]   # from tests import test_x / from . import test_x


def imported_test_modules(source: str) -> set[str]:
    """The test modules (test_*) a file imports, anywhere in it."""
    return {m for s in ast.walk(ast.parse(source)) if isinstance(s, (ast.Import, ast.ImportFrom))
            for m in _imported_modules(s) if m.startswith("test_")}


def named_in_gpu_check(text: str) -> set[str]:
    return set(re.findall(r"tests/[\w/]+\.py(?:::\w+)?", text))


def violations(tests_dir: Path, gpu_check_text: str) -> list[str]:
    """Every CUDA test outside tests/gpu (tests/mpi: unless the one-shot check names it)."""
    run_by_check = named_in_gpu_check(gpu_check_text)
    out = []
    for path in sorted(tests_dir.rglob("test_*.py")):
        rel = path.relative_to(tests_dir.parent).as_posix()
        if tests_dir / "gpu" in path.parents:
            continue
        in_mpi = tests_dir / "mpi" in path.parents
        for name, reasons in cuda_tests(path.read_text()).items():
            if in_mpi and (rel in run_by_check or f"{rel}::{name}" in run_by_check):
                continue
            where = "tests/mpi, not named in bench/gpu_check.sh" if in_mpi else "outside tests/gpu"
            out.append(f"{rel}::{name} needs CUDA ({'; '.join(reasons)}) but lives {where}")
    return out


def imports_between_tests(tests_dir: Path) -> set[tuple[str, str]]:
    return {(path.relative_to(tests_dir.parent).as_posix(), m) for path in sorted(tests_dir.rglob("test_*.py"))
            for m in imported_test_modules(path.read_text())}


# ------------------------------------------------------------------------ the checks


def test_every_cuda_test_lives_in_tests_gpu():
    found = violations(TESTS, GPU_CHECK.read_text())
    assert not found, "move these under tests/gpu/ (shared helpers into tests/gpu/gpu_util.py):\n" + "\n".join(found)


def test_tests_gpu_holds_the_cuda_tests():
    """The analysis sees the CUDA tests where they are (so the check above is not vacuous)."""
    for name in ("test_streams_gpu.py", "test_trace_gpu.py", "test_attention_gpu.py", "test_fp8_gpu.py"):
        assert cuda_tests((TESTS / "gpu" / name).read_text()), f"tests/gpu/{name}: no CUDA test recognised"


def test_no_test_file_imports_another():
    found = sorted(imports_between_tests(TESTS))
    assert not found, ("test files import test files (move the helpers into a helper module, e.g. "
                       "tests/<area>_util.py):\n" + "\n".join(f"{a} imports {b}" for a, b in found))


# --------------------------------------------------------------- the checks can fail

PLANTED = {
    "device keyword": 'def test_a():\n    torch.ones(3, device="cuda")\n',
    "to cuda:1": 'def test_a():\n    x = torch.ones(3).to("cuda:1")\n',
    ".cuda() in a helper": 'def put(x):\n    return x.cuda()\n\ndef move(x):\n    return put(x)\n\n'
                           'def test_a():\n    move(torch.ones(3))\n',
    "fixture": '@pytest.fixture\ndef dev():\n    return torch.device("cuda")\n\ndef test_a(dev):\n    pass\n',
    "torch.cuda call": 'def test_a():\n    torch.cuda.synchronize()\n',
    "mark.gpu": 'pytestmark = pytest.mark.gpu\n\ndef test_a():\n    pass\n',
    "skipif no cuda": '@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu")\ndef test_a():\n    pass\n',
    "skipif backends": 'NEEDS = pytest.mark.skipif("cuda" not in fmo.available_backends(), reason="gpu")\n\n'
                       '@NEEDS\ndef test_a():\n    pass\n',
    "skip in body": 'def test_a():\n    if not torch.cuda.is_available():\n        pytest.skip("gpu")\n',
    "module device": 'DEV = "cuda"\n\ndef test_a():\n    pass\n',
    "gpu_util": 'from gpu_util import DEV\n\ndef test_a():\n    pass\n',
    "cupy": 'def test_a():\n    pytest.importorskip("cupy")\n',
    "test class": 'class TestX:\n    def test_a(self):\n        torch.zeros(1, device="cuda:0")\n',
}
CLEAN = {
    "cpu-only branch and refusal": 'def test_a():\n    if not torch.cuda.is_available():\n'
                                   '        with pytest.raises(BackendError):\n            Stream("cuda:0")\n',
    "skipped where CUDA is": '@pytest.mark.skipif(torch.cuda.is_available(), reason="cpu")\ndef test_a():\n'
                             '    Stream("cuda")\n',
    "probes only": 'def test_a():\n    assert "cuda" not in fmo.available_backends() and torch.cuda.device_count() >= 0\n',
    "unused helper": 'class Runner:\n    engine = "cuda"\n    def run(self, a):\n        return a.cuda()\n\n'
                     'def test_a():\n    assert x.device.type != "cuda"\n',
    "refusal": 'def test_a():\n    with pytest.raises(InputError):\n        with use_backend("cuda"):\n            pass\n',
}


def _plant(tmp_path, rel: str, source: str) -> Path:
    tests = tmp_path / "tests"
    path = tests / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return tests


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_cuda_test_outside_tests_gpu_fails(tmp_path, case):
    tests = _plant(tmp_path, "test_planted.py", PLANTED[case])
    found = violations(tests, "")
    assert len(found) == 1 and found[0].startswith("tests/test_planted.py::") and "outside tests/gpu" in found[0], found
    tests = _plant(tmp_path / "ok", "gpu/test_planted.py", PLANTED[case])
    assert violations(tests, "") == [], "the same test under tests/gpu is where it belongs"


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_cpu_tests_that_mention_cuda_pass(tmp_path, case):
    assert violations(_plant(tmp_path, "test_clean.py", CLEAN[case]), "") == []


def test_mpi_cuda_test_must_be_named_by_the_gpu_check(tmp_path):
    tests = _plant(tmp_path, "mpi/test_ranks.py", PLANTED["device keyword"] + "\ndef test_cpu():\n    pass\n")
    found = violations(tests, "mpirun -n 2 pytest tests/gpu/test_moe_gpu.py")
    assert len(found) == 1 and "tests/mpi/test_ranks.py::test_a" in found[0] and "not named" in found[0], found
    assert violations(tests, 'pytest "tests/mpi/test_ranks.py::test_a" -q') == []
    assert violations(tests, "pytest tests/mpi/test_ranks.py -q") == []


def test_a_planted_test_import_fails(tmp_path):
    tests = _plant(tmp_path, "test_one.py", "from test_two import helper\nfrom conftest import poison_\n"
                                            "import attention_util\n\ndef test_a():\n    import test_three\n")
    _plant(tmp_path, "gpu/test_four.py", "from tests import test_one\nfrom gpu_util import DEV\n")
    assert imports_between_tests(tests) == {("tests/test_one.py", "test_two"), ("tests/test_one.py", "test_three"),
                                   ("tests/gpu/test_four.py", "test_one")}
