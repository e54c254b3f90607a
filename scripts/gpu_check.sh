#!/usr/bin/env bash
# Everything a lent GPU should run, in one command that fits a 10-minute call on a bare machine:
#
#   bash scripts/gpu_check.sh          # writes under $OUT when set, else ./gpu_check_out
#
# Stages (each time-boxed with `timeout`, the whole run under GPU_CHECK_BUDGET seconds, 570 by
# default, about 9.5 minutes):
#   1. install    pip install -e . --no-deps --no-build-isolation (quietly)
#   2. versions   python, torch, triton, timm, CUDA, the GPU (and nvidia-smi)
#   3. gpu-tests  pytest tests -m gpu (TRITON_INTERPRET=0: the real kernels, not the interpreter)
#   4. bench      pytest on every bench/ file with --benchmark-json, one pytest run per file so that
#                 a file that fails or runs out of time loses only its own rows; the training step
#                 first, then the whole-ViT benchmark, then the per-op files. Merged into bench.json.
#   5. train      python scripts/train.py --amp --compile --iters 30 --log-every 10 --eval-every 30
#                 (the default synthetic data set, generated into data_cache/ on first use)
#   6. report     scripts/bench_report.py: the markdown table of docs/PERF.md (bench.md), printed last
# Each stage's full output is in $OUT/<stage>.log; the console gets a status line per stage (and
# the log's tail when a stage fails). Exit status: 0 when every stage passed, 1 otherwise (after
# the table; 2 when there is no CUDA device). Knobs: GPU_CHECK_BUDGET (seconds), GPU_CHECK_SKIP
# (stage names to skip, space separated: install gpu-tests bench train), GPU_CHECK_BENCH (bench
# files, space separated, default all: e.g. a second call for the files a first one ran out of
# time for), GPU_CHECK_TRAIN_ITERS (30), GPU_CHECK_ALLOW_CPU=1 (run without a GPU: for testing
# this script only, the CPU numbers mean little).
set -u

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT_DIR/bench" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-570}
START=$(date +%s)
TRAIN_ITERS=${GPU_CHECK_TRAIN_ITERS:-30}
REPORT_RESERVE=25   # seconds kept for the report at the end
TRAIN_CAP=150       # the compiled training run (compile + 30 iterations + one evaluation)
TRAIN_MIN=90        # what the benchmarks leave for it
BENCH_MIN=200       # what the GPU tests leave for the benchmarks
STATUS=()           # "stage: result" lines for the summary
FAILED=0

left() { echo $((BUDGET - ($(date +%s) - START))); }
skipped() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]]; }

# run_stage NAME CAP_SECONDS RESERVE_SECONDS CMD...: run CMD with a timeout of
# min(CAP, time left - RESERVE), output to $OUT_DIR/NAME.log; record the result.
run_stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local limit
    limit=$(( $(left) - reserve ))
    (( limit > cap )) && limit=$cap
    local log="$OUT_DIR/$name.log"
    if (( limit < 10 )); then
        echo "[gpu_check] $name: SKIPPED (no time left in the ${BUDGET}s budget)"
        STATUS+=("$name: skipped, out of time")
        FAILED=1
        return 1
    fi
    echo "[gpu_check] $name: running (limit ${limit}s, log $log)"
    local t0 rc
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then
        STATUS+=("$name: ok (${took}s)")
        echo "[gpu_check] $name: ok (${took}s)"
    else
        local why="exit $rc"
        (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s"
        STATUS+=("$name: FAILED, $why (${took}s)")
        FAILED=1
        echo "[gpu_check] $name: FAILED, $why (${took}s); last lines of $log:"
        tail -n 15 "$log" | sed 's/^/    /'
    fi
    return $rc
}

echo "[gpu_check] $(date -u '+%Y-%m-%d %H:%M:%S UTC'), output in $OUT_DIR, budget ${BUDGET}s"

# 1. install -------------------------------------------------------------------------------
if skipped install; then
    STATUS+=("install: skipped (GPU_CHECK_SKIP)")
else
    run_stage install 120 0 "$PY" -m pip install -q -e . --no-deps --no-build-isolation
fi

# 2. versions ------------------------------------------------------------------------------
run_stage versions 60 0 "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
try:
    import timm
    print("timm", timm.__version__)
except ImportError as err:
    print("timm: not importable:", err)
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
(( versions_rc == 0 )) && cat "$OUT_DIR/versions.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,power.limit --format=csv 2>&1 | tee -a "$OUT_DIR/versions.log"
if (( versions_rc == 3 )) && [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
    echo "[gpu_check] no CUDA device: stopping (GPU_CHECK_ALLOW_CPU=1 runs the CPU versions anyway)"
    exit 2
fi

# 3. GPU-marked tests ----------------------------------------------------------------------
# tests/conftest.py turns the Triton interpreter on unless TRITON_INTERPRET is already set: the
# GPU tests are about the compiled kernels, so set it to 0 here.
if skipped gpu-tests; then
    STATUS+=("gpu-tests: skipped (GPU_CHECK_SKIP)")
else
    TRITON_INTERPRET=0 run_stage gpu-tests 100 $((BENCH_MIN + TRAIN_MIN + REPORT_RESERVE)) \
        "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml "$OUT_DIR/gpu_tests.xml"
    [[ -f "$OUT_DIR/gpu-tests.log" ]] && grep -E "passed|failed|error|no tests ran" "$OUT_DIR/gpu-tests.log" | tail -n 1 | sed 's/^/    /'
fi

# 4. benchmarks, one pytest run per file ---------------------------------------------------
if skipped bench; then
    BENCH_FILES=()
    STATUS+=("bench: skipped (GPU_CHECK_SKIP)")
elif [[ -n "${GPU_CHECK_BENCH:-}" ]]; then
    read -r -a BENCH_FILES <<<"$GPU_CHECK_BENCH"
else
    BENCH_FILES=()
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
    rm -f "$OUT_DIR/bench/$name.json" "$OUT_DIR/bench/$name.xml"  # no stale rows from an earlier call
    # keep time for the training run and the report after the benchmarks
    run_stage "bench-$name" "$cap" $((TRAIN_MIN + REPORT_RESERVE)) \
        "$PY" -m pytest "$f" -q -p no:cacheprovider \
        --benchmark-json "$OUT_DIR/bench/$name.json" --junitxml "$OUT_DIR/bench/$name.xml"
    [[ -f "$OUT_DIR/bench-$name.log" ]] && grep -E "passed|failed|error|skipped" "$OUT_DIR/bench-$name.log" | tail -n 1 | sed 's/^/    /'
done

# 5. a short compiled bf16 training run ----------------------------------------------------
if skipped train; then
    STATUS+=("train: skipped (GPU_CHECK_SKIP)")
else
    run_stage train "$TRAIN_CAP" "$REPORT_RESERVE" "$PY" scripts/train.py --amp --compile --iters "$TRAIN_ITERS" \
        --log-every 10 --eval-every "$TRAIN_ITERS" --out "$OUT_DIR/train"
    [[ -f "$OUT_DIR/train.log" ]] && grep -E "^it |img/s|mIoU|miou|done in|error" "$OUT_DIR/train.log" | tail -n 8 | sed 's/^/    /'
fi

# 6. the table (this call's files only) --------------------------------------------------
JSONS=()
XMLS=()
for f in "${BENCH_FILES[@]+"${BENCH_FILES[@]}"}"; do
    name=$(basename "$f" .py)
    [[ -s "$OUT_DIR/bench/$name.json" ]] && JSONS+=("$OUT_DIR/bench/$name.json")
    [[ -f "$OUT_DIR/bench/$name.xml" ]] && XMLS+=("$OUT_DIR/bench/$name.xml")
done
if (( ${#JSONS[@]} == 0 )); then
    if ! skipped bench; then
        STATUS+=("report: FAILED, no benchmark JSON was written")
        FAILED=1
    fi
    echo "no benchmark results" >"$OUT_DIR/bench.md"
else
    "$PY" scripts/bench_report.py "${JSONS[@]}" --junit "${XMLS[@]+"${XMLS[@]}"}" \
        --command "bash scripts/gpu_check.sh (per bench file: pytest bench/FILE --benchmark-json)" \
        --merge-out "$OUT_DIR/bench.json" --out "$OUT_DIR/bench.md" >"$OUT_DIR/report.log" 2>&1
    rc=$?
    if (( rc == 0 )); then
        STATUS+=("report: ok")
    else
        STATUS+=("report: FAILED, exit $rc")
        FAILED=1
        cat "$OUT_DIR/report.log"
    fi
fi

echo
echo "[gpu_check] summary ($(( $(date +%s) - START ))s of ${BUDGET}s):"
for line in "${STATUS[@]}"; do
    echo "    $line"
done
echo "[gpu_check] files: $OUT_DIR (bench.json, bench.md, bench/, *.log, train/)"
echo
[[ -f "$OUT_DIR/bench.md" ]] && cat "$OUT_DIR/bench.md"
exit "$FAILED"
