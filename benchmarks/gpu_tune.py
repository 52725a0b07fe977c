"""Tile sizes and warps for the Triton kernels, timed against nn.LSTM (cuDNN) on the GPU at hand.

    python benchmarks/gpu_tune.py [--out DIR] [--budget SECONDS]      # on a CUDA machine, after gpu_check.sh
    TRITON_INTERPRET=1 python benchmarks/gpu_tune.py --dry-run         # tiny shapes on the CPU (smoke test)

The launch configuration (fastlstm/backends/triton/ops.py `_blocks`, num_warps 4) was chosen without a GPU,
from what the compiler reports for sm_90 (`tests/triton_compile.py --resources`, FASTLSTM_TRITON_CONFIG set):
e.g. bfloat16's forward step kernel at batch 256, hidden 1024 uses 255 registers and 32 bytes of stack a thread,
152 and none with BLOCK_K=32 and 8 warps; float32's default BLOCK_K (16) spills least of 16, 32 and 64. Which
runs faster only a GPU can say: for a few shapes per kernel this times each candidate of CANDIDATES (through
FASTLSTM_TRITON_CONFIG), interleaved with nn.LSTM, after checking its output against nn.LSTM's. A candidate
that fails to compile or disagrees is recorded as such. Writes gpu_tune.json and gpu_tune.md to --out (default
$OUT, else benchmarks/results/) after every shape.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_grid  # noqa: E402  (the same model building, timing and header)

# Per kernel: "" is the default configuration; the others override some of its tiles / launch options (float32's
# default BLOCK_K is 16, the others' 32 or 64: see ops._blocks).
CANDIDATES = {
    "step": [
        "",
        "num_warps=8",
        "BLOCK_K=32",
        "BLOCK_K=64",
        "BLOCK_K=32,num_warps=8",
        "BLOCK_H=32",
        "BLOCK_H=32,BLOCK_K=32",
        "BLOCK_B=16,BLOCK_K=32",
        "BLOCK_H=128,BLOCK_K=32,num_warps=8",
        "num_stages=1",
    ],
    "sequence": [
        "",
        "num_warps=8",
        "BLOCK_K=32",
        "BLOCK_K=64",
        "BLOCK_K=32,num_warps=8",
        "BLOCK_H=32",
        "BLOCK_H=128,num_warps=8",
        "BLOCK_B=32,num_warps=8",
        "num_stages=1",
    ],
}


def shapes(dry_run: bool) -> list[dict]:
    if dry_run:
        return [
            dict(batch=2, hidden=16, seq=3, layers=1, dtype="fp32", input=8, mode="inference", kernel="step"),
            dict(batch=2, hidden=16, seq=3, layers=1, dtype="fp32", input=8, mode="training", kernel="sequence"),
        ]
    rows = [
        dict(batch=64, hidden=512, dtype="fp32", mode="inference", kernel="step"),
        dict(batch=64, hidden=64, dtype="fp32", mode="training", kernel="step"),  # BLOCK_K=64 spilled 8 KB here
        dict(batch=64, hidden=512, dtype="bf16", mode="training", kernel="step"),
        dict(batch=16, hidden=512, dtype="bf16", mode="inference", kernel="step"),
        dict(batch=256, hidden=1024, dtype="bf16", mode="inference", kernel="step"),
        dict(batch=1, hidden=256, dtype="bf16", mode="inference", kernel="sequence"),
        dict(batch=16, hidden=256, dtype="fp32", mode="inference", kernel="sequence"),
        dict(batch=16, hidden=128, dtype="bf16", mode="training", kernel="sequence"),
        dict(batch=64, hidden=256, dtype="fp16", mode="inference", kernel="sequence"),
    ]
    return [dict(r, seq=100, layers=1, input=r["hidden"]) for r in rows]


def candidate_runs(shape: dict, torch, device: str):
    """(native run, {candidate: run}, {candidate: error}) for one shape; each run is a no-argument callable."""
    from fastlstm.backends.triton import ops

    dtype = getattr(torch, gpu_grid.DTYPES[shape["dtype"]])
    gpu_grid.check_supported(shape, torch, device)
    ref, fast, _ = gpu_grid.build(shape, torch, device)
    x = torch.randn(shape["seq"], shape["batch"], shape["input"], device=device, dtype=dtype)
    training = shape["mode"] == "training"
    if training:
        x.requires_grad_(True)
    run_fast = gpu_grid.make_step(fast, x, training, torch)
    with torch.no_grad():
        y_ref = ref(x)[0].float()
    allowed = 2e-2 * (1.0 + y_ref.abs().max().item())  # the self-test's float32 / TF32 tolerance, loosened
    runs, errors = {}, {}
    for config in CANDIDATES[shape["kernel"]]:
        env = {ops.ENV_KERNEL: shape["kernel"], ops.ENV_CONFIG: config}
        try:
            with torch.no_grad():
                y = output_with(env, fast, x)
            diff = (y.float() - y_ref).abs().max().item()
            if not diff <= allowed:
                errors[config] = f"max abs diff {diff:.3g} > {allowed:.3g}"
                continue
            runs[config] = gpu_grid.with_env(env, run_fast)
            runs[config]()  # compiles the training kernels too
        except Exception as error:
            runs.pop(config, None)
            errors[config] = f"{type(error).__name__}: {error}".strip()[:300]
    return gpu_grid.make_step(ref, x, training, torch), runs, errors


def output_with(env: dict[str, str], model, x):
    """The model's output y with these environment variables set."""
    got = []
    gpu_grid.with_env(env, lambda: got.append(model(x)[0]))()
    return got[0]


def run_shape(shape: dict, torch, device: str, reps: int, max_seconds: float) -> dict:
    native, runs, errors = candidate_runs(shape, torch, device)
    (nat, *meds), rounds = gpu_grid.interleaved_medians([native, *runs.values()], torch, device, reps, max_seconds)
    results = {config or "default": dict(ms=ms, speedup=nat / ms) for config, ms in zip(runs, meds)}
    results.update({config or "default": dict(error=e) for config, e in errors.items()})
    best = min(runs, key=lambda c: results[c or "default"]["ms"], default=None)
    return dict(status="ok", reps=rounds, native_ms=nat, candidates=results,
                best=None if best is None else best or "default")  # fmt: skip


def markdown(head: dict, rows: list[dict]) -> str:
    lines = [
        *gpu_grid.title_lines("fastlstm triton launch configurations vs nn.LSTM (cuDNN)", head),
        "Speedup of each FASTLSTM_TRITON_CONFIG over native (median native time / median candidate time), one",
        "shape per row, every candidate and native interleaved in the same process; the best is in bold.",
        "",
        "| mode | dtype | batch | hidden | seq | kernel | native ms | candidates |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        head_cells = f"| {r['mode']} | {r['dtype']} | {r['batch']} | {r['hidden']} | {r['seq']} | {r['kernel']} |"
        if r["status"] != "ok":
            error = f"{r['status']}: {r.get('error', '')}".replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"{head_cells}  | {error} |")
            continue
        cells = []
        for name, c in r["candidates"].items():
            text = f"{name}: {c['speedup']:.3g}x" if "speedup" in c else f"{name}: failed ({c['error'][:60]})"
            cells.append(f"**{text}**" if name == r["best"] else text)
        lines.append(f"{head_cells} {r['native_ms']:.3f} | {'; '.join(cells).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def keep_every_candidates_graph() -> None:
    """Room for every candidate's graphs (one configuration at inference, two in training: forward and backward):
    each tile configuration keeps its own, and with 10 candidates timed in turn against 8 kept configurations some
    were evicted before every replay, timing a fresh capture and the plain loop where the others replayed (seen
    with the graphs' own eviction, stubbed)."""
    from fastlstm.backends.triton import graphs

    most = max(len(c) for c in CANDIDATES.values())
    graphs.MAX_GRAPHS = max(graphs.MAX_GRAPHS, 2 * most)
    graphs.MAX_BYTES = max(graphs.MAX_BYTES, 2 * most * graphs.MAX_BYTES_ONE)


def main(argv=None) -> int:
    args = gpu_grid.parse_args(argv, __doc__.splitlines()[0], budget=240.0, reps=11)

    import torch

    device = gpu_grid.device_for(args, "gpu_tune", torch)
    if device is None:
        return 2
    keep_every_candidates_graph()

    def label(shape):
        return f"{shape['mode']} {shape['dtype']} B{shape['batch']} H{shape['hidden']} {shape['kernel']}"

    def summary(row):
        return f"best {row['best']}"

    stem = "gpu_tune_dry_run" if args.dry_run else "gpu_tune"
    todo = shapes(args.dry_run)
    return gpu_grid.run_all("gpu_tune", stem, todo, run_shape, label, summary, markdown, args, torch, device)


if __name__ == "__main__":
    sys.exit(main())
