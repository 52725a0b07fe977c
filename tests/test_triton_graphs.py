"""The step kernel's inference loop replayed as a CUDA graph (fastlstm/backends/triton/graphs.py).

Without a GPU the graph machinery runs on CPU tensors under the interpreter with `capture` replaced by a
recorder whose "replay" runs the recorded loop again over the kept buffers. So everything but the CUDA capture
itself is checked here: that each call's inputs reach the buffers the loop reads, that results are copied
out (a later call does not change an earlier result), that weights updated in place are read afresh, the
warm-up, the eviction, and the fallback when a capture fails. The cuda-marked tests capture for real.
"""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import interpreter_has_float64, require_triton  # noqa: E402

require_triton()
if not torch.cuda.is_available() and not interpreter_has_float64():
    pytest.skip("these tests run float64 under the interpreter: triton 3.5+", allow_module_level=True)

from fastlstm.backends.triton import graphs  # noqa: E402
from fastlstm.backends.triton import ops as triton_ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.float32 if HAS_CUDA else torch.float64


KERNEL_NAMES = ("fwd_step_kernel", "fwd_proj_kernel", "bwd_step_kernel", "bwd_dh_kernel", "bwd_proj_cell_kernel")


class Recorder:
    """Stands in for the CUDA capture as a graph behaves: while the loop is captured, its kernel launches and the
    torch ops that write (copy_) are recorded with their arguments, not run, and a replay issues exactly those
    again; so an index, a pointer or a tensor baked into a graph is what a replay uses, as on a GPU. Every tensor
    a captured launch or op touches must be one of the captured configuration's window buffers (`foreign` lists
    those that are not), and nothing else may run inside a capture (`unexpected`: an allocation, say)."""

    def __init__(self, fail: bool = False):
        self.captures = 0
        self.fail = fail
        self.window = None  # the buffers of the configuration whose chunk runs now (set by the fixture)
        self.foreign: list[tuple] = []
        self.unexpected: list[str] = []

    def __call__(self, loop):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        recorded = []
        with _Recording(recorded, self.unexpected):
            loop()
        own = _storages(self.window)
        for issue, args, kwargs in recorded:
            if not _storages([*args, *kwargs.values()]) <= own:
                self.foreign.append(issue)

        def replay():
            for issue, args, kwargs in recorded:
                issue(*args, **kwargs)

        return replay


def _storages(values) -> set[int]:
    return {v.untyped_storage().data_ptr() for v in values if isinstance(v, torch.Tensor) and v.numel()}


class _Recording(torch.overrides.TorchFunctionMode):
    """Kernel launches and in-place torch ops recorded into `recorded` as (what issues it, args, kwargs)."""

    def __init__(self, recorded: list, unexpected: list):
        super().__init__()
        self.recorded, self.unexpected = recorded, unexpected

    def __enter__(self):
        from fastlstm.backends.triton import kernels

        self.kernels, self.real = kernels, {name: getattr(kernels, name) for name in KERNEL_NAMES}
        for name, kernel in self.real.items():
            setattr(kernels, name, _RecordedKernel(kernel, self.recorded))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, kernel in self.real.items():
            setattr(self.kernels, name, kernel)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "copy_":
            self.recorded.append((func, args, kwargs))
            return args[0]
        if name not in ("__getitem__", "__get__", "shape", "dtype", "device", "numel", "element_size", "data_ptr"):
            self.unexpected.append(name)
        return func(*args, **kwargs)


class _RecordedKernel:
    def __init__(self, kernel, recorded: list):
        self.kernel, self.recorded = kernel, recorded

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: self.recorded.append((launch, args, kwargs))


@pytest.fixture
def recorder(monkeypatch):
    graphs.clear()
    rec = Recorder()
    if not HAS_CUDA:
        monkeypatch.setattr(graphs, "DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(graphs, "capture", rec)
        real_run_chunk = graphs._run_chunk

        def run_chunk(kept, *args, **kwargs):
            rec.window = kept.buffers
            return real_run_chunk(kept, *args, **kwargs)

        monkeypatch.setattr(graphs, "_run_chunk", run_chunk)
    else:  # real captures, counted: the tests' counts of them hold on a GPU as under the stand-in
        real_capture = graphs.capture

        def counted_capture(loop):
            rec.captures += 1
            return real_capture(loop)

        monkeypatch.setattr(graphs, "capture", counted_capture)
    monkeypatch.setattr(graphs, "_disabled_reason", None)
    monkeypatch.delenv(graphs.ENV, raising=False)
    yield rec
    graphs.clear()
    assert not rec.foreign, f"captured launches or ops took tensors outside their window: {rec.foreign}"
    assert not rec.unexpected, f"ran inside a capture: {sorted(set(rec.unexpected))}"


def _inputs(T, B, I, H, proj=0, bias=True, seed=0, dtype=DTYPE, weight_scale=0.4):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=weight_scale):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)

    P = proj or H
    return dict(
        x=rnd(T, B, I, scale=1.0),
        h0=rnd(B, P, scale=1.0),
        c0=rnd(B, H, scale=1.0),
        w_ih=rnd(4 * H, I),
        w_hh=rnd(4 * H, P),
        b=rnd(4 * H) if bias else None,
        w_hr=rnd(P, H) if proj else None,
    )


def _plain(t: dict, reverse: bool):
    """The same call through the op's loop, launch by launch."""
    y, hT, cT, *_ = triton_ops.forward_impl(*t.values(), None, reverse, "step", graph=False)
    return y, hT, cT


def _graphed(t: dict, reverse: bool):
    with torch.no_grad():
        return triton_ops.layer(*t.values(), None, reverse, "step")


CONFIGS = [
    pytest.param(dict(T=4, B=3, I=5, H=7), False, id="T4-B3-H7"),
    pytest.param(dict(T=3, B=2, I=4, H=6, proj=3), True, id="T3-B2-H6-proj3-rev"),
    pytest.param(dict(T=5, B=1, I=3, H=5, bias=False), True, id="T5-B1-H5-nobias-rev"),
]


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("sizes, reverse", CONFIGS)
def test_every_call_matches_the_plain_loop(sizes, reverse, recorder):
    """Calls 1 (warm-up), 2 (capture) and 3-4 (replays) with fresh inputs each, a weight updated in place
    before the last: each equals the plain loop on its own inputs, and earlier results stay as they were."""
    lengths = set(graphs.chunks(sizes["T"], graphs.MIN_CHUNK))  # T=5: 4 and 1
    results, expected = [], []
    for call in range(4):
        if call < 3:
            t = _inputs(**sizes, seed=call)
        else:
            with torch.no_grad():  # call 2's tensors, one weight changed in place
                t["w_hh"].mul_(1.5)
        results.append(_graphed(t, reverse))
        expected.append(_plain(t, reverse))
        assert recorder.captures == (0 if call == 0 else len(lengths))
    for got, want in zip(results, expected):
        _assert_same(got, want)
    assert len(graphs._graphs) == 1
    assert set(next(iter(graphs._graphs.values())).replays) == lengths


@pytest.fixture
def short_windows(monkeypatch):
    """Windows of 2 to 4 steps, so that short calls span several chunks."""
    monkeypatch.setattr(graphs, "MIN_CHUNK", 2)
    monkeypatch.setattr(graphs, "MAX_CHUNK", 4)


# Calls longer than a window of 4 steps (short_windows): several chunks, the last ones shorter
ACROSS_CHUNKS = [
    pytest.param(dict(T=11, B=2, I=3, H=5), False, id="T11-forward"),
    pytest.param(dict(T=11, B=3, I=2, H=4), True, id="T11-reverse"),
    pytest.param(dict(T=7, B=2, I=3, H=6, proj=3), True, id="T7-proj3-reverse"),
    pytest.param(dict(T=8, B=1, I=3, H=4, proj=2, bias=False), False, id="T8-proj2-nobias"),
]


@pytest.mark.parametrize("sizes, reverse", ACROSS_CHUNKS)
def test_calls_longer_than_the_window_carry_the_state_across_chunks(sizes, reverse, recorder, short_windows):
    """A call of 11 steps in a window of 4 runs as chunks of 4, 4, 2 and 1, each replayed over the same buffers
    with the state carried between them (forward from the first step, reverse from the last): the plain loop's
    numbers, bit for bit, on the first (launch by launch) call and on the replays."""
    assert graphs.chunks(11, 4) == [4, 4, 2, 1] and graphs.chunks(8, 4) == [4, 4] and graphs.chunks(3, 4) == [2, 1]
    for call in range(3):
        t = _inputs(**sizes, seed=call)
        _assert_same(_graphed(t, reverse), _plain(t, reverse))
    kept = next(iter(graphs._graphs.values()))
    assert kept.window == 4 and set(kept.replays) == set(graphs.chunks(sizes["T"], 4))
    assert recorder.captures == len(kept.replays)


def test_chunks_launch_on_the_windows_aligned_buffers(recorder, short_windows, monkeypatch):
    """A reverse chunk shorter than the window runs the window's last steps. Launched on views of those rows, its
    kernels got pointers off the 16-byte alignment triton specialises on (here c's slot 3 of B3 x H5 float64:
    byte 360), which would compile the kernels again inside the capture: every pointer a chunk's kernels get is
    aligned."""
    from fastlstm.backends.triton import kernels

    pointers = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                pointers.extend(a.data_ptr() for a in args if isinstance(a, torch.Tensor))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name in ("fwd_step_kernel", "fwd_proj_kernel"):
        monkeypatch.setattr(kernels, name, Recording(getattr(kernels, name)))
    for sizes in (dict(T=7, B=3, I=2, H=5), dict(T=7, B=3, I=2, H=5, proj=3)):
        for call in range(2):  # launch by launch, then captured
            t = _inputs(**sizes, seed=call)
            _assert_same(_graphed(t, True), _plain(t, True))
    assert pointers and all(p % 16 == 0 for p in pointers), sorted({p % 16 for p in pointers})


def test_calls_of_any_length_share_one_configuration(recorder, short_windows):
    """Lengths 1 to 12 in a shuffled stream: one configuration, whose window grows to 4 steps once, and a graph
    per chunk length (1, 2 and 4) captured once per window: whole-call graphs would be captured per length."""
    sizes = dict(B=2, I=3, H=4)
    order = [3, 1, 12, 5, 2, 9, 7, 1, 11, 4, 6, 10, 8, 12, 3]
    for call, T in enumerate(order):
        t = _inputs(T=T, **sizes, seed=call)
        _assert_same(_graphed(t, False), _plain(t, False))
    assert len(graphs._graphs) == 1
    kept = next(iter(graphs._graphs.values()))
    assert kept.window == 4 and set(kept.replays) == {1, 2, 4}
    # window 4 from the first call (3 steps), so nothing was captured twice
    assert recorder.captures == 3


def test_a_window_grows_for_longer_calls_and_keeps_its_warm_up(recorder, short_windows):
    """A configuration first met with a short call gets a short window; a longer call grows it (new buffers, its
    graphs captured anew) without another uncaptured warm-up call."""
    sizes = dict(B=2, I=3, H=4)
    for T in (1, 1):  # window 2: warm-up, then the 1-step graph
        _graphed(_inputs(T=T, **sizes), False)
    assert next(iter(graphs._graphs.values())).window == 2 and recorder.captures == 1
    t = _inputs(T=7, **sizes, seed=3)
    _assert_same(_graphed(t, False), _plain(t, False))
    kept = next(iter(graphs._graphs.values()))
    assert len(graphs._graphs) == 1 and kept.window == 4
    assert set(kept.replays) == {4, 2, 1} and recorder.captures == 4


def test_inference_mode_and_no_grad_share_a_configuration(recorder):
    """Buffers made under torch.inference_mode are inference tensors, which may not be written outside it: a
    configuration first met there must still serve no_grad calls, and the other way round."""
    sizes = dict(T=3, B=2, I=3, H=4)
    for call, mode in enumerate([torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad]):
        t = _inputs(**sizes, seed=call)
        with mode():
            got = triton_ops.layer(*t.values(), None, False, "step")
        for g, w in zip(got, _plain(t, False)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_calls_that_are_not_graphed(recorder):
    t = _inputs(T=3, B=2, I=3, H=4)
    x, w_hh = t["x"], t["w_hh"]
    assert graphs.applies(x, w_hh, None, None, "step")
    assert not graphs.applies(x, w_hh, None, torch.tensor([2, 2, 1]), "step")  # packed
    assert not graphs.applies(x, w_hh, None, None, "sequence")  # one launch already
    os.environ[graphs.ENV] = "0"
    try:
        assert not graphs.applies(x, w_hh, None, None, "step")
    finally:
        del os.environ[graphs.ENV]
    # Through the layer: a call needing gradients keeps its autograd graph, its loop graphed as training's
    leaves = {k: (v.requires_grad_(True) if v is not None else None) for k, v in t.items()}
    y, _, _ = triton_ops.layer(*leaves.values(), None, False, "step")
    assert y.requires_grad and [key[0] for key in graphs._graphs] == ["forward"]


def test_the_ops_themselves_never_graph(recorder):
    """A traced program calls the ops, and CUDA graph trees (torch.compile's mode="reduce-overhead") allocate its
    warm-up's memory from a private pool that would hand a kept window to their outputs: the ops run launch by
    launch, forward and backward; the eager layer's autograd (the same kernels) graphs."""
    t = _inputs(T=5, B=2, I=3, H=4)
    leaves = [v.requires_grad_(True) for v in t.values() if v is not None]
    for _ in range(3):
        y, hT, cT, *_ = torch.ops.fastlstm.triton_forward(*t.values(), None, False, "step")
        torch.autograd.grad((y.sum(), hT.sum(), cT.sum()), leaves)
    assert not graphs._graphs and recorder.captures == 0
    for _ in range(3):
        y, hT, cT = triton_ops.layer(*t.values(), None, False, "step")
        torch.autograd.grad((y.sum(), hT.sum(), cT.sum()), leaves)
    assert sorted(key[0] for key in graphs._graphs) == ["backward", "forward"] and recorder.captures


def test_compiled_autograd_traces_the_ops_not_the_graphs(recorder, monkeypatch):
    """Compiled autograd traces the eager layer's backward: it then takes the ops, as any compiled program, and
    never asks for graphs while tracing (it had traced into graphs.py's backward and failed); the gradients are
    eager's."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    enable = getattr(compiled_autograd, "_enable", None)
    if enable is None:
        pytest.skip("this torch has no compiled_autograd._enable")
    asked, real_applies = [], graphs.applies

    def applies(*args, **kwargs):
        asked.append(torch.compiler.is_compiling())
        return real_applies(*args, **kwargs)

    monkeypatch.setattr(graphs, "applies", applies)
    t = _inputs(T=3, B=2, I=3, H=4)
    leaves = [v.requires_grad_(True) for v in t.values() if v is not None]
    grads = []
    for compiled in (False, True):
        y, hT, cT = triton_ops.layer(*t.values(), None, False, "step")
        context = enable(torch.compile(backend="eager")) if compiled else contextlib.nullcontext()
        with context:
            (y.sum() + 2 * hT.sum() + 3 * cT.sum()).backward()
        grads.append([leaf.grad.clone() for leaf in leaves])
        for leaf in leaves:
            leaf.grad = None
    assert asked and True not in asked
    _assert_same(*grads)


def test_no_memory_for_a_window_keeps_the_window_there_is(recorder, short_windows, monkeypatch):
    """A window is memory the launch-by-launch loop does not need. Where the GPU has none left for a new one, the
    call runs as it did without graphs (inference and training alike); for a larger one, the kept window serves
    it in more chunks. Either way the configuration is not tried again (each failure flushes torch's allocator)."""
    sizes = dict(B=2, I=3, H=4)
    _graphed(_inputs(T=2, **sizes, seed=9), False)  # a window of 2 steps
    real_window, attempts = graphs._window_buffers, []

    def out_of_memory(kind, W, B, H, P, dtype, device, has_proj):
        if device.type == "meta":  # sizes counted, nothing allocated
            return real_window(kind, W, B, H, P, dtype, device, has_proj)
        attempts.append((kind, W))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(graphs, "_window_buffers", out_of_memory)
    for seed in range(3):
        t = _inputs(T=7, **sizes, seed=seed)
        _assert_same(_graphed(t, True), _plain(t, True))  # a new configuration (reverse): no window
        _assert_same(_graphed(t, False), _plain(t, False))  # 4 steps would not fit: chunks of 2
        for graphed, plain in _training_both_ways(t, reverse=False, seed=seed):
            _assert_same(graphed, plain)
    assert sorted(attempts) == [("backward", 4), ("forward", 4), ("inference", 4), ("inference", 4)]
    assert [(key[0], key[8], kept.window) for key, kept in graphs._graphs.items()] == [("inference", False, 2)]
    graphs.clear()
    _graphed(_inputs(T=7, **sizes), True)
    assert len(attempts) == 5  # tried again after clear()


def test_least_recently_used_configurations_are_dropped(recorder, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    for B in (2, 3, 2, 4):  # B=3 is the least recently used when B=4 arrives
        _graphed(_inputs(T=3, B=B, I=3, H=4), False)
    kept = sorted(key[4] for key in graphs._graphs)
    assert kept == [2, 4]


def test_kept_buffers_stay_within_their_memory_budget(recorder, monkeypatch):
    """A window is as long as the calls need, within MAX_BYTES_ONE; a configuration where even MIN_CHUNK steps
    do not fit runs launch by launch; the kept configurations together hold MAX_BYTES at most."""
    monkeypatch.setattr(graphs, "MIN_CHUNK", 2)
    sizes = dict(I=3, H=4, proj=3)
    _graphed(_inputs(T=3, B=2, **sizes), False)
    kept = next(iter(graphs._graphs.values()))
    assert kept.window == 4 and kept.nbytes == graphs.window_bytes("inference", 4, 2, 4, 3, DTYPE, True)
    one = graphs.window_bytes("inference", 4, 3, 4, 3, DTYPE, True)
    monkeypatch.setattr(graphs, "MAX_BYTES_ONE", one)
    monkeypatch.setattr(graphs, "MAX_BYTES", one + kept.nbytes + 1)
    t = _inputs(T=20, B=3, **sizes)
    _assert_same(_graphed(t, False), _plain(t, False))  # in chunks of 4: 8 would not fit
    assert [g.window for g in graphs._graphs.values()] == [4, 4]
    _graphed(_inputs(T=3, B=1, **sizes), False)  # three no longer fit: B=2 (least recently used) goes
    assert sorted(key[4] for key in graphs._graphs) == [1, 3]
    assert sum(g.nbytes for g in graphs._graphs.values()) <= graphs.MAX_BYTES
    big = _inputs(T=3, B=8, **sizes)
    assert graphs.largest_window("inference", 8, 4, 3, DTYPE, True) == 0
    assert not graphs.applies(big["x"], big["w_hh"], big["w_hr"], None, "step")  # 2 steps over MAX_BYTES_ONE
    _graphed(big, False)
    assert sorted(key[4] for key in graphs._graphs) == [1, 3]


def test_a_failing_capture_warns_once_and_the_loop_runs_plainly(recorder, monkeypatch):
    if HAS_CUDA:
        monkeypatch.setattr(graphs, "DEVICES", ("cuda",))
    failing = Recorder(fail=True)
    monkeypatch.setattr(graphs, "capture", failing)
    sizes = dict(T=3, B=2, I=3, H=4)
    _graphed(_inputs(**sizes, seed=0), False)  # warm-up: nothing captured yet
    t = _inputs(**sizes, seed=1)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        got = _graphed(t, False)
    for g, w in zip(got, _plain(t, False)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert failing.captures == 1
    assert not graphs.applies(t["x"], t["w_hh"], None, None, "step")  # off for the rest of the process
    assert not graphs._graphs


def test_graphed_calls_are_checked_as_launch_by_launch_ones(recorder, monkeypatch):
    """Every graphed call passes the launch check (a configuration whose build crashed a child raises before
    anything compiles, whatever changed since the call was planned) and the shape checks: an h0 of one row for a
    batch of three is refused, not broadcast into the kept buffers."""
    from fastlstm.backends.triton import build_guard

    launches = []
    monkeypatch.setattr(build_guard, "check_launch", lambda *args: launches.append(args[-2:]))
    t = _inputs(T=3, B=3, I=4, H=5)
    for _ in range(3):  # warm-up, capture (chunks of 2 and 1), replay
        _graphed(t, False)
    assert launches == [(False, "step")] * 3 and recorder.captures == 2
    with pytest.raises(RuntimeError, match=r"h0 must be \[3, 5\], got \[1, 5\]"):
        _graphed({**t, "h0": t["h0"][:1]}, False)


@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
def test_the_self_test_keeps_off_the_graphs(needs_grad, recorder, monkeypatch):
    """The self-test's two-step calls run launch by launch: their buffers would take a kept configuration's place."""
    from helpers import small_layer_call

    monkeypatch.setattr(triton_ops, "_SELF_TESTS", {})
    monkeypatch.setattr(graphs, "MIN_CHUNK", 1)
    for _ in range(3):  # what would warm up, capture and replay a graph
        call = small_layer_call("cpu", dtype=DTYPE, needs_grad=needs_grad)
        assert triton_ops._run_self_test(call, "step") is None
    assert not graphs._graphs and recorder.captures == 0
    assert graphs._kept_off == 0


def test_threads_sharing_a_configuration_get_their_own_results(recorder):
    """Calls from several threads on one configuration (one set of kept buffers) each get their own numbers."""
    from helpers import assert_threads_get_lone_results

    sizes = dict(T=4, B=2, I=3, H=5)
    inputs = [_inputs(**sizes, seed=k) for k in range(6)]
    for t in inputs:  # one at a time (the first captures, the rest replay): the launch-by-launch numbers
        for g, w in zip(_graphed(t, False), _plain(t, False), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert_threads_get_lone_results(lambda t: _graphed(t, False), inputs, threads=len(inputs), repeats=3)
    assert len(graphs._graphs) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("proj", [0, 64], ids=["dense", "proj64"])
def test_cuda_graph_replays_a_stream_of_calls(dtype, proj):
    """A real capture: calls of two configurations (forward, reverse), each against the launch-by-launch inference
    loop bit for bit, and against the loop that saves the gates for training: bit for bit in float32, within a
    rounding's reach in half precision where the weights keep it from growing. On an H200 the graphed calls
    differed from that training loop in float16 (up to 8.8 in y with a projection, these weights 0.4 a weight)
    and bfloat16 (a few elements by a step): another kernel (SAVE_ACTS) and, then, another GEMM call for the input
    projection (ops.project_inputs now serves both loops). Which of the two it was is not known."""
    graphs.clear()
    sizes = dict(T=16, B=8, I=32, H=320, proj=proj)
    for call, T in enumerate([16, 37, 16, 300, 37]):  # 37 and 300: several chunks, the state carried between
        t = _inputs(**{**sizes, "T": T}, seed=call, dtype=dtype)
        got = _graphed(t, reverse=call % 2 == 1)
        with torch.no_grad():
            want = triton_ops.forward_impl(*t.values(), None, call % 2 == 1, "step", save_acts=False)[:3]
        if dtype == torch.float32:
            for g, w in zip(got, _plain(t, reverse=call % 2 == 1)):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert graphs._disabled_reason is None and graphs._graphs  # a failed capture runs the loop plainly: same numbers
    assert all(kept.replays for kept in graphs._graphs.values())
    if dtype != torch.float32:
        # Weights small enough that a step's rounding does not grow from step to step: the training loop within
        # a few of the dtype's rounding steps
        t = _inputs(**sizes, seed=5, dtype=dtype, weight_scale=0.05)
        tol = 1e-2 if dtype == torch.float16 else 4e-2
        for g, w in zip(_graphed(t, reverse=False), _plain(t, reverse=False)):
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)
    graphs.clear()


def _grads_of(t: dict, T: int, B: int, seed: int):
    """Gradients reaching y, hT and cT of a layer with `t`'s sizes, device and dtype."""
    gen = torch.Generator().manual_seed(100 + seed)
    P, H = t["w_hh"].shape[1], t["w_hh"].shape[0] // 4
    like = t["w_hh"]
    return [(torch.randn(*shape, generator=gen, dtype=torch.float64)).to(like.device, like.dtype)
            for shape in ((T, B, P), (B, P), (B, H))]  # fmt: skip


def _training_both_ways(t: dict, reverse: bool, seed: int):
    """Training's forward op and backward rows through graphs and launch by launch: [(graphed, plain)] of each."""
    args = (*t.values(), None, reverse, "step")
    forward = triton_ops.forward_impl(*args), triton_ops.forward_impl(*args, graph=False)
    _, _, _, acts, hs, cs, r = forward[1]
    T, B = t["x"].shape[:2]
    grads = _grads_of(t, T, B, seed)
    saved = (t["x"], t["w_ih"], t["w_hh"], t["w_hr"], None, acts, hs, cs, r, reverse, "step")
    backward = tuple(triton_ops.backward_rows_impl(*grads, *saved, graph=graph) for graph in (True, False))
    return [forward, backward]


@pytest.mark.parametrize("sizes, reverse", ACROSS_CHUNKS)
def test_training_loops_through_graphs_match_the_plain_loops(sizes, reverse, recorder, short_windows):
    """Training's forward (which saves the gates, states and r for backward) and backward (dgates, dhy and the
    carries dh, dc through every chunk of a window of 4, the first chunk starting from no later step) through
    graphs: every output of each op, bit for bit what the launch-by-launch loops give, on the first call (launch by
    launch over the window) and on the captured and replayed ones."""
    for call in range(3):
        for graphed, plain in _training_both_ways(_inputs(**sizes, seed=call), reverse, call):
            _assert_same(graphed, plain)
    kinds = {key[0]: kept for key, kept in graphs._graphs.items()}
    assert sorted(kinds) == ["backward", "forward"]
    lengths = graphs.chunks(sizes["T"], 4)
    assert set(kinds["forward"].replays) == set(lengths)
    assert set(kinds["backward"].replays) == {(k, index == 0) for index, k in enumerate(lengths)}


def test_a_model_trains_through_graphs_as_launch_by_launch(recorder, short_windows, monkeypatch):
    """fastlstm.LSTM on the triton backend, two bidirectional layers with a projection, three training steps of
    varying lengths, through the step kernel: outputs and every gradient bit for bit those with graphs off."""
    import fastlstm

    monkeypatch.setenv(triton_ops.ENV_KERNEL, "step")

    def run(graphs_on: bool):
        monkeypatch.setenv(graphs.ENV, "1" if graphs_on else "0")
        torch.manual_seed(0)
        m = fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, backend="triton").to(DEVICE, DTYPE)
        results = []
        for step, T in enumerate((6, 9, 6)):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(T, 2, 3, generator=gen, dtype=torch.float64).to(DEVICE, DTYPE)
            y, (h, c) = m(x)
            (y.pow(2).sum() + h.sum() + c.pow(2).sum()).backward()
            results += [y.detach(), h.detach(), c.detach(), *(p.grad.clone() for p in m.parameters())]
            m.zero_grad()
        return results

    graphed = run(True)
    assert {key[0] for key in graphs._graphs} == {"forward", "backward"} and recorder.captures
    _assert_same(graphed, run(False))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("proj", [0, 64], ids=["dense", "proj64"])
def test_cuda_training_graphs_replay_the_plain_loops(dtype, proj):
    """Real captures of training's loops: forward (gates, states, r saved) and backward (dgates, dhy, dh0, dc0)
    over calls of 16, 37 and 300 steps (several chunks, the window growing), forward and reverse, each bit for bit
    the launch-by-launch loops' (the same kernels and the same input GEMM)."""
    graphs.clear()
    sizes = dict(B=8, I=32, H=320, proj=proj)
    for call, T in enumerate([16, 37, 16, 300, 37, 300]):
        t = _inputs(**{**sizes, "T": T}, seed=call, dtype=dtype)
        for graphed, plain in _training_both_ways(t, reverse=call % 2 == 1, seed=call):
            _assert_same(graphed, plain)
    assert graphs._disabled_reason is None
    assert {key[0] for key in graphs._graphs} == {"forward", "backward"}
    assert all(kept.replays for kept in graphs._graphs.values())
    graphs.clear()
