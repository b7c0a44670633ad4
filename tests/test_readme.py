"""The README stays true: its environment table is the one env.py declares, and the two
set-up commands it names exist."""
from pathlib import Path

from fastmoe_ops import env

ROOT = Path(__file__).resolve().parents[1]


def test_env_table_matches_env_module():
    readme = (ROOT / "README.md").read_text()
    assert env.markdown_table() in readme, "README's FMO_* table is stale: regenerate it from env.markdown_table()"


def test_two_commands_exist():
    readme = (ROOT / "README.md").read_text()
    assert "bash run.sh main" in readme and "bash run.sh test" in readme
    run_sh = (ROOT / "run.sh").read_text()
    assert "main)" in run_sh and "test)" in run_sh
    assert "bash run.sh test" in (ROOT / ".ci" / "run").read_text(), "CI must run the README's test command"
