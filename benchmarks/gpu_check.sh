#!/usr/bin/env bash
# One prepared GPU check, from the repository root, on a CUDA machine with torch, triton, pytest and ninja
# (no network, nothing installed). Under 6 minutes in all:
#   1. pytest -m cuda tests/        (at most 200 s; the log goes to the results folder)
#   2. benchmarks/gpu_grid.py       (triton vs nn.LSTM/cuDNN grid; 120 s budget, killed at 150 s)
#   3. with --tune: benchmarks/gpu_tune.py (other tile sizes and warps per kernel against nn.LSTM, for setting
#      ops._blocks and the launch options), in what is left of 9 minutes
# Results: $OUT when set, else benchmarks/results/: pytest_cuda.log, gpu_grid.json, gpu_grid.md (gpu_tune.json,
# gpu_tune.md), and fastlstm_info.txt (`python -m fastlstm info` after the runs: which kernel configurations
# crashed the compiler in a child process, if any did).
#
#   bash benchmarks/gpu_check.sh [--tune]             # on the GPU machine (--tune: one device call of <= 9.5 min)
#   bash benchmarks/gpu_check.sh --dry-run [--tune]   # CPU smoke test: cuda tests skip, tiny runs, TRITON_INTERPRET=1
#
# Exit status: 0 when every step passed, else the first failing step's status.
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python}"

DRY_RUN=0
TUNE=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --tune) TUNE=1 ;;
        *) echo "gpu_check: unknown option $arg (expected --dry-run, --tune)" >&2; exit 2 ;;
    esac
done
if [[ $DRY_RUN -eq 1 ]]; then
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device visible to torch; run with --dry-run for a CPU smoke test" >&2
        exit 2
    fi
fi

"$PY" - <<'EOF' | tee "$RESULTS/gpu_check_env.txt"
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f"unavailable: {e}"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"gpu: {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}")
EOF

echo "== pytest -m cuda tests/"
start=$SECONDS
timeout 200 "$PY" -m pytest -m cuda tests/ -q -p no:cacheprovider 2>&1 | tee "$RESULTS/pytest_cuda.log"
pytest_status=${PIPESTATUS[0]}
# 5: no tests collected (e.g. every cuda test deselected); not a failure of the kernels.
if [[ $pytest_status -eq 5 ]]; then pytest_status=0; fi
echo "pytest: exit $pytest_status in $((SECONDS - start)) s"

echo "== benchmark grid"
start=$SECONDS
if [[ $DRY_RUN -eq 1 ]]; then
    timeout 150 "$PY" benchmarks/gpu_grid.py --dry-run --out "$RESULTS" --budget 100
else
    timeout 150 "$PY" benchmarks/gpu_grid.py --out "$RESULTS" --budget 120
fi
grid_status=$?
echo "grid: exit $grid_status in $((SECONDS - start)) s; results in $RESULTS"

tune_status=0
if [[ $TUNE -eq 1 ]]; then
    # 9 minutes from the start of this script in all; the tuner's budget is what the steps above left, less
    # a margin for the kernels it compiles after its budget check.
    budget=$((540 - SECONDS - 30))
    if [[ $budget -lt 30 ]]; then
        echo "== tuning skipped: $((540 - SECONDS)) s left of 9 minutes"
    else
        echo "== tuning ($budget s budget)"
        start=$SECONDS
        dry=()
        if [[ $DRY_RUN -eq 1 ]]; then dry=(--dry-run); fi
        timeout $((budget + 30)) "$PY" benchmarks/gpu_tune.py "${dry[@]}" --out "$RESULTS" --budget "$budget"
        tune_status=$?
        echo "tuning: exit $tune_status in $((SECONDS - start)) s"
    fi
fi

timeout 60 "$PY" -m fastlstm info > "$RESULTS/fastlstm_info.txt" 2>&1
grep -A20 "^triton builds" "$RESULTS/fastlstm_info.txt"

for status in "$pytest_status" "$grid_status" "$tune_status"; do
    if [[ $status -ne 0 ]]; then exit "$status"; fi
done
exit 0
