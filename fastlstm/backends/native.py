"""The native path (torch._VF.lstm: cuDNN, oneDNN, ATen) and the readable reference, as layer backends.

The module runs a whole stack through `torch._VF.lstm` directly when every layer is native (that is
exactly what nn.LSTM does); the per-layer form here serves stacks where other backends run some layers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch
from torch import Tensor

from fastlstm import reference
from fastlstm.backends import (
    Backend,
    LayerResult,
    constant_under_compile,
    exporting,
    host_to_device,
    outside_stacklevel,
)

# cuDNN's warning when an RNN's weights are not one flat buffer tells the user to call flatten_parameters(),
# which does nothing for a layer's weights passed as they are here (a mixed plan's layer, triton's self-test; in
# an H200 run's output) or for the autocast probe's (probe_lstm): ignored where this module's calls give it, and
# only there (the module's whole stack passes the layer's own weights, as nn.LSTM does, and hears it). One filter
# at import, not a
# catch_warnings a call: that cannot be traced by torch.compile, is not thread-safe, and resets every warning's
# once-per-location memory.
SEPARATE_WEIGHTS_WARNING = "RNN module weights are not part of single contiguous chunk of memory"


def ignore_separate_weights_warning() -> None:
    warnings.filterwarnings("ignore", message=SEPARATE_WEIGHTS_WARNING, module=r"fastlstm\.backends\.native$")


ignore_separate_weights_warning()


def probe_lstm(*args):
    """torch._VF.lstm for fastlstm.module's autocast probe, called from here so that the filter above covers it: the
    probe's zero weights are separate tensors, and cuDNN's autocast wrapper does not flatten half weights under half
    autocast."""
    return torch._VF.lstm(*args)


def live_mask(batch_sizes: Tensor, B: int) -> Tensor:
    """[T, B] on the CPU: whether row r of a padded, time-major batch is live (within its sequence) at step t."""
    return torch.arange(B, device="cpu")[None, :] < batch_sizes[:, None]


def packed_rows(batch_sizes: Tensor, device: torch.device) -> Tensor:
    """Where each packed element lies among the T * B rows of its padded, time-major batch, in PackedSequence.data
    order. One index into rows: index_copy and index_select over it ran 2-3x faster than advanced indexing with
    (time, row) pairs (2-core Zen 4, pad and unpad of T50 x B64 x 64 floats: 105 us against 222)."""
    live = live_mask(batch_sizes, int(batch_sizes[0]))
    return host_to_device(live.view(-1).nonzero().squeeze(1), device)


def pad_packed(data: Tensor, batch_sizes: Tensor, rows: Tensor) -> Tensor:
    """Packed data [N, *] as its padded, time-major batch [T, B, *], zero where no sequence is live. Rows past the
    batch sizes' sum (a hand-built pack over a larger buffer) are left out, as nn.LSTM leaves them."""
    T, B = batch_sizes.numel(), int(batch_sizes[0])
    if rows.numel() < data.shape[0] and rows.numel() == int(batch_sizes.sum()):
        data = data[: rows.numel()]
    if rows.numel() != data.shape[0]:  # batch sizes that grow, or sum past the rows: nn.LSTM's type of error
        raise RuntimeError(
            f"fastlstm: a PackedSequence's batch_sizes must not increase nor sum past its data's {data.shape[0]} "
            f"rows, got {batch_sizes.tolist()}"
        )
    return data.new_zeros(T * B, *data.shape[1:]).index_copy(0, rows, data).view(T, B, *data.shape[1:])


def pack_padded(padded: Tensor, rows: Tensor) -> Tensor:
    """A padded, time-major batch [T, B, *]'s packed data [N, *] (pad_packed's inverse)."""
    return padded.flatten(0, 1).index_select(0, rows)


def lengths_from_batch_sizes(batch_sizes: Tensor) -> Tensor:
    """Per-row sequence lengths [B] from packed batch sizes [T]."""
    B = int(batch_sizes[0])
    return live_mask(batch_sizes, B).sum(0)


def flip_time(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each row of a time-major x [T, B, ...] within its own length; padding stays in place."""
    if lengths is None:
        return x.flip(0)
    T, B = x.shape[0], x.shape[1]
    t = torch.arange(T, device="cpu")[:, None].expand(T, B)
    lengths = lengths[None, :]
    index = host_to_device(torch.where(t < lengths, lengths - 1 - t, t), x.device)
    return x.gather(0, index.view(T, B, *([1] * (x.dim() - 2))).expand_as(x))


# oneDNN's switch is the process's, and calls in several threads may each turn it off for a while: the first in
# keeps the setting it found, the last out puts it back. Each had saved and restored it on its own, and two
# threads' turns interleaved: a call read the switch off (another's turn), ran oneDNN once it came back on (wrong
# numbers where OpenMP starves, an error under bfloat16 autocast on CPUs without AVX-512), and oneDNN was left off.
_onednn_lock = threading.Lock()
_onednn_turns = 0  # calls holding oneDNN off now
_onednn_setting = True  # the switch as it was before they did


def onednn_enabled() -> bool:
    """Whether oneDNN is on as the program set it: the switch, or while calls of fastlstm's hold it off
    (onednn_off), what it was before."""
    with _onednn_lock:
        return _onednn_setting if _onednn_turns else torch._C._get_mkldnn_enabled()


ONEDNN_BUILT = torch.backends.mkldnn.is_available()  # read once: a call's key reads onednn_lstm_available


@constant_under_compile  # dynamo cannot trace the switch's read; a program's setting holds for its graphs
def onednn_lstm_available() -> bool:
    """Whether nn.LSTM's CPU calls can take oneDNN's fused LSTM: torch built with oneDNN, and the program has not
    switched it off (`torch.backends.mkldnn.enabled = False`, or its `flags()` block). Without it they run ATen's
    per-step loop, as float64 does."""
    return ONEDNN_BUILT and onednn_enabled()


@contextlib.contextmanager
def onednn_off():
    """nn.LSTM's ATen path on the CPU: oneDNN off for the block, every other oneDNN setting left as it is. The switch
    is the process's: other threads' oneDNN calls meanwhile run without it too."""
    if torch.compiler.is_compiling():  # a trace of the block: no turns to take
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(enabled)
        return
    global _onednn_turns, _onednn_setting
    with _onednn_lock:
        if not _onednn_turns:
            _onednn_setting = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _onednn_turns += 1
    try:
        yield
    finally:
        with _onednn_lock:
            if _onednn_turns:  # none where this thread forked inside its turn (_after_fork_in_child ended them)
                _onednn_turns -= 1
                if not _onednn_turns:
                    torch._C._set_mkldnn_enabled(_onednn_setting)


def _after_fork_in_child() -> None:
    """A child forked during another thread's turn: that thread is not there to end it."""
    global _onednn_lock, _onednn_turns
    _onednn_lock = threading.Lock()
    if _onednn_turns:
        _onednn_turns = 0
        torch._C._set_mkldnn_enabled(_onednn_setting)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def _openmp_settings() -> tuple[bool, int | None]:
    """(whether OpenMP may start fewer threads than a region asks for whatever torch's count, OMP_THREAD_LIMIT or
    None), as OpenMP read them when the process started (it reads them once: later changes have no effect)."""
    dynamic = os.environ.get("OMP_DYNAMIC", "").strip().lower() == "true"
    no_levels = os.environ.get("OMP_MAX_ACTIVE_LEVELS", "").strip() == "0"
    limit = os.environ.get("OMP_THREAD_LIMIT", "").strip()
    return dynamic or no_levels, int(limit) if limit.isdigit() else None


def openmp_starves() -> bool:
    """Whether OpenMP may start fewer threads than torch asks for (OMP_THREAD_LIMIT below torch's threads,
    OMP_DYNAMIC=true, OMP_MAX_ACTIVE_LEVELS=0), where oneDNN computes wrong numbers (onednn_training_miscomputes;
    its bfloat16 matmul, which ATen's bfloat16 products take, too: torch 2.13's bf16 a @ b off by 3e35)."""
    starves, limit = _openmp_settings()
    return starves or (limit is not None and limit < torch.get_num_threads())


def onednn_training_miscomputes(x: Tensor, packed: bool, projected: bool) -> bool:
    """Whether nn.LSTM's oneDNN path would compute this CPU call wrong: where OpenMP starts fewer threads than torch
    asks for (OMP_THREAD_LIMIT below torch's threads, OMP_DYNAMIC=true, OMP_MAX_ACTIVE_LEVELS=0), oneDNN's float32
    LSTM training forward and backward give outputs off by ~0.3 and gradients off by ~16 or NaN (float32
    B4-T40-H64, torch 2.13 and 2.14.1 on a 2-core Xeon and a 2-core Zen 4; inference is right). Its ATen path
    (oneDNN off) computes such calls. oneDNN never runs float64, packed input or a projection.

    Not below float32 (a bfloat16 model, or a float32 one under CPU autocast): there oneDNN's LSTM trains right
    (bfloat16 on a 2-core Zen 4: 3.3e-3 to 4.6e-3 of float64's largest value, as without the limit), while ATen's
    path, run with oneDNN off for the forward only, took oneDNN's bfloat16 matmul in its backward, which is wrong
    there: its gradients came out inf (an audit)."""
    if torch.compiler.is_compiling():
        return False  # a compiled graph runs nn.LSTM's own call, as a compiled nn.LSTM does (a trace too)
    if not openmp_starves():  # before the call's own questions: the common case, on every native call
        return False
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if packed or projected or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32:
        return False
    if not onednn_enabled():
        return False
    _warn_once_about_openmp()
    return True


@functools.cache
def _warn_once_about_openmp() -> None:
    warnings.warn(
        "fastlstm: OpenMP may start fewer threads than torch asks for here (OMP_THREAD_LIMIT, OMP_DYNAMIC or "
        "OMP_MAX_ACTIVE_LEVELS), where nn.LSTM's oneDNN path trains on wrong numbers; the native path trains with "
        "oneDNN off instead (nn.LSTM's ATen path: right, slower)",
        stacklevel=outside_stacklevel(),
    )


def onednn_safe(x: Tensor, packed: bool, projected: bool):
    """A context for a native LSTM call on x: oneDNN off where it would compute the call wrong."""
    return onednn_off() if onednn_training_miscomputes(x, packed, projected) else contextlib.nullcontext()


COMPILED_BACKWARD_FAILS = (
    "torch.compile of a CPU call that needs gradients: nn.LSTM's oneDNN LSTM (float32, bfloat16) does not compile "
    "its backward (backend 'auto', 'cpp' or 'reference' does)"
)


def compiled_backward_fails(device_type: str, dtype: torch.dtype, needs_grad: bool, packed: bool, projected: bool):
    """Whether torch.compile is tracing a CPU call whose backward it cannot compile on nn.LSTM's path. oneDNN's fused
    LSTM (float32 and bfloat16, neither packed nor projected) breaks it: aot_eager fails in save_from_forward
    ("expected all tensors_saved_with_vc_check to be Tensors"), inductor on the op ("expected Tensor() for op:
    aten.mkldnn_rnn_layer"; torch 2.13), where nn.LSTM itself breaks the graph and runs eagerly; ATen's loop
    compiles, but oneDNN's switch cannot be turned off inside a graph (dynamo refuses it under fullgraph=True).
    `auto` sends compiled CPU calls to cpp, and to the reference loop where cpp cannot be built (no compiler);
    `backend="native"` raises COMPILED_BACKWARD_FAILS. torch.export traces with oneDNN off."""
    if device_type != "cpu" or not needs_grad or packed or projected or dtype not in (torch.float32, torch.bfloat16):
        return False
    return torch.compiler.is_compiling() and not exporting() and onednn_lstm_available()


class NativeBackend(Backend):
    name = "native"

    def layer(self, x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse) -> LayerResult:
        lengths = None if batch_sizes is None else lengths_from_batch_sizes(batch_sizes)
        if reverse:
            x = flip_time(x, lengths)
        params = [w_ih, w_hh]
        if b is not None:
            params += [b, torch.zeros_like(b)]
        if w_hr is not None:
            params.append(w_hr)
        hx = (h0.unsqueeze(0), c0.unsqueeze(0))
        # train=True keeps cuDNN's backward possible; with dropout 0 it changes nothing else.
        train = torch.is_grad_enabled()
        with onednn_safe(x, batch_sizes is not None, w_hr is not None):
            if batch_sizes is None:
                y, hT, cT = torch._VF.lstm(x, hx, params, b is not None, 1, 0.0, train, False, False)
            else:
                rows = packed_rows(batch_sizes, x.device)
                y_data, hT, cT = torch._VF.lstm(
                    pack_padded(x, rows), batch_sizes, hx, params, b is not None, 1, 0.0, train, False
                )
                y = pad_packed(y_data, batch_sizes, rows)
        if reverse:
            y = flip_time(y, lengths)
        # Not hT[0]: under torch.compile, torch 2.4-2.11's decomposition of aten::lstm gives [1, 1, B, H]
        return y, hT.reshape(h0.shape), cT.reshape(c0.shape)


class ReferenceBackend(Backend):
    name = "reference"

    def layer(self, x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse) -> LayerResult:
        # Under torch.compile no tensor is an inference tensor to dynamo (it cannot trace the question either).
        if not torch.compiler.is_compiling() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            _refuse_inference_weights(w_ih, w_hh, b, w_hr)
        return reference.lstm_layer(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse)


def _refuse_inference_weights(*weights) -> None:
    """nn.LSTM's error for weights made under torch.inference_mode that need a gradient outside it (a model built
    there, then trained): a matmul with such a weight records no graph, and the reference's gradients would be
    silently missing where every other path raises."""
    if any(w is not None and w.requires_grad and w.is_inference() for w in weights):
        raise RuntimeError(
            "Inference tensors cannot be saved for backward. Please do not use Tensors created in inference mode in "
            "computation tracked by autograd. To work around this, you can make a clone to get a normal tensor"
        )


BACKEND = NativeBackend()
REFERENCE = ReferenceBackend()
