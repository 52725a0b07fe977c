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

import contextlib
import copy

import torch

from fastlstm import benchmark, module
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


def _switch_to(way: str) -> None:
    module.LSTM._call_key, cpu.CppBackend.autocast_weights = _WAYS.get(way, _WAYS["now"])


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
    parser = benchmark.ab_parser(__doc__)
    parser.add_argument("--one-region", action="store_true")
    args = benchmark.parse_ab_args(parser)
    results = {}
    for shape in args.shapes:
        label = str(shape)
        models = benchmark.make_models(shape, ["cpp"], "cpu", torch.float32)
        fast = {way: copy.deepcopy(models["fastlstm[cpp]"]) for way in _WAYS}
        x = torch.randn(shape.seq_len, shape.batch, shape.input_size)
        if args.mode == "step":
            per = shape.seq_len  # times per step
            runs = {way: benchmark._step(m, x, "step", shape, _region) for way, m in fast.items()}
            runs["nn.LSTM"] = benchmark._step(models["nn.LSTM"], x, "step", shape, _region)
        else:
            per = benchmark.calls_per_run(shape)
            inp = shape.model_input(x)
            runs = {way: _forward(m, inp, per, args.one_region) for way, m in fast.items()}
            runs["nn.LSTM"] = _forward(models["nn.LSTM"], inp, per, args.one_region)
        times = benchmark.interleaved_us(runs, args.repeats, per, _switch_to, alternate=True)
        _switch_to("now")
        results[label] = benchmark.ab_summary(label, times, ("before", "now"), ("nn.LSTM", "now"))
    benchmark.write_ab_json(args.out, results, mode=args.mode, one_region=args.one_region, repeats=args.repeats)


if __name__ == "__main__":
    main()
