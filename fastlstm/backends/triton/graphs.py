"""Inference through the step kernel, replayed as CUDA graphs of fixed-length chunks of the time loop.

The step kernel launches once per time step (twice with a projection). From Python each launch costs the
host several microseconds, which at small batch is longer than the kernel runs, so the GPU waits on the
launcher. A CUDA graph of many steps launches them as one unit.

Graphs are kept per configuration (sizes but the sequence length, flags, dtype, device, stream), over a
window of W steps' buffers (W a power of two). A call of T steps runs as chunks whose lengths are powers of
two up to W (T = 37, W = 16: 16, 16, 4, 1), each the replay of that length's graph, the state carried from one
chunk to the next. So calls of any length share one configuration's graphs, at most log2(W) + 1 of them: a
stream of calls of varying lengths captures a few graphs once, where graphs of whole calls, keyed by T,
would be captured again and again; and a long sequence is graphed in a bounded window.

How: the first inference call of a configuration runs its chunks as usual (that compiles the kernels, which
must not happen inside a capture); from the second call, a chunk length met for the first time is captured
over the window's buffers, then replayed. Each call computes its input projection in one GEMM, as the
launch-by-launch loop does (so the numbers are that loop's, bit for bit), copies each chunk of it into the
window and each chunk's output out, so a graph never holds a caller's tensor, and copies the weights in, so a
weight updated in place between calls is read afresh. Calls that need gradients, packed input (whose
per-step sizes would be baked into the graph), the sequence kernel (one launch already) and calls made while
the caller is capturing a graph of its own run the loop as usual.

The window grows with the calls, to MAX_CHUNK steps at most and to what fits MAX_BYTES_ONE of buffers (about
W*B*(4H + 2P) elements, c in fp32); a configuration whose window would be under MIN_CHUNK steps runs step by
step (its steps are long enough that launching them one by one keeps the GPU busy). The most recently used
configurations are kept, at most MAX_GRAPHS of them holding MAX_BYTES. FASTLSTM_TRITON_GRAPHS=0 turns graphs
off. A capture that fails warns once and turns them off for the process; the call that failed runs the loop
as usual.
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

from fastlstm.backends import outside_stacklevel
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
# Devices whose calls are graphed (tests add "cpu", with `capture` replaced by a re-run of the loop).
DEVICES = ("cuda",)


_capture_lock = threading.Lock()
_capture_streams: dict[int, torch.cuda.Stream] = {}


def capture(loop: Callable[[], None]) -> Callable[[], None]:
    """Capture `loop`'s launches in a CUDA graph on the current device; returns what replays it."""
    graph = torch.cuda.CUDAGraph()
    # A side stream of our own per device (torch.cuda.graph's default is one stream for all devices, made on
    # whichever was current first), one capture at a time on it. thread_local: another thread's unrelated CUDA
    # work meanwhile neither breaks the capture nor is caught in it. Not torch.cuda.graph itself: it
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
    """One configuration's window of buffers and the graphs of each chunk length captured over it."""

    buffers: ops.ForwardBuffers
    window: int
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    replays: dict[int, Callable[[], None]] = field(default_factory=dict)  # chunk length -> its graph's replay
    warmed: bool = False  # a call ran through, so the kernels are compiled


_graphs: collections.OrderedDict[tuple, _Graphs] = collections.OrderedDict()
_graphs_lock = threading.Lock()
_disabled_reason: str | None = None


def _stream_key(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def buffer_bytes(T: int, B: int, H: int, P: int, dtype: torch.dtype, has_proj: bool) -> int:
    """Bytes of a window of T steps' buffers (ops.forward_buffers without acts)."""
    size, state = dtype.itemsize, 8 if dtype == torch.float64 else 4
    elements = T * B * 4 * H + (T + 1) * B * P + T * B * P + 4 * H * P  # xg, hs, y, w_hh
    if has_proj:
        elements += T * B * H + P * H  # r, w_hr
    return elements * size + (T + 1) * B * H * state  # + cs


def largest_window(B: int, H: int, P: int, dtype: torch.dtype, has_proj: bool) -> int:
    """The most steps (a power of two, MAX_CHUNK at most) a configuration's window may hold within MAX_BYTES_ONE;
    0 where even MIN_CHUNK steps do not fit."""
    window = MAX_CHUNK
    while window >= MIN_CHUNK and buffer_bytes(window, B, H, P, dtype, has_proj) > MAX_BYTES_ONE:
        window //= 2
    return window if window >= MIN_CHUNK else 0


def chunks(T: int, window: int) -> list[int]:
    """The chunk lengths a call of T steps runs as: whole windows, then the rest's powers of two, longest first."""
    whole, rest = divmod(T, window)
    return [window] * whole + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]


def applies(x: Tensor, w_hh: Tensor, w_hr: Tensor | None, batch_sizes: Tensor | None, kernel: str) -> bool:
    """Whether this inference call runs through graphs."""
    if batch_sizes is not None or kernel != "step" or x.device.type not in DEVICES:
        return False
    if not largest_window(x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1], x.dtype, w_hr is not None):
        return False
    if _disabled_reason is not None or os.environ.get(ENV, "1") == "0":
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _entry(key: tuple, window: int, make: Callable[[int], _Graphs]) -> _Graphs:
    """The kept graphs of `key` (now the most recently used), made anew with a window of `window` steps where the
    kept one is smaller."""
    with _graphs_lock:
        graphs = _graphs.get(key)
        if graphs is not None and graphs.window >= window:
            _graphs.move_to_end(key)
            return graphs
        grown = make(window)
        # A grown window's kernels are those of the smaller one (the window's length is no kernel argument)
        grown.warmed = graphs is not None and graphs.warmed
        _graphs.pop(key, None)
        _graphs[key] = grown
        while len(_graphs) > MAX_GRAPHS or sum(g.nbytes for g in _graphs.values()) > MAX_BYTES:
            _graphs.popitem(last=False)  # the newest one always fits: largest_window bounds it by MAX_BYTES_ONE
        return grown


def _chunk_rows(W: int, k: int, reverse: bool) -> slice:
    """The window's steps a chunk of k steps runs: its first k, or its last k when reverse (whose loop starts from
    state slot W), so that every chunk starts from the slot the one before left its state in."""
    return slice(W - k, W) if reverse else slice(0, k)


@ops.on_input_device
def forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor | None,
            w_hr: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """y, hT, cT of one dense inference call through the step kernel (the caller checked `applies`)."""
    # as every launch's: a configuration whose build crashed a child raises here, before anything is compiled
    T, B, I, H, P, _ = ops.checked_sizes(x, h0, c0, w_ih, w_hh, b, w_hr, None, reverse, "step", save_acts=False)
    has_proj = w_hr is not None
    precision, config = ops._precision(x.dtype), os.environ.get(ops.ENV_CONFIG)
    key = (x.device, _stream_key(x.device), x.dtype, B, H, P, has_proj, bool(reverse), precision, config)
    window = min(largest_window(B, H, P, x.dtype, has_proj), max(MIN_CHUNK, 1 << (T - 1).bit_length()))

    def make(window: int) -> _Graphs:
        # Normal tensors even when this call runs under torch.inference_mode: inference tensors may not be
        # written outside it, and later calls of this configuration may come from no_grad code.
        with torch.inference_mode(False):
            buf = ops.forward_buffers(window, B, H, P, x.dtype, x.device, has_proj, save_acts=False)
        nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in buf}.values())
        return _Graphs(buffers=buf, window=window, nbytes=nbytes)

    graphs = _entry(key, window, make)
    buf, W = graphs.buffers, graphs.window
    xg = ops.project_inputs(x, w_ih, b)  # one GEMM, as the launch-by-launch loop's
    y = x.new_empty(T, B, P)
    # Held until the results are copied out: the kept buffers serve one call at a time (calls on one stream
    # run in the order they were issued, so releasing after the copies are queued is enough).
    with graphs.lock:
        warmed = graphs.warmed
        buf.w_hh.copy_(w_hh)
        if has_proj:
            buf.w_hr.copy_(w_hr)
        ops.start_state(buf, h0, c0, reverse)
        done = 0
        for k in chunks(T, W):
            steps = slice(T - done - k, T - done) if reverse else slice(done, done + k)
            rows = _chunk_rows(W, k, reverse)
            buf.xg[rows].copy_(xg[steps])
            _run_chunk(graphs, k, reverse, has_proj, may_capture=warmed)
            y[steps].copy_(buf.y[rows])
            done += k
        # every chunk ends by carrying its last state to the slot all start from
        first = W if reverse else 0
        hT, cT = buf.hs[first].clone(), buf.cs[first].to(x.dtype, copy=True)
        graphs.warmed = True
    return y, hT, cT


def _run_chunk(graphs: _Graphs, k: int, reverse: bool, has_proj: bool, may_capture: bool) -> None:
    """One chunk's steps: its graph's replay, captured first where this length is new (from a configuration's
    second call: the first built the kernels); launch by launch before that, or where capturing failed."""
    global _disabled_reason
    buf, W = graphs.buffers, graphs.window
    B = buf.y.shape[1]

    def loop() -> None:
        # Over the whole window's buffers, not views of the chunk's rows: a view's pointer may lose the 16-byte
        # alignment triton specialises its kernels on, and a capture would compile them anew
        ops.run_forward_loop(buf, [B] * W, reverse, has_proj, "step", steps=k)
        # The state into the slot every chunk starts from (W when reverse, else 0), for the next chunk or the
        # caller: in the graph, where it costs no launch from the host.
        first, last = (W, W - k) if reverse else (0, k)
        buf.hs[first].copy_(buf.hs[last])
        buf.cs[first].copy_(buf.cs[last])

    if k not in graphs.replays and may_capture and _disabled_reason is None:
        try:
            graphs.replays[k] = capture(loop)
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
    replay = graphs.replays.get(k)
    if replay is None:
        loop()
    else:
        replay()


def describe() -> str:
    """Whether inference graphs are on, for `python -m fastlstm info`."""
    if os.environ.get(ENV, "1") == "0":
        return f"off ({ENV}=0)"
    if _disabled_reason is not None:
        return f"off after a failed capture ({_disabled_reason})"
    return (
        f"on CUDA, captured from a configuration's second call in chunks of up to {MAX_CHUNK} steps "
        f"({MAX_GRAPHS} configurations kept, {MAX_BYTES >> 20} MiB of buffers)"
    )


def clear() -> None:
    """Forget every kept graph and its buffers."""
    with _graphs_lock:
        _graphs.clear()
