"""Backends: each implements one LSTM layer in one direction (the layer contract in fastlstm.reference).

A backend answers what dispatch asks: can it run on this machine at all, can it serve this call, do its
kernels work for this call here (a self-test, for backends that compile kernels at run time) and did building
them crash the compiler (crash_reason), and it computes the layer. Beside those: load_ops (its torch.library
ops, for a graph that calls them before any call), autocast_weights (the weights autocast hands its kernels)
and, optionally, inference_stack (every layer and direction of an inference in one call; has_inference_stack).
Choosing between backends is dispatch's job (fastlstm.dispatch).
"""

from __future__ import annotations

import abc
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

LayerResult = tuple[Tensor, Tensor, Tensor]


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the call; the message names the reason."""


class BuildCrashError(BackendUnavailableError):
    """Building a backend's kernels for the call crashed a child process (Backend.crash_reason): building them in
    this process would end it. Unlike the rest of BackendUnavailableError, a defect of the backend here."""


@dataclass(frozen=True)
class LayerCall:
    """What a backend needs to know to decide whether it can serve one (layer, direction)."""

    device_type: str
    dtype: torch.dtype
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    proj_size: int  # 0 without projection
    bias: bool
    packed: bool
    reverse: bool
    needs_grad: bool
    layer: int = 0
    # needs_grad, and the module's input needs its gradient too (a first layer fed data, raw features or a frozen
    # embedding, needs none, and the fast backends then leave its dx out); each layer's call carries the module's.
    input_grad: bool = False
    bidirectional: bool = False  # the module runs both directions (a rule measured on one-direction modules reads it)
    func_grad: bool = False  # torch.func's grad/vjp/jacrev or forward-mode AD track gradients (LSTM._transforms)
    vmapped: bool = False  # a torch.vmap is active (LSTM._transforms)
    forward_ad: bool = False  # forward-mode AD: dual tensors, torch.func.jvp / jacfwd (LSTM._transforms)
    grad_of_grad: bool = False  # a transform's gradients through this call are differentiated (LSTM._transforms)
    functionalized: bool = False  # torch.func.functionalize around a gradient transform (LSTM._transforms)
    mixed_dtypes: bool = False  # the weights, or c0 against the input, differ in dtype (LSTM._dtypes_mixed)
    # nn.LSTM's CPU call could take oneDNN's fused LSTM (native.onednn_lstm_available; a program may switch it
    # off): else ATen's per-step loop. True on other devices and while tracing.
    onednn: bool = True
    # The CUDA device's index (None on other devices): a backend's self-test and build check run there, not on
    # whichever device is current (GPU 0 in a process that never called torch.cuda.set_device).
    device_index: int | None = None

    @property
    def out_size(self) -> int:
        return self.proj_size or self.hidden_size


def cache_root() -> Path | None:
    """Where backends keep what they build for this machine: `$FASTLSTM_CACHE_DIR`, else `$XDG_CACHE_HOME/fastlstm`
    (an absolute one, as the XDG spec has it), else `~/.cache/fastlstm`. None without a home to put it in ("~"
    stays unexpanded without HOME or a passwd entry). A finished build is read from here even where it cannot be
    written (a read-only image built ahead of time); builds go to writable_cache_root()."""
    if os.environ.get("FASTLSTM_CACHE_DIR"):
        return Path(os.environ["FASTLSTM_CACHE_DIR"])  # asked for: used as it is, its errors reported as they are
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache"))
    return base / "fastlstm" if base.is_absolute() else None


def writable_cache_root() -> Path:
    """cache_root() where it can be made and written (or was asked for by FASTLSTM_CACHE_DIR); else, as for a
    container user whose home is `/` or read-only, or one without a home, a folder of this user's own in the
    temporary directory (_private_temp_cache). Raises OSError when neither can be used."""
    home = cache_root()
    if os.environ.get("FASTLSTM_CACHE_DIR"):
        return home
    if home is not None:
        try:
            home.mkdir(parents=True, exist_ok=True)
            if os.access(home, os.W_OK | os.X_OK):
                return home
        except OSError:
            pass
    return _private_temp_cache()


def on_noexec_mount(folder: Path) -> bool:
    """Whether folder lies on a file system mounted noexec, from which no library built there loads."""
    return hasattr(os, "ST_NOEXEC") and bool(os.statvfs(folder).f_flag & os.ST_NOEXEC)


def _private_temp_cache() -> Path:
    """$TMPDIR/fastlstm-<uid>, made 0700 and owned by this user: the library built there is loaded into the process,
    so a folder another user made (or could write) first is refused, not used, and so is a temporary directory
    mounted noexec, from which no library loads."""
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir()) / f"fastlstm-{uid if uid is not None else 'user'}"
    refused = (
        f"no writable cache folder: the home cache cannot be made or written, and {folder} belongs to another "
        "user, others can write it or it is not a folder; set FASTLSTM_CACHE_DIR to a folder of your own"
    )
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:  # a file (or a dangling link) in its place
        raise PermissionError(refused) from None
    info = folder.lstat()
    if uid is not None and (folder.is_symlink() or info.st_uid != uid or info.st_mode & 0o022):
        raise PermissionError(refused)
    if on_noexec_mount(folder):
        raise PermissionError(
            f"no writable cache folder: the home cache cannot be made or written, and {folder} is on a noexec "
            "mount (no library built there could load); set FASTLSTM_CACHE_DIR to a folder of your own"
        )
    return folder


# fastlstm's package folder and torch's: frames there are the library's, not the user's
_OWN_FOLDERS = (os.path.dirname(os.path.dirname(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def outside_stacklevel() -> int:
    """warnings.warn's stacklevel, for its caller, of the first frame outside fastlstm and torch: the user's line
    that called the model (or convert), however deep the call that warns sits below it."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OWN_FOLDERS):
        frame, level = frame.f_back, level + 1
    return level


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor (indices a call derives from its lengths) on `device`. To a GPU from pinned memory, without
    waiting: a copy from pageable memory waits until the GPU has run all that was queued before it, so each packed
    or lengths= call had stopped the host until the GPU drained (the previous step's backward, say). Traced
    calls copy plainly: the copy is then a graph's op. Inside a caller's own CUDA graph capture the pinned copy
    is captured (a pageable one would synchronize, which a capture refuses); torch before 2.13 may hand the pinned
    block out again after the capture, so a replay could read other numbers there (torch 2.13 keeps blocks
    allocated during a capture)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# Entries a dict of remembered answers holds at most (remember): keys that user input makes new call after call (a
# shape, a batch size) would grow it without bound (triton's verdicts: 100,000 batch sizes held 24 MB). Past it the
# dict starts over; every answer is found again.
REMEMBERED_MAX = 4096
MISSING = object()  # what such a dict's .get gives for a key it lacks (its values may be None)


def remember(store: dict, key, value) -> None:
    """store[key] = value, in a dict of at most REMEMBERED_MAX entries. Another thread may start the dict over
    between a write and a read: read a key once, with store.get(key, MISSING)."""
    if len(store) >= REMEMBERED_MAX:
        store.clear()
    store[key] = value


def constant_under_compile(fn):
    """torch.compiler.assume_constant_result, without importing torch._dynamo: while torch.compile traces, dynamo
    runs fn eagerly (side effects included: building the extension, a warning) and takes its result as a constant.

    The public decorator imports dynamo (1.2 s here, on the first call of a process that never compiles, which
    nn.LSTM does not pay); all it does is set this attribute, which dynamo reads when it traces a call of fn
    (read so in torch 2.11 and 2.13). tests/test_cpp.py::test_compile_as_the_first_use_in_a_process fails if that
    changes.

    Its code is renamed: torch 2.5's dynamo stores the result in the compiled frame's globals under the code's
    name, over what that name held there (fastlstm.module's import of native.onednn_lstm_available became a bool
    once an LSTM was compiled, and every later call raised "'bool' object is not callable"). No module binds the
    new name.
    """
    fn._dynamo_marked_constant = True
    fn.__code__ = fn.__code__.replace(co_name=f"_fastlstm_constant_{fn.__code__.co_name}")
    return fn


def cached_constant(fn):
    """constant_under_compile, the result kept per arguments (the CPU's facts: read once).

    A plain function rather than functools.cache's wrapper: dynamo looks through that wrapper before it reads the
    constant mark and warns about it on every compile ("Dynamo detected a call to a functools.lru_cache-wrapped
    function"; torch 2.13).
    """
    results = {}

    def cached(*args):
        if args not in results:
            results[args] = fn(*args)
        return results[args]

    cached.__name__, cached.__qualname__, cached.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return constant_under_compile(cached)


class Backend(abc.ABC):
    """Base class. Subclasses set `name` and implement `layer`; the reason methods return None for yes."""

    name: str = ""

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (missing compiler, missing triton), or None."""
        return None

    def unsupported_reason(self, call: LayerCall) -> str | None:
        """Why this backend cannot serve `call` (device, dtype, size), or None when it can."""
        return None

    def self_test(self, call: LayerCall) -> str | None:
        """Why this backend's kernels fail for `call` on this machine although it is available and supports the
        call (a kernel that does not compile for this GPU, say), found by running them; None when they work.
        Dispatch asks only when choosing for `auto`; a forced backend fails loudly at the call instead."""
        return None

    def crash_reason(self, call: LayerCall) -> str | None:
        """Why building this backend's kernels for `call` would crash the process (a compiler abort, which no
        exception reports), found without crashing it; None otherwise. Dispatch asks for a forced backend too:
        it raises this instead of letting the call end the process."""
        return None

    def load_ops(self) -> None:
        """Register this backend's torch ops now if that is cheap (already built; no compiler, no heavy import), so
        that programs saved with torch.export or AOTInductor, which hold the ops by name, load in this process."""
        return None

    @abc.abstractmethod
    def layer(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b: Tensor | None,
        w_hr: Tensor | None,
        batch_sizes: Tensor | None,
        reverse: bool,
    ) -> LayerResult:
        """One layer, one direction, differentiable in every tensor argument. Shapes: fastlstm.reference."""

    # Whether inference_stack serves: the module then runs a stack whose layers are all this backend's in one call
    # where nothing is differentiated (LSTM._inference_stack_backend says where).
    has_inference_stack: bool = False

    def inference_stack(
        self,
        x: Tensor,
        hx: tuple[Tensor, Tensor] | None,
        weights: list[Tensor],
        batch_sizes: Tensor | None,
        biases: int,
        proj: bool,
        bidirectional: bool,
    ) -> LayerResult:
        """Every (layer, direction) of a stack at inference, each as layer() computes it and the directions' outputs
        concatenated (the same numbers as the module's loop over layer()), on time-major x [T, B, I] (packed input
        padded, with its batch_sizes), a PackedSequence's data x [N, I] with its batch_sizes, or x [B, I] for a
        single step: y [T, B, D*P] (or packed [S, D*P], S the batch sizes' sum: N but for rows past it, or
        [B, D*P]), h_n [L*D, B, P], c_n [L*D, B, H]. hx: (h0, c0) of those shapes or None for zeros; weights: per
        layer and direction w_ih, w_hh, `biases` biases, [w_hr]: the module's _flat_weights with biases 2 (b_ih,
        b_hh, summed as layer() callers sum them), or with 1 the sum itself (b = b_ih + b_hh, as autocast casts it).

        Optional: a backend that has it sets has_inference_stack, and the module calls it only there; the others run
        layer by layer through layer(), so this default is never reached from the module."""
        raise NotImplementedError(f"the {self.name} backend runs layer by layer")

    def autocast_weights(self, weights: list[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
        """The weights (None stays None) of a call under autocast in dtype, the dtype this backend computes the
        call in. Backends that can take them from autocast's cache of casts (cast once per autocast region, as
        nn.LSTM's weights are) do so."""
        return [None if w is None else w.to(dtype) for w in weights]


# name -> "module:attribute". These modules import neither triton nor the C++ extension (each backend does that
# on first use); fastlstm.module loads them all when it is imported (load_all), because torch.compile cannot
# import a module while it traces: a model compiled before any eager call needs them loaded already.
_REGISTRY = {
    "native": "fastlstm.backends.native:BACKEND",
    "reference": "fastlstm.backends.native:REFERENCE",
    "cpp": "fastlstm.backends.cpu:BACKEND",
    "triton": "fastlstm.backends.triton:BACKEND",
}
_loaded: dict[str, Backend] = {}


def fake_on_x_device(backend: str, x: Tensor, *tensors: Tensor | None) -> None:
    """For a layer op's fake kernel, which torch serves every call with a meta tensor among its arguments: a call
    whose tensors are not all on x's device fails as the real kernel's checks would fail it, instead of returning
    uninitialised tensors on x's device."""
    for t in tensors:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"fastlstm {backend}: tensors must be on one device, x's {x.device}; got {t.device}")


def cell_state_as(c: Tensor, dtype: torch.dtype) -> Tensor:
    """A cell state kept in float32 (a float16 layer's), as the call returns it. float16's largest value where it
    grew beyond (nn.LSTM's float16 cell stops growing below it): inf, carried into the next call (streaming), would
    turn NaN where a forget gate closes (0 * inf), where one call over both chunks stays finite. An infinity the call
    was given stays. As csrc/lstm_cpu.cpp's state_to."""
    if dtype != torch.float16:
        return c.to(dtype, copy=True)
    largest = torch.finfo(torch.float16).max
    return torch.where(c.isinf(), c, c.clamp(-largest, largest)).to(dtype)


def projection_used(w_hr: Tensor | None, x: Tensor, grad_y_given: bool, grad_hT_given: bool) -> bool:
    """Whether a layer's gradient reaches w_hr. Not where one step's c_n alone is differentiated: c_n then depends on
    no projection, and nn.LSTM leaves w_hr's gradient None there (an optimizer skips it, weight decay included)
    where a zero gradient would be decayed. (csrc/lstm_ops.cpp has the cpp backend's copy.)"""
    return w_hr is not None and (x.shape[0] > 1 or grad_y_given or grad_hT_given)


def layer_op_grads(
    dx: Tensor,
    dh0: Tensor,
    dc0: Tensor,
    dw_ih: Tensor | None,
    dw_hh: Tensor | None,
    db: Tensor | None,
    dw_hr: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """The backward result of a fast backend's layer op, whose inputs follow the layer contract's order
    (x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, one op-specific flag): the three non-tensor inputs
    get None. Pass None for db / dw_hr when the layer has no bias / projection, and for every weight's when none
    needs a gradient."""
    return dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr, None, None, None


# Whether the fast backends register torch.vmap rules for their layer ops. torch.library.register_vmap came in
# torch 2.5, where backward through a vmapped call of them lost its graph ("element 0 of tensors does not require
# grad") and the rules ran for packed, reversed calls one call too few; from 2.6 on they hold. Without them,
# functorch's fallback runs a layer op one sample at a time.
VMAP_RULES = torch.torch_version.TorchVersion(torch.__version__) >= "2.6" and hasattr(torch.library, "register_vmap")

# Whether the vmap rule torch generates for an autograd.Function (generate_vmap_rule) takes an output's None
# gradient, as set_materialize_grads(False) hands them to backward: from torch 2.7 on. Before, its backward batched
# the None ("TypeError: _add_batch_dim(): incompatible function arguments"): torch.func.grad of a vmapped layer
# whose h_n or c_n got no gradient.
VMAP_TAKES_NO_GRADIENT = torch.torch_version.TorchVersion(torch.__version__) >= "2.7"


def materialize_grads_for_vmap(tensors) -> bool:
    """For the setup_context of a layer's autograd.Function with generate_vmap_rule, which leaves the gradients of
    outputs that got none None (set_materialize_grads(False)): whether they must come as zeros instead, where
    torch.vmap batches this call (`tensors`: its inputs) and torch's generated rule cannot take a None
    (VMAP_TAKES_NO_GRADIENT). Every output then counts as differentiated."""
    return not VMAP_TAKES_NO_GRADIENT and any(t is not None and batched_under_vmap(t) for t in tensors)


def vmap_layer_op(op, info, in_dims: tuple, args: tuple, batch_axes: tuple[int | None, ...]):
    """A torch.vmap rule (torch.library.register_vmap) for a fast backend's layer op, whose inputs follow the layer
    contract's order (x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, then its flags).

    The samples' batches run as one call over B·V rows, row b·V + v holding row b of sample v, so that packed
    batch sizes scale by V and each step's live rows stay a prefix. Weights (or batch sizes) that differ from
    sample to sample (an ensemble: torch.func.stack_module_state) take one call per sample instead.
    batch_axes: for each output of the op, the axis that holds the batch, or None for an output that has no rows
    (an empty placeholder).
    """
    samples = info.batch_size
    if any(dim is not None for dim in in_dims[3:]):
        return vmap_per_sample(op, info, in_dims, args)
    (x, h0, c0), rest, batch_sizes, flags = args[:3], args[3:7], args[7], args[8:]
    folded = [rows_side_by_side(t, dim, axis, samples) for t, dim, axis in zip((x, h0, c0), in_dims, (1, 0, 0))]
    outputs = op(*folded, *rest, None if batch_sizes is None else batch_sizes * samples, *flags)
    unfolded = tuple(
        out if axis is None else out.unflatten(axis, (-1, samples)) for out, axis in zip(outputs, batch_axes)
    )
    return unfolded, tuple(None if axis is None else axis + 1 for axis in batch_axes)


def vmap_per_sample(op, info, in_dims: tuple, args: tuple):
    """A torch.vmap rule that calls `op` once per sample and stacks each output along a new leading axis."""
    calls = [op(*(_sample(a, dim, v) for a, dim in zip(args, in_dims))) for v in range(info.batch_size)]
    return tuple(torch.stack(outputs) for outputs in zip(*calls)), (0,) * len(calls[0])


def _sample(t, dim: int | None, v: int):
    return t if dim is None else t.select(dim, v)


def rows_side_by_side(t: Tensor, dim: int | None, batch_axis: int, samples: int) -> Tensor:
    """t's batch axis times `samples`, sample-minor (t the same for every sample when dim is None)."""
    if dim is None:
        t = t.unsqueeze(batch_axis + 1).expand(*t.shape[: batch_axis + 1], samples, *t.shape[batch_axis + 1 :])
    else:
        t = t.movedim(dim, batch_axis + 1)
    return t.flatten(batch_axis, batch_axis + 1)


def rows_per_sample(t: Tensor, samples: int) -> Tensor:
    """[T, B·V, n] with rows side by side (rows_side_by_side) -> [V, T·B, n]: each sample's rows, a view."""
    return t.unflatten(1, (-1, samples)).permute(2, 0, 1, 3).flatten(1, 2)


def summed_per_sample(grad_rows: Tensor, input_rows: Tensor, samples: int) -> Tensor:
    """A weight gradient per sample, [V, n, m]: the sum over each sample's rows of grad_rows [T, B·V, n] times
    input_rows [T, B·V, m]. One batched product on strided views: BLAS reads each sample's rows in place."""
    return torch.bmm(rows_per_sample(grad_rows, samples).transpose(1, 2), rows_per_sample(input_rows, samples))


def per_sample_layer_grads(
    samples: int, dx, dh0, dc0, dgates, x, h_prev, has_bias: bool, proj_rows=None, input_grad: bool = True
):
    """A torch.vmap rule's result for a fast backend's backward op (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr) from one
    call over every sample's rows side by side (rows_side_by_side): the input gradients unfolded, and each
    weight gradient summed over each sample's own rows. dgates, x, h_prev (the state each step read): [T, B·V, *];
    proj_rows: with a projection, (gradient reaching each output h, unprojected h). Without input_grad, dx comes
    out empty, as the rows' op gave it. Returns (outputs, out_dims)."""
    none = dgates.new_empty(samples, 0)
    accumulate = torch.float32 if dgates.dtype in (torch.bfloat16, torch.float16) else dgates.dtype
    grads = (
        dx.unflatten(1, (-1, samples)) if input_grad else none,
        dh0.unflatten(0, (-1, samples)),
        dc0.unflatten(0, (-1, samples)),
        summed_per_sample(dgates, x, samples),
        summed_per_sample(dgates, h_prev, samples),
        rows_per_sample(dgates, samples).sum(1, dtype=accumulate).to(dgates.dtype) if has_bias else none,
        none if proj_rows is None else summed_per_sample(*proj_rows, samples),
    )
    return grads, (2 if input_grad else 0, 1, 1, 0, 0, 0, 0)


def batched_under_vmap(t: Tensor) -> bool:
    """Whether torch.vmap batches t at any depth of a torch.func transform's wrappers."""
    return any(torch._C._functorch.is_batchedtensor(w) for w in _wrapper_chain(t))


def _wrapper_chain(t: Tensor):
    """t, then each tensor a torch.func transform's wrapper holds, down to the plain tensor (yielded last)."""
    yield t
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
        yield t


def exporting() -> bool:
    """Whether torch.export is tracing (torch.compiler.is_exporting is newer than the oldest torch fastlstm takes).

    The flag export sets, read as it is: dynamo before torch 2.13 traces a call of torch.compiler.is_exporting()
    as True under any torch.compile (torch 2.11: every compiled call under autocast was planned as an export's, its
    graph held nn.LSTM's oneDNN call, and aot_eager's backward then failed on that call's missing workspace)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is True:
        return True
    if flag is False and not torch.compiler.is_compiling():
        return False  # an export that traces eagerly (non-strict) raises the flag in every release that has it
    if flag is None and hasattr(torch.compiler, "is_exporting"):
        return torch.compiler.is_exporting()
    # torch 2.5 has neither, and torch 2.7's strict export sets the flag only after dynamo's trace: torch.export's
    # record of the export in progress (a set of its flags, else None)
    trace = getattr(getattr(torch, "export", None), "_trace", None)
    return getattr(trace, "_EXPORT_FLAGS", None) is not None


def dispatch_mode_active() -> bool:
    """Whether a TorchDispatchMode is on (FlopCounterMode, selective activation checkpointing's, DebugMode, ...):
    it sees every op, so a call then takes the ops, and the same ones on every call."""
    return torch._C._len_torch_dispatch_stack() > 0


def fake_tensors_in_play(x: Tensor) -> bool:
    """Whether FakeTensorMode is on or a call's input x is a fake tensor (shape inference, memory estimates): ops
    then compute shapes alone, and a kernel launched by hand would read memory that does not exist."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    if type(x) is Tensor:
        return False
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    return fake is not None and isinstance(x, fake.FakeTensor)


def autograd_tracks(t: Tensor) -> bool:
    """Whether autograd records what is computed from t: requires_grad at any depth of a torch.func transform's
    wrappers. A vmap's batched tensor answers False of itself while autograd records the ops on the tensor it
    wraps (a model ensemble trained through vmap: stack_module_state's leaves require grad)."""
    return any(w.requires_grad for w in _wrapper_chain(t))


def functorch_grad_levels(tensors) -> set[int]:
    """The levels of the torch.func gradient transforms (grad, vjp, jacrev, jvp) that wrap any of `tensors`, at
    any depth of their wrappers (a vmap's batching wrapper may sit above a gradient's, or below)."""
    return {
        torch._C._functorch.maybe_get_level(w)
        for t in tensors
        if t is not None
        for w in _wrapper_chain(t)
        if torch._C._functorch.is_gradtrackingtensor(w)
    }


def differentiated_twice(tensors) -> bool:
    """Whether the gradients a backward computes from `tensors` (its saved inputs and incoming gradients, or a
    call's inputs) are themselves differentiated: two gradient transforms track them (torch.func.hessian, jacrev
    of a grad), or autograd tracks the plain tensors under a transform's wrappers (torch.func.grad of parameters
    that require grad, whose result a loss may backpropagate through)."""
    tensors = [t for t in tensors if t is not None]
    if len(functorch_grad_levels(tensors)) > 1:
        return True
    return torch.is_grad_enabled() and any(list(_wrapper_chain(t))[-1].requires_grad for t in tensors)


class LayerBackward(NamedTuple):
    """Where a fast backend's layer backward starts (layer_backward)."""

    # the incoming gradients of (y, h_T, c_T), zeros for an output that got none
    grads: tuple[Tensor, Tensor, Tensor]
    # whether w_hr gets a gradient (projection_used)
    proj_used: bool
    # the layer's input gradients (x, h0, c0, w_ih, w_hh, b, w_hr) where they are differentiated again, through
    # grads_through_reference; None where the backward kernels serve
    differentiable: tuple | None


def layer_backward(inputs: tuple, batch_sizes: Tensor | None, reverse: bool, given: tuple, y_shape) -> LayerBackward:
    """The start of a fast backend's layer backward: inputs (x, h0, c0, w_ih, w_hh, b, w_hr) as saved, given the
    gradients of (y, h_T, c_T) as autograd passes them (None where an output got none), y_shape y's shape."""
    x, h0, c0, *_, w_hr = inputs
    grad_y, grad_hT, grad_cT = given
    used = projection_used(w_hr, x, grad_y is not None, grad_hT is not None)
    grads = (
        x.new_zeros(y_shape) if grad_y is None else grad_y,
        x.new_zeros(h0.shape) if grad_hT is None else grad_hT,
        x.new_zeros(c0.shape) if grad_cT is None else grad_cT,
    )
    differentiable = None
    if torch.compiler.is_compiling():
        # A traced backward (compiled autograd's, AOTAutograd's) runs outside torch.func's transforms, whose wrappers
        # dynamo cannot inspect: asking broke every compiled-autograd graph at this layer's backward
        twice = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*inputs, *grads))
    else:
        twice = differentiated_twice((*inputs, *grads))  # create_graph=True, nested torch.func transforms
    if twice:
        *others, dw_hr = grads_through_reference(inputs, batch_sizes, reverse, given)
        differentiable = (*others, dw_hr if used else None)
    return LayerBackward(grads, used, differentiable)


def grads_through_reference(inputs: tuple, batch_sizes: Tensor | None, reverse: bool, grads: tuple) -> tuple:
    """A fast backend's backward where its gradients are differentiated again (differentiated_twice): the layer's
    input gradients for inputs (x, h0, c0, w_ih, w_hh, b, w_hr) and grads (of y, hT, cT; None where an output got
    none), differentiable. The backward kernels' are not, so this differentiates the layer recomputed in plain ops
    (fastlstm.reference; bfloat16 and float16 in float32, as the kernels compute them) through torch.func.vjp, which
    composes with torch.func's transforms and with autograd outside them, and counts only this layer's part of each
    gradient (not the paths by which one input was computed from another, which the outer backward follows). Slow
    and exact. Only the outputs that got a gradient are differentiated: a zero one of y would put w_hr into the
    result's graph, and a second backward would give w_hr a zero gradient where nn.LSTM gives none. A gradient of an
    input that no differentiated output reaches is zero (torch.func's vjp), as the callers' projection_used knows."""
    from fastlstm import reference

    compute = torch.float32 if inputs[0].dtype in (torch.bfloat16, torch.float16) else inputs[0].dtype
    present = [k for k, t in enumerate(inputs) if t is not None]
    given = [k for k, g in enumerate(grads) if g is not None]
    if not given:  # every output's gradient None (a function after the layer that passes none back)
        return (None,) * len(inputs)

    def layer(*tensors):
        args = list(inputs)
        for k, t in zip(present, tensors):
            args[k] = t.to(compute)
        outputs = reference.lstm_layer(*args, batch_sizes, reverse)
        return tuple(outputs[k] for k in given)

    _, vjp = torch.func.vjp(layer, *(inputs[k] for k in present))
    got = vjp(tuple(grads[k].to(compute) for k in given))
    out: list[Tensor | None] = [None] * len(inputs)
    for k, g in zip(present, got):
        out[k] = g
    return tuple(out)


def names() -> list[str]:
    """Every backend fastlstm knows, available on this machine or not."""
    return list(_REGISTRY)


def load_all() -> None:
    """Import every backend's module now (a broken one becomes a stand-in that says why), and register the ops
    each can register cheaply (Backend.load_ops)."""
    for name in _REGISTRY:
        backend = get(name)
        try:
            backend.load_ops()
        except Exception:  # noqa: BLE001 - registering early is a convenience; the backend reports trouble at use
            pass


def get(name: str) -> Backend:
    """The backend called `name`. Raises ValueError for an unknown name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown fastlstm backend {name!r}; expected one of {', '.join(_REGISTRY)}")
    if name not in _loaded:
        module_name, attr = _REGISTRY[name].split(":")
        try:
            _loaded[name] = getattr(importlib.import_module(module_name), attr)
        except Exception as error:  # a broken optional install must leave the native path working
            _loaded[name] = _Broken(name, f"importing {module_name} failed: {type(error).__name__}: {error}")
    return _loaded[name]


class _Broken(Backend):
    """Stands in for a backend whose module could not be imported; it reports why and serves nothing."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason

    def layer(self, x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse) -> LayerResult:
        raise RuntimeError(f"fastlstm backend {self.name!r} is unavailable: {self._reason}")
