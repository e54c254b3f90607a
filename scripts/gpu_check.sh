#!/usr/bin/env bash
# What a lent GPU runs, planned for a 15-minute GPU loan (machine start and every retry included):
# two calls of at most ~9 minutes each, the first one alone already worth having.
#
#   bash scripts/gpu_check.sh          # call 1: GPU, versions, CUDA kernel tests, -m gpu tests, the
#                                      #         bench table and a compiled bf16 training run
#   bash scripts/gpu_check.sh rest     # call 2: the rest of the suite on CUDA, then compute-sanitizer
#                                      #         racecheck / memcheck of the kernel tests
#
# Results under $OUT when set, else ./gpu_check_out.
#
# Stages of call 1 (each time-boxed with `timeout`; the whole run under GPU_CHECK_BUDGET seconds,
# 540 by default, 9 minutes):
#   1. install    pip install -e . --no-deps --no-build-isolation (quietly; the GPU machine has no
#                 registry and its own torch 2.11 / triton 3.6)
#   2. versions   python, torch, triton, timm, pytest-benchmark, CUDA, the GPU (and nvidia-smi)
#   3. kernels    pytest tests/test_kernel_*.py (TRITON_INTERPRET=0: the compiled kernels on CUDA
#                 tensors, the `gpu`-marked production-shape cases included), then every other
#                 `gpu`-marked test (pytest tests -m gpu)
#   4. bench      pytest on every bench/ file with --benchmark-json, one pytest run per file so
#                 that a file that fails or runs out of time loses only its own rows: the training
#                 step first, then the whole-ViT benchmark, then the per-op files
#   5. train      python scripts/train.py --amp --compile --iters 30 --log-every 10 --eval-every 30
#                 (the default synthetic data set, generated into data_cache/ on first use)
#   6. report     scripts/bench_report.py: the markdown table of docs/PERF.md, printed last
# Stages of call 2 (`rest`): install, versions, then
#   3. suite      pytest tests, less the kernel files and the gpu-marked tests call 1 ran
#   4. sanitizer  compute-sanitizer --tool racecheck, then --tool memcheck, over a small slice of
#                 each kernel test file (the first cases of each: a sanitizer run is 10-100x slower)
#
# Results (few files, as the device tool brings back at most 8 from $OUT):
#   bench.md        the table (header: GPU, driver, clocks, versions, date, command); call 1
#   bench.json      every bench file's pytest-benchmark JSON, merged; call 1
#   gpu_check.log   the console output (stage results, versions, summary)
#   logs.tar.gz     everything else: each stage's full log, junit XML, per-file JSON, the training
#                   run's config / metrics / results (no checkpoints)
# The console gets a line per stage (and the log's tail when a stage fails), the summary, then the
# table. Exit status: 0 when every stage passed, 1 otherwise (after the table), 2 without CUDA.
#
# Knobs: GPU_CHECK_BUDGET (seconds, 540); GPU_CHECK_SKIP (stages to skip, space separated:
# install kernels bench train suite sanitizer); GPU_CHECK_BENCH (bench files to run, space
# separated, default all); GPU_CHECK_TRAIN_ITERS (30); PYTHON (python3); GPU_CHECK_ALLOW_CPU=1 runs
# without a GPU (to test this script; CPU numbers mean little).
set -u

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
PART=${1:-first}
if [[ $PART != first && $PART != rest ]]; then
    echo "usage: bash scripts/gpu_check.sh [first|rest]" >&2
    exit 2
fi
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$(date +%s)
TRAIN_ITERS=${GPU_CHECK_TRAIN_ITERS:-30}
REPORT_RESERVE=25   # seconds kept for the report at the end
TRAIN_CAP=150       # the compiled training run (compile + 30 iterations + one evaluation)
TRAIN_MIN=90        # what the benchmarks leave for it
BENCH_MIN=150       # what the tests leave for the benchmarks
KERNELS_CAP=170     # the kernel test files (first Triton compiles: most of it)
GPU_CAP=60          # the other gpu-marked tests
GPU_MIN=30          # what the kernel tests leave for them
SUITE_CAP=330       # call 2: the rest of the suite
SANITIZER_CAP=80    # call 2: each compute-sanitizer tool

TEMP_WORK=0
if [[ -n "${OUT:-}" ]]; then
    RESULTS=$OUT
    WORK=$(mktemp -d /tmp/gpu_check.XXXXXX) || exit 2
    TEMP_WORK=1
else
    RESULTS=$ROOT/gpu_check_out
    WORK=$RESULTS/work
    rm -rf "$WORK"  # this script's own scratch folder from an earlier call
fi
mkdir -p "$RESULTS" "$WORK/bench" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
CONSOLE=$WORK/gpu_check.log
: >"$CONSOLE"
STATUS=()   # "stage: result" lines for the summary
FAILED=0

say() { echo "$@" | tee -a "$CONSOLE"; }
indent() { sed 's/^/    /' | tee -a "$CONSOLE"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
skipped() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]]; }

# run_stage NAME CAP RESERVE CMD...: run CMD with a timeout of min(CAP, time left - RESERVE)
# seconds, its output in $WORK/NAME.log; record the result.
run_stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local limit log="$WORK/$name.log"
    limit=$(( $(left) - reserve ))
    (( limit > cap )) && limit=$cap
    if (( limit < 10 )); then
        say "[gpu_check] $name: SKIPPED (no time left in the ${BUDGET}s budget)"
        STATUS+=("$name: skipped, out of time")
        FAILED=1
        return 1
    fi
    say "[gpu_check] $name: running (limit ${limit}s)"
    local t0 rc took why
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then
        STATUS+=("$name: ok (${took}s)")
        say "[gpu_check] $name: ok (${took}s)"
    else
        why="exit $rc"
        (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s"
        STATUS+=("$name: FAILED, $why (${took}s)")
        FAILED=1
        say "[gpu_check] $name: FAILED, $why (${took}s); last lines of $name.log:"
        tail -n 15 "$log" | indent
    fi
    return $rc
}

say "[gpu_check] $(date -u '+%Y-%m-%d %H:%M:%S UTC') | results in $RESULTS | budget ${BUDGET}s | commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"

# 1. install -------------------------------------------------------------------------------
if skipped install; then
    STATUS+=("install: skipped (GPU_CHECK_SKIP)")
else
    run_stage install 120 0 "$PY" -m pip install -q -e . --no-deps --no-build-isolation
fi

# 2. versions ------------------------------------------------------------------------------
run_stage versions 60 0 "$PY" - <<'EOF'
import importlib.metadata as md
import platform
import sys

import torch

print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for dist in ("triton", "timm", "pytest", "pytest-benchmark", "nvidia-ml-py", "numpy"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "NOT INSTALLED")
if torch.cuda.is_available():
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {torch.cuda.get_device_name(i)} | capability {p.major}.{p.minor} | "
          f"{p.total_memory // 2**20} MiB | {p.multi_processor_count} SMs")
else:
    print("no CUDA device")
    sys.exit(3)
EOF
versions_rc=$?
(( versions_rc == 0 )) && indent <"$WORK/versions.log"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,power.limit \
        --format=csv 2>&1 | indent
fi
STOP=""
if (( versions_rc == 3 )); then
    [[ "${GPU_CHECK_ALLOW_CPU:-0}" == 1 ]] || STOP="no CUDA device (GPU_CHECK_ALLOW_CPU=1 runs the CPU versions anyway)"
elif (( versions_rc != 0 )); then
    STOP="$PY could not run the version check (is torch installed for it? set PYTHON)"
fi
if [[ -n $STOP ]]; then
    say "[gpu_check] stopping: $STOP"
    cp "$CONSOLE" "$RESULTS/gpu_check.log"
    (( TEMP_WORK )) && rm -rf "$WORK"
    exit 2
fi

# 3. tests ----------------------------------------------------------------------------------
# tests/conftest.py leaves the Triton interpreter off when CUDA is present; TRITON_INTERPRET=0
# makes sure an inherited setting does not turn it on.
KERNEL_FILES=(tests/test_kernel_*.py)
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider --durations=15)
summary_line() { [[ -f "$WORK/$1.log" ]] && grep -E "passed|failed|error|no tests ran" "$WORK/$1.log" | tail -n 1 | indent; }
if [[ $PART == first ]]; then
    if skipped kernels; then
        STATUS+=("kernels: skipped (GPU_CHECK_SKIP)")
    else
        TRITON_INTERPRET=0 run_stage kernels "$KERNELS_CAP" $((GPU_MIN + BENCH_MIN + TRAIN_MIN + REPORT_RESERVE)) \
            "${PYTEST[@]}" "${KERNEL_FILES[@]}" --junitxml "$WORK/kernels.xml"
        summary_line kernels
        TRITON_INTERPRET=0 run_stage gpu-marked "$GPU_CAP" $((BENCH_MIN + TRAIN_MIN + REPORT_RESERVE)) \
            "${PYTEST[@]}" tests -m gpu $(printf -- '--ignore=%s ' "${KERNEL_FILES[@]}") --junitxml "$WORK/gpu.xml"
        summary_line gpu-marked
    fi
else
    if skipped suite; then
        STATUS+=("suite: skipped (GPU_CHECK_SKIP)")
    else
        TRITON_INTERPRET=0 run_stage suite "$SUITE_CAP" $((2 * SANITIZER_CAP + REPORT_RESERVE)) \
            "${PYTEST[@]}" tests -m "not gpu" $(printf -- '--ignore=%s ' "${KERNEL_FILES[@]}") \
            --junitxml "$WORK/suite.xml"
        summary_line suite
    fi
    if skipped sanitizer; then
        STATUS+=("sanitizer: skipped (GPU_CHECK_SKIP)")
    elif ! command -v compute-sanitizer >/dev/null; then
        STATUS+=("sanitizer: FAILED, compute-sanitizer is not on PATH")
        FAILED=1
    else
        # the first 3 cases of each kernel file (ids collected on the host, no sanitizer): a
        # sanitized launch is 10-100x slower
        mapfile -t SLICE < <(TRITON_INTERPRET=0 "$PY" -m pytest --co -q -p no:cacheprovider -m "not gpu" \
            "${KERNEL_FILES[@]}" 2>/dev/null | grep '::' | awk -F'::' '{ if (++n[$1] <= 3) print }')
        for tool in racecheck memcheck; do
            TRITON_INTERPRET=0 run_stage "sanitizer-$tool" "$SANITIZER_CAP" "$REPORT_RESERVE" \
                compute-sanitizer --tool "$tool" --error-exitcode 9 "${PYTEST[@]}" "${SLICE[@]}"
            summary_line "sanitizer-$tool"
        done
    fi
fi

# 4. benchmarks, one pytest run per file ---------------------------------------------------
BENCH_FILES=()
if [[ $PART == rest ]]; then
    :  # call 1 ran them
elif skipped bench; then
    STATUS+=("bench: skipped (GPU_CHECK_SKIP)")
elif [[ -n "${GPU_CHECK_BENCH:-}" ]]; then
    read -r -a BENCH_FILES <<<"$GPU_CHECK_BENCH"
else
    for f in bench/test_train_step.py bench/test_vit_attention.py; do
        [[ -f $f ]] && BENCH_FILES+=("$f")
    done
    for f in bench/test_*.py; do
        [[ $f == bench/test_train_step.py || $f == bench/test_vit_attention.py ]] || BENCH_FILES+=("$f")
    done
fi
for f in "${BENCH_FILES[@]+"${BENCH_FILES[@]}"}"; do
    name=$(basename "$f" .py)
    cap=90
    [[ $name == test_train_step ]] && cap=240
    # keep time for the training run and the report after the benchmarks
    run_stage "bench-$name" "$cap" $((TRAIN_MIN + REPORT_RESERVE)) \
        "$PY" -m pytest "$f" -q -p no:cacheprovider \
        --benchmark-json "$WORK/bench/$name.json" --junitxml "$WORK/bench/$name.xml"
    [[ -f "$WORK/bench-$name.log" ]] && grep -E "passed|failed|error|skipped" "$WORK/bench-$name.log" | tail -n 1 | indent
done

# 5. a short compiled bf16 training run ----------------------------------------------------
if [[ $PART == rest ]]; then
    :
elif skipped train; then
    STATUS+=("train: skipped (GPU_CHECK_SKIP)")
else
    run_stage train "$TRAIN_CAP" "$REPORT_RESERVE" "$PY" scripts/train.py --amp --compile --iters "$TRAIN_ITERS" \
        --log-every 10 --eval-every "$TRAIN_ITERS" --out "$WORK/train"
    [[ -f "$WORK/train.log" ]] && grep -E "^device|^it |mIoU|^  [A-Za-z]|done in|rror" "$WORK/train.log" | tail -n 14 | indent
fi

# 6. the table -----------------------------------------------------------------------------
JSONS=()
XMLS=()
for f in "${BENCH_FILES[@]+"${BENCH_FILES[@]}"}"; do
    name=$(basename "$f" .py)
    [[ -s "$WORK/bench/$name.json" ]] && JSONS+=("$WORK/bench/$name.json")
    [[ -f "$WORK/bench/$name.xml" ]] && XMLS+=("$WORK/bench/$name.xml")
done
rm -f "$RESULTS/bench.md" "$RESULTS/bench.json"
if [[ $PART == rest ]]; then
    echo "call 2 (rest): no benchmarks" >"$RESULTS/bench.md"
elif (( ${#JSONS[@]} == 0 )); then
    if ! skipped bench; then
        STATUS+=("report: FAILED, no benchmark JSON was written")
        FAILED=1
    fi
    echo "no benchmark results" >"$RESULTS/bench.md"
else
    "$PY" scripts/bench_report.py "${JSONS[@]}" --junit "${XMLS[@]+"${XMLS[@]}"}" \
        --command "bash scripts/gpu_check.sh (per bench file: pytest bench/FILE --benchmark-json)" \
        --merge-out "$RESULTS/bench.json" --out "$RESULTS/bench.md" >"$WORK/report.log" 2>&1
    rc=$?
    if (( rc == 0 )); then
        STATUS+=("report: ok")
    else
        STATUS+=("report: FAILED, exit $rc")
        FAILED=1
        indent <"$WORK/report.log"
    fi
fi

say ""
say "[gpu_check] summary ($(( $(date +%s) - START ))s of ${BUDGET}s):"
for line in "${STATUS[@]}"; do
    say "    $line"
done
say "[gpu_check] results: $RESULTS (bench.md, bench.json, gpu_check.log, logs.tar.gz)"
cp "$CONSOLE" "$RESULTS/gpu_check.log"
tar -czf "$RESULTS/logs.tar.gz" -C "$WORK" --exclude=checkpoints --exclude=panels \
    --exclude=gpu_check.log . 2>/dev/null || echo "[gpu_check] could not write logs.tar.gz"
(( TEMP_WORK )) && rm -rf "$WORK"
echo
cat "$RESULTS/bench.md"
exit "$FAILED"
