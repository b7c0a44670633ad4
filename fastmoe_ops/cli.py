"""The `fastmoe-ops` console script: one name for the project's three jobs.

    fastmoe-ops build [ARGS]       the build report: python -m fastmoe_ops.build ARGS
    fastmoe-ops bench [ARGS]       the benchmarks: python -m bench ARGS (source checkout only)
    fastmoe-ops gpu-check [OUT]    the one-shot GPU check: bash bench/gpu_check.sh OUT

Arguments after the command go to it unchanged (`fastmoe-ops build --help` is the build
report's own help). The benchmarks and the GPU check live in the repository's bench/ folder,
not in the installed package, so they need the source checkout the package was installed
from (`pip install -e .`); the build report works from any install. The build report and
the benchmarks run in this process, so `mpirun -n 4 fastmoe-ops bench` runs the cross-rank
benchmarks.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# Where an editable install's package lives: the checkout's root is its parent.
_CHECKOUT = Path(__file__).resolve().parent.parent


def _checkout(command: str) -> Path:
    """The source checkout holding bench/, or a clear refusal (exit status 2)."""
    if (_CHECKOUT / "bench" / "__main__.py").is_file() and (_CHECKOUT / "bench" / "gpu_check.sh").is_file():
        return _CHECKOUT
    print(f"fastmoe-ops {command}: needs a source checkout of fastmoe-ops: the benchmarks and the GPU check live "
          f"in its bench/ folder, which the installed package ({_CHECKOUT / 'fastmoe_ops'}) does not ship. "
          f"Clone the repository and `pip install -e .` there.", file=sys.stderr)
    raise SystemExit(2)


def _build(args: list[str]) -> int:
    from . import build

    return build.main(args)


def _bench(args: list[str]) -> int:
    root = str(_checkout("bench"))
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)  # bench/ is a top-level package of the checkout
    from bench.__main__ import main

    return main(args)


def _gpu_check(args: list[str]) -> int:
    script = _checkout("gpu-check") / "bench" / "gpu_check.sh"
    if args[:1] in (["-h"], ["--help"]):  # the script's opening comment is its help
        lines = script.read_text().splitlines()[1:]
        print("\n".join(line[2:] for line in lines[:next(i for i, l in enumerate(lines) if not l.startswith("#"))]))
        return 0
    if len(args) > 1 or args[:1] and args[0].startswith("-"):
        print(f"fastmoe-ops gpu-check: expected at most one argument, the output folder (OUT_DIR), got {args}",
              file=sys.stderr)
        return 2
    # The script works from the checkout's root: make a relative OUT_DIR the caller's.
    args = [os.path.abspath(a) if not a.startswith("-") else a for a in args]
    return subprocess.call(["bash", str(script), *args])


COMMANDS = {
    "build": (_build, "the build report: every kernel variant compiled offline, registers, spills and SASS "
                      "counts (python -m fastmoe_ops.build; --arch, --op, --json)"),
    "bench": (_bench, "the benchmarks on whatever device exists (python -m bench; --quick, --json, --plot; "
                      "under mpirun the cross-rank ones); needs the source checkout"),
    "gpu-check": (_gpu_check, "the one-shot GPU check (bash bench/gpu_check.sh [OUT_DIR]); needs the source checkout"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastmoe-ops", description=__doc__.split("\n\n")[0],
        epilog="commands:\n" + "\n".join(f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the command unchanged")
    ns = parser.parse_args(argv)
    run, _ = COMMANDS[ns.command]
    return run(ns.args)


if __name__ == "__main__":
    sys.exit(main())
