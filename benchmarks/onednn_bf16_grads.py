"""How far bfloat16 training gradients land from float64's: nn.LSTM on oneDNN, nn.LSTM on ATen's loop (oneDNN
off) and fastlstm's `auto`, one layer at a time over a list of hidden sizes.

    python benchmarks/onednn_bf16_grads.py [--hidden 768 1000 1024 1040 1056 2048] [--batch 8] [--steps 4]

Each row: the largest error of dx and of each weight's gradient, over that gradient's largest float64 value (so 1.0
is an error as large as the gradient itself), and the backend `auto` gave the layer. On an Intel CPU with AMX
(a Sapphire Rapids Xeon, torch 2.11 and 2.13) oneDNN's column reads 0.3-1.2 from hidden 1024 in multiples of 32,
where the others read 3e-3 to 1e-2: fastlstm.dispatch._onednn_bf16_grads_wrong keeps such calls off native.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fastlstm


def _gradients(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, onednn: bool = True) -> list[torch.Tensor]:
    """dx, then each parameter's gradient, of one call's loss, in float64."""
    model.zero_grad(set_to_none=True)
    xi = x.to(dtype).detach().requires_grad_()
    with torch.backends.mkldnn.flags(enabled=onednn):
        y, (h, c) = model(xi)
        (y.double().square().sum() + h.double().sum() + c.double().sum()).backward()
    return [xi.grad.double(), *(p.grad.double() for p in model.parameters())]


def _error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 992, 1000, 1024, 1040, 1056, 1088, 2048])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--input", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B{args.batch} T{args.steps} I{args.input}")
    print(f"{'hidden':>6}  {'nn.LSTM oneDNN':>14}  {'nn.LSTM ATen':>12}  {'fastlstm auto':>13}  auto's backend")
    for hidden in args.hidden:
        torch.manual_seed(0)
        gold = nn.LSTM(args.input, hidden).double()
        ref = nn.LSTM(args.input, hidden)
        ref.load_state_dict(gold.state_dict())
        ref = ref.to(torch.bfloat16)
        fast = fastlstm.LSTM(args.input, hidden)
        fast.load_state_dict(gold.state_dict())
        fast = fast.to(torch.bfloat16)
        x = torch.randn(args.steps, args.batch, args.input, dtype=torch.float64)
        want = _gradients(gold, x, torch.float64)
        onednn = _error(_gradients(ref, x, torch.bfloat16), want)
        aten = _error(_gradients(ref, x, torch.bfloat16, onednn=False), want)
        auto = _error(_gradients(fast, x, torch.bfloat16), want)
        with torch.enable_grad():
            chosen = fastlstm.explain(fast, x.bfloat16()).backends[0]
        print(f"{hidden:>6}  {onednn:>14.2e}  {aten:>12.2e}  {auto:>13.2e}  {chosen}")


if __name__ == "__main__":
    main()
