"""benchmarks/gpu_grid.py's pieces that decide what a GPU run measures and how it reports it (the run itself
needs a GPU; `bash benchmarks/gpu_check.sh --dry-run` smoke-tests it on the CPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytest.importorskip("triton")

_spec = importlib.util.spec_from_file_location(
    "gpu_grid", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_grid.py")
)
gpu_grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_grid)


def _shape(batch, hidden, mode):
    return dict(batch=batch, hidden=hidden, seq=100, layers=1, dtype="bf16", input=hidden, mode=mode)


def test_variants_time_the_other_kernel_and_the_loop_without_its_graph():
    from fastlstm.backends.triton import graphs, ops

    small = gpu_grid.variant_envs(_shape(16, 128, "inference"), torch)  # auto: sequence
    assert small == {
        "step": {ops.ENV_KERNEL: "step"},
        "step (no graph)": {ops.ENV_KERNEL: "step", graphs.ENV: "0"},
    }
    mid = gpu_grid.variant_envs(_shape(16, 512, "training"), torch)  # auto: step; no graph in training
    assert mid == {"sequence": {ops.ENV_KERNEL: "sequence"}}
    assert gpu_grid.variant_envs(_shape(256, 1024, "training"), torch) == {}


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
