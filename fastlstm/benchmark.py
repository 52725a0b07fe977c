"""Side-by-side timing of fastlstm against nn.LSTM with the same weights, interleaved, ratio of medians.

Shared and noisy machines make absolute times drift; interleaving the providers round by round and
comparing medians taken in the same process keeps the ratio honest.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fastlstm.module import LSTM, TORCH_LSTM


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False  # a PackedSequence of unsorted lengths in [T/2, T] (see sequence_lengths)

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'B,T,I,H[,L[,bi]]' (e.g. '32,100,256,256,2,bi') or the label tables print ('B32-T100-I256-H256-L2-bi';
        with a projection 'B32-T100-I256-H256-P128-L2-bi'; packed input '...-L2-bi-packed')."""
        pattern = r"B(\d+)-T(\d+)-I(\d+)-H(\d+)(?:-P(\d+))?(?:-L(\d+))?(-bi)?(-packed)?"
        label = re.fullmatch(pattern, text.strip())
        expected = "B,T,I,H[,L[,bi]] (positive integers) or B32-T100-I256-H256[-P128]-L2[-bi][-packed]"
        if label:
            b, t, i, h, p, layers, bi, packed = label.groups()
            numbers = [int(b), int(t), int(i), int(h), int(layers or 1)]
            if min(numbers) < 1:
                raise ValueError(f"shape {text!r}: expected {expected}")
            if int(p or 0) >= numbers[3]:
                raise ValueError(f"shape {text!r}: the projection P must be smaller than the hidden size H")
            return cls(*numbers, bidirectional=bi is not None, proj_size=int(p or 0), packed=packed is not None)
        parts = text.split(",")
        bidirectional = parts[-1].strip() == "bi"
        try:
            numbers = [int(p) for p in (parts[:-1] if bidirectional else parts)]
        except ValueError:
            numbers = []
        if not 4 <= len(numbers) <= 5 or min(numbers) < 1:
            raise ValueError(f"shape {text!r}: expected {expected}")
        return cls(*numbers, bidirectional=bidirectional)

    def __str__(self) -> str:
        text = f"B{self.batch}-T{self.seq_len}-I{self.input_size}-H{self.hidden_size}"
        text += (f"-P{self.proj_size}" if self.proj_size else "") + f"-L{self.num_layers}"
        return text + ("-bi" if self.bidirectional else "") + ("-packed" if self.packed else "")

    @property
    def streamable(self) -> bool:
        """Whether step mode can feed it one step a call: the reverse direction reads the future, and a packed
        batch has no one step to feed."""
        return not (self.bidirectional or self.packed)

    def sequence_lengths(self) -> torch.Tensor | None:
        """Per-sequence lengths of a packed shape: the first T, the rest uniform in [ceil(T/2), T], unsorted;
        the same on every call (seeded), so that every provider gets the same batch. None when not packed."""
        if not self.packed:
            return None
        g = torch.Generator().manual_seed(self.batch * 1000 + self.seq_len)
        lengths = torch.randint((self.seq_len + 1) // 2, self.seq_len + 1, (self.batch,), generator=g)
        lengths[0] = self.seq_len
        return lengths

    def model_input(self, x: torch.Tensor) -> torch.Tensor | PackedSequence:
        """x [T, B, I] as the models take it: itself, or packed by sequence_lengths()."""
        lengths = self.sequence_lengths()
        return x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)


# The CPU target grid of the C++ backend: batch 1-64, hidden 64-512 (odd sizes too), seq 35-500, 1-3 layers.
CPU_FULL_GRID = [
    Shape(1, 100, 128, 128),
    Shape(1, 500, 64, 64),
    Shape(1, 100, 512, 512),
    Shape(2, 200, 384, 384),
    Shape(4, 35, 200, 200, 2),
    Shape(8, 100, 256, 256),
    Shape(8, 35, 384, 384, 1, True),
    Shape(16, 100, 128, 128, 3),
    Shape(16, 500, 128, 128),
    Shape(32, 100, 256, 256),
    Shape(32, 35, 512, 512, 2, True),
    Shape(64, 35, 200, 200),
    Shape(64, 50, 64, 64, 2, True),
    Shape(64, 100, 512, 512),
]

# Short sequences (one call per chunk of a stream, truncated backpropagation): where oneDNN's per-call setup
# weighs most; the float32 dispatch rule for them rests on this grid.
CPU_SHORT_GRID = [Shape(b, t, h, h) for b in (8, 16, 32, 64) for t in (1, 10) for h in (128, 256, 512)]

DEFAULT_GRID = {
    "cpu": [
        Shape(1, 100, 128, 128),
        Shape(8, 100, 256, 256),
        Shape(32, 100, 256, 256),
        Shape(16, 50, 200, 200, 2, True),
        Shape(64, 50, 512, 512),
    ],
    "cuda": [
        Shape(1, 200, 256, 256),
        Shape(8, 200, 512, 512),
        Shape(16, 200, 1024, 1024, 2),
        Shape(64, 200, 512, 512),
        Shape(256, 100, 1024, 1024),
    ],
}


@dataclass
class Result:
    shape: str
    mode: str  # "inference", "step" (streaming: the sequence fed one step a call), or one of TRAINING_MODES
    provider: str  # "nn.LSTM" or "fastlstm[backend]"
    backends_used: str
    median_ms: float
    times_ms: list[float] = field(repr=False)
    speedup: float = 1.0  # nn.LSTM's median over this provider's

    def as_dict(self) -> dict:
        # rounds: the timed calls the median is of (the repeats asked for, rounded up to whole cycles of the order)
        return {**asdict(self), "rounds": len(self.times_ms)}


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":

        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return cuda_time

    def cpu_time(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu_time


def output_data(y: torch.Tensor | PackedSequence) -> torch.Tensor:
    """A model's output as one tensor: a PackedSequence's data, else the tensor itself."""
    return y.data if isinstance(y, PackedSequence) else y


def make_models(shape: Shape, backends: list[str], device, dtype) -> dict[str, nn.Module]:
    """nn.LSTM and one fastlstm.LSTM per backend, all with the same weights."""
    config = dict(bidirectional=shape.bidirectional, proj_size=shape.proj_size)
    ref = TORCH_LSTM(shape.input_size, shape.hidden_size, shape.num_layers, **config)
    ref = ref.to(device=device, dtype=dtype)
    models: dict[str, nn.Module] = {"nn.LSTM": ref}
    for name in backends:
        fast = LSTM(shape.input_size, shape.hidden_size, shape.num_layers, **config, backend=name)
        fast = fast.to(device=device, dtype=dtype)
        fast.load_state_dict(ref.state_dict())
        models[f"fastlstm[{name}]"] = fast
    return models


def autocast_region(device_type: str, dtype: torch.dtype | None):
    """A context manager factory: torch.autocast(device_type, dtype) when dtype is given, else a no-op."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


# What nn.LSTM's row says it ran on where it ran with oneDNN off (nn_lstm_region); `bench` notes such rows.
NN_LSTM_ONEDNN_OFF = "native (nn.LSTM, oneDNN off)"


def nn_lstm_region(model: nn.Module, x: torch.Tensor, mode: str, shape: Shape, region, onednn_off: bool | None = None):
    """The region nn.LSTM runs a mode in: region() (autocast's), with oneDNN off as well where nn.LSTM's oneDNN path
    cannot run the call under CPU autocast (float16 training; bfloat16 on CPUs without AVX-512: "could not create
    a primitive descriptor"), as fastlstm computes it there. onednn_off: what an earlier probe of this call found;
    None tries the call once. Returns (region, whether oneDNN is off, the tried call's validation_results or None)."""
    if region is contextlib.nullcontext or x.device.type != "cpu":
        return region, False, None
    if onednn_off is None:
        try:
            return region, False, validation_results(model, x, mode, shape, region)
        except RuntimeError as error:
            if "primitive descriptor" not in str(error):
                raise
        finally:
            model.zero_grad(set_to_none=True)
    elif not onednn_off:
        return region, False, None

    @contextlib.contextmanager
    def without_onednn():
        with torch.backends.mkldnn.flags(enabled=False), region():
            yield

    return without_onednn, True, None


# "training": the input gets a gradient too, as a layer inside a model; "training-data": it needs none, as a first
# layer fed data (raw features, a frozen embedding), where a backward can leave the input's gradient out.
TRAINING_MODES = ("training", "training-data")


def _training_input(x: torch.Tensor, mode: str) -> torch.Tensor:
    return x.detach().requires_grad_(mode == "training")


def _step(model: nn.Module, x: torch.Tensor, mode: str, shape: Shape, region=contextlib.nullcontext):
    """One timed run of a mode, inside one region() (an autocast region, as a model's caller opens one a call, a
    training step, or a stream)."""
    if mode == "step":  # x fed one step a call, (h, c) carried: nn.LSTM on 1-step sequences, fastlstm's step()
        one_step = _one_step(model)

        def stream():
            state = None
            with torch.no_grad(), region():
                for x_t in x:
                    y, state = one_step(x_t, state)
            return y

        return stream
    if mode == "inference":
        inp = shape.model_input(x)

        def infer():
            with torch.no_grad(), region():
                return model(inp)

        return infer

    def train():
        model.zero_grad(set_to_none=True)
        _training_run(model, _training_input(x, mode), shape, region)

    return train


def _one_step(model: nn.Module):
    """One streamed step, (x_t, state) -> (y_t, state): fastlstm's step(), nn.LSTM on a 1-step sequence."""
    return model.step if isinstance(model, LSTM) else lambda x_t, state: model(x_t[None], state)


def _training_run(model: nn.Module, xg: torch.Tensor, shape: Shape, region):
    """A training mode's run: forward in region(), backward of the sum of y, h_n and c_n. Returns (y, (h, c))."""
    with region():
        y, (h, c) = model(shape.model_input(xg))  # packing is part of the step: the gradient flows through it
        loss = output_data(y).float().sum() + h.float().sum() + c.float().sum()
    loss.backward()  # outside autocast, as torch's AMP recipes run it
    return y, (h, c)


def validation_results(model: nn.Module, x: torch.Tensor, mode: str, shape: Shape, region) -> dict[str, torch.Tensor]:
    """What one run of a mode computes, for comparing providers before they are timed: inference's outputs; the
    training run's outputs and every gradient (input and parameters, of _training_run's loss); the streamed
    steps' outputs and final state (at most 16 steps)."""
    if mode == "step":
        one_step = _one_step(model)
        state, ys = None, []
        with torch.no_grad(), region():
            for x_t in x[:16]:
                y, state = one_step(x_t, state)
                ys.append(y.reshape(x_t.shape[0], -1))
        return {"y": torch.stack(ys), "h_n": state[0], "c_n": state[1]}
    if mode == "inference":
        with torch.no_grad(), region():
            y, (h, c) = model(shape.model_input(x))
        return {"y": output_data(y), "h_n": h, "c_n": c}
    xg = _training_input(x, mode)
    y, (h, c) = _training_run(model, xg, shape, region)
    grads = {f"{name}.grad": p.grad for name, p in model.named_parameters()}
    return {"y": output_data(y).detach(), "h_n": h.detach(), "c_n": c.detach(), "input.grad": xg.grad, **grads}


def time_shape(
    shape: Shape,
    backends: list[str],
    mode: str,
    device,
    dtype,
    repeats: int,
    warmup: int = 2,
    autocast: torch.dtype | None = None,
    onednn_off: bool | None = None,
) -> list[Result]:
    """Interleaved timing of nn.LSTM and each fastlstm backend on one shape and mode; with autocast, every run
    of every provider under torch.autocast(device, autocast). onednn_off: nn_lstm_region's, known from a check."""
    from fastlstm.explain import explain

    device = torch.device(device)
    models = make_models(shape, backends, device, dtype)
    x = torch.randn(shape.seq_len, shape.batch, shape.input_size, device=device, dtype=dtype)
    region = autocast_region(device.type, autocast)
    regions = {name: region for name in models}
    regions["nn.LSTM"], onednn_off, _ = nn_lstm_region(models["nn.LSTM"], x, mode, shape, region, onednn_off)
    steps = {name: _step(m, x, mode, shape, regions[name]) for name, m in models.items()}
    timer = _timer(device)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(_whole_cycles(repeats, len(names))):
        for name in _round_order(names, repeat):
            times[name].append(timer(steps[name]))
    base = statistics.median(times["nn.LSTM"])
    results = []
    with torch.set_grad_enabled(mode in TRAINING_MODES), region():
        for name, samples in times.items():
            model = models[name]
            if name == "nn.LSTM":
                used = NN_LSTM_ONEDNN_OFF if onednn_off else "native (nn.LSTM)"
            else:
                # a step is a 1-step sequence to dispatch; training's input needs a gradient or not, as timed
                timed = _training_input(x, mode) if mode in TRAINING_MODES else x
                called = x[:1] if mode == "step" else shape.model_input(timed)
                used = ",".join(sorted(set(explain(model, called).backends)))
            median = statistics.median(samples)
            results.append(Result(str(shape), mode, name, used, median, samples, base / median))
    return results


def _whole_cycles(repeats: int, providers: int) -> int:
    """`repeats` rounded up to whole cycles of _round_order: only a whole cycle is balanced (three providers at
    bench's default 10 rounds: one backend had followed nn.LSTM 4 times, the other 2; a reviewer found it)."""
    cycle = providers if providers % 2 == 0 else 2 * providers
    return -(-repeats // cycle) * cycle


def _round_order(names: list[str], repeat: int) -> list[str]:
    """The order of timed round `repeat`: a run right after nn.LSTM's measured slower than the same work later in
    the round (auto and cpp on one kernel, B16-T50-H256 training, 2-core Zen 4: in 15 runs of 16, by up to 2.5%;
    B64-T50-H128 bfloat16 training, 2-core Xeon: 5-8%, whichever came first). The rounds go through a balanced
    Latin square (Williams's design): over each cycle (n rounds for n providers, n even; 2n, n odd) every provider
    takes every place equally often and follows every other provider equally often (once, n even; twice, n odd).
    Rotations alone keep each provider's neighbours: with two fastlstm backends one of them had followed nn.LSTM
    in two rounds of three."""
    n = len(names)
    first = [0]
    for k in range(1, n):  # 0, 1, n-1, 2, n-2, ...
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    rows = [[(place + shift) % n for place in first] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [names[i] for i in rows[repeat % len(rows)]]


def calls_per_run(shape: Shape) -> int:
    """How many inference calls of a shape one timed run of the A/B scripts (benchmarks/*_ab.py) makes: enough
    that a run of small calls lasts long enough to time."""
    if shape.seq_len * shape.batch * shape.hidden_size <= 4096:
        return 200
    return 20 if shape.seq_len <= 10 else 2


def interleaved_us(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    per: int = 1,
    switch: Callable[[str], object] | None = None,
    alternate: bool = False,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Microseconds per unit (a run's time / per) of each run, round by round in one process, after warmup
    rounds. switch(name) runs before each run, untimed (the A/B scripts switch their way on there); alternate:
    every other round in reverse order."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats + warmup):
        for name in names[::-1] if alternate and repeat % 2 == 0 else names:
            if switch is not None:
                switch(name)
            start = time.perf_counter()
            runs[name]()
            if repeat >= warmup:
                times[name].append((time.perf_counter() - start) * 1e6 / per)
    return times


def check_script_arguments(parser, shapes: list[Shape], json_path: str | None, step: bool = False) -> None:
    """What the benchmark scripts check after parsing, as argparse errors before any timing: no shape twice (their
    results are keyed by its label: the second run replaced the first), in step mode only shapes a stream can feed
    (as bench), and a JSON path that can be written (a run had ended in a traceback there, its results lost)."""
    from fastlstm.__main__ import _unwritable

    labels = [str(shape) for shape in shapes]
    twice = next((label for k, label in enumerate(labels) if label in labels[:k]), None)
    if twice:
        parser.error(f"shape {twice} given twice (results are kept by shape)")
    unstreamed = next((shape for shape in shapes if not shape.streamable), None)
    if step and unstreamed:
        parser.error(f"step mode streams unidirectional, unpacked shapes, not {unstreamed}")
    problem = _unwritable(json_path) if json_path is not None else None
    if problem:
        parser.error(f"{json_path}: {problem}")


def parse_ab_args(parser):
    """An A/B script's arguments (ab_parser's and its own), checked (check_script_arguments)."""
    args = parser.parse_args()
    check_script_arguments(parser, args.shapes, args.out, step=args.mode == "step")
    return args


def ab_parser(doc: str):
    """The arguments every A/B script takes: mode (step or forward), the JSON to write, shapes (labels separated by
    commas, as `bench --shape` takes them, parsed into a list of Shape), --repeats; bad values are argparse's
    errors, before any timing."""
    import argparse

    from fastlstm.__main__ import _positive_int, _shape_argument

    def shape_list(text: str) -> list[Shape]:
        labels = text.split(",")
        odd = next((label for label in labels if not label.strip().startswith("B")), None)
        if odd is not None:  # Shape.parse's other form, B,T,I,H, cannot pass: commas separate the shapes here
            raise argparse.ArgumentTypeError(
                f"shape {odd!r}: expected labels like B32-T100-I256-H256[-P128]-L2[-bi][-packed], separated by commas"
            )
        return [_shape_argument(label) for label in labels]

    shape_list.__name__ = "shape list"  # argparse names the type in its error
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("mode", choices=["step", "forward"])
    parser.add_argument("out")
    parser.add_argument("shapes", type=shape_list)
    parser.add_argument("--repeats", type=_positive_int, default=15)
    return parser


def ab_summary(label: str, times: dict[str, list[float]], *ratios: tuple[str, str]) -> dict:
    """Print one line for an A/B shape, each way's median and the ratios of the (numerator, denominator) ways
    named; returns its JSON entry."""
    median = {name: statistics.median(t) for name, t in times.items()}
    text = ", ".join(f"{name} {us:.1f} us" for name, us in median.items())
    text += " | " + ", ".join(f"{a} / {b} {median[a] / median[b]:.2f}x" for a, b in ratios)
    print(f"{label}: {text}", flush=True)
    return {"us_median": median, "us": times}


def write_ab_json(path: str, results: dict, **run) -> None:
    """An A/B script's JSON: its run's settings, the machine as bench's header gives it (CPU, torch, threads, ...),
    and each shape's entry."""
    from fastlstm.__main__ import machine_header

    with open(path, "w") as f:
        json.dump({**run, "machine": machine_header("cpu"), "results": results}, f, indent=1)


def geometric_mean(values: list[float]) -> float:
    values = [v for v in values if v > 0]
    if not values:
        return float("nan")
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values))
