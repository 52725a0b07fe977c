"""torch.compile, torch.export, ONNX, TorchScript and autocast with fastlstm.LSTM inside a model."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import textwrap
import unittest.mock
import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    TRANSFORM_TENSORS_READABLE,
    fast_cpu_backends,
    needs_onnx_export_flag,
    needs_readable_transform_tensors,
    needs_tracing,
    nn_lstm_under_cpu_autocast,
    run_python,
)
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm
from fastlstm import backends
from fastlstm.backends import VMAP_RULES

CPU_BACKENDS = ["reference", *fast_cpu_backends()]


class Tagger(nn.Module):
    """embedding -> stacked bidirectional LSTM -> linear, the shape of many real models."""

    def __init__(self, lstm_cls=fastlstm.LSTM, **kwargs):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lstm = lstm_cls(6, 8, 2, batch_first=True, bidirectional=True, **kwargs)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        y, (h, c) = self.lstm(self.emb(tokens))
        return self.head(y), h, c


def _loss(outputs):
    y, h, c = outputs
    return y.square().sum() + h.sum() + c.sum()


@needs_tracing
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_compile_fullgraph_training_step_matches_eager(backend):
    # inductor for what users get (auto: cpp for this small float32 batch) and for the C++ backend; aot_eager
    # elsewhere keeps the suite quick
    _compiled_training_matches_eager(backend, True, "inductor" if backend in ("auto", "cpp") else "aot_eager")


@needs_tracing
@pytest.mark.parametrize("backend", ["auto", "native", *CPU_BACKENDS])
def test_compiled_steps_train_as_eager(backend):
    """step under torch.compile(fullgraph=True): a few steps with the state carried, then backward, give eager's
    outputs and gradients (step runs forward's backends: cpp's ops, ATen's cells where native serves)."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(6, 8, 2, backend=backend)
    compiled_model = fastlstm.LSTM(6, 8, 2, backend=backend)
    compiled_model.load_state_dict(model.state_dict())
    xs = torch.randn(4, 3, 6)

    def stream(m, xs):
        state, ys = None, []
        for x_t in xs:
            y, state = m.step(x_t, state)
            ys.append(y)
        return torch.stack(ys), *state

    eager = stream(model, xs)
    _loss(eager).backward()
    compiled = torch.compile(stream, fullgraph=True, backend="aot_eager")(compiled_model, xs)
    _loss(compiled).backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


@needs_tracing
@pytest.mark.parametrize("case", ["step-from-none", "last-output-from-zeros", "last-h-projected"])
@pytest.mark.parametrize("backend", ["auto", "native", *CPU_BACKENDS])
def test_compiled_training_from_a_state_of_zeros_gives_nn_lstms_gradients(backend, case):
    """torch.compile (inductor, which the other compile tests mostly leave for aot_eager) of a training step from a
    state of zeros, made by the layer (hx=None, step() from None) or by the model inside the graph, the loss on the
    last output (y[-1] with as many steps as layers, or a projected h_n[-1]): nn.LSTM's eager gradients. Compile
    merged those zeros with the backward's zeros of y[-1] or h_n[-1] and inductor wrote the gradient over them before
    the layers' backward read them as h0 and c0: wrong weight and input gradients, no error, on cpp and reference
    (the first two cases) and native (the third) (module.py, _state_copy)."""
    torch.manual_seed(0)
    shapes = {"step-from-none": (1, 1, 0), "last-output-from-zeros": (2, 2, 0), "last-h-projected": (1, 3, 2)}
    layers, steps, proj = shapes[case]  # layers, steps, proj_size
    reference = nn.LSTM(3, 4, layers, proj_size=proj, dtype=torch.float64)
    model = fastlstm.LSTM(3, 4, layers, proj_size=proj, backend=backend, dtype=torch.float64)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    scale = torch.randn(2, proj or 4, dtype=torch.float64)

    def loss(m, x):
        if case == "step-from-none" and m is model:
            last, (h, c) = m.step(x[0])
        elif case == "last-output-from-zeros":
            zeros = torch.zeros(layers, 2, 4, dtype=torch.float64)
            y, (h, c) = m(x, (zeros, zeros.clone()))
            last = y[-1]
        else:
            y, (h, c) = m(x)
            last = y[-1] if case == "step-from-none" else h[-1]
        return (last * scale).sum() + c.sum()

    torch.compiler.reset()
    results = []
    for m, run in ((reference, loss), (model, torch.compile(loss, fullgraph=True))):
        x_in = x.clone().requires_grad_()
        value = run(m, x_in)
        results.append([value, *torch.autograd.grad(value, [x_in, *m.parameters()])])
    names = ["loss", "x", *(name for name, _ in reference.named_parameters())]
    for name, expected, got in zip(names, *results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, msg=name)


def test_the_state_copy_op_passes_opcheck():
    """fastlstm::state_copy, which compiled training graphs hold (module.py): its schema, fake and autograd."""
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlstm.state_copy.default, (h, c))
    torch.library.opcheck(torch.ops.fastlstm.state_copy.default, (h.detach()[:, :2], c.detach().transpose(0, 1)))


@needs_tracing
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("backend", ["auto", *fast_cpu_backends()])
def test_compiled_training_takes_new_batch_sizes_and_lengths_without_recompiling(backend, proj):
    """torch.compile(fullgraph=True, dynamic=True) of a training step, called at several batch sizes and lengths:
    one graph, eager's gradients. With a projection, cpp's backward had read the steps as a constant while
    AOTAutograd traced it: a graph per shape, and fullgraph=True failed at the recompile limit (8). (Not the
    reference: its time loop is Python, which dynamo unrolls, a graph per length.)"""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    torch.manual_seed(0)
    model = fastlstm.LSTM(6, 8, proj_size=proj, backend=backend)
    eager = fastlstm.LSTM(6, 8, proj_size=proj, backend=backend)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    shapes = [(5, 3), (9, 4), (2, 7), (6, 2), (11, 5), (3, 9), (7, 6), (4, 8), (8, 3)]
    # The interpreter takes ~1 s a shape: three shapes (each length and batch new) show triton's one graph. Batch
    # 70: past triton's sequence kernel (up to 64), which its op then leaves for the step kernel in the same graph.
    for T, B in (shapes[:3] if backend == "triton" else shapes) + [(2, 70)]:
        x = torch.randn(T, B, 6)
        model.zero_grad(), eager.zero_grad()
        for run in (compiled, eager):
            y, (h, c) = run(x)
            _loss((y, h, c)).backward()
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=f"{name}, T{T} B{B}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@needs_tracing
def test_compiled_reference_loop_takes_a_second_length():
    """The reference loop (forced, or auto's where cpp cannot be built) compiled with fullgraph=True at a second
    sequence length, which dynamo then makes dynamic: torch 2.11 refused the loop's list item assignment there
    ("Unsupported method call: __setitem__ of class list"). Eager's numbers."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(4, 6, backend="reference")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for T in (3, 4):
        x = torch.randn(T, 3, 4)
        torch.testing.assert_close(compiled(x), model(x))


@needs_tracing
def test_compiled_training_with_dynamic_shapes_under_cpu_autocast():
    """dynamic=True under CPU bfloat16 autocast: the autocast probe's arguments had held the input's symbolic
    emptiness, which dynamo refused ("assume_constant_result argument conversion failed"). One graph for two
    shapes, eager's dtypes and numbers to bfloat16's rounding."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    torch.manual_seed(0)
    model = fastlstm.LSTM(6, 8)
    eager = fastlstm.LSTM(6, 8)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, B in [(5, 3), (9, 4)]:
        x = torch.randn(T, B, 6)
        model.zero_grad(), eager.zero_grad()
        outs = []
        for run in (compiled, eager):
            with torch.autocast("cpu", torch.bfloat16):
                y, (h, c) = run(x)
            (y.float().square().sum() + h.float().sum() + c.float().sum()).backward()
            outs.append((y, h, c))
        assert [t.dtype for t in outs[0]] == [t.dtype for t in outs[1]]
        torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=5e-2, rtol=5e-2, msg=f"{name}, T{T} B{B}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_methods_forward_calls_are_defined_in_fastlstm():
    """Dynamo before torch 2.8 stops at a module method whose function lives in torch.nn (fastlstm.module's
    _own_method): the nn.LSTM checks forward calls go through functions of fastlstm's own. Checked on every torch,
    since only the CI job on older releases would otherwise notice one assigned straight from nn.LSTM."""
    names = ["check_input", "get_expected_hidden_size", "check_hidden_size", "get_expected_cell_size"]
    for name in names + ["check_forward_args", "permute_hidden"]:
        assert getattr(fastlstm.LSTM, name).__module__ == "fastlstm.module", name


def test_compile_with_graph_breaks_trains_as_eager():
    """Every supported torch: a compiled model's training steps match eager (on torch 2.4 the layer runs
    outside the graph, as nn.LSTM does in every release)."""
    _compiled_training_matches_eager("auto", False, "aot_eager")


@needs_tracing
def test_backward_twice_through_a_compiled_graph_with_retain_graph():
    """backward(retain_graph=True) then backward() through a compiled (aot_eager) layer: twice eager's gradients, at
    the shape it compiled for, as README says. At a second shape torch compiles dynamic shapes, and refuses
    retain_graph for any graph that donates buffers (a Linear stack as well); with donation off it runs (README)."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fastlstm.LSTM(3, 4, 2).double()
    compiled = torch.compile(model, backend="aot_eager")
    for shape, donation in [((5, 3, 3), True), ((7, 2, 3), False)]:  # the second compiles with dynamic shapes
        x = torch.randn(*shape, dtype=torch.float64)
        grads = []
        with unittest.mock.patch.object(functorch_config, "donated_buffer", donation):
            for call in (model, compiled):
                model.zero_grad(set_to_none=True)
                y, (h, c) = call(x)
                loss = _loss((y, h, c))
                loss.backward(retain_graph=True)
                loss.backward()
                grads.append([p.grad for p in model.parameters()])
        for (name, _), got, expected in zip(model.named_parameters(), grads[1], grads[0], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7, msg=f"{shape} {name}")


@pytest.mark.parametrize("backend", ["auto", *(name for name in CPU_BACKENDS if name in ("cpp", "triton"))])
@pytest.mark.parametrize("penalty", [False, True], ids=["backward", "gradient-penalty"])
def test_compiled_autograd_gives_eagers_gradients(backend, penalty):
    """Compiled autograd (torch.compile of the backward pass) over the layer, as over nn.LSTM: cpp's C++ autograd
    function had marked its saved-state outputs non-differentiable, which compiled autograd refuses (an internal
    assert in torch), so every backward failed. With a gradient penalty (create_graph=True) its backward starts
    autograd's engine itself, which compiled autograd calls with the GIL held: the engine refused to start. The
    penalty's own backward runs eagerly (compiled, it took 25 s here; a stacked model's, minutes). triton's in one
    graph: its backward had asked for torch.func's wrappers, which dynamo cannot trace (a graph break a layer)."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    enable, reset = getattr(compiled_autograd, "_enable", None), getattr(compiled_autograd, "reset", None)
    if enable is None or reset is None:
        pytest.skip("this torch has no compiled_autograd._enable and reset")
    reset()  # its graphs cached by an earlier test would serve this one without a capture to count
    counters, breaks = torch._dynamo.utils.counters["compiled_autograd"], torch._dynamo.utils.counters["graph_break"]
    breaks.clear()
    torch.manual_seed(0)
    model = fastlstm.LSTM(3, 4, backend=backend).double()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    grads, captures = [], counters["captures"]
    if backend != "triton" and torch.torch_version.TorchVersion(torch.__version__) < "2.7":
        # torch 2.6's compiled autograd refuses a C++ autograd function not marked traceable, cpp's (README); later
        # releases run it eagerly between their graphs. An error, not a crash or other numbers.
        with pytest.raises(RuntimeError, match="potentially unsafe C\\+\\+ autograd function"):
            y, (h, c) = model(x)
            with enable(torch.compile(backend="eager")):
                _loss((y, h, c)).backward()
        return
    if penalty and torch.torch_version.TorchVersion(torch.__version__) < "2.8":
        pytest.skip("compiled autograd takes create_graph from torch 2.8 (2.7 refuses it for nn.Linear too)")
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        y, (h, c) = model(x)
        loss = _loss((y, h, c))
        with enable(torch.compile(backend="eager")) if compiled else contextlib.nullcontext():
            if penalty:
                first = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
            else:
                loss.backward()
        if penalty:
            sum(g.pow(2).sum() for g in first).backward()
        grads.append([p.grad for p in model.parameters()])
    assert counters["captures"] > captures  # compiled autograd ran, rather than leaving the backward eager
    if backend == "triton":  # cpp's C++ autograd function runs eagerly between graphs, as torch runs every one
        assert not breaks, list(breaks)
    for (name, _), got, expected in zip(model.named_parameters(), grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7, msg=name)


def _compiled_training_matches_eager(backend: str, fullgraph: bool, compiler: str) -> None:
    torch.manual_seed(0)
    model = Tagger(backend=backend)
    compiled_model = Tagger(backend=backend)
    compiled_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 10, (3, 5))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, compiled_model)]
    step = torch.compile(compiled_model, fullgraph=fullgraph, backend=compiler)
    for _ in range(2):
        for opt in optimizers:
            opt.zero_grad()
        eager_loss = _loss(model(tokens))
        eager_loss.backward()
        compiled_loss = _loss(step(tokens))
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
        for opt in optimizers:
            opt.step()


@needs_tracing
@pytest.mark.skipif("cpp" not in fast_cpu_backends(), reason="needs the C++ backend")  # not built while collecting
def test_compile_trains_where_auto_gives_the_call_to_native(monkeypatch):
    """A call auto gives to native on speed (float32 beyond batch 4 on many CPUs): nn.LSTM's CPU path breaks a
    compiled backward (aot_eager: an AssertionError in save_from_forward; inductor: "expected Tensor() for op:
    aten.mkldnn_rnn_layer"), so while torch.compile traces, such calls run on cpp. Eager calls keep native; both
    give the same outputs and gradients. float32: in float64 nn.LSTM takes ATen's path, which compiles."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: "native measured faster (test)")
    _compiled_training_where_eager_takes_native()


def _compiled_training_where_eager_takes_native():
    """A stacked bidirectional float32 layer whose eager calls auto gives to native: a compiled training step
    (fullgraph, aot_eager) gives eager's outputs and gradients."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(6, 8, 2, batch_first=True, bidirectional=True)
    compiled_model = fastlstm.LSTM(6, 8, 2, batch_first=True, bidirectional=True)
    compiled_model.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 6)  # features from a frozen encoder, say: no gradient of its own
    assert fastlstm.explain(model, x).backends == ["native"] * 4
    eager = model(x)
    _loss((eager[0], *eager[1])).backward()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")(x)
    _loss((compiled[0], *compiled[1])).backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


@needs_tracing
def test_compile_trains_where_cpp_cannot_be_built(monkeypatch):
    """Without a C++ compiler, auto runs CPU calls on native, whose oneDNN LSTM (float32, bfloat16) breaks a compiled
    backward (aot_eager: an AssertionError in save_from_forward): compiled training calls take the reference loop,
    which compiles, to eager's numbers. A forced native raises BackendUnavailableError there, not torch's error in
    AOTAutograd, and compiles where the program switched oneDNN off."""
    from fastlstm import dispatch
    from fastlstm.backends import cpu
    from fastlstm.module import forget_plans

    monkeypatch.setattr(cpu.BACKEND, "unavailable_reason", lambda: "a stand-in: no compiler")
    monkeypatch.setattr(dispatch, "_warn_once", lambda *args, **kwargs: None)
    forget_plans()
    _compiled_training_where_eager_takes_native()
    forced = fastlstm.LSTM(6, 8, backend="native")
    x = torch.randn(3, 5, 6)
    # dynamo hands the error on inside its own under fullgraph=True (torch 2.13: Unsupported, "Observed exception";
    # torch 2.5's names the class it could not build)
    with pytest.raises(Exception, match="does not compile its backward|BackendUnavailableError"):
        torch.compile(forced, fullgraph=True, backend="aot_eager")(x)
    torch.compiler.reset()
    with torch.backends.mkldnn.flags(enabled=False):  # nn.LSTM's ATen loop, which compiles: no refusal
        compiled = torch.compile(forced, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(compiled, forced(x), atol=1e-6, rtol=1e-6)
    forget_plans()


@needs_tracing
@pytest.mark.parametrize("how", ["parametrization", "functional_call"])
def test_compile_fullgraph_with_weights_read_afresh(how):
    """A parametrized weight, or functional_call's, makes the module read its weights afresh inside the compiled
    graph (nn.RNNBase's _init_flat_weights and flatten_parameters): that must trace, as it did before the check
    for weights a torch.func transform wraps (which dynamo cannot trace) was added to flatten_parameters."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2.0

    torch.manual_seed(0)
    model = fastlstm.LSTM(4, 6, backend="native").double()  # float64: ATen's path, which compiles with a backward
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    if how == "parametrization":
        parametrize.register_parametrization(model, "weight_hh_l0", Double())
        run = model
    else:
        params = {name: p.detach() * 2.0 for name, p in model.named_parameters()}
        run = lambda x: torch.func.functional_call(model, params, (x,))  # noqa: E731
    eager = run(x)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


@needs_tracing
def test_compiled_native_stack_gives_nn_lstms_state_shapes(monkeypatch):
    """torch 2.4-2.11 decompose aten::lstm for a compiled graph (every CUDA call, CPU training) with each layer's
    final state left [1, B, H]: a compiled native call's h_n and c_n came out [L*D, 1, B, H] (an H200, torch 2.11).
    That decomposition is put back here (torch 2.13's squeezes), and the compiled step must still give eager's
    shapes, numbers and gradients."""
    from torch._decomp import decompositions

    fixed = decompositions.one_layer_lstm

    def as_in_torch_2_11(*args, **kwargs):
        out, (h, c) = fixed(*args, **kwargs)
        return out, (h.unsqueeze(0), c.unsqueeze(0))

    monkeypatch.setattr(decompositions, "one_layer_lstm", as_in_torch_2_11)
    torch.manual_seed(0)
    model = fastlstm.LSTM(6, 8, 2, batch_first=True, bidirectional=True, backend="native").double()
    compiled_model = fastlstm.LSTM(6, 8, 2, batch_first=True, bidirectional=True, backend="native").double()
    compiled_model.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    eager = model(x)
    _loss((eager[0], *eager[1])).backward()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")(x)
    assert [t.shape for t in (compiled[0], *compiled[1])] == [(3, 5, 16), (4, 3, 8), (4, 3, 8)]
    _loss((compiled[0], *compiled[1])).backward()
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-10)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=1e-10, msg=name)
    # the native backend's one layer (a plan that mixes backends across layers): [B, H] states
    from fastlstm.backends.native import BACKEND as NATIVE

    weights = [p.detach() for p in model.parameters()][:4]
    h0, c0 = torch.randn(2, 3, 8, dtype=torch.float64)
    inputs = [x.detach().transpose(0, 1), h0, c0, weights[0], weights[1], weights[2] + weights[3], None, None]
    layer = torch.compile(lambda *a: NATIVE.layer(*a, False), backend="aot_eager", fullgraph=True)
    assert [t.shape for t in layer(*inputs)] == [(5, 3, 8), (3, 8), (3, 8)]


def test_packed_and_lengths_input_compile_with_graph_breaks():
    """PackedSequence and lengths= have shapes that depend on the lengths' values: fullgraph cannot hold them (as
    README says), but a compiled model with graph breaks runs them with eager's numbers, and no compiler fails on
    the way (inductor and aot_eager had failed on the zero state sized by a tensor's value, and dynamo logged a
    backend compiler exception before running that part eagerly)."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(4, 6, 2, bidirectional=True)
    compiled = torch.compile(model, backend="aot_eager")
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 4])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        torch.testing.assert_close(compiled(packed)[0].data, model(packed)[0].data)
        torch.testing.assert_close(compiled(x, lengths=lengths)[0], model(x, lengths=lengths)[0])
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert "Backend compiler" not in log.getvalue(), log.getvalue()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("autocast_inside", [False, True])
def test_compiled_packed_and_lengths_calls_under_cpu_autocast_give_nn_lstms_dtypes(backend, autocast_inside):
    """Under CPU bfloat16 autocast nn.LSTM's dtypes for a pack depend on its path (bfloat16 where the batch sizes are
    equal, float32 where they vary). A compiled call that comes first reads them as an eager call does, with
    autocast entered around the compiled function or inside it: the probe traced had given float32 for equal batch
    sizes, and kept that for the eager calls after it."""
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, batch_first=True)
    m = fastlstm.LSTM(4, 5, batch_first=True, backend=backend)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 4)

    def region():
        return torch.autocast("cpu", torch.bfloat16)

    def run(x, lengths, packed):
        with region() if autocast_inside else contextlib.nullcontext():
            if packed:
                return m(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[0].data
            return m(x, lengths=lengths)[0]

    compiled = torch.compile(run, backend="aot_eager")
    for lengths in ([3, 3, 3], [6, 6, 6], [3, 2, 6]):
        pack = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        expected = nn_lstm_under_cpu_autocast(lambda pack=pack: ref(pack))[0].data.dtype
        for packed in (True, False):
            with torch.no_grad(), contextlib.nullcontext() if autocast_inside else region():
                got = [call(x, torch.tensor(lengths), packed).dtype for call in (compiled, run)]
            assert got == [expected, expected], (lengths, packed)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_fx_symbolic_trace_keeps_the_lstm_a_leaf(with_lengths):
    """torch.fx.symbolic_trace records nn.LSTM as one call_module node (a torch.nn module); fastlstm.LSTM too, so
    FX-based tools work on models holding it, and the traced module gives eager's numbers."""

    class Encoder(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.lstm = cls(4, 6, 2, bidirectional=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x, lengths):
            y, (h, c) = self.lstm(x, lengths=lengths) if with_lengths else self.lstm(x)
            return self.head(y), h.sum() + c.sum()

    torch.manual_seed(0)
    model = Encoder(fastlstm.LSTM)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["lstm", "head"]
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 4])
    for got, expected in zip(traced(x, lengths), model(x, lengths)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("with_state", [False, True, "a start token", "a start token through forward"])
def test_fx_symbolic_trace_of_a_model_that_streams_with_step(with_state):
    """A model that calls lstm.step traced by torch.fx.symbolic_trace: step branched on its input's dimensions,
    which a symbolic trace does not have ("Expected input to be 1D ... got a Proxy"), where nn.LSTM's model (a
    1-step sequence through forward) traces. The graph calls step on the module; nn.LSTM's numbers and gradients.
    With a state, the input may be no Proxy (a start token the model makes) while the state is: both calls took
    their eager checks on the Proxies there."""

    class Streamer(nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm, self.head = lstm, nn.Linear(6, 2)

        def forward(self, x_t, h, c):
            if str(with_state).startswith("a start token"):
                x_t = torch.ones(3, 4, dtype=torch.float64)
            if isinstance(self.lstm, fastlstm.LSTM) and with_state != "a start token through forward":
                y, (h, c) = self.lstm.step(x_t, (h, c) if with_state else None)
            else:
                y, (h, c) = self.lstm(x_t.unsqueeze(0), (h, c) if with_state else None)
                y = y.squeeze(0)
            return self.head(y), h, c

    torch.manual_seed(0)
    reference = Streamer(nn.LSTM(4, 6, 2)).double()
    model = Streamer(fastlstm.LSTM(4, 6, 2)).double()
    model.load_state_dict(reference.state_dict())
    traced = torch.fx.symbolic_trace(model)
    through_forward = with_state == "a start token through forward"
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["lstm"] * through_forward + ["head"]
    x_t, h, c = (torch.randn(*s, dtype=torch.float64) for s in ((3, 4), (2, 3, 6), (2, 3, 6)))
    got, expected = traced(x_t, h, c), reference(x_t, h, c)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)
    sum(t.sum() for t in got).backward(), sum(t.sum() for t in expected).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=1e-10, msg=name)


def test_fx_symbolic_trace_of_an_lstm_stepping_in_its_own_forward_says_what_to_trace():
    """The traced root's graph module replaces it and is no LSTM to call step on (the node had an empty target:
    "object has no attribute ''"); nn.LSTM has no step. FX's own error, naming what traces."""

    class SelfStreaming(fastlstm.LSTM):
        def forward(self, x):
            return self.step(x[0])[0]

    with pytest.raises(torch.fx.proxy.TraceError, match="trace a module that holds the LSTM"):
        torch.fx.symbolic_trace(SelfStreaming(3, 5))


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_torch_func_gradient_transforms(backend):
    """torch.func.grad / vjp / jacrev (and functional_call with them), which work with nn.LSTM. Where the module's
    parameters require grad these gradients are differentiable in them: auto serves them natively, a forced fast
    backend with its gradients recomputed in plain ops. jacrev of detached parameters: the fast backends' kernels,
    their backward under the vmap jacrev runs over the output's entries."""
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 2, bidirectional=True)
    model = fastlstm.LSTM(4, 6, 2, bidirectional=True, backend=backend)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 2, 4)

    def input_grad(m):
        return torch.func.grad(lambda t: m(t)[0].square().sum())(x)

    def parameter_grads(m):
        loss = lambda p: torch.func.functional_call(m, p, (x,))[1][1].sum()  # noqa: E731
        return torch.func.grad(loss)(dict(m.named_parameters()))

    def vjp(m):
        y, pull = torch.func.vjp(lambda t: m(t)[0], x)
        return pull(torch.ones_like(y))[0]

    def jacobians(m):  # of parameters that do not require grad, as torch.func's tutorials pass them: fast backends
        params = {name: p.detach() for name, p in m.named_parameters()}
        out = lambda p, t: torch.func.functional_call(m, p, (t,))[0].sum(-1)  # noqa: E731
        return torch.func.jacrev(out, argnums=(0, 1))(params, x)

    for run in (input_grad, vjp, jacobians):
        torch.testing.assert_close(run(model), run(reference), msg=run.__name__)
    got, expected = parameter_grads(model), parameter_grads(reference)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    eager = backend if backend != "auto" else "cpp" if "cpp" in CPU_BACKENDS else "native"
    assert fastlstm.explain(model, x).backends[0] == eager  # outside the transforms, the fast backends again


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_forward_mode_ad_with_dual_tensors(backend):
    """torch.autograd.forward_ad, which works with nn.LSTM on ATen's path (float64 here): auto serves dual tensors
    natively (the fast backends' autograd has no forward mode); a forced fast backend says so; outside the dual
    level the fast backend serves the same call again."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 2, proj_size=3).double()
    model = fastlstm.LSTM(4, 6, 2, proj_size=3, backend=backend).double()
    model.load_state_dict(reference.state_dict())
    x, tangent = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)

    def jvp(m):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, tangent)
            if m is model:
                assert fastlstm.explain(m, dual).backends == ["native" if backend == "auto" else backend] * 2
            y, (h, c) = m(dual)
            return [fwAD.unpack_dual(t) for t in (y, h, c)]

    if backend in ("cpp", "triton"):
        with pytest.raises(fastlstm.BackendUnavailableError, match="forward-mode AD"):
            jvp(model)
        return
    for (primal, tan), (primal_ref, tan_ref) in zip(jvp(model), jvp(reference)):
        torch.testing.assert_close(primal, primal_ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(tan, tan_ref, atol=1e-12, rtol=1e-10)
    eager = backend if backend != "auto" else "cpp" if "cpp" in CPU_BACKENDS else "native"
    assert fastlstm.explain(model, x).backends[0] == eager


def test_forward_mode_ad_in_float32_where_nn_lstm_cannot():
    """torch.func.jvp, jacfwd and hessian (forward over reverse) in float32: nn.LSTM's oneDNN path has no
    forward-mode derivative and raises; auto runs the reference loop, which matches nn.LSTM's float64 (ATen's
    path, which has one) to float32 precision. With a projection nn.LSTM takes ATen's path in float32 too: native
    there."""
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 2, bidirectional=True).double()
    model = fastlstm.LSTM(4, 6, 2, bidirectional=True)
    model.load_state_dict(reference.state_dict())
    nn_float32 = nn.LSTM(4, 6, 2, bidirectional=True)
    nn_float32.load_state_dict(reference.state_dict())
    x, tangent = torch.randn(5, 3, 4), torch.randn(5, 3, 4)

    def jvp(m, dtype):
        outputs = lambda t: torch.cat([m(t)[0].flatten(), *(s.flatten() for s in m(t)[1])])  # noqa: E731
        return torch.func.jvp(outputs, (x.to(dtype),), (tangent.to(dtype),))[1]

    def hessian(m, dtype):
        return torch.func.hessian(lambda t: m(t)[0].square().sum())(x[:2, :1].to(dtype))

    with pytest.raises(NotImplementedError, match="forward AD"):  # if torch adds one, README should say so
        jvp(nn_float32, torch.float32)
    for run in (jvp, hessian):
        torch.testing.assert_close(
            run(model, torch.float32), run(reference, torch.float64).float(), atol=2e-5, rtol=1e-4
        )
    jacobian = torch.func.jacfwd(lambda t: model(t)[1][1])(x)
    expected = torch.func.jacrev(lambda t: reference(t)[1][1])(x.double())
    torch.testing.assert_close(jacobian, expected.float(), atol=2e-5, rtol=1e-4)

    def plan_under_jvp(m):
        plans = []
        torch.func.jvp(lambda t: plans.append(fastlstm.explain(m, t).backends) or m(t)[0], (x,), (tangent,))
        return plans[0]

    assert plan_under_jvp(model) == ["reference"] * 4
    assert plan_under_jvp(fastlstm.LSTM(4, 6, 2, bidirectional=True, proj_size=3)) == ["native"] * 4


@needs_readable_transform_tensors
def test_forward_mode_ad_of_packed_input_where_nn_lstm_cannot():
    """torch.func.jvp through PackedSequence input: nn.LSTM fails on every path (torch 2.13: "Cannot access data
    pointer of Tensor that doesn't have storage"); auto runs the reference loop, whose tangents match nn.LSTM's
    own jvp of each sequence alone (unbatched float64: ATen's path)."""
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 2, bidirectional=True).double()
    model = fastlstm.LSTM(4, 6, 2, bidirectional=True).double()
    model.load_state_dict(reference.state_dict())
    lengths = torch.tensor([5, 3, 2])
    packed = pack_padded_sequence(torch.randn(5, 3, 4, dtype=torch.float64), lengths)
    tangent = torch.randn_like(packed.data)

    def run(m):
        return torch.func.jvp(lambda d: m(PackedSequence(d, packed.batch_sizes))[0].data, (packed.data,), (tangent,))

    with pytest.raises(RuntimeError, match="data pointer"):  # if torch fixes it, README should say so
        run(reference)
    _, y_tangent = run(model)
    padded = pad_packed_sequence(PackedSequence(y_tangent, packed.batch_sizes))[0]
    x, v = (pad_packed_sequence(PackedSequence(t, packed.batch_sizes))[0] for t in (packed.data, tangent))
    for i, n in enumerate(lengths.tolist()):
        expected = torch.func.jvp(lambda t: reference(t)[0], (x[:n, i],), (v[:n, i],))[1]
        torch.testing.assert_close(padded[:n, i], expected, atol=1e-12, rtol=1e-10)


def _stack(results):
    """Per-sample results (tuples of tensors and tuples) stacked along a new first dimension."""
    return torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *results)


def _choices_inside_vmap(model, xs):
    """The backends auto gives each (layer, direction) of model(x) for x in xs, under torch.vmap."""
    seen = []

    def one(x):
        seen.append(fastlstm.explain(model, x).backends)
        return model(x)[0]

    torch.func.vmap(one)(xs)
    return seen[0]


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_vmap_over_samples_matches_a_loop(backend):
    """torch.vmap over a model holding fastlstm.LSTM: input, initial state or both batched, lengths= too. nn.LSTM
    cannot ("Batching rule not implemented for aten::lstm.input"). cpp and triton run the samples side by side as
    one batch (their ops' vmap rules); auto gives what native would serve to the reference loop."""
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 1, bidirectional=True, proj_size=3).double()
    model = fastlstm.LSTM(4, 6, 1, bidirectional=True, proj_size=3, backend=backend).double()
    model.load_state_dict(reference.state_dict())
    xs = torch.randn(3, 5, 3, 4, dtype=torch.float64)
    h0s, c0s = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.randn(3, 2, 3, 6, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])

    def as_tuple(out):
        return out[0], *out[1]

    with pytest.raises(RuntimeError, match="aten::lstm"):  # if torch adds a batching rule, README should say so
        torch.func.vmap(reference)(xs)
    calls = {
        "input": (lambda x: as_tuple(model(x)), (xs,), lambda i: as_tuple(reference(xs[i]))),
        "input and state": (
            lambda x, h, c: as_tuple(model(x, (h, c))), (xs, h0s, c0s),
            lambda i: as_tuple(reference(xs[i], (h0s[i], c0s[i]))),
        ),
        "state": (
            lambda h, c: as_tuple(model(xs[0], (h, c))), (h0s, c0s),
            lambda i: as_tuple(reference(xs[0], (h0s[i], c0s[i]))),
        ),
        "lengths": (
            lambda x: as_tuple(model(x, lengths=lengths)), (xs,),
            lambda i: _padded(reference(pack_padded_sequence(xs[i], lengths, enforce_sorted=False)), 5),
        ),
    }  # fmt: skip
    for name, (call, inputs, one) in calls.items():
        got = torch.func.vmap(call)(*inputs)
        expected = _stack([one(i) for i in range(3)])
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10, msg=name)
    if backend == "auto":
        assert _choices_inside_vmap(model, xs) == ["cpp" if "cpp" in CPU_BACKENDS else "reference"] * 2
    # lengths of each sample's own: their values decide the packing, which vmap cannot read (torch's error named
    # .item(), not why)
    with pytest.raises(RuntimeError, match="lengths= batched under torch.vmap"):
        torch.func.vmap(lambda x, n: model(x, lengths=n)[0])(xs, torch.tensor([[5, 2, 4]] * 3))


def _padded(out, total_length):
    from torch.nn.utils.rnn import pad_packed_sequence

    return pad_packed_sequence(out[0], total_length=total_length)[0], *out[1]


@pytest.mark.parametrize("backend", ["auto", *(name for name in CPU_BACKENDS if name != "triton")])  # no bf16 there
def test_vmap_under_cpu_autocast(backend):
    """torch.vmap under CPU bfloat16 autocast: the dtypes nn.LSTM gives (read off a probe call of nn.LSTM's own path,
    which must not see the transform: it has no batching rule) and a loop's numbers."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(4, 8, 2, bidirectional=True, backend=backend)
    xs = torch.randn(3, 5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.func.vmap(model)(xs)
        expected = _stack([model(x) for x in xs])
    assert [t.dtype for t in (got[0], *got[1])] == [t.dtype for t in (expected[0], *expected[1])]
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_vmap_gives_the_fast_backend_calls_the_speed_rule_gave_to_native(monkeypatch):
    """Under torch.vmap native cannot run, so a call the speed rule gives to native goes to cpp where it is built
    (the reference loop where not), and eager calls keep the rule."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: "native measured faster (test)")
    reference = nn.LSTM(4, 6)
    model = fastlstm.LSTM(4, 6)
    model.load_state_dict(reference.state_dict())
    xs = torch.randn(3, 5, 2, 4)
    assert fastlstm.explain(model, xs[0]).backends == ["native"]
    assert _choices_inside_vmap(model, xs) == ["cpp" if "cpp" in CPU_BACKENDS else "reference"]
    expected = torch.stack([reference(x)[0] for x in xs])
    torch.testing.assert_close(torch.func.vmap(lambda x: model(x)[0])(xs), expected, atol=1e-6, rtol=1e-5)


def test_vmap_over_an_ensemble_of_models():
    """torch.func.stack_module_state + functional_call under torch.vmap: models that differ only in their weights run
    as one (cpp: one call per model, as the weights differ), each giving what it gives alone."""
    torch.manual_seed(0)
    models = [fastlstm.LSTM(4, 6, 2, bidirectional=True) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = fastlstm.LSTM(4, 6, 2, bidirectional=True).to("meta")
    x = torch.randn(5, 2, 4)
    got = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)), in_dims=(0, 0))(params, buffers)
    expected = _stack([m(x) for m in models])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_an_ensemble_run_through_vmap_trains_by_ordinary_backward(backend):
    """stack_module_state's leaves require grad, and autograd records the vmapped forward on them: backward gives each
    model the gradients its own backward gives. A vmap's wrappers report requires_grad False, which had made cpp's
    forward skip saving for a backward that then came (it raised)."""
    torch.manual_seed(0)
    models = [fastlstm.LSTM(3, 4, 2, dtype=torch.float64, backend=backend) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = fastlstm.LSTM(3, 4, 2, dtype=torch.float64, backend=backend).to("meta")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    run = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)), in_dims=(0, 0))
    y, (h, c) = run(params, buffers)
    (y.square().sum() + c.sum()).backward()
    for k, model in enumerate(models):
        y, (h, c) = model(x)
        (y.square().sum() + c.sum()).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name].grad[k], p.grad, atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_frozen_layer_under_vmap_backpropagates_to_its_input(backend):
    model = fastlstm.LSTM(3, 4, dtype=torch.float64, backend=backend).requires_grad_(False)
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    torch.func.vmap(lambda x: model(x)[0])(xs).square().sum().backward()
    samples = xs.detach().requires_grad_()
    expected = torch.stack([torch.autograd.grad(model(x)[0].square().sum(), x)[0] for x in samples])
    torch.testing.assert_close(xs.grad, expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("backend", ["auto", "native", *CPU_BACKENDS])
def test_fake_tensor_mode_gives_nn_lstms_shapes_forward_and_backward(backend):
    """Shape inference and memory estimates run a model under FakeTensorMode: the fast backends take their ops,
    which have fakes, rather than launch kernels on memory that does not exist (triton did)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    ref, fast = nn.LSTM(3, 4, 2, proj_size=2), fastlstm.LSTM(3, 4, 2, proj_size=2, backend=backend)
    fast.load_state_dict(ref.state_dict())
    outs = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in (ref, fast):
            x = torch.randn(5, 2, 3, requires_grad=True)
            y, (h, c) = m(x)
            (y.sum() + c.sum()).backward()
            outs.append((y, h, c, x.grad))
    for expected, got in zip(*outs):
        assert isinstance(got, FakeTensor) and got.shape == expected.shape and got.dtype == expected.dtype
    x = torch.randn(5, 2, 3)  # and real calls after it are served as before
    torch.testing.assert_close(fast(x)[0], ref(x)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", *fast_cpu_backends()])
def test_make_fx_with_symbolic_sizes_traces_forward_and_step(backend):
    """make_fx(tracing_mode="symbolic") (what aot_function and functionalization traces with dynamic shapes run):
    the plan's cache hashed the symbolic batch ("unhashable type: non-nested SymInt"). The graph holds the fast op
    and serves other sizes with nn.LSTM's numbers (nn.LSTM's own graph unrolls the length and keeps its sizes)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, 2).double()
    fast = fastlstm.LSTM(3, 5, 2, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    params = dict(fast.named_parameters())

    def run(params, x, h, c):
        y, (h_n, c_n) = torch.func.functional_call(fast, params, (x, (h, c)))
        return y, h_n, c_n

    def step(params, x_t):
        with torch.nn.utils.stateless._reparametrize_module(fast, params):
            return fast.step(x_t)[0]

    def sizes(T, B):
        return (torch.randn(*s, dtype=torch.float64) for s in ((T, B, 3), (2, B, 5), (2, B, 5)))

    graph = make_fx(run, tracing_mode="symbolic")(params, *sizes(4, 3))
    stepped = make_fx(step, tracing_mode="symbolic")(params, torch.randn(3, 3, dtype=torch.float64))
    assert any(str(node.target).startswith("fastlstm.") for node in graph.graph.nodes), graph.graph
    for T, B in [(2, 6), (7, 1), (3, 70)]:
        x, h, c = sizes(T, B)
        y, (h_n, c_n) = ref(x, (h, c))
        for got, expected in zip(graph(params, x, h, c), (y, h_n, c_n)):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10, msg=str((T, B)))
        torch.testing.assert_close(stepped(params, x[0]), ref(x[:1])[0][0], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["auto", *fast_cpu_backends()])
def test_make_fx_of_a_backward_replays_with_grad_on(backend):
    """make_fx of a function that calls torch.autograd.grad through the layer records the backward ops; the graph,
    run as any call (grad mode on, the layer's parameters requiring grad), ran cpp's backward op with autograd above
    its ATen ops ("mm(): functions with out=... arguments don't support automatic differentiation"). nn.LSTM's runs.
    And make_fx of torch.func.grad."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    ref = nn.LSTM(3, 4).double()
    fast = fastlstm.LSTM(3, 4, backend=backend).double()
    fast.load_state_dict(ref.state_dict())

    def gradients(model, x):
        x = x.detach().requires_grad_()
        return torch.autograd.grad(model(x)[0].sin().sum(), [x, *model.parameters()])

    x = torch.randn(3, 2, 3, dtype=torch.float64)
    graph = make_fx(lambda x: gradients(fast, x))(x)
    for got, expected in zip(graph(x), gradients(ref, x)):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)

    # torch.func.grad traced: triton's layer took its op under make_fx's dispatch mode before asking for a gradient
    # transform, whose autograd the op cannot run ("must override the setup_context staticmethod")
    def loss(model, params, x):
        return torch.func.functional_call(model, params, (x,))[0].sin().sum()

    params = {name: p.detach() for name, p in fast.named_parameters()}
    traced = make_fx(torch.func.grad(lambda p, x: loss(fast, p, x)))(params, x)
    expected = torch.func.grad(lambda p, x: loss(ref, p, x))(params, x)
    for name, got in traced(params, x).items():
        torch.testing.assert_close(got, expected[name], atol=1e-12, rtol=1e-10, msg=name)


class _LossOf(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return (y.sin().sum() + c.cos().sum(),)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_joint_graph_export_gives_each_bias_its_gradient(backend):
    """aot_export_module(trace_joint=True) of a loss over the layer: the module summed b_ih and b_hh with an add,
    whose backward hands both biases one node, and the joint signature, which maps gradients to parameters by node,
    lost one ("len(gradients_to_parameters)=3 + ... != len(backward_output_names)=4"). Every parameter now has its
    gradient, with nn.LSTM's numbers; and torch.export's _export_forward_backward takes the exported program."""
    from torch._functorch.aot_autograd import aot_export_module

    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, 2, proj_size=2, bidirectional=True).double()
    fast = fastlstm.LSTM(3, 4, 2, proj_size=2, bidirectional=True, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    graph, signature = aot_export_module(_LossOf(fast), [x], trace_joint=True, output_loss_index=0)
    params = dict(_LossOf(fast).named_parameters())
    outputs = graph(*(params[name] for name in signature.parameters), x)
    names = [node.name for node in next(iter(reversed(graph.graph.nodes))).args[0]]
    gradients = {signature.backward_signature.gradients_to_parameters[n]: g for n, g in zip(names, outputs) if (
        n in signature.backward_signature.gradients_to_parameters)}  # fmt: skip
    loss = _LossOf(ref)(x)[0]
    expected = dict(zip(params, torch.autograd.grad(loss, list(_LossOf(ref).parameters()))))
    assert sorted(gradients) == sorted(expected)
    torch.testing.assert_close(outputs[0], loss, atol=1e-12, rtol=1e-10)
    for name, got in gradients.items():
        torch.testing.assert_close(got, expected[name], atol=1e-12, rtol=1e-10, msg=name)

    try:
        from torch.export.experimental import _export_forward_backward
    except ImportError:  # torch 2.4
        return
    # a layer not traced before: torch 2.5's strict export fails on the one aot_export_module traced, whose
    # _flat_weights hold the tracer's tensors until its next eager call
    fresh = fastlstm.LSTM(3, 4, 2, proj_size=2, bidirectional=True, backend=backend).double()
    fresh.load_state_dict(ref.state_dict())
    joint = _export_forward_backward(torch.export.export(_LossOf(fresh), (x,)))
    kind = torch.export.graph_signature.OutputKind.GRADIENT_TO_PARAMETER
    assert sorted(s.target for s in joint.graph_signature.output_specs if s.kind == kind) == sorted(expected)


@pytest.mark.parametrize("shape", [(), (1,), (1, 16)])
def test_a_bias_nn_lstm_broadcasts_in_a_recorded_graph(shape):
    """A bias of a shape nn.LSTM broadcasts to its [4H] (README note 16), in a graph make_fx records: the recorded
    sum of a layer's biases stacks them, which takes tensors of one shape; they are broadcast first. The graph's
    gradients are nn.LSTM's, each of its parameter's shape."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    ref = nn.LSTM(3, 4).double()
    fast = fastlstm.LSTM(3, 4).double()
    fast.load_state_dict(ref.state_dict())
    bias = torch.randn(shape, dtype=torch.float64)
    for m in (ref, fast):
        m.bias_hh_l0 = nn.Parameter(bias.clone())

    def gradients(model, x):
        return torch.autograd.grad(model(x)[0].sin().sum(), list(model.parameters()))

    x = torch.randn(5, 2, 3, dtype=torch.float64)
    graph = make_fx(lambda x: gradients(fast, x))(x)
    for got, expected in zip(graph(x), gradients(ref, x), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_functionalize_of_a_gradient_transform_takes_nn_lstms_path():
    """torch.func.functionalize(torch.func.grad(f)): the fast backends run an autograd.Function under a gradient
    transform, which torch cannot functionalize ("NYI: Functionalize rule for custom_function_call"); auto gives
    the call to nn.LSTM's path, with its gradients, and a forced fast backend says why it cannot serve it."""
    from fastlstm.backends import BackendUnavailableError

    torch.manual_seed(0)
    ref = nn.LSTM(3, 4).double()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    for backend in ["auto", *fast_cpu_backends()]:
        model = fastlstm.LSTM(3, 4, backend=backend).double()
        model.load_state_dict(ref.state_dict())
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(p, x, m=model):
            return torch.func.functional_call(m, p, (x,))[0].sin().sum()

        if backend != "auto":
            with pytest.raises(BackendUnavailableError, match="functionalize"):
                torch.func.functionalize(torch.func.grad(loss))(params, x)
            continue
        got = torch.func.functionalize(torch.func.grad(loss))(params, x)
        expected = torch.func.grad(lambda p, x: torch.func.functional_call(ref, p, (x,))[0].sin().sum())(params, x)
        for name, value in got.items():
            torch.testing.assert_close(value, expected[name], atol=1e-12, rtol=1e-10, msg=name)


def _counted_flops(model, inputs, train: bool) -> dict:
    """FLOPs by op that FlopCounterMode counts over a call (and its backward when train)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(train):
        out = model(inputs)[0]
        if train:
            (out.data if isinstance(out, PackedSequence) else out).sum().backward()
    return {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize(
    # triton (~5 s a case interpreted, at 3 steps) with a projection only: cpp checks the shared formulas without one
    "backend,proj",
    [(b, p) for b in fast_cpu_backends() for p in ([0, 3] if b != "triton" else [3])],
)
def test_flop_counter_counts_the_layers_as_nn_lstms_aten_path(backend, proj):
    """torch.utils.flop_counter.FlopCounterMode counts an op through a formula registered for it: the fast backends'
    layers counted 0. Now their ops count the products nn.LSTM's ATen path (float64) counts in its mm calls,
    padded or packed (live rows only), under FakeTensorMode too; a backward twice its forward (dx, dh and the
    weights' gradients), less the first layer's dx where the input needs no gradient (skipped, not computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    reference = nn.LSTM(5, 6, 2, bidirectional=True, proj_size=proj).double()
    model = fastlstm.LSTM(5, 6, 2, bidirectional=True, proj_size=proj, backend=backend).double()
    steps = 3 if backend == "triton" else 7  # the interpreter's time goes with the steps
    data = torch.randn(steps, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([steps, steps - 1, 2, 1])
    first_dx = 2 * 2 * 4 * 6 * 5  # a row's dx = dgates @ w_ih in both directions of the first layer: 2 FLOPs a MAC
    for packed, input_grad in ((False, False), (True, False), (False, True)):  # dx skipped, packed or not
        x = data.clone().requires_grad_(input_grad)
        inputs = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        expected = sum(_counted_flops(reference, inputs, train=False).values())
        counted = _counted_flops(model, inputs, train=False)
        assert sum(counted.values()) == expected > 0, (counted, expected)
        assert all(op.startswith(f"fastlstm.{backend}_") for op in counted), counted  # the ops, not inner products
        trained = _counted_flops(model, inputs, train=True)
        skipped = 0 if input_grad else first_dx * (int(lengths.sum()) if packed else data.shape[0] * data.shape[1])
        assert sum(trained.values()) == 3 * expected - skipped, (trained, expected, skipped)
    with FakeTensorMode():  # estimating a model's FLOPs without running it
        kwargs = dict(bidirectional=True, proj_size=proj, backend=backend, dtype=torch.float64)
        fake_model = fastlstm.LSTM(5, 6, 2, **kwargs)  # .double() there: "Cannot swap" (nn.LSTM's too)
        x = torch.empty(steps, 4, 5, dtype=torch.float64, requires_grad=True)
        counted = _counted_flops(fake_model, x, train=True)
    assert sum(counted.values()) == 3 * sum(_counted_flops(reference, data, train=False).values()), counted


def test_flop_formulas_wait_for_the_counter_to_be_imported():
    """`import fastlstm` imports neither torch.utils.flop_counter nor, through it, triton (0.15 s); the formulas
    register as that module finishes importing, before any FlopCounterMode (each copies the registry) exists. (On
    torch 2.4 `import fastlstm` imports torch._dynamo, and that imports triton: README, "torch and triton
    releases".)"""
    from helpers import run_python

    code = textwrap.dedent(
        """
        import sys, torch, fastlstm
        assert "torch.utils.flop_counter" not in sys.modules
        assert "triton" not in sys.modules or not fastlstm.module.TRACEABLE
        from torch.utils.flop_counter import FlopCounterMode
        model = fastlstm.LSTM(3, 4, backend="cpp")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.randn(5, 2, 3))
        print(counter.get_total_flops())
        """
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == 2 * 5 * 2 * 16 * (3 + 4), proc.stdout


@pytest.mark.parametrize(
    "backend,lengths",
    # triton (~10 s a case in the interpreter) with lengths= only, which covers the padded case's kernels
    [(b, n) for b in ["auto", *CPU_BACKENDS] for n in ([None] if b != "triton" else []) + [[5, 2]]],
    ids=str,
)
def test_per_sample_gradients_with_vmap_of_grad(backend, lengths, monkeypatch):
    """torch.func.vmap(torch.func.grad(loss)) over samples, the per-sample gradients of differential privacy:
    every parameter's gradient for each sample, as a loop of nn.LSTM backward passes gives them. cpp and triton
    serve them with their own backward kernels (one call over all the samples' rows), and auto gives them to cpp
    where it is built (native has no batching rule), else to the reference loop."""
    if lengths is not None and not TRANSFORM_TENSORS_READABLE:
        pytest.skip("lengths= under vmap of grad reads its batch sizes there: torch 2.10+")

    def not_here(*args):
        raise AssertionError("these gradients are not differentiated: the backward kernels serve them")

    # the fast backends' backward (backends.layer_backward) recomputes differentiated gradients through it
    monkeypatch.setattr(fastlstm.backends, "grads_through_reference", not_here)
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 2, bidirectional=True, proj_size=3).double()
    model = fastlstm.LSTM(4, 6, 2, bidirectional=True, proj_size=3, backend=backend).double()
    model.load_state_dict(reference.state_dict())
    xs = torch.randn(4, 5, 2, 4, dtype=torch.float64)  # 4 samples of 5 steps, each a batch of two
    kwargs = {} if lengths is None else {"lengths": torch.tensor(lengths)}
    params = {name: p.detach() for name, p in model.named_parameters()}
    chosen = []  # explain() in a hook, where functional_call has put params in the module
    model.register_forward_pre_hook(lambda m, args: chosen.append(fastlstm.explain(m, *args).backends))

    def loss(p, x):
        y, (h, c) = torch.func.functional_call(model, p, (x,), kwargs)
        return y.square().sum() + h.sum() + c.sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    got = per_sample(params, xs)
    if backend == "auto":
        assert chosen[0] == ["cpp" if "cpp" in CPU_BACKENDS else "reference"] * 4
    for i, x in enumerate(xs):
        reference.zero_grad()
        if lengths is None:
            y, (h, c) = reference(x)
        else:
            y, h, c = _padded(reference(pack_padded_sequence(x, lengths)), 5)
        (y.square().sum() + h.sum() + c.sum()).backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, atol=1e-12, rtol=1e-10, msg=f"sample {i} {name}")


@pytest.mark.parametrize("call", ["packed", "lengths"])
def test_torch_func_grad_of_packed_input_under_cpu_autocast(call):
    """torch.func.grad of a packed or lengths= call under CPU bfloat16 autocast: fastlstm's probe of nn.LSTM's dtypes
    had run nn.LSTM's packed kernel inside the transform, which fails there ("Cannot access data pointer of Tensor
    that doesn't have storage"). The probe runs outside it: autograd's gradients of the same call."""
    torch.manual_seed(0)
    model = fastlstm.LSTM(4, 6)
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 3, 4])

    def loss(params):
        with torch.autocast("cpu", torch.bfloat16):
            if call == "lengths":
                y, (h, c) = torch.func.functional_call(model, params, (x,), {"lengths": lengths})
            else:
                pack = pack_padded_sequence(x, lengths, enforce_sorted=False)
                y, (h, c) = torch.func.functional_call(model, params, (pack,))
                y = y.data
        return y.float().square().sum() + h.float().sum()

    got = torch.func.grad(loss)({name: p.detach() for name, p in model.named_parameters()})
    loss(dict(model.named_parameters())).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=2e-2, rtol=2e-2, msg=name)


def test_per_sample_gradients_keep_cudnns_weight_buffer_out(monkeypatch):
    """On CUDA nn.RNNBase.flatten_parameters reads every weight's data pointer, and functional_call's weights under
    vmap of grad have none ("Cannot access data pointer of Tensor that doesn't have storage": every per-sample
    gradient on an H200 raised there). fastlstm leaves such weights alone; plain weights still reach it. A
    stand-in for the CUDA branch reads the pointers here."""
    flattened = []

    def cuda_flatten(self):
        flattened.append([w.data_ptr() for w in self._flat_weights])

    monkeypatch.setattr(nn.RNNBase, "flatten_parameters", cuda_flatten)
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6)
    model = fastlstm.LSTM(4, 6, backend="reference")
    model.load_state_dict(reference.state_dict())
    params = {name: p.detach() for name, p in model.named_parameters()}
    loss = lambda p, x: torch.func.functional_call(model, p, (x,))[0].square().sum()  # noqa: E731
    flattened.clear()  # the constructors' own
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, torch.randn(3, 5, 2, 4))
    assert flattened == []
    model.weight_hh_l0 = nn.Parameter(model.weight_hh_l0.detach().clone())
    model(torch.randn(5, 2, 4))  # a plain replacement, read at the call: flattened
    assert len(flattened) == 1
    assert got["weight_hh_l0"].shape == (3, 24, 6)


@needs_readable_transform_tensors
@pytest.mark.parametrize(
    "backend,dtype",
    # triton in float32 only: the interpreter has no bfloat16
    [("cpp", torch.float32), ("cpp", torch.bfloat16), ("cpp", torch.float16), ("triton", torch.float32)],
    ids=str,
)
def test_fast_per_sample_gradients_equal_their_own_backward_passes(backend, dtype):
    """A fast backend's per-sample gradients under torch.vmap (one backward call over every sample's rows, the
    weight gradients summed per sample outside the kernel; cpp in bfloat16: one call a sample) against a loop of
    its own backward passes, and per-model gradients of an ensemble (weights batched: one call a model)."""
    if backend not in CPU_BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    torch.manual_seed(0)
    model = fastlstm.LSTM(4, 6, bidirectional=True, proj_size=3, backend=backend, dtype=dtype)
    xs = torch.randn(3, 5, 2, 4, dtype=dtype)
    h0s, c0s = torch.randn(3, 2, 2, 3, dtype=dtype), torch.randn(3, 2, 2, 6, dtype=dtype)  # a state per sample
    lengths = torch.tensor([5, 3])  # the reverse direction starts the short row at its own last step, from h0
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, x, h0, c0):
        y, (h, c) = torch.func.functional_call(model, p, (x, (h0, c0)), {"lengths": lengths})
        return y.float().square().sum() + c.float().sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(params, xs, h0s, c0s)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for i, x in enumerate(xs):
        model.zero_grad()
        loss(dict(model.named_parameters()), x, h0s[i], c0s[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, **tol, msg=f"sample {i} {name}")
    models = [fastlstm.LSTM(4, 6, bidirectional=True, proj_size=3, backend=backend, dtype=dtype) for _ in range(2)]
    stacked, _ = torch.func.stack_module_state(models)
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None, None, None))(stacked, xs[0], h0s[0], c0s[0])
    for k, m in enumerate(models):
        loss(dict(m.named_parameters()), xs[0], h0s[0], c0s[0]).backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(got[name][k], p.grad, **tol, msg=f"model {k} {name}")


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_gradients_of_gradients_under_torch_func(backend):
    """Gradients a torch.func transform takes through the layer, differentiated again: nested transforms
    (jacrev of jacrev), grad inside vmap inside grad, and autograd outside torch.func.grad (a gradient step on
    parameters that require grad, then a loss after it: MAML). nn.LSTM's numbers (float64, ATen's path, which is
    twice differentiable). The cpp backward kernel is not: forced cpp recomputes the layer in plain ops there, and
    auto gives these calls to native, or the reference loop under vmap."""
    torch.manual_seed(0)
    reference = nn.LSTM(2, 3, bidirectional=True).double()
    model = fastlstm.LSTM(2, 3, bidirectional=True, backend=backend).double()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 1, 2, dtype=torch.float64)
    xs = torch.randn(3, 4, 1, 2, dtype=torch.float64)
    chosen = []

    def out(m, t):
        if m is model:
            chosen.append(fastlstm.explain(m, t).backends)
        return m(t)[0].sin().sum()

    def hessian(m):
        return torch.func.jacrev(torch.func.jacrev(lambda t: out(m, t)))(x)

    def grad_of_vmapped_grads(m):
        inner = torch.func.grad(lambda u: out(m, u))
        if m is reference:  # which has no batching rule: a loop over the samples
            return torch.func.grad(lambda t: sum(inner(t[i]).square().sum() for i in range(len(xs))))(xs)
        return torch.func.grad(lambda t: torch.func.vmap(inner)(t).square().sum())(xs)

    def maml(m):
        params = dict(m.named_parameters())
        loss = lambda p: torch.func.functional_call(m, p, (x,))[0].square().sum()  # noqa: E731
        step = torch.func.grad(loss)(params)
        loss({name: p - 0.1 * step[name] for name, p in params.items()}).backward()
        grads = [p.grad.clone() for p in params.values()]
        m.zero_grad()
        return grads

    for run in (hessian, grad_of_vmapped_grads, maml):
        torch.testing.assert_close(run(model), run(reference), atol=1e-12, rtol=1e-10, msg=run.__name__)
    if backend == "auto":
        assert {tuple(c) for c in chosen} <= {("native", "native"), ("reference", "reference")}
        assert ("reference", "reference") in {tuple(c) for c in chosen}  # inside the vmap


@needs_readable_transform_tensors  # packing under the transform reads its batch sizes; run on torch 2.13 only
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_gradients_of_gradients_of_packed_input_under_torch_func(backend):
    """MAML's step (torch.func.grad over parameters that require grad, then a loss after it) on a PackedSequence and
    on lengths=, and jacrev of jacrev through lengths=: nn.LSTM's numbers, which here only plain autograd gives
    (nn.LSTM's packed kernels fail under torch.func: "Cannot access data pointer"). auto had sent these calls to
    native, where they raised that error."""
    from torch.func import functional_call, grad, jacrev

    torch.manual_seed(0)
    reference = nn.LSTM(3, 4).double()
    model = fastlstm.LSTM(3, 4, backend=backend).double()
    model.load_state_dict(reference.state_dict())
    x, lengths = torch.randn(5, 2, 3, dtype=torch.float64), torch.tensor([5, 3])

    def loss(m, p, t, kind):
        args = (pack_padded_sequence(t, lengths),) if kind == "packed" else (t,)
        _, (h, c) = functional_call(m, p, args, {} if kind == "packed" else {"lengths": lengths})
        return h.square().sum() + c.sin().sum()

    params = dict(reference.named_parameters())
    step = torch.autograd.grad(loss(reference, params, x, "packed"), list(params.values()), create_graph=True)
    after = {name: p - 0.1 * s for (name, p), s in zip(params.items(), step)}
    expected = torch.autograd.grad(loss(reference, after, x, "packed"), list(params.values()))
    for kind in ("packed", "lengths"):
        params = dict(model.named_parameters())
        step = grad(lambda p: loss(model, p, x, kind))(params)  # noqa: B023
        after = {name: p - 0.1 * step[name] for name, p in params.items()}
        got = torch.autograd.grad(loss(model, after, x, kind), list(params.values()))
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10, msg=kind)
    frozen = {name: p.detach() for name, p in reference.named_parameters()}
    expected = torch.autograd.functional.hessian(lambda t: loss(reference, frozen, t, "packed"), x)
    got = jacrev(jacrev(lambda t: loss(model, frozen, t, "lengths")))(x)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_backward_through_vmap_matches_a_loop(backend, packed):
    """Autograd outside torch.vmap (vmap(model)(xs), then loss.backward()): the input's and every parameter's
    gradients are what a loop of nn.LSTM calls gives, packed through lengths= too, so what the ops' vmap rules
    save for backward is right."""
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 1, bidirectional=True, proj_size=3).double()
    model = fastlstm.LSTM(4, 6, 1, bidirectional=True, proj_size=3, backend=backend).double()
    model.load_state_dict(reference.state_dict())
    lengths = torch.tensor([5, 2, 4])

    def loss(m, x):
        if m is reference and packed:
            y, (h, c) = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
            y = y.data
        else:
            y, (h, c) = m(x, lengths=lengths) if packed else m(x)
        return y.square().sum() + h.sum() + c.sum()

    xs = torch.randn(3, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.func.vmap(lambda x: loss(model, x))(xs).sum().backward()
    got = [xs.grad.clone(), *(p.grad for p in model.parameters())]
    xs.grad = None
    sum(loss(reference, x) for x in xs).backward()
    expected = [xs.grad, *(p.grad for p in reference.parameters())]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_torch_func_grad_of_a_vmapped_layer_whose_states_get_no_gradient(backend):
    """torch.func.grad outside torch.vmap of the layer (a batch or an ensemble trained with torch.func), a loss of
    y alone: h_n and c_n get no gradient. nn.LSTM's numbers (a loop; it has no batching rule). Before torch 2.7 the
    vmap rule torch generates for the layer's autograd.Function batched those None gradients ("TypeError:
    _add_batch_dim(): incompatible function arguments"), cpp's and auto's calls alike."""
    torch.manual_seed(0)
    reference = nn.LSTM(2, 3, proj_size=2).double()
    model = fastlstm.LSTM(2, 3, proj_size=2, backend=backend).double()
    model.load_state_dict(reference.state_dict())
    xs = torch.randn(3, 4, 1, 2, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, m):
        call = lambda x: torch.func.functional_call(m, p, (x,))[0].sin().sum()  # noqa: E731
        return torch.func.vmap(call)(xs).sum() if m is model else sum(call(x) for x in xs)

    got, expected = torch.func.grad(loss)(params, model), torch.func.grad(loss)(params, reference)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-12, rtol=1e-10, msg=name)


def _layer_op_call(backend: str, save: bool):
    """The backend's layer op as f(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse), and its profile name."""
    if backend == "cpp":
        op = torch.ops.fastlstm.cpp_lstm_fwd.default
        return (lambda *args: op(*args, save)), "fastlstm::cpp_lstm_fwd"
    from fastlstm.backends.triton.ops import triton_forward

    kernel = "sequence" if save else "step"  # the triton op always saves; both kernels get a turn
    return (lambda *args: triton_forward(*args, kernel)), "fastlstm::triton_forward"


@pytest.mark.skipif(not VMAP_RULES, reason="the layer ops' vmap rules: torch 2.6+")
@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name in ("cpp", "triton")])
@pytest.mark.parametrize(
    ("in_dims", "packed", "reverse", "save"),
    [
        ((0, None, None, None, None), False, False, False),
        ((0, 0, 0, None, None), True, True, True),
        ((None, 0, None, None, None), True, False, False),
        ((2, None, 0, None, None), False, True, True),
        ((0, None, None, None, 0), True, True, False),  # per-sample w_hh
    ],
    ids=["x", "x-state-packed-reverse-save", "h0-packed", "x-dim2-c0-reverse-save", "x-w_hh-packed-reverse"],
)
def test_layer_op_vmap_rule_runs_the_samples_as_one_call(backend, in_dims, packed, reverse, save):
    """A fast backend's layer op under torch.vmap, each argument batched or not, packed and reversed: one call over
    the samples side by side (in the profile, the batched call's event and one direct call's), each sample's rows
    what its own call gives; weights that differ per sample take a call each."""
    call_op, event = _layer_op_call(backend, save)
    samples, T, B, I, H, P = 3, 5, 4, 3, 6, 2
    x, h0, c0 = torch.randn(samples, T, B, I), torch.randn(samples, B, P), torch.randn(samples, B, H)
    w_ih, w_hh, b, w_hr = torch.randn(4 * H, I), torch.randn(samples, 4 * H, P), torch.randn(4 * H), torch.randn(P, H)
    sizes = torch.tensor([4, 3, 3, 1, 1]) if packed else None
    args = [x.movedim(0, in_dims[0]) if in_dims[0] is not None else x[0], h0 if in_dims[1] is not None else h0[0]]
    args += [c0 if in_dims[2] is not None else c0[0], w_ih, w_hh if in_dims[4] is not None else w_hh[0]]

    def call(x_, h_, c_, wi, wh):
        return call_op(x_, h_, c_, wi, wh, b, w_hr, sizes, reverse)

    def op_events(run, *inputs):
        with torch.profiler.profile() as profile:
            result = run(*inputs)
        return result, sum(e.count for e in profile.key_averages() if e.key == event)

    got, events = op_events(torch.func.vmap(call, in_dims=in_dims), *args)
    one = [a.select(d, 0) if d is not None else a for a, d in zip(args, in_dims)]
    _, per_call = op_events(call, *one)  # the events one direct call records (an autograd kernel's among them)
    assert events == 1 + (samples if in_dims[4] is not None else 1) * per_call
    for v in range(samples):
        one = [a.select(d, v) if d is not None else a for a, d in zip(args, in_dims)]
        expected = call(*one)
        for name, g, e in zip(("y", "hT", "cT"), got, expected):
            torch.testing.assert_close(g[v], e, atol=1e-6, rtol=1e-5, msg=name)
        for g, e in zip(got[3:], expected[3:]):  # what backward reads (test_backward_through_vmap checks it in use)
            assert g[v].shape == e.shape
            if not packed:  # packed, rows beyond a sequence's end hold whatever the kernel left there
                torch.testing.assert_close(g[v], e, atol=1e-6, rtol=1e-5)


def test_nn_lstm_itself_cannot_be_compiled_fullgraph():
    """The advantage is real: dynamo refuses nn.LSTM (if this ever passes, the README should say so)."""
    model = Tagger(nn.LSTM)
    with pytest.raises(Exception, match="(?i)rnn|lstm"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.randint(0, 10, (3, 5)))


@needs_tracing
@pytest.mark.xfail(
    torch.torch_version.TorchVersion(torch.__version__) < "2.13",
    reason="torch 2.5 and 2.11 fail in the pad: fake batch sizes without values (README, torch releases)",
    strict=False,
)
def test_a_compiled_pack_run_and_pad_gives_nn_lstms_numbers():
    """pack_padded_sequence, the layer, pad_packed_sequence in one compiled function (graph breaks at the batch
    sizes): nn.LSTM's numbers, and its gradients."""
    from torch.nn.utils.rnn import pad_packed_sequence

    torch.manual_seed(0)
    ref = nn.LSTM(6, 8, batch_first=True)
    fast = fastlstm.LSTM(6, 8, batch_first=True)
    fast.load_state_dict(ref.state_dict())
    x, lengths = torch.randn(4, 7, 6), torch.tensor([7, 3, 5, 1])

    def loss(m, x):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(m(packed)[0], batch_first=True)[0].sin().sum()

    got = torch.compile(lambda x: loss(fast, x), backend="eager")(x)
    expected = loss(ref, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(
        torch.autograd.grad(got, list(fast.parameters())), torch.autograd.grad(expected, list(ref.parameters()))
    ):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@needs_tracing
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_torch_export_gives_nn_lstm_numbers(backend):
    torch.manual_seed(0)
    reference = Tagger(nn.LSTM).eval()
    model = Tagger(backend=backend).eval()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 10, (3, 5))
    program = torch.export.export(model, (tokens,))
    for got, expected in zip(program.module()(tokens), reference(tokens)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# backends.exporting() reads torch.compiler.is_exporting (torch 2.7+), else torch.export's record of an export in
# progress (torch 2.5-2.6)
def _export_told() -> bool:
    if hasattr(torch.compiler, "is_exporting"):
        return True
    try:
        from torch.export import _trace
    except ImportError:
        return False
    return hasattr(_trace, "_EXPORT_FLAGS")


EXPORT_TOLD = pytest.mark.skipif(
    not _export_told(), reason="this torch says neither that torch.export is tracing nor which export is in progress"
)


@needs_tracing
@EXPORT_TOLD
@pytest.mark.parametrize("strict", [False, True])
def test_export_is_told_from_compile(strict):
    """backends.exporting(): True while torch.export traces (strict or not), False while torch.compile does. Dynamo
    before torch 2.13 traced torch.compiler.is_exporting() as True under any torch.compile, and every compiled call
    under autocast was then planned as an export's (torch 2.11: its backward failed)."""

    def told(x):
        return x + 1 if backends.exporting() else x - 1

    class Told(nn.Module):
        def forward(self, x):
            return told(x)

    x = torch.zeros(1)
    assert told(x).item() == -1
    assert torch.compile(told, fullgraph=True, backend="aot_eager")(x).item() == -1
    assert torch.export.export(Told(), (x,), strict=strict).module()(x).item() == 1


@needs_tracing
@EXPORT_TOLD
@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_a_program_exported_under_cpu_autocast_gives_nn_lstms_dtypes(strict):
    """torch.export traces with oneDNN off, and the dtypes fastlstm read off nn.LSTM's path there were its ATen
    path's: the program computed and returned float32 under bfloat16 autocast, where nn.LSTM's program (aten::lstm,
    left to autocast when it runs) returns bfloat16. Exported under autocast, the layer is nn.LSTM's own call."""
    torch.manual_seed(0)
    reference = Tagger(nn.LSTM).eval()
    model = Tagger().eval()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 10, (3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        programs = [torch.export.export(m, (tokens,), strict=strict).module() for m in (reference, model)]
        expected, got = (program(tokens) for program in programs)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@needs_tracing
def test_a_compiled_functional_call_leaves_the_layers_own_weights_to_later_calls():
    """functional_call's parameters, read by a compiled call, are not the layer's own: a later eager call and a
    compiled plain call read the layer's own weights again."""
    torch._dynamo.reset()  # torch 2.5 compiles per module: the worker's earlier models had filled the cache
    torch.manual_seed(0)
    reference, model = nn.LSTM(4, 6, 2), fastlstm.LSTM(4, 6, 2)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(5, 3, 4)
    doubled = {name: p.detach() * 2 for name, p in model.named_parameters()}
    run = torch.compile(lambda params: torch.func.functional_call(model, params, (x,)), backend="aot_eager")
    for _ in range(2):
        run(doubled)
    torch.testing.assert_close(model(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)


@needs_tracing
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_a_program_exported_under_no_grad_trains_as_nn_lstms(backend):
    """Exported under torch.no_grad (as for deployment), the program still trains with nn.LSTM's gradients, as
    nn.LSTM's own does: the cpp op's save flag, baked into the graph, had been false and its backward raised."""
    torch.manual_seed(0)
    reference = Tagger(nn.LSTM)
    model = Tagger(backend=backend)
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 10, (3, 5))
    results = []
    for module in (reference, model):
        with torch.no_grad():
            program = torch.export.export(module, (tokens,)).module()
        outputs = program(tokens)
        outputs[0].square().sum().backward()
        results.append((outputs, dict(program.named_parameters())))
    (got, got_params), (expected, expected_params) = results[1], results[0]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert got_params.keys() == expected_params.keys()
    for name, param in expected_params.items():
        torch.testing.assert_close(got_params[name].grad, param.grad, atol=1e-5, rtol=1e-5, msg=name)


@needs_tracing
@pytest.mark.parametrize("backend", ["auto", *(name for name in CPU_BACKENDS if name != "reference")])
def test_torch_export_with_a_dynamic_batch_and_length(backend):
    """A program exported with a dynamic batch and sequence length serves every size in their ranges with nn.LSTM's
    numbers. nn.LSTM specializes the length, and so does the reference backend (its time loop is Python's, which
    the trace unrolls). Dispatch's speed rule reads the batch, so a compiled CPU call does not ask it (before,
    export failed: "Not all values of b ... satisfy the generated guard"). Nor does triton's choice of kernel
    (the sequence kernel up to batch 64): its op chooses at run time, here the step kernel at batch 70. Nor does
    triton's int32 limit, which with the length static bounded the batch alone (export refused the Dim)."""
    torch.manual_seed(0)
    reference = Tagger(nn.LSTM).eval()
    model = Tagger(backend=backend).eval()
    model.load_state_dict(reference.state_dict())
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1, max=1000)
    example = (torch.randint(0, 10, (3, 5)),)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch, 1: length},))
    static_length = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    for sizes in [(1, 1), (2, 7), (11, 3), (70, 2), (70, 5)]:
        tokens = torch.randint(0, 10, sizes)
        programs = [program, static_length] if sizes[1] == 5 else [program]
        for exported in programs:
            for got, expected in zip(exported.module()(tokens), reference(tokens)):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=str(sizes))


_SAVED_PROGRAM_CHECK = """
import sys, torch
import fastlstm
program = torch.export.load(sys.argv[1])
tokens, expected = torch.load(sys.argv[2])
for got, want in zip(program.module()(tokens), expected):
    torch.testing.assert_close(got, want, atol=0, rtol=0)
print("OK")
"""


@needs_tracing
@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name != "reference"])
def test_saved_export_loads_where_fastlstm_is_imported(backend, tmp_path):
    """A program saved with torch.export.save holds the fast backend's ops by name: a fresh process that imports
    fastlstm (on a machine where the backend has run before) loads it and gets the same numbers."""
    from helpers import run_python

    torch.manual_seed(0)
    model = Tagger(backend=backend).eval()
    tokens = torch.randint(0, 10, (3, 5))
    program = torch.export.export(model, (tokens,))
    assert any(str(node.target).startswith("fastlstm.") for node in program.graph.nodes), program.graph
    torch.export.save(program, tmp_path / "program.pt2")
    torch.save((tokens, program.module()(tokens)), tmp_path / "io.pt")
    proc = run_python("-c", _SAVED_PROGRAM_CHECK, str(tmp_path / "program.pt2"), str(tmp_path / "io.pt"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


_AOTI_PACKAGE_CHECK = """
import sys, torch
import fastlstm
runner = torch._inductor.aoti_load_package(sys.argv[1])
for tokens, expected in torch.load(sys.argv[2]):
    for got, want in zip(runner(tokens), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
print("OK")
"""


@pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < "2.6",
    reason="torch._inductor.aoti_compile_and_package(program, package_path=...) and aoti_load_package: torch 2.6 on",
)
def test_aot_inductor_package_with_dynamic_sizes_runs_where_fastlstm_is_imported(tmp_path):
    """README's table: an AOTInductor package of a model holding fastlstm (cpp's ops, with a dynamic batch and
    length) runs in a fresh process that imports fastlstm, with nn.LSTM's numbers at other sizes than the traced
    one (batch 1 and 70, length 1). ~20 s: inductor compiles the package's C++."""
    from helpers import run_python

    torch.manual_seed(0)
    reference = Tagger(nn.LSTM).eval()
    model = Tagger(backend="cpp").eval()
    model.load_state_dict(reference.state_dict())
    dims = ({0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("length", min=1)},)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randint(0, 10, (3, 5)),), dynamic_shapes=dims)
        assert any(str(node.target).startswith("fastlstm.cpp") for node in program.graph.nodes), program.graph
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "tagger.pt2"))
        cases = [(tokens, reference(tokens)) for tokens in (torch.randint(0, 10, s) for s in [(1, 1), (70, 4), (2, 9)])]
    torch.save(cases, tmp_path / "io.pt")
    proc = run_python("-c", _AOTI_PACKAGE_CHECK, package, str(tmp_path / "io.pt"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-3000:]


@needs_tracing
@pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) >= "2.6",
    reason="torch 2.5's AOTInductor (torch._export.aot_compile): later releases' packages are tested above",
)
@pytest.mark.parametrize("layers", [1, 2])
def test_aot_inductor_of_torch_2_5_calls_cpps_kernels(layers):
    """torch 2.5's AOTInductor calls an op's C++ kernel through a signature of its own, optional tensors by value;
    cpp's kernels took them by const reference, and the compiled model's first call failed ("Tried to access or
    call an operator with a wrong signature"). nn.LSTM's numbers, one layer and a bidirectional projected stack."""
    torch.manual_seed(0)
    kwargs = dict(batch_first=True, bidirectional=layers > 1, proj_size=3 if layers > 1 else 0)
    reference = nn.LSTM(5, 8, layers, **kwargs).eval()
    model = fastlstm.LSTM(5, 8, layers, backend="cpp", **kwargs).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, 5)
    with torch.no_grad():
        runner = torch._export.aot_load(torch._export.aot_compile(model, (x,)), "cpu")
        y, (h_n, c_n) = runner(x)
        y_ref, (h_ref, c_ref) = reference(x)
        for got, expected in zip((y, h_n, c_n), (y_ref, h_ref, c_ref), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


_NEVER_BUILT_CHECK = """
import shutil, sys, torch
import fastlstm
from fastlstm.backends import cpu
from fastlstm.backends.native import BACKEND as NATIVE

program_path, io_path, built_dir, mode = sys.argv[1:]
assert not any(cpu.cache_root().glob("cpp-*")), "the cache must start empty"
program = torch.export.load(program_path)  # needs the ops' schemas, which import defines
print("loaded")
if mode == "broken compiler":
    tokens, _ = torch.load(io_path)
    try:
        program.module()(tokens)
    except RuntimeError as error:
        assert "building the fastlstm C++ extension failed" in str(error), error
        print("OK")
    sys.exit(0)
# Stands in for the first use's build (tens of seconds): this machine's library appears in the cache.
shutil.copytree(built_dir, cpu.cache_root() / built_dir.rsplit("/", 1)[-1])
if mode == "program":
    tokens, expected = torch.load(io_path)
    for got, want in zip(program.module()(tokens), expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
else:  # the op's first call needs gradients: the C++ autograd node must be recorded
    torch.manual_seed(0)
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in [(4, 2, 3), (2, 5), (2, 5), (20, 3), (20, 5), (20,)]]
    y, hT, cT, _, _ = torch.ops.fastlstm.cpp_lstm_fwd(*inputs, None, None, False, True)
    got = torch.autograd.grad((y.sum(), hT.sum(), cT.sum()), inputs)
    y2, h2, c2 = NATIVE.layer(*inputs, None, None, False)
    want = torch.autograd.grad((y2.sum(), h2.sum(), c2.sum()), inputs)
    for g, w in zip((y, hT, cT, *got), (y2, h2, c2, *want)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
print("OK")
"""


@needs_tracing
@pytest.mark.parametrize("mode", ["program", "first call with gradients", "broken compiler"])
def test_saved_export_loads_where_the_cpp_backend_was_never_built(mode, tmp_path):
    """import fastlstm defines the C++ ops' schemas before the library exists, so a saved program naming them
    loads on a fresh machine; its first call builds the library (here: finds it appear in the cache) and runs it,
    recording the C++ autograd node when gradients are needed; a failing build raises the build's error."""
    from helpers import run_python

    from fastlstm.backends import cpu

    torch.manual_seed(0)
    model = Tagger(backend="cpp").eval()
    tokens = torch.randint(0, 10, (3, 5))
    program = torch.export.export(model, (tokens,))
    torch.export.save(program, tmp_path / "program.pt2")
    torch.save((tokens, program.module()(tokens)), tmp_path / "io.pt")
    built_dir = str(Path(cpu.build()).parent)
    env = dict(os.environ, FASTLSTM_CACHE_DIR=str(tmp_path / "fresh-cache"))
    if mode == "broken compiler":
        env["FASTLSTM_CXX"] = str(tmp_path / "no-such-compiler")
    args = [str(tmp_path / "program.pt2"), str(tmp_path / "io.pt"), built_dir, mode]
    proc = run_python("-c", _NEVER_BUILT_CHECK, *args, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@needs_onnx_export_flag
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_onnx_export_runs_in_onnxruntime_with_nn_lstm_numbers(backend, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    reference = Tagger(nn.LSTM).eval()
    model = Tagger(backend=backend).eval()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 10, (3, 5))
    path = tmp_path / "tagger.onnx"
    torch.onnx.export(model, (tokens,), str(path), dynamo=True, input_names=["tokens"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})
    for got, expected in zip(outputs, reference(tokens)):
        torch.testing.assert_close(torch.from_numpy(got), expected.detach(), atol=1e-5, rtol=1e-5)
    # the module runs its fast backends again once the export is over
    if backend != "auto":
        assert fastlstm.explain(model.lstm, torch.randn(3, 5, 6)).backends[0] == backend


def test_onnx_torchscript_exporter_takes_a_bare_lstm(tmp_path):
    """torch.onnx.export(dynamo=False), the TorchScript-based exporter, with fastlstm.LSTM as the exported module
    itself: that exporter passes every forward parameter with a default positionally (lengths= included)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, 2).eval()
    model = fastlstm.LSTM(4, 6, 2).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(5, 3, 4)
    path = tmp_path / "lstm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracer warnings
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": x.numpy()})
    y, (h, c) = reference(x)
    for got, expected in zip(outputs, (y, h, c)):
        torch.testing.assert_close(torch.from_numpy(got), expected.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'length'"):
        model(x, length=torch.tensor([5, 5, 5]))
    with pytest.raises(TypeError, match="positional argument"):
        model(x, None, torch.tensor([5, 5, 5]))


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_torchscript_script_gives_nn_lstm_numbers_and_saves(backend, tmp_path):
    """torch.jit.script of a model holding fastlstm.LSTM: the scripted model holds an nn.LSTM with the same
    Parameter objects (TorchScript cannot run Python dispatch), so it gives nn.LSTM's numbers, saves, loads and
    keeps the state_dict."""
    torch.manual_seed(0)
    reference = Tagger(nn.LSTM).eval()
    model = Tagger(backend=backend).eval()
    model.load_state_dict(reference.state_dict())
    parameters = dict(model.named_parameters())
    tokens = torch.randint(0, 10, (3, 5))
    scripted = torch.jit.script(model)
    path = tmp_path / "tagger.pt"
    torch.jit.save(scripted, str(path))
    for program in (scripted, torch.jit.load(str(path))):
        for got, expected in zip(program(tokens), reference(tokens)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert scripted.state_dict().keys() == reference.state_dict().keys()
    # the same Parameter objects: an optimizer built on the eager model trains the scripted one
    assert all(p is parameters[name] for name, p in model.named_parameters())
    with torch.no_grad():
        model.lstm.weight_hh_l0.add_(0.5)
    torch.testing.assert_close(scripted.lstm.weight_hh_l0, model.lstm.weight_hh_l0, atol=0, rtol=0)


def test_torchscript_script_takes_the_layers_hooks_as_nn_lstm_does():
    """torch.jit.script swaps fastlstm.LSTM for an nn.LSTM in the eager model too; that nn.LSTM carries the layer's
    hooks. TorchScript then refuses a hooked layer as it refuses a hooked nn.LSTM (rather than scripting it with
    the hook dropped), and the eager model still calls the hook."""
    calls = []

    def outcome(layer):
        layer.register_forward_pre_hook(lambda module, args: calls.append(type(module)))
        model = nn.Sequential(layer)
        try:
            torch.jit.script(model)
        except Exception as error:  # noqa: BLE001 -- the type is what is compared
            failure = type(error)
        else:
            failure = None
        calls.clear()
        model(torch.randn(3, 2, 4))
        return failure, list(calls)

    native_failure, native_calls = outcome(nn.LSTM(4, 6))
    fast_failure, fast_calls = outcome(fastlstm.LSTM(4, 6))
    assert native_failure is not None and fast_failure is native_failure
    assert native_calls == fast_calls == [nn.LSTM]


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_torchscript_trace_records_aten_lstm(backend):
    """torch.jit.trace records nn.LSTM's aten::lstm, which runs where fastlstm is not installed (C++ libtorch),
    not fastlstm's custom ops; eager calls use the fast backends again afterwards."""
    torch.manual_seed(0)
    reference = Tagger(nn.LSTM).eval()
    model = Tagger(backend=backend).eval()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 10, (3, 5))
    model(tokens)  # a plan cached by an eager call must not leak into the trace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about nn.LSTM's own size checks, as it does for nn.LSTM
        traced = torch.jit.trace(model, (tokens,), check_trace=False)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert "aten::lstm" in kinds and not any(kind.startswith("fastlstm::") for kind in kinds), kinds
    other = torch.randint(0, 10, (2, 7))
    for got, expected in zip(traced(other), reference(other)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if backend != "auto":
        assert fastlstm.explain(model.lstm, torch.randn(3, 5, 6)).backends[0] == backend


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torchscript_trace_under_cpu_autocast_gives_nn_lstms_outcome(dtype):
    """torch.jit.trace of a model that calls the layer under CPU autocast: the trace holds nn.LSTM's call, with
    nn.LSTM's dtypes and numbers, or nn.LSTM's error where its oneDNN path fails the call (float16 on an
    AVX512-FP16 Xeon, torch 2.13). There fastlstm's autocast probe had failed inside the trace, and torch's tracer
    then ended the process (SIGSEGV): in a process of its own."""
    code = textwrap.dedent(
        f"""
        import json, warnings, torch, fastlstm
        from torch import nn
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref = nn.LSTM(4, 6)
        fast = fastlstm.LSTM(4, 6)
        fast.load_state_dict(ref.state_dict())

        class Model(nn.Module):
            def __init__(self, lstm):
                super().__init__()
                self.lstm = lstm

            def forward(self, x):
                with torch.autocast("cpu", torch.{dtype}):
                    return self.lstm(x)

        x = torch.randn(5, 3, 4)
        outcomes = []
        for lstm in (ref, fast):
            try:
                traced = torch.jit.trace(Model(lstm), (x,), check_trace=False)
                y, (h, c) = traced(torch.randn(7, 2, 4, generator=torch.Generator().manual_seed(1)))
                outcomes.append([str(t.dtype) for t in (y, h, c)] + [y.float().sum().item()])
            except RuntimeError as error:
                outcomes.append(type(error).__name__)
        print(json.dumps(outcomes))
        """
    )
    proc = run_python("-c", code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    native, fast = json.loads(proc.stdout.strip().splitlines()[-1])
    if isinstance(native, str):
        assert fast == native
    else:
        assert fast[:3] == native[:3]
        assert fast[3] == pytest.approx(native[3], rel=1e-2, abs=1e-2)


@pytest.mark.parametrize("call", ["packed", "lengths"])
def test_torchscript_trace_of_variable_lengths_replays_on_other_batches(call):
    """torch.jit.trace of a model that packs its batch (no initial state) or calls lengths=: the trace replays on
    another batch size, sequence length and set of lengths with nn.LSTM's packed numbers. Before, the trace kept the
    traced batch's size for the zero state (packed) and its sort and batch sizes (lengths=)."""
    from torch.nn.utils.rnn import pad_packed_sequence

    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, 2, bidirectional=True, batch_first=True).double()
    fast = fastlstm.LSTM(4, 6, 2, bidirectional=True, batch_first=True).double()
    fast.load_state_dict(ref.state_dict())

    def packing(lstm, x, lengths):
        y, (h, c) = lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])[0], h, c

    class Model(nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x, lengths):
            if call == "packed":
                return packing(self.lstm, x, lengths)
            y, (h, c) = self.lstm(x, lengths=lengths)
            return y, h, c

    x, lengths = torch.randn(3, 5, 4, dtype=torch.float64), torch.tensor([5, 2, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about the size checks, as it does for nn.LSTM's
        traced = torch.jit.trace(Model(fast), (x, lengths), check_trace=False)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert "aten::lstm" in kinds and not any(kind.startswith("fastlstm::") for kind in kinds), kinds
    for batch, steps, other in ((4, 7, [7, 2, 6, 3]), (2, 5, [1, 5]), (3, 5, [3, 5, 1])):
        x_other, lengths_other = torch.randn(batch, steps, 4, dtype=torch.float64), torch.tensor(other)
        for got, expected in zip(traced(x_other, lengths_other), packing(ref, x_other, lengths_other)):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of an LSTM's output, a PackedSequence's among them (torch 2.5's pytree keeps one whole)."""
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for x in leaves for t in (x if isinstance(x, PackedSequence) else (x,)) if t is not None]


@pytest.mark.parametrize("grad_inside", [False, True], ids=["inference_mode", "enable_grad_inside"])
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_inference_mode_gives_nn_lstm_numbers(backend, grad_inside):
    """torch.inference_mode() (what serving code uses instead of no_grad): padded and packed input, and a step,
    same numbers; also with grad mode on inside it (a validation loop's enable_grad), where autograd still records
    nothing (triton's layer had tried to save its inference tensors for backward, and raised)."""
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, 2).double()
    fast = fastlstm.LSTM(4, 5, 2, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    grad_mode = torch.enable_grad if grad_inside else contextlib.nullcontext
    for inputs in (x, packed, "step"):
        with torch.inference_mode(), grad_mode():
            if inputs == "step":
                got, expected = fast.step(x[0]), ref(x[:1])
                expected = (expected[0][0], expected[1])
            else:
                got, expected = fast(inputs), ref(inputs)
        for a, b in zip(_tensors(got), _tensors(expected), strict=True):
            assert a.is_inference() == b.is_inference() and not a.requires_grad
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("backend", ["auto", "native", *CPU_BACKENDS])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_a_batch_made_under_inference_mode_trains(backend, batch_first):
    """A batch and initial state prepared under torch.inference_mode, then trained on: forward, lengths= and step
    give the outputs and gradients of the same values made outside it. (nn.LSTM trains on such a batch only where
    its own path copies the input first, batch_first; time-major it raises.)"""
    torch.manual_seed(0)
    fast = fastlstm.LSTM(4, 5, 2, batch_first=batch_first, backend=backend).double()
    with torch.inference_mode():
        x = torch.randn(*((3, 6) if batch_first else (6, 3)), 4, dtype=torch.float64)
        hx = (torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64))
    plain_x, plain_hx = x.clone(), tuple(t.clone() for t in hx)
    calls = [
        lambda x, hx: fast(x, hx),
        lambda x, hx: fast(x, hx, lengths=[6, 2, 4]),
        lambda x, hx: fast.step(x[:, 0] if batch_first else x[0], hx),
    ]
    for call in calls:
        y = _trains_as_outside_inference_mode(fast, call, (x, hx), (plain_x, plain_hx))
        assert not y.is_inference()


def _trains_as_outside_inference_mode(model, call, inputs, plain_inputs):
    """call(*inputs), some made under torch.inference_mode, trains as call(*plain_inputs), the same values made
    outside it: outputs, states and every gradient bitwise. Returns the former's output."""
    results = []
    for args in (inputs, plain_inputs):
        model.zero_grad(set_to_none=True)
        y, (h, c) = call(*args)
        (y.sum() + h.sum() + 2 * c.sum()).backward()
        results.append([y, h, c, *(p.grad for p in model.parameters())])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    return results[0][0]


@pytest.mark.parametrize("backend", ["auto", "native", *CPU_BACKENDS])
def test_a_cell_state_made_under_inference_mode_alone_trains(backend):
    """c0 alone made under torch.inference_mode (a cell state kept from an earlier inference pass), h0 and the batch
    plain: it trains as the same values made outside it."""
    torch.manual_seed(0)
    fast = fastlstm.LSTM(4, 5, 2, backend=backend).double()
    x, h0 = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    with torch.inference_mode():
        c0 = torch.randn(2, 3, 5, dtype=torch.float64)
    _trains_as_outside_inference_mode(fast, fast, (x, (h0, c0)), (x, (h0, c0.clone())))


AUTOCAST_CASES = [
    # (proj_size, hx dtype or None, packed lengths or None)
    (0, None, None),
    (0, torch.float32, None),
    (0, None, [5, 3, 2]),
    (0, None, [5, 5, 5]),
    (2, None, None),
    (2, torch.bfloat16, [5, 3, 2]),
]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])  # no bf16 in the interpreter
@pytest.mark.parametrize("proj,hx_dtype,lengths", AUTOCAST_CASES, ids=str)
def test_cpu_autocast_dtypes_and_accuracy_match_nn_lstm(backend, proj, hx_dtype, lengths):
    torch.manual_seed(0)
    native = nn.LSTM(6, 8, 2, proj_size=proj)
    fast = fastlstm.LSTM(6, 8, 2, proj_size=proj, backend=backend)
    fast.load_state_dict(native.state_dict())
    exact = nn.LSTM(6, 8, 2, proj_size=proj, dtype=torch.float64)
    exact.load_state_dict(native.state_dict())
    x = torch.randn(5, 3, 6)
    hx = None
    if hx_dtype is not None:
        hx = (torch.randn(2, 3, proj or 8, dtype=hx_dtype), torch.randn(2, 3, 8, dtype=hx_dtype))

    def run(module, dtype=None):
        inp = x if dtype is None else x.to(dtype)
        state = hx if dtype is None or hx is None else tuple(t.to(dtype) for t in hx)
        if lengths is not None:
            inp = pack_padded_sequence(inp, lengths)
        y, (h, c) = module(inp, state)
        return [y.data if lengths is not None else y, h, c]

    expected = nn_lstm_under_cpu_autocast(lambda: run(native))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(fast)
    truth = run(exact, torch.float64)
    for e, g, t in zip(expected, got, truth):
        assert g.dtype == e.dtype
        native_error = (e.double() - t).abs().max().item()
        fast_error = (g.double() - t).abs().max().item()
        assert fast_error <= 2 * native_error + 1e-3, (fast_error, native_error)
    if backend != "reference":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fastlstm.explain(fast, x).backends == [backend, backend]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])  # no bf16 in the interpreter
def test_cpu_autocast_dtypes_follow_grad_mode_and_empty_batches_as_nn_lstm(backend):
    """nn.LSTM's dtypes under CPU autocast follow oneDNN, which takes some calls only with grad mode off (seen: a
    float16 model under bfloat16 autocast returns bfloat16 under no_grad and float32 with grad mode on) and no
    empty batch (ATen's path takes it, in float32 under bfloat16 autocast). The dtypes of each call are nn.LSTM's
    in whatever order the calls come, remembered calls included, and the numbers stay within twice its error."""
    torch.manual_seed(0)
    for model_dtype in (torch.float32, torch.float16):
        native = nn.LSTM(6, 8, dtype=model_dtype)
        fast = fastlstm.LSTM(6, 8, dtype=model_dtype, backend=backend)
        fast.load_state_dict(native.state_dict())
        exact = nn.LSTM(6, 8, dtype=torch.float64)
        exact.load_state_dict(native.state_dict())

        def leaves(out):
            y, (h, c) = out
            return [y, h, c]

        for grad, batch in [(False, 3), (True, 3), (False, 3), (True, 0), (False, 0), (True, 3), (False, 0)]:
            x = torch.randn(5, batch, 6, dtype=model_dtype)
            with torch.set_grad_enabled(grad):
                expected = nn_lstm_under_cpu_autocast(lambda native=native, x=x: leaves(native(x)))
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    got = leaves(fast(x))
            truth = leaves(exact(x.double()))
            for e, g, t in zip(expected, got, truth):
                assert g.dtype == e.dtype, (model_dtype, grad, batch, g.dtype, e.dtype)
                if batch and backend != "reference":  # its plain ops round c to bfloat16 each step
                    native_error = (e.double() - t).abs().max().item()
                    fast_error = (g.double() - t).abs().max().item()
                    assert fast_error <= 2 * native_error + 1e-3, (model_dtype, grad, fast_error, native_error)


def test_autocast_dtypes_remembered_stay_bounded_whatever_the_models(monkeypatch):
    """The dtypes nn.LSTM gives each kind of call under autocast are remembered as the calls' checks are, at most
    backends.REMEMBERED_MAX of them: a process that builds models of many sizes (a hyperparameter search, a server
    of many models) had kept one entry for every configuration it met, its models long deleted; each still gets
    nn.LSTM's dtypes."""
    from fastlstm import module

    monkeypatch.setattr(backends, "REMEMBERED_MAX", 4)
    monkeypatch.setattr(module, "_AUTOCAST_DTYPES", {})
    for size in range(1, 13):
        fast, native, x = fastlstm.LSTM(size, 3), nn.LSTM(size, 3), torch.randn(2, 1, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, (h, c) = fast(x)
        y_native, (h_native, c_native) = nn_lstm_under_cpu_autocast(lambda native=native, x=x: native(x))
        assert [y.dtype, h.dtype, c.dtype] == [y_native.dtype, h_native.dtype, c_native.dtype]
        assert len(module._AUTOCAST_DTYPES) <= 4


@pytest.mark.parametrize("backend", ["auto", "native", *[b for b in CPU_BACKENDS if b != "triton"]])
@pytest.mark.parametrize("lengths", [None, [5, 5, 5]], ids=str)
def test_cpu_autocast_where_onednn_fails_runs_as_nn_lstm_without_onednn(monkeypatch, backend, lengths):
    """On CPUs without AVX-512 nn.LSTM fails under bfloat16 autocast (oneDNN: "could not create a primitive
    descriptor"); fastlstm then gives what nn.LSTM gives with oneDNN off, with one warning. Played out here on any
    CPU by a torch._VF.lstm that fails as oneDNN does there."""
    real_lstm = torch._VF.lstm

    def onednn_without_bf16(*args):
        if torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled:
            raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive")
        return real_lstm(*args)

    monkeypatch.setattr(torch._VF, "lstm", onednn_without_bf16)
    monkeypatch.setattr(fastlstm.module, "_AUTOCAST_DTYPES", {})
    torch.manual_seed(0)
    native = nn.LSTM(6, 8, 2)
    fast = fastlstm.LSTM(6, 8, 2, backend=backend)
    fast.load_state_dict(native.state_dict())
    x = torch.randn(5, 3, 6)

    def run(module):
        y, (h, c) = module(x if lengths is None else pack_padded_sequence(x, lengths))
        return [y if lengths is None else y.data, h, c]

    with pytest.raises(RuntimeError, match="primitive descriptor"), torch.autocast("cpu", dtype=torch.bfloat16):
        run(native)
    expected = nn_lstm_under_cpu_autocast(lambda: run(native))
    with pytest.warns(UserWarning, match="oneDNN path fails"), torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(fast)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        if backend == "native":
            torch.testing.assert_close(g, e, atol=0, rtol=0)
        else:  # in float32 throughout, where ATen's path multiplies in bfloat16
            torch.testing.assert_close(g, e, atol=1e-2, rtol=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once for this kind of call
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(fast)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_dtypes_match_nn_lstm(dtype):
    torch.manual_seed(0)
    native = nn.LSTM(6, 32, 2).cuda()
    fast = fastlstm.LSTM(6, 32, 2, backend="triton").cuda()
    fast.load_state_dict(native.state_dict())
    x = torch.randn(7, 4, 6, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y_ref, (h_ref, c_ref) = native(x)
        y, (h, c) = fast(x)
    assert [t.dtype for t in (y, h, c)] == [t.dtype for t in (y_ref, h_ref, c_ref)]
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_compile_trains_where_auto_picks_native(compiler):
    """The CUDA side of test_compile_trains_where_auto_gives_the_call_to_native: a fullgraph training step of a
    model whose calls auto gives to native matches eager. A compiled graph runs torch's decomposition of aten::lstm
    there, not cuDNN: on an H200 (torch 2.11) its h_n and c_n came out [4, 1, 3, 8] until the module restored
    nn.LSTM's shapes (test_compiled_native_stack_gives_nn_lstms_state_shapes)."""
    torch.manual_seed(0)
    model = Tagger().cuda()
    compiled_model = Tagger().cuda()
    compiled_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 10, (3, 5), device="cuda")
    eager = model(tokens)
    _loss(eager).backward()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)(tokens)
    _loss(compiled).backward()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_vmap_and_forward_mode_ad(backend):
    """torch.vmap and torch.func.jvp on CUDA, where nn.LSTM's cuDNN path has neither a batching rule nor a forward-mode
    derivative: auto serves vmap with triton's op and its vmap rule, as a forced triton does, and jvp on the reference
    loop (triton has no forward-mode derivative); both match nn.LSTM, a loop of it for vmap, its float64 CPU jvp
    (ATen's path) for jvp."""
    torch.manual_seed(0)
    reference = nn.LSTM(4, 16, 2, bidirectional=True)
    model = fastlstm.LSTM(4, 16, 2, bidirectional=True, backend=backend).cuda()
    model.load_state_dict(reference.state_dict())
    xs = torch.randn(3, 6, 2, 4)
    expected = torch.stack([reference(x)[0] for x in xs])
    got = torch.func.vmap(lambda x: model(x)[0])(xs.cuda())
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    if backend == "triton":
        return
    tangent = torch.randn_like(xs[0])
    _, jvp = torch.func.jvp(lambda x: model(x)[0], (xs[0].cuda(),), (tangent.cuda(),))
    reference.double()
    _, expected_jvp = torch.func.jvp(lambda x: reference(x)[0], (xs[0].double(),), (tangent.double(),))
    torch.testing.assert_close(jvp.cpu(), expected_jvp.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_per_sample_gradients():
    """torch.func.vmap(torch.func.grad(loss)) on CUDA: triton's forward once for all the samples, its backward once a
    sample; every parameter's gradient as a loop of nn.LSTM (float64 on the CPU) gives it."""
    torch.manual_seed(0)
    reference = nn.LSTM(4, 16, 2, bidirectional=True).double()
    model = fastlstm.LSTM(4, 16, 2, bidirectional=True, backend="triton").cuda()
    model.load_state_dict(reference.state_dict())
    xs = torch.randn(3, 6, 2, 4, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    loss = lambda p, x: torch.func.functional_call(model, p, (x,))[0].square().sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs.float().cuda())
    for i, x in enumerate(xs):
        reference.zero_grad()
        reference(x)[0].square().sum().backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(got[name][i].cpu().double(), p.grad, atol=1e-3, rtol=1e-3, msg=f"{i} {name}")
