"""In one process, interleaved: the cpp backend's inference with every layer of the stack in one call
(cpp_lstm_stack_fwd) against the same layers called one by one (CppBackend.has_inference_stack off, which is what
ran before), each on a model of its own, with nn.LSTM (and, for steps, ATen's cells: backend native) beside them.

    python benchmarks/inference_stack_ab.py {step,forward} OUT.json SHAPE[,SHAPE...] [--repeats N] [--layers-first]
        [--autocast-bf16]

step: each shape's T steps fed one a call with the state carried, as `python -m fastlstm bench --mode step` runs
them (nn.LSTM on 1-step sequences); forward: whole inference calls. Times per step / per call, medians of the
repeats. Whichever of the two fastlstm ways runs first after nn.LSTM measured up to 15% slower on a loaded 2-core
host (nn.LSTM's memory traffic before it), so run both orders (--layers-first swaps them). --autocast-bf16 runs
every way under torch.autocast("cpu", dtype=torch.bfloat16), float32 models.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from fastlstm import benchmark
from fastlstm.backends import cpu


def _forward(model, x, inner: int):
    def run():
        with torch.no_grad():
            for _ in range(inner):
                model(x)

    return run


def _under_autocast(run, bf16: bool):
    def region():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            run()

    return region


def _one_call_unless_layered(name: str) -> None:
    cpu.CppBackend.has_inference_stack = name != "layer by layer"


def main() -> None:
    parser = benchmark.ab_parser(__doc__)
    parser.add_argument("--layers-first", action="store_true")
    parser.add_argument("--autocast-bf16", action="store_true")
    args = benchmark.parse_ab_args(parser)
    results = {}
    for shape in args.shapes:
        label = str(shape)
        models = benchmark.make_models(shape, ["cpp", "native"], "cpu", torch.float32)
        twin = copy.deepcopy(models["fastlstm[cpp]"])
        x = torch.randn(shape.seq_len, shape.batch, shape.input_size)
        if args.mode == "step":
            per = shape.seq_len  # times per step
            ways = {
                "one call": benchmark._step(models["fastlstm[cpp]"], x, "step", shape),
                "layer by layer": benchmark._step(twin, x, "step", shape),
                "ATen cells": benchmark._step(models["fastlstm[native]"], x, "step", shape),
                "nn.LSTM": benchmark._step(models["nn.LSTM"], x, "step", shape),
            }
        else:
            per = benchmark.calls_per_run(shape)
            pairs = (("one call", models["fastlstm[cpp]"]), ("layer by layer", twin), ("nn.LSTM", models["nn.LSTM"]))
            ways = {name: _forward(m, shape.model_input(x), per) for name, m in pairs}
        order = ["layer by layer", "one call"] if args.layers_first else ["one call", "layer by layer"]
        order += [name for name in ways if name not in order]
        runs = {name: _under_autocast(ways[name], args.autocast_bf16) for name in order}
        times = benchmark.interleaved_us(runs, args.repeats, per, _one_call_unless_layered)
        cpu.CppBackend.has_inference_stack = True
        summary = benchmark.ab_summary(label, times, ("layer by layer", "one call"))
        results[label] = {"order": order, **summary}
    benchmark.write_ab_json(args.out, results, mode=args.mode, autocast_bf16=args.autocast_bf16, repeats=args.repeats)


if __name__ == "__main__":
    main()
