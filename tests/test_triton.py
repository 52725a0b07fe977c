"""The Triton backend: parity with fastlstm.reference and nn.LSTM, both kernels, opcheck, torch.compile.

Without CUDA the kernels run on CPU tensors through triton's interpreter; TRITON_INTERPRET must be set
before triton is imported anywhere in the process (tests/conftest.py sets it too, first).
"""

from __future__ import annotations

import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import (  # noqa: E402
    assert_backward_rows_match,
    assert_threads_get_lone_results,
    auto_falls_back_to_native,
    interpreter_has_float64,
    needs_readable_transform_tensors,
    needs_tracing,
    require_triton,
    small_layer_call,
)
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

triton = require_triton()

import fastlstm  # noqa: E402
from fastlstm import reference  # noqa: E402
from fastlstm.backends import LayerCall  # noqa: E402
from fastlstm.backends.triton import BACKEND, triton_version  # noqa: E402
from fastlstm.backends.triton import kernels as triton_kernels  # noqa: E402
from fastlstm.backends.triton import ops as triton_ops  # noqa: E402
from fastlstm.check import exact_cudnn  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNELS = ["step", "sequence"]
# float64 runs under the interpreter only (CUDA float64 goes to native), and there from triton 3.5 on.
INTERPRETER_FLOAT64 = pytest.mark.skipif(
    HAS_CUDA or not interpreter_has_float64(), reason="float64 is served by the interpreter only, from triton 3.5"
)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-9, rtol=1e-7)}


class Case:
    def __init__(self, T, B, I, H, proj=0, rev=False, packed=False, bias=True):
        self.T, self.B, self.I, self.H, self.proj, self.rev, self.packed, self.bias = (
            T,
            B,
            I,
            H,
            proj,
            rev,
            packed,
            bias,
        )

    @property
    def P(self):
        return self.proj or self.H

    @property
    def id(self):
        parts = [f"T{self.T}", f"B{self.B}", f"I{self.I}", f"H{self.H}"]
        parts += ["rev"] * self.rev + [f"proj{self.proj}"] * bool(self.proj) + ["packed"] * self.packed
        parts += ["nobias"] * (not self.bias)
        return "-".join(parts)


CASES = [
    Case(1, 1, 3, 5),
    Case(5, 3, 4, 7),
    Case(5, 3, 4, 7, rev=True),
    Case(6, 5, 3, 16, packed=True),
    Case(7, 4, 4, 7, rev=True, packed=True),
    Case(4, 3, 5, 6, proj=3),
    Case(5, 5, 3, 7, proj=4, rev=True, packed=True),
    Case(3, 2, 3, 5, bias=False),
    Case(6, 4, 2, 9, proj=5, rev=True, packed=True, bias=False),
    Case(2, 17, 3, 70, proj=3, packed=True),  # two batch tiles, two hidden tiles, a K loop over H
]


def _params(case, kernel):
    return [pytest.param(c, k, id=f"{c.id}-{k[:3] if k == 'sequence' else k}") for c in case for k in kernel]


def _lengths(case: Case, gen: torch.Generator) -> list[int]:
    """Unsorted per-row lengths with max T."""
    lengths = torch.randint(1, case.T + 1, (case.B,), generator=gen)
    lengths[int(torch.randint(0, case.B, (1,), generator=gen))] = case.T
    return lengths.tolist()


def _batch_sizes(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([sum(n > t for n in lengths) for t in range(T)], dtype=torch.int64)


def _layer_inputs(case: Case, dtype, device=DEVICE, scale=0.4):
    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    H, P = case.H, case.P
    tensors = dict(
        x=rnd(case.T, case.B, case.I) / scale,
        h0=rnd(case.B, case.P) / scale,
        c0=rnd(case.B, case.H) / scale,
        w_ih=rnd(4 * H, case.I),
        w_hh=rnd(4 * H, P),
        b=rnd(4 * H) if case.bias else None,
        w_hr=rnd(P, H) if case.proj else None,
    )
    batch_sizes = None
    if case.packed:
        # The layer sees rows sorted by length (the packed convention); the module does the sorting.
        batch_sizes = _batch_sizes(sorted(_lengths(case, gen), reverse=True), case.T)
    return tensors, batch_sizes


def _outputs_and_grads(fn, tensors: dict, seed=7):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    args = {k: leaves.get(k) for k in tensors}
    y, hT, cT = fn(**args)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum() for t in (y, hT, cT))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"y": y.detach(), "hT": hT.detach(), "cT": cT.detach()}
    results.update({f"grad_{k}": g for k, g in zip(leaves, grads)})
    return results


def _assert_close_all(got: dict, expected: dict, **tol):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].shape == expected[key].shape, key
        assert got[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(got[key], expected[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------------
# Parity with the executable spec and with nn.LSTM (interpreter on CPU, or the GPU when there is one)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, kernel", _params(CASES, KERNELS))
def test_matches_reference_fp32(case, kernel):
    tensors, bs = _layer_inputs(case, torch.float32)
    got = _outputs_and_grads(lambda **a: BACKEND.layer(**a, batch_sizes=bs, reverse=case.rev, kernel=kernel), tensors)
    expected = _outputs_and_grads(lambda **a: reference.lstm_layer(**a, batch_sizes=bs, reverse=case.rev), tensors)
    _assert_close_all(got, expected, **TOL[torch.float32])


@INTERPRETER_FLOAT64
@pytest.mark.parametrize("case, kernel", _params([CASES[4], CASES[6], CASES[8]], KERNELS))
def test_matches_reference_fp64(case, kernel):
    tensors, bs = _layer_inputs(case, torch.float64)
    got = _outputs_and_grads(lambda **a: BACKEND.layer(**a, batch_sizes=bs, reverse=case.rev, kernel=kernel), tensors)
    expected = _outputs_and_grads(lambda **a: reference.lstm_layer(**a, batch_sizes=bs, reverse=case.rev), tensors)
    _assert_close_all(got, expected, **TOL[torch.float64])


def _nn_lstm_results(case: Case, dtype, device, run_layer=None):
    """Outputs and grads of one direction of nn.LSTM (the reverse half of a bidirectional one for rev), or of
    `run_layer(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse)` with the same weights and inputs.

    Packed cases use unsorted lengths through pack_padded_sequence(enforce_sorted=False); the layer gets the
    rows sorted the way PackedSequence sorts them.
    """
    torch.manual_seed(3)
    m = nn.LSTM(case.I, case.H, proj_size=case.proj, bias=case.bias, bidirectional=case.rev).to(device, dtype)
    sfx = "_reverse" if case.rev else ""
    D = 2 if case.rev else 1
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(case.T, case.B, case.I, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    h0 = torch.randn(D, case.B, case.P, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    c0 = torch.randn(D, case.B, case.H, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    lengths = _lengths(case, gen) if case.packed else None
    params = {name: p for name, p in m.named_parameters() if name.endswith(f"l0{sfx}")}
    if run_layer is None:
        if lengths is None:
            y, (hn, cn) = m(x, (h0, c0))
        else:
            packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
            y, (hn, cn) = m(packed, (h0, c0))
            y, _ = pad_packed_sequence(y, total_length=case.T)
        y = y[..., case.P :] if case.rev else y
    else:
        w_ih, w_hh = params[f"weight_ih_l0{sfx}"], params[f"weight_hh_l0{sfx}"]
        b = params[f"bias_ih_l0{sfx}"] + params[f"bias_hh_l0{sfx}"] if case.bias else None
        w_hr = params.get(f"weight_hr_l0{sfx}")
        d = D - 1
        if lengths is None:
            y, hT, cT = run_layer(x, h0[d], c0[d], w_ih, w_hh, b, w_hr, None, case.rev)
        else:
            packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
            order, unorder = packed.sorted_indices, packed.unsorted_indices
            y, hT, cT = run_layer(x[:, order], h0[d][order], c0[d][order], w_ih, w_hh, b, w_hr,
                                  packed.batch_sizes, case.rev)  # fmt: skip
            y, hT, cT = y[:, unorder], hT[unorder], cT[unorder]
        hn, cn = hT.unsqueeze(0).expand(D, -1, -1), cT.unsqueeze(0).expand(D, -1, -1)
    hn, cn = hn[D - 1], cn[D - 1]
    gen = torch.Generator().manual_seed(9)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum() for t in (y, hn, cn))
    leaves = {"x": x, "h0": h0, "c0": c0, **params}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    results = {"y": y.detach(), "h_n": hn.detach(), "c_n": cn.detach()}
    for k, g in zip(leaves, grads):
        if g is not None and k in ("h0", "c0"):
            g = g[D - 1]
        results[f"grad_{k}"] = g
    return results


def _run_triton(kernel):
    return lambda *a: BACKEND.layer(*a, kernel=kernel)


@pytest.mark.parametrize("case, kernel", _params(CASES[:-1], KERNELS))
def test_matches_nn_lstm_fp32(case, kernel):
    with exact_cudnn():  # on a GPU: cuDNN's float32 without TF32, as triton's by default
        expected = _nn_lstm_results(case, torch.float32, DEVICE)
    got = _nn_lstm_results(case, torch.float32, DEVICE, _run_triton(kernel))
    assert got.keys() == expected.keys()
    for key in expected:
        assert (got[key] is None) == (expected[key] is None), key
        if expected[key] is not None:
            torch.testing.assert_close(got[key], expected[key], **TOL[torch.float32], msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("value", ["", " "])
def test_a_blank_kernel_setting_is_unset(value, monkeypatch):
    """A blank FASTLSTM_TRITON_KERNEL picks kernels by the size rule, as unset; `fastlstm info` reports no error."""
    monkeypatch.setenv(triton_ops.ENV_KERNEL, value)
    assert triton_ops.setting_errors() == []
    monkeypatch.delenv(triton_ops.ENV_KERNEL)
    unset = triton_ops.choose_kernel(4, 32, 32, torch.float32)
    monkeypatch.setenv(triton_ops.ENV_KERNEL, value)
    assert triton_ops.choose_kernel(4, 32, 32, torch.float32) == unset


@pytest.mark.skipif(not hasattr(torch._C, "_get_fp32_precision_getter"), reason="torch before 2.9 has one switch")
def test_float32_follows_either_of_torchs_tf32_switches():
    """Once torch's newer switch is set (torch.backends.cuda.matmul.fp32_precision), reading the older allow_tf32
    raises: float32 calls still run, with the kernels' precision following whichever switch was set last."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision  # a property of torch's: monkeypatch cannot restore it
    case = CASES[0]
    with exact_cudnn():
        expected = _nn_lstm_results(case, torch.float32, DEVICE)
    try:
        for switch, precision in [("fp32_precision", "tf32"), ("fp32_precision", "ieee"), ("allow_tf32", True)]:
            setattr(matmul, switch, precision)
            assert triton_ops._precision(torch.float32) == ("ieee" if precision == "ieee" else "tf32")
            assert triton_ops._precision(torch.bfloat16) == "ieee"
            got = _nn_lstm_results(case, torch.float32, DEVICE, _run_triton("step"))
            tol = TOL[torch.float32] if precision == "ieee" or not HAS_CUDA else dict(atol=5e-3, rtol=5e-3)
            torch.testing.assert_close(got["y"], expected["y"], **tol)
    finally:
        matmul.fp32_precision = before


@needs_tracing
@pytest.mark.skipif(not hasattr(torch._C, "_get_fp32_precision_getter"), reason="torch before 2.9 has one switch")
def test_compiled_calls_read_torchs_tf32_switch_and_follow_its_changes():
    """dynamo cannot trace fp32_precision's getter (a fullgraph compile of every triton call raised): the switch is
    read once as a constant while tracing, and a change to it makes the compiled call read it again."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision  # a property of torch's: monkeypatch cannot restore it

    def precision_as_tensor(x):
        return x + (1.0 if triton_ops._precision(torch.float32) == "tf32" else 0.0)

    compiled = torch.compile(precision_as_tensor, fullgraph=True)
    try:
        for precision in ["tf32", "ieee", "tf32"]:
            matmul.fp32_precision = precision
            assert compiled(torch.zeros(1)).item() == (1.0 if precision == "tf32" else 0.0), precision
    finally:
        matmul.fp32_precision = before


@pytest.mark.parametrize("case, kernel", _params(CASES, KERNELS))
def test_inference_equals_training_forward(case, kernel):
    """Inference runs the kernels without storing the gates (SAVE_ACTS off) and, on CUDA, through a CUDA graph
    for the step kernel: the same numbers, bit for bit, as the forward that saves them for backward."""
    tensors, bs = _layer_inputs(case, torch.float32)
    saved = triton_ops.forward_impl(*tensors.values(), bs, case.rev, kernel)
    assert saved[3].shape == (case.T, case.B, 4 * case.H)
    for _ in range(3):  # on CUDA: warm-up, capture, replay
        with torch.no_grad():
            got = BACKEND.layer(**tensors, batch_sizes=bs, reverse=case.rev, kernel=kernel)
        for g, w in zip(got, saved[:3]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_frozen_weights_get_no_gradient_and_the_input_nn_lstms(kernel, monkeypatch):
    """Weights that need no gradient skip the weight gradients' GEMMs (the rows alone, triton_backward_rows): dx,
    dh0 and dc0 are nn.LSTM's and the weights' .grad stays None; with one weight trainable all of them run."""
    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, proj_size=2, bidirectional=True).to(DEVICE)
    fast = fastlstm.LSTM(3, 5, proj_size=2, bidirectional=True, backend="triton").to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(4, 2, 3, device=DEVICE), torch.randn(2, 2, 2, device=DEVICE)
    for trained in (None, "weight_hr_l0_reverse"):
        results = []
        for m in (ref, fast):
            for name, p in m.named_parameters():
                p.requires_grad_(name == trained)
                p.grad = None
            xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
            y, (h, c) = m(xi, (hi, torch.zeros(2, 2, 5, device=DEVICE)))
            (y.sin().sum() + h.sum() + c.cos().sum()).backward()
            results.append([xi.grad, hi.grad, *(p.grad for p in m.parameters())])
        for got, want in zip(results[1], results[0]):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen-weights"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_gradients_are_nn_lstms(kernel, frozen, monkeypatch):
    """torch.autograd.grad(..., is_grads_batched=True) (torch's legacy vmap over backward, as in a Jacobian by
    rows) hands backward BatchedTensors, which the kernels cannot read ("Cannot access storage of
    BatchedTensorImpl"): backward then runs the ops, once a sample. Each row is nn.LSTM's gradient of its own."""
    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True).to(DEVICE)
    fast = fastlstm.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True, backend="triton").to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3, device=DEVICE)
    grads_y = torch.randn(3, 4, 2, 4, device=DEVICE)
    results = []
    for m in (ref, fast):
        m.requires_grad_(not frozen)
        xi = x.clone().requires_grad_()
        y, _ = m(xi)
        wrt = [xi] if frozen else [xi, m.weight_hh_l0, m.weight_ih_l1_reverse, m.weight_hr_l1]
        results.append(torch.autograd.grad(y, wrt, grads_y, is_grads_batched=True))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_kernels_agree_with_each_other():
    case = Case(4, 3, 3, 6, proj=4, packed=True)
    tensors, bs = _layer_inputs(case, torch.float32)
    step, seq = (
        _outputs_and_grads(lambda k=k, **a: BACKEND.layer(**a, batch_sizes=bs, reverse=False, kernel=k), tensors)
        for k in KERNELS
    )
    _assert_close_all(step, seq, atol=1e-6, rtol=1e-5)


@INTERPRETER_FLOAT64
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed-unsorted"])
def test_module_stacked_bidirectional_proj(packed):
    """fastlstm.LSTM(backend="triton"): 2 layers, bidirectional, proj_size, float64, against nn.LSTM."""
    from helpers import assert_same_results, lstm_call, make_pair

    ref, fast = make_pair(4, 7, 2, bidirectional=True, proj_size=3, backend="triton")
    lengths = [3, 5, 1, 4]
    x = torch.randn(max(lengths), len(lengths), 4, dtype=torch.float64)
    state = [torch.randn(4, len(lengths), 3, dtype=torch.float64), torch.randn(4, len(lengths), 7, dtype=torch.float64)]

    def call(module, x, *state):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        return lstm_call(module, inp, *state)

    assert_same_results(ref, fast, [x, *state], call, **TOL[torch.float64])


@pytest.mark.parametrize("kernel", KERNELS)
def test_negated_weights_are_read_negated(kernel, monkeypatch):
    """A weight with the negative bit (torch._neg_view: the values negated lazily, the memory not) keeps it through
    .contiguous(): the kernels read the recurrent weights' memory themselves, and had read them un-negated (3.5e-3
    off nn.LSTM through w_hh, 0.1 through w_hr). Outputs and every gradient against nn.LSTM's, in float64 where
    triton serves it (the interpreter from triton 3.5), else in float32."""
    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    dtype = torch.float64 if not HAS_CUDA and interpreter_has_float64() else torch.float32
    for name in ("weight_hh_l0", "weight_hr_l0", "weight_ih_l0", "bias_hh_l0"):
        torch.manual_seed(0)
        ref = nn.LSTM(3, 4, proj_size=2).to(DEVICE, dtype)
        fast = fastlstm.LSTM(3, 4, proj_size=2, backend="triton").to(DEVICE, dtype)
        negated = torch._neg_view(getattr(ref, name).detach().clone())
        for m in (ref, fast):
            m.load_state_dict(ref.state_dict())
            setattr(m, name, nn.Parameter(negated.clone() if m is ref else negated))
        assert getattr(fast, name).is_neg()
        x = torch.randn(5, 2, 3, dtype=dtype, device=DEVICE)
        got, want = (_module_outputs_and_grads(m, x) for m in (fast, ref))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **TOL[dtype])


def _module_outputs_and_grads(m, x):
    y, (h, c) = m(x)
    (y.sum() + 2 * h.sum() + 3 * c.sum()).backward()
    return [y, h, c, *(p.grad for p in m.parameters())]


def test_a_weight_of_another_dtype_is_refused_as_nn_lstm_refuses_it():
    """A weight's .data swapped to float64 in place after a first call: nn.LSTM raises a RuntimeError; the module
    sees the mixed dtypes on the next call and a forced triton refuses it, and the triton layer itself refuses
    such a weight rather than reading float64 as float32."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5)
    fast = fastlstm.LSTM(3, 5, backend="triton")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    fast(x)
    for lstm in (ref, fast):
        lstm.weight_hh_l0.data = lstm.weight_hh_l0.data.double()
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(fastlstm.BackendUnavailableError, match="do not all share one dtype"):
        fast(x)
    h0 = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="x's dtype torch.float32, got torch.float64"):
        BACKEND.layer(x, h0, h0, fast.weight_ih_l0, fast.weight_hh_l0, fast.bias_ih_l0, None, None, False)


@pytest.mark.parametrize("kernel", KERNELS)
def test_python_threads_calling_at_once_get_their_own_numbers(kernel, monkeypatch):
    """Several Python threads running one model at once, forward and backward: each gets bitwise what a lone call
    gives (under the interpreter, whose kernels had failed mid-run when another thread's finished)."""
    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    torch.manual_seed(0)
    fast = fastlstm.LSTM(3, 5, backend="triton")
    inputs = [torch.randn(4, 2, 3, requires_grad=True) for _ in range(3)]

    def run(x):
        y, (h, c) = fast(x)
        return (y, h, c, *torch.autograd.grad(y.sum() + c.sum(), (x, *fast.parameters())))

    assert_threads_get_lone_results(run, inputs, threads=3, repeats=3)


@INTERPRETER_FLOAT64
@needs_readable_transform_tensors  # packed: the recomputed layer reads its batch sizes under torch.func.vjp
@pytest.mark.parametrize("kernel", KERNELS)
def test_double_backward_matches_nn_lstm(kernel, monkeypatch):
    """create_graph=True: second-order gradients equal nn.LSTM's (helpers.assert_same_double_backward), packed."""
    from helpers import assert_same_double_backward

    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    assert_same_double_backward("triton", packed=True, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------------------
# Ops: opcheck, torch.compile
# ------------------------------------------------------------------------------------------------------


def _op_args(case: Case, kernel, dtype=torch.float32):
    tensors, bs = _layer_inputs(case, dtype)
    args = [tensors[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b", "w_hr")]
    args = [a.requires_grad_() if a is not None else None for a in args]
    return args + [bs, case.rev, kernel]


@pytest.mark.parametrize("case, kernel", _params([Case(2, 2, 3, 4, proj=3, rev=True, packed=True)], KERNELS))
def test_opcheck_forward(case, kernel):
    torch.library.opcheck(torch.ops.fastlstm.triton_forward.default, _op_args(case, kernel))


@pytest.mark.parametrize("case, kernel", _params([Case(2, 2, 3, 4, packed=True)], KERNELS))
def test_opcheck_backward(case, kernel):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(case, kernel)]
    x, h0, c0, w_ih, w_hh, b, w_hr, bs, rev, kernel = args
    y, hT, cT, acts, hs, cs, r = torch.ops.fastlstm.triton_forward(*args)
    grads = [torch.randn_like(t) for t in (y, hT, cT)]
    bwd_args = [*grads, x, w_ih, w_hh, w_hr, bs, acts, hs, cs, r, rev, kernel, b is not None]
    torch.library.opcheck(torch.ops.fastlstm.triton_backward.default, bwd_args)
    # Without the input's gradient (a first layer fed data): the same other gradients, dx empty
    torch.library.opcheck(torch.ops.fastlstm.triton_backward.default, (*bwd_args, False))
    full, no_dx = (torch.ops.fastlstm.triton_backward(*bwd_args, input_grad) for input_grad in (True, False))
    assert no_dx[0].shape == (0,) and all(torch.equal(a, b) for a, b in zip(full[1:], no_dx[1:]))
    # Backward by rows (per-sample gradients): the h each step read is the forward's history
    assert_backward_rows_match(
        torch.ops.fastlstm.triton_backward.default,
        torch.ops.fastlstm.triton_backward_rows.default,
        bwd_args,
        x,
        h_prev=lambda rows: triton_ops.previous_h(hs, rev, bs),
    )


def _compiled_matches_eager(case: Case, kernel, dtype, device, backend):
    tensors, bs = _layer_inputs(case, dtype, device)

    def fn(x, h0, c0, w_ih, w_hh, b, w_hr):
        return BACKEND.layer(x, h0, c0, w_ih, w_hh, b, w_hr, bs, case.rev, kernel=kernel)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = _outputs_and_grads(compiled, tensors)
    expected = _outputs_and_grads(fn, tensors)
    _assert_close_all(got, expected, atol=1e-6, rtol=1e-5)


@needs_tracing
@pytest.mark.parametrize("kernel", KERNELS)
def test_compile_fullgraph(kernel):
    # aot_eager traces through dynamo + AOTAutograd like inductor does, without a C++/GPU codegen step.
    _compiled_matches_eager(Case(3, 2, 3, 5, proj=3, packed=True), kernel, torch.float32, DEVICE, "aot_eager")


# ------------------------------------------------------------------------------------------------------
# Kernel choice and the backend's answers
# ------------------------------------------------------------------------------------------------------


def test_choose_kernel(monkeypatch):
    monkeypatch.delenv(triton_ops.ENV_KERNEL, raising=False)
    f32, bf16 = torch.float32, torch.bfloat16
    assert triton_ops.choose_kernel(4, 128, 128, f32) == "sequence"
    assert triton_ops.choose_kernel(4, triton_ops.SEQ_MAX_HIDDEN + 1, 128, f32) == "step"
    assert triton_ops.choose_kernel(triton_ops.SEQ_MAX_BATCH + 1, 128, 128, f32) == "step"
    assert triton_ops.choose_kernel(4, 128, 128, f32, "step") == "step"
    # float32's FMA dots: a projection of 16 or less under a wider hidden size aborts triton 3.9's compiler in
    # the sequence kernel (ops.choose_kernel); tensor-core dtypes and hidden sizes of 16 keep it
    assert triton_ops.choose_kernel(4, 128, 16, f32) == "step"
    assert triton_ops.choose_kernel(4, 128, 16, bf16) == "sequence"
    assert triton_ops.choose_kernel(4, 16, 8, f32) == "sequence"
    assert triton_ops.choose_kernel(4, 128, 17, f32) == "sequence"
    monkeypatch.setenv(triton_ops.ENV_KERNEL, "step")
    assert triton_ops.choose_kernel(4, 128, 128, f32) == "step"
    assert triton_ops.choose_kernel(4, 128, 128, f32, "sequence") == "sequence"
    monkeypatch.setenv(triton_ops.ENV_KERNEL, "bogus")
    with pytest.raises(ValueError, match="FASTLSTM_TRITON_KERNEL"):
        triton_ops.choose_kernel(4, 128, 128, f32)


def _call(**kw) -> LayerCall:
    return small_layer_call(kw.pop("device_type", DEVICE), **kw)


def test_vmap_needs_the_ops_vmap_rule(monkeypatch):
    """Under torch.vmap triton serves a call through its op's vmap rule, which torch.library has from torch 2.5 on;
    without it the backend says so (and auto uses the reference loop)."""
    assert BACKEND.unsupported_reason(_call(vmapped=True)) is None
    monkeypatch.setattr(triton_ops, "HAS_VMAP_RULE", False)
    assert "torch.vmap" in BACKEND.unsupported_reason(_call(vmapped=True))
    assert BACKEND.unsupported_reason(_call()) is None


def test_backend_answers():
    assert BACKEND.name == "triton"
    assert BACKEND.unavailable_reason() is None
    assert BACKEND.unsupported_reason(_call()) is None
    assert BACKEND.unsupported_reason(_call(proj_size=4, packed=True, reverse=True)) is None
    assert "dtype" in BACKEND.unsupported_reason(_call(dtype=torch.int32))
    assert "device" in BACKEND.unsupported_reason(_call(device_type="mps"))
    assert "2**31" in BACKEND.unsupported_reason(_call(seq_len=100_000, batch=1024, hidden_size=1024))
    assert "empty" in BACKEND.unsupported_reason(_call(seq_len=0))


def test_the_op_refuses_sizes_past_int32_offsets():
    """A traced program leaves the int32 limit to the op (dispatch does not compare traced sizes: a guard, which
    torch.export refused for an unbounded batch with a static length: test_ecosystem's export tests), so the op
    checks the sizes it runs at. x is expanded, not allocated: the op refuses before reading it."""
    T, B, H = 2**31 // (4 * 16) + 1, 1, 16
    x = torch.zeros(1, 1, 3, device=DEVICE).expand(T, B, 3)
    h0 = c0 = torch.zeros(B, H, device=DEVICE)
    w_ih, w_hh = torch.zeros(4 * H, 3, device=DEVICE), torch.zeros(4 * H, H, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"fastlstm triton: buffers over 2\*\*31 elements"):
        torch.ops.fastlstm.triton_forward(x, h0, c0, w_ih, w_hh, None, None, None, False, "auto")


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's answers")
def test_backend_answers_interpreter(monkeypatch):
    float64 = BACKEND.unsupported_reason(_call(dtype=torch.float64))
    assert float64 is None if interpreter_has_float64() else "triton 3.5" in float64
    assert BACKEND.unsupported_reason(_call(dtype=torch.float16)) is None
    assert "dtype" in BACKEND.unsupported_reason(_call(dtype=torch.bfloat16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in BACKEND.unavailable_reason()
    assert BACKEND.unsupported_reason(_call()) is not None


def test_import_without_triton():
    """The package imports, and says why it cannot run, when triton cannot be imported."""
    from helpers import run_python

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from fastlstm.backends.triton import BACKEND\n"
        "reason = BACKEND.unavailable_reason()\n"
        "assert reason.startswith('triton is not installed'), reason\n"
        "print('ok')\n"
    )
    out = run_python("-c", code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_triton_missing_what_it_imports_is_not_called_missing(monkeypatch):
    """Installed triton whose import fails on a module of its own needs (numpy, which its interpreter imports and
    triton does not require) says so, not that triton is not installed."""
    import builtins

    real_import = builtins.__import__

    def import_without_numpy(name, *args, **kwargs):
        if name == "triton":
            raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_numpy)
    reason = BACKEND.unavailable_reason()
    assert reason.startswith("importing triton failed: No module named 'numpy'"), reason


# ------------------------------------------------------------------------------------------------------
# Self-test: auto routes around kernels that fail on this device
# ------------------------------------------------------------------------------------------------------


class _FailingKernel:
    """Stands in for a triton kernel whose compilation fails, as it does on its first launch."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

        return launch


@pytest.fixture
def fresh_self_tests(monkeypatch):
    from fastlstm import dispatch

    monkeypatch.setattr(triton_ops, "_SELF_TESTS", {})
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.mark.parametrize(
    "flags",
    [dict(), dict(needs_grad=False), dict(proj_size=5, packed=True, reverse=True), dict(bias=False, batch=1)],
    ids=["grad", "nograd", "proj-packed-rev", "nobias-B1"],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_self_test_passes_working_kernels(flags, kernel, monkeypatch, fresh_self_tests):
    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    rng = torch.get_rng_state()
    assert BACKEND.self_test(_call(**flags)) is None
    assert torch.equal(torch.get_rng_state(), rng)  # the user's random stream is untouched


@pytest.mark.parametrize("transform", ["vmap", "grad"])
@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
def test_self_test_run_first_under_a_transform_passes(transform, needs_grad, fresh_self_tests):
    """A configuration's first call under torch.func.vmap or grad runs the self-test there: it must test the
    kernels, not the transform (on an H200 its requires_grad_ raised under vmap, and the cached failure sent every
    later call of the configuration to native)."""
    seen = []

    def body(x):
        seen.append(BACKEND.self_test(_call(needs_grad=needs_grad)))
        return (x * 2).sum()

    run = torch.func.vmap(body) if transform == "vmap" else torch.func.grad(body)
    run(torch.randn(3, 2))
    assert seen == [None]
    assert list(triton_ops._SELF_TESTS.values()) == [None]


@pytest.mark.parametrize(
    "failing, needs_grad, kernel",
    [("fwd_seq_kernel", False, "sequence"), ("fwd_step_kernel", False, "step"), ("bwd_step_kernel", True, "step")],
)
def test_self_test_reports_a_kernel_that_fails_to_build(failing, needs_grad, kernel, monkeypatch, fresh_self_tests):
    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    monkeypatch.setattr(triton_kernels, failing, _FailingKernel())
    reason = BACKEND.self_test(_call(needs_grad=needs_grad))
    assert reason is not None and "OutOfResources" in reason and "shared memory" in reason
    assert BACKEND.self_test(_call(needs_grad=needs_grad)) == reason  # cached: the kernels run once


def test_self_test_passes_inference_when_only_a_backward_kernel_fails(monkeypatch, fresh_self_tests):
    monkeypatch.setenv(triton_ops.ENV_KERNEL, "step")
    monkeypatch.setattr(triton_kernels, "bwd_step_kernel", _FailingKernel())
    assert BACKEND.self_test(_call(needs_grad=False)) is None
    assert BACKEND.self_test(_call(needs_grad=True)) is not None


@pytest.mark.parametrize("corrupt", ["output", "gradient"])
def test_self_test_reports_wrong_numbers(corrupt, monkeypatch, fresh_self_tests):
    name = "forward_impl" if corrupt == "output" else "backward_impl"
    real = getattr(triton_ops, name)

    def corrupted(*args, **kwargs):
        first, *rest = real(*args, **kwargs)
        return (first * 1.5 + 0.1, *rest)

    monkeypatch.setattr(triton_ops, name, corrupted)
    reason = BACKEND.self_test(_call())
    assert reason is not None and f"{corrupt} 0 differs from native" in reason


def test_auto_routes_around_a_failing_kernel_with_one_warning(monkeypatch, fresh_self_tests):
    """auto (made to pick triton here) falls back to native, warns once and says why; forced triton raises."""
    import fastlstm

    monkeypatch.setattr(triton_kernels, "fwd_seq_kernel", _FailingKernel())
    monkeypatch.setenv(triton_ops.ENV_KERNEL, "sequence")
    warning = "triton backend is unavailable.*self-test.*OutOfResources"
    m, x = auto_falls_back_to_native(monkeypatch, DEVICE, warning)
    assert "triton failed its self-test here" in str(fastlstm.explain(m, x))
    forced = fastlstm.LSTM(4, 8, 2, device=DEVICE, backend="triton")
    with pytest.raises(triton.runtime.errors.OutOfResources):
        forced(x)


def test_no_integer_argument_of_a_kernel_is_specialised():
    """Triton compiles a kernel again for an integer argument equal to 1 or divisible by 16 unless told not to;
    step indices, live rows (1 at a packed batch's end), batch sizes and lengths take every value, so each new
    class would compile in the user's call, outside the build guard's child, which builds one batch size on two
    steps (an audit counted 8-13 such compiles in 40 training calls of varying lengths and batches)."""
    import ast
    import inspect

    # Read from the decorators in the source: under the interpreter triton 3.4 keeps no do_not_specialize list
    kernels = {
        node.name: node
        for node in ast.parse(inspect.getsource(triton_kernels)).body
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
    }
    assert len(kernels) == 7
    for name, node in kernels.items():
        (jit,) = [d for d in node.decorator_list if isinstance(d, ast.Call) and ast.unparse(d.func) == "triton.jit"]
        (unspecialised,) = [ast.literal_eval(k.value) for k in jit.keywords if k.arg == "do_not_specialize"]
        integers = [
            a.arg
            for a in node.args.args
            if (a.annotation is None or ast.unparse(a.annotation) != "tl.constexpr") and not a.arg.endswith("_ptr")
        ]
        assert integers and set(integers) <= set(unspecialised), (name, sorted(set(integers) - set(unspecialised)))


def test_kernels_compile_for_an_h200():
    """Every kernel the launchers issue compiles for sm_90 (H100 / H200) in every CUDA dtype, fits its shared
    memory and spills at most 2 KB a thread (float32 tiles once spilled 8-10 KB): triton's ahead-of-time
    compiler and ptxas need no GPU. The interpreter above runs the kernels' arithmetic but not the compiler's
    checks, and never runs bfloat16 or float16 at all."""
    pytest.importorskip("triton.backends.nvidia", reason="this triton build has no NVIDIA backend")
    if triton_version() < (3, 3):
        pytest.skip("tests/triton_compile.py drives the ahead-of-time compiler as triton 3.3+ takes it")
    from helpers import run_pythons

    # One compile takes one core, and a cold cache takes minutes for all: as many shards as cores, at once
    shards = max(1, min(4, os.cpu_count() or 1))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    args = ("tests/triton_compile.py", "--arch", "90", "--resources", "--max-stack", "2048")
    results = run_pythons([((*args, "--shard", f"{k}/{shards}"), env) for k in range(shards)], timeout=600)
    for result in results:
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
        assert re.search(r"^sm_90, triton \S+: [1-9]\d* compiles, 0 failures", result.stdout, re.MULTILINE), (
            result.stdout
        )


# ------------------------------------------------------------------------------------------------------
# CUDA only: low precision (flash-attention's rule), larger shapes, inductor
# ------------------------------------------------------------------------------------------------------

CUDA_CASES = [
    Case(64, 8, 64, 128),
    Case(24, 40, 48, 320, proj=96, packed=True),
    Case(20, 130, 32, 512, rev=True, packed=True),
]


def _max_errors(results: dict, ref: dict) -> dict:
    return {k: (results[k].double() - ref[k].double()).abs().max().item() for k in ref if ref[k] is not None}


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's float16; on a GPU the cuda test below covers it")
@pytest.mark.parametrize("case, kernel", _params(CASES[:-1], KERNELS))
def test_float16_error_at_most_twice_native(case, kernel):
    """The half-precision path (h and the weights in float16 for tl.dot, c and sums in float32) under the
    interpreter: error against a float64 reference at most 2x that of nn.LSTM in float16 on the CPU."""
    ref = _nn_lstm_results(case, torch.float64, DEVICE)
    native = _nn_lstm_results(case, torch.float16, DEVICE)
    fast = _nn_lstm_results(case, torch.float16, DEVICE, _run_triton(kernel))
    native_err, fast_err = _max_errors(native, ref), _max_errors(fast, ref)
    for key in native_err:
        assert fast[key].dtype == torch.float16, key
        floor = (ref[key].to(torch.float16).double() - ref[key]).abs().max().item()
        assert fast_err[key] <= 2 * native_err[key] + 2 * floor + 1e-6, (key, fast_err[key], native_err[key], floor)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case, kernel", _params(CUDA_CASES, KERNELS))
def test_cuda_error_at_most_twice_native(case, kernel, dtype):
    """Error against a float64 reference at most 2x nn.LSTM's (cuDNN) error in the same dtype, plus the
    rounding error of the reference itself in that dtype."""
    ref = _nn_lstm_results(case, torch.float64, "cuda")
    native = _nn_lstm_results(case, dtype, "cuda")
    fast = _nn_lstm_results(case, dtype, "cuda", _run_triton(kernel))
    native_err, fast_err = _max_errors(native, ref), _max_errors(fast, ref)
    for key in native_err:
        floor = (ref[key].to(dtype).double() - ref[key]).abs().max().item()
        assert fast_err[key] <= 2 * native_err[key] + 2 * floor + 1e-6, (key, fast_err[key], native_err[key], floor)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "flags, kernel",
    [
        (dict(batch=8, hidden_size=128, input_size=64), "sequence"),
        (dict(batch=40, hidden_size=320, input_size=48, proj_size=96, packed=True), "step"),
    ],
    # the block configurations of CUDA_CASES[0] and [1], so the GPU run compiles nothing extra
    ids=["B8-H128-sequence", "B40-H320-proj-packed-step"],
)
def test_cuda_self_test_passes_real_kernels(flags, kernel, dtype, monkeypatch, fresh_self_tests):
    """On a real GPU the kernels compile and the self-test's tolerance admits TF32 / bf16 / fp16 rounding, so
    auto does not route working kernels to native."""
    monkeypatch.setenv(triton_ops.ENV_KERNEL, kernel)
    for needs_grad in (False, True):
        assert BACKEND.self_test(_call(dtype=dtype, needs_grad=needs_grad, **flags)) is None


@pytest.mark.cuda
@pytest.mark.parametrize("case, kernel", _params([CASES[1], CASES[6], CASES[8], CASES[9], CUDA_CASES[0]], KERNELS))
def test_cuda_fp32_matches_nn_lstm(case, kernel):
    """Against cuDNN without TF32: by default it multiplies float32 in TF32 (torch.backends.cudnn.allow_tf32), where
    triton follows torch's matmul switch (off by default). With TF32 on, these differed by up to 8.9% of a weight
    gradient's value (an H200), while test_cuda_error_at_most_twice_native held triton's own error within twice
    cuDNN's."""
    with exact_cudnn():
        expected = _nn_lstm_results(case, torch.float32, "cuda")
    got = _nn_lstm_results(case, torch.float32, "cuda", _run_triton(kernel))
    for key in expected:
        if expected[key] is not None:
            scale = max(1.0, expected[key].abs().max().item())
            torch.testing.assert_close(got[key], expected[key], atol=2e-4 * scale, rtol=1e-3,
                                       msg=lambda m, k=key: f"{k}: {m}")  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_dropout_draws_the_masks_nn_lstms_aten_loop_draws(packed):
    """Between layers fastlstm's module draws from torch's CUDA generator as nn.LSTM's ATen loop does, cuDNN off
    (cuDNN keeps a dropout state of its own), in the same dtype (torch's CUDA dropout assigns its random numbers by a
    vector width that depends on the dtype, which is why `check` compares dropout on the CPU only): outputs, states
    and every gradient, float32."""
    torch.manual_seed(0)
    ref = nn.LSTM(12, 16, 3, bidirectional=True, dropout=0.5).cuda()
    fast = fastlstm.LSTM(12, 16, 3, bidirectional=True, dropout=0.5, backend="triton").cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(7, 5, 12, device="cuda")

    def results(module):
        torch.manual_seed(1)
        inp = x.clone().requires_grad_(True)
        with torch.backends.cudnn.flags(enabled=False):
            y, (h, c) = module(pack_padded_sequence(inp, [7, 6, 4, 2, 1]) if packed else inp)
        y = y.data if packed else y
        loss = y.pow(2).sum() + h.sum() + c.sum()
        return [y, h, c, *torch.autograd.grad(loss, [inp, *module.parameters()])]

    for got, want in zip(results(fast), results(ref), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_compile_inductor(kernel):
    _compiled_matches_eager(Case(16, 8, 32, 64, proj=32, packed=True), kernel, torch.float32, "cuda", "inductor")


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_cuda_sequence_kernel_never_waits_for_the_gpu_and_captures_in_a_callers_graph(packed):
    """The sequence kernel's per-step batch sizes reach the GPU without a synchronizing copy, so neither its forward
    nor its backward waits for the GPU, and a caller's own CUDA graph (torch.cuda.graph, inductor's cudagraphs)
    can capture its forward: a replay gives what the call gives outside the graph."""
    case = Case(6, 5, 7, 16, packed=packed)
    tensors, bs = _layer_inputs(case, torch.float32, "cuda")
    upstream = [torch.randn(shape, device="cuda") for shape in ((6, 5, 16), (5, 16), (5, 16))]

    def train():
        leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}
        outs = BACKEND.layer(**{k: leaves.get(k) for k in tensors}, batch_sizes=bs, reverse=False, kernel="sequence")
        loss = sum((out * g).sum() for out, g in zip(outs, upstream))
        return [out.detach() for out in outs], torch.autograd.grad(loss, list(leaves.values()))

    def infer():
        with torch.no_grad():
            return BACKEND.layer(**tensors, batch_sizes=bs, reverse=False, kernel="sequence")

    expected, inferred = train(), infer()  # compiles both variants of the kernel, outside what is checked
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip([*again[0], *again[1]], [*expected[0], *expected[1]]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        captured = infer()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, inferred):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_a_failed_graph_capture_leaves_the_callers_stream_current(monkeypatch):
    """A capture that fails (here: a loop that synchronizes, which capturing forbids) warns and runs the loop
    plainly, and later work of the thread stays on the stream it was on."""
    from fastlstm.backends.triton import graphs

    graphs.clear()
    monkeypatch.setattr(graphs, "_disabled_reason", None)
    case = Case(4, 3, 5, 16)
    tensors, _ = _layer_inputs(case, torch.float32, "cuda")
    real_loop = triton_ops.run_forward_loop

    def syncing_loop(*args, **kwargs):
        torch.cuda.synchronize()
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "run_forward_loop", syncing_loop)
    mine = torch.cuda.Stream()
    with torch.cuda.stream(mine), torch.no_grad():
        BACKEND.layer(**tensors, batch_sizes=None, reverse=False, kernel="step")  # warm-up: not captured
        with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
            BACKEND.layer(**tensors, batch_sizes=None, reverse=False, kernel="step")
        assert torch.cuda.current_stream() == mine
    graphs.clear()


def test_cuda_unsupported_float64():
    assert "dtype" in BACKEND.unsupported_reason(_call(device_type="cuda", dtype=torch.float64))


def test_launches_follow_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the launchers make the tensors' device current first (a
    model on cuda:1 without torch.cuda.set_device). Checked with a stand-in for a cuda:1 tensor."""
    entered = []

    class DeviceContext:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class OnCuda1:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    seen = []
    wrapped = triton_ops.on_input_device(lambda first, *rest: seen.append((first, rest)) or "result")
    first = OnCuda1()
    assert wrapped(first, 2, 3) == "result"
    assert seen == [(first, (2, 3))] and entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert wrapped(torch.zeros(1)) == "result" and entered == []  # CPU tensors: no CUDA device touched
    for launcher in (triton_ops.forward_impl, triton_ops.backward_impl):
        assert launcher.__wrapped__ is not None  # both launchers go through the guard


def test_launch_configuration_from_the_environment(monkeypatch):
    """FASTLSTM_TRITON_CONFIG (for benchmarks/gpu_tune.py) overrides tiles and launch options; bad values raise
    before anything launches, and the kernels give the same numbers with other tiles."""
    default = triton_ops._blocks(40, 100, 100, "step", torch.bfloat16)
    assert default["BLOCK_K"] == 64  # tensor-core dtypes keep the K tile of 64; FMA dots (float32) take 16
    assert triton_ops._blocks(40, 100, 100, "step", torch.float32)["BLOCK_K"] == 16
    monkeypatch.setenv(triton_ops.ENV_CONFIG, "BLOCK_K=16, num_warps=8,BLOCK_H=16")
    assert triton_ops._blocks(40, 100, 100, "step", torch.bfloat16) == dict(default, BLOCK_K=16, BLOCK_H=16)
    assert triton_ops._launch_options() == dict(triton_ops.LAUNCH_OPTIONS, num_warps=8)
    case = Case(4, 3, 5, 40, proj=20, packed=True)
    tensors, bs = _layer_inputs(case, torch.float32)
    for kernel in KERNELS:
        got = _outputs_and_grads(
            lambda k=kernel, **a: BACKEND.layer(**a, batch_sizes=bs, reverse=False, kernel=k), tensors
        )
        expected = _outputs_and_grads(lambda **a: reference.lstm_layer(**a, batch_sizes=bs, reverse=False), tensors)
        _assert_close_all(got, expected, **TOL[torch.float32])
    for bad, message in [
        ("BLOCK_K=24", "power of two >= 16"),
        ("BLOCK_H=8", "power of two >= 16"),
        ("num_warps=3", "power of two"),
        ("num_stages=0", "at least 1"),
        ("BLOCK_Q=16", "NAME one of"),
        ("num_warps", "NAME=INTEGER"),
        ("num_warps=8,", "NAME=INTEGER"),
    ]:
        monkeypatch.setenv(triton_ops.ENV_CONFIG, bad)
        with pytest.raises(ValueError, match=message):
            triton_ops._blocks(4, 16, 16, "step", torch.float32)


def test_malformed_op_calls_raise_before_any_kernel_runs():
    """Calls of the triton ops themselves (fastlstm.LSTM never makes these) with a tensor smaller than the layer's
    sizes, batch sizes above the batch, growing or reaching 0, a meta tensor among CPU ones, an unknown kernel, no
    steps or no rows (forward had run them, backward then failed), a dtype no kernel takes here: each raises before a
    launch. Under the interpreter such calls segfaulted or corrupted the heap, or returned garbage; on a
    GPU they would be illegal memory accesses. In a process of its own, so that a crash fails this test only."""
    from helpers import run_python

    code = """
import torch
import fastlstm
ops = torch.ops.fastlstm
T, B, I, H, P = 3, 2, 5, 6, 4
x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
w_ih, w_hh, b = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H)
sizes = torch.tensor([2, 2, 1])
fwd = lambda *a, kernel="step", bs=sizes: ops.triton_forward(*a, bs, False, kernel)
y, hT, cT, acts, hs, cs, r = fwd(x, h0, c0, w_ih, w_hh, b, None)


def bwd(**change):
    a = {**dict(grad_y=torch.ones_like(y), grad_hT=hT, grad_cT=cT, acts=acts, hs=hs, cs=cs, w_hh=w_hh, bs=sizes),
         **change}
    return ops.triton_backward(a["grad_y"], a["grad_hT"], a["grad_cT"], x, w_ih, a["w_hh"], None, a["bs"],
                               a["acts"], a["hs"], a["cs"], r, False, "sequence", True)


cases = {
    "batch sizes above B": (lambda: fwd(x, h0, c0, w_ih, w_hh, b, None, bs=torch.tensor([2, 2, 1000])), "batch_sizes"),
    "growing batch sizes": (lambda: fwd(x, h0, c0, w_ih, w_hh, b, None, bs=torch.tensor([2, 1, 2])), "batch_sizes"),
    "a step without rows": (lambda: fwd(x, h0, c0, w_ih, w_hh, b, None, bs=torch.tensor([2, 1, 0])), "batch_sizes"),
    "float batch sizes": (lambda: fwd(x, h0, c0, w_ih, w_hh, b, None, bs=torch.tensor([2.0, 2.0, 1.0])),
                          "batch_sizes"),
    "empty batch sizes": (lambda: fwd(x, h0, c0, w_ih, w_hh, b, None, kernel="sequence",
                                      bs=torch.tensor([], dtype=torch.long)), "batch_sizes"),
    "w_hr of 0 columns": (lambda: fwd(x, torch.randn(B, P), c0, w_ih, torch.randn(4 * H, P), b, torch.randn(P, 0)),
                          "w_hr must be"),
    "no w_hr, P != H": (lambda: fwd(x, torch.randn(B, P), c0, w_ih, torch.randn(4 * H, P), b, None), "without w_hr"),
    "h0 of one row": (lambda: fwd(x, h0[:1], c0, w_ih, w_hh, b, None), "h0 must be"),
    "meta w_ih": (lambda: fwd(x, h0, c0, w_ih.to("meta"), w_hh, b, None), "device"),
    "unknown kernel": (lambda: fwd(x, h0, c0, w_ih, w_hh, b, None, kernel="foo"), "kernel must be"),
    "grad_cT one row short": (lambda: bwd(grad_cT=cT[:1]), "grad_cT must be"),
    "saved acts one step short": (lambda: bwd(acts=acts[:-1]), "acts (saved) must be"),
    "w_hh of 4H + 1 rows": (lambda: bwd(w_hh=torch.randn(4 * H + 1, H)), "w_hh must be"),
    "no steps": (lambda: fwd(x[:0], h0, c0, w_ih, w_hh, b, None, bs=torch.tensor([], dtype=torch.long)),
                 "one step and one row"),
    "no rows": (lambda: fwd(x[:, :0], h0[:0], c0[:0], w_ih, w_hh, b, None, bs=None), "one step and one row"),
    "bfloat16 (the interpreter computes it wrong)": (
        lambda: fwd(*(t.bfloat16() for t in (x, h0, c0, w_ih, w_hh, b)), None), "x must be one of"),
    "integer w_hh": (lambda: fwd(x, h0, c0, w_ih, w_hh.long(), b, None), "w_hh must be floating point"),
    "integer saved cs": (lambda: bwd(cs=cs.long()), "cs (saved) must be floating point"),
}
for name, (call, message) in cases.items():
    try:
        call()
    except (RuntimeError, ValueError) as error:
        assert message in str(error), (name, str(error))
    else:
        raise AssertionError(f"{name}: no error")
print("OK")
"""
    proc = run_python("-c", code, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]
