#!/usr/bin/env bash
# Set-up and the two jobs, on a fresh machine, in one command each:
#   bash run.sh main    # install, then a short demo, the single-process benchmarks, and the
#                       # multi-rank MoE ones under mpirun (tables on stdout; JSON, plots under out/)
#   bash run.sh test    # install, then the whole test suite: unit + simulator tests, the build
#                       # report, and the multi-rank tests under mpirun
# Extra arguments after the job go to `python -m bench` (main) or pytest (test).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
job=${1:-}
shift || true

setup() {
    # torch is a range in pyproject.toml, so a GPU box keeps its CUDA torch; on a machine
    # without torch, take the CPU wheel (a looser request would pull a multi-GB CUDA build).
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    local extras="test,mpi,bench,build-report"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        extras="$extras,cuda"
    fi
    "$PY" -m pip install -q -e ".[$extras]"
}

mpirun_cmd() {
    local bin
    bin="$("$PY" -c 'import os,sys; print(os.path.join(os.path.dirname(sys.executable), "mpirun"))')"
    [ -x "$bin" ] || bin=mpirun
    local flags=()
    [ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
    echo "$bin" "${flags[@]}" --oversubscribe
}

case "$job" in
main)
    setup
    "$PY" -m fastmoe_ops.demo
    "$PY" -m bench --json out/bench.json --plot out/plots "$@"
    # The multi-rank benchmarks (MoE dispatch/combine, the MoE layer): every GPU as a rank on a
    # GPU machine, else 4 ranks on the CPU (--quick there: one shape each, the simulator's
    # steps take seconds on a shared machine). JSON: out/bench_moe.json, out/bench_moe_layer.json.
    ranks=4 mpi_quick=(--quick)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        ranks=$(nvidia-smi -L | wc -l) mpi_quick=()
    fi
    timeout --kill-after=30 1800 $(mpirun_cmd) -n "$ranks" "$PY" -m bench "${mpi_quick[@]}" --json out/bench.json --plot out/plots
    ;;
test)
    setup
    # Single-process tests (the build report runs inside them: tests/test_build_report.py).
    "$PY" -m pytest tests --ignore=tests/mpi -q "$@"
    # The attention grid of issue 6 in full (256 cases, ~6 minutes on 2 cores): marked slow so
    # a developer's plain `pytest tests` stays quick, but the test job always runs it.
    "$PY" -m pytest tests/test_attention.py -m slow -q -p no:cacheprovider
    # Multi-rank tests: 4 ranks, each under pytest, bounded in time so no rank can hang CI.
    if ls tests/mpi/test_*.py >/dev/null 2>&1; then
        timeout --kill-after=30 900 $(mpirun_cmd) -n 4 "$PY" -m pytest tests/mpi -q -p no:cacheprovider --color=no
    fi
    ;;
*)
    echo "usage: bash run.sh main|test [args]" >&2
    exit 2
    ;;
esac
