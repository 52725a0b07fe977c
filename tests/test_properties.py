"""Property-based: random configurations against nn.LSTM, forward and backward, on every backend present."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_results, lstm_call
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm import backends
from fastlstm.backends import LayerCall


def _dtype_for(name: str) -> torch.dtype | None:
    """float64 where the backend serves it on the CPU, else float32; None when it cannot run here."""
    backend = backends.get(name)
    if backend.unavailable_reason() is not None:
        return None
    for dtype in (torch.float64, torch.float32):
        call = LayerCall("cpu", dtype, 3, 2, 4, 4, 0, True, False, False, True)
        if backend.unsupported_reason(call) is None:
            return dtype
    return None


PRESENT = [(name, _dtype_for(name)) for name in backends.names() if _dtype_for(name) is not None]
TOLERANCE = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-5, 1e-4)}


@st.composite
def configs(draw):
    layers = draw(st.integers(1, 3))
    hidden = draw(st.integers(1, 17))
    proj = draw(st.sampled_from([0] + list(range(1, hidden))))
    batch = draw(st.integers(1, 6))
    seq_len = draw(st.integers(1, 9))
    packed = draw(st.booleans())
    lengths = draw(st.lists(st.integers(1, seq_len), min_size=batch, max_size=batch)) if packed else None
    return dict(
        input_size=draw(st.integers(1, 17)),
        hidden_size=hidden,
        num_layers=layers,
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        proj_size=proj,
        batch=batch,
        seq_len=seq_len,
        lengths=lengths,
        with_state=draw(st.booleans()),
    )


# The Triton interpreter runs each kernel instance in Python: fewer examples keep the suite inside minutes.
EXAMPLES = {"triton": 8}


@pytest.mark.parametrize("backend,dtype", PRESENT, ids=[name for name, _ in PRESENT])
def test_random_configurations_match_nn_lstm(backend, dtype):
    check = settings(max_examples=EXAMPLES.get(backend, 30), deadline=None)(given(config=configs())(_check_config))
    check(backend=backend, dtype=dtype)


def _check_config(backend, dtype, config):
    cfg = dict(config)
    batch, seq_len, lengths, with_state = (
        cfg.pop("batch"),
        cfg.pop("seq_len"),
        cfg.pop("lengths"),
        cfg.pop("with_state"),
    )
    torch.manual_seed(0)
    ref = nn.LSTM(**cfg, dtype=dtype)
    fast = fastlstm.LSTM(**cfg, dtype=dtype, backend=backend)
    fast.load_state_dict(ref.state_dict())
    shape = (batch, seq_len) if cfg["batch_first"] else (seq_len, batch)
    x = torch.randn(*shape, cfg["input_size"], dtype=dtype)
    D = 2 if cfg["bidirectional"] else 1
    state = [
        torch.randn(cfg["num_layers"] * D, batch, cfg["proj_size"] or cfg["hidden_size"], dtype=dtype),
        torch.randn(cfg["num_layers"] * D, batch, cfg["hidden_size"], dtype=dtype),
    ]

    def call(module, x, *state):
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=cfg["batch_first"], enforce_sorted=False)
        return lstm_call(module, x, *state)

    atol, rtol = TOLERANCE[dtype]
    for _ in range(2):  # a repeated call skips the checks and dispatch the first one passed: the same results
        assert_same_results(ref, fast, [x] + (state if with_state else []), call, atol, rtol)
