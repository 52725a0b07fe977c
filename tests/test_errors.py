"""Every malformed call nn.LSTM rejects, fastlstm rejects with the same exception type (and message)."""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch
from helpers import fast_cpu_backends
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

I, H, P = 5, 4, 3


def _packed(x, lengths):
    return pack_padded_sequence(x, lengths)


def _without(m, weight, x):
    m(x)
    delattr(m, weight)
    m.float()  # the module reads its weights again: the deleted one as None
    return m(x)


def _under_xpu_autocast(m, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no XPU here: autocast still marks itself enabled for the device type
        with torch.autocast("xpu", dtype=torch.bfloat16):
            return m(x)


def _unsorted(x):
    return pack_padded_sequence(x, [2, 3], enforce_sorted=False)


# name -> (constructor kwargs, call(module) -> anything, same_message)
CALLS = {
    "4d-input": ({}, lambda m: m(torch.randn(3, 2, I, 1)), True),
    "1d-input": ({}, lambda m: m(torch.randn(I)), True),
    "wrong-input-size": ({}, lambda m: m(torch.randn(3, 2, I + 1)), True),
    "wrong-h-shape": ({}, lambda m: m(torch.randn(3, 2, I), (torch.zeros(2, 2, H), torch.zeros(2, 2, H))), True),
    "wrong-c-shape": ({}, lambda m: m(torch.randn(3, 2, I), (torch.zeros(2, 2, P), torch.zeros(2, 2, P))), True),
    "wrong-h-batch": ({}, lambda m: m(torch.randn(3, 2, I), (torch.zeros(2, 3, P), torch.zeros(2, 3, H))), True),
    "2d-input-3d-hx": ({}, lambda m: m(torch.randn(3, I), (torch.zeros(2, 1, P), torch.zeros(2, 1, H))), True),
    "3d-input-2d-hx": ({}, lambda m: m(torch.randn(3, 2, I), (torch.zeros(2, P), torch.zeros(2, H))), True),
    "hx-not-pair": ({}, lambda m: m(torch.randn(3, 2, I), torch.zeros(2, 2, P)), True),
    "hx-three-states": (
        {},
        lambda m: m(torch.randn(3, 2, I), (torch.zeros(2, 2, P), torch.zeros(2, 2, H), torch.zeros(2, 2, H))),
        True,
    ),
    "seq-len-0": ({}, lambda m: m(torch.randn(0, 2, I)), True),
    "seq-len-0-batch-first": ({"batch_first": True}, lambda m: m(torch.randn(2, 0, I)), True),
    "seq-len-0-unbatched": ({}, lambda m: m(torch.randn(0, I)), True),
    "input-dtype": ({}, lambda m: m(torch.randn(3, 2, I, dtype=torch.float64)), True),
    "integer-input": ({}, lambda m: m(torch.ones(3, 2, I, dtype=torch.long)), True),
    # a weight deleted from the module after a call (torch._VF.lstm's argument check, or nn.LSTM's own dtype check)
    "deleted-weight-hh": ({}, lambda m: _without(m, "weight_hh_l0", torch.randn(3, 2, I)), True),
    "deleted-weight-ih": ({}, lambda m: _without(m, "weight_ih_l0", torch.randn(3, 2, I)), True),
    "packed-deleted-weight-ih": (
        {},
        lambda m: _without(m, "weight_ih_l0", _packed(torch.randn(3, 2, I), [3, 2])),
        True,
    ),
    "packed-deleted-bias": ({}, lambda m: _without(m, "bias_hh_l1", _packed(torch.randn(3, 2, I), [3, 2])), True),
    # nn.LSTM's Python check lets it through under another device's autocast, and its first product fails
    "input-dtype-under-xpu-autocast": ({}, lambda m: _under_xpu_autocast(m, torch.randn(3, 2, I).double()), False),
    "hidden-dtype": (
        {},
        lambda m: m(torch.randn(3, 2, I), (torch.zeros(2, 2, P, dtype=torch.float64), torch.zeros(2, 2, H))),
        False,
    ),
    "device": ({}, lambda m: m(torch.randn(3, 2, I, device="meta")), True),
    "sparse-input": ({}, lambda m: m(torch.randn(3, 2, I).to_sparse()), True),
    "nested-input": ({}, lambda m: m(torch.nested.nested_tensor([torch.randn(3, I), torch.randn(2, I)])), True),
    "packed-wrong-input-size": ({}, lambda m: m(_packed(torch.randn(3, 2, I + 1), [3, 2])), False),
    # nn.LSTM hands packed input to torch._VF.lstm unchecked: its exception types, with clearer messages
    "packed-2d-hx": (
        {},
        lambda m: m(_packed(torch.randn(3, 2, I), [3, 2]), (torch.zeros(2, P), torch.zeros(2, H))),
        False,
    ),
    "packed-hx-three-states": (
        {},
        lambda m: m(
            _packed(torch.randn(3, 2, I), [3, 2]), (torch.zeros(2, 2, P), torch.zeros(2, 2, H), torch.zeros(2, 2, H))
        ),
        True,
    ),
    "packed-input-dtype": ({}, lambda m: m(_packed(torch.randn(3, 2, I, dtype=torch.float64), [3, 2])), False),
    "packed-wrong-h-batch": (
        {},
        lambda m: m(_packed(torch.randn(3, 2, I), [3, 2]), (torch.zeros(2, 3, P), torch.zeros(2, 3, H))),
        False,
    ),
    "hx-dict": ({}, lambda m: m(torch.randn(3, 2, I), {0: torch.zeros(2, 2, P), 1: torch.zeros(2, 2, H)}), False),
    "packed-hx-tensor": ({}, lambda m: m(_packed(torch.randn(3, 2, I), [3, 2]), torch.zeros(2, 2, P)), False),
    "packed-hx-none-h": ({}, lambda m: m(_packed(torch.randn(3, 2, I), [3, 2]), (None, torch.zeros(2, 2, H))), True),
    "packed-hx-none-c": ({}, lambda m: m(_packed(torch.randn(3, 2, I), [3, 2]), (torch.zeros(2, 2, P), None)), True),
    # an unsorted pack's state is put in the pack's order before any check, and that indexing fails first
    "unsorted-packed-hx-one-state": ({}, lambda m: m(_unsorted(torch.randn(3, 2, I)), (torch.zeros(2, 2, P),)), True),
    "unsorted-packed-hx-tensor": ({}, lambda m: m(_unsorted(torch.randn(3, 2, I)), torch.zeros(1, 2, P)), True),
}


def _raised(make, call):
    with pytest.raises(Exception) as info:
        call(make())
    return info.value


@pytest.mark.parametrize("backend", ["auto", "native", "reference"])
@pytest.mark.parametrize("name", list(CALLS))
def test_forward_errors_match_nn_lstm(name, backend):
    kwargs, call, same_message = CALLS[name]
    torch.manual_seed(0)
    expected = _raised(lambda: nn.LSTM(I, H, 2, proj_size=P, **kwargs), call)
    got = _raised(lambda: fastlstm.LSTM(I, H, 2, proj_size=P, backend=backend, **kwargs), call)
    assert type(got) is type(expected), (got, expected)
    if same_message:
        assert str(got) == str(expected)
    else:
        assert str(got)


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("p", [-1.0, float("nan"), 2.0])
def test_a_dropout_set_out_of_range_after_construction_raises_as_nn_lstm(p, backend):
    """The constructor checks dropout; one set on the module afterwards nn.LSTM's kernels reject where they would
    apply it (training, between layers), with its message: the fast paths had taken a negative or NaN one as no
    dropout and raised F.dropout's ValueError above 1. In eval mode, or with one layer, it runs."""
    x = torch.randn(4, 2, I, dtype=torch.float64)
    expected = nn.LSTM(I, H, 2).double()
    fast = fastlstm.LSTM(I, H, 2, backend=backend).double()
    for m in (expected, fast):
        m.dropout = p
    errors = [_raised(lambda m=m: m, lambda m: m(x)) for m in (expected, fast)]
    assert type(errors[1]) is type(errors[0]) is RuntimeError and str(errors[1]) == str(errors[0])
    with pytest.raises(RuntimeError, match=re.escape(str(errors[0]))):
        fast.step(x[0])
    fast.eval()
    fast(x)
    fast.step(x[0])
    one_layer = fastlstm.LSTM(I, H, 1, backend=backend).double()
    one_layer.dropout = p
    one_layer(x)


@pytest.mark.parametrize("backend", ["auto", "native", "reference"])
def test_an_unsorted_packs_third_state_is_dropped_as_nn_lstm_drops_it(backend):
    """nn.LSTM puts an unsorted pack's state in the pack's order by taking hx[0] and hx[1], and runs: so does
    fastlstm (a sorted pack's third state fails in both, see CALLS)."""
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2, proj_size=P).double()
    fast = fastlstm.LSTM(I, H, 2, proj_size=P, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    packed = _unsorted(torch.randn(3, 2, I, dtype=torch.float64))
    hx = (torch.randn(2, 2, P, dtype=torch.float64), torch.randn(2, 2, H, dtype=torch.float64), torch.zeros(1))
    (y, (h, c)), (y_ref, (h_ref, c_ref)) = fast(packed, hx), ref(packed, hx)
    for got, expected in ((y.data, y_ref.data), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("call", ["packed", "lengths"])
def test_a_one_row_pack_of_the_wrong_sizes_is_refused(backend, call):
    """A pack of one row in all (one sequence of one step): nn.LSTM's float32 product on the CPU there takes a row
    of the wrong feature size without a word and reads past it (garbage, and in a fuzzing run a corrupted heap that
    ended the process, torch 2.13), and an h0 of two rows it broadcasts the one row over. Not run on nn.LSTM here
    for that reason; fastlstm raises the errors of a tensor call of those sizes."""
    module = fastlstm.LSTM(I, H, backend=backend)

    def run(x, hx=None):
        if call == "lengths":
            return module(x, hx, lengths=torch.tensor([1]))
        return module(pack_padded_sequence(x, [1]), hx)

    with pytest.raises(
        RuntimeError, match=re.escape(f"input.size(-1) must be equal to input_size. Expected {I}, got {I + 1}")
    ):
        run(torch.randn(1, 1, I + 1))
    with pytest.raises(RuntimeError, match=re.escape(f"Expected hidden[0] size (1, 1, {H}), got [1, 2, {H}]")):
        run(torch.randn(1, 1, I), (torch.zeros(1, 2, H), torch.zeros(1, 2, H)))
    y, (h, c) = run(torch.randn(1, 1, I))  # the right sizes run
    assert h.shape == c.shape == (1, 1, H)


CONSTRUCTORS = {
    "dropout>1": ((I, H), {"dropout": 1.5}),
    "dropout-bool": ((I, H), {"dropout": True}),
    "num_layers=0": ((I, H), {"num_layers": 0}),
    "num_layers-float": ((I, H), {"num_layers": 1.0}),
    "hidden=0": ((I, 0), {}),
    "hidden-float": ((I, 4.0), {}),
    "input=0": ((0, H), {}),
    "proj>=hidden": ((I, H), {"proj_size": H}),
    "proj<0": ((I, H), {"proj_size": -1}),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_constructor_errors_match_nn_lstm(name):
    args, kwargs = CONSTRUCTORS[name]
    try:
        nn.LSTM(*args, **kwargs)
    except Exception as e:  # whatever nn.LSTM raises, fastlstm must raise
        expected = e
    else:  # accepted by this torch (2.5 and before took input_size 0): then by fastlstm too
        fastlstm.LSTM(*args, **kwargs)
        return
    with pytest.raises(type(expected)) as got:
        fastlstm.LSTM(*args, **kwargs)
    assert str(got.value) == str(expected)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown fastlstm backend 'fast'"):
        fastlstm.LSTM(I, H, backend="fast")


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTLSTM_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"unknown fastlstm backend 'nope'.*\(from \$FASTLSTM_BACKEND\)"):
        fastlstm.LSTM(I, H)(torch.randn(2, 1, I))


def test_forced_backend_that_cannot_serve_names_the_reason(monkeypatch):
    from fastlstm import backends

    monkeypatch.setitem(backends._loaded, "triton", backends._Broken("triton", "triton is not installed"))
    m = fastlstm.LSTM(I, H, backend="triton")
    message = "fastlstm backend 'triton' cannot serve layer 0 .forward.: triton is not installed"
    with pytest.raises(fastlstm.BackendUnavailableError, match=message):
        m(torch.randn(2, 1, I))


def test_a_backend_must_implement_layer_and_a_broken_one_names_why_it_cannot():
    from fastlstm import backends

    class NoLayer(backends.Backend):
        name = "no-layer"

    with pytest.raises(TypeError, match="abstract"):
        NoLayer()
    broken = backends._Broken("triton", "triton is not installed")
    x = torch.randn(2, 1, I)
    with pytest.raises(RuntimeError, match="'triton' is unavailable: triton is not installed"):
        broken.layer(x, None, None, None, None, None, None, None, False)


def test_auto_falls_back_to_native_with_one_warning_when_a_backend_is_missing(monkeypatch):
    from fastlstm import backends, dispatch

    monkeypatch.setitem(backends._loaded, "cpp", backends._Broken("cpp", "no C++ compiler"))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: None)
    m = fastlstm.LSTM(I, H, 2)
    with pytest.warns(RuntimeWarning, match="cpp backend is unavailable.*no C.. compiler") as caught:
        y, _ = m(torch.randn(2, 3, I))
    # it points at the caller's line, not at fastlstm's or torch's frames between
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, sys._getframe().f_lineno - 2)]
    assert fastlstm.explain(m, torch.randn(2, 3, I)).backends == ["native", "native"]
    assert "cpp unavailable: no C++ compiler" in str(fastlstm.explain(m, torch.randn(2, 4, I)))


def test_auto_does_not_touch_a_fast_backend_the_speed_rule_declines(monkeypatch):
    """Where native is measured faster, auto neither builds nor warns about the fast backend."""
    from fastlstm import backends, dispatch

    monkeypatch.setitem(backends._loaded, "cpp", backends._Broken("cpp", "no C++ compiler"))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: "measured slower")
    m = fastlstm.LSTM(I, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(2, 3, I))
    assert "cpp not measured faster here: measured slower" in str(fastlstm.explain(m, torch.randn(2, 3, I)))


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_a_malformed_pack_raises_runtime_error_as_nn_lstm(backend, grad):
    """A PackedSequence built by hand with batch sizes that grow or hold a zero: nn.LSTM raises RuntimeError from
    its kernels; every backend raises that type too (the padding's index_copy raised IndexError), before any kernel
    reads past the data. (Batch sizes that sum to fewer rows than the data has: nn.LSTM reads the first rows and
    returns, and so does every backend: test_a_pack_over_a_larger_buffer_runs_as_nn_lstm_runs_it.)"""
    packs = [
        PackedSequence(torch.randn(5, I), torch.tensor([1, 2, 2])),
        PackedSequence(torch.randn(5, I), torch.tensor([2, 0, 3])),
        PackedSequence(torch.randn(5, I), torch.tensor([2, 1, 2])),
    ]
    for pack in packs:
        with torch.set_grad_enabled(grad):
            with pytest.raises(RuntimeError):
                nn.LSTM(I, H, 2, proj_size=P)(pack)
            with pytest.raises(RuntimeError) as raised:
                fastlstm.LSTM(I, H, 2, proj_size=P, backend=backend)(pack)
            # the pack's own error, not a forced backend's refusal (BackendUnavailableError is a RuntimeError too)
            assert not isinstance(raised.value, fastlstm.BackendUnavailableError), raised.value


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_a_malformed_pack_nn_lstm_runs_gives_its_answer_under_auto(grad):
    """Batch sizes built by hand that grow after a zero ([3, 0, 1]: nn.LSTM returns the rows up to the zero) or hold
    one number in two dimensions ([[3]]): auto and native give nn.LSTM's answer, also where a well-formed pack of
    the same key ([3, 2, 1]) was remembered before (auto had raised cpp's error); the forced fast backends refuse
    them with their own RuntimeError. Batch sizes in two dimensions holding more numbers: RuntimeError on every
    backend, nn.LSTM's type (ValueError before)."""
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, dtype=torch.float64)
    cases = [([3, 2, 1], 6), ([3, 0, 1], 4), ([2, 0, 1, 1, 1], 5), ([[3]], 3)]
    for backend in ["auto", "native", "reference", *fast_cpu_backends()]:
        fast = fastlstm.LSTM(I, H, dtype=torch.float64, backend=backend)
        fast.load_state_dict(ref.state_dict())
        for sizes, rows in cases:
            data = torch.randn(rows, I, dtype=torch.float64)
            with torch.set_grad_enabled(grad):
                expected = ref(PackedSequence(data, torch.tensor(sizes)))
                well_formed = sizes == [3, 2, 1]
                if backend not in ("auto", "native") and not well_formed:
                    with pytest.raises(RuntimeError):
                        fast(PackedSequence(data, torch.tensor(sizes)))
                    continue
                got = fast(PackedSequence(data, torch.tensor(sizes)))
            assert got[0].batch_sizes.tolist() == expected[0].batch_sizes.tolist()
            for a, b in zip((got[0].data, *got[1]), (expected[0].data, *expected[1])):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"{backend} {sizes}")
        with pytest.raises(RuntimeError, match="one-dimensional"):
            hx = (torch.zeros(1, 2, H, dtype=torch.float64), torch.zeros(1, 2, H, dtype=torch.float64))
            fast(PackedSequence(torch.randn(5, I, dtype=torch.float64), torch.tensor([[2, 2, 1]])), hx)


def _assert_pack_runs_as_nn_lstm(ref, fast, backend: str, grad: bool, data, sizes: list, trim_for_ref=False):
    """nn.LSTM and fastlstm (twice: the second call of a kind is a remembered one) on PackedSequence(data, sizes):
    the same batch sizes, rows, outputs and states, and with grad every gradient. trim_for_ref: nn.LSTM is given
    only the rows the batch sizes cover."""
    if backend == "triton" and not sum(sizes):  # refuses an empty batch when forced, as for tensor input
        with pytest.raises(fastlstm.BackendUnavailableError, match="empty input"):
            fast(PackedSequence(data, torch.tensor(sizes)))
        return
    results = []
    for m in (ref, fast, fast):
        m.zero_grad()
        x = data.clone().requires_grad_(grad)
        given = x[: sum(sizes)] if m is ref and trim_for_ref else x
        with torch.set_grad_enabled(grad):
            y, (h, c) = m(PackedSequence(given, torch.tensor(sizes)))
        assert y.batch_sizes.tolist() == sizes and y.data.shape[0] == sum(sizes)
        outs = [y.data, h, c]
        if grad:
            (y.data.square().sum() + h.sum() + c.sum()).backward()
            outs += [x.grad, *(p.grad for p in m.parameters())]
        results.append(outs)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"{sizes}, {data.shape[0]} rows")


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_a_pack_over_a_larger_buffer_runs_as_nn_lstm_runs_it(backend, grad):
    """A PackedSequence built by hand over a buffer with rows past its batch sizes' sum (one buffer reused for
    batches of several lengths): nn.LSTM reads the rows the batch sizes cover and leaves the rest (its output has
    the sum's rows, the rest get zero gradient); every backend does so too, stacked and projected, also when the
    call is remembered (cpp and reference had raised), batch sizes all 0 too (no rows out). Bidirectional:
    nn.LSTM's reverse direction reads the last rows instead (the forward direction's rows shifted by the extra
    rows); every backend, the native one included, gives nn.LSTM's numbers for the pack without the extra rows."""
    torch.manual_seed(0)
    for layers, bidirectional, proj in ((1, False, 0), (2, False, P), (1, True, 0), (2, True, P)):
        ref = nn.LSTM(I, H, layers, proj_size=proj, bidirectional=bidirectional, dtype=torch.float64)
        fast = fastlstm.LSTM(I, H, layers, proj_size=proj, bidirectional=bidirectional, dtype=torch.float64,
                             backend=backend)  # fmt: skip
        fast.load_state_dict(ref.state_dict())
        for sizes, rows in (([3, 3, 2], 10), ([2, 2, 0], 5), ([1], 4), ([0, 0], 4)):
            data = torch.randn(rows, I, dtype=torch.float64)
            _assert_pack_runs_as_nn_lstm(ref, fast, backend, grad, data, sizes, trim_for_ref=bidirectional)


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_a_pack_whose_batch_sizes_end_in_zeros_runs_as_nn_lstm_runs_it(backend, grad):
    """A PackedSequence built by hand whose last steps hold no sequence (batch sizes [2, 2, 0]: lengths shorter than
    the padded length): nn.LSTM runs it as the pack without those steps, and so does every backend (the cpp
    inference stack and the reference had refused it), in both modes, also when the call is remembered. A pack of
    no rows at all ([0], [0, 0]) gives nn.LSTM's answer too (cpp and reference had refused it)."""
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2, proj_size=P, dtype=torch.float64)
    fast = fastlstm.LSTM(I, H, 2, proj_size=P, dtype=torch.float64, backend=backend)
    fast.load_state_dict(ref.state_dict())
    for sizes in ([2, 2, 0], [3, 1, 0, 0], [1, 0], [0], [0, 0]):
        data = torch.randn(sum(sizes), I, dtype=torch.float64)
        _assert_pack_runs_as_nn_lstm(ref, fast, backend, grad, data, sizes)
