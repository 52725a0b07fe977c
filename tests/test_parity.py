"""fastlstm.LSTM against nn.LSTM with the same weights: outputs, states and every gradient."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES
from helpers import assert_same_results, fast_cpu_backends, lstm_call, make_pair, run_pythons, run_without_grads
from torch.nn.utils.rnn import pack_padded_sequence

from fastlstm.backends import BackendUnavailableError

# Every backend that serves float64 on the CPU here: cpp, and triton under the interpreter, face the same matrix
# as the module's own paths (their own files add kernel paths and sizes).
BACKENDS = ["native", "reference", *fast_cpu_backends()]
I, H, PROJ = 5, 7, 3


def _config_id(bias, batch_first, bidirectional, proj, layers):
    return "-".join(
        [f"L{layers}", "bias" if bias else "nobias", "bf" if batch_first else "tf"]
        + (["bi"] if bidirectional else [])
        + ([f"proj{proj}"] if proj else [])
    )


CONFIGS = list(itertools.product([True, False], [False, True], [False, True], [0, PROJ], [1, 3]))


def _light_for_triton(backend: str, layers: int) -> bool:
    """Whether a case runs for `backend`: triton under the interpreter takes about a second a layer, so its stacks
    of 3 are left to the other backends (the module stacks every backend's layers alike)."""
    return backend != "triton" or layers < 3


MATRIX = [(backend, *c) for backend in BACKENDS for c in CONFIGS if _light_for_triton(backend, c[-1])]


@pytest.mark.parametrize(
    "backend,bias,batch_first,bidirectional,proj,layers", MATRIX, ids=[f"{_config_id(*c[1:])}-{c[0]}" for c in MATRIX]
)
def test_matrix_float64(backend, bias, batch_first, bidirectional, proj, layers):
    kwargs = dict(bias=bias, batch_first=batch_first, bidirectional=bidirectional, proj_size=proj)
    ref, fast = make_pair(I, H, layers, backend=backend, **kwargs)
    T, B = 6, 3
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    D = 2 if bidirectional else 1
    h0 = torch.randn(layers * D, B, proj or H, dtype=torch.float64)
    c0 = torch.randn(layers * D, B, H, dtype=torch.float64)
    atol, rtol = TOLERANCES[torch.float64]
    assert_same_results(ref, fast, [x, h0, c0], lstm_call, atol, rtol)
    assert_same_results(ref, fast, [x], lstm_call, atol, rtol)
    assert_same_results(ref, fast, [x, h0, c0], lstm_call, atol, rtol, run=run_without_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "T,B,hidden,layers,bidirectional,proj",
    [
        (1, 1, 1, 1, False, 0),  # T=1, B=1, H=1
        (1, 4, 5, 2, True, 2),
        (9, 17, 13, 2, True, 0),  # batch not a multiple of 16, odd H
        (4, 1, 9, 3, True, 4),
    ],
    ids=lambda v: str(v),
)
def test_shapes(backend, dtype, T, B, hidden, layers, bidirectional, proj):
    ref, fast = make_pair(I, hidden, layers, bidirectional=bidirectional, proj_size=proj, backend=backend, dtype=dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    D = 2 if bidirectional else 1
    h0 = torch.randn(layers * D, B, proj or hidden, dtype=dtype)
    c0 = torch.randn(layers * D, B, hidden, dtype=dtype)
    atol, rtol = TOLERANCES[dtype]
    assert_same_results(ref, fast, [x], lstm_call, atol, rtol)
    if T == 1:  # a state given too: from zeros, one step leaves w_hh's gradient zero, which no mistake would show
        assert_same_results(ref, fast, [x, h0, c0], lstm_call, atol, rtol)
    if backend != "triton":  # inference (cpp: the one-call stack); triton's under the interpreter: the matrix's
        assert_same_results(ref, fast, [x, h0, c0], lstm_call, atol, rtol, run=run_without_grads)


PACKED_CASES = [
    ([7, 5, 5, 2, 1, 1], True),
    ([1, 5, 7, 2, 5, 1], False),  # unsorted lengths
    ([3, 3, 3], True),
    ([4], True),
]


PACKED_CONFIGS = [(True, 2, 2, True), (False, 0, 1, False), (True, 0, 3, False)]


@pytest.mark.parametrize("lengths,enforce_sorted", PACKED_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "batch_first,backend,bidirectional,proj,layers,with_state",
    # batch_first only packs the input another way (the pack is the same) and the module reads no batch_first
    # with a pack: the other backends cover it, and the interpreter's 9 s are spared
    [
        (batch_first, backend, *c)
        for batch_first in (False, True)
        for backend in BACKENDS
        for c in PACKED_CONFIGS
        if _light_for_triton(backend, c[2]) and not (backend == "triton" and batch_first)
    ],
)
def test_packed(backend, lengths, enforce_sorted, bidirectional, proj, layers, with_state, batch_first):
    ref, fast = make_pair(
        I, H, layers, bidirectional=bidirectional, proj_size=proj, batch_first=batch_first, backend=backend
    )
    T, B = max(lengths), len(lengths)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    D = 2 if bidirectional else 1
    state = [
        torch.randn(layers * D, B, proj or H, dtype=torch.float64),
        torch.randn(layers * D, B, H, dtype=torch.float64),
    ]

    def call(module, x, *state):
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
        return lstm_call(module, packed, *state)

    atol, rtol = TOLERANCES[torch.float64]
    assert_same_results(ref, fast, [x] + (state if with_state else []), call, atol, rtol)
    assert_same_results(ref, fast, [x] + (state if with_state else []), call, atol, rtol, run=run_without_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_an_input_that_needs_no_gradient(backend, packed):
    """A first layer fed data (no gradient to the input): the fast backends then skip dx's product, as large as
    each weight gradient's. Everything else is nn.LSTM's: outputs, the state's and every weight's gradients, and
    the input's stays None. So where the input requires grad but a backward asks for the weights' gradients alone
    (torch.autograd.grad), and a second backward then for the input's. And with frozen weights too: the state's
    gradients alone."""
    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=PROJ, backend=backend)
    lengths = [6, 2, 4]
    x = torch.randn(6, 3, I, dtype=torch.float64)
    state = [torch.randn(4, 3, PROJ, dtype=torch.float64), torch.randn(4, 3, H, dtype=torch.float64)]

    def call(module, x, *state):
        x = x.detach()  # the data: no gradient wanted
        inputs = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        return lstm_call(module, inputs, *state)

    atol, rtol = TOLERANCES[torch.float64]
    assert_same_results(ref, fast, [x, *state], call, atol, rtol)
    x.requires_grad_()
    grads = []
    for module in (ref, fast):
        y = lstm_call(module, pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x)[0]
        loss = (y.data if packed else y).pow(2).sum()
        grads.append([*torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)])
        grads[-1] += torch.autograd.grad(loss, x)
    for got, want in zip(*reversed(grads), strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for module in (ref, fast):
        module.requires_grad_(False)
    assert_same_results(ref, fast, [x, *state], call, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched(backend, with_state, batch_first):
    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=PROJ, batch_first=batch_first, backend=backend)
    x = torch.randn(5, I, dtype=torch.float64)
    state = [torch.randn(4, PROJ, dtype=torch.float64), torch.randn(4, H, dtype=torch.float64)]
    atol, rtol = TOLERANCES[torch.float64]
    assert_same_results(ref, fast, [x] + (state if with_state else []), lstm_call, atol, rtol)
    y, (h, c) = fast(x)
    assert y.shape == (5, 2 * PROJ) and h.shape == (4, PROJ) and c.shape == (4, H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_batch(backend):
    ref, fast = make_pair(I, H, 2, bidirectional=True, backend=backend)
    x = torch.randn(4, 0, I, dtype=torch.float64)
    y_ref, (h_ref, c_ref) = ref(x)
    if backend == "triton":  # its kernels take no empty grid: forced, it says so; auto sends the call native
        with pytest.raises(BackendUnavailableError, match="empty input"):
            fast(x)
        fast.backend = "auto"
    y, (h, c) = fast(x)
    assert y.shape == y_ref.shape == (4, 0, 2 * H)
    assert h.shape == h_ref.shape and c.shape == c_ref.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=PROJ, backend=backend)
    x = torch.randn(2 * I, 3, 6, dtype=torch.float64).permute(2, 1, 0)[:, :, ::2]  # [6, 3, I], strided
    h0 = torch.randn(3, 4, 2 * PROJ, dtype=torch.float64).transpose(0, 1)[:, :, ::2]
    c0 = torch.randn(H, 4, 3, dtype=torch.float64).permute(1, 2, 0)
    assert not (x.is_contiguous() or h0.is_contiguous() or c0.is_contiguous())

    def call(module, x, h0, c0):
        # keep the strides: run_with_grads hands over contiguous leaves, so make the views here
        return module(x.transpose(0, 1).transpose(0, 1)[:, :, :], (h0.mT.mT, c0.mT.mT))

    atol, rtol = TOLERANCES[torch.float64]
    assert_same_results(ref, fast, [x, h0, c0], call, atol, rtol)
    y_ref, _ = ref(x, (h0, c0))
    y, _ = fast(x, (h0, c0))
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # 1,500 steps: ~1 min interpreted
def test_long_sequence(backend):
    ref, fast = make_pair(3, 4, 1, backend=backend)
    x = torch.randn(1500, 2, 3, dtype=torch.float64)
    atol, rtol = TOLERANCES[torch.float64]
    assert_same_results(ref, fast, [x], lstm_call, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_reference_within_twice_native_error(dtype):
    """Low precision: error against a float64 model at most 2x native's error in the same dtype."""
    exact, fast = make_pair(I, 16, 2, bidirectional=True, backend="reference", dtype=torch.float64)
    native = torch.nn.LSTM(I, 16, 2, bidirectional=True, dtype=dtype)
    native.load_state_dict(exact.state_dict())
    fast = fast.to(dtype)
    x = torch.randn(8, 4, I, dtype=torch.float64)
    y_exact, _ = exact(x)
    y_native, _ = native(x.to(dtype))
    y_fast, _ = fast(x.to(dtype))
    assert y_fast.dtype == dtype
    native_err = (y_native.double() - y_exact).abs().max().item()
    fast_err = (y_fast.double() - y_exact).abs().max().item()
    assert fast_err <= 2 * native_err + 1e-3, (fast_err, native_err)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    # p=1 feeds later layers zeros, which no backend tells apart from other input: not worth the interpreter's 7 s
    "p,backend",
    [(p, backend) for p in (0.4, 1.0) for backend in BACKENDS if not (backend == "triton" and p == 1.0)],
)
def test_dropout_matches_native_random_stream(backend, packed, p):
    """Training-mode dropout between layers draws the same random numbers as nn.LSTM on the CPU: outputs, states
    and every gradient (the masks scale what flows back). p=1 (nn.LSTM's constructor takes it): nothing passes
    between layers, and nn.LSTM runs."""
    ref, fast = make_pair(I, H, 3, bidirectional=True, dropout=p, backend=backend)
    ref.train(), fast.train()
    x = torch.randn(6, 3, I, dtype=torch.float64)

    def call(module, x):
        torch.manual_seed(123)
        return module(pack_padded_sequence(x, [6, 4, 2]) if packed else x)

    atol, rtol = TOLERANCES[torch.float64]
    assert_same_results(ref, fast, [x], call, atol, rtol)
    # and dropout really acts: without it the numbers differ
    y_train = call(fast, x)[0]
    fast.eval()
    y_eval = call(fast, x)[0]
    assert not torch.allclose(y_eval.data if packed else y_eval, y_train.data if packed else y_train)


# ---- training mechanics: what autograd keeps, as nn.LSTM keeps it ----------------------------------------------


def _transposed(module, name: str) -> None:
    """The parameter stored transposed: the same values, not contiguous."""
    weight = getattr(module, name).detach()
    setattr(module, name, torch.nn.Parameter(weight.t().contiguous().t()))


def _assert_same_with_non_finite(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, msg: str):
    """NaN and inf where `expected` has them (infinities of its signs), the finite values close to the largest's
    precision: gradients through a saturated gate sum terms of ~1e30 that cancel, where float32 keeps ~1e23."""
    assert torch.equal(got.isnan(), expected.isnan()), f"{msg}: NaN at other places"
    assert torch.equal(got.isinf(), expected.isinf()), f"{msg}: inf at other places"
    assert torch.equal(got[got.isinf()], expected[expected.isinf()]), f"{msg}: infinities of other signs"
    finite = expected.isfinite()
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(got[finite], expected[finite], atol=atol + rtol * scale, rtol=rtol, msg=msg)


@pytest.mark.parametrize("backend", fast_cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_values_propagate_as_in_nn_lstm(backend, dtype):
    """An inf or a NaN in the input, the state or a weight (a diverged run, a corrupt checkpoint), or a value large
    enough to saturate every gate: NaN and inf stand where nn.LSTM's stand, in outputs, states and gradients, and
    the finite values are nn.LSTM's. A tanh or sigmoid computed from exp gives inf/inf = NaN where it saturates;
    the fast kernels compute their own."""
    torch.manual_seed(0)
    atol, rtol = TOLERANCES[dtype]
    T, B = 4, 3
    grad_modes = [True] if backend == "triton" else [True, False]  # the interpreter: ~1 s a layer
    for place, value, grad in itertools.product(["x", "h0", "c0", "weight_hh_l0"], [-math.inf, math.nan, 1e30],
                                                grad_modes):  # fmt: skip
        ref, fast = make_pair(I, H, 2, proj_size=PROJ, backend=backend, dtype=dtype)
        tensors = {"x": torch.randn(T, B, I, dtype=dtype), "h0": torch.randn(2, B, PROJ, dtype=dtype),
                   "c0": torch.randn(2, B, H, dtype=dtype)}  # fmt: skip
        with torch.no_grad():
            for target in [tensors[place]] if place in tensors else [getattr(m, place) for m in (ref, fast)]:
                target.view(-1)[4] = value
        results = []
        for m in (ref, fast):
            x = tensors["x"].clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y, (h, c) = m(x, (tensors["h0"], tensors["c0"]))
                grads = torch.autograd.grad(y.sum() + c.sum(), [x, *m.parameters()]) if grad else ()
            results.append((y, h, c, *grads))
        names = ["y", "h_n", "c_n", *(["x.grad", *(f"{name}.grad" for name, _ in ref.named_parameters())] * grad)]
        for name, expected, got in zip(names, *results, strict=True):
            _assert_same_with_non_finite(got, expected, atol, rtol, f"{place}={value} grad={grad}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stored", ["contiguous", "transposed"])
def test_a_weight_changed_in_place_before_backward_fails_as_in_nn_lstm(backend, stored):
    """An optimizer step between forward and backward: nn.LSTM's backward fails autograd's version check, whatever
    the weights' layout. A backend that saved a dense copy of a transposed weight instead went on silently with
    the forward's values (triton; an audit)."""
    for name in ("weight_ih_l0", "weight_hh_l0", "h0"):
        ref, fast = make_pair(I, H, 1, backend=backend)
        # x needs a gradient, so that every path needs w_ih for backward (nn.LSTM's ATen path keeps it only then)
        x = torch.randn(4, 2, I, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(1, 2, H, dtype=torch.float64)
        if stored == "transposed":
            h0 = h0[0].t().contiguous().t()[None]
        for m in (ref, fast):
            if stored == "transposed" and name != "h0":
                _transposed(m, name)
            y, _ = m(x, (h0, torch.zeros_like(h0)))
            with torch.no_grad():
                (h0 if name == "h0" else getattr(m, name)).add_(0.5)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
            with torch.no_grad():
                (h0 if name == "h0" else getattr(m, name)).sub_(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bias_changed_in_place_before_backward_gives_the_forwards_gradients(backend):
    """No backward reads a bias (the layers take the sum of a layer's two, made each call), so a bias changed in
    place between forward and backward is not refused, on the fast backends as on nn.LSTM's ATen loop (float64),
    and the gradients are those of the values the forward read: nn.LSTM's (its oneDNN path, float32, refuses it)."""
    ref, fast = make_pair(I, H, 2, proj_size=PROJ, backend=backend)
    x = torch.randn(4, 2, I, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (ref, fast):
        y, (h, c) = m(x)
        with torch.no_grad():
            m.bias_ih_l0.add_(0.5)
            m.bias_hh_l1.sub_(0.25)
        grads.append(torch.autograd.grad(y.pow(2).sum() + c.sum(), [x, *m.parameters()]))
    atol, rtol = TOLERANCES[torch.float64]
    for expected, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_first_input_refilled_before_backward_as_in_nn_lstm(backend):
    """Micro-batches through one input buffer, one backward: nn.LSTM keeps a transposed copy of a batch_first input
    (batch > 1) and trains, with the gradients of the values each call read; with batch 1 the transpose is the
    buffer itself, and backward fails the version check there too."""
    data = torch.randn(3, 2, 5, I, dtype=torch.float64)
    for batch in (2, 1):
        ref, fast = make_pair(I, H, 2, batch_first=True, backend=backend)
        grads, errors = [], []
        for m in (ref, fast):
            buffer = torch.empty(batch, 5, I, dtype=torch.float64)
            loss = 0
            for chunk in data[:, :batch]:
                buffer.copy_(chunk)
                loss = loss + m(buffer)[0].pow(2).sum()
            try:
                loss.backward()
            except RuntimeError as error:
                errors.append(str(error).split(":")[0])
            else:
                grads.append([p.grad for p in m.parameters()])
        if batch == 1:
            assert errors == ["one of the variables needed for gradient computation has been modified by an inplace "
                              "operation"] * 2, errors  # fmt: skip
        else:
            assert not errors, errors
            for a, b in zip(*grads, strict=True):
                torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("create_graph", [False, True])
def test_one_step_c_n_alone_leaves_the_last_projection_without_gradient(backend, steps, create_graph):
    """A loss on c_n alone after one step: c_n depends on no projection of its layer, and nn.LSTM leaves that w_hr's
    gradient None (an optimizer skips it: AdamW's weight decay leaves it alone), where a fast backend's layer gave
    zeros; the first layer's projection feeds the second's input, and with two steps every w_hr counts. Also where
    the gradients are themselves differentiable (create_graph)."""
    ref, fast = make_pair(I, H, 2, proj_size=PROJ, bidirectional=True, backend=backend)
    x = torch.randn(steps, 3, I, dtype=torch.float64)
    for m in (ref, fast):
        m(x)[1][1].pow(2).sum().backward(create_graph=create_graph)
    for (name, a), b in zip(ref.named_parameters(), fast.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(b.grad, a.grad, atol=1e-9, rtol=1e-7, msg=name)
    assert (ref.weight_hr_l1.grad is None) == (steps == 1) and ref.weight_hr_l0.grad is not None


def _chained_calls(m, x):
    """The module run twice, the second call from the first's final state (TBPTT without detaching, decoding)."""
    y1, state = m(x[:3])
    y2, (h, c) = m(x[3:], state)
    return y1, y2, h, c


def _state_from_input(m, x):
    """h0 and c0 computed from the input itself (an encoder's summary as the initial state)."""
    s = x.mean(0).tanh() @ torch.ones(I, H, dtype=x.dtype)
    state = (s.expand(2, -1, -1).contiguous(), s.cos().expand(2, -1, -1).contiguous())
    return m(x, state)[0], state[0]


def _tied_weights(m, x):
    """One Parameter as two weights: the second layer's recurrent weight is the first's."""
    m.weight_hh_l1 = m.weight_hh_l0
    return m(x)[0], m(x)[1][1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", [_chained_calls, _state_from_input, _tied_weights], ids=lambda f: f.__name__[1:])
def test_differentiable_gradients_count_each_path_once(backend, model):
    """create_graph=True where one of a layer's inputs was computed from another (the state of an earlier call of the
    same weights, h0 from x, one weight in two places): the layer's gradients that are themselves differentiated
    must be its own part only, since the outer backward follows the rest. cpp's first-order gradients counted those
    paths twice (wrong by up to 0.4 here; first-order alone they were right), so a gradient penalty trained on
    wrong gradients. First- and second-order gradients against nn.LSTM's, float64."""
    ref, fast = make_pair(I, H, 2, backend=backend)
    x = torch.randn(6, 3, I, dtype=torch.float64)
    results = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        loss = sum(out.sin().sum() for out in model(m, xi))
        params = [xi, *m.parameters()]
        first = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        results.append([*first, *torch.autograd.grad(penalty, params)])
    atol, rtol = TOLERANCES[torch.float64]
    for k, (got, exp) in enumerate(zip(results[1], results[0], strict=True)):
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol, msg=f"gradient {k}")


def _input_grad_by_autograd(m, x):
    xi = x.clone().requires_grad_()
    return torch.autograd.grad(m(xi)[1][1].sum(), xi, create_graph=True)[0]


def _input_grad_by_torch_func(m, x):
    """torch.func.grad of a functional call, whose parameters still require grad: autograd records the result."""
    params = dict(m.named_parameters())
    return torch.func.grad(lambda xi: torch.func.functional_call(m, params, (xi,))[1][1].sum())(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_grad", [_input_grad_by_autograd, _input_grad_by_torch_func], ids=["autograd", "func"])
def test_a_penalty_on_one_step_s_c_n_gives_the_projection_no_second_order_gradient(backend, input_grad):
    """A gradient penalty on the input's gradient of one step's c_n: c_n depends on no projection, nor does that
    gradient, and nn.LSTM leaves w_hr's gradient None after the second backward (weight decay then leaves it alone).
    The fast backends had differentiated y and h_n with zero gradients, which put w_hr in the penalty's graph."""
    ref, fast = make_pair(I, H, 1, proj_size=PROJ, backend=backend)
    x = torch.randn(1, 3, I, dtype=torch.float64)
    for m in (ref, fast):
        input_grad(m, x).pow(2).sum().backward()
    assert ref.weight_hr_l0.grad is None and fast.weight_hr_l0.grad is None
    atol, rtol = TOLERANCES[torch.float64]
    for (name, a), b in zip(ref.named_parameters(), fast.parameters(), strict=True):
        if name != "weight_hr_l0":
            torch.testing.assert_close(b.grad, a.grad, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_differentiable_gradients_where_only_the_projection_trains(backend, layers):
    """create_graph=True where w_hr is all that requires grad and a step's c_n gets a gradient: c_n depends on no
    projection of its layer (one step), so it has no graph to differentiate, and cpp had asked autograd to
    differentiate it anyway ("element 1 of tensors does not require grad"), where nn.LSTM gives the gradients."""
    ref, fast = make_pair(I, H, layers, proj_size=PROJ, backend=backend)
    x = torch.randn(1, 3, I, dtype=torch.float64)
    results = []
    for m in (ref, fast):
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("weight_hr"))
        y, (h, c) = m(x)
        params = [p for p in m.parameters() if p.requires_grad]
        first = torch.autograd.grad(y.sin().sum() + c.sum(), params, create_graph=True)
        results.append([*first, *torch.autograd.grad(sum(g.pow(2).sum() for g in first), params)])
    atol, rtol = TOLERANCES[torch.float64]
    for k, (got, exp) in enumerate(zip(results[1], results[0], strict=True)):
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol, msg=f"gradient {k}")


# A gradient penalty on the input's gradient (grad(y, x, create_graph=True)) in a fresh process: its peak memory
# over the process's before the call, in MB (Linux: writing 5 to clear_refs restarts VmHWM from the RSS now).
_PENALTY_PEAK = """
import sys, torch, fastlstm

def kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

backend = sys.argv[1]
torch.manual_seed(0)
m = (torch.nn.LSTM(16, 64) if backend == "nn.LSTM" else fastlstm.LSTM(16, 64, backend=backend)).double()


def penalty(x):
    (g,) = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    g.pow(2).sum().backward()

penalty(torch.randn(2, 1, 16, dtype=torch.float64, requires_grad=True))  # first-use costs (torch.func's among them)
x = torch.randn(100, 4, 16, dtype=torch.float64, requires_grad=True)
base = kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
penalty(x)
print((kb("VmHWM") - base) / 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's peak RSS")
def test_a_gradient_penalty_takes_memory_as_nn_lstms_does():
    """create_graph=True: the fast backends recompute the layer in differentiable ops, which had read each step by
    indexing the input's projection; each index's backward is a zero-filled [T, B, 4H] tensor, T of them, whose
    short-lived buffers fragmented the heap: B4-T100-H64 float64 peaked 137 MB (cpp) and 93 MB (reference) over
    the process's memory where nn.LSTM's took 21 MB (B16-T200-H256: 7.9 GB against 0.6 GB). Now ~25 MB."""
    names = ["nn.LSTM", "reference", *fast_cpu_backends()]
    runs = run_pythons([(("-c", _PENALTY_PEAK, name), {**os.environ, "OMP_NUM_THREADS": "1"}) for name in names])
    for name, done in zip(names, runs, strict=True):
        assert done.returncode == 0, (name, done.stderr[-2000:])
    peaks = dict(zip(names, (float(done.stdout.split()[-1]) for done in runs)))
    for name in names[1:]:
        assert peaks[name] < 1.5 * peaks["nn.LSTM"] + 16, peaks


class _PassesNoGradient(torch.autograd.Function):
    """The identity forward, no gradient backward: a layer's outputs that flow only through it get none."""

    @staticmethod
    def forward(t):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiable_gradients_where_no_output_of_the_layer_gets_one(backend):
    """torch.func.grad with the parameters requiring grad (its result is differentiable) of a loss whose path through
    the layer passes no gradient back: every output of the layer gets None, and the layer's gradients are None, as
    nn.LSTM's (the fast backends' recomputation had been asked to differentiate no output at all, and raised)."""
    ref, fast = make_pair(I, H, 1, backend=backend)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    for m in (ref, fast):
        params = dict(m.named_parameters())

        def loss(xi, m=m, params=params):
            return _PassesNoGradient.apply(torch.func.functional_call(m, params, (xi,))[0]).sum() + xi.sum()

        torch.testing.assert_close(torch.func.grad(loss)(x), torch.ones_like(x))
