"""The README's simulator example runs as written."""
import re
from pathlib import Path

import pytest

import fastmoe_ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif("sim" not in fastmoe_ops.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")
def test_readme_sim_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run and test your CUDA kernels on a CPU"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (simulator example)", "exec"), {})


@pytest.mark.skipif("sim" not in fastmoe_ops.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")
def test_readme_fp8_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## FP8 GEMM with fine-grained scaling"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (FP8 example)", "exec"), {})


@pytest.mark.skipif("sim" not in fastmoe_ops.available_backends(), reason="simulator not built (test_sim_is_built fails instead)")
def test_readme_attention_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Fused attention"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md (attention example)", "exec"), ns)
    assert ns["q"].grad is not None and not ns["q"].grad.isnan().any()
    assert ns["o"].shape == (20, 8, 64) and not ns["o"].isnan().any()
