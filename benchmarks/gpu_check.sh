#!/usr/bin/env bash
# One prepared GPU check, from the repository root, on a CUDA machine with torch, triton, pytest and ninja
# (no network, nothing installed). Under 6 minutes at worst without --tune (every step has a time limit; those
# that run one after another add up to 355 s), which leaves a device session's 15 minutes room to run it again:
#   1. at once, for at most 160 s: benchmarks/gpu_grid.py --warm in 8 processes (the grid's kernels compile into
#      triton's cache, so the grid's budget goes to timing); `pytest -m cuda tests/` (on 6 workers where
#      pytest-xdist is there); `python -m fastlstm check --device cuda --backend triton` in bfloat16, float16 and
#      float32; the C++ CPU backend's build (which `info` at the end would otherwise wait on). All of them compile
#      more than they time, and none of them is timed against another.
#   2. alone, on a quiet GPU: benchmarks/gpu_grid.py (triton vs nn.LSTM/cuDNN grid; 115 s budget, killed at
#      135 s), then benchmarks/cuda_rule.py: the grid's figures as fastlstm/measured_cuda.py would hold them
#      (dispatch's rule), and how the grid stands against issue 4's targets (in gpu_check.log)
#   3. with --tune: benchmarks/gpu_tune.py (other tile sizes and warps per kernel against nn.LSTM, for setting
#      ops._blocks and the launch options), in what is left of 520 s
# Results: $OUT when set, else benchmarks/results/: gpu_check.log (what the warm-up, the grid and the tuning
# printed: each shape's phases as they begin, and the stacks of a process its time limit stopped),
# gpu_grid.json, gpu_grid.md, measured_cuda.py, pytest_cuda.log, check_cuda.txt (gpu_tune.json, gpu_tune.md)
# and fastlstm_info.txt (`python -m fastlstm info` after the runs: which kernel configurations crashed the
# compiler in a child process, if any did). The device tool brings back 8 files at most: where $OUT is set,
# gpu_tune.md goes into gpu_check.log instead of a file of its own (7 files, 8 with --tune).
#
#   bash benchmarks/gpu_check.sh [--tune]             # on the GPU machine (--tune: tunes in what is left of 520 s)
#   bash benchmarks/gpu_check.sh --dry-run [--tune]   # CPU smoke test: cuda tests skip, tiny runs, TRITON_INTERPRET=1
#
# Exit status: 0 when every step passed, else the first failing step's status.
set -uo pipefail

cd "$(dirname "$0")/.."
# Every step's output as it comes: a step its time limit stops keeps what it printed (a file is block-buffered)
export PYTHONUNBUFFERED=1
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
# A GPU machine's image may have python3 alone.
PY="${PYTHON:-python}"
if ! command -v "$PY" > /dev/null; then PY=python3; fi

DRY_RUN=0
TUNE=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --tune) TUNE=1 ;;
        *) echo "gpu_check: unknown option $arg (expected --dry-run, --tune)" >&2; exit 2 ;;
    esac
done
if [[ $DRY_RUN -eq 1 ]]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi

# The versions (on stderr), and whether torch sees a GPU and pytest has its plugins here: one call, bounded as
# every step is.
probe=$(timeout 20 "$PY" - <<'EOF'
import importlib.util, sys
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f"unavailable: {e}"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"gpu: {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}", file=sys.stderr)
has = [torch.cuda.is_available(), *(importlib.util.find_spec(name) is not None for name in ("xdist", "pytest_timeout"))]
print(*(int(x) for x in has))
EOF
)
read -r has_cuda has_xdist has_timeout <<< "${probe:-0 0 0}"
if [[ $DRY_RUN -eq 0 && $has_cuda -ne 1 ]]; then
    echo "gpu_check: no CUDA device visible to torch; run with --dry-run for a CPU smoke test" >&2
    exit 2
fi

dry=()
if [[ $DRY_RUN -eq 1 ]]; then dry=(--dry-run); fi

# 1. Everything that compiles more than it times, at once: the grid's kernels (a cold build of one shape's kernels
# takes seconds of a core) in 8 processes, the CUDA tests and `check` in half precision against nn.LSTM (the
# errors it allows on CUDA are set from these), about 15 processes on the machine's 16 cores. A process its time
# limit stops says where every thread was (faulthandler on SIGTERM).
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
echo "== compiling the grid's kernels, beside them pytest -m cuda tests/ and check on CUDA"
start=$SECONDS
warm_parts=8
if [[ $DRY_RUN -eq 1 ]]; then warm_parts=1; fi
warm_pids=()
for ((k = 0; k < warm_parts; k++)); do
    timeout 160 "$PY" benchmarks/gpu_grid.py "${dry[@]}" --warm "$k/$warm_parts" >> "$LOG" 2>&1 &
    warm_pids+=($!)
done

# Built while the GPU work compiles (16 cores), not in `info`'s 30 s at the end; no test of `-m cuda` needs it
timeout 160 "$PY" -m fastlstm build >> "$LOG" 2>&1 &
build_pid=$!

check_pid=
if [[ $DRY_RUN -eq 0 ]]; then
    timeout 160 "$PY" -c "import faulthandler, runpy, signal, sys
faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
sys.argv = ['fastlstm', 'check', '--device', 'cuda', '--backend', 'triton', '--dtype', 'bfloat16',
            '--dtype', 'float16', '--dtype', 'float32', '--random', '3']
runpy.run_module('fastlstm', run_name='__main__')" > "$RESULTS/check_cuda.txt" 2>&1 &
    check_pid=$!
fi

# -v: each test's verdict on its own line as it ends, so that a run its time limit stops still says which passed
pytest_args=(-m cuda tests/ -v -p no:cacheprovider -rfE --tb=short)
if [[ $DRY_RUN -eq 0 && $has_xdist -eq 1 ]]; then pytest_args+=(-n 6); fi
# A test's own limit ends well before the run's, so that a test that hangs late in the run still says where
if [[ $has_timeout -eq 1 ]]; then pytest_args+=(--timeout 100); fi
timeout 160 "$PY" -m pytest "${pytest_args[@]}" > "$RESULTS/pytest_cuda.log" 2>&1
pytest_status=$?
# 5: no tests collected (e.g. every cuda test deselected); not a failure of the kernels.
if [[ $pytest_status -eq 5 ]]; then pytest_status=0; fi
echo "pytest: exit $pytest_status in $((SECONDS - start)) s"
tail -n 25 "$RESULTS/pytest_cuda.log"

check_status=0
if [[ -n $check_pid ]]; then
    wait "$check_pid"
    check_status=$?
    echo "== check on CUDA: exit $check_status"
    tail -n 3 "$RESULTS/check_cuda.txt"
fi
for pid in "${warm_pids[@]}"; do wait "$pid"; done
wait "$build_pid" || echo "== the C++ CPU backend's build: exit $? (gpu_check.log has its output)"
echo "compiled in $((SECONDS - start)) s: $(grep -c ': ok in ' "$LOG") shapes ok"

# 2. The grid alone, on a quiet machine.
echo "== benchmark grid"
start=$SECONDS
if [[ $DRY_RUN -eq 1 ]]; then
    timeout 150 "$PY" benchmarks/gpu_grid.py --dry-run --out "$RESULTS" --budget 100 2>&1 | tee -a "$LOG"
else
    timeout 135 "$PY" benchmarks/gpu_grid.py --out "$RESULTS" --budget 115 2>&1 | tee -a "$LOG"
fi
grid_status=${PIPESTATUS[0]}
echo "grid: exit $grid_status in $((SECONDS - start)) s; results in $RESULTS"
# The figures dispatch's CUDA rule would read from this grid (fastlstm/measured_cuda.py's form; committed by hand)
rule_args=("$RESULTS/gpu_grid.json")
if [[ $DRY_RUN -eq 1 ]]; then rule_args=("$RESULTS/gpu_grid_dry_run.json" --capability "none (CPU dry run)"); fi
timeout 10 "$PY" benchmarks/cuda_rule.py "${rule_args[@]}" --out "$RESULTS/measured_cuda.py" 2>&1 | tee -a "$LOG"

tune_status=0
if [[ $TUNE -eq 1 ]]; then
    # Done 520 s from the start of this script, which leaves `info` its 30 s within the device tool's 10 minutes;
    # the tuner's budget is what the steps above left, less a margin for the kernels it compiles after its
    # budget check.
    budget=$((520 - SECONDS - 30))
    if [[ $budget -lt 30 ]]; then
        echo "== tuning skipped: $((520 - SECONDS)) s left of 520"
    else
        echo "== tuning ($budget s budget)"
        start=$SECONDS
        timeout $((budget + 30)) "$PY" benchmarks/gpu_tune.py "${dry[@]}" --out "$RESULTS" --budget "$budget" 2>&1 |
            tee -a "$LOG"
        tune_status=${PIPESTATUS[0]}
        echo "tuning: exit $tune_status in $((SECONDS - start)) s"
        for md in "$RESULTS/gpu_tune.md" "$RESULTS/gpu_tune_dry_run.md"; do
            if [[ -n ${OUT:-} && -f $md ]]; then { echo "== $md"; cat "$md"; } >> "$LOG" && rm "$md"; fi
        done
    fi
fi

timeout 30 "$PY" -m fastlstm info > "$RESULTS/fastlstm_info.txt" 2>&1
grep -A20 "^triton builds" "$RESULTS/fastlstm_info.txt"

for status in "$pytest_status" "$check_status" "$grid_status" "$tune_status"; do
    if [[ $status -ne 0 ]]; then exit "$status"; fi
done
exit 0
