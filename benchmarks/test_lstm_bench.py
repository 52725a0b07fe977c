"""pytest-benchmark suite: each group is one shape and mode, nn.LSTM beside every available fastlstm backend.

    pytest benchmarks/ --benchmark-enable --benchmark-json=bench.json
    python benchmarks/report.py bench.json --plot bench.png

FASTLSTM_BENCH_GRID=tiny runs a two-shape grid (a smoke test of the suite itself).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICE

from fastlstm import backends
from fastlstm.benchmark import DEFAULT_GRID, Shape, make_models

FAST = {"cpu": "cpp", "cuda": "triton"}[DEVICE]
GRIDS = {
    "tiny": [Shape(2, 8, 8, 8), Shape(3, 6, 8, 8, 2, True)],
    "default": DEFAULT_GRID[DEVICE],
}
SHAPES = GRIDS[os.environ.get("FASTLSTM_BENCH_GRID", "default")]
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
    os.environ.get("FASTLSTM_BENCH_DTYPE", "float32")
]


def _providers() -> list[str]:
    providers = ["nn.LSTM", "auto"]
    if backends.get(FAST).unavailable_reason() is None:
        providers.append(FAST)
    return providers


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lstm(benchmark, shape, mode, provider):
    backend_names = [] if provider == "nn.LSTM" else [provider]
    models = make_models(shape, backend_names, DEVICE, DTYPE)
    model = models["nn.LSTM" if provider == "nn.LSTM" else f"fastlstm[{provider}]"]
    x = torch.randn(shape.seq_len, shape.batch, shape.input_size, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"{shape} {mode} {str(DTYPE)[6:]} {DEVICE}"
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    if mode == "inference":

        def run():
            with torch.no_grad():
                out = model(x)
            sync()
            return out

    else:
        xg = x.detach().requires_grad_(True)

        def run():
            model.zero_grad(set_to_none=True)
            y, (h, c) = model(xg)
            (y.float().sum() + h.float().sum() + c.float().sum()).backward()
            sync()
            return y

    result = benchmark(run)
    y = result[0] if mode == "inference" else result
    assert torch.isfinite(y.float()).all()
