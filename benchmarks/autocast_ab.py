"""In one process, interleaved: calls under CPU bfloat16 autocast as fastlstm runs them now (each kind of call
checked once and remembered with autocast's dtypes; cpp's weights from autocast's cache of casts), with the
weights cast on every call instead, and as before both (every call checked, its weights cast), with nn.LSTM
beside them. Each way on a model of its own, float32 models.

    python benchmarks/autocast_ab.py {step,forward} OUT.json SHAPE[,SHAPE...] [--repeats N] [--one-region]

step: each shape's T steps fed one a call with the state carried, the whole stream in one autocast region (as
`python -m fastlstm bench --mode step --autocast bfloat16` runs it); forward: whole inference calls, each in an
autocast region of its own, or with --one-region all the calls of a timed run in one (a stream fed in chunks).
Times per step / per call, medians of the repeats; the order of the ways turns round by round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch

from fastlstm import benchmark, module
from fastlstm.__main__ import _shape_argument
from fastlstm.backends import Backend, cpu

_REMEMBERED = module.LSTM._call_key
_FROM_CACHE = cpu.CppBackend.autocast_weights


def _checked_every_call(self, input, hx):
    """_call_key as it was before calls under autocast were remembered: None (check again) under autocast."""
    return None if torch._C._is_any_autocast_enabled() else _REMEMBERED(self, input, hx)


# way -> (LSTM._call_key, CppBackend.autocast_weights)
_WAYS = {
    "now": (_REMEMBERED, _FROM_CACHE),
    "weights cast each call": (_REMEMBERED, Backend.autocast_weights),
    "before": (_checked_every_call, Backend.autocast_weights),
}


def _region():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _forward(model, x, calls: int, one_region: bool):
    def run():
        with torch.no_grad(), _region() if one_region else contextlib.nullcontext():
            for _ in range(calls):
                with contextlib.nullcontext() if one_region else _region():
                    model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["step", "forward"])
    parser.add_argument("out")
    parser.add_argument("shapes")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--one-region", action="store_true")
    args = parser.parse_args()
    results = {}
    for label in args.shapes.split(","):
        shape = _shape_argument(label)
        models = benchmark.make_models(shape, ["cpp"], "cpu", torch.float32)
        fast = {way: copy.deepcopy(models["fastlstm[cpp]"]) for way in _WAYS}
        x = torch.randn(shape.seq_len, shape.batch, shape.input_size)
        if args.mode == "step":
            per = shape.seq_len  # times per step
            runs = {way: benchmark._step(m, x, "step", shape, _region) for way, m in fast.items()}
            runs["nn.LSTM"] = benchmark._step(models["nn.LSTM"], x, "step", shape, _region)
        else:
            per = 200 if shape.seq_len * shape.batch * shape.hidden_size <= 4096 else 20 if shape.seq_len <= 10 else 2
            inp = shape.model_input(x)
            runs = {way: _forward(m, inp, per, args.one_region) for way, m in fast.items()}
            runs["nn.LSTM"] = _forward(models["nn.LSTM"], inp, per, args.one_region)
        order = list(runs)
        times: dict[str, list[float]] = {name: [] for name in order}
        for repeat in range(args.repeats + 2):  # two rounds of warm-up
            for name in order if repeat % 2 else order[::-1]:
                module.LSTM._call_key, cpu.CppBackend.autocast_weights = _WAYS.get(name, _WAYS["now"])
                start = time.perf_counter()
                runs[name]()
                if repeat >= 2:
                    times[name].append((time.perf_counter() - start) * 1e6 / per)
        module.LSTM._call_key, cpu.CppBackend.autocast_weights = _WAYS["now"]
        median = {name: statistics.median(t) for name, t in times.items()}
        results[label] = {"us_median": median, "us": times}
        print(
            f"{label}: " + ", ".join(f"{name} {us:.1f} us" for name, us in median.items())
            + f" | before / now {median['before'] / median['now']:.2f}x,"
            + f" nn.LSTM / now {median['nn.LSTM'] / median['now']:.2f}x",
            flush=True,
        )  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"mode": args.mode, "one_region": args.one_region, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
