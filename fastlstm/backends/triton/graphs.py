"""The step kernel's time loops replayed as CUDA graphs of fixed-length chunks: inference, and training's forward
(which saves the gates) and backward.

The step kernel launches once per time step (twice with a projection), and so does its backward. From Python
each launch costs the host several microseconds (about 30 on an H200's host, triton 3.6), which at small batch is
longer than the kernel runs, so the GPU waits on the launcher. A CUDA graph of many steps launches them as one
unit.

Graphs are kept per configuration (which loop, sizes but the sequence length, flags, dtype, device, stream), over
a window of W steps' buffers (W a power of two). A call of T steps runs as chunks whose lengths are powers of two
up to W (T = 37, W = 16: 16, 16, 4, 1), each the replay of that length's graph, the state carried from one chunk
to the next inside the graph. So calls of any length share one configuration's graphs, at most log2(W) + 1 of them
(twice that for backward, whose first chunk starts from no later step): a stream of calls of varying lengths
captures a few graphs once, where graphs of whole calls, keyed by T, would be captured again and again; and a long
sequence is graphed in a bounded window.

How: the first call of a configuration runs its chunks as usual (that compiles the kernels, which must not
happen inside a capture); from the second call, a chunk length met for the first time is captured over the
window's buffers, then replayed. Each call copies into the window what the chunk reads (the input projection,
computed in one GEMM as the launch-by-launch loop does, so the numbers are that loop's, bit for bit; in backward
the output gradients and the forward's gates and cells) and out of it what the chunk wrote (outputs, and in
training what backward reads: gates, states, dgates), so a graph never holds a caller's tensor; and copies the
weights in, so a weight updated in place between calls is read afresh. The kernels get the window's buffers
whole, never a view of a chunk's rows (whose pointer may lose the alignment triton compiles for). Packed input
(whose per-step sizes would be baked into a graph), the sequence kernel (one launch already) and calls made while
the caller is capturing a graph of its own run the loop as usual. So do the torch.library ops themselves, which
a compiled program calls (ops.triton_forward): only eager calls replay graphs here.

The window grows with the calls, to MAX_CHUNK steps at most and to what fits MAX_BYTES_ONE; a configuration whose
window would hold fewer than MIN_CHUNK steps runs step by step (its steps are long enough that launching them one
by one keeps the GPU busy). The most recently used configurations are kept, at most MAX_GRAPHS of them holding
MAX_BYTES. Where the GPU has no memory for a window, a configuration keeps the window it has, or runs launch by
launch without one. FASTLSTM_TRITON_GRAPHS=0 turns graphs off. A capture that fails warns once and turns them
off for the process; the call that failed runs the loop as usual.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastlstm.backends import cell_state_as, outside_stacklevel
from fastlstm.backends.triton import ops

ENV = "FASTLSTM_TRITON_GRAPHS"
MAX_GRAPHS = 8
# Memory the kept buffers may hold, all configurations together, and one configuration at most (clear() frees
# them).
MAX_BYTES = 256 << 20
MAX_BYTES_ONE = MAX_BYTES // 4
# Steps one graph covers at most, and at least for a configuration to be graphed.
MAX_CHUNK = 128
MIN_CHUNK = 16
# Devices whose calls are graphed (tests add "cpu", with `capture` replaced by a stand-in that records the
# loop's launches and replays them).
DEVICES = ("cuda",)


_capture_lock = threading.Lock()
_capture_streams: dict[int, torch.cuda.Stream] = {}


def capture(loop: Callable[[], None]) -> Callable[[], None]:
    """Capture `loop`'s launches in a CUDA graph on the current device; returns what replays it."""
    graph = torch.cuda.CUDAGraph()
    # A side stream per device (torch.cuda.graph's default is one stream for all devices, made on whichever was
    # current first), one capture at a time on it. thread_local: another thread's unrelated CUDA work meanwhile, on
    # other streams, neither breaks the capture nor is caught in it. The stream comes from torch's pool, as
    # torch.cuda.graph's does: the pool hands out its streams in turn, so a program that makes more than 32 streams
    # of one priority on a device shares one with this, and work it queues there during a capture would be caught
    # in the graph, as it would in torch.cuda.graph's.
    # Captures are few (one per chunk length of a configuration). Not torch.cuda.graph itself: it
    # synchronizes the device and empties torch's caches of GPU and pinned memory at every capture (room for a
    # capture's own memory, which this loop hardly has), and when a capture fails its exit leaves the thread on
    # the capture stream. The captured launches do not run, so nothing needs waiting for.
    with _capture_lock:
        device = torch.cuda.current_device()
        if device not in _capture_streams:
            _capture_streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(_capture_streams[device]):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                loop()
            except BaseException:
                with contextlib.suppress(Exception):  # the loop's error says more than the broken capture's
                    graph.capture_end()
                raise
            graph.capture_end()
    return graph.replay


@dataclass
class _Graphs:
    """One configuration's window of buffers and the graphs captured over it, by chunk (its length, and for backward
    whether it is a call's first)."""

    buffers: ops.ForwardBuffers | ops.BackwardBuffers
    window: int
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    replays: dict[object, Callable[[], None]] = field(default_factory=dict)
    warmed: bool = False  # a call ran through, so the kernels are compiled


_graphs: collections.OrderedDict[tuple, _Graphs] = collections.OrderedDict()
_graphs_lock = threading.Lock()
_kept_off = 0  # kept_off() blocks running now
_disabled_reason: str | None = None
_largest: dict[tuple, int] = {}
# Configurations a window could not be allocated for: the most steps their window may hold now (0: none), so
# that an out-of-memory error is met once, not at every call (each costs the allocator a device-wide flush)
_window_caps: dict[tuple, int] = {}


def _stream_key(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _window_buffers(kind: str, W: int, B: int, H: int, P: int, dtype: torch.dtype, device: torch.device,
                    has_proj: bool) -> ops.ForwardBuffers | ops.BackwardBuffers:  # fmt: skip
    if kind == "backward":
        return ops.backward_buffers(W, B, H, P, dtype, device, has_proj)
    return ops.forward_buffers(W, B, H, P, dtype, device, has_proj, save_acts=kind == "forward")


def _nbytes(buffers) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in buffers}.values())


def window_bytes(kind: str, W: int, B: int, H: int, P: int, dtype: torch.dtype, has_proj: bool) -> int:
    """Bytes of a window of W steps' buffers for `kind`'s loop (counted on the meta device: nothing allocated)."""
    return _nbytes(_window_buffers(kind, W, B, H, P, dtype, torch.device("meta"), has_proj))


def largest_window(kind: str, B: int, H: int, P: int, dtype: torch.dtype, has_proj: bool) -> int:
    """The most steps (a power of two, MAX_CHUNK at most) a configuration's window may hold within MAX_BYTES_ONE;
    0 where even MIN_CHUNK steps do not fit."""
    key = (kind, B, H, P, dtype, has_proj, MAX_CHUNK, MIN_CHUNK, MAX_BYTES_ONE)
    if key not in _largest:
        window = MAX_CHUNK
        while window >= MIN_CHUNK and window_bytes(kind, window, B, H, P, dtype, has_proj) > MAX_BYTES_ONE:
            window //= 2
        _largest[key] = window if window >= MIN_CHUNK else 0
    return _largest[key]


def chunks(T: int, window: int) -> list[int]:
    """The chunk lengths a call of T steps runs as: whole windows, then the rest's powers of two, longest first."""
    whole, rest = divmod(T, window)
    return [window] * whole + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]


def applies(x: Tensor, w_hh: Tensor, w_hr: Tensor | None, batch_sizes: Tensor | None, kernel: str,
            kind: str = "inference") -> bool:  # fmt: skip
    """Whether a call of `kind`'s loop ("inference", or training's "forward" and "backward") runs through graphs."""
    if batch_sizes is not None or kernel != "step" or x.device.type not in DEVICES:
        return False
    if _disabled_reason is not None or os.environ.get(ENV, "1") == "0" or _kept_off:
        return False
    if not largest_window(kind, x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1], x.dtype, w_hr is not None):
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def kept_off():
    """No graphs while the block runs (the self-test's calls: their buffers would take a kept configuration's
    place). For every thread, not only this one: autograd runs a CUDA backward on a thread of its own. Other calls
    meanwhile run launch by launch, as they would without graphs."""
    global _kept_off
    with _graphs_lock:
        _kept_off += 1
    try:
        yield
    finally:
        with _graphs_lock:
            _kept_off -= 1


def _entry(key: tuple, window: int, make: Callable[[int], _Graphs]) -> _Graphs | None:
    """The kept graphs of `key` (now the most recently used), made anew with a window of `window` steps where the
    kept one is smaller. Where the GPU has no memory left for that window, the kept smaller one serves the call
    in more chunks, or without one, None: the call runs launch by launch, as it did before graphs took memory of
    their own; either way this configuration's window stays as it is from then on (until clear())."""
    with _graphs_lock:
        graphs = _graphs.get(key)
        if graphs is not None and graphs.window >= window:
            _graphs.move_to_end(key)
            return graphs
        try:
            grown = make(window)
        except torch.cuda.OutOfMemoryError:
            _window_caps[key] = 0 if graphs is None else graphs.window
            return graphs
        # A grown window's kernels are those of the smaller one (the window's length is no kernel argument)
        grown.warmed = graphs is not None and graphs.warmed
        _graphs.pop(key, None)
        _graphs[key] = grown
        while len(_graphs) > MAX_GRAPHS or sum(g.nbytes for g in _graphs.values()) > MAX_BYTES:
            _graphs.popitem(last=False)  # the newest one always fits: largest_window bounds it by MAX_BYTES_ONE
        return grown


def _graphs_for(kind: str, like: Tensor, T: int, B: int, H: int, P: int, has_proj: bool,
                reverse: bool) -> _Graphs | None:  # fmt: skip
    """The kept graphs of this configuration of `kind`'s loop, with a window for a call of T steps (None: no memory
    for it, see _entry)."""
    dtype, device = like.dtype, like.device
    key = (kind, device, _stream_key(device), dtype, B, H, P, has_proj, bool(reverse), ops._precision(dtype),
           os.environ.get(ops.ENV_CONFIG))  # fmt: skip
    window = min(largest_window(kind, B, H, P, dtype, has_proj), max(MIN_CHUNK, 1 << (T - 1).bit_length()))
    window = min(window, _window_caps.get(key, window))
    if not window:
        return None

    def make(window: int) -> _Graphs:
        # Normal tensors even when this call runs under torch.inference_mode: inference tensors may not be
        # written outside it, and later calls of this configuration may come from no_grad code.
        with torch.inference_mode(False):
            buffers = _window_buffers(kind, window, B, H, P, dtype, device, has_proj)
        return _Graphs(buffers=buffers, window=window, nbytes=_nbytes(buffers))

    return _entry(key, window, make)


def _call_steps(T: int, done: int, k: int, last_first: bool) -> slice:
    """The call's steps a chunk of k covers after `done` steps, the loop taking them last first or first first."""
    return slice(T - done - k, T - done) if last_first else slice(done, done + k)


def _chunk_rows(W: int, k: int, last_first: bool) -> slice:
    """The window's steps a chunk of k steps runs: its last k where the loop takes steps last first (starting
    from state slot W), else its first k, so that every chunk starts from the slot the one before left its state
    in."""
    return slice(W - k, W) if last_first else slice(0, k)


def _load_weights(window, w_hh: Tensor, w_hr: Tensor | None) -> None:
    window.w_hh.copy_(w_hh)
    if w_hr is not None:
        window.w_hr.copy_(w_hr)


@ops.on_input_device
def forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor | None,
            w_hr: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """y, hT, cT of one dense inference call through the step kernel (the caller checked `applies`)."""
    # as every launch's: a configuration whose build crashed a child raises here, before anything is compiled
    T, B, I, H, P, _ = ops.checked_sizes(x, h0, c0, w_ih, w_hh, b, w_hr, None, reverse, "step", save_acts=False)
    has_proj = w_hr is not None
    graphs = _graphs_for("inference", x, T, B, H, P, has_proj, reverse)
    if graphs is None:
        return ops.forward_impl(x, h0, c0, w_ih, w_hh, b, w_hr, None, reverse, "step", False, graph=False)[:3]
    xg = ops.project_inputs(x, w_ih, b)  # one GEMM, as the launch-by-launch loop's
    y = x.new_empty(T, B, P)
    win = graphs.buffers

    def keep(steps: slice, rows: slice, k: int) -> None:
        y[steps].copy_(win.y[rows])

    # Held until the results are copied out: the kept buffers serve one call at a time (calls on one stream
    # run in the order they were issued, so releasing after the copies are queued is enough).
    with graphs.lock:
        _forward_chunks(graphs, xg, h0, c0, w_hh, w_hr, reverse, keep)
        # every chunk ends by carrying its last state to the slot all start from
        first = graphs.window if reverse else 0
        hT, cT = win.hs[first].clone(), cell_state_as(win.cs[first], x.dtype)
    return y, hT, cT


def training_forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor | None,
                     w_hr: Tensor | None, reverse: bool):  # fmt: skip
    """ops.forward_impl's outputs for a dense training call through the step kernel, called by it on the input's
    device, sizes checked and `applies` asked for "forward": the gates, states and r of every step copied out of the
    window for backward."""
    T, B, _ = x.shape
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    has_proj = w_hr is not None
    graphs = _graphs_for("forward", x, T, B, H, P, has_proj, reverse)
    if graphs is None:
        return ops.forward_impl(x, h0, c0, w_ih, w_hh, b, w_hr, None, reverse, "step", graph=False)
    xg = ops.project_inputs(x, w_ih, b)
    out = ops.forward_buffers(T, B, H, P, x.dtype, x.device, has_proj, save_acts=True, xg=xg, w_hh=w_hh, w_hr=w_hr)
    ops.start_state(out, h0, c0, reverse)
    win = graphs.buffers

    def keep(steps: slice, rows: slice, k: int) -> None:
        out.y[steps].copy_(win.y[rows])
        out.acts[steps].copy_(win.acts[rows])
        if has_proj:
            out.r[steps].copy_(win.r[rows])
        # the state slots the chunk wrote: those after each step, before it when reverse
        written = rows if reverse else slice(1, k + 1)
        stored = steps if reverse else slice(steps.start + 1, steps.stop + 1)
        out.hs[stored].copy_(win.hs[written])
        out.cs[stored].copy_(win.cs[written])

    with graphs.lock:
        _forward_chunks(graphs, xg, h0, c0, w_hh, w_hr, reverse, keep)
    hT, cT = ops.final_state(out, reverse)
    return out.y, hT, cT, out.acts, out.hs, out.cs, out.r


def _forward_chunks(graphs: _Graphs, xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Tensor | None,
                    reverse: bool, keep: Callable[[slice, slice, int], None]) -> None:  # fmt: skip
    """A forward call through the window (its lock held): the weights and the initial state in, then chunk by
    chunk its input projection in, the chunk's replay, and keep(the call's steps, the window's, the chunk's
    length) to copy out what the call keeps."""
    win, W, T = graphs.buffers, graphs.window, xg.shape[0]
    warmed = graphs.warmed
    _load_weights(win, w_hh, w_hr)
    ops.start_state(win, h0, c0, reverse)
    done = 0
    for k in chunks(T, W):
        steps, rows = _call_steps(T, done, k, reverse), _chunk_rows(W, k, reverse)
        win.xg[rows].copy_(xg[steps])
        _run_chunk(graphs, k, _forward_chunk(win, k, reverse, w_hr is not None), may_capture=warmed)
        keep(steps, rows, k)
        done += k
    graphs.warmed = True


def _forward_chunk(win: ops.ForwardBuffers, k: int, reverse: bool, has_proj: bool) -> Callable[[], None]:
    """A forward chunk of k steps over the window: the loop, then its last state into the slot every chunk starts
    from (W when reverse, else 0), for the next chunk or the caller, inside the graph (no launch from the host)."""
    W, B = win.y.shape[0], win.y.shape[1]

    def loop() -> None:
        ops.run_forward_loop(win, [B] * W, reverse, has_proj, "step", steps=k)
        first, last = (W, W - k) if reverse else (0, k)
        win.hs[first].copy_(win.hs[last])
        win.cs[first].copy_(win.cs[last])

    return loop


def training_backward(bb: ops.BackwardBuffers, reverse: bool, has_proj: bool) -> bool:
    """ops.run_backward_loop and ops.run_final_dh over a dense call's backward buffers `bb`, through graphs (called
    by ops.backward_rows_impl on the input's device, `applies` asked for "backward"): fills bb's dgates (and dhy)
    and leaves dh0 and dc0 in its carries. False, with nothing done, where there is no memory for a window: the
    caller runs the loop launch by launch."""
    T, B, P = bb.grad_y.shape
    H = bb.cs.shape[2]
    graphs = _graphs_for("backward", bb.grad_y, T, B, H, P, has_proj, reverse)
    if graphs is None:
        return False
    win, W = graphs.buffers, graphs.window
    last_first = not reverse  # backward takes the forward's steps in the other order
    with graphs.lock:
        warmed = graphs.warmed
        _load_weights(win, bb.w_hh, bb.w_hr if has_proj else None)
        win.dh.copy_(bb.dh)
        win.dc.copy_(bb.dc)
        done = 0
        for k in chunks(T, W):
            steps, rows = _call_steps(T, done, k, last_first), _chunk_rows(W, k, last_first)
            win.grad_y[rows].copy_(bb.grad_y[steps])
            win.acts[rows].copy_(bb.acts[steps])
            win.cs[rows.start : rows.stop + 1].copy_(bb.cs[steps.start : steps.stop + 1])
            first_chunk = done == 0
            loop = _backward_chunk(win, k, reverse, has_proj, live_before=0 if first_chunk else B)
            _run_chunk(graphs, (k, first_chunk), loop, may_capture=warmed)
            bb.dgb[steps.start + 1 : steps.stop + 1].copy_(win.dgb[rows.start + 1 : rows.stop + 1])
            if has_proj:
                bb.dhy[steps].copy_(win.dhy[rows])
            done += k
        # dh0 from the dgates of the forward's first step, which the last chunk carried to the slot past its end
        ops.run_final_dh(win, W if last_first else -1, B)
        bb.dh.copy_(win.dh)
        bb.dc.copy_(win.dc)
        graphs.warmed = True
    return True


def _backward_chunk(win: ops.BackwardBuffers, k: int, reverse: bool, has_proj: bool,
                    live_before: int) -> Callable[[], None]:  # fmt: skip
    """A backward chunk of k steps over the window (live_before: 0 for a call's first chunk, which no later step
    precedes), then its last dgates into the slot the next chunk's first step reads (W + 1 where steps go last
    first, else 0), inside the graph."""
    W, B = win.grad_y.shape[0], win.grad_y.shape[1]

    def loop() -> None:
        ops.run_backward_loop(win, [B] * W, reverse, has_proj, steps=k, live_before=live_before)
        target, last = (0, k) if reverse else (W + 1, W - k + 1)
        win.dgb[target].copy_(win.dgb[last])

    return loop


def _run_chunk(graphs: _Graphs, chunk: object, loop: Callable[[], None], may_capture: bool) -> None:
    """One chunk's steps: its graph's replay, captured first where this chunk is new (from a configuration's
    second call: the first built the kernels); launch by launch before that, or where capturing failed."""
    global _disabled_reason
    if chunk not in graphs.replays and may_capture and _disabled_reason is None:
        try:
            graphs.replays[chunk] = capture(loop)
        except Exception as error:  # its kernels ran in the first call: it is the capture that failed
            _disabled_reason = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"fastlstm: capturing the triton step loop in a CUDA graph failed ({_disabled_reason}); "
                f"running it launch by launch from now on (set {ENV}=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
            with _graphs_lock:
                _graphs.clear()
    replay = graphs.replays.get(chunk)
    if replay is None:
        loop()
    else:
        replay()


def describe() -> str:
    """Whether the step loops' graphs are on, for `python -m fastlstm info`."""
    if os.environ.get(ENV, "1") == "0":
        return f"off ({ENV}=0)"
    if _disabled_reason is not None:
        return f"off after a failed capture ({_disabled_reason})"
    return (
        f"on CUDA for inference and training (dense input), captured from a configuration's second call in chunks "
        f"of up to {MAX_CHUNK} steps ({MAX_GRAPHS} configurations kept, {MAX_BYTES >> 20} MiB of buffers)"
    )


def clear() -> None:
    """Forget every kept graph and its buffers (and which configurations had no memory for a window)."""
    with _graphs_lock:
        _graphs.clear()
        _window_caps.clear()
