"""fastlstm's float32 error against nn.LSTM's own, both measured against nn.LSTM in float64 with the same weights.

    python benchmarks/float64_accuracy.py [SHAPE ...] [--backend cpp] [--seeds 2]

For each shape, one training call (forward and backward, h0 and c0 given, every output in the loss): per tensor
(y, h_n, c_n, the gradients of x, h0, c0 and every weight), the mean and the largest absolute error of fastlstm,
each over nn.LSTM's. README's "Accuracy" figures come from it. The machine's products matter: oneDNN's, MKL's,
the C++ backend's own (FASTLSTM_ONEDNN_MIN_MACS chooses among the first two).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import fastlstm
from fastlstm import backends
from fastlstm.__main__ import _positive_int, _shape_argument
from fastlstm.benchmark import Shape

SHAPES = ["B7-T200-I64-H512-L1", "B32-T100-I128-H512-L2-bi", "B7-T100-I256-H1024-L1"]


def run(module: nn.Module, dtype: torch.dtype, inputs, grad_y) -> dict[str, torch.Tensor]:
    module = copy.deepcopy(module).to(dtype)
    x, h0, c0 = (t.to(dtype).clone().requires_grad_() for t in inputs)
    y, (h_n, c_n) = module(x, (h0, c0))
    ((y * grad_y.to(dtype)).sum() + h_n.sum() + c_n.sum()).backward()
    out = {"y": y, "h_n": h_n, "c_n": c_n, "dx": x.grad, "dh0": h0.grad, "dc0": c0.grad}
    out.update({f"d{name}": p.grad for name, p in module.named_parameters() if "bias" not in name})
    return {key: value.detach().double() for key, value in out.items()}


def ratios(shape: Shape, backend: str, seed: int) -> dict[str, tuple[float, float]]:
    I, H, T, B, layers = shape.input_size, shape.hidden_size, shape.seq_len, shape.batch, shape.num_layers
    bidirectional = shape.bidirectional
    torch.manual_seed(seed)
    native = nn.LSTM(I, H, layers, bidirectional=bidirectional)
    ours = fastlstm.LSTM(I, H, layers, bidirectional=bidirectional, backend=backend)
    ours.load_state_dict(native.state_dict())
    D = 2 if bidirectional else 1
    inputs = (torch.randn(T, B, I), 0.5 * torch.randn(layers * D, B, H), 0.5 * torch.randn(layers * D, B, H))
    grad_y = torch.randn(T, B, D * H)
    truth = run(native, torch.float64, inputs, grad_y)
    theirs, mine = run(native, torch.float32, inputs, grad_y), run(ours, torch.float32, inputs, grad_y)
    result = {}
    for key, exact in truth.items():
        err_theirs, err_mine = (theirs[key] - exact).abs(), (mine[key] - exact).abs()
        result[key] = ((err_mine.mean() / err_theirs.mean()).item(), (err_mine.max() / err_theirs.max()).item())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", type=_shape_argument, help="B7-T200-I64-H512-L1[-bi] (default: three)")
    parser.add_argument("--backend", choices=["auto", *backends.names()], default="cpp")
    parser.add_argument("--seeds", type=_positive_int, default=2)
    args = parser.parse_args()
    reason = backends.get(args.backend).unavailable_reason() if args.backend != "auto" else None
    if reason is not None:
        parser.error(f"--backend {args.backend}: {reason}")
    print("error over nn.LSTM's, mean / largest, float32 against float64")
    for shape in args.shapes or [Shape.parse(text) for text in SHAPES]:
        if shape.proj_size or shape.packed:
            parser.error(f"{shape}: dense input without a projection only")
        for seed in range(args.seeds):
            cells = " ".join(f"{k}:{m:.2f}/{x:.2f}" for k, (m, x) in ratios(shape, args.backend, seed).items())
            print(f"{shape} seed {seed}: {cells}", flush=True)


if __name__ == "__main__":
    main()
