"""nn.LSTM behaviour around forward: state_dict, pickling, parametrizations, conversion, explain, mixed plans."""

from __future__ import annotations

import copy
import functools
import gc
import io
import pickle
import re

import pytest
import torch
import torch.utils.checkpoint
from helpers import (
    assert_same_results,
    fast_cpu_backends,
    lstm_call,
    make_pair,
    nn_lstm_under_cpu_autocast,
    run_python,
    run_with_grads,
    run_without_grads,
)
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastlstm
from fastlstm import benchmark
from fastlstm.backends import get as get_backend
from fastlstm.dispatch import Choice

I, H = 5, 6


# nn.Module.register_state_dict_post_hook and register_load_state_dict_pre_hook are public from torch 2.5. torch 2.4
# has the private methods they call, which fill the same dicts (_state_dict_hooks; _load_state_dict_pre_hooks, a
# _WrappedHook holding a weak reference to the module): the tests below register through them there.
def register_state_dict_post_hook(module: nn.Module, hook):
    if hasattr(module, "register_state_dict_post_hook"):
        return module.register_state_dict_post_hook(hook)
    return module._register_state_dict_hook(hook)


def register_load_state_dict_pre_hook(module: nn.Module, hook):
    if hasattr(module, "register_load_state_dict_pre_hook"):
        return module.register_load_state_dict_pre_hook(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


TOL = dict(atol=1e-9, rtol=1e-7)


def test_same_parameters_repr_and_state_dict_as_nn_lstm():
    ref = nn.LSTM(I, H, 2, bidirectional=True, proj_size=3, batch_first=True)
    fast = fastlstm.LSTM(I, H, 2, bidirectional=True, proj_size=3, batch_first=True)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in fast.named_parameters()]
    assert [p.shape for p in ref.parameters()] == [p.shape for p in fast.parameters()]
    assert ref.state_dict().keys() == fast.state_dict().keys()
    fast.load_state_dict(ref.state_dict())
    assert repr(fast) == repr(ref)
    assert repr(fastlstm.LSTM(I, H, backend="reference")) == "LSTM(5, 6, backend='reference')"


def test_initialisation_matches_nn_lstm_for_the_same_seed():
    torch.manual_seed(7)
    ref = nn.LSTM(I, H, 2)
    torch.manual_seed(7)
    fast = fastlstm.LSTM(I, H, 2)
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["native", "reference", *fast_cpu_backends()])
def test_functional_call_uses_the_given_parameters(backend):
    ref, fast = make_pair(I, H, 2, backend=backend)
    replaced = {name: torch.randn_like(p) for name, p in ref.named_parameters()}
    x = torch.randn(4, 2, I, dtype=torch.float64)
    y_ref, _ = torch.func.functional_call(ref, replaced, (x,))
    y, _ = torch.func.functional_call(fast, replaced, (x,))
    torch.testing.assert_close(y, y_ref, **TOL)
    y_plain, _ = fast(x)
    assert not torch.allclose(y, y_plain)


@pytest.mark.parametrize("backend", ["native", "reference", *fast_cpu_backends()])
def test_weight_tying(backend):
    ref, fast = make_pair(I, H, 1, bidirectional=True, backend=backend)
    for m in (ref, fast):
        m.bias_ih_l0_reverse = m.bias_ih_l0
    x = torch.randn(4, 2, I, dtype=torch.float64)
    assert_same_results(ref, fast, [x], lstm_call, **TOL)
    fast(x)[0].sum().backward()
    assert fast.bias_ih_l0.grad is not None


@pytest.mark.parametrize("backend", ["native", "reference", *fast_cpu_backends()])
def test_weight_norm_parametrization(backend):
    ref, fast = make_pair(I, H, 1, backend=backend)
    ref = parametrizations.weight_norm(ref, name="weight_hh_l0")
    fast = parametrizations.weight_norm(fast, name="weight_hh_l0")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, I, dtype=torch.float64)
    assert_same_results(ref, fast, [x], lstm_call, **TOL)
    with torch.no_grad():
        fast.parametrizations.weight_hh_l0.original0.mul_(2.0)
        ref.parametrizations.weight_hh_l0.original0.mul_(2.0)
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **TOL)


class _Counted(nn.Module):
    """A parametrization that counts its evaluations (and returns a new tensor, as real ones do)."""

    def __init__(self):
        super().__init__()
        self.evaluations = 0

    def forward(self, w):
        self.evaluations += 1
        return w * 1


@pytest.mark.parametrize("backend", ["auto", "native", "reference"])
@pytest.mark.parametrize("call", ["tensor", "packed", "lengths", "step"])
def test_parametrizations_run_as_often_as_with_nn_lstm(backend, call):
    """Each call evaluates a parametrized weight as often as nn.LSTM does, so one with state (spectral_norm's power
    iteration, one step per evaluation in training) keeps in step with nn.LSTM's."""
    x = torch.randn(4, 3, I, dtype=torch.float64)
    calls = {
        "tensor": lambda m: m(x),
        "packed": lambda m: m(nn.utils.rnn.pack_padded_sequence(x, [4, 2, 3], enforce_sorted=False)),
        "lengths": lambda m: m(x, lengths=[4, 2, 3]),
        "step": lambda m: m.step(x[0]),
    }
    counts = []
    for cls in (nn.LSTM, fastlstm.LSTM):
        m = cls(I, H, 2, dtype=torch.float64, **({} if cls is nn.LSTM else {"backend": backend}))
        counter = _Counted()
        nn.utils.parametrize.register_parametrization(m, "weight_hh_l1", counter)
        seen = []
        for _ in range(3):
            counter.evaluations = 0
            (calls[call] if cls is fastlstm.LSTM else lambda m: m(x))(m)
            seen.append(counter.evaluations)
        counts.append(seen)
    assert counts[1] == counts[0]

    ref, fast = make_pair(I, H, 1, backend=backend)
    for m in (ref, fast):
        torch.manual_seed(1)
        parametrizations.spectral_norm(m, "weight_ih_l0")
    for _ in range(3):
        for m in (ref, fast):
            m.zero_grad()
            m(x)[0].sum().backward()
    torch.testing.assert_close(fast.parametrizations.weight_ih_l0[0]._u, ref.parametrizations.weight_ih_l0[0]._u)
    torch.testing.assert_close(
        fast.parametrizations.weight_ih_l0.original.grad, ref.parametrizations.weight_ih_l0.original.grad, **TOL
    )


class Tagger(nn.Module):
    def __init__(self, lstm_cls=fastlstm.LSTM):
        super().__init__()
        self.emb = nn.Embedding(11, I)
        self.lstm = lstm_cls(I, H, 2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * H, 3)

    def forward(self, tokens):
        return self.out(self.lstm(self.emb(tokens))[0])


def test_whole_model_save_load_pickle_deepcopy():
    model = Tagger()
    tokens = torch.randint(0, 11, (2, 7))
    expected = model(tokens)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (loaded, pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert isinstance(clone.lstm, fastlstm.LSTM)
        torch.testing.assert_close(clone(tokens), expected)


def test_convert_round_trip_keeps_parameters_mode_and_optimizer():
    model = Tagger(nn.LSTM).double().eval()
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 11, (2, 7))
    expected = model(tokens)

    assert fastlstm.convert(model, backend="reference") is model
    assert type(model.lstm) is fastlstm.LSTM and model.lstm.backend == "reference"
    assert not model.lstm.training
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    torch.testing.assert_close(model(tokens), expected, **TOL)

    model.train()
    model(tokens).sum().backward()
    before = model.lstm.weight_hh_l0.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.lstm.weight_hh_l0)  # the old optimizer updates the new layer

    fastlstm.convert(model, to="torch")
    assert type(model.lstm) is nn.LSTM and not hasattr(model.lstm, "backend")
    assert all(a is b for a, b in zip(params_before, model.parameters()))


def test_convert_a_bare_lstm_and_parametrized_lstm():
    lstm = nn.LSTM(I, H)
    fast = fastlstm.convert(lstm)
    assert isinstance(fast, fastlstm.LSTM) and fast.weight_hh_l0 is lstm.weight_hh_l0

    ref = parametrizations.weight_norm(nn.LSTM(I, H).double(), name="weight_hh_l0")
    fast = fastlstm.convert(copy.deepcopy(ref), backend="reference")
    assert isinstance(fast, fastlstm.LSTM)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **TOL)


def test_convert_keeps_a_layer_used_in_several_places_one_layer():
    """One nn.LSTM held under two names, and by two parents: converted, each place holds the same new layer, so a
    weight replaced through one place (or a hook added there) reaches the others, as before the conversion."""
    shared = nn.LSTM(I, H)

    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = shared
            self.decoder = shared

    model = nn.Sequential(TwoNames(), nn.ModuleList([shared]))
    fastlstm.convert(model, backend="reference")
    layers = (model[0].encoder, model[0].decoder, model[1][0])
    assert type(layers[0]) is fastlstm.LSTM and all(layer is layers[0] for layer in layers)
    model[1][0].weight_hh_l0 = nn.Parameter(torch.zeros(4 * H, H))
    assert model[0].decoder.weight_hh_l0 is model[1][0].weight_hh_l0
    fastlstm.convert(model, to="torch")
    layers = (model[0].encoder, model[0].decoder, model[1][0])
    assert type(layers[0]) is nn.LSTM and all(layer is layers[0] for layer in layers)


@pytest.mark.parametrize("root", [False, True], ids=["inside-a-model", "the-model"])
def test_convert_reaches_an_lstm_held_by_an_lstm(root):
    """An nn.LSTM that another nn.LSTM holds as a child (as any module may), also where that one is shared or is the
    model itself: converted with it both ways, the outer layer holding the converted inner one. The outer layer had
    been rebuilt from its children as they were, and the inner one swapped in the layer it replaced."""
    outer, other = nn.LSTM(I, H), nn.LSTM(I, H)
    outer.inner = nn.LSTM(I, H)
    outer.inner.deeper = other
    model = outer if root else nn.Sequential(outer, nn.ModuleList([other, outer]))
    for to, cls in (("fastlstm", fastlstm.LSTM), ("torch", nn.LSTM)):
        model = fastlstm.convert(model, to=to)
        outer = model if root else model[0]
        layers = [m for m in model.modules() if isinstance(m, (nn.LSTM, fastlstm.LSTM))]
        assert len(layers) == 3 and all(type(m) is cls for m in layers), [type(m) for m in layers]
        if not root:
            assert model[1][1] is outer and model[1][0] is outer.inner.deeper


@pytest.mark.parametrize("to", ["fastlstm", "torch"])
def test_hook_handles_taken_before_convert_still_remove_their_hooks(to):
    """A hook's handle taken before fastlstm.convert removes the hook from the converted layer, as the hooks are
    the layer's own (they were copied: the handle removed nothing, and the hook kept firing)."""
    source = nn.LSTM(I, H) if to == "fastlstm" else fastlstm.LSTM(I, H)
    fired = []
    handles = [
        source.register_forward_hook(lambda *args: fired.append("forward")),
        source.register_forward_pre_hook(lambda *args: fired.append("pre")),
        source.register_forward_hook(lambda *args, **kwargs: fired.append("kwargs"), with_kwargs=True),
        source.register_full_backward_hook(lambda *args: fired.append("backward")),
        register_state_dict_post_hook(source, lambda *args: fired.append("state_dict")),
    ]
    converted = fastlstm.convert(nn.Sequential(source), to=to)[0]
    assert type(converted) is (fastlstm.LSTM if to == "fastlstm" else nn.LSTM)
    x = torch.randn(3, 2, I, requires_grad=True)
    converted(x)[0].sum().backward()
    converted.state_dict()
    assert sorted(fired) == ["backward", "forward", "kwargs", "pre", "state_dict"]
    for handle in handles:
        handle.remove()
    fired.clear()
    converted(x)[0].sum().backward()
    converted.state_dict()
    assert fired == []


@pytest.mark.parametrize("to", ["fastlstm", "torch"])
def test_convert_points_load_state_dict_pre_hooks_at_the_converted_layer(to):
    """register_load_state_dict_pre_hook's hooks are called with their module (torch keeps a weak reference to it):
    converted, with the new layer (they had raised "the hook of a dead Module", or got the replaced one)."""
    source = nn.LSTM(I, H) if to == "fastlstm" else fastlstm.LSTM(I, H)
    seen = []

    def upgrade_checkpoint(module, *args):
        seen.append(module)

    handle = register_load_state_dict_pre_hook(source, upgrade_checkpoint)
    model = fastlstm.convert(nn.Sequential(source), to=to)
    state = model.state_dict()
    del source
    model.load_state_dict(state)
    assert len(seen) == 1 and seen[0] is model[0]
    assert [hook.__name__ for hook in model[0]._load_state_dict_pre_hooks.values()] == ["upgrade_checkpoint"]
    handle.remove()  # a handle taken before still removes it
    model.load_state_dict(state)
    assert len(seen) == 1


def test_scripting_leaves_the_layers_load_state_dict_pre_hooks_its_own():
    """torch.jit.script of the layer itself swaps in a temporary nn.LSTM sharing its hooks: they stay the eager
    layer's (pointed at the temporary copy, they raised "the hook of a dead Module" once it was gone)."""
    model = fastlstm.LSTM(I, H)
    seen = []
    register_load_state_dict_pre_hook(model, lambda module, *args: seen.append(module))
    torch.jit.script(model)
    gc.collect()
    model.load_state_dict(model.state_dict())
    assert len(seen) == 1 and seen[0] is model


def test_a_script_that_swaps_fastlstm_in_for_torch_nn_lstm(monkeypatch):
    """`torch.nn.LSTM = fastlstm.LSTM` before a model is built: a way to swap it into third-party code. What fastlstm
    hands to nn.LSTM (TorchScript's rebuilt layer, sparse input, convert back, check's and bench's references) is
    still torch's class, not whatever torch.nn.LSTM names at call time (torch.jit.script had failed on a rebuilt
    fastlstm layer; sparse input had recursed until RecursionError)."""
    torch_lstm = nn.LSTM
    monkeypatch.setattr(nn, "LSTM", fastlstm.LSTM)
    model = nn.Sequential(nn.LSTM(I, H))
    assert isinstance(model[0], fastlstm.LSTM)
    x = torch.randn(4, 2, I)
    expected = model(x)[0]
    scripted = torch.jit.script(model)
    assert type(model[0]) is torch_lstm
    torch.testing.assert_close(scripted(x)[0], expected, atol=1e-6, rtol=1e-5)

    sparse = torch.randn(3, 2, I).to_sparse()
    with pytest.raises(RuntimeError) as fast_error:
        fastlstm.LSTM(I, H)(sparse)
    with pytest.raises(RuntimeError) as torch_error:
        torch_lstm(I, H)(sparse)
    assert str(fast_error.value) == str(torch_error.value)

    assert type(fastlstm.convert(fastlstm.LSTM(I, H), to="torch")) is torch_lstm
    assert fastlstm.convert(torch_lstm(I, H)).__class__ is fastlstm.LSTM
    models = benchmark.make_models(benchmark.Shape(2, 3, I, H), ["reference"], "cpu", torch.float32)
    assert type(models["nn.LSTM"]) is torch_lstm


def _forward_replaced_as_accelerate_does(module: nn.Module) -> None:
    """What accelerate's add_hook_to_module does to a module (less the hook): forward replaced on the instance by a
    partial holding the module, the old bound forward kept beside it."""
    module._old_forward = module.forward
    module.forward = functools.partial(lambda mod, *args, **kwargs: mod._old_forward(*args, **kwargs), module)


@pytest.mark.parametrize("replace", ["compile", "accelerate", "closure"])
@pytest.mark.parametrize("to", ["fastlstm", "torch"])
def test_convert_leaves_a_layer_whose_call_was_replaced_on_the_instance(replace, to):
    """Module.compile() and forward overrides are bound to the layer itself: a converted copy would keep calling the
    old layer, whose weights a later load_state_dict(assign=True) no longer reaches (stale numbers). Left, warned.
    A plain function holds the old forward where no attribute of the layer shows it (a closure's cell)."""
    source = nn.LSTM(I, H) if to == "fastlstm" else fastlstm.LSTM(I, H)
    if replace == "compile":
        source.compile(backend="eager")
    elif replace == "accelerate":
        _forward_replaced_as_accelerate_does(source)
    else:
        old_forward = source.forward
        source.forward = lambda *args, **kwargs: old_forward(*args, **kwargs)
    model = nn.Sequential(source)
    with pytest.warns(UserWarning, match="left an .*LSTM unconverted: its call was replaced on the instance"):
        fastlstm.convert(model, to=to)
    assert model[0] is source


@pytest.mark.parametrize("where", ["child", "model"])
@pytest.mark.parametrize("to", ["fastlstm", "torch"])
def test_convert_leaves_a_layer_that_torch_compile_wrapped(where, to):
    """torch.compile(layer) holds the layer as its _orig_mod with its call bound to it: converting _orig_mod had left
    the old layer serving every call, silently, and blind to the weights a later load_state_dict(assign=True) gave
    the converted one (0.87 off nn.LSTM). Left, warned, as a layer whose call was replaced on the instance."""
    source = nn.LSTM(I, H) if to == "fastlstm" else fastlstm.LSTM(I, H)
    wrapped = torch.compile(source, backend="eager")
    model = nn.Sequential(wrapped) if where == "child" else wrapped
    with pytest.warns(UserWarning, match="left an .*LSTM unconverted: torch.compile wrapped it"):
        assert fastlstm.convert(model, to=to) is model
    assert wrapped._orig_mod is source


def test_convert_leaves_subclasses_with_a_warning():
    class Scaled(nn.LSTM):
        def forward(self, x, hx=None):
            y, state = super().forward(x, hx)
            return 2 * y, state

    model = nn.Sequential(Scaled(I, H), nn.Linear(H, 2))
    with pytest.warns(UserWarning, match="left .*Scaled unconverted: it subclasses torch.nn.LSTM"):
        fastlstm.convert(model)
    assert type(model[0]) is Scaled

    class Tagged(fastlstm.LSTM):
        pass

    with pytest.warns(UserWarning, match="subclasses fastlstm.LSTM"):
        assert type(fastlstm.convert(Tagged(I, H), to="torch")) is Tagged


@pytest.mark.parametrize("backend", ["auto", "native", "reference", "cpp", "triton"])
@pytest.mark.parametrize("proj", [0, 3])
def test_output_changed_in_place_before_backward(backend, proj):
    """nn.LSTM's ATen path (float64 here) lets a model add to its output in place (y += residual) and still
    backpropagate; so must every fastlstm backend."""
    if backend in ("cpp", "triton") and backend not in fast_cpu_backends():
        pytest.skip(f"{backend} serves no float64 call here")
    ref, fast = make_pair(I, H, 2, proj_size=proj, backend=backend)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    residual = torch.randn(4, 3, proj or H, dtype=torch.float64)
    results = []
    for m in (ref, fast):
        y, (h, c) = m(x)
        y += residual
        y.mul_(0.5)
        (y.pow(2).sum() + h.sum()).backward()
        results.append([y.detach()] + [p.grad for p in m.parameters()])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_trains_as_nn_lstm(backend, reentrant):
    """torch.utils.checkpoint runs forward again in backward: the non-reentrant variant checks that the recomputed
    saved tensors match the first forward's, the reentrant one ran that forward under no_grad (the inference paths)
    and backpropagates through the recomputation. Dropout must draw the same numbers both times, as nn.LSTM's does."""
    ref, fast = make_pair(I, H, 3, dropout=0.4, bidirectional=True, proj_size=3, backend=backend)
    x = torch.randn(7, 4, I, dtype=torch.float64)
    results = []
    for m in (ref, fast):
        xx = x.clone().requires_grad_()
        torch.manual_seed(7)
        y, (h, c) = torch.utils.checkpoint.checkpoint(m, xx, use_reentrant=reentrant)
        (y.square().sum() + h.sum() + c.square().sum()).backward()
        results.append([y.detach(), h.detach(), c.detach(), xx.grad] + [p.grad for p in m.parameters()])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **TOL)


def _save_all(ctx, op, *args, **kwargs):
    return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE


def _recompute_all(ctx, op, *args, **kwargs):
    return torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize(
    # triton (~5-9 s a case in the interpreter) under one policy: the failure was the module's, whatever the backend
    "backend,policy",
    [
        (b, p)
        for b in ["auto", "reference", *fast_cpu_backends()]
        for p in (_save_all, _recompute_all)
        if b != "triton" or p is _save_all
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__.strip("_"),
)
@pytest.mark.parametrize("packed", [False, True], ids=["tensor", "packed"])
@pytest.mark.skipif(not hasattr(torch.utils.checkpoint, "CheckpointPolicy"), reason="no CheckpointPolicy in this torch")
def test_selective_activation_checkpointing_trains_as_nn_lstm(backend, policy, packed):
    """Selective activation checkpointing matches each recomputed op with the first forward's, one by one. A module's
    first call of a kind runs checks its later calls skip (other ops: torch.zeros of the state where they take
    new_zeros), so the first training step failed: "aten.new_zeros.default encountered during backward but not found
    in storage". Under a dispatch mode every call runs the checked path. (nn.LSTM's own call, on ATen's path here
    (float64, a projection, packed), fails: "Tensor cached during selective activation checkpoint has been mutated";
    so does native's.)"""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=3, backend=backend)
    x = torch.randn(7, 4, I, dtype=torch.float64)
    inputs = pack_padded_sequence(x, torch.tensor([7, 3, 5, 1]), enforce_sorted=False) if packed else x

    def loss(m):
        y, (h, c) = m(inputs)
        return (y.data if packed else y).square().sum() + h.sum() + c.square().sum()

    loss(ref).backward()
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    for _ in range(2):  # the module's first call, then a remembered one
        fast.zero_grad()
        checkpoint(loss, fast, use_reentrant=False, context_fn=context).backward()
        for p, q in zip(fast.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)


# (flags built with, flags changed to, whether the weights nn.LSTM's kernels then read have the shapes they read)
_CHANGED_FLAGS = [
    (dict(num_layers=2), dict(num_layers=1), True),
    (dict(num_layers=4), dict(num_layers=2), True),
    (dict(num_layers=2), dict(num_layers=3), True),
    (dict(bidirectional=True), dict(bidirectional=False), True),
    (dict(num_layers=2, bidirectional=True), dict(bidirectional=False), False),  # layer 0's reverse as layer 1
    (dict(num_layers=2), dict(bias=False), False),  # layer 0's biases as layer 1's matrices
    (dict(proj_size=2), dict(bias=False), False),
    (dict(num_layers=2, bias=False), dict(num_layers=1, bias=True), False),  # as many weights, other roles
]


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("call", ["tensor", "packed", "step"])
@pytest.mark.parametrize("built,changed,fits", _CHANGED_FLAGS, ids=str)
def test_a_flag_changed_without_its_weights_gets_nn_lstms_own_answer(backend, dtype, call, built, changed, fits):
    """A model surgery of a flag alone (m.num_layers = 1) leaves weights that do not fit it. nn.LSTM's ATen path
    (float64, packed input) refuses the call; its oneDNN path (float32 on the CPU) computes from the weights it finds
    (the first layer's output, the forward direction alone). auto and native give what nn.LSTM gives, its numbers or
    its error; a forced backend refuses the call. Where a weight read stands in the place of one of another shape,
    oneDNN reads past its end (garbage, NaN among it): every backend raises a clear error there. Reading the list
    by the new flags had run layers on other layers' weights."""
    ref, fast = make_pair(I, H, backend=backend, dtype=dtype, **built)
    x = torch.randn(4, 2, I, dtype=dtype)
    for m in (ref, fast):
        m(x)  # calls before the change are remembered: the change must still be seen
        for name, value in changed.items():
            setattr(m, name, value)

    def run(m) -> tuple[torch.Tensor, ...]:
        if call == "packed":
            y, (h, c) = m(pack_padded_sequence(x, [4, 3]))
            return y.data, h, c
        if call == "step" and m is fast:
            y, (h, c) = m.step(x[0])
            return y[None], h, c
        y, (h, c) = m(x[:1] if call == "step" else x)  # nn.LSTM's own 1-step sequence for step
        return y, h, c

    if not fits:
        with pytest.raises(RuntimeError, match="flags were changed after construction, its weights not"):
            run(fast)
        return
    try:
        expected = run(ref)
    except RuntimeError as error:
        expected = error
    if backend not in ("auto", "native"):
        with pytest.raises(fastlstm.BackendUnavailableError, match="do not fit the module's flags"):
            run(fast)
    elif isinstance(expected, RuntimeError):
        with pytest.raises(RuntimeError) as raised:
            run(fast)
        assert str(raised.value) == str(expected)
    else:
        for got, want in zip(run(fast), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("which", ["weight_ih_l0", "weight_hh_l1", "bias_hh_l1"])
def test_a_weight_left_on_another_device_raises_as_nn_lstm(backend, which):
    """A checkpoint that lacks a weight, loaded with assign=True into a model built on the meta device (accelerate's
    init_empty_weights), leaves that weight on meta: nn.LSTM refuses a tensor call, where reference had computed CPU
    numbers from it (torch.mm of a CPU and a meta tensor gives a CPU tensor). nn.LSTM checks no weight's device for
    packed input, and computes from it too (torch 2.13): fastlstm refuses that call the same way."""
    ref, fast = make_pair(I, H, 2, backend=backend)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    errors = []
    for m in (ref, fast):
        m(x)  # remembered before the weight moves
        setattr(m, which, nn.Parameter(getattr(m, which).detach().to("meta")))
        with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device") as raised:
            m(x)
        errors.append(str(raised.value))
    assert errors[1] == errors[0]
    with pytest.raises(RuntimeError) as raised:
        fast(pack_padded_sequence(x, [4, 3]))
    assert str(raised.value) == errors[0]


def _set_bias_dtype(module: nn.Module, dtype: torch.dtype, swap: str) -> None:
    if swap == "parameter":  # a new Parameter: the weights are read afresh
        module.bias_hh_l0 = nn.Parameter(module.bias_hh_l0.detach().to(dtype))
    else:  # the same Parameter, its data swapped: nothing is read afresh
        module.bias_hh_l0.data = module.bias_hh_l0.data.to(dtype)


@pytest.mark.parametrize("swap", ["parameter", "data"])
@pytest.mark.parametrize(
    "module_dtype,bias_dtype",
    [(torch.float64, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_weights_of_mixed_dtypes_get_what_nn_lstm_gives(module_dtype, bias_dtype, swap):
    """A bias of another dtype (a state_dict loaded with assign=True, or a `.data` swapped): nn.LSTM raises, or
    (oneDNN, bfloat16) computes; auto does exactly that, on the native path, also after a remembered call of the
    same kind; a forced fast backend refuses rather than promote silently, and runs again once the dtypes agree."""
    x = torch.randn(3, 2, I, dtype=module_dtype)
    ref, fast = make_pair(I, H, 1, dtype=module_dtype, backend="auto")
    forced = fastlstm.LSTM(I, H, dtype=module_dtype, backend="reference")
    fast(x)  # the same kind of call passes, and is remembered, before the bias changes
    forced(x)
    for m in (ref, fast, forced):
        _set_bias_dtype(m, bias_dtype, swap)
    try:
        expected = ref(x)
    except RuntimeError as error:
        with pytest.raises(RuntimeError) as got:
            fast(x)
        assert str(got.value) == str(error)
    else:
        for a, b in zip(fast(x), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(fastlstm.BackendUnavailableError, match="do not all share one dtype"):
        forced(x)
    for m in (fast, forced):
        _set_bias_dtype(m, module_dtype, swap)
    assert "share one dtype" not in str(fastlstm.explain(fast, x))  # read afresh once the weights agree again
    assert forced(x)[0].dtype == module_dtype


def _reshape_weight(module, name: str, shape) -> None:
    """The weight as a new Parameter of `shape`, its values kept where it has as many (else its first ones)."""
    old = getattr(module, name).detach()
    values = old.reshape(shape) if old.numel() == torch.Size(shape).numel() else old.flatten()[0].expand(shape)
    setattr(module, name, nn.Parameter(values.clone()))


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shapes", [((1, 4 * H), (1, 4 * H)), ((), (4 * H,)), ((1,), (1, 1))])
def test_a_bias_nn_lstm_broadcasts_gives_its_numbers(backend, packed, shapes):
    """A bias assigned as [1, 4H], a scalar, [1] or [1, 1]: nn.LSTM's ATen path (float64) broadcasts it, to the
    numbers of the [4H] it stands for; every backend gives them, and gradients of the bias's own shape (a projected
    bidirectional stack)."""
    torch.manual_seed(3)
    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=3, backend=backend)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    fast(x)  # the same kind of call is remembered before the bias changes
    for m in (ref, fast):
        _reshape_weight(m, "bias_hh_l1_reverse", shapes[0])
        _reshape_weight(m, "bias_ih_l0", shapes[0])
        _reshape_weight(m, "bias_hh_l0", shapes[1])
    call = lstm_call
    if packed:

        def call(module, x):
            return module(nn.utils.rnn.pack_padded_sequence(x, [4, 2, 3], enforce_sorted=False))

    assert_same_results(ref, fast, [x], call, **TOL)
    assert fast.bias_hh_l1_reverse.grad.shape == shapes[0]


@pytest.mark.parametrize("backend", ["auto", "native", *fast_cpu_backends()])
def test_one_element_biases_give_the_numbers_they_stand_for_in_float32(backend):
    """Both biases of a layer of one element: nn.LSTM's float32 CPU path (oneDNN) reads their sum by pointer, 4H
    values from one (wrong numbers; ATen's path broadcasts). Every backend gives the broadcast numbers, native
    included: the numbers of the same biases expanded to [4H]."""
    torch.manual_seed(4)
    fast = fastlstm.LSTM(I, H, backend=backend)
    expected = nn.LSTM(I, H)
    expected.load_state_dict(fast.state_dict())
    x = torch.randn(5, 3, I)
    for m, shape in ((fast, (1,)), (expected, (4 * H,))):
        m.bias_ih_l0 = nn.Parameter(torch.full(shape, 0.3))
        m.bias_hh_l0 = nn.Parameter(torch.full(shape, -0.1))
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], expected(x)[0], atol=1e-5, rtol=1e-5)


def test_biases_swapped_by_data_to_one_element_and_back_between_remembered_calls():
    """A `.data` swap keeps the Parameter, so the weights are not read afresh: a remembered call of the same kind
    must still see the biases' new shape (a repeat hands nn.LSTM's oneDNN path the weight list as it is only while
    every bias is its [4H]), both ways."""
    torch.manual_seed(5)
    fast = fastlstm.LSTM(I, H, backend="native")
    expected = nn.LSTM(I, H)
    expected.load_state_dict(fast.state_dict())
    x = torch.randn(5, 3, I)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], expected(x)[0], atol=1e-5, rtol=1e-5)
        full = fast.bias_ih_l0.data, fast.bias_hh_l0.data
        fast.bias_ih_l0.data, fast.bias_hh_l0.data = torch.full((1,), 0.3), torch.full((1,), -0.1)
        expected.bias_ih_l0.fill_(0.3)
        expected.bias_hh_l0.fill_(-0.1)
        torch.testing.assert_close(fast(x)[0], expected(x)[0], atol=1e-5, rtol=1e-5)
        fast.bias_ih_l0.data, fast.bias_hh_l0.data = full
        expected.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(x)[0], expected(x)[0], atol=1e-5, rtol=1e-5)


def test_a_model_surgery_of_sizes_and_weights_runs_as_in_nn_lstm():
    """The input size changed after a call, with a weight_ih of the new size: nn.LSTM reads both at call time, and
    so does the shape check (it had kept the first call's shapes)."""
    ref, fast = make_pair(I, H, 1, backend="auto")
    fast(torch.randn(3, 2, I, dtype=torch.float64))
    weight = torch.randn(4 * H, I + 2, dtype=torch.float64)
    for m in (ref, fast):
        m.input_size = I + 2
        m.weight_ih_l0 = nn.Parameter(weight.clone())
    x = torch.randn(3, 2, I + 2, dtype=torch.float64)
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **TOL)


@pytest.mark.parametrize("backend", ["auto", "native", *fast_cpu_backends()])
@pytest.mark.parametrize(
    "name,shape",
    [("weight_ih_l0", (4 * H, I + 2)), ("weight_hh_l1", (4 * H - 4, H)), ("bias_ih_l0", (1, 1, 4 * H)),
     ("bias_hh_l1", (4 * H, 1)), ("bias_ih_l1", (2, 4 * H)), ("weight_ih_l1", (4 * H, 2 * H))],
)  # fmt: skip
def test_a_weight_of_another_shape_is_a_clear_error(backend, name, shape):
    """A weight of another shape than nn.LSTM's constructor gives it: nn.LSTM raises on most (float64), and its
    float32 CPU path reads some past their end (wrong numbers, or a heap corrupted until the process dies); every
    backend raises one clear error naming the weight, also after the same kind of call was remembered, for a tensor,
    a packed and a lengths= call and a step, and runs again once the shape is put back."""
    fast = fastlstm.LSTM(I, H, 2, bidirectional=name != "weight_ih_l1", dtype=torch.float64, backend=backend)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    expected = fast(x)[0]
    kept = getattr(fast, name)
    _reshape_weight(fast, name, shape)
    message = re.escape(f"LSTM: {name} is {list(shape)} where nn.LSTM's constructor makes it")
    calls = [
        lambda: fast(x),
        lambda: fast(nn.utils.rnn.pack_padded_sequence(x, [4, 2, 3], enforce_sorted=False)),
        lambda: fast(x, lengths=torch.tensor([4, 2, 3])),
    ]
    if not fast.bidirectional:
        calls.append(lambda: fast.step(x[0]))
    for call in calls:
        with pytest.raises(RuntimeError, match=message):
            call()
    setattr(fast, name, kept)
    torch.testing.assert_close(fast(x)[0], expected, rtol=0, atol=0)


_STATE_DTYPE_CASES = [
    # (module dtype, proj_size, h0 dtype, c0 dtype): ATen's cell promotes a c0 of another dtype (float64; any
    # module with a projection; bfloat16 even returns a float32 c_n), oneDNN (float32 without one) raises, and an
    # h0 of another dtype fails its product
    (torch.float64, 0, torch.float64, torch.float32),
    (torch.float32, 3, torch.float32, torch.float16),
    (torch.bfloat16, 0, torch.bfloat16, torch.float32),
    (torch.float32, 0, torch.float32, torch.float64),
    (torch.float64, 0, torch.float32, torch.float64),
]


def _state_dtype_calls(m, x, h0, c0) -> dict:
    """(y, h_n, c_n) or the RuntimeError of a tensor call, a packed one, lengths= (nn.LSTM: packing) and step
    (nn.LSTM: a 1-step sequence)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    lengths = torch.tensor([3, 2])
    fast = isinstance(m, fastlstm.LSTM)

    def packed():
        y, state = m(pack_padded_sequence(x, lengths), (h0, c0))
        return y.data, state

    def padded():
        if fast:
            return m(x, (h0, c0), lengths=lengths)
        y, state = m(pack_padded_sequence(x, lengths), (h0, c0))
        return pad_packed_sequence(y, total_length=3)[0], state

    def step():
        if fast:
            return m.step(x[0], (h0, c0))
        y, state = m(x[:1], (h0, c0))
        return y[0], state

    results = {}
    for name, call in [("tensor", lambda: m(x, (h0, c0))), ("packed", packed), ("lengths", padded), ("step", step)]:
        try:
            y, (h, c) = call()
            results[name] = (y, h, c)
        except RuntimeError as error:
            results[name] = error
    return results


@pytest.mark.parametrize("module_dtype, proj, h_dtype, c_dtype", _STATE_DTYPE_CASES)
def test_a_state_of_another_dtype_gets_what_nn_lstm_gives(module_dtype, proj, h_dtype, c_dtype):
    """A c0 of another dtype than the input's: auto gives exactly nn.LSTM's numbers and dtypes, or its error, for
    every kind of call (nn.LSTM's own path decides: dispatch sends such calls there; fastlstm raised for any c0 of
    another dtype); a forced fast backend refuses rather than compute what nn.LSTM may not. An h0 of another dtype
    raises RuntimeError on every path."""
    torch.manual_seed(0)
    ref, fast = make_pair(I, H, 1, dtype=module_dtype, backend="auto", proj_size=proj)
    x = torch.randn(3, 2, I, dtype=module_dtype)
    h0, c0 = torch.randn(1, 2, proj or H, dtype=h_dtype), torch.randn(1, 2, H, dtype=c_dtype)
    expected, got = _state_dtype_calls(ref, x, h0, c0), _state_dtype_calls(fast, x, h0, c0)
    for kind, want in expected.items():
        if isinstance(want, RuntimeError):  # nn.LSTM's own error where its path runs the call
            assert type(got[kind]) is RuntimeError, (kind, got[kind])
            assert h_dtype != module_dtype or str(got[kind]) == str(want), (kind, got[kind])
            continue
        assert not isinstance(got[kind], RuntimeError), (kind, got[kind])
        for name, a, b in zip(("y", "h_n", "c_n"), got[kind], want):
            assert a.dtype == b.dtype, (kind, name, a.dtype, b.dtype)
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{kind} {name}")
    forced = fastlstm.LSTM(I, H, dtype=module_dtype, backend="reference", proj_size=proj)
    if h_dtype != module_dtype:  # fails on every path
        with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] dtype"):
            forced(x, (h0, c0))
    else:
        with pytest.raises(fastlstm.BackendUnavailableError, match="do not all share one dtype"):
            forced(x, (h0, c0))


def test_a_subclass_s_own_checks_run_on_every_call():
    """nn.LSTM runs check_forward_args on every call: a subclass that adds a check there keeps it, even for calls
    of a kind LSTM itself remembers as checked."""

    class Checked(fastlstm.LSTM):
        calls = 0

        def check_forward_args(self, input, hidden, batch_sizes):
            Checked.calls += 1
            if torch.isnan(input).any():
                raise ValueError("NaN in the input")
            super().check_forward_args(input, hidden, batch_sizes)

    x = torch.randn(3, 2, I)
    fastlstm.LSTM(I, H)(x)  # a plain module's call of this kind is remembered
    m = Checked(I, H)
    m(x)
    m(x)
    assert Checked.calls == 2
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((3, 2, I), float("nan")))
    m.step(x[0])
    m.step(x[0])
    assert Checked.calls == 5


def test_convert_rejects_unknown_target():
    with pytest.raises(ValueError, match="to must be"):
        fastlstm.convert(nn.LSTM(I, H), to="jax")


def test_explain_names_a_backend_and_reason_per_layer():
    m = fastlstm.LSTM(I, H, 2, bidirectional=True, backend="reference")
    text = str(fastlstm.explain(m, torch.randn(3, 2, I)))
    assert text.count("reference (forced)") == 4
    assert "layer 1 reverse" in text
    auto = fastlstm.explain(fastlstm.LSTM(I, H), torch.randn(3, 2, I))
    assert auto.requested == "auto" and len(auto.backends) == 1 and auto.layers[0][2].reason
    with pytest.raises(TypeError, match="fastlstm.LSTM"):
        fastlstm.explain(nn.LSTM(I, H), torch.randn(3, 2, I))


@pytest.mark.parametrize("call", ["sparse h0", "empty pack", "pack of no live row"])
def test_explain_names_nn_lstms_own_call_where_the_call_runs_it(call, monkeypatch):
    """Sparse input and packs with nothing to compute run nn.LSTM's own call whatever the backend: explain had named
    the planned backend (a code review; `reference` here, which such calls never reach)."""
    m = fastlstm.LSTM(I, H, 2, bidirectional=True, backend="reference")
    x = torch.randn(5, 2, I)
    args = {
        "sparse h0": (x, (torch.zeros(4, 2, H).to_sparse(), torch.zeros(4, 2, H))),
        "empty pack": (PackedSequence(torch.randn(0, I), torch.tensor([0])),),
        "pack of no live row": (PackedSequence(torch.randn(0, I), torch.tensor([0, 0])),),
    }[call]
    explained = fastlstm.explain(m, *args)
    assert explained.backends == ["native"] * 4 and "nn.LSTM's own" in explained.layers[0][2].reason, explained
    monkeypatch.setattr(get_backend("reference"), "layer", lambda *a: pytest.fail("the reference layer ran"))
    m(*args)


def test_explain_names_nn_lstms_own_call_for_sparse_input_with_lengths():
    """lengths= packs sparse input for nn.LSTM's own forward, which then decides what it gives (torch 2.13: an
    error, as nn.LSTM gives for that pack): explain had named the planned backend (a review)."""
    m = fastlstm.LSTM(I, H, 2, bidirectional=True, backend="reference")
    state = (torch.zeros(4, 2, H).to_sparse(), torch.zeros(4, 2, H))
    assert fastlstm.explain(m, torch.randn(5, 2, I), state, lengths=[5, 3]).backends == ["native"] * 4


def test_environment_sets_the_default_backend(monkeypatch):
    monkeypatch.setenv("FASTLSTM_BACKEND", "reference")
    m = fastlstm.LSTM(I, H)
    assert fastlstm.explain(m, torch.randn(3, 2, I)).backends == ["reference"]
    assert fastlstm.explain(fastlstm.LSTM(I, H, backend="native"), torch.randn(3, 2, I)).backends == ["native"]


@pytest.mark.parametrize("packed", [False, True])
def test_mixed_plan_native_and_reference_layers(monkeypatch, packed):
    """Layers served by different backends stack correctly; exercises the per-layer native path."""
    ref, fast = make_pair(I, H, 3, bidirectional=True, proj_size=4, backend="reference")
    names = ["native", "reference", "reference", "native", "native", "native"]
    monkeypatch.setattr(fastlstm.LSTM, "_plan", lambda self, *args: [Choice(n, "test") for n in names])
    assert fastlstm.explain(fast, torch.randn(3, 2, I, dtype=torch.float64)).backends == names

    def call(module, x):
        if packed:
            x = nn.utils.rnn.pack_padded_sequence(x, [5, 1, 4], enforce_sorted=False)
        return module(x)

    assert_same_results(ref, fast, [torch.randn(5, 3, I, dtype=torch.float64)], call, **TOL)


@pytest.mark.parametrize("name", ["native", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 3])
def test_layer_contract_against_reference(name, reverse, proj):
    from fastlstm.reference import lstm_layer

    T, B, Hd = 6, 4, 5
    P = proj or Hd
    batch_sizes = torch.tensor([4, 3, 3, 2, 1, 1])
    tensors = [
        torch.randn(T, B, I),
        torch.randn(B, P),
        torch.randn(B, Hd),
        torch.randn(4 * Hd, I),
        torch.randn(4 * Hd, P),
        torch.randn(4 * Hd),
        torch.randn(P, Hd) if proj else None,
    ]
    tensors = [None if t is None else t.double().requires_grad_() for t in tensors]
    for sizes in (None, batch_sizes):
        expected = lstm_layer(*tensors, sizes, reverse)
        got = get_backend(name).layer(*tensors, sizes, reverse)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, **TOL)
        grads_e = torch.autograd.grad(sum(t.sum() for t in expected), [t for t in tensors if t is not None])
        grads_g = torch.autograd.grad(sum(t.sum() for t in got), [t for t in tensors if t is not None])
        for e, g in zip(grads_e, grads_g):
            torch.testing.assert_close(g, e, **TOL)
    if batch_sizes is not None:
        y = get_backend(name).layer(*tensors, batch_sizes, reverse)[0]
        assert y[5, 1:].abs().max() == 0  # dead positions are zero


# ---- repeated calls: LSTM remembers calls that passed its checks (module._CHECKED_CALLS) ----------------


@pytest.fixture
def served_by(monkeypatch):
    """The backends that serve each call: a list that each module call appends its backend names to."""
    served: list[list[str]] = []

    def spy(cls, method, name):
        original = getattr(cls, method)

        def recorded(self, *args):
            served[-1].append(name)
            return original(self, *args)

        monkeypatch.setattr(cls, method, recorded)

    spy(fastlstm.LSTM, "_native_stack", "native stack")
    for name in ("native", "reference"):
        spy(type(get_backend(name)), "layer", name)

    def call(module, *args, **kwargs):
        served.append([])
        module(*args, **kwargs)
        return served[-1]

    return call


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)])
def test_repeated_calls_give_nn_lstm_results(config, batched):
    """The second and later calls of one kind take the remembered way: the same numbers and gradients."""
    ref, fast = make_pair(I, H, backend="reference", **config)
    shape = (3, 5, I) if batched else (3, I)
    layers = ref.num_layers * (2 if ref.bidirectional else 1)
    batch = (shape[0 if ref.batch_first else 1],) if batched else ()
    state = [torch.randn(layers, *batch, size, dtype=torch.float64) for size in (ref.proj_size or H, H)]
    for _ in range(3):
        assert_same_results(ref, fast, [torch.randn(*shape, dtype=torch.float64)], lstm_call, **TOL)
        assert_same_results(ref, fast, [torch.randn(*shape, dtype=torch.float64), *state], lstm_call, **TOL)


@pytest.mark.parametrize("backend", ["reference", *fast_cpu_backends(), "native"])
def test_repeated_packed_calls_give_nn_lstm_results(monkeypatch, backend):
    """Packed calls are remembered too, by what the checks and the plan read of a pack (its batch sizes' length,
    first and whether they vary; not its row count): later packs of other lengths skip the checks and still give
    nn.LSTM's numbers and gradients, unsorted packs with a state included."""
    from torch.nn.utils.rnn import pack_padded_sequence

    prepared = []
    prepare = fastlstm.LSTM._prepare
    monkeypatch.setattr(fastlstm.LSTM, "_prepare", lambda self, *a: prepared.append(1) or prepare(self, *a))
    fastlstm.module.forget_plans()
    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=3, backend=backend)
    state = [torch.randn(4, 3, size, dtype=torch.float64) for size in (3, H)]

    def packed(module, x, lengths, *hx):
        return lstm_call(module, pack_padded_sequence(x, lengths, enforce_sorted=False), *hx)

    for lengths in ([5, 3, 2], [2, 5, 4], [5, 1, 5], [4, 5, 3]):  # T 5, B 3: one kind of pack, varying lengths
        for hx in ([], state):
            call = lambda module, x, *h, lengths=lengths: packed(module, x, lengths, *h)  # noqa: E731
            assert_same_results(ref, fast, [torch.randn(5, 3, I, dtype=torch.float64), *hx], call, **TOL)
    assert len(prepared) == 2, prepared  # the first call without a state and the first with one
    call = lambda module, x: packed(module, x, [5, 5, 5])  # noqa: E731  lengths that do not vary: another path
    assert_same_results(ref, fast, [torch.randn(5, 3, I, dtype=torch.float64)], call, **TOL)
    assert len(prepared) == 3


@pytest.mark.parametrize("backend", ["reference", *fast_cpu_backends(), "auto"])
def test_every_kind_of_call_in_turn_with_optimizer_steps_between(backend):
    """One module called every way in turn, twice over (a batch, a pack with a state, lengths=, an unbatched input,
    a step, an inference call), an optimizer step after each call with gradients: what calls remember (plans,
    checks passed, memory kept between calls) never serves another kind of call or stale weights. nn.LSTM's
    numbers, gradients and updated weights every time."""
    ref, fast = make_pair(I, H, 2, proj_size=3, backend=backend)
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, fast)}
    T, B = 4, 3
    lengths = torch.tensor([2, 4, 1])
    state = [torch.randn(2, B, size, dtype=torch.float64) for size in (3, H)]

    def packed(module, x, *hx):
        return lstm_call(module, pack_padded_sequence(x, lengths, enforce_sorted=False), *hx)

    def with_lengths(module, x, *hx):
        if isinstance(module, fastlstm.LSTM):
            return module(x, tuple(hx) or None, lengths=lengths)
        y, state = packed(module, x, *hx)
        return pad_packed_sequence(y, total_length=T)[0], state

    def step(module, x_t, *hx):
        if isinstance(module, fastlstm.LSTM):
            return module.step(x_t, tuple(hx))
        y, state = lstm_call(module, x_t[None], *hx)
        return y[0], state

    def trained(module, inputs, call):
        results = run_with_grads(module, inputs, call)
        optimizers[id(module)].step()
        return results

    kinds = [
        (lstm_call, [(T, B, I)], trained),
        (packed, [(T, B, I), *state], trained),
        (with_lengths, [(T, B, I)], trained),
        (lstm_call, [(T, I), state[0][:, 0], state[1][:, 0]], trained),
        (step, [(B, I), *state], trained),
        (lstm_call, [(T, B, I)], run_without_grads),  # the first call's key but for gradients
    ]
    for _ in range(2):
        for call, inputs, run in kinds:
            inputs = [torch.randn(*t, dtype=torch.float64) if isinstance(t, tuple) else t for t in inputs]
            assert_same_results(ref, fast, inputs, call, run=run, **TOL)
            for (name, want), got in zip(ref.named_parameters(), fast.parameters(), strict=True):
                label = f"{call.__name__}: {name}"
                torch.testing.assert_close(got, want, **TOL, msg=lambda m, label=label: f"{label}: {m}")


def test_repeated_packed_calls_are_checked_as_nn_lstm_checks_them():
    """Bad packed calls after good ones of the same module raise nn.LSTM's errors."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, fast = make_pair(I, H, backend="reference", dtype=torch.float32)
    pack = pack_padded_sequence(torch.randn(4, 2, I), [4, 3])
    good = (torch.zeros(1, 2, H), torch.zeros(1, 2, H))
    bad_calls = [
        (pack_padded_sequence(torch.randn(4, 2, I + 1), [4, 3]),),
        (pack_padded_sequence(torch.randn(4, 2, I, dtype=torch.float64), [4, 3]),),
        (pack, (torch.zeros(1, 3, H), torch.zeros(1, 2, H))),
        (pack, (torch.zeros(1, 2, H), torch.zeros(1, 2, H + 1))),
        (pack, (torch.zeros(2, H), torch.zeros(2, H))),
    ]
    for args in bad_calls:
        for m in (ref, fast):
            m(pack)
            m(pack, good)
        with pytest.raises(Exception) as expected:
            ref(*args)
        with pytest.raises(type(expected.value)):
            fast(*args)


@pytest.mark.parametrize("backend", ["auto", "native", "reference", *fast_cpu_backends()])
def test_a_state_an_unsorted_pack_took_is_checked_again_for_a_sorted_one(backend):
    """nn.LSTM indexes an unsorted pack's state by its sorted indices before checking it: an h0 of two rows passes
    with a pack of one sequence. The same state with a sorted pack of the same batch sizes is an error (found by
    fuzzing: a remembered unsorted call let the sorted one through, and the reference backend ran it)."""
    ref, fast = make_pair(I, H, bidirectional=True, backend=backend)
    x = torch.randn(3, 1, I, dtype=torch.float64)
    hx = (torch.randn(2, 2, H, dtype=torch.float64), torch.randn(2, 2, H, dtype=torch.float64))
    unsorted = pack_padded_sequence(x, [3], enforce_sorted=False)
    for _ in range(2):
        torch.testing.assert_close(fast(unsorted, hx)[0].data, ref(unsorted, hx)[0].data, atol=1e-12, rtol=1e-10)
    with pytest.raises(RuntimeError):
        ref(pack_padded_sequence(x, [3]), hx)
    with pytest.raises(RuntimeError, match=re.escape(f"Expected hidden[0] size (2, 1, {H}), got [2, 2, {H}]")):
        fast(pack_padded_sequence(x, [3]), hx)


def test_repeated_calls_follow_the_backend_setting(monkeypatch, served_by):
    m = fastlstm.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    monkeypatch.setenv("FASTLSTM_BACKEND", "reference")
    assert served_by(m, x) == served_by(m, x) == ["reference"]
    monkeypatch.setenv("FASTLSTM_BACKEND", "native")
    assert served_by(m, x) == ["native stack"]
    m.backend = "reference"
    assert served_by(m, x) == ["reference"]


def test_repeated_calls_follow_whether_gradients_are_needed(monkeypatch, served_by):
    """Dispatch's rules differ for training and inference: a remembered plan must not cross between them."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_fast_backend_for", lambda device_type: "reference")
    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: None if call.needs_grad else "test")
    m = fastlstm.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    state = (torch.zeros(1, 2, H, dtype=torch.float64), torch.zeros(1, 2, H, dtype=torch.float64))
    assert served_by(m, x) == served_by(m, x) == ["reference"]  # the parameters require grad
    with torch.no_grad():
        assert served_by(m, x) == ["native stack"]
    m.requires_grad_(False)
    assert served_by(m, x) == ["native stack"]
    assert served_by(m, x.requires_grad_()) == ["reference"]
    assert served_by(m, x.detach(), state) == ["native stack"]
    assert served_by(m, x.detach(), (state[0], state[1].requires_grad_())) == ["reference"]


def test_repeated_calls_follow_whether_the_input_needs_a_gradient(monkeypatch, served_by):
    """A rule reads whether the module's input needs its gradient (a first layer fed data: the fast backends leave
    its dx out), for every layer alike. A remembered plan must not cross between the two."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_fast_backend_for", lambda device_type: "reference")
    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: "test" if call.input_grad else None)
    m = fastlstm.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    for _ in range(2):
        assert served_by(m, x) == served_by(m, x) == ["reference"]  # training, the input needs no gradient
        assert served_by(m, x.clone().requires_grad_()) == ["native stack"]
        packed = pack_padded_sequence(x.clone().requires_grad_(), torch.tensor([3, 2]))
        assert served_by(m, packed) == ["native stack"]
        assert fastlstm.explain(m, x).backends == ["reference"]
        assert fastlstm.explain(m, x.clone().requires_grad_()).backends == ["native"]
    with torch.no_grad():  # no gradient at all: neither does the input's count
        assert served_by(m, x.clone().requires_grad_()) == ["reference"]
    stack = fastlstm.LSTM(I, H, num_layers=2, dtype=torch.float64)
    assert fastlstm.explain(stack, x).backends == ["reference", "reference"]
    assert fastlstm.explain(stack, x.clone().requires_grad_()).backends == ["native", "native"]
    # a vmap's batched input hides requires_grad: what the rule is told looks through it
    told = []
    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: told.append(call.input_grad))
    inputs = torch.randn(2, 3, 2, I, dtype=torch.float64)
    for batched, tracked in ((inputs, False), (inputs.clone().requires_grad_(), True)):
        told.clear()
        torch.func.vmap(lambda inp: m(inp)[0])(batched)
        assert told == [tracked]


def test_explain_under_autocast_names_the_backends_the_call_runs(monkeypatch, served_by):
    """Under autocast backends compute in autocast's dtype, and dispatch's rules are per dtype: explain plans as
    the call does (it had planned float32 input as float32)."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_fast_backend_for", lambda device_type: "reference")
    in_bf16 = lambda name, call: None if call.dtype == torch.bfloat16 else "not faster"  # noqa: E731
    monkeypatch.setattr(dispatch, "_faster_than_native", in_bf16)
    fastlstm.module.forget_plans()
    m = fastlstm.LSTM(I, H, 2)
    x = torch.randn(3, 2, I)
    assert fastlstm.explain(m, x).backends == ["native", "native"]
    assert served_by(m, x) == ["native stack"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastlstm.explain(m, x).backends == ["reference", "reference"]
        assert served_by(m, x) == ["reference", "reference"]
    # A float16 model under CPU bfloat16 autocast: nn.LSTM computes in float32 in grad mode, and without it in
    # bfloat16 on some CPUs (a Xeon with AMX), in float32 on others (a Zen 4); explain plans in the caller's grad
    # mode (it had planned every call as a call without gradients), as nn.LSTM computes the call
    m.half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastlstm.explain(m, x.half()).backends == ["native", "native"]
        assert served_by(m, x.half()) == ["native stack"]
        with torch.no_grad():
            in_bf16 = nn.LSTM.forward(m, x.half())[0].dtype == torch.bfloat16
            assert fastlstm.explain(m, x.half()).backends == ["reference" if in_bf16 else "native"] * 2
            assert served_by(m, x.half()) == (["reference", "reference"] if in_bf16 else ["native stack"])


def test_repeated_calls_follow_the_thread_count(monkeypatch, served_by):
    """The CPU rule reads torch's thread count (how the cpp forward splits its rows): a plan remembered at one count
    must not serve another."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_fast_backend_for", lambda device_type: "reference")
    one_thread = lambda name, call: None if torch.get_num_threads() == 1 else "more threads"  # noqa: E731
    monkeypatch.setattr(dispatch, "_faster_than_native", one_thread)
    m = fastlstm.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for count, backend, stack in ((1, "reference", ["reference"]), (2, "native", ["native stack"])) * 2:
            torch.set_num_threads(count)
            assert served_by(m, x) == served_by(m, x) == stack
            assert fastlstm.explain(m, x).backends == [backend]
    finally:
        torch.set_num_threads(threads)


def test_repeated_calls_follow_the_onednn_switch(monkeypatch, served_by):
    """The CPU rule reads whether nn.LSTM could take oneDNN (a program may switch it off and on): a plan remembered
    with it on must not serve a call with it off, nor the other way round."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_fast_backend_for", lambda device_type: "reference")
    onednn_off = lambda name, call: None if not torch._C._get_mkldnn_enabled() else "oneDNN on"  # noqa: E731
    monkeypatch.setattr(dispatch, "_faster_than_native", onednn_off)
    m = fastlstm.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    for _ in range(2):
        assert served_by(m, x) == served_by(m, x) == ["native stack"]
        with torch.backends.mkldnn.flags(enabled=False):
            assert served_by(m, x) == served_by(m, x) == ["reference"]
            assert fastlstm.explain(m, x).backends == ["reference"]
        assert fastlstm.explain(m, x).backends == ["native"]


def test_repeated_calls_are_checked_as_nn_lstm_checks_them():
    """Bad calls after good ones of the same module raise nn.LSTM's errors (the remembered way skips checks)."""
    ref, fast = make_pair(I, H, backend="reference", dtype=torch.float32)
    x = torch.randn(3, 2, I)
    bad_calls = [
        (torch.randn(3, 2, I + 1),),
        (torch.randn(0, 2, I),),
        (x.double(),),
        (x, (torch.zeros(1, 3, H), torch.zeros(1, 2, H))),
        (x, (torch.zeros(1, 2, H), torch.zeros(1, 2, H + 1))),
        (x, (torch.zeros(1, 2, H), torch.zeros(1, 2, H, dtype=torch.float64))),
    ]
    for args in bad_calls:
        for m in (ref, fast):
            m(x)
            m(x, (torch.zeros(1, 2, H), torch.zeros(1, 2, H)))
        with pytest.raises(Exception) as expected:
            ref(*args)
        with pytest.raises(type(expected.value)):
            fast(*args)
    for m in (ref, fast):  # the weights change dtype behind the module's back
        m.weight_ih_l0.data = m.weight_ih_l0.data.double()
    with pytest.raises(ValueError) as expected:  # torch 2.5+: "... does not match weight dtype ..."; 2.4 words it so
        ref(x)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        fast(x)


def test_repeated_calls_under_autocast_give_nn_lstm_dtypes():
    ref, fast = make_pair(I, H, backend="reference", dtype=torch.float32)
    x = torch.randn(3, 2, I)
    fast(x)
    expected = nn_lstm_under_cpu_autocast(lambda: ref(x))
    with torch.autocast("cpu", torch.bfloat16):
        got = fast(x)
    assert [got[0].dtype, *(t.dtype for t in got[1])] == [expected[0].dtype, *(t.dtype for t in expected[1])]
    assert fast(x)[0].dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "native", "auto"])
def test_repeated_calls_under_autocast_are_remembered_per_autocast_setting(monkeypatch, backend):
    """A call under autocast that passed the checks is remembered with what autocast makes of it (dtypes, plan),
    per autocast dtype and per ATen path nn.LSTM takes (oneDNN off, nn.LSTM under CPU bfloat16 autocast returns
    float32): later calls skip the checks and still give nn.LSTM's dtypes, whichever setting came first."""
    ref, fast = make_pair(I, H, 2, backend=backend, dtype=torch.float32)
    prepared = []
    prepare = fastlstm.LSTM._prepare
    monkeypatch.setattr(fastlstm.LSTM, "_prepare", lambda self, *a: prepared.append(1) or prepare(self, *a))
    monkeypatch.setattr(fastlstm.module, "_AUTOCAST_DTYPES", {})
    fastlstm.module.forget_plans()
    x = torch.randn(3, 2, I)
    state = (torch.randn(2, 2, H), torch.randn(2, 2, H))

    def dtypes(out):
        return [out[0].dtype, *(t.dtype for t in out[1])]

    for onednn in (False, True, False, True):
        for args in ((x,), (x, state)):
            if onednn:
                expected = nn_lstm_under_cpu_autocast(lambda args=args: ref(*args))
            else:
                with torch.backends.mkldnn.flags(enabled=False), torch.autocast("cpu", torch.bfloat16):
                    expected = ref(*args)
            before = len(prepared)
            with torch.backends.mkldnn.flags(enabled=onednn), torch.autocast("cpu", torch.bfloat16):
                got = fast(*args)
                assert dtypes(fast(*args)) == dtypes(got) == dtypes(expected)
            assert len(prepared) - before <= 1  # the second call of the two was remembered
            torch.testing.assert_close(got[0].float(), expected[0].float(), atol=2e-2, rtol=2e-2)
    assert len(prepared) == 4  # each kind of call checked once: no state and a state, oneDNN on and off
    assert dtypes(fast(x)) == [torch.float32] * 3


@pytest.mark.skipif(
    not fastlstm.module.TRACEABLE, reason="on torch 2.4 `import fastlstm` imports dynamo to keep it out of forward"
)
def test_first_call_imports_neither_dynamo_nor_onnx():
    """A process that never compiles or exports does not pay for importing them (torch._dynamo took 1.2 s here):
    nn.LSTM's first call does not either."""
    code = (
        "import sys, torch, fastlstm\n"
        "m = fastlstm.LSTM(4, 8)\n"
        "with torch.no_grad():\n"
        "    y, _ = m(torch.randn(3, 2, 4))\n"
        "m(torch.randn(3, 2, 4))[0].sum().backward()\n"
        "print(fastlstm.explain(m, torch.randn(3, 2, 4)).backends)\n"
        "print(sorted(k for k in sys.modules if k.startswith(('torch._dynamo', 'torch.onnx'))))\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backends_line, imported = proc.stdout.strip().splitlines()[-2:]
    assert imported == "[]", imported
    assert backends_line in ("['cpp']", "['native']"), backends_line  # cpp unless this machine cannot build it


@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)])
def test_meta_device_gives_nn_lstm_shapes(config):
    """Models built on the meta device (shapes without memory, as init_empty_weights does) run forward there."""
    ref, fast = nn.LSTM(I, H, device="meta", **config), fastlstm.LSTM(I, H, device="meta", **config)
    for x in (torch.empty(3, 2, I, device="meta"), torch.empty(3, I, device="meta")):
        expected, got = ref(x), fast(x)
        for e, g in zip((expected[0], *expected[1]), (got[0], *got[1])):
            assert g.device.type == "meta" and g.shape == e.shape and g.dtype == e.dtype


def test_dynamic_quantization_after_converting_back():
    """quantize_dynamic matches nn.LSTM by type, so fastlstm.LSTM is left alone (README: convert back first)."""
    quantize = torch.ao.quantization.quantize_dynamic
    model = nn.Sequential(fastlstm.LSTM(I, H))
    x = torch.randn(3, 2, I)
    expected = model(x)[0]
    assert type(quantize(model, {nn.LSTM}, dtype=torch.qint8)[0]) is fastlstm.LSTM
    quantized = quantize(fastlstm.convert(model, to="torch"), {nn.LSTM}, dtype=torch.qint8)
    assert type(quantized[0]).__module__.startswith("torch.ao.nn.quantized")
    torch.testing.assert_close(quantized(x)[0], expected, atol=0.05, rtol=0.05)


def test_type_checks_that_readme_names():
    m = fastlstm.LSTM(I, H)
    assert not isinstance(m, nn.LSTM)  # README says so: code picking LSTMs by type must name fastlstm.LSTM too
    assert isinstance(m, nn.RNNBase) and m.mode == "LSTM" and isinstance(m, (nn.LSTM, fastlstm.LSTM))


@pytest.mark.parametrize("backend", ["auto", "reference", *fast_cpu_backends()])
def test_a_parametrized_model_is_freed_once_dropped(backend):
    """Parametrization makes a class per module, whose properties hold the module: nothing fastlstm remembers about
    a call may keep that class (and so the model and its weights) alive."""
    import gc
    import weakref

    def dropped_model():
        m = fastlstm.LSTM(I, H, 2, dtype=torch.float64, backend=backend)
        parametrizations.weight_norm(m, name="weight_hh_l0")
        nn.utils.parametrize.register_parametrization(m, "weight_ih_l1", _Counted())
        x = torch.randn(4, 3, I, dtype=torch.float64)
        for _ in range(2):
            m(x)[0].sum().backward()
            m(nn.utils.rnn.pack_padded_sequence(x, [4, 2, 3], enforce_sorted=False))
            m.step(x[0])
        with torch.no_grad():
            m(x)
        converted = fastlstm.convert(nn.Sequential(m), to="torch")
        return weakref.ref(m), weakref.ref(type(m)), weakref.ref(converted[0])

    refs = dropped_model()
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


@pytest.mark.parametrize("backend", ["auto", "reference", *fast_cpu_backends()])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_states_take_detach_in_place_as_nn_lstms(backend, grad):
    """Truncated backpropagation detaches the carried state in place (`h.detach_()`), which a view refuses: the
    states every kind of call returns are views exactly where nn.LSTM's are (an unbatched call's)."""
    x = torch.randn(4, 2, I, dtype=torch.float64)
    calls = {
        "tensor": lambda m: m(x)[1],
        "unbatched": lambda m: m(x[:, 0])[1],
        "packed": lambda m: m(nn.utils.rnn.pack_padded_sequence(x, [4, 2], enforce_sorted=False))[1],
    }
    for layers, bidirectional in [(1, False), (1, True), (2, False)]:
        ref, fast = make_pair(I, H, layers, bidirectional=bidirectional, backend=backend)
        for kind, call in calls.items():
            with torch.set_grad_enabled(grad):
                expected, got = call(ref), call(fast)
            for want, have in zip(expected, got):
                assert (have._base is None) == (want._base is None), (kind, layers, bidirectional)
                if want._base is None:
                    have.detach_()
    fast = make_pair(I, H, 1, backend=backend)[1]
    with torch.set_grad_enabled(grad):
        states = [fast(x, lengths=[4, 2])[1], fast.step(x[0])[1]]
    for h, c in states:
        h.detach_(), c.detach_()


@pytest.mark.parametrize("backend", ["native", "reference", *fast_cpu_backends()])
def test_a_model_made_under_inference_mode_raises_when_trained_as_nn_lstm(backend):
    """Parameters made under torch.inference_mode cannot be saved for backward outside it: nn.LSTM raises, and so
    does every backend (the reference's matmuls had silently recorded no graph, so no gradient); inference runs."""
    x = torch.randn(3, 2, I, dtype=torch.float64)
    for cls in (nn.LSTM, lambda *a, **k: fastlstm.LSTM(*a, **k, backend=backend)):
        with torch.inference_mode():
            m = cls(I, H, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            m(x)
        with torch.no_grad():
            assert m(x)[0].shape == (3, 2, H)
