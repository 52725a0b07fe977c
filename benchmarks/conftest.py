"""pytest-benchmark settings: record torch/triton versions and the fastlstm backends in the JSON."""

import os

import pytest
import torch

from fastlstm.__main__ import machine_header, timing_notes

DEVICE = os.environ.get("FASTLSTM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"FASTLSTM_BENCH_DEVICE must be one of cpu, cuda; got {DEVICE!r}")
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError("FASTLSTM_BENCH_DEVICE=cuda, but torch sees no CUDA device here")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "0")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastlstm"] = machine_header(DEVICE)


def pytest_report_header(config):
    return [f"fastlstm: note: {note}" for note in timing_notes()]
