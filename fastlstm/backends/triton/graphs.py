"""Inference through the step kernel, replayed as a CUDA graph.

The step kernel launches once per time step (twice with a projection). From Python each launch costs the
host several microseconds, which at small batch is longer than the kernel runs, so the GPU waits on the
launcher. A CUDA graph of the whole loop launches it as one unit.

How: the first inference call of a configuration runs the loop as usual (that compiles the kernels, which
must not happen inside a capture); the second captures the loop over buffers kept for that configuration
and replays it; later ones only replay. Each call copies its inputs into the kept buffers (the input
projection is written there directly) and copies the results out, so a graph never holds a caller's tensor,
and a weight updated in place between calls is read afresh. Calls that need gradients, packed input (whose
per-step sizes would be baked into the graph), the sequence kernel (one launch already) and calls made while
the caller is capturing a graph of its own run the loop as usual.

Configurations are keyed by sizes, flags, dtype, device and stream; the most recently used are kept, at
most MAX_GRAPHS of them holding MAX_BYTES of buffers (about T*B*(4H + 2P) elements each, c in fp32); a
configuration needing more than MAX_BYTES_ONE runs step by step. FASTLSTM_TRITON_GRAPHS=0 turns graphs
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
from dataclasses import dataclass

import torch
from torch import Tensor

from fastlstm.backends import outside_stacklevel
from fastlstm.backends.triton import ops

ENV = "FASTLSTM_TRITON_GRAPHS"
MAX_GRAPHS = 8
# Memory the kept buffers may hold, all graphs together, and one configuration at most (clear() frees them): a
# loop that needs more has steps long enough that launching them one by one keeps the GPU busy.
MAX_BYTES = 256 << 20
MAX_BYTES_ONE = MAX_BYTES // 4
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
class _Graph:
    buffers: ops.ForwardBuffers
    lock: threading.Lock
    nbytes: int
    replay: Callable[[], None] | None = None  # set by the capture
    warmed: bool = False  # the loop ran once uncaptured, so its kernels are compiled


_graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
_graphs_lock = threading.Lock()
_disabled_reason: str | None = None


def _stream_key(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def buffer_bytes(T: int, B: int, H: int, P: int, dtype: torch.dtype, has_proj: bool) -> int:
    """Bytes of one configuration's kept buffers (ops.forward_buffers without acts)."""
    size, state = dtype.itemsize, 8 if dtype == torch.float64 else 4
    elements = T * B * 4 * H + (T + 1) * B * P + T * B * P + 4 * H * P  # xg, hs, y, w_hh
    if has_proj:
        elements += T * B * H + P * H  # r, w_hr
    return elements * size + (T + 1) * B * H * state  # + cs


def applies(x: Tensor, w_hh: Tensor, w_hr: Tensor | None, batch_sizes: Tensor | None, kernel: str) -> bool:
    """Whether this inference call runs through a graph."""
    if batch_sizes is not None or kernel != "step" or x.device.type not in DEVICES:
        return False
    T, B, _ = x.shape
    if buffer_bytes(T, B, w_hh.shape[0] // 4, w_hh.shape[1], x.dtype, w_hr is not None) > MAX_BYTES_ONE:
        return False
    if _disabled_reason is not None or os.environ.get(ENV, "1") == "0":
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _entry(key: tuple, make: Callable[[], _Graph]) -> _Graph:
    """The kept graph of `key` (now the most recently used), or a new one."""
    with _graphs_lock:
        graph = _graphs.get(key)
        if graph is not None:
            _graphs.move_to_end(key)
            return graph
        graph = _graphs[key] = make()
        while len(_graphs) > MAX_GRAPHS or sum(g.nbytes for g in _graphs.values()) > MAX_BYTES:
            _graphs.popitem(last=False)  # the newest one always fits: applies() bounds it by MAX_BYTES_ONE
        return graph


@ops.on_input_device
def forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor | None,
            w_hr: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """y, hT, cT of one dense inference call through the step kernel (the caller checked `applies`)."""
    global _disabled_reason
    # as every launch's: a configuration whose build crashed a child raises here, before anything is compiled
    T, B, I, H, P, _ = ops.checked_sizes(x, h0, c0, w_ih, w_hh, b, w_hr, None, reverse, "step", save_acts=False)
    has_proj = w_hr is not None
    precision, config = ops._precision(x.dtype), os.environ.get(ops.ENV_CONFIG)
    key = (x.device, _stream_key(x.device), x.dtype, T, B, H, P, has_proj, bool(reverse), precision, config)

    def make() -> _Graph:
        # Normal tensors even when this call runs under torch.inference_mode: inference tensors may not be
        # written outside it, and later calls of this configuration may come from no_grad code.
        with torch.inference_mode(False):
            buf = ops.forward_buffers(T, B, H, P, x.dtype, x.device, has_proj, save_acts=False)
        nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in buf}.values())
        return _Graph(buffers=buf, lock=threading.Lock(), nbytes=nbytes)

    graph = _entry(key, make)
    buf = graph.buffers
    # Held until the results are copied out: the kept buffers serve one call at a time (calls on one stream
    # run in the order they were issued, so releasing after the copies are queued is enough).
    with graph.lock:
        ops.project_inputs(x, w_ih, b, out=buf.xg)
        buf.w_hh.copy_(w_hh)
        if has_proj:
            buf.w_hr.copy_(w_hr)
        ops.start_state(buf, h0, c0, reverse)

        def loop() -> None:
            ops.run_forward_loop(buf, [B] * T, reverse, has_proj, "step")

        if graph.replay is None and graph.warmed:
            try:
                graph.replay = capture(loop)
            except Exception as error:  # the loop itself ran before: it is the capture that failed
                _disabled_reason = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"fastlstm: capturing the triton step loop in a CUDA graph failed ({_disabled_reason}); "
                    f"running it launch by launch from now on (set {ENV}=0 to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=outside_stacklevel(),
                )
                with _graphs_lock:
                    _graphs.clear()
        if graph.replay is None:
            loop()
            graph.warmed = True
        else:
            graph.replay()
        y = buf.y.clone()
        hT, cT = ops.final_state(buf, reverse)
    return y, hT, cT


def describe() -> str:
    """Whether inference graphs are on, for `python -m fastlstm info`."""
    if os.environ.get(ENV, "1") == "0":
        return f"off ({ENV}=0)"
    if _disabled_reason is not None:
        return f"off after a failed capture ({_disabled_reason})"
    return f"on CUDA, captured from a configuration's second call ({MAX_GRAPHS} kept, {MAX_BYTES >> 20} MiB of buffers)"


def clear() -> None:
    """Forget every kept graph and its buffers."""
    with _graphs_lock:
        _graphs.clear()
