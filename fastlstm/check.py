"""Validation against nn.LSTM with the same weights: max errors of outputs, states and every gradient."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fastlstm.module import LSTM

# atol per dtype for `python -m fastlstm check`; low precision uses a scale-aware bound.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}


@dataclass(frozen=True)
class Case:
    """One configuration to validate: sizes, flags, and packed lengths (None for a padded batch)."""

    batch: int = 3
    seq_len: int = 6
    input_size: int = 5
    hidden_size: int = 7
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    bias: bool = True
    batch_first: bool = False
    lengths: tuple[int, ...] | None = None

    def __str__(self) -> str:
        parts = [
            f"B{self.batch}",
            f"T{self.seq_len}",
            f"I{self.input_size}",
            f"H{self.hidden_size}",
            f"L{self.num_layers}",
        ]
        parts += ["bi"] * self.bidirectional + [f"proj{self.proj_size}"] * bool(self.proj_size)
        parts += ["nobias"] * (not self.bias) + ["bf"] * self.batch_first
        parts += [f"packed{list(self.lengths)}"] if self.lengths else []
        return "-".join(parts)


CHECK_CASES = [
    Case(),
    Case(batch=1, seq_len=1, hidden_size=3),
    Case(num_layers=2, bidirectional=True, proj_size=4, batch_first=True),
    Case(batch=6, seq_len=7, num_layers=2, bidirectional=True, lengths=(1, 7, 5, 2, 5, 1)),
    Case(batch=5, hidden_size=16, bias=False, num_layers=3),
]


@contextlib.contextmanager
def exact_cudnn():
    """cuDNN without TF32 for a comparison: it multiplies float32 in TF32 by default (torch.backends.cudnn.allow_tf32),
    ~1e-3 off exact, where fastlstm's kernels follow torch.backends.cuda.matmul.allow_tf32 (off by default)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def compare(case: Case, backend: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """Max absolute error of fastlstm (`backend`) against nn.LSTM for y, h_n, c_n and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(
        num_layers=case.num_layers, bidirectional=case.bidirectional, proj_size=case.proj_size, bias=case.bias,
        batch_first=case.batch_first,
    )  # fmt: skip
    torch.manual_seed(seed)
    ref = nn.LSTM(case.input_size, case.hidden_size, **kwargs).to(device=device, dtype=dtype)
    fast = LSTM(case.input_size, case.hidden_size, backend=backend, **kwargs).to(device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    shape = (case.batch, case.seq_len) if case.batch_first else (case.seq_len, case.batch)
    x = torch.randn(*shape, case.input_size, generator=gen).to(device=device, dtype=dtype)

    def run(module):
        inp = x.detach().clone().requires_grad_(True)
        fed = inp
        if case.lengths is not None:
            fed = pack_padded_sequence(inp, list(case.lengths), batch_first=case.batch_first, enforce_sorted=False)
        y, (h, c) = module(fed)
        y = y.data if isinstance(y, PackedSequence) else y
        outs = {"y": y, "h_n": h, "c_n": c}
        loss = sum(
            (t.float() * torch.linspace(-1, 1, t.numel(), device=device).view(t.shape)).sum() for t in outs.values()
        )
        module.zero_grad(set_to_none=True)
        loss.backward()
        outs["input.grad"] = inp.grad
        outs.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
        return outs

    with exact_cudnn():
        expected, got = run(ref), run(fast)
    return {
        k: (got[k].double() - expected[k].double()).abs().max().item() if expected[k].numel() else 0.0 for k in expected
    }
