"""pytest-benchmark suite: each group is one shape and mode, nn.LSTM beside fastlstm's auto and the device's fast
backend (cpp, triton) where available.

    pytest benchmarks/ --benchmark-enable --benchmark-json=bench.json
    python benchmarks/report.py bench.json --plot bench.png

FASTLSTM_BENCH_GRID=tiny runs a two-shape grid (a smoke test of the suite itself); FASTLSTM_BENCH_DTYPE=bfloat16
or float16 times that dtype (default float32); FASTLSTM_BENCH_DEVICE=cpu times the CPU on a CUDA machine (default:
cuda where torch sees a GPU).
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


def _setting(name: str, choices, default: str) -> str:
    """An environment variable of the suite's, one of `choices`: else a usage error naming them."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise pytest.UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


GRID = _setting("FASTLSTM_BENCH_GRID", GRIDS, "default")
SHAPES = GRIDS[GRID]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE = DTYPES[_setting("FASTLSTM_BENCH_DTYPE", DTYPES, "float32")]


def _providers() -> list[str]:
    providers = ["nn.LSTM", "auto"]
    if backends.get(FAST).unavailable_reason() is None:
        providers.append(FAST)
    return providers


def _sync() -> None:
    """Waits for the GPU: a timed call on CUDA returns once its kernels are queued, not done."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("mode", ["inference", "training", "training-data"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lstm(benchmark, shape, mode, provider):
    """One call: inference, a training step whose input needs a gradient (a layer fed by trained layers), or
    one whose input needs none (training-data: a first layer fed data, where the fast backends skip dx)."""
    backend_names = [] if provider == "nn.LSTM" else [provider]
    models = make_models(shape, backend_names, DEVICE, DTYPE)
    model = models["nn.LSTM" if provider == "nn.LSTM" else f"fastlstm[{provider}]"]
    x = torch.randn(shape.seq_len, shape.batch, shape.input_size, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"{shape} {mode} {str(DTYPE)[6:]} {DEVICE}"
    if mode == "inference":

        def run():
            with torch.no_grad():
                out = model(x)
            _sync()
            return out

    else:
        xg = x.detach().requires_grad_(mode == "training")

        def run():
            model.zero_grad(set_to_none=True)
            y, (h, c) = model(xg)
            (y.float().sum() + h.float().sum() + c.float().sum()).backward()
            _sync()
            return y

    result = benchmark(run)
    y = result[0] if mode == "inference" else result
    assert torch.isfinite(y.float()).all()


LENGTHS_SHAPES = {"tiny": [Shape(4, 12, 8, 8)], "default": [Shape(16, 500, 128, 128), Shape(64, 200, 256, 256)]}


@pytest.mark.parametrize("provider", ["nn.LSTM packed", "fastlstm packed", "fastlstm lengths="])
@pytest.mark.parametrize("shape", LENGTHS_SHAPES[GRID], ids=str)
def test_padded_lengths_vs_packing(benchmark, shape, provider):
    """A padded batch of variable lengths: pack -> LSTM -> unpack against fastlstm's lengths= (inference)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    models = make_models(shape, ["auto"], DEVICE, DTYPE)
    model = models["nn.LSTM" if provider.startswith("nn.LSTM") else "fastlstm[auto]"]
    x = torch.randn(shape.seq_len, shape.batch, shape.input_size, device=DEVICE, dtype=DTYPE)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, shape.seq_len + 1, (shape.batch,), generator=gen)
    lengths[0] = shape.seq_len
    benchmark.group = f"{shape} variable lengths inference {str(DTYPE)[6:]} {DEVICE}"

    def packed():
        with torch.no_grad():
            out, _ = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
            y = pad_packed_sequence(out, total_length=shape.seq_len)[0]
        _sync()
        return y

    def padded():
        with torch.no_grad():
            y = model(x, lengths=lengths)[0]
        _sync()
        return y

    y = benchmark(padded if provider.endswith("lengths=") else packed)
    assert y.shape == (shape.seq_len, shape.batch, shape.hidden_size)


STEP_SHAPES = {"tiny": [Shape(1, 1, 8, 8, 2)], "default": [Shape(1, 1, 128, 256, 2), Shape(8, 1, 256, 512, 2)]}


@pytest.mark.parametrize("provider", ["nn.LSTM T=1", "fastlstm.step"])
@pytest.mark.parametrize("shape", STEP_SHAPES[GRID], ids=str)
def test_streaming_step_latency(benchmark, shape, provider):
    """Per-step latency of streaming inference: nn.LSTM on 1-step chunks carrying state, or fastlstm.step."""
    models = make_models(shape, ["auto"], DEVICE, DTYPE)
    x = torch.randn(shape.batch, shape.input_size, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"{shape} streaming step {str(DTYPE)[6:]} {DEVICE}"
    state = {"value": None}
    if provider == "fastlstm.step":
        model = models["fastlstm[auto]"]

        def run():
            with torch.no_grad():
                y, state["value"] = model.step(x, state["value"])
            _sync()
            return y

    else:
        model = models["nn.LSTM"]

        def run():
            with torch.no_grad():
                y, state["value"] = model(x[None], state["value"])
            _sync()
            return y[0]

    y = benchmark(run)
    assert y.shape == (shape.batch, shape.hidden_size)


# (shape of one sample, samples)
PER_SAMPLE_SHAPES = {
    "tiny": [(Shape(1, 6, 8, 8), 3)],
    "default": [(Shape(1, 50, 64, 128), 32), (Shape(4, 100, 128, 256), 16)],
}


@pytest.mark.parametrize("provider", ["nn.LSTM loop", "fastlstm vmap(grad)"])
@pytest.mark.parametrize("shape,samples", PER_SAMPLE_SHAPES[GRID], ids=str)
def test_per_sample_gradients(benchmark, shape, samples, provider):
    """Every parameter's gradient for each of `samples` samples (differential privacy): a loop of nn.LSTM backward
    passes, which is what nn.LSTM offers (its vmap has no batching rule), against torch.func.vmap(grad)."""
    models = make_models(shape, ["auto"], DEVICE, DTYPE)
    xs = torch.randn(samples, shape.seq_len, shape.batch, shape.input_size, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"{shape} x{samples} samples per-sample gradients {str(DTYPE)[6:]} {DEVICE}"
    if provider == "nn.LSTM loop":
        model = models["nn.LSTM"]

        def run():
            grads = []
            for x in xs:
                model.zero_grad()
                model(x)[0].square().sum().backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            out = [torch.stack(g) for g in zip(*grads)]
            _sync()
            return out

    else:
        model = models["fastlstm[auto]"]
        params = {name: p.detach() for name, p in model.named_parameters()}
        loss = lambda p, x: torch.func.functional_call(model, p, (x,))[0].square().sum()  # noqa: E731
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))

        def run():
            out = list(per_sample(params, xs).values())
            _sync()
            return out

    grads = benchmark(run)
    assert [g.shape for g in grads] == [(samples, *p.shape) for p in models["nn.LSTM"].parameters()]
