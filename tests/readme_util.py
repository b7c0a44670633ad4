"""Runs the README's examples as written (a helper module of tests/test_readme_example.py and
tests/test_moe_layer.py, so test files never import each other)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def run_readme_example(heading: str) -> dict:
    """Execute the first python block after `heading` in README.md; return its namespace."""
    readme = README.read_text()
    section = readme[readme.index(heading):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    return namespace
