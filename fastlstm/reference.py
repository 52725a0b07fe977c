"""The executable specification of one LSTM layer in one direction.

A plain step loop in PyTorch ops, written to be read rather than to be fast. Every fast backend is
tested against it and against nn.LSTM; autograd through these ops gives its backward.

Conventions (the layer contract every backend implements, fastlstm.backends.Backend.layer):
    x:   [T, B, I]  time-major input
    h0:  [B, P]     P = proj_size, or H without projection
    c0:  [B, H]
    w_ih [4H, I], w_hh [4H, P], b [4H] or None (b_ih + b_hh), w_hr [P, H] or None
    batch_sizes: None, or int64 CPU tensor [T], non-increasing, batch_sizes[0] == B. At step t only the
        first batch_sizes[t] rows are live (the packed-sequence convention: rows sorted by length).
    reverse: run from each sequence's own last step back to step 0.
returns
    y  [T, B, P]  (zero where a row is not live)
    hT [B, P], cT [B, H]  the state after each row's last live step
Gate order along 4H is (input, forget, cell, output), as in nn.LSTM.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lstm_cell(gates: Tensor, c: Tensor, w_hr: Tensor | None) -> tuple[Tensor, Tensor]:
    """One pointwise LSTM cell. gates: [n, 4H] pre-activations, c: [n, H] -> (h [n, P], c [n, H])."""
    i, f, g, o = gates.chunk(4, dim=1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    if w_hr is not None:
        h_next = h_next @ w_hr.t()
    return h_next, c_next


def live_rows(batch_sizes: Tensor | None, T: int, B: int) -> list[int]:
    """How many leading rows are live at each step, from batch sizes checked against the contract above (the
    kernels that take them index rows by them: one beyond B, or a step that grows, reads past the data)."""
    if batch_sizes is None:
        return [B] * T
    if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64 or batch_sizes.shape != (T,):
        raise RuntimeError(
            f"fastlstm: batch_sizes must be an int64 CPU tensor [T] = [{T}], got {batch_sizes.dtype} "
            f"{tuple(batch_sizes.shape)} on {batch_sizes.device}"
        )
    live = batch_sizes.tolist()
    if T and (live[0] != B or any(not 1 <= n <= m for n, m in zip(live[1:], live))):
        raise RuntimeError(f"fastlstm: batch_sizes must start at the batch size {B} and not increase, staying at 1 or "
                           f"more; got {live}")  # fmt: skip
    return live


def lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b: Tensor | None,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction. Shapes in the module docstring."""
    T, B = x.shape[0], x.shape[1]
    # The input projection of every step is one matmul; only h @ W_hh^T stays inside the loop.
    x_proj = x @ w_ih.t()
    if b is not None:
        x_proj = x_proj + b
    # Steps by unbind, not x_proj[t]: each select's backward is a zero-filled [T, B, 4H] gradient, quadratic in T
    # where the gradients are differentiated again (double backward), and fragmenting the heap (see csrc/lstm_ops.cpp)
    x_steps = x_proj.unbind(0)
    live = live_rows(batch_sizes, T, B)
    h, c = h0, c0
    # Appended in the order computed, not set by index into [None] * T: under torch.compile with a sequence length
    # made dynamic (a second length), torch 2.11's dynamo refuses a list's __setitem__ there (fullgraph=True failed)
    outputs: list[Tensor] = []
    for t in reversed(range(T)) if reverse else range(T):
        n = live[t]
        # Rows past n are finished (forward) or not started yet (reverse): they keep their state,
        # which in the reverse direction is still h0/c0 when they become live.
        gates = x_steps[t][:n] + h[:n] @ w_hh.t()
        h_live, c_live = lstm_cell(gates, c[:n], w_hr)
        outputs.append(torch.cat([h_live, h_live.new_zeros(B - n, h_live.shape[1])]) if n < B else h_live)
        h = torch.cat([h_live, h[n:]]) if n < B else h_live
        c = torch.cat([c_live, c[n:]]) if n < B else c_live
    return torch.stack(outputs[::-1] if reverse else outputs), h, c
