#!/usr/bin/env bash
# One prepared GPU check, from the repository root, on a CUDA machine with torch, triton, pytest and ninja
# (no network, nothing installed). Under 6 minutes in all:
#   1. pytest -m cuda tests/        (at most 200 s; the log goes to the results folder)
#   2. benchmarks/gpu_grid.py       (triton vs nn.LSTM/cuDNN grid; 120 s budget, killed at 150 s)
# Results: $OUT when set, else benchmarks/results/: pytest_cuda.log, gpu_grid.json, gpu_grid.md.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # CPU smoke test: cuda tests skip, tiny grid under TRITON_INTERPRET=1
#
# Exit status: 0 when both steps passed, else the first failing step's status.
#
# With device time left after it: `python benchmarks/gpu_tune.py` (about 4 minutes) times other tile sizes and
# warps per kernel against nn.LSTM, for setting ops._blocks and the launch options from measurements.
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python}"

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
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

if [[ $pytest_status -ne 0 ]]; then exit "$pytest_status"; fi
exit "$grid_status"
