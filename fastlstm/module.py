"""fastlstm.LSTM: torch.nn.LSTM's API, each layer served by the fastest backend that supports the call."""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd import forward_ad
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastlstm import backends, dispatch, reference
from fastlstm.backends import BackendUnavailableError, LayerCall, host_to_device
from fastlstm.backends.native import (
    COMPILED_BACKWARD_FAILS,
    compiled_backward_fails,
    onednn_enabled,
    onednn_lstm_available,
    onednn_off,
    onednn_training_miscomputes,
    pack_padded,
    packed_rows,
    pad_packed,
    probe_lstm,
)

backends.load_all()  # before any torch.compile traces a forward: dynamo cannot import (see fastlstm.backends)


def _forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad.dual_level is open (only then can a tensor carry a tangent)."""
    return getattr(forward_ad, "_current_level", -1) >= 0


def _functorch_transform_kinds() -> frozenset[str]:
    """The torch.func transforms active around this call, by kind: "Vmap", "Grad", "Jvp", "Functionalize"."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # a private module: should a torch lack it, assume the transforms nn.LSTM cannot run under
        return frozenset({"Vmap", "Jvp"})
    return frozenset(interpreter.key().name for interpreter in retrieve_all_functorch_interpreters())


class _Transforms(NamedTuple):
    """What torch.func's transforms and forward-mode AD make of a call, as dispatch needs to know it."""

    # A transform that tracks gradients (grad, vjp, jacrev, jvp) wraps the input, the state or a weight, or one
    # of them carries a forward-mode tangent: the fast backends then run their ops through an autograd.Function
    # that torch.func can run (it cannot run cpp's C++ autograd nor torch.library's).
    func_grad: bool = False
    # A torch.vmap is active: nn.LSTM's kernels have no batching rule (aten::lstm) and fail there.
    vmapped: bool = False
    # Forward-mode AD (tangents, torch.func.jvp / jacfwd): nn.LSTM's fused kernels (oneDNN's on the CPU, cuDNN's)
    # have no forward-mode derivative.
    forward_ad: bool = False
    # The gradients such a transform takes are differentiated again (backends.differentiated_twice): the fast
    # backends' backward kernels are not differentiable.
    grad_of_grad: bool = False
    # torch.func.functionalize around such a transform: torch has no functionalize rule for the autograd.Function
    # the fast backends then run ("NYI: Functionalize rule for custom_function_call").
    functionalized: bool = False


_NO_TRANSFORMS = _Transforms()


class _CallShape(NamedTuple):
    device_type: str
    dtype: torch.dtype
    seq_len: int
    batch: int
    packed: bool
    needs_grad: bool
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    num_directions: int
    bias: bool
    func_grad: bool = False
    vmapped: bool = False
    forward_ad: bool = False
    grad_of_grad: bool = False
    functionalized: bool = False
    mixed_dtypes: bool = False
    # torch's thread count, for CPU calls: the CPU rule reads it (how the cpp forward splits its rows among
    # threads), so a remembered plan holds for one count. 0 on other devices and while tracing (not remembered).
    threads: int = 0
    device_index: int | None = None  # a CUDA device's (LayerCall.device_index)
    onednn: bool = True  # LayerCall.onednn: the CPU rule reads it, and a program may switch it off and on
    input_grad: bool = False  # needs_grad, and the input needs its gradient (LayerCall.input_grad)


_SIZE_NAMES = ("input_size", "hidden_size", "proj_size", "num_layers")


@functools.lru_cache(maxsize=4096)
def _plan_for(requested: str, shape: _CallShape) -> tuple[dispatch.Choice, ...]:
    """Dispatch's answer for every (layer, direction); cached so that repeated calls of one shape skip it."""
    out_size = shape.proj_size or shape.hidden_size
    calls = [
        LayerCall(
            device_type=shape.device_type,
            dtype=shape.dtype,
            seq_len=shape.seq_len,
            batch=shape.batch,
            input_size=shape.input_size if layer == 0 else out_size * shape.num_directions,
            hidden_size=shape.hidden_size,
            proj_size=shape.proj_size,
            bias=shape.bias,
            packed=shape.packed,
            reverse=direction == 1,
            needs_grad=shape.needs_grad,
            layer=layer,
            input_grad=shape.input_grad,
            bidirectional=shape.num_directions == 2,
            func_grad=shape.func_grad,
            vmapped=shape.vmapped,
            forward_ad=shape.forward_ad,
            grad_of_grad=shape.grad_of_grad,
            functionalized=shape.functionalized,
            mixed_dtypes=shape.mixed_dtypes,
            device_index=shape.device_index,
            onednn=shape.onednn,
        )
        for layer in range(shape.num_layers)
        for direction in range(shape.num_directions)
    ]
    return tuple(dispatch.plan(requested, calls))


def _standard_shapes(
    names: list[str], input_size: int, hidden_size: int, proj_size: int, directions: int
) -> tuple[tuple[int, ...], ...]:
    """The shape nn.RNNBase's constructor gives each named LSTM weight (weight_ih_l1_reverse, bias_hh_l0, ...)."""
    gates, out_size = 4 * hidden_size, proj_size or hidden_size
    shapes = []
    for name in names:
        kind, where = name.rsplit("_l", 1)
        layer = int(where.split("_")[0])
        shapes.append(
            {
                "weight_ih": (gates, input_size if layer == 0 else out_size * directions),
                "weight_hh": (gates, out_size),
                "bias_ih": (gates,),
                "bias_hh": (gates,),
                "weight_hr": (proj_size, hidden_size),
            }[kind]
        )
    return tuple(shapes)


def _constructor_names(layers: int, directions: int, bias: bool, proj: bool) -> list[str]:
    """The weights' names, in order, as nn.RNNBase's constructor makes them for these flags. Its one caller,
    _read_as, keeps what it derives per module."""
    kinds = ["weight_ih", "weight_hh", *(["bias_ih", "bias_hh"] if bias else []), *(["weight_hr"] if proj else [])]
    return [
        f"{kind}_l{layer}{'_reverse' if direction else ''}"
        for layer in range(layers)
        for direction in range(directions)
        for kind in kinds
    ]


def _broadcast_bias(shape: torch.Size, gates: int) -> bool:
    """Whether a bias of `shape` is one nn.LSTM broadcasts to [gates] on every one of its paths (oneDNN, ATen, packed
    or not; torch 2.13): a scalar, [1], [1, 1] and [1, 4H]. Not [B, 4H] (ATen adds it row by row, oneDNN reads its
    first row), nor [4H, 1], nor [1, 1, 4H] (ATen fails)."""
    return len(shape) <= 2 and all(n == 1 for n in shape[:-1]) and (len(shape) == 0 or shape[-1] in (1, gates))


def _flat_bias(bias: Tensor, gates: int) -> Tensor:
    """A bias as the fast backends take it, [4H]: one nn.LSTM broadcasts (_broadcast_bias) expanded so."""
    return bias if bias.shape == (gates,) else bias.reshape(-1).expand(gates)


# Weakly keyed: parametrization (weight_norm, spectral_norm, ...) makes a class per module, whose properties hold the
# module; a strong cache would keep every such model alive.
_CHECKS_BY_CLASS: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _checks_are_ours(cls: type) -> bool:
    """Whether `cls` (LSTM or a subclass) validates a call with LSTM's own checks: only then may a repeated call of
    one kind skip them (_call_key)."""
    if cls is LSTM:
        return True  # without the weak dictionary's lookup: half a microsecond of every call
    ours = _CHECKS_BY_CLASS.get(cls)
    if ours is None:
        names = (
            "check_forward_args", "check_input", "check_hidden_size", "get_expected_hidden_size",
            "get_expected_cell_size",
        )  # fmt: skip
        ours = _CHECKS_BY_CLASS[cls] = all(getattr(cls, name) is getattr(LSTM, name) for name in names)
    return ours


# Plans of calls that passed every check, by LSTM._call_key, with what autocast makes of them (None when it is
# off): repeated calls of one kind skip the checks, dispatch and autocast's dtypes (tens of microseconds, which
# count at batch 1-4).
# Remembered at most backends.REMEMBERED_MAX (backends.remember): keys hold shapes.
_CHECKED_CALLS: dict[tuple, _Checked] = {}


def _passed_before(key: tuple | None) -> _Checked | None:
    """What a call of this key was planned as when one passed every check, if one did (LSTM._passed)."""
    return _CHECKED_CALLS.get(key) if key is not None else None


def forget_plans() -> None:
    """Forget every remembered plan and checked call, so that the next call of each shape asks dispatch again
    (for tests and tools that change a rule or a backend's availability between calls)."""
    _plan_for.cache_clear()
    _CHECKED_CALLS.clear()


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for device types autocast does not know (meta: models built
    on it to see shapes without memory), where torch raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class _Autocast(NamedTuple):
    """What autocast makes of a call: the (y, h_n, c_n) dtypes nn.LSTM gives, and whether its oneDNN path runs it;
    own_call: only nn.LSTM's own call, left to autocast when it runs, gives them (an exported program's)."""

    dtypes: tuple[torch.dtype, ...]
    onednn: bool = True
    own_call: bool = False


class _Checked(NamedTuple):
    """What a call that passed every check was planned as, for the calls of its key (LSTM._call_key)."""

    choices: tuple[dispatch.Choice, ...]
    amp: _Autocast | None
    # every layer native: the whole stack is nn.LSTM's one call
    native: bool
    # _weights_as_built() is the weight list itself (no bias to expand): the key's weight shapes decide it
    weights_as_built: bool


# Per distinct call (at most backends.REMEMBERED_MAX); see LSTM._autocast_dtypes.
_AUTOCAST_DTYPES: dict[tuple, _Autocast] = {}


class _ProbeCall(NamedTuple):
    """What decides nn.LSTM's dtypes for a call under autocast, as plain values (LSTM._autocast_dtypes)."""

    autocast: tuple  # _autocast_key's: device type, autocast's dtype, oneDNN and cuDNN on, grad mode
    device: torch.device
    dtype: torch.dtype
    input_size: int
    states: tuple  # (dtype, layers, size) of h0 and c0
    weights: tuple  # (dtype, shape) of each weight as built, None where deleted
    packed: bool
    varying: bool  # a pack whose batch sizes vary
    empty: bool
    num_layers: int
    bidirectional: bool
    bias: bool
    proj_size: int


@backends.constant_under_compile
def _probed_autocast_dtypes(key: tuple) -> _Autocast:
    """nn.LSTM's (y, h_n, c_n) dtypes for `call`, read off one tiny call of its own on fresh tensors, cached.

    The probe runs under the autocast and grad mode the call's key names, and takes only plain values, so that
    torch.compile runs it eagerly and takes its answer as a constant: traced, the packed probe had given float32
    where nn.LSTM gives bfloat16 (its ATen path's dtypes), and the cache had kept that for the eager calls after it.
    key: a _ProbeCall's fields as a plain tuple (what dynamo hands such a function as it was given).
    """
    known = _AUTOCAST_DTYPES.get(key)
    if known is not None:
        return known
    call = _ProbeCall(*key)
    device_type, autocast_dtype, grad = call.autocast[0], call.autocast[1], call.autocast[-1]
    batch = 0 if call.empty else 2 if call.varying else 1
    # Fresh tensors, not new_zeros of the call's: under torch.vmap those would be batched too, and nn.LSTM's kernels
    # have no batching rule.
    x = torch.zeros(3 if call.varying else batch, call.input_size, dtype=call.dtype, device=call.device)
    state = tuple(torch.zeros(n, batch, size, dtype=dtype, device=call.device) for dtype, n, size in call.states)
    weights = [None if w is None else torch.zeros(w[1], dtype=w[0], device=call.device) for w in call.weights]
    flags = (call.bias, call.num_layers, 0.0, False, call.bidirectional)

    def probe() -> tuple[torch.dtype, ...]:
        # nothing here requires grad, so no graph is recorded; and outside torch.func's transforms, under which
        # nn.LSTM's packed kernels fail ("Cannot access data pointer of Tensor that doesn't have storage": grad of
        # a lengths= call under autocast), though the tensors are the probe's own
        outside_transforms = torch._C._DisableFuncTorch()
        with outside_transforms, torch.autocast(device_type, dtype=autocast_dtype), torch.set_grad_enabled(grad):
            if not call.packed:
                out = probe_lstm(x[None], state, weights, *flags, False)
            else:
                probe_sizes = torch.tensor([2, 1] if call.varying else [1], dtype=torch.int64, device="cpu")
                out = probe_lstm(x, probe_sizes, state, weights, *flags)
        return tuple(t.dtype for t in out)

    try:
        found = _Autocast(probe())
    except RuntimeError as error:
        if device_type != "cpu" or not onednn_enabled():
            raise
        # oneDNN's LSTM has no bfloat16 kernel on CPUs without AVX-512 (seen on an AMD EPYC Zen 3: "could not create
        # a primitive descriptor"), so nn.LSTM fails under bfloat16 autocast there. Its ATen path (oneDNN off) runs
        # the call, in its own dtypes: those are given instead of the failure.
        with onednn_off():
            try:
                dtypes = probe()
            except RuntimeError:
                raise error from None
        warnings.warn(
            f"fastlstm: nn.LSTM's oneDNN path fails this call under {device_type} autocast here ({error}); giving "
            f"the output dtypes nn.LSTM gives with oneDNN off ({dtypes})",
            stacklevel=backends.outside_stacklevel(),
        )
        found = _Autocast(dtypes, onednn=False)
    # bounded as the other caches of calls: it had kept an entry for every configuration a process met
    backends.remember(_AUTOCAST_DTYPES, key, found)
    return found


def _autocast_key(device_type: str) -> tuple | bool:
    """What decides autocast's dtypes for a call on device_type beside the call itself: autocast's dtype there,
    which ATen path nn.LSTM takes (oneDNN off, nn.LSTM under CPU bfloat16 autocast computes and returns float32;
    cuDNN off, CUDA's nn.LSTM leaves cuDNN too), and grad mode (oneDNN takes some dtypes at inference only: a
    float16 model under CPU bfloat16 autocast gives float32 where grad mode is on). False when autocast is off
    there."""
    if not _autocast_enabled(device_type):
        return False
    return device_type, torch.get_autocast_dtype(device_type), *_aten_paths(), torch.is_grad_enabled()


@backends.constant_under_compile
def _aten_paths() -> tuple[bool, bool]:
    """Whether oneDNN and cuDNN are on: constants while torch.compile traces (dynamo cannot trace the getters)."""
    return onednn_enabled(), torch._C._get_cudnn_enabled()


def _autocast_casts(backend, weights, projections, dtype: torch.dtype) -> list[Tensor | None]:
    """The weights (None stays None) of a call under autocast, cast to dtype by `backend` (from autocast's cache of
    casts where it can: once per region, as nn.LSTM's weights and biases are), except the projections (w_hr, where
    `projections` says so), cast afresh on every call: nn.LSTM's ATen path multiplies by w_hr's transpose, a view,
    which autocast's cache never keeps; so an optimizer step inside one autocast region changes nn.LSTM's w_hr at
    once, and its other weights at the next region."""
    cached = backend.autocast_weights([None if fresh else w for w, fresh in zip(weights, projections)], dtype)
    return [w.to(dtype) if fresh and w is not None else c for w, c, fresh in zip(weights, cached, projections)]


def _autocast_off(device_type: str):
    """Autocast off for a block. Eager calls take the C++ guard that torch.autocast(enabled=False) also sets
    (~1 us against ~10: a step under autocast paid that); graphs being traced take torch.autocast, which dynamo
    knows."""
    if torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    return torch._C._DisableAutocast()


def _no_weight() -> None:
    """A stand-in for a weight's weakref that no weight matches (LSTM._init_flat_weights)."""
    return None


def _tracked(tensors) -> bool:
    """Whether autograd tracks any of `tensors` (grad mode aside)."""
    if torch._C._are_functorch_transforms_active():  # a vmap's wrappers hide requires_grad
        return any(backends.autograd_tracks(t) for t in tensors)
    for t in tensors:  # a loop, not any(): this runs on every call
        if t.requires_grad:
            return True
    return False


def _traced() -> bool:
    """Whether a graph is being traced: torch.compile, TorchScript's tracer, or an ONNX export."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or dispatch.in_onnx_export()


_PROXY_MODE = torch._C._TorchDispatchModeKey.PROXY


def _bias_sum(b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """b_ih + b_hh. In a graph being recorded (make_fx, torch.export), a sum whose backward gives each bias a node of
    its own: an add's backward hands both one node, and joint-graph exports (aot_export_module(trace_joint=True),
    torch.export's _export_forward_backward) map gradients to parameters by node, so one bias lost its gradient
    (torch's AssertionError, for any two parameters added). Eagerly the add: the stack costs ~3 us a layer."""
    # dynamo before torch 2.6 cannot trace the mode lookup; while it compiles, no make_fx records this frame
    recorded = not torch.compiler.is_compiling() and torch._C._get_dispatch_mode(_PROXY_MODE) is not None
    if recorded or backends.exporting():
        return torch.stack(torch.broadcast_tensors(b_ih, b_hh)).sum(0)  # a bias nn.LSTM broadcasts (note 16)
    return b_ih + b_hh


def _onednn_lstm_available(input: Tensor) -> bool:
    """native.onednn_lstm_available for a CPU call, True elsewhere."""
    return input.device.type != "cpu" or onednn_lstm_available()


def _not_a_state_list(hx) -> TypeError:
    """torch._VF.lstm's exception for a state that is not a tuple or list of tensors (a dict, a bare tensor)."""
    return TypeError(f"LSTM: hx must be a tuple (h_0, c_0) of tensors, got {type(hx).__name__}")


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _within_batch_sizes(data: Tensor, batch_sizes: Tensor) -> Tensor:
    """Packed data for nn.LSTM's own call of a bidirectional stack, without rows past its batch sizes' sum (a
    hand-built pack over a larger buffer). Every path reads the rows the batch sizes cover and leaves the rest, in
    both directions, the fast backends' padding included; nn.LSTM's reverse direction alone counts back from the
    data's last row, so that it reads other rows than its forward direction (the later ones, each step's of another
    sequence or step). Given the covered rows alone, it gives its numbers for the pack without the extra rows."""
    rows = int(batch_sizes.sum())
    return data[:rows] if 0 <= rows < data.shape[0] else data


def _without_empty_steps(batch_sizes: Tensor) -> Tensor:
    """A pack's batch sizes less the trailing steps of size 0, which no sequence reaches (a pack built by hand with
    lengths shorter than its padded length): nn.LSTM runs such a pack as the pack without them, and so do the fast
    backends, which take only steps of one row or more. Zeros before a live step stay: the fast backends refuse them,
    where nn.LSTM, and so the native path, drops the rows after the zero or fails, by the pack ([3, 0, 1]: 3 rows of 4
    out; [2, 0, 2]: a size mismatch)."""
    if batch_sizes.numel() < 2 or batch_sizes[-1] != 0 or batch_sizes[0] == 0:
        return batch_sizes
    return batch_sizes[: int(batch_sizes.nonzero()[-1]) + 1]


def _batch_sizes_malformed(batch_sizes: Tensor) -> bool:
    """Whether a pack's batch sizes grow somewhere ([3, 0, 1], [1, 2]) or are not one-dimensional ([[3]]): built by
    hand, as torch's packing never makes them. The fast backends refuse such a pack; nn.LSTM runs it as its kernels
    read it, returning ([3, 0, 1]: the rows up to the zero; [[3]] as [3]) or raising ([2, 0, 2], [1, 2]), so `auto`
    leaves it to nn.LSTM's own call."""
    if batch_sizes.dim() != 1:
        return True
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        # torch 2.4's transforms wrap sizes made inside them (lengths=, a pack built there), and tolist() finds no
        # data in a wrapper ("Cannot access data pointer of Tensor that doesn't have storage"); torch 2.5's dynamo
        # failed tolist() on a fake tensor in its backend compiler (a graph break either way, a clean one here)
        return bool((batch_sizes[1:] > batch_sizes[:-1]).any())
    return _grows(batch_sizes.tolist())


def _grows(sizes: list) -> bool:
    # a list's sort: 0.5 us at 10 steps, 1.7 at 100, where comparing as tensors took 4.4 (a call's key reads it)
    return sizes != sorted(sizes, reverse=True)


def _state_dtype_differs(input: Tensor, state) -> bool:
    """Whether a step's (checked) state holds a tensor of another dtype than the input."""
    return state is not None and (state[0].dtype != input.dtype or state[1].dtype != input.dtype)


def step_of(module: LSTM, input: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """module.step(input, state), as a function: what an FX graph of a model that streams calls (LSTM._fx_step)."""
    return module.step(input, state)


def _fx_tracer(*args):
    """The torch.fx tracer of the first Proxy among a call's arguments (a state of two Proxies, say), or None."""
    for arg in args:  # runs on every call: no generator, no tuple built
        if isinstance(arg, torch.fx.Proxy):
            return arg.tracer
        if type(arg) is tuple or type(arg) is list:
            for value in arg:
                if isinstance(value, torch.fx.Proxy):
                    return value.tracer
    return None


def _check_step_args(input, state) -> None:
    """LSTM.step's own checks, in its terms (x_t and a state of layers), before forward's, which would speak of a
    sequence: an x_t of 1 or 2 dimensions, and a state of None or (h, c), one dimension more. Written out rather
    than looped: a step of a small model costs ~35 us, and a loop over the tensors cost 1.5 of them."""
    dims = input.dim() if isinstance(input, Tensor) else None
    if dims not in (1, 2):
        got = f"{dims}D" if dims is not None else f"a {type(input).__name__}"
        raise ValueError(f"LSTM.step: Expected input to be 1D (unbatched) or 2D [batch, features], got {got}")
    if state is None:
        return
    pair = isinstance(state, (tuple, list)) and len(state) == 2
    if not (pair and isinstance(state[0], Tensor) and isinstance(state[1], Tensor)):
        raise TypeError(f"LSTM.step: state must be None or (h, c), two tensors; got {_describe(state)}")
    h, c = state
    if h.dim() != dims + 1 or c.dim() != dims + 1:
        batched = dims == 2
        layout = "[num_layers, batch, " if batched else "[num_layers, "
        raise ValueError(
            f"LSTM.step: for a{' batched' if batched else 'n unbatched'} {dims}D input the state is "
            f"(h {layout}proj_size or hidden_size], c {layout}hidden_size]), got h {h.dim()}D and c {c.dim()}D"
        )


def _holds_bool(lengths) -> bool:
    """Whether a list or tuple of lengths holds a bool: torch.as_tensor reads [True, 6] as [1, 6], where only an
    all-bool list gives a bool tensor."""
    return isinstance(lengths, (list, tuple)) and any(isinstance(v, bool) for v in lengths)


def _lengths_as_int64(lengths) -> Tensor:
    """lengths= as an int64 CPU tensor: whole numbers, given as integers or as floats that hold whole numbers (a
    mask's float sum, say). pack_padded_sequence truncates 2.5 to 2 and reads True as 1; a length is a count, so
    here those are the caller's mistake, and anything torch cannot read as numbers is named as lengths'."""
    try:
        # on the CPU whatever torch.set_default_device says, as the batch sizes are
        given = lengths.detach().to("cpu") if isinstance(lengths, Tensor) else torch.as_tensor(lengths, device="cpu")
    except (TypeError, ValueError, RuntimeError, OverflowError, NotImplementedError) as e:
        raise ValueError(f"LSTM: lengths must be whole numbers, one per sequence; {type(e).__name__}: {e}") from e
    if given.dtype == torch.bool or given.is_complex():
        raise ValueError(f"LSTM: lengths must be whole numbers, one per sequence, got a {given.dtype} tensor")
    if _holds_bool(lengths):
        raise ValueError(f"LSTM: lengths must be whole numbers, one per sequence, got {list(lengths)}")
    if given.is_floating_point() and not (torch.isfinite(given) & (given == given.round())).all():
        raise ValueError(f"LSTM: lengths must be whole numbers, got {given.tolist()}")
    return given.to(torch.int64)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs any hook, its own or one registered for every module (what Module.__call__
    asks before it takes its fast path)."""
    if module._forward_pre_hooks or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    hooks = torch.nn.modules.module
    return any(
        getattr(hooks, name, None)
        for name in (
            "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )  # fmt: skip


def _no_live_row(data: Tensor, batch_sizes: Tensor | None) -> bool:
    """A pack with nothing to compute: no rows, or batch sizes all 0 (built by hand, over a buffer). nn.LSTM's own
    call answers it, whatever the backend: the fast ones take steps of one row or more (LSTM.forward's checked
    plan and empty_pack)."""
    return batch_sizes is not None and (data.shape[0] == 0 or not int(batch_sizes[0]))


def _dtype_mismatch(input: Tensor, weight: Tensor) -> str:
    """nn.LSTM's words for an input whose dtype is not the weights' (outside autocast)."""
    return (
        f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). Convert input: "
        f"input.to({weight.dtype}), or convert model: model.to({input.dtype})"
    )


def _not_dense_call(input, hx) -> bool:
    """Whether the input or a tensor of hx is not dense (_not_dense): nn.LSTM's own forward takes such a call (with
    lengths=, the pack made of it). LSTM.forward routes by it, and explain() answers by it."""
    return _not_dense((input, *(hx if isinstance(hx, (tuple, list)) else ())))


def _not_dense(tensors) -> bool:
    """Whether any of these tensors is sparse, nested or otherwise not strided: no backend reads those, and
    nn.LSTM's own forward decides what they give (torch 2.13: a sparse h0 runs, a sparse input or c0 raises)."""
    for t in tensors:  # a loop, not any(): this runs on every step
        if isinstance(t, Tensor) and (t.layout != torch.strided or t.is_nested):
            return True
    return False


def _describe(value) -> str:
    """What a caller passed as a state, for an error message."""
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value)
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"


def _saveable(input: Tensor, hx):
    """input and hx (None or a tuple) with copies of any inference tensor (made under torch.inference_mode: a
    batch prepared there, say) when grad mode is on: autograd refuses to save those for backward, and the layers
    save their inputs. nn.LSTM takes them only where its own path copies the input first (batch_first), so a
    model would train or fail by layout and by which backend serves it; here it trains either way."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return input, hx
    if input.is_inference():
        input = input.clone()
    if hx is not None and (hx[0].is_inference() or hx[1].is_inference()):
        hx = tuple(t.clone() if t.is_inference() else t for t in hx)
    return input, hx


# A copy of the layers' initial state that a compiled graph keeps (_layer_states, _native_stack). Inductor may write
# over a tensor saved for backward that it believes nothing else reads, not counting another saved tensor that views
# the same memory (torch 2.6 to 2.15, which donate saved buffers by default). A state of zeros is such a case:
# compile merges the state's zeros with those of a backward (y[-1]'s, where the state has as many layers as y has
# steps; h_n[-1]'s; step()'s output's), saves them once, and the layers' views of them were written over before
# their backward read them as h0 and c0: wrong weight and input gradients, no error (cpp's op, the reference
# backend's aten ops and native's aten::lstm alike). A clone would not do, inductor drops clones as no-ops; an op of
# its own copies the state into buffers of which each saved tensor (a layer's h0 or c0) views its own part. One
# call for the stack (~11 us; a compiled training step of B1-T5-H32 took 0.05 ms longer, 15%, one of B32-T50-H256-L2
# the same time within 3%).
@torch.library.custom_op("fastlstm::state_copy", mutates_args=(), schema="(Tensor h, Tensor c) -> (Tensor, Tensor)")
def _state_copy(h, c):
    return h.clone(), c.clone()


_state_copy.register_fake(lambda h, c: (torch.empty_like(h), torch.empty_like(c)))
_state_copy.register_autograd(lambda ctx, grad_h, grad_c: (grad_h, grad_c))


def _compiling_a_backward() -> bool:
    """Whether torch.compile traces a call whose backward it may compile (_state_copy). Not torch.export: its
    programs keep aten's ops alone where the layers do (the reference backend's run without fastlstm); not under
    torch.func's transforms, which the op has no rule for."""
    if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        return False
    return not backends.exporting() and not torch._C._are_functorch_transforms_active()


# torch's own nn.LSTM, as it was when fastlstm was imported: a script may swap fastlstm in for every model it
# builds by `torch.nn.LSTM = fastlstm.LSTM`, after which nn.LSTM, looked up at call time, is this module's class
# (torch.jit.script then rebuilt a fastlstm layer, which it cannot script; sparse input recursed without end).
TORCH_LSTM = nn.LSTM


def _own_method(method):
    """nn.RNNBase's or nn.LSTM's `method`, called through a function defined here.

    Dynamo before torch 2.8 will not trace a method of a module whose function was defined in torch.nn: it looks
    such calls up in a table of nn.Module's methods and stops ("Dynamo does not know how to trace method
    `check_forward_args`"). A function of fastlstm's own that calls nn.LSTM's with `self` it inlines, and the
    checks it runs are still nn.LSTM's, with their messages.
    """

    def call(self, *args, **kwargs):
        return method(self, *args, **kwargs)

    # Not functools.wraps: it would copy __module__ ("torch.nn.modules.rnn"), which is what dynamo looks at.
    call.__name__ = call.__qualname__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def rebuilt_as(module: nn.RNNBase, cls: type[nn.RNNBase]) -> nn.RNNBase:
    """A `cls` instance (nn.LSTM or LSTM) holding `module`'s state: the very Parameter objects, buffers, hooks,
    mode, device and dtype. A parametrized module gives the same kind of parametrized class over `cls`. What
    only fastlstm.LSTM has (its backend) stays behind when `cls` is not one."""
    # earlier releases kept _mixed_dtypes
    fastlstm_only = () if issubclass(cls, LSTM) else ("backend", "_mixed_dtypes", "_standard_shapes", "_size_tuple")
    if parametrize.is_parametrized(module):
        # parametrize swaps the class for a generated subclass holding the parametrized properties;
        # build the same kind of subclass over the target class.
        generated = type(module)
        namespace = {k: v for k, v in vars(generated).items() if k not in ("__dict__", "__weakref__")}
        cls = type(generated.__name__, (cls,), namespace)
    new = cls.__new__(cls)
    # The hook dicts themselves, shared (a handle taken before the conversion removes its hook from the rebuilt
    # module: RemovableHandle holds the dict); the other dicts (parameters, buffers, ...) copied
    state = {
        k: (v.copy() if isinstance(v, dict) and "hooks" not in k else v)
        for k, v in vars(module).items()
        if k not in fastlstm_only
    }
    new.__dict__.update(state)
    if issubclass(cls, LSTM):
        new.__dict__["_size_tuple"] = tuple(getattr(new, n) for n in _SIZE_NAMES)  # as LSTM.__setattr__ keeps it
    new._flat_weights_names = list(module._flat_weights_names)
    new._all_weights = [list(w) for w in module._all_weights]
    new._flat_weights = list(module._flat_weights)
    return new


def rebind_load_pre_hooks(new: nn.Module, old: nn.Module) -> None:
    """load_state_dict pre-hooks registered through the public API hold a weak reference to the module they are
    called with (torch's _WrappedHook): point those of `old` at `new`, which replaces it, in the dict both share,
    under the same ids (their handles still remove them). Left as they were, they would be called with the replaced
    module, or raise once it is gone ("the hook of a dead Module")."""
    hooks = getattr(new, "_load_state_dict_pre_hooks", None)
    for key, hook in list((hooks or {}).items()):
        ref = getattr(hook, "module", None)
        if getattr(hook, "with_module", False) and isinstance(ref, weakref.ref) and ref() is old:
            hooks[key] = type(hook)(hook.hook, new)  # wrapped anew: the hook's name and __wrapped__ kept


class LSTM(nn.RNNBase):
    """Drop-in torch.nn.LSTM. Same constructor, parameters, state_dict, inputs and outputs.

    Extra keyword-only argument:
        backend: None (the default) reads $FASTLSTM_BACKEND at each call, "auto" when it is unset; "auto" takes
            the fastest backend that supports each call (fastlstm.dispatch says how it chooses); one of
            "native", "reference", "cpp", "triton" forces that backend, and a call it cannot serve raises
            BackendUnavailableError. Calls inside torch.onnx.export or torch.jit.trace take native whatever
            the backend, so that the graph holds nn.LSTM's op (it runs where fastlstm is not installed).

    Beyond nn.LSTM: forward's keyword-only `lengths=` (a padded batch with per-sequence lengths, the numbers of
    packing it) and `step()` (one time step of streaming inference or training, state carried by the caller).

    Built on nn.RNNBase in mode "LSTM" rather than on nn.LSTM, because TorchDynamo refuses to trace any
    nn.LSTM instance. The input checks and their errors, parameters, state_dict and flatten_parameters are
    nn.LSTM's; torch.jit.script scripts an nn.LSTM holding the same state (__prepare_scriptable__).
    """

    backend: str | None = None  # class default keeps pickles made without the attribute loadable

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        if backend is not None:
            dispatch.validate_name(backend)
        self.backend = backend

    # Validation and hidden-state permutation are nn.LSTM's own methods, so that every malformed call fails
    # exactly as it does with nn.LSTM (same exception type and message).
    check_input = _own_method(nn.RNNBase.check_input)
    get_expected_hidden_size = _own_method(nn.RNNBase.get_expected_hidden_size)
    check_hidden_size = _own_method(nn.RNNBase.check_hidden_size)
    get_expected_cell_size = _own_method(TORCH_LSTM.get_expected_cell_size)
    check_forward_args = _own_method(TORCH_LSTM.check_forward_args)
    permute_hidden = _own_method(TORCH_LSTM.permute_hidden)

    def __prepare_scriptable__(self) -> nn.LSTM:
        """torch.jit.script's hook: an nn.LSTM holding this module's state (see rebuilt_as): the very Parameter
        objects, and its hooks and parametrizations, which TorchScript then takes or refuses as it does
        nn.LSTM's.

        TorchScript cannot run this module's Python dispatch; nn.LSTM it can, and its numbers are the reference
        every backend matches. torch.jit.script puts the returned module where this one was in its parent (in
        the eager model too, as for every module with this hook, and before it knows whether scripting will
        succeed): that model then runs nn.LSTM's kernels, hooks and all.
        """
        return rebuilt_as(self, TORCH_LSTM)

    def _update_flat_weights(self) -> None:
        """nn.RNNBase's: re-read the weights when one was replaced (functional_call, parametrizations, ...).

        The same check, reading registered parameters straight from `_parameters` rather than through
        Module.__getattr__: a few microseconds of every call, which count when the model runs step by step.
        Anything else is read as nn.RNNBase reads it (hasattr, then getattr), and this runs once per call as
        there: a parametrization with state (spectral_norm's power iteration) then steps as often as with
        nn.LSTM.
        """
        parameters = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            if name in parameters:
                weight = parameters[name]
            else:
                weight = getattr(self, name) if hasattr(self, name) else None
            if weight is not None and ref is not None and ref() is not weight:
                self._init_flat_weights()
                return

    def _init_flat_weights(self) -> None:
        """nn.RNNBase's; while compiling, without its weakrefs, which dynamo in torch 2.5 cannot make: refs that
        match no weight in their place then make the next eager call read the weights again."""
        if not torch.compiler.is_compiling():
            super()._init_flat_weights()
            return
        names = self._flat_weights_names
        self._flat_weights = [getattr(self, n) if hasattr(self, n) else None for n in names]
        self._flat_weight_refs = [_no_weight] * len(names)
        self.flatten_parameters()

    def flatten_parameters(self) -> None:
        """nn.RNNBase's (cuDNN's weights as one buffer, on CUDA), except for weights a torch.func transform wraps
        (functional_call's under vmap / grad): they have no storage to point cuDNN at, and nn.RNNBase's reads
        their data pointers and raises. Per-sample gradients on CUDA pass such weights in (triton serves them)."""
        # Not while compiling: dynamo cannot trace the check (a parametrized weight broke fullgraph), and its
        # fake weights are no transform's
        if not torch.compiler.is_compiling() and any(
            w is not None and is_functorch_wrapped_tensor(w) for w in self._flat_weights
        ):
            return
        super().flatten_parameters()

    def _miscounted_weights(self) -> str:
        """Where the number of weights does not fit the flags (num_layers, bidirectional, bias, proj_size), as a
        model surgery of a flag alone leaves it, ATen's error for it; "" where it fits. What such a call gives is
        nn.LSTM's own path's to decide: ATen's raises that error, oneDNN's (float32 on the CPU) computes from the
        weights it finds (m.num_layers = 1 on two layers: the first layer's output), and the layers read by the
        new flags could take other layers' weights. So the call goes to nn.LSTM's own call (_plan)."""
        per_layer = 2 + 2 * bool(self.bias) + (self.proj_size > 0)
        count = len(self._flat_weights)
        if count % per_layer:
            return "got an incorrect number of RNN parameters"
        if count != per_layer * self.num_layers * self._num_directions:
            return "Expected more weights in stacked_rnn"
        return ""

    def _read_as(self) -> tuple[list[str], tuple[tuple[int, ...], ...]]:
        """What nn.LSTM reads each place of the weight list as with the module's flags, and that weight's shape as
        its constructor makes it."""
        sizes = (self.input_size, self.hidden_size, self.proj_size, self.num_layers, self.bidirectional, self.bias)
        # kept: a microsecond of every call where computed afresh. Keyed by the sizes and flags, which a model surgery
        # may change (m.input_size = 5 and a new weight_ih_l0), as nn.LSTM reads them
        kept = self.__dict__.get("_standard_shapes")
        if kept is not None and kept[0] == sizes:
            return kept[1], kept[2]
        directions = self._num_directions
        read_as = _constructor_names(self.num_layers, directions, bool(self.bias), self.proj_size > 0)
        expected = _standard_shapes(read_as, *sizes[:3], directions)
        if not torch.compiler.is_compiling():  # no side effects in a trace
            self._standard_shapes = (sizes, read_as, expected)
        return read_as, expected

    def _misshapen_weight(self) -> str:
        """The first weight whose shape is not the one nn.LSTM's kernels read it as, with both shapes; "" when none.
        That is the shape nn.LSTM's constructor gives it, or where the flags were changed after construction and the
        weights not, the shape of the weight read in its place (oneDNN reads past the end of one of another shape:
        m.bias = False on two layers reads a bias as the next layer's w_ih; garbage numbers, NaN among them). A bias
        nn.LSTM broadcasts to the same numbers on each of its paths counts as its [4H] (_broadcast_bias), and the
        fast paths expand it so (_flat_bias). Read on every call: a `.data` swapped keeps the Parameter."""
        read_as, expected = self._read_as()
        names = self._flat_weights_names
        for k, (w, shape) in enumerate(zip(self._flat_weights, expected)):
            if w is None or w.shape == shape:
                continue
            if read_as[k].startswith("bias") and _broadcast_bias(w.shape, shape[0]):
                continue
            got = [int(n) for n in w.shape]  # ints, also where torch.jit.trace makes sizes tensors
            if names[k] == read_as[k]:
                return f"{names[k]} is {got} where nn.LSTM's constructor makes it {list(shape)}"
            return (
                f"{names[k]} is {got}, read where nn.LSTM reads {read_as[k]} of {list(shape)}: the module's flags "
                "were changed after construction, its weights not"
            )
        return ""

    def _weights_as_built(self, weights: list[Tensor | None] | None = None) -> list[Tensor | None]:
        """The flat weights (or autocast's casts of them), each bias nn.LSTM broadcasts (_broadcast_bias) as the [4H]
        it stands for, in memory: nn.LSTM's oneDNN path reads the sum of a layer's biases by pointer, 4H values
        whatever its shape (b_ih and b_hh both of [1]: wrong numbers, float32 B3-H4 off by 0.62), and the fast
        backends take [4H]. The list itself where every bias has its constructor's shape."""
        weights = self._flat_weights if weights is None else weights
        if self._built_as_they_are(weights):
            return weights
        gates = 4 * self.hidden_size
        flat = list(weights)
        for k in self._bias_indices(weights):
            flat[k] = _flat_bias(flat[k], gates).contiguous()
        return flat

    def _built_as_they_are(self, weights: list[Tensor | None]) -> bool:
        """Whether _weights_as_built(weights) is the list itself: no bias, every bias of shape [4H], or a list nn.LSTM
        hands on as it is (_miscounted_weights, _plan). Asked rather than `is` between the lists, which dynamo in
        torch 2.5 compares element by element (data-dependent control flow: compile and export failed)."""
        if not self.bias or self._miscounted_weights():
            return True
        gates = 4 * self.hidden_size
        return all(weights[k].shape == (gates,) for k in self._bias_indices(weights))

    def _bias_indices(self, weights: list[Tensor | None]) -> list[int]:
        per_layer = self._per_layer(weights)
        return [k for k in range(len(weights)) if k % per_layer in (2, 3)]

    def _weights_mixed(self) -> bool:
        """Whether the weights do not all share one dtype (a state_dict loaded with assign=True, say). Only nn.LSTM's
        own path decides what that gives (an error, mostly), so dispatch sends such calls there. Read on every
        call: a `.data` swapped to another dtype keeps the Parameter, and so does not make the weights read afresh.
        """
        first = None
        for w in self._flat_weights:
            if w is None:
                continue
            if first is None:
                first = w.dtype
            elif w.dtype is not first:
                return True
        return False

    def _dtypes_mixed(self, input: Tensor, hx) -> bool:
        """Whether the weights, or c0 against the input, do not all share one dtype (outside autocast, which casts
        them). nn.LSTM's own path decides what that gives (ATen's cell takes a c0 of another dtype and promotes,
        oneDNN raises), so dispatch sends such calls there. An h0 of another dtype fails on every path (_check_call).
        """
        if self._weights_mixed():
            return True
        return hx is not None and hx[1].dtype != input.dtype and not _autocast_enabled(input.device.type)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.backend is None else f"{text}, backend={self.backend!r}"

    def forward(self, input, hx=None, **keywords):
        """nn.LSTM.forward, plus the keyword-only `lengths`.

        lengths: per-sequence lengths of a padded batch, [B] integers in 1..T (a tensor or a list, any order;
        ValueError otherwise), with input [B, T, I] (batch_first) or [T, B, I] and hx as for nn.LSTM. Gives the
        numbers of packing the batch and calling the module, without the round trip: the output padded to T
        steps, zero beyond each sequence's length (as pad_packed_sequence with total_length=T), and (h_n, c_n)
        taken at each sequence's own end, in the caller's order.

        `lengths` comes through **keywords rather than `*, lengths=None`: torch.onnx's TorchScript exporter passes
        every parameter that has a default positionally, keyword-only ones included, and then forward would
        receive one argument too many.
        """
        lengths = keywords.pop("lengths", None)
        if keywords:
            raise TypeError(f"LSTM.forward() got an unexpected keyword argument {next(iter(keywords))!r}")
        tracer = _fx_tracer(input, hx, lengths)
        if tracer is not None:
            return self._fx_leaf(tracer, input, hx, lengths)
        sparse = _not_dense_call(input, hx)
        if sparse and lengths is None:
            return TORCH_LSTM.forward(self, input, hx)
        self._update_flat_weights()  # parameters are read at call time, as nn.LSTM reads them
        if lengths is not None:
            return self._forward_lengths(input, hx, lengths, packing=sparse)
        key = self._call_key(input, hx)
        checked = _passed_before(key)
        repeated = checked is not None
        if not repeated:
            input, hx, batch_sizes, sorted_indices, unsorted_indices, is_batched = self._prepare(input, hx)
            amp = self._autocast_dtypes(input, hx, batch_sizes)
            choices = self._plan(input, hx, batch_sizes, amp)
            # a pack of no live row (batch sizes all 0, built by hand, over a buffer): nn.LSTM's own answer, no rows,
            # whatever the backend. Not a pack without rows (empty_pack below): the key holds the first batch size,
            # not the rows, and a malformed call remembered as native would send the well-formed ones of its key there
            checked = self._passed(key, choices, amp, empty=batch_sizes is not None and not int(batch_sizes[0]))
        else:  # the same kind of call passed every check before
            choices, amp = checked.choices, checked.amp
            if type(input) is PackedSequence:
                input, batch_sizes, sorted_indices, unsorted_indices, hx = self._unpack(input, hx)
                is_batched = True
            else:
                batch_sizes = sorted_indices = unsorted_indices = None
                is_batched = input.dim() == 3
                if not is_batched:
                    input, hx = self._as_batch_of_one(input, hx)
        input, hx = _saveable(input, hx)
        # a pack without rows (batch sizes all 0, or malformed) and one of no live row (checked.native): nn.LSTM's own
        # answer or error, whatever the backend; the fast ones take steps of one row or more
        empty_pack = batch_sizes is not None and input.shape[0] == 0
        if empty_pack or checked.native:
            if batch_sizes is not None and self.bidirectional:
                input = _within_batch_sizes(input, batch_sizes)
            if hx is None:
                hx = self._initial_state(input, None, batch_sizes, True)
            weights = self._flat_weights if checked.weights_as_built else None
            output, h_n, c_n = self._native_stack(input, hx, batch_sizes, amp, weights)
        elif batch_sizes is not None:
            steps = batch_sizes if repeated or _traced() else _without_empty_steps(batch_sizes)
            output, h_n, c_n = self._fast_stack(input, hx, steps, choices, amp)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
            y, h_n, c_n = self._fast_stack(x, hx, None, choices, amp)
            output = y.transpose(0, 1) if self.batch_first else y

        if batch_sizes is not None:
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden((h_n, c_n), unsorted_indices)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, self.permute_hidden((h_n, c_n), unsorted_indices)

    def _fx_leaf(self, tracer, input, hx, lengths):
        """Under torch.fx.symbolic_trace: one call_module node, as FX records nn.LSTM (it does not trace into torch.nn
        modules). forward branches on values a symbolic trace does not have; the traced module calls this one."""
        name = tracer.path_of_module(self)
        return tracer.create_proxy("call_module", name, (input, hx), {} if lengths is None else {"lengths": lengths})

    def _fx_step(self, tracer, input, state):
        """Under torch.fx.symbolic_trace: FX records a module's forward calls only (call_module), and step branches
        on the input's dimensions, which a symbolic trace does not have ("Expected input to be 1D ... got a Proxy").
        A call of step_of on the module instead; the traced module calls step."""
        path = tracer.path_of_module(self)
        if not path:
            # The traced root: its graph module replaces it, and is no LSTM to step
            raise torch.fx.proxy.TraceError(
                "LSTM.step in the forward of the LSTM being traced: trace a module that holds the LSTM instead"
            )
        module = tracer.create_proxy("get_attr", path, (), {})
        return tracer.create_proxy("call_function", step_of, (module, input, state), {})

    def _forward_lengths(self, input: Tensor, hx, lengths, packing=False) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """A padded batch with per-sequence lengths: the numbers of packing it, without packing (with packing where
        `packing` says: sparse or nested tensors, which only nn.LSTM's own forward takes).

        input: [B, T, I] (batch_first) or [T, B, I]; lengths: [B] ints in 1..T, any order.
        Returns the padded output, T steps long, zero beyond each length (as pad_packed_sequence with
        total_length=T gives it), and (h_n, c_n) taken at each sequence's own end, in the caller's order.
        """
        lengths, (shortest, longest) = self._check_lengths(input, lengths)
        if (packing or torch.jit.is_tracing()) and lengths.numel():
            # A trace keeps ops, not the Python ints the sort and the batch sizes become below: it would replay
            # this batch's order and sizes on every other. Packing records them as ops, as a traced model that packs
            # for nn.LSTM records them (the same numbers: lengths= gives packing's). A sparse h0 went to nn.LSTM's
            # own forward with the lengths left behind: outputs past each length, h_n at step T.
            packed = pack_padded_sequence(input, lengths, self.batch_first, enforce_sorted=False)
            y, state = self.forward(packed, hx)
            time_dim = 1 if self.batch_first else 0
            return pad_packed_sequence(y, self.batch_first, total_length=input.size(time_dim))[0], state
        # What decides the checks and the plan: the padded call's own key, the steps the call runs (the plan's
        # length, as a pack's) and whether the lengths vary (autocast's dtypes read that of a pack); the lengths'
        # values are checked above on every call
        key = self._call_key(input, hx) if lengths.numel() else None
        key = key and ("lengths", key, longest, shortest != longest)
        checked = _passed_before(key)
        if checked is None:
            input, hx, *_ = self._prepare(input, hx)  # every check of a plain call, in the caller's order
        elif hx is None:  # this kind of call passed every check before
            hx = self._initial_state(input, None, None, True)
        input, hx = _saveable(input, hx)
        if lengths.numel() == 0:
            return self.forward(input, hx)
        seq_len = input.size(1 if self.batch_first else 0)
        x, hx, batch_sizes, live, unorder = self._sorted_by_length(input, hx, lengths, longest)
        if checked is None:
            amp = self._autocast_dtypes(x, hx, batch_sizes)
            choices = self._plan(x, hx, batch_sizes, amp)
            checked = self._passed(key, choices, amp)
        choices, amp = checked.choices, checked.amp
        if checked.native:
            rows = packed_rows(batch_sizes, input.device)
            weights = self._flat_weights if checked.weights_as_built else None
            data, h_n, c_n = self._native_stack(pack_padded(x, rows), hx, batch_sizes, amp, weights)
            y = pad_packed(data, batch_sizes, rows)
        else:
            if shortest < longest:
                # Zero the padding, which packing leaves out: the fast layers multiply it by zero gate gradients
                # for dW_ih, and NaN or inf there (missing values) would make that NaN.
                x = torch.where(host_to_device(live, x.device)[:, :, None], x, 0)
            y, h_n, c_n = self._fast_stack(x, hx, batch_sizes, choices, amp)
        if longest < seq_len:
            y = torch.cat([y, y.new_zeros(seq_len - longest, *y.shape[1:])])
        # batch-major for batch_first through the reordering's own copy: contiguous, as pad_packed_sequence gives it
        # (code written for it may .view() the output)
        y = y.transpose(0, 1).index_select(0, unorder) if self.batch_first else y.index_select(1, unorder)
        return y, self.permute_hidden((h_n, c_n), unorder)

    def _check_lengths(self, input, lengths) -> tuple[Tensor, tuple[int, int]]:
        """lengths= as int64 on the CPU, after nn.LSTM-style checks of it against the padded input, and the
        shortest and longest of them ((0, 0) for none)."""
        if isinstance(input, PackedSequence) or not isinstance(input, Tensor) or input.dim() != 3:
            raise ValueError("LSTM: lengths= takes a padded, batched 3-D input tensor")
        batch_dim = 0 if self.batch_first else 1
        # Not while compiling: dynamo cannot trace the check
        if isinstance(lengths, Tensor) and not torch.compiler.is_compiling() and backends.batched_under_vmap(lengths):
            # Their values decide the packing, read on the host; torch's own error named .item(), not the cause
            raise RuntimeError(
                "LSTM: lengths= batched under torch.vmap (lengths of their own for each sample) is not supported: "
                "the lengths are read as values to pack the batch; pass lengths shared by the samples, or call "
                "the model sample by sample"
            )
        lengths = _lengths_as_int64(lengths)
        if lengths.dim() != 1 or lengths.numel() != input.size(batch_dim):
            raise ValueError(
                f"LSTM: lengths must be 1-D with one entry per sequence ({input.size(batch_dim)}), got shape "
                f"{tuple(lengths.shape)}"
            )
        if not lengths.numel():
            return lengths, (0, 0)
        seq_len = input.size(1 - batch_dim)
        if seq_len == 0:
            raise ValueError("LSTM: lengths= takes a padded input of 1 or more steps, got 0")
        shortest, longest = (int(end) for end in torch.aminmax(lengths))
        if shortest < 1 or longest > seq_len:
            raise ValueError(f"LSTM: every length must be in 1..{seq_len} (the padded length), got {lengths.tolist()}")
        return lengths, (shortest, longest)

    def _sorted_by_length(self, input: Tensor, hx, lengths: Tensor, longest: int):
        """A checked padded batch as the layers take it: time-major, rows (and hx) sorted by length, longest first,
        and as many steps as the longest (as packing leaves out the steps where no sequence is live, whose batch size
        of 0 would also make the lengths look varied to autocast's dtypes). Returns (x [T', B, I], hx, batch_sizes
        [T'], whether each of x's rows is live at each step [T', B], the row order that undoes the sort), T' the
        longest length (as _check_lengths gives it)."""
        # pack_padded_sequence's own sort (not a stable one): tied lengths then take the rows packing gives them,
        # and dropout between layers draws the same numbers for each sequence.
        batch_dim = 0 if self.batch_first else 1
        sorted_lengths, order = torch.sort(lengths, descending=True)
        unorder = order.argsort()  # a permutation's inverse
        order, unorder = host_to_device(order, input.device), host_to_device(unorder, input.device)
        live = torch.arange(longest, device="cpu")[:, None] < sorted_lengths[None, :]
        x = input.index_select(batch_dim, order)
        x = x[:, :longest].transpose(0, 1) if self.batch_first else x[:longest]
        return x, self.permute_hidden(hx, order), live.sum(1), live, unorder

    def step(self, input: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One time step through every layer, for streaming: the same numbers as forward on a 1-step sequence.

        input: [B, I] (or [I] unbatched); state: (h [L, B, P], c [L, B, H]) (or [L, P], [L, H]) or None for
        zeros. Returns (output [B, P], (h, c)) -- feed (h, c) back in with the next step. Unidirectional
        modules only (the reverse direction reads the future). Differentiable; dropout acts in training mode.
        """
        if self.bidirectional:
            raise ValueError("LSTM.step: needs a unidirectional LSTM (the reverse direction reads the future)")
        tracer = _fx_tracer(input, state)
        if tracer is not None:
            return self._fx_step(tracer, input, state)
        _check_step_args(input, state)
        batched = input.dim() == 2
        time_dim = 1 if self.batch_first and batched else 0
        if _has_hooks(self):
            # A module's hooks run on calls of it, and some keep its weights: prune and the older weight_norm
            # recompute a weight in a forward pre-hook. A step then is such a call, on the 1-step sequence, so that
            # every hook runs as on forward's (a step had read the weight the last call left: stale after an
            # optimizer step, and a second backward through its graph failed).
            y, state = self(input.unsqueeze(time_dim), state)
            return y.squeeze(time_dim), state
        tensors = (input,) if state is None else (input, *state)
        if _autocast_enabled(input.device.type) or _state_dtype_differs(input, state) or _not_dense(tensors):
            # nn.LSTM's dtypes under autocast, or with a state of another dtype, are forward's to work out, and
            # what sparse or nested tensors give
            y, state = self.forward(input.unsqueeze(time_dim), state)
            return y.squeeze(time_dim), state
        sequence = input.unsqueeze(time_dim)  # a 1-step sequence
        self._update_flat_weights()
        # Forward's plans and checks: a step is a 1-step sequence to them (the same key, the same backends)
        key = self._call_key(sequence, state)
        checked = _passed_before(key)
        if checked is None:
            x, state, *_ = self._prepare(sequence, state)
            choices = self._plan(x, state, None)
            self._passed(key, choices, None)
            x = x.squeeze(1 if self.batch_first else 0)
        else:  # this kind of step passed every check before
            choices = checked.choices
            x, state = (input, state) if batched else self._as_batch_of_one(input, state)
        x, state = _saveable(x, state)
        whole = self._inference_stack_backend(choices, x, state)
        if whole is not None:
            x, h_n, c_n = self._inference_stack(whole, x, state, None)
        elif all(choice.backend == "native" for choice in choices):
            x, h_n, c_n = self._native_step(x, state)
        else:
            y, h_n, c_n = self._layered_stack(x[None], *self._layer_states(x[None], state), None, choices)
            x = y[0]
        if not batched:
            return x.squeeze(0), (h_n.squeeze(1), c_n.squeeze(1))
        return x, (h_n, c_n)

    def _native_step(self, x: Tensor, hx) -> tuple[Tensor, Tensor, Tensor]:
        """One step of every layer where native serves it: x [B, I], hx (h0, c0) or None -> (y [B, P], h_n, c_n), in
        ATen's cells or nn.LSTM's own call as dispatch.native_step_in_cells says (its own call where the weights are
        not nn.LSTM's count: its error, as forward gives it)."""
        if dispatch.native_step_in_cells(x.dtype) and not self._miscounted_weights():
            return self._native_cells(x, *self._layer_states(x[None], hx))
        time_dim = 1 if self.batch_first else 0
        sequence = x.unsqueeze(time_dim)
        y, h_n, c_n = self._native_stack(sequence, self._initial_state(sequence, hx, None, True), None)
        return y.squeeze(time_dim), h_n, c_n

    def _native_cells(self, x: Tensor, h0, c0) -> tuple[Tensor, Tensor, Tensor]:
        """One step of every layer in ATen's cells: x [B, I] -> (y [B, P], h_n, c_n)."""
        h_out, c_out = [], []
        dropout = self._between_layers_dropout()
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh, w_hr = self._parameters_of(layer, 0)
            if w_hr is None:
                h_next, c_next = torch.lstm_cell(x, (h0[layer], c0[layer]), w_ih, w_hh, b_ih, b_hh)
            else:
                gates = F.linear(x, w_ih, b_ih) + F.linear(h0[layer], w_hh, b_hh)
                h_next, c_next = reference.lstm_cell(gates, c0[layer], w_hr)
            h_out.append(h_next)
            c_out.append(c_next)
            x = h_next
            if dropout and layer < self.num_layers - 1:
                x = F.dropout(x, dropout, training=True)
        return x, torch.stack(h_out), torch.stack(c_out)

    def _needs_grad(self, input: Tensor, hx) -> bool:
        """Whether autograd needs this call's gradients: grad mode on and the input, the state (hx may be None) or
        a weight requires one."""
        if not torch.is_grad_enabled():
            return False
        tensors = (input, *self._flat_weights) if hx is None else (input, hx[0], hx[1], *self._flat_weights)
        return _tracked(tensors)

    def _transforms(self, input: Tensor, hx) -> _Transforms:
        """What torch.func's transforms and forward-mode AD make of this call (see _Transforms)."""
        dual, functorch = _forward_ad_active(), torch._C._are_functorch_transforms_active()
        if not (dual or functorch):
            return _NO_TRANSFORMS
        tensors = [t for t in (input, *hx, *self._flat_weights) if isinstance(t, Tensor)]
        tangent = dual and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)
        tracked = functorch and bool(backends.functorch_grad_levels(tensors))
        kinds = _functorch_transform_kinds() if functorch else frozenset()
        return _Transforms(
            func_grad=tangent or tracked,
            vmapped="Vmap" in kinds,
            forward_ad=tangent or "Jvp" in kinds,
            grad_of_grad=tracked and backends.differentiated_twice(tensors),
            functionalized=tracked and "Functionalize" in kinds,
        )

    def _call_key(self, input, hx) -> tuple | None:
        """What decides whether a call passes every check, which backends serve it and what autocast makes of it,
        for the common call: a tensor (batched or not) or a PackedSequence, (h0, c0) a tuple of tensors or None, not
        traced. None for any other call.

        Each check of _prepare and each input of _plan and _autocast_dtypes reads only these (the module's sizes
        and flags are constant after construction), so a call whose key matches one that passed needs none of
        them again.
        """
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None  # graphs decide once per trace
        if backends.dispatch_mode_active():
            # A dispatch mode sees every op, and selective activation checkpointing matches a recomputed call's ops
            # with its first run's, one by one: a checked call and a remembered one would run different ops
            return None
        if torch._C._are_functorch_transforms_active() or _forward_ad_active():
            return None  # whether a transform or dual tensors track gradients here is worked out per call (_plan)
        if not _checks_are_ours(type(self)):
            return None  # a subclass's own checks run on every call, as nn.LSTM runs them
        if type(input) is PackedSequence:
            order = input.sorted_indices
            input, batch_sizes = input.data, input.batch_sizes
            if type(input) is not Tensor or type(batch_sizes) is not Tensor or batch_sizes.dim() != 1:
                return None
            if input.dim() != 2 or not batch_sizes.numel() or not (order is None or type(order) is Tensor):
                return None
            # what the checks, the plan and autocast read of a pack: not its count of rows, which varies with the
            # lengths (_autocast_dtypes: whether the batch sizes vary); an unsorted pack's state is checked as its
            # sorted indices select it (_unpack, on every call): of as many rows as they hold
            sizes = batch_sizes.tolist()
            first, last = sizes[0], sizes[-1]
            if first and not last:
                return None  # steps no sequence reaches, which forward drops on the checked path
            if _grows(sizes):
                return None  # a malformed pack, whose key would match well-formed ones (_plan)
            rows = None if order is None else order.numel()
            shape = (
                input.shape[1], batch_sizes.dtype, batch_sizes.device, batch_sizes.numel(), first, first != last, rows
            )  # fmt: skip
        elif type(input) is Tensor and input.dim() in (2, 3):
            shape = input.shape
        else:
            return None
        weights = self._flat_weights
        weight = weights[0] if weights else None
        if weight is None:
            return None  # a weight deleted (`del m.weight_hh_l0`): _check_call raises nn.LSTM's error
        amp = torch._C._is_any_autocast_enabled() and _autocast_key(input.device.type)
        expected = self._read_as()[1]
        device, dtype, mixed, standard = weight.device, weight.dtype, False, len(weights) == len(expected)
        # one pass for what every call reads of the weights (1.5 us of a call with 16 weights where each had its own)
        for k, w in enumerate(weights):
            if w is None or w.device != device:
                return None  # a weight deleted, or left on another device: _check_call raises nn.LSTM's error
            mixed = mixed or w.dtype is not dtype  # _weights_mixed
            standard = standard and w.shape == expected[k]
        # the common case of _misshapen_weight's, in the pass: every weight has its constructor's shape
        shapes = None if standard else self._misshapen_weight()
        if hx is None:
            state = None
        elif type(hx) is tuple and len(hx) == 2 and type(hx[0]) is Tensor and type(hx[1]) is Tensor:
            h, c = hx
            state = (h.shape, h.dtype, h.device, c.shape, c.dtype, c.device)
        else:
            return None
        grad = self._needs_grad(input, hx)
        return (
            shape, input.dtype, input.device, weight.dtype, weight.device, state, grad, grad and input.requires_grad,
            self.batch_first, self.backend, os.environ.get(dispatch.ENV_VAR), self.input_size, self.hidden_size,
            self.proj_size, self.num_layers, self.bidirectional, self.bias, len(weights), mixed, shapes,
            torch.get_num_threads(), amp, _onednn_lstm_available(input),
        )  # fmt: skip

    def _passed(self, key: tuple | None, choices: tuple[dispatch.Choice, ...], amp: _Autocast | None, empty=False):
        """A call that passed every check: its plan, with what its repeats need not work out again (`empty`: nothing
        to compute, which nn.LSTM's own call answers), remembered under its key (None: not to be remembered)."""
        native = empty or all(choice.backend == "native" for choice in choices)
        checked = _Checked(choices, amp, native, self._built_as_they_are(self._flat_weights))
        if key is not None:
            backends.remember(_CHECKED_CALLS, key, checked)
        return checked

    def _plan(self, input: Tensor, hx, batch_sizes: Tensor | None, amp=None) -> tuple[dispatch.Choice, ...]:
        """The backend of each (layer, direction) for prepared input, layer-major, forward before reverse.

        amp: what autocast makes of this call (see _autocast_dtypes); backends then compute in amp.dtypes[0].
        """
        if batch_sizes is not None:
            seq_len, batch = batch_sizes.numel(), int(batch_sizes[0])
        else:
            seq_len, batch = (input.size(1), input.size(0)) if self.batch_first else (input.size(0), input.size(1))
        needs_grad = self._needs_grad(input, hx)
        dtype = amp.dtypes[0] if amp else input.dtype
        # dynamo traces the plan once per graph, and exporters decide differently: the cache is for eager calls (and
        # symbolic sizes, of make_fx's symbolic tracing or torch.export's non-strict one, cannot be hashed)
        traced = _traced() or not (type(seq_len) is int and type(batch) is int)
        shape = _CallShape(
            input.device.type, dtype, seq_len, batch, batch_sizes is not None, needs_grad, *self._sizes(traced),
            self._num_directions, self.bias,
            *self._transforms(input, hx),
            self._dtypes_mixed(input, hx),
            torch.get_num_threads() if input.device.type == "cpu" and not traced else 0,
            input.device.index if input.device.type == "cuda" else None,
            _onednn_lstm_available(input) if not traced else True,
            needs_grad and _tracked((input,)),  # a first layer fed data needs no input gradient
        )  # fmt: skip
        requested = dispatch.requested(self.backend)
        misfit = self._miscounted_weights()
        if misfit:
            reason = f"the weights do not fit the module's flags, changed after construction (ATen: {misfit!r})"
            return dispatch.own_call_only(requested, self.num_layers * self._num_directions, reason)
        if batch_sizes is not None and requested == dispatch.AUTO and _batch_sizes_malformed(batch_sizes):
            # forced backends raise their own error for it (test_errors)
            reason = "a PackedSequence whose batch sizes grow or are not [T] (built by hand): nn.LSTM's kernels decide"
            return dispatch.own_call_only(requested, self.num_layers * self._num_directions, reason)
        if amp is not None and amp.own_call:
            reason = "torch.export or jit.trace under autocast: the program holds nn.LSTM's call, dtypes autocast's"
            return dispatch.own_call_only(requested, self.num_layers * self._num_directions, reason)
        if traced:
            return _plan_for.__wrapped__(requested, shape)
        return _plan_for(requested, shape)

    # ---- input handling -------------------------------------------------------------------------------

    def _prepare(self, input, hx):
        """Validate as nn.LSTM does and normalise: (data, (h0, c0), batch_sizes, sorted, unsorted, is_batched).
        The caller has read the weights for this call (_update_flat_weights)."""
        batch_sizes = sorted_indices = unsorted_indices = None
        is_batched = True
        if isinstance(input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices, hx = self._unpack(input, hx)
            self._check_packed_call(input, hx, batch_sizes)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
        given = hx
        hx = self._initial_state(input, hx, batch_sizes, is_batched)
        self.check_forward_args(input, hx, batch_sizes)
        self._check_call(input, hx, batch_sizes)
        if batch_sizes is None and is_batched and given is not None:
            # What torch._VF.lstm takes of a batched tensor call's state as given, after nn.LSTM's own checks:
            # two tensors in a tuple or list (unbatched input's state is rebuilt as a tuple, extra states ignored)
            if len(given) > 2:
                raise RuntimeError("lstm expects two hidden states")
            if not isinstance(given, (tuple, list)):
                raise _not_a_state_list(given)
        return input, hx, batch_sizes, sorted_indices, unsorted_indices, is_batched

    def _unpack(self, pack: PackedSequence, hx):
        """(data, batch_sizes, sorted_indices, unsorted_indices, hx) with the state in the pack's order. nn.LSTM's
        order: the state is permuted before any check (what that indexing makes of a malformed state fails as
        there; an unsorted pack's state of three loses the third)."""
        data, batch_sizes, sorted_indices, unsorted_indices = pack
        if hx is not None:
            hx = self.permute_hidden(hx, sorted_indices)
        return data, batch_sizes, sorted_indices, unsorted_indices, hx

    def _check_packed_call(self, data: Tensor, hx, batch_sizes: Tensor) -> None:
        """nn.LSTM hands PackedSequence input to torch._VF.lstm unchecked: where a malformed call fails there with
        another exception type than the checks of a tensor call would raise, raise that type (with a clearer
        message). Batch sizes of another shape than [T] holding more than one number: RuntimeError, nn.LSTM's type
        (RNNBase's check would raise ValueError; where they hold one number, [[3]], nn.LSTM runs the call)."""
        if batch_sizes.dim() != 1 and batch_sizes.numel() > 1:
            shape = list(batch_sizes.shape)
            raise RuntimeError(f"LSTM: a PackedSequence's batch_sizes must be one-dimensional, got shape {shape}")
        if hx is not None:
            if not isinstance(hx, (tuple, list)):
                raise _not_a_state_list(hx)
            if len(hx) != 2:
                raise RuntimeError("lstm expects two hidden states")
            for k, state in enumerate(hx):
                if not isinstance(state, Tensor):
                    raise TypeError(f"expected Tensor as element {k} in argument 2, but got {type(state).__name__}")
                if state.dim() < 3:
                    raise IndexError(
                        f"Expected hidden[{k}] to be 3-D [num_layers * num_directions, batch, size] for "
                        f"PackedSequence input, got {state.dim()}-D"
                    )
        self._check_weights_present(packed=True)
        weight = self._flat_weights[0]
        if data.dtype != weight.dtype and not _autocast_enabled(data.device.type):
            raise RuntimeError(_dtype_mismatch(data, weight))

    def _check_weights_present(self, packed: bool) -> None:
        """torch._VF.lstm's error for a weight deleted from the module (`del m.weight_hh_l0`): its weights are its
        argument 2, or 3 after a pack's batch sizes. Then a weight of another shape than nn.LSTM's constructor
        gives it (_misshapen_weight)."""
        for k, w in enumerate(self._flat_weights):
            if w is None:
                raise TypeError(f"expected Tensor as element {k} in argument {3 if packed else 2}, but got NoneType")
        misshapen = self._misshapen_weight()
        if misshapen:
            # nn.LSTM's kernels raise on most such weights, and some read past their end (float32 on the CPU: wrong
            # numbers, or a corrupted heap that ends the process): one clear error, whatever the backend
            raise RuntimeError(f"LSTM: {misshapen}")

    def _as_batch_of_one(self, input: Tensor, hx):
        """Unbatched input ([T, I], or [I] for step) and state ([L*D, P], [L*D, H]) or None as a batch of one."""
        input = input.unsqueeze(0 if self.batch_first or input.dim() == 1 else 1)
        return input, None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _SIZE_NAMES:
            self.__dict__["_size_tuple"] = tuple(getattr(self, n, None) for n in _SIZE_NAMES)

    def _sizes(self, traced: bool) -> tuple[int, int, int, int]:
        """input_size, hidden_size, proj_size, num_layers. While traced, from a tuple kept beside them: torch 2.5's
        dynamo makes a module's int attributes symbolic under compile(dynamic=True) (a tuple's ints it keeps), and
        the plan's rules (bool() of one) and the autocast probe (a constant's arguments) refused them there."""
        kept = self.__dict__.get("_size_tuple") if traced else None
        return kept or (self.input_size, self.hidden_size, self.proj_size, self.num_layers)

    @property
    def _num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _per_layer(self, weights: list[Tensor | None]) -> int:
        """How many of a flat weight list's entries each (layer, direction) holds."""
        return len(weights) // (self.num_layers * self._num_directions)

    @property
    def _out_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _initial_state(self, input: Tensor, hx, batch_sizes: Tensor | None, is_batched: bool) -> tuple[Tensor, Tensor]:
        if hx is None:
            if batch_sizes is not None:
                # A tensor, as nn.LSTM takes it: a trace then sizes the zeros per call. torch.compile takes an int
                # (a graph break, as at nn.LSTM's own int(batch_sizes[0]) in its checks): zeros sized by a tensor's
                # value reached inductor as aten._local_scalar_dense, which it failed on, logging a backend
                # compiler exception before falling back.
                batch = int(batch_sizes[0]) if torch.compiler.is_compiling() else batch_sizes[0]
            else:
                batch = input.size(0) if self.batch_first else input.size(1)
            layers = self.num_layers * self._num_directions
            zeros = dict(dtype=input.dtype, device=input.device)
            return torch.zeros(layers, batch, self._out_size, **zeros), torch.zeros(
                layers, batch, self.hidden_size, **zeros
            )
        if batch_sizes is None:
            want = 3 if is_batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not is_batched:
                return hx[0].unsqueeze(1), hx[1].unsqueeze(1)
        return hx[0], hx[1]

    def _check_call(self, input: Tensor, hx: tuple[Tensor, Tensor], batch_sizes: Tensor | None) -> None:
        """What torch._VF.lstm checks in C++, checked here so that every backend fails the same way."""
        time_dim = 1 if (self.batch_first and batch_sizes is None) else 0
        if batch_sizes is None and input.size(time_dim) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if batch_sizes is None:  # a packed call's were checked by _check_packed_call, before it read a weight
            self._check_weights_present(packed=False)
        weight = self._flat_weights[0]
        if input.dtype != weight.dtype and not _autocast_enabled(input.device.type):
            # nn.LSTM's Python check lets the call through under another device's autocast, and its first product
            # then fails: the same type of error
            error = RuntimeError if torch._C._is_any_autocast_enabled() else ValueError
            raise error(_dtype_mismatch(input, weight))
        for w in self._flat_weights:  # each one: a weight left behind (on meta, say) would be read as garbage
            if w.device != input.device:
                raise RuntimeError(
                    "Input and parameter tensors are not at the same device, found input tensor at "
                    f"{input.device} and parameter tensor at {w.device}"
                )
        for state in hx:
            if state.device != input.device:
                raise RuntimeError(
                    "Input and hidden tensors are not at the same device, found input tensor at "
                    f"{input.device} and hidden tensor at {state.device}"
                )
        # An h0 of another dtype fails nn.LSTM's first product on every path; a c0 of another dtype is for its own
        # path to decide (_dtypes_mixed)
        if hx[0].dtype != input.dtype and not _autocast_enabled(input.device.type):
            raise RuntimeError(f"Expected hidden[0] dtype {input.dtype} (the input's), got {hx[0].dtype}")

    # ---- running the stack ----------------------------------------------------------------------------

    def _native_stack(
        self, input: Tensor, hx, batch_sizes: Tensor | None, amp: _Autocast | None = None, weights=None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Exactly nn.LSTM's call: the whole stack in one torch._VF.lstm (cuDNN / oneDNN / ATen); with oneDNN off
        where it cannot run the call under autocast (see _autocast_dtypes), or would compute it wrong (see
        onednn_training_miscomputes). weights: _weights_as_built()'s list, where the caller knows it. Raises
        BackendUnavailableError for a compiled call whose backward oneDNN's LSTM would break (a forced native)."""
        if torch.compiler.is_compiling():
            dtype = amp.dtypes[0] if amp is not None else input.dtype
            needs_grad, packed = self._needs_grad(input, hx), batch_sizes is not None
            if compiled_backward_fails(input.device.type, dtype, needs_grad, packed, self.proj_size > 0):
                raise BackendUnavailableError(f"fastlstm: nn.LSTM's path cannot serve it: {COMPILED_BACKWARD_FAILS}")
        miscomputes = onednn_training_miscomputes(input, batch_sizes is not None, self.proj_size > 0)
        if _compiling_a_backward():
            hx = _state_copy(*hx)  # compiled, aten::lstm's decomposition reads each layer's state as a view of hx
        if weights is None:
            weights = self._weights_as_built()
        if (amp is None or amp.onednn) and not miscomputes:
            out = self._vf_lstm(input, hx, batch_sizes, weights)
        else:
            with onednn_off():
                out = self._vf_lstm(input, hx, batch_sizes, weights)
        if batch_sizes is None and torch.compiler.is_compiling():
            # torch 2.4-2.11's decomposition of aten::lstm (what a compiled graph runs where oneDNN does not take
            # the call: every CUDA call, CPU training) stacks each layer's [1, B, H] state unsqueezed: h_n and c_n
            # came out [L*D, 1, B, H] (seen on an H200, torch 2.11). Same values; the shape nn.LSTM gives.
            y, h, c = out
            out = (y, h.reshape(hx[0].shape), c.reshape(hx[1].shape))
        if miscomputes and amp is not None and amp.onednn:
            # ATen's path gives other dtypes than oneDNN's under autocast (float32 for bfloat16): nn.LSTM's
            out = tuple(t.to(dtype) for t, dtype in zip(out, amp.dtypes, strict=True))
        return out

    def _vf_lstm(self, input: Tensor, hx, batch_sizes: Tensor | None, weights) -> tuple[Tensor, Tensor, Tensor]:
        if batch_sizes is None:
            return torch._VF.lstm(
                input, hx, weights, self.bias, self.num_layers, self.dropout, self.training, self.bidirectional,
                self.batch_first,
            )  # fmt: skip
        return torch._VF.lstm(
            input, batch_sizes, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
            self.bidirectional,
        )  # fmt: skip

    def _parameters_of(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction, as read by _update_flat_weights for this call."""
        per_layer = self._per_layer(self._flat_weights)
        start = (layer * self._num_directions + direction) * per_layer
        weights = self._flat_weights[start : start + per_layer]
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        return weights[0], weights[1], b_ih, b_hh, weights[-1] if self.proj_size > 0 else None

    def _layer_weights(
        self, layer: int, direction: int, backend=None, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(w_ih, w_hh, b, w_hr) of one layer and direction as the layer contract takes them: b = b_ih + b_hh.

        With dtype (autocast's), each parameter is cast first by `backend` and the biases summed in dtype after, as
        nn.LSTM's native path sums its cast biases: the same bias, and where the backend takes its casts from
        autocast's cache, the biases' casts are cached too, so a bias changed in place within an autocast region
        is read as stale as nn.LSTM reads its weights and biases there, not afresh beside cached weights."""
        params = self._parameters_of(layer, direction)
        if dtype is not None:
            params = _autocast_casts(backend, params, (False,) * 4 + (True,), dtype)
        w_ih, w_hh, b_ih, b_hh, w_hr = params
        return w_ih, w_hh, None if b_ih is None else _flat_bias(_bias_sum(b_ih, b_hh), 4 * self.hidden_size), w_hr

    def _autocast_dtypes(self, input: Tensor, hx, batch_sizes: Tensor | None) -> _Autocast | None:
        """The (y, h_n, c_n) dtypes nn.LSTM gives this call under autocast, or None when autocast is off.

        nn.LSTM's dtypes under autocast follow from which ATen path runs (oneDNN, cuDNN, the default
        implementation, packed or not) rather than from one rule, so they are read off the native path
        itself: one tiny 1-step call per distinct combination, cached, in the call's grad mode (_autocast_key).
        """
        device_type = input.device.type
        autocast = _autocast_key(device_type)
        if not autocast:
            return None
        if backends.exporting() or torch.jit.is_tracing():
            # torch.export traces with oneDNN off (torch 2.13): dtypes read here would be its ATen path's (float32
            # under CPU bfloat16 autocast), baked into the program, where nn.LSTM's program holds aten::lstm, whose
            # dtypes autocast and the path it takes decide when it runs; and the probe would be recorded too. A
            # TorchScript trace the same; there a probe that failed (oneDNN's float16 LSTM on an AVX512-FP16 Xeon)
            # left torch's tracer to crash the process later (SIGSEGV, torch 2.13), where nn.LSTM's call raises
            return _Autocast((input.dtype,) * 3, own_call=True)
        # ATen takes another path for packed input whose batch sizes vary, with other dtypes
        varying = batch_sizes is not None and int(batch_sizes[0]) != int(batch_sizes[-1])
        # and oneDNN takes no empty input: an empty batch goes to ATen's path, in its dtypes. A symbolic answer cannot
        # be the probe's constant argument (dynamo refused it: compile(dynamic=True) under autocast). Outside dynamo
        # a dynamic size is a SymInt, not asked; dynamo shows it as an int, whose range (from 1, or from 2 where it
        # specializes 0 and 1) answers `== 0` as a constant, without a guard
        empty = any(isinstance(n, int) and n == 0 for n in input.shape)
        input_size, hidden_size, proj_size, num_layers = self._sizes(traced=True)
        layers = num_layers * self._num_directions  # the checked state's sizes, as the module's, not symbolic
        call = _ProbeCall(
            autocast, input.device, input.dtype, input_size,
            ((hx[0].dtype, layers, proj_size or hidden_size), (hx[1].dtype, layers, hidden_size)),
            tuple(None if w is None else (w.dtype, tuple(int(n) for n in w.shape)) for w in self._weights_as_built()),
            batch_sizes is not None, varying, empty, num_layers, self.bidirectional, bool(self.bias), proj_size,
        )  # fmt: skip
        return _probed_autocast_dtypes(tuple(call))

    def _fast_stack(self, x: Tensor, hx, batch_sizes: Tensor | None, choices, amp) -> tuple[Tensor, Tensor, Tensor]:
        """_layered_stack, computing in autocast's dtype and returning the dtypes nn.LSTM gives when autocast is on.

        x: time-major [T, B, I], or with batch_sizes either that padded or a PackedSequence's data [N, I] (y then
        packed too). hx: (h0 [L*D, B, P], c0 [L*D, B, H]), or None for zeros.
        """
        whole = self._inference_stack_backend(choices, x, hx)
        if amp is None:
            if whole is not None:
                return self._inference_stack(whole, x, hx, batch_sizes)
            return self._padded_layered_stack(x, hx, batch_sizes, choices)
        compute = amp.dtypes[0]
        with _autocast_off(x.device.type):
            x = _as_dtype(x, compute)
            hx = None if hx is None else (_as_dtype(hx[0], compute), _as_dtype(hx[1], compute))
            if whole is not None:
                outputs = self._inference_stack(whole, x, hx, batch_sizes, weight_dtype=compute)
            else:
                outputs = self._padded_layered_stack(x, hx, batch_sizes, choices, weight_dtype=compute)
        return tuple(_as_dtype(t, dtype) for t, dtype in zip(outputs, amp.dtypes))

    def _padded_layered_stack(self, x: Tensor, hx, batch_sizes, choices, weight_dtype=None):
        """_layered_stack of x as _fast_stack takes it: packed data is padded for the layers, and their output
        packed again (the whole stack's backend does both itself)."""
        if batch_sizes is None or x.dim() == 3:
            return self._layered_stack(x, *self._layer_states(x, hx), batch_sizes, choices, weight_dtype)
        rows = packed_rows(batch_sizes, x.device)
        padded = pad_packed(x, batch_sizes, rows)
        y, h_n, c_n = self._layered_stack(padded, *self._layer_states(padded, hx), batch_sizes, choices, weight_dtype)
        return pack_padded(y, rows), h_n, c_n

    def _inference_stack_backend(self, choices, x: Tensor, hx) -> backends.Backend | None:
        """The backend that runs this whole call's stack in one call (Backend.inference_stack), or None: every layer
        and direction on one backend that can, no dropout to apply, an eager call without transforms, and nothing
        that needs a gradient. The same numbers as layer by layer, with less of Python around them."""
        if not choices:
            return None  # no layer (m.num_layers = 0): nn.LSTM's own call decides
        backend = backends.get(choices[0].backend)
        if not backend.has_inference_stack:
            return None
        if any(choice.backend != backend.name for choice in choices) or self._between_layers_dropout():
            return None
        if self._needs_grad(x, hx):
            return None
        if _traced():
            return None  # graphs hold the layer ops, which have autograd, fakes and vmap rules
        if torch._C._are_functorch_transforms_active() or _forward_ad_active():
            return None
        return backend

    def _inference_stack(
        self, backend, x: Tensor, hx, batch_sizes: Tensor | None, weight_dtype=None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """backend.inference_stack with this module's weights and flags: y, h_n, c_n as _layered_stack gives them
        (weight_dtype as there: each weight and bias cast to it, the biases summed after, in the op)."""
        flags = (self.proj_size > 0, self.bidirectional)
        weights = self._flat_weights
        if weight_dtype is not None:
            per_layer = self._per_layer(weights)
            projections = [self.proj_size > 0 and i % per_layer == per_layer - 1 for i in range(len(weights))]
            weights = _autocast_casts(backend, weights, projections, weight_dtype)
        return backend.inference_stack(
            x, hx, self._weights_as_built(weights), batch_sizes, 2 if self.bias else 0, *flags
        )

    def _layer_states(self, x: Tensor, hx) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The initial (h, c) of each (layer, direction) for time-major x; zeros when hx is None."""
        if hx is not None:
            h0, c0 = _state_copy(*hx) if _compiling_a_backward() else hx
            return h0.unbind(0), c0.unbind(0)
        count = self.num_layers * self._num_directions
        # One zero tensor serves every layer: backends only read their initial state
        h0 = x.new_zeros(x.size(1), self._out_size)
        c0 = x.new_zeros(x.size(1), self.hidden_size) if self.proj_size else h0
        return (h0,) * count, (c0,) * count

    def _layered_stack(
        self, x: Tensor, h0, c0, batch_sizes: Tensor | None, choices, weight_dtype=None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Each (layer, direction) through its backend on time-major x [T, B, I] -> y [T, B, D*P], h_n, c_n.

        h0, c0: the initial states of each (layer, direction), [B, P] and [B, H]. Dropout between layers is
        applied as nn.LSTM applies it (on the packed data when packed).
        """
        h_n, c_n = [], []
        dropout = self._between_layers_dropout()
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self._num_directions):
                k = layer * self._num_directions + direction
                backend = backends.get(choices[k].backend)
                weights = self._layer_weights(layer, direction, backend, weight_dtype)
                y, h, c = backend.layer(x, h0[k], c0[k], *weights, batch_sizes, direction == 1)
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if dropout and layer < self.num_layers - 1:
                x = self._dropout(x, dropout, batch_sizes)
        # A copy even of one layer's state, not a view of it: as nn.LSTM's, h_n and c_n must take detach_()
        # (truncated backpropagation's `h.detach_()`), which a view refuses.
        return x, torch.stack(h_n), torch.stack(c_n)

    def _between_layers_dropout(self) -> float:
        """The dropout probability between this call's layers (0 for none: eval mode, one layer); for one outside
        [0, 1] (set after construction, which checks it) nn.LSTM's error, which its kernels raise where they would
        apply it (a negative or NaN one had been taken as none, one above 1 raised F.dropout's ValueError)."""
        p = self.dropout
        if not self.training or self.num_layers == 1 or p == 0:
            return 0.0
        if not 0 <= p <= 1:
            raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p:g}")
        return p

    def _dropout(self, x: Tensor, p: float, batch_sizes: Tensor | None) -> Tensor:
        # nn.LSTM drops on the packed data when the input is packed: same shape, same random stream.
        if batch_sizes is None:
            return F.dropout(x, p, training=True)
        rows = packed_rows(batch_sizes, x.device)
        return pad_packed(F.dropout(pack_padded(x, rows), p, training=True), batch_sizes, rows)


# torch.compile and torch.export trace LSTM.forward from torch 2.5 on. Torch 2.4's dynamo stops inside it (it
# cannot call the weakrefs nn.RNNBase keeps of the weights, nor torch._C._are_functorch_transforms_active), and a
# plain torch.compile of a model holding the layer would fail. There the layer runs outside the compiled graph,
# as nn.LSTM does in that release: a graph break, the same numbers; fullgraph=True and torch.export then raise
# dynamo's error about it.
TRACEABLE = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"
if not TRACEABLE:
    LSTM.forward = torch.compiler.disable(LSTM.forward)
    LSTM.step = torch.compiler.disable(LSTM.step)
