"""Training steps through a frozen layer (no weight needs a gradient; the input does), fastlstm against nn.LSTM,
in one process, interleaved: fastlstm leaves out the weight gradients' products there, nn.LSTM computes them.

    python benchmarks/frozen_weights.py SHAPE [SHAPE ...] [--dtype float32] [--backend auto] [--repeats 9]
        [--json FILE]

SHAPE as `python -m fastlstm bench --shape` takes it (B64-T100-I512-H512). Prints each shape's median step times
and nn.LSTM's time over fastlstm's; --json also writes them, with the machine, as the A/B scripts do.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fastlstm
from fastlstm import backends
from fastlstm.__main__ import DTYPES, _positive_int, _shape_argument
from fastlstm.benchmark import Shape, check_script_arguments, output_data, write_ab_json


def _models(shape: Shape, dtype: torch.dtype, backend: str) -> dict[str, nn.Module]:
    sizes = dict(num_layers=shape.num_layers, bidirectional=shape.bidirectional, proj_size=shape.proj_size)
    torch.manual_seed(0)
    native = nn.LSTM(shape.input_size, shape.hidden_size, **sizes).to(dtype).requires_grad_(False)
    fast = fastlstm.LSTM(shape.input_size, shape.hidden_size, **sizes, backend=backend).to(dtype)
    fast.load_state_dict(native.state_dict())
    return {"nn.LSTM": native, "fastlstm": fast.requires_grad_(False)}


def _step_time(model: nn.Module, x: torch.Tensor, shape: Shape) -> float:
    start = time.perf_counter()
    y, _ = model(shape.model_input(x.clone().requires_grad_()))
    output_data(y).float().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", type=_shape_argument)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--backend", choices=["auto", *backends.names()], default="auto")
    parser.add_argument("--repeats", type=_positive_int, default=9)
    parser.add_argument("--json", metavar="FILE", help="also write the medians and every time as JSON")
    args = parser.parse_args()
    check_script_arguments(parser, args.shapes, args.json)
    dtype = DTYPES[args.dtype]
    results = {}
    for shape in args.shapes:
        models = _models(shape, dtype, args.backend)
        x = torch.randn(shape.seq_len, shape.batch, shape.input_size, dtype=dtype)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(2):  # warm-up: the extension's build, kept memory
            for model in models.values():
                _step_time(model, x, shape)
        for round_ in range(args.repeats):
            for name in sorted(models, reverse=round_ % 2 == 1):  # the order turns round by round
                times[name].append(_step_time(models[name], x, shape))
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        speedup = median["nn.LSTM"] / median["fastlstm"]
        print(
            f"{shape} {args.dtype} frozen: nn.LSTM {median['nn.LSTM']:.2f} ms, fastlstm "
            f"{median['fastlstm']:.2f} ms, {speedup:.2f}x"
        )
        results[str(shape)] = {
            "median_ms": median, "speedup": speedup, "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}
        }  # fmt: skip
    if args.json:
        write_ab_json(args.json, results, dtype=args.dtype, backend=args.backend, repeats=args.repeats)


if __name__ == "__main__":
    main()
