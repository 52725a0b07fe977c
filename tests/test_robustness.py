"""Bad and extreme input: NaN/inf, saturation, very long sequences, and bitwise repeatability."""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers import fast_cpu_backends, lstm_call, make_pair, run_python, run_with_grads
from torch import nn

import fastlstm
from fastlstm import backends
from fastlstm.backends import LayerCall
from fastlstm.backends.triton.build_guard import ENV_TILES

I, H = 4, 6
BACKENDS = ["native", "reference", *fast_cpu_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_propagates_as_in_nn_lstm(backend, bad):
    ref, fast = make_pair(I, H, 2, bidirectional=True, backend=backend)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    x[2, 1, 0] = bad
    y_ref, (h_ref, c_ref) = ref(x)
    y, (h, c) = fast(x)
    for got, expected in ((y, y_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7, equal_nan=True)
    assert torch.isfinite(y[:, 0]).all() and torch.isfinite(y[:, 2]).all()  # other sequences untouched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_state_of_a_sequence_that_ends_spreads_as_in_nn_lstm(backend, bad):
    """A pack whose shorter sequence starts from a NaN c0: its last output is NaN, and the steps after its end must
    not multiply it by their zero gate gradients (0 * NaN) into dW_hh, which nn.LSTM's packed loop never does (cpp
    and triton had, forward direction: a whole column of dW_hh NaN). An inf c0 leaves the output finite (tanh):
    nn.LSTM's numbers all the same."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, fast = make_pair(2, 3, 1, bidirectional=True, backend=backend)
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    h0, c0 = torch.zeros(2, 2, 3, dtype=torch.float64), torch.zeros(2, 2, 3, dtype=torch.float64)
    c0[:, 1, 0] = bad  # the sequence of length 1, both directions
    for model in (ref, fast):
        y, (h, c) = model(pack_padded_sequence(x, torch.tensor([3, 1])), (h0, c0))
        y.data.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-7, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", fast_cpu_backends())
@pytest.mark.parametrize("gate", ["input", "cell"])
def test_saturated_gates_derivatives_within_an_ulp_of_one(gate, backend, monkeypatch):
    """Trained forget gates often sit near 1 (biases of 1-5 are common): a gate's derivative there, s (1 - s) or
    1 - tanh^2, is as accurate as the activation is near 1. Each row of a float32 batch puts one pre-activation of
    [-16, 16] through the input gate's sigmoid (or the cell input's tanh), the other gates pinned at 0 or 1, so
    that c = sigmoid(v) (or tanh(v)) and dc/dx is its derivative: within 0.42 ulp of 1 (5e-8) of float64's for
    sigmoid and 1.26 (1.5e-7) for tanh, as oneDNN's (measured 4.1e-8 and 1.4e-7). Rounded twice near 1 they had
    been 8.8e-8 and 3.0e-7 in cpp (1.9e-7 for tanh in triton), as ATen's cell."""
    torch.manual_seed(0)
    # The interpreter runs triton's kernels a batch tile at a time, 24 s for 8191 rows in tiles of 16: one tile
    # of them all instead, in 0.5 s (the tiles' size changes no number here: bitwise the same)
    monkeypatch.setenv(ENV_TILES, "BLOCK_B=8192")
    v = torch.linspace(-16, 16, 8191, dtype=torch.float64)
    big = 1000.0  # a pre-activation whose gate is exactly 0 or 1 in float32
    if gate == "input":  # i = sigmoid(v), f = 0, g = 1
        bias, w, bound = [0.0, -big, big, big], [1.0, 0.0, 0.0, 0.0], 5e-8
    else:  # i = 1, f = 0, g = tanh(v)
        bias, w, bound = [big, -big, 0.0, big], [0.0, 0.0, 1.0, 0.0], 1.5e-7
    exact = nn.LSTM(1, 1, dtype=torch.float64)
    with torch.no_grad():
        exact.weight_ih_l0.copy_(torch.tensor(w)[:, None])
        exact.weight_hh_l0.zero_()
        exact.bias_ih_l0.copy_(torch.tensor(bias))
        exact.bias_hh_l0.zero_()
    fast = fastlstm.LSTM(1, 1, backend=backend)
    fast.load_state_dict(exact.state_dict())
    results = []
    for model, dtype in ((exact, torch.float64), (fast, torch.float32)):
        x = v.to(dtype).reshape(1, -1, 1).requires_grad_()
        c = model(x)[1][1]
        (dx,) = torch.autograd.grad(c.sum(), x)
        results.append((c.double().flatten(), dx.double().flatten()))
    (c_exact, d_exact), (c_fast, d_fast) = results
    assert (c_fast - c_exact).abs().max().item() < 1.2e-7
    assert (d_fast - d_exact).abs().max().item() < bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_closed_gate_times_an_infinite_or_huge_cell_gives_nn_lstms_nan_and_zeros(backend, dtype):
    """A gate saturated shut is exactly 0, as nn.LSTM's sigmoid gives it: forget gate 0 times an inf cell is NaN,
    times a finite huge one 0 (a sigmoid left at ~1e-39 gave inf and 0.4). Inputs drive every gate to -1000."""
    ref, fast = make_pair(1, 1, 1, bias=False, dtype=dtype, backend=backend)
    with torch.no_grad():
        for lstm in (ref, fast):
            lstm.weight_ih_l0.fill_(1)
            lstm.weight_hh_l0.zero_()
    x = torch.full((2, 1, 1), -1000.0, dtype=dtype)
    huge = torch.finfo(dtype).max / 4
    for c0 in (float("inf"), huge, -huge):
        hx = (torch.zeros(1, 1, 1, dtype=dtype), torch.full((1, 1, 1), c0, dtype=dtype))
        (y, (h, c)), (y_ref, (h_ref, c_ref)) = fast(x, hx), ref(x, hx)
        for got, expected in ((y, y_ref), (h, h_ref), (c, c_ref)):
            torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])  # cpp: its stack's op, then lstm_fwd
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float16_cell_state_beyond_its_range_comes_back_as_its_largest_value(backend, grad):
    """The fast backends keep a float16 cell in float32, where it grows past float16's range (here from 65504 by 1 a
    step), while nn.LSTM's float16 cell stays at 65504 (65505 rounds back): c_n comes back as that, not inf, so that
    the next chunk, whose forget gate closes, gives nn.LSTM's numbers and one call's (0 * inf had made it NaN)."""
    ref = nn.LSTM(1, 1, dtype=torch.float16)
    with torch.no_grad():
        ref.weight_hh_l0.zero_()
        ref.bias_hh_l0.zero_()
        ref.weight_ih_l0.copy_(torch.tensor([[0.0], [-1000.0], [0.0], [0.0]]))  # x = 1 closes the forget gate
        ref.bias_ih_l0.fill_(20.0)  # every gate at 1 and g at 1: c grows by 1 a step
    fast = fastlstm.LSTM(1, 1, dtype=torch.float16, backend=backend)
    fast.load_state_dict(ref.state_dict())
    largest = torch.finfo(torch.float16).max
    state = (torch.zeros(1, 1, 1, dtype=torch.float16), torch.full((1, 1, 1), largest, dtype=torch.float16))
    first, second = torch.zeros(20, 1, 1, dtype=torch.float16), torch.ones(3, 1, 1, dtype=torch.float16)
    results = []
    with torch.set_grad_enabled(grad):
        for model in (ref, fast):
            _, carried = model(first, state)
            results.append((carried, model(second, carried)))
        whole = fast(torch.cat([first, second]), state)
    (ref_carried, ref_second), (carried, second_chunk) = results
    assert carried[1].item() == ref_carried[1].item() == largest
    torch.testing.assert_close(second_chunk, ref_second, atol=0, rtol=0)
    torch.testing.assert_close(second_chunk[0], whole[0][-3:], atol=0, rtol=0)
    torch.testing.assert_close(second_chunk[1], whole[1], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_saturated_input_stays_finite(backend, scale):
    ref, fast = make_pair(I, H, 2, proj_size=3, backend=backend)
    x = torch.full((6, 2, I), scale, dtype=torch.float64)
    x.requires_grad_()
    y, (h, c) = fast(x)
    (y.sum() + h.sum() + c.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(c).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y, ref(x)[0], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,scale,rtol", [(torch.float64, 1e-9, 1e-9), (torch.float32, 1e-6, 1e-4)], ids=["float64", "float32"]
)
def test_tiny_activations_keep_relative_accuracy(backend, dtype, scale, rtol):
    """Weights scaled down so that pre-activations are ~2 * scale: every result within rtol of nn.LSTM's relative
    to its own size, which the usual atol would not see. A tanh computed as (1 - e) / (1 + e) failed this: it
    cancels near 0 (3e-3 relative error in float32 at activations ~1e-6, against nn.LSTM's 2e-6)."""
    call = LayerCall("cpu", dtype, 5, 3, I, H, 3, True, False, False, True)
    reason = backends.get(backend).unsupported_reason(call)
    if reason is not None:
        pytest.skip(reason)
    ref, fast = make_pair(I, H, 2, proj_size=3, backend=backend, dtype=dtype)
    with torch.no_grad():
        for module in (ref, fast):
            for p in module.parameters():
                p.mul_(scale)
    x = torch.randn(5, 3, I, dtype=dtype)
    expected, got = run_with_grads(ref, [x], lstm_call), run_with_grads(fast, [x], lstm_call)
    for key, want in expected.items():
        error, size = (got[key] - want).abs().max().item(), want.abs().max().item()
        assert error <= rtol * size, f"{key}: error {error:.3g} against values up to {size:.3g}"


# Not triton here: its interpreter runs the programs one after another in numpy, repeatable whatever the kernels
# do (8 s of interpreting for nothing); test_triton_on_cuda_is_bitwise_repeatable below is the GPU's test.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_forward_and_backward_are_bitwise_repeatable(backend):
    _, fast = make_pair(I, H, 2, bidirectional=True, proj_size=4, backend=backend, dtype=torch.float32)
    x = torch.randn(20, 5, I)

    def run():
        fast.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y, (h, c) = fast(xg)
        (y.square().sum() + h.sum() + c.sum()).backward()
        return [y, h, c, xg.grad] + [p.grad for p in fast.parameters()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# The fast CPU backend where it is built, else the native path (25 s there: oneDNN at B=2 is slow);
# the Triton interpreter and the Python reference loop would take minutes over 1e5 steps.
@pytest.mark.parametrize("backend", ["cpp" if "cpp" in BACKENDS else "native"])
def test_hundred_thousand_steps_inference_in_linear_memory(backend):
    """T = 100,000 inference: peak memory grows like the O(T*B*H) output, nothing more."""
    code = textwrap.dedent(f"""
        import resource, torch, fastlstm
        m = fastlstm.LSTM({I}, {H}, backend={backend!r})
        x = torch.randn(100_000, 2, {I})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            y, (h, c) = m(x)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert torch.isfinite(y).all() and y.shape == (100_000, 2, {H})
        print(grown * 1024, y.numel() * y.element_size())
    """)
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    grown, output_bytes = map(int, done.stdout.split())
    # gates for every step ([T, B, 4H]) plus the output is ~5x the output; allow slack for allocator rounding
    assert grown < 12 * output_bytes + 64 * 2**20, (grown, output_bytes)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_on_cuda_is_bitwise_repeatable(dtype):
    from fastlstm.backends.triton import BACKEND

    torch.manual_seed(0)
    fast = torch.nn.Sequential(fastlstm.LSTM(32, 64, 2, bidirectional=True, backend="triton")).to("cuda", dtype)
    x = torch.randn(50, 8, 32, device="cuda", dtype=dtype)
    assert BACKEND.unavailable_reason() is None

    def run():
        fast.zero_grad(set_to_none=True)
        y, (h, c) = fast[0](x.clone().requires_grad_())
        (y.float().square().sum() + h.float().sum() + c.float().sum()).backward()
        return [y, h, c] + [p.grad for p in fast.parameters()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_packed_and_lengths_calls_under_another_default_device(backend):
    """torch.set_default_device elsewhere than the data (a CUDA default with a CPU model, say; meta here): packed and
    lengths= calls, dropout and training included, build their index tensors on the CPU beside the batch sizes, as
    nn.LSTM's packed path does ("Tensor on device cpu is not on the expected device meta!" had been raised)."""
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2, bidirectional=True, dropout=0.5).double()
    fast = fastlstm.LSTM(I, H, 2, bidirectional=True, dropout=0.5, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, I, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    results = []
    try:
        torch.set_default_device("meta")
        for model, call in (
            (ref, lambda m: m(packed)),
            (fast, lambda m: m(packed)),
            (fast, lambda m: m(x, lengths=lengths)),
        ):
            torch.manual_seed(1)  # the same dropout draws
            y, (h, c) = call(model)
            y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
            grads = torch.autograd.grad(y.sum() + h.sum() + c.sum(), list(model.parameters()))
            results.append((h, c, *grads))
    finally:
        torch.set_default_device(None)
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert a.device.type == "cpu"
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_cudnns_advice_to_flatten_a_layers_own_weights_is_kept_quiet():
    """cuDNN warns that an RNN's weights are not one flat buffer and says to call flatten_parameters(), which does
    nothing for the separate weights the native backend's one layer passes (a mixed plan's layer, triton's
    self-test: seen on an H200), nor for the module's autocast probe's, which native.probe_lstm calls (half weights
    under half autocast, which cuDNN's autocast wrapper leaves unflattened). Ignored where that module's calls give
    it, and only there (a user's own nn.LSTM with such weights still hears it, and so does fastlstm.module's call of
    the whole stack with the layer's own weights). Stand-ins for cuDNN's warning here."""
    import warnings

    from fastlstm.backends import native

    advice = native.SEPARATE_WEIGHTS_WARNING + ". This means they need to be compacted at every call, ..."
    with warnings.catch_warnings(record=True) as seen:
        native.ignore_separate_weights_warning()  # as at import (pytest drops the filters an import made in a test)
        for module in ("fastlstm.backends.native", "torch.nn.modules.rnn", "fastlstm.module"):
            warnings.warn_explicit(advice, UserWarning, "caller.py", 1, module=module, registry={})
    assert [(w.message.args[0], w.filename) for w in seen] == [(advice, "caller.py")] * 2


def test_threads_taking_turns_with_onednn_off_leave_it_as_it_was():
    """oneDNN's switch is the process's. Native calls that need oneDNN off (training where OpenMP starves, bfloat16
    autocast on CPUs without AVX-512) each saved and restored it: with two threads' turns overlapping, the first out
    switched it back on under the second (which then ran oneDNN: wrong numbers, or an error), and the second
    restored "off" for good. Now the last out restores it, and the decisions read the program's setting."""
    import threading

    from fastlstm.backends.native import onednn_enabled, onednn_off

    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with onednn_off():
            first_in.set()
            second_in.wait()
        first_out.set()

    def second():
        first_in.wait()
        with onednn_off():
            second_in.set()
            first_out.wait()
            seen["switch"], seen["setting"] = torch._C._get_mkldnn_enabled(), onednn_enabled()

    with torch.backends.mkldnn.flags(enabled=True):
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert seen == {"switch": False, "setting": True}  # still off for the second; the program's setting on
        assert torch._C._get_mkldnn_enabled()
    with torch.backends.mkldnn.flags(enabled=False):  # a program's own setting: kept through a turn, and read
        with onednn_off():
            assert not onednn_enabled()
        assert not torch._C._get_mkldnn_enabled()
