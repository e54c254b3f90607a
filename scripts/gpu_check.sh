#!/usr/bin/env bash
# Everything a lent GPU should run, in one command that fits a 10-minute call on a bare machine:
#
#   bash scripts/gpu_check.sh          # results under $OUT when set, else ./gpu_check_out
#
# Stages (each time-boxed with `timeout`; the whole run under GPU_CHECK_BUDGET seconds, 570 by
# default, about 9.5 minutes):
#   1. install    pip install -e . --no-deps --no-build-isolation (quietly)
#   2. versions   python, torch, triton, timm, pytest-benchmark, CUDA, the GPU (and nvidia-smi)
#   3. tests      the whole `pytest` (TRITON_INTERPRET=0: the kernel tests run the compiled kernels on
#                 CUDA tensors, the `gpu`-marked production-shape cases included), with the 25
#                 slowest tests listed in its log
#   4. bench      pytest on every bench/ file with --benchmark-json, one pytest run per file so
#                 that a file that fails or runs out of time loses only its own rows: the training
#                 step first, then the whole-ViT benchmark, then the per-op files
#   5. train      python scripts/train.py --amp --compile --iters 30 --log-every 10 --eval-every 30
#                 (the default synthetic data set, generated into data_cache/ on first use)
#   6. report     scripts/bench_report.py: the markdown table of docs/PERF.md, printed last
#
# Results (few files, as the device tool brings back at most 8 from $OUT):
#   bench.md        the table (header: GPU, driver, clocks, versions, date, command)
#   bench.json      every bench file's pytest-benchmark JSON, merged
#   gpu_check.log   the console output (stage results, versions, summary)
#   logs.tar.gz     everything else: each stage's full log, junit XML, per-file JSON, the training
#                   run's config / metrics / results (no checkpoints)
# The console gets a line per stage (and the log's tail when a stage fails), the summary, then the
# table. Exit status: 0 when every stage passed, 1 otherwise (after the table), 2 without CUDA.
#
# Knobs: GPU_CHECK_BUDGET (seconds, 570); GPU_CHECK_SKIP (stages to skip, space separated:
# install tests bench train); GPU_CHECK_BENCH (bench files to run, space separated, default
# all: e.g. a second call for the files a first one had no time for); GPU_CHECK_TRAIN_ITERS (30);
# PYTHON (python3); GPU_CHECK_ALLOW_CPU=1 runs without a GPU (to test this script; CPU numbers
# mean little).
set -u

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-570}
START=$(date +%s)
TRAIN_ITERS=${GPU_CHECK_TRAIN_ITERS:-30}
REPORT_RESERVE=25   # seconds kept for the report at the end
TRAIN_CAP=150       # the compiled training run (compile + 30 iterations + one evaluation)
TRAIN_MIN=90        # what the benchmarks leave for it
BENCH_MIN=200       # what the tests leave for the benchmarks
TESTS_CAP=240       # the whole pytest (about 225 s remain for it after install and versions)

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

# 3. the whole test suite ------------------------------------------------------------------
# tests/conftest.py leaves the Triton interpreter off when CUDA is present; TRITON_INTERPRET=0
# makes sure an inherited setting does not turn it on.
if skipped tests; then
    STATUS+=("tests: skipped (GPU_CHECK_SKIP)")
else
    TRITON_INTERPRET=0 run_stage tests "$TESTS_CAP" $((BENCH_MIN + TRAIN_MIN + REPORT_RESERVE)) \
        "$PY" -m pytest tests -q -rfE -p no:cacheprovider --durations=25 --junitxml "$WORK/tests.xml"
    [[ -f "$WORK/tests.log" ]] && grep -E "passed|failed|error|no tests ran" "$WORK/tests.log" | tail -n 1 | indent
fi

# 4. benchmarks, one pytest run per file ---------------------------------------------------
BENCH_FILES=()
if skipped bench; then
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
if skipped train; then
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
if (( ${#JSONS[@]} == 0 )); then
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
