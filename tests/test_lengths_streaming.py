"""lengths= on a padded batch equals packing; step() and chunked state carrying equal the whole sequence."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import fast_cpu_backends, make_pair, nn_lstm_under_cpu_autocast
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import fastlstm
from fastlstm import backends

I, H = 5, 6
TOL = dict(atol=1e-9, rtol=1e-7)
BACKENDS = ["native", "reference", *fast_cpu_backends()]


def _grads(module, x, h0, c0, run):
    x, h0, c0 = (t.detach().clone().requires_grad_() for t in (x, h0, c0))
    y, (h, c) = run(module, x, h0, c0)
    gen = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (y, h, c))
    module.zero_grad(set_to_none=True)
    loss.backward()
    return [y, h, c, x.grad, h0.grad, c0.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("lengths", [[3, 7, 1, 4], [7, 7, 7, 7], [2, 2, 1, 1]], ids=str)
def test_lengths_equal_packing(backend, batch_first, lengths):
    """fastlstm's lengths= against nn.LSTM on the packed batch, padded back: outputs, states, every gradient, and
    the output's layout (batch_first's had been a transposed view, where pad_packed_sequence gives a contiguous
    tensor that code may .view())."""
    ref, m = make_pair(I, H, 2, bidirectional=True, proj_size=3, batch_first=batch_first, backend=backend)
    B, T = len(lengths), 7
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    for b, n in enumerate(lengths):  # missing values in the padding, which packing never reads
        (x[b, n:] if batch_first else x[n:, b]).copy_(torch.tensor([float("nan"), float("inf")]).repeat(I)[:I])
    h0, c0 = torch.randn(4, B, 3, dtype=torch.float64), torch.randn(4, B, H, dtype=torch.float64)

    def packed(module, x, h0, c0):
        out, state = module(pack_padded_sequence(x, lengths, batch_first, enforce_sorted=False), (h0, c0))
        return pad_packed_sequence(out, batch_first, total_length=T)[0], state

    def padded(module, x, h0, c0):
        return module(x, (h0, c0), lengths=torch.tensor(lengths))

    for got, expected in zip(_grads(m, x, h0, c0, padded), _grads(ref, x, h0, c0, packed), strict=True):
        torch.testing.assert_close(got, expected, **TOL)
    y, _ = m(x, lengths=lengths)
    with torch.no_grad():
        assert y.stride() == packed(ref, x, h0, c0)[0].stride() and y.is_contiguous()
    for b, n in enumerate(lengths):
        if n < T:
            beyond = y[b, n:] if batch_first else y[n:, b]
            assert beyond.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_lengths_calls_of_one_kind_match_packing_each_time(backend):
    """lengths= calls remember their checks and plan as tensor calls do (per padded shape, state and whether the
    lengths vary): calls of one kind with other lengths, equal or not, with and without a state, each give nn.LSTM's
    numbers on the packed batch."""
    ref, m = make_pair(I, H, 2, bidirectional=True, batch_first=True, backend=backend)
    x = torch.randn(3, 4, I, dtype=torch.float64)
    state = (torch.randn(4, 3, H, dtype=torch.float64), torch.randn(4, 3, H, dtype=torch.float64))
    with torch.no_grad():
        for lengths in ([4, 1, 2], [4, 4, 4], [2, 3, 1], [3, 3, 3], [1, 4, 4]):
            for hx in (None, state):
                y, (h, c) = m(x, hx, lengths=lengths)
                packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                y_ref, (h_ref, c_ref) = ref(packed, hx)
                y_ref = pad_packed_sequence(y_ref, batch_first=True, total_length=4)[0]
                torch.testing.assert_close((y, h, c), (y_ref, h_ref, c_ref), **TOL)


@pytest.mark.parametrize(
    "lengths",
    # 40 sequences of tied lengths: torch.sort (pack_padded_sequence's) is not stable there
    [[6, 2, 4], torch.randint(2, 4, (40,), generator=torch.Generator().manual_seed(40)).tolist()],
    ids=["3", "40-tied"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_with_dropout_draw_as_packing_does(backend, lengths):
    """Each sequence draws nn.LSTM's dropout masks for it when packed: outputs, states and every gradient."""
    ref, m = make_pair(I, H, 3, dropout=0.5, backend=backend)
    ref.train(), m.train()
    T = max(lengths)
    x = torch.randn(T, len(lengths), I, dtype=torch.float64)
    h0, c0 = torch.randn(3, len(lengths), H, dtype=torch.float64), torch.randn(3, len(lengths), H, dtype=torch.float64)

    def packed(module, x, h0, c0):
        torch.manual_seed(5)
        out, state = module(pack_padded_sequence(x, lengths, enforce_sorted=False), (h0, c0))
        return pad_packed_sequence(out, total_length=T)[0], state

    def padded(module, x, h0, c0):
        torch.manual_seed(5)
        return module(x, (h0, c0), lengths=lengths)

    for got, expected in zip(_grads(m, x, h0, c0, padded), _grads(ref, x, h0, c0, packed), strict=True):
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(
    "lengths,error",
    [
        ([3, 0], "every length must be in 1..4"),
        ([5, 1], "every length must be in 1..4"),
        ([1], "one entry per"),
        # pack_padded_sequence reads these as [2, 1] and [1, 1]; a length is a count
        ([2.5, 1.0], "whole numbers, got \\[2.5, 1.0\\]"),
        (torch.tensor([True, True]), "whole numbers, .* torch.bool"),
        ([True, 1], "whole numbers, one per sequence, got \\[True, 1\\]"),
        (torch.tensor([2 + 0j, 1]), "whole numbers, .* torch.complex"),
        ([float("nan"), 1.0], "whole numbers, got \\[nan, 1.0\\]"),
        ([float("inf"), 1.0], "whole numbers, got \\[inf, 1.0\\]"),
        # what torch cannot read as numbers is named as lengths' (torch's own errors did not say so)
        ((n for n in (2, 1)), "lengths must be whole numbers, one per sequence; RuntimeError: Could not infer dtype"),
        (["2", "1"], "lengths must be whole numbers, one per sequence; "),
        ([2**64, 1], "lengths must be whole numbers, one per sequence; "),
        (torch.tensor([2, 1], device="meta"), "lengths must be whole numbers, one per sequence; "),
    ],
)
def test_bad_lengths_are_rejected(lengths, error):
    m = fastlstm.LSTM(I, H)
    for call in (m, fastlstm.explain):
        with pytest.raises(ValueError, match=error):
            call(*([m] if call is fastlstm.explain else []), torch.randn(4, 2, I), lengths=lengths)


@pytest.mark.parametrize("batch_first", [False, True])
def test_explain_with_lengths_gives_the_plan_the_call_runs(batch_first, monkeypatch):
    """explain(m, x, lengths=) answers for the call m(x, lengths=), which the layers see as packed (here a speed
    rule that sends packed calls to native, and the rest to the fast backend, tells the two apart)."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: "packed (test)" if call.packed else None)
    m = fastlstm.LSTM(I, H, 2, bidirectional=True, batch_first=batch_first)
    x = torch.randn((3, 6, I) if batch_first else (6, 3, I))
    lengths = torch.tensor([2, 6, 4])
    plans = []
    plan = m._plan
    monkeypatch.setattr(m, "_plan", lambda *args: plans.append(plan(*args)) or plans[-1])
    m(x, lengths=lengths)
    explained = fastlstm.explain(m, x, lengths=lengths)
    assert [choice for _, _, choice in explained.layers] == list(plans[0])
    assert explained.backends == ["native"] * 4
    fast = "cpp" if backends.get("cpp").unavailable_reason() is None else "native"
    assert fastlstm.explain(m, x).backends == [fast] * 4


@pytest.mark.parametrize("lengths", [[3, 2, 6], [3, 3, 3]], ids=str)
def test_lengths_plan_the_steps_the_call_runs(lengths, monkeypatch):
    """A lengths= call runs as many steps as its longest sequence, as packing does: dispatch plans it so (here a
    speed rule that sends calls of more than 4 steps to native tells them apart), per longest length, also where a
    call of the same padded shape was planned before; explain answers so too."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, c: "long (test)" if c.seq_len > 4 else None)
    m = fastlstm.LSTM(I, H, batch_first=True)
    fast = "cpp" if backends.get("cpp").unavailable_reason() is None else "native"
    x = torch.randn(3, 8, I)
    plans = []
    plan = m._plan
    monkeypatch.setattr(m, "_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    calls = (lengths, [8, 2, 8] if len(set(lengths)) > 1 else [8, 8, 8], lengths)
    for called in calls:
        m(x, lengths=called)
    # the third call's plan is the first's, remembered
    assert [[choice.backend for choice in p] for p in plans] == [["native" if max(lengths) > 4 else fast], ["native"]]
    monkeypatch.setattr(m, "_plan", plan)
    for called in calls:
        assert fastlstm.explain(m, x, lengths=called).backends == ["native" if max(called) > 4 else fast]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    assert fastlstm.explain(m, packed).backends == fastlstm.explain(m, x, lengths=lengths).backends


@pytest.mark.parametrize("backend", ["auto", *(name for name in BACKENDS if name != "triton")])  # bf16: not triton's
def test_lengths_under_cpu_autocast_give_the_dtypes_of_packing(backend):
    """Under CPU bfloat16 autocast nn.LSTM's dtypes for a pack depend on whether its batch sizes vary (ATen's path
    for varied ones returns float32): lengths= gives packing's, including for equal lengths shorter than the padded
    batch (the steps beyond them had made the batch sizes look varied: float32 where packing gives bfloat16), in
    any order of calls of one padded shape, with and without grad mode."""
    torch.manual_seed(6)
    ref, m = make_pair(I, H, 2, batch_first=True, backend=backend, dtype=torch.float32)
    x = torch.randn(3, 5, I)
    for lengths in ([3, 3, 3], [5, 5, 5], [3, 2, 3], [5, 5, 5], [3, 3, 3]):
        for grad in (False, True):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            with torch.set_grad_enabled(grad):
                y_ref, (h_ref, c_ref) = nn_lstm_under_cpu_autocast(lambda packed=packed: ref(packed))
                with torch.autocast("cpu", torch.bfloat16):
                    y, (h, c) = m(x, lengths=torch.tensor(lengths))
            y_ref = pad_packed_sequence(y_ref, batch_first=True, total_length=5)[0]
            assert (y.dtype, h.dtype, c.dtype) == (y_ref.dtype, h_ref.dtype, c_ref.dtype), (lengths, grad)
            torch.testing.assert_close((y, h, c), (y_ref, h_ref, c_ref), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("call", ["lengths", "unsorted pack, h0 needs grad"])
def test_explain_plans_a_call_that_trains_through_reordered_rows_as_training(call, monkeypatch):
    """Frozen weights, the gradient through the input (lengths=) or h0 (an unsorted pack): the rows these calls
    reorder (index_select) lost requires_grad under explain's no_grad, so explain planned inference where the call
    planned training (a speed rule that tells the two apart, here one that sends training to native)."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, c: "training (test)" if c.needs_grad else None)
    m = fastlstm.LSTM(I, H, batch_first=True).requires_grad_(False)
    x = torch.randn(2, 6, I, requires_grad=call == "lengths")
    lengths = torch.tensor([4, 6])
    if call == "lengths":
        args, keywords = (x,), {"lengths": lengths}
    else:
        h0 = torch.zeros(1, 2, H, requires_grad=True)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        args, keywords = (packed, (h0, torch.zeros(1, 2, H))), {}
    plans = []
    plan = m._plan
    monkeypatch.setattr(m, "_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    m(*args, **keywords)
    assert [choice.backend for choice in plans[0]] == ["native"]
    assert fastlstm.explain(m, *args, **keywords).backends == ["native"]


def test_lengths_take_whole_numbers_held_as_floats():
    """A mask's float sum, say: the same call as with integers."""
    torch.manual_seed(0)
    m = fastlstm.LSTM(I, H)
    x = torch.randn(4, 3, I)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1]])
    y, (h, c) = m(x, lengths=mask.sum(0))
    y_int, (h_int, c_int) = m(x, lengths=[3, 1, 4])
    for got, expected in ((y, y_int), (h, h_int), (c, c_int)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_lengths_with_an_input_of_no_steps():
    with pytest.raises(ValueError, match="lengths= takes a padded input of 1 or more steps, got 0"):
        fastlstm.LSTM(I, H)(torch.randn(0, 2, I), lengths=[1, 1])


def test_lengths_reject_packed_and_unbatched_input():
    m = fastlstm.LSTM(I, H)
    with pytest.raises(ValueError, match="padded, batched 3-D"):
        m(torch.randn(4, I), lengths=[4])
    with pytest.raises(ValueError, match="padded, batched 3-D"):
        m(pack_padded_sequence(torch.randn(4, 2, I), [4, 3]), lengths=[4, 3])


def test_lengths_zero_batch():
    y, (h, c) = fastlstm.LSTM(I, H)(torch.randn(4, 0, I), lengths=torch.zeros(0, dtype=torch.long))
    assert y.shape == (4, 0, H) and h.shape == (1, 0, H)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj", [0, 3])
def test_chunks_carrying_state_equal_the_whole_sequence(backend, proj):
    ref, fast = make_pair(I, H, 2, proj_size=proj, backend=backend)
    x = torch.randn(12, 2, I, dtype=torch.float64)
    y_all, (h_all, c_all) = ref(x)
    state, ys = None, []
    for chunk in x.split([5, 1, 6]):
        y, state = fast(chunk, state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys), y_all, **TOL)
    torch.testing.assert_close(state[0], h_all, **TOL)
    torch.testing.assert_close(state[1], c_all, **TOL)


@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_step_equals_forward(proj, batched):
    ref, fast = make_pair(I, H, 3, proj_size=proj, backend="auto")
    x = torch.randn(8, 2, I, dtype=torch.float64)
    if not batched:
        x = x[:, 0]
    h0 = torch.randn(3, 2, proj or H, dtype=torch.float64)
    c0 = torch.randn(3, 2, H, dtype=torch.float64)
    if not batched:
        h0, c0 = h0[:, 0], c0[:, 0]
    y_all, (h_all, c_all) = ref(x, (h0, c0))
    state, ys = (h0, c0), []
    for x_t in x:
        y, state = fast.step(x_t, state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys), y_all, **TOL)
    torch.testing.assert_close(state[0], h_all, **TOL)
    torch.testing.assert_close(state[1], c_all, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj", [0, 3])
def test_step_runs_the_backend_forward_runs(backend, proj):
    """step goes where forward sends a 1-step sequence (cpp and triton too, not only ATen's cells): bitwise the same
    numbers and gradients as forward on that sequence, nn.LSTM's within tolerance."""
    ref, fast = make_pair(I, H, 2, proj_size=proj, backend=backend)
    x = torch.randn(3, I, dtype=torch.float64)
    state = (torch.randn(2, 3, proj or H, dtype=torch.float64), torch.randn(2, 3, H, dtype=torch.float64))

    def run_step(module, x, h0, c0):
        return module.step(x[0], (h0, c0))

    def run_forward(module, x, h0, c0):
        y, hc = module(x, (h0, c0))
        return y[0], hc

    stepped = _grads(fast, x[None], *state, run_step)
    forwarded = _grads(fast, x[None], *state, run_forward)
    expected = _grads(ref, x[None], *state, run_forward)
    for got, same, want in zip(stepped, forwarded, expected):
        if backend != "native":  # native float64 steps in ATen's cells, forward in nn.LSTM's own call
            assert torch.equal(got, same)
        torch.testing.assert_close(got, want, **TOL)
    assert fastlstm.explain(fast, x[None], state).backends == [backend] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_training_of_a_pruned_model_steps_on_the_weights_its_hooks_give(backend):
    """prune keeps weight_ih_l0 = weight_ih_l0_orig * mask by a forward pre-hook: a step runs the module's hooks as
    forward's call does (forward hooks see the 1-step sequence), so streamed training with an optimizer step after
    each time step trains as nn.LSTM on 1-step sequences. A step had read the weight the last call left: after the
    optimizer's step, stale numbers (1.6e-2 off in float64), and the next backward went through the graph of the
    weight prune had made, freed by the first ("backward through the graph a second time")."""
    from torch.nn.utils import prune

    ref, fast = make_pair(I, H, 2, backend=backend)
    for model in (ref, fast):
        prune.random_unstructured(model, "weight_ih_l0", amount=0.5)
    fast.weight_ih_l0_mask.copy_(ref.weight_ih_l0_mask)
    seen = []
    fast.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.5) for model in (ref, fast)]
    xs = torch.randn(3, 2, I, dtype=torch.float64)
    states = [None, None]
    for x in xs:
        y_ref, states[0] = ref(x[None], states[0])
        y, states[1] = fast.step(x, states[1])
        torch.testing.assert_close(y, y_ref[0], **TOL)
        for out, optimizer in zip((y_ref, y), optimizers):
            optimizer.zero_grad()
            out.pow(2).sum().backward()
            optimizer.step()
        states = [tuple(t.detach() for t in state) for state in states]
        torch.testing.assert_close(fast.weight_ih_l0_orig, ref.weight_ih_l0_orig, **TOL)
    assert seen == [torch.Size([1, 2, I])] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_in_training_drops_out_between_layers_as_nn_lstm(backend):
    """In training, dropout acts between layers only, as nn.LSTM's: a step draws the random numbers nn.LSTM draws on
    the 1-step sequence, and the last layer's output is not dropped (y is h_n[-1])."""
    ref, fast = make_pair(I, H, 3, dropout=0.5, backend=backend)
    ref.train(), fast.train()
    x = torch.randn(4, I, dtype=torch.float64)
    state = (torch.randn(3, 4, H, dtype=torch.float64), torch.randn(3, 4, H, dtype=torch.float64))
    torch.manual_seed(3)
    y_ref, (h_ref, c_ref) = ref(x[None], state)
    torch.manual_seed(3)
    y, (h, c) = fast.step(x, state)
    assert torch.equal(y, h[-1])
    for got, want in zip((y, h, c), (y_ref[0], h_ref, c_ref), strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("proj", [0, 3])
def test_native_step_below_float32_is_nn_lstms_call(dtype, batch_first, with_state, proj):
    """Where native serves a step below float32 it makes nn.LSTM's own call (ATen's cells would round every gate to
    the dtype, 2.5-3x nn.LSTM's error): bitwise nn.LSTM's numbers on the 1-step sequence, and its gradients.
    Without a projection nn.LSTM runs oneDNN, which the cells do not match (with one, ATen's loop, which they do)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, 2, proj_size=proj, batch_first=batch_first).to(dtype)
    fast = fastlstm.LSTM(I, H, 2, proj_size=proj, batch_first=batch_first, backend="native").to(dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, I).to(dtype)
    state = (torch.randn(2, 4, proj or H).to(dtype), torch.randn(2, 4, H).to(dtype)) if with_state else None
    with torch.no_grad():
        y, (h, c) = fast.step(x, state)
        y_ref, (h_ref, c_ref) = ref(x.unsqueeze(1 if batch_first else 0), state)
    for got, want in zip((y, h, c), (y_ref.squeeze(1 if batch_first else 0), h_ref, c_ref), strict=True):
        assert got.dtype == dtype and torch.equal(got, want)
    fast.step(x, state)[0].float().sum().backward()
    ref(x.unsqueeze(1 if batch_first else 0), state)[0].float().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_step_gradients_and_batch_first():
    ref, fast = make_pair(I, H, 2, batch_first=True, backend="auto")
    x = torch.randn(3, I, dtype=torch.float64, requires_grad=True)
    y_ref, _ = ref(x[:, None])
    y, _ = fast.step(x)
    torch.testing.assert_close(y, y_ref[:, 0], **TOL)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(gx, gx_ref, **TOL)


@pytest.mark.parametrize("proj", [0, 3])
def test_repeated_steps_from_zero_state_then_bad_steps(proj):
    """Steps of one kind after the first skip the checks they passed: the same numbers, and bad steps still fail."""
    ref, fast = make_pair(I, H, 2, proj_size=proj, batch_first=True, backend="auto")
    x = torch.randn(2, I, dtype=torch.float64)
    y_ref, (h_ref, c_ref) = ref(x[:, None])
    for _ in range(3):
        y, (h, c) = fast.step(x)
        for got, expected in ((y, y_ref[:, 0]), (h, h_ref), (c, c_ref)):
            torch.testing.assert_close(got, expected, **TOL)
    with pytest.raises(RuntimeError, match="input.size"):
        fast.step(torch.randn(2, I + 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="Expected hidden"):
        fast.step(x, (torch.zeros(2, 3, proj or H, dtype=torch.float64), torch.zeros(2, 3, H, dtype=torch.float64)))
    with pytest.raises(ValueError) as expected:  # the wording depends on the torch release
        ref(x[:, None].float())
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        fast.step(x.float())


@pytest.mark.parametrize("batched", [True, False])
def test_step_under_autocast_gives_nn_lstm_dtypes(batched):
    ref, fast = make_pair(I, H, 2, batch_first=True, backend="auto", dtype=torch.float32)
    x = torch.randn(2, I) if batched else torch.randn(I)
    y_ref, (h_ref, c_ref) = nn_lstm_under_cpu_autocast(lambda: ref(x[:, None] if batched else x[None]))
    with torch.autocast("cpu", torch.bfloat16):
        y, (h, c) = fast.step(x)
        _, (h2, c2) = fast.step(x, (h, c))  # the state it returned goes back in
    for got, expected in ((y, y_ref[:, 0] if batched else y_ref[0]), (h, h_ref), (c, c_ref)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1e-2)
    assert h2.shape == h.shape and c2.shape == c.shape


def test_step_rejects_bidirectional_and_bad_input():
    with pytest.raises(ValueError, match="unidirectional"):
        fastlstm.LSTM(I, H, bidirectional=True).step(torch.randn(2, I))
    with pytest.raises(ValueError, match="Expected input to be 1D .* got 3D$"):
        fastlstm.LSTM(I, H).step(torch.randn(1, 2, I))
    with pytest.raises(ValueError, match="got a PackedSequence$"):
        fastlstm.LSTM(I, H).step(pack_sequence([torch.randn(2, I)]))
    with pytest.raises(RuntimeError, match="input.size"):
        fastlstm.LSTM(I, H).step(torch.randn(2, I + 1))
    with pytest.raises(RuntimeError, match="Expected hidden"):
        fastlstm.LSTM(I, H).step(torch.randn(2, I), (torch.zeros(1, 3, H), torch.zeros(1, 3, H)))


@pytest.mark.parametrize("backend", ["auto", "native", "reference"])
def test_step_says_what_state_it_takes(backend):
    """In step's terms: forward's messages spoke of a "batched 3-D input" where the caller passed a 2-D x_t, and a
    state of one tensor, or one of None, raised IndexError or AttributeError from inside."""
    m = fastlstm.LSTM(I, H, 2, backend=backend)
    x, h, c = torch.randn(3, I), torch.zeros(2, 3, H), torch.zeros(2, 3, H)
    for state, what in (((h,), "a tuple of 1 \\(Tensor\\)"), ((h, None), "a tuple of 2 \\(Tensor, NoneType\\)"),
                        (h, "a Tensor"), ((h, c, c), "a tuple of 3")):  # fmt: skip
        with pytest.raises(TypeError, match=f"state must be None or \\(h, c\\), two tensors; got {what}"):
            m.step(x, state)
    with pytest.raises(ValueError, match=re.escape("for a batched 2D input the state is (h [num_layers, batch, ")):
        m.step(x, (h[:, 0], c[:, 0]))
    with pytest.raises(ValueError, match=re.escape("for an unbatched 1D input the state is (h [num_layers, proj")):
        m.step(x[0], (h, c))
    y, (h1, c1) = m.step(x, [h, c])  # a list, as forward takes it
    assert y.shape == (3, H) and h1.shape == c1.shape == (2, 3, H)


def _outcome(call, *args):
    """("ran", call(*args)) or ("raised", its exception's type and first line): nn.LSTM's answer to sparse tensors
    is one or the other."""
    try:
        return "ran", call(*args)
    except (RuntimeError, NotImplementedError) as e:
        return "raised", type(e), str(e).splitlines()[0]


def _packed_call_of(module, x, state, lengths):
    """nn.LSTM's call on the padded batch x [T, B, I] packed by lengths, padded back to T steps."""
    y, state = module(pack_padded_sequence(x, lengths, enforce_sorted=False), state)
    return pad_packed_sequence(y, total_length=x.size(0))[0], state


def _one_step_of(module, x_t, state):
    """nn.LSTM's call on the 1-step sequence of x_t [B, I], as step's output [B, P] and state."""
    y, state = module(x_t.unsqueeze(0), state)
    return y[0], state


def _assert_same_outcome(got, expected):
    assert got[0] == expected[0], (got, expected)
    if got[0] == "raised":
        assert got == expected
        return
    (y, (h, c)), (y_ref, (h_ref, c_ref)) = got[1], expected[1]
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", ["auto", "native", "cpp"])
def test_sparse_tensors_get_nn_lstms_answer(backend):
    """A sparse input, h0 or c0, in forward or step, after a dense call of the same shapes (whose plan is
    remembered): nn.LSTM's own answer (torch 2.13: a sparse h0 runs, a sparse input or c0 raises). A sparse h0 had
    reached the C++ op (NotImplementedError for SparseCPU) and step had given a dense result on one backend."""
    if backend == "cpp" and backends.get("cpp").unavailable_reason() is not None:
        pytest.skip("the C++ backend is not built here")
    ref, m = make_pair(I, H, 1, backend=backend)
    x, h, c = torch.randn(5, 3, I, dtype=torch.float64), torch.rand(1, 3, H).double(), torch.rand(1, 3, H).double()
    m(x, (h, c))
    m.step(x[0], (h, c))
    lengths = [5, 2, 4]
    m(x, (h, c), lengths=lengths)
    for xs, hs, cs in ((x, h.to_sparse(), c), (x, h, c.to_sparse()), (x.to_sparse(), h, c)):
        _assert_same_outcome(_outcome(m, xs, (hs, cs)), _outcome(ref, xs, (hs, cs)))
        x_t = xs.to_dense()[0].to_sparse() if xs.is_sparse else xs[0]
        _assert_same_outcome(_outcome(m.step, x_t, (hs, cs)), _outcome(_one_step_of, ref, x_t, (hs, cs)))
        if not xs.is_sparse:  # lengths= as packing gives it (a sparse h0 had left the lengths behind)
            got = _outcome(lambda *a: m(*a, lengths=lengths), xs, (hs, cs))
            _assert_same_outcome(got, _outcome(_packed_call_of, ref, xs, (hs, cs), lengths))


def test_step_state_of_another_dtype_in_a_list_is_forwards_as_in_a_tuple():
    """A c of another dtype: nn.LSTM's outcome on the 1-step sequence (oneDNN raises; ATen's cells promote),
    whether the state comes as a tuple or a list (a list had skipped forward and run in ATen's cells, which
    promote, where nn.LSTM's call raised)."""
    ref, m = make_pair(I, H, 1, backend="auto", dtype=torch.float32)
    x, h, c = torch.randn(3, I), torch.zeros(1, 3, H), torch.zeros(1, 3, H, dtype=torch.float64)
    expected = _outcome(_one_step_of, ref, x, (h, c))
    _assert_same_outcome(_outcome(m.step, x, (h, c)), expected)
    _assert_same_outcome(_outcome(m.step, x, [h, c]), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_cuda_packed_and_lengths_calls_never_wait_for_the_gpu(backend):
    """The row indices a packed or lengths= call derives on the CPU reach the GPU from pinned memory: a copy from
    pageable memory waited for the GPU to finish everything queued (a code audit counted one to four a call).
    Training calls with dropout between layers, once each to build and plan, then with torch's sync check raising."""
    torch.manual_seed(0)
    m = fastlstm.LSTM(I, H, num_layers=2, bidirectional=True, dropout=0.5, backend=backend).cuda()
    lengths = [3, 7, 1, 4]
    x = torch.randn(7, 4, I, device="cuda")
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)

    def calls():
        y, (h, c) = m(packed)
        (y.data.sum() + h.sum() + c.sum()).backward()
        y, (h, c) = m(x, lengths=lengths)
        (y.sum() + h.sum() + c.sum()).backward()

    calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
