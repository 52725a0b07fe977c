"""benchmarks/gpu_grid.py's and gpu_tune.py's pieces that decide what a GPU run measures and how it reports it
(the runs themselves need a GPU; `bash benchmarks/gpu_check.sh --dry-run` and `gpu_tune.py --dry-run`
smoke-test them on the CPU)."""

from __future__ import annotations

import importlib.util
import os

import torch
from helpers import require_triton

require_triton()

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_grid = _load("gpu_grid")
gpu_tune = _load("gpu_tune")


def _shape(batch, hidden, mode):
    return dict(batch=batch, hidden=hidden, seq=100, layers=1, dtype="bf16", input=hidden, mode=mode)


def test_variants_time_the_other_kernel_and_the_loop_without_its_graph():
    from fastlstm.backends.triton import graphs, ops

    small = gpu_grid.variant_envs(_shape(16, 128, "inference"), torch)  # auto: sequence
    assert small == {
        "step": {ops.ENV_KERNEL: "step"},
        "step (no graph)": {ops.ENV_KERNEL: "step", graphs.ENV: "0"},
    }
    mid = gpu_grid.variant_envs(_shape(16, 512, "training"), torch)  # auto: step, graphed in training too
    no_graph = {ops.ENV_KERNEL: "step", graphs.ENV: "0"}
    assert mid == {"sequence": {ops.ENV_KERNEL: "sequence"}, "step (no graph)": no_graph}
    assert gpu_grid.variant_envs(_shape(256, 1024, "training"), torch) == {"step (no graph)": no_graph}


def test_with_env_sets_and_restores(monkeypatch):
    monkeypatch.setenv("FASTLSTM_TRITON_KERNEL", "step")
    monkeypatch.delenv("FASTLSTM_TRITON_GRAPHS", raising=False)
    seen = []
    run = gpu_grid.with_env(
        {"FASTLSTM_TRITON_KERNEL": "sequence", "FASTLSTM_TRITON_GRAPHS": "0"},
        lambda: seen.append((os.environ["FASTLSTM_TRITON_KERNEL"], os.environ["FASTLSTM_TRITON_GRAPHS"])),
    )
    run()
    assert seen == [("sequence", "0")]
    assert os.environ["FASTLSTM_TRITON_KERNEL"] == "step" and "FASTLSTM_TRITON_GRAPHS" not in os.environ


def test_markdown_rows_have_the_header_s_cells():
    ok = dict(_shape(1, 128, "inference"), status="ok", native_ms=2.0, triton_ms=1.0, speedup=2.0,
              max_abs_diff_y=1e-3, variants={"step": dict(ms=1.5, speedup=1.33)})  # fmt: skip
    failed = dict(_shape(1, 128, "training"), status="error", error="RuntimeError: x | y")
    lines = gpu_grid.markdown(dict(gpu="g", torch="t", cuda="c", triton="tr", commit="x", date="d"), [ok, failed])
    table = [line for line in lines.splitlines() if line.startswith("|")]
    cells = {line.count("|") for line in table}
    assert len(cells) == 1, table
    assert "step 1.33x" in table[2] and "RuntimeError: x / y" in table[3]


def test_tune_candidates_are_valid_configurations():
    from fastlstm.backends.triton import ops

    for kernel, candidates in gpu_tune.CANDIDATES.items():
        assert kernel in ops.KERNELS and candidates[0] == ""  # the default is always timed
        for config in candidates[1:]:
            assert ops._parse_config(config)


def test_tune_markdown_marks_the_best_and_keeps_failures():
    row = dict(_shape(64, 512, "inference"), kernel="step", status="ok", native_ms=3.0, best="num_warps=8",
               candidates={"default": dict(ms=2.0, speedup=1.5), "num_warps=8": dict(ms=1.5, speedup=2.0),
                           "BLOCK_K=32": dict(error="CompilationError: out of resources")})  # fmt: skip
    skipped = dict(_shape(1, 256, "inference"), kernel="sequence", status="skipped", error="time budget spent")
    text = gpu_tune.markdown(dict(gpu="g", torch="t", cuda="c", triton="tr", commit="x", date="d"), [row, skipped])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table
    assert "**num_warps=8: 2x**" in table[2] and "BLOCK_K=32: failed (CompilationError" in table[2]
    assert "skipped: time budget spent" in table[3]


def test_host_cost_script_times_both_loops_and_puts_the_kernels_back():
    """benchmarks/triton_host_cost.py (its own process: it sets TRITON_INTERPRET=0 for the launchers' real path)
    prints a forward and a backward figure with and without a projection, and leaves the kernels as it found
    them."""
    from helpers import run_python

    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import triton_host_cost as h; "
        "from fastlstm.backends.triton import kernels; before = {n: getattr(kernels, n) for n in h.STEP_KERNELS}; "
        "assert h.main(['--steps', '5', '--reps', '2']) == 0; "
        "assert all(getattr(kernels, n) is k for n, k in before.items())"
    )
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["no projection", "projection 8"], done.stdout
    assert all(" us a step, backward " in line and line.endswith("us a step (host only)") for line in lines)


def test_float32_rows_also_time_tf32_dots():
    """cuDNN multiplies float32 in TF32 by default, triton only when torch's matmul switch says so: the grid times
    that way too, and puts the switch back."""
    from fastlstm.backends.triton.build_guard import _tf32_switch as read  # what the backend reads

    seen = []
    before = read()
    variants = gpu_grid.variants_of(dict(_shape(16, 512, "training"), dtype="fp32"), lambda: seen.append(read()), torch)
    assert list(variants) == ["sequence", "step (no graph)", "tf32"]
    variants["tf32"]()
    assert seen == [True] and read() == before
    assert "tf32" not in gpu_grid.variants_of(_shape(16, 512, "training"), lambda: None, torch)  # bf16


def test_graph_captures_counts_a_stream_of_lengths():
    """benchmarks/graph_captures.py: calls of any length share one configuration's chunk graphs, so a stream of
    200 lengths in 1-64 captures at most one graph per chunk length (7), launches only the first call's chunks
    step by step, and replays every later call's."""
    counts = _load("graph_captures").count(200, 64, 0)
    assert counts["captures"] <= 7 and counts["launched"] <= 7
    assert counts["replays"] >= 199
