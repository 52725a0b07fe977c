"""Swap torch.nn.LSTM and fastlstm.LSTM inside a model, in place, sharing the very same Parameter objects."""

from __future__ import annotations

import functools
import sys
import warnings

from torch import nn
from torch.nn.utils import parametrize

from fastlstm import dispatch
from fastlstm.backends import outside_stacklevel
from fastlstm.module import LSTM, TORCH_LSTM, rebind_load_pre_hooks, rebuilt_as

_TARGETS = {"fastlstm": LSTM, "torch": TORCH_LSTM}


def _is_source(module: nn.Module, to: str, compiled: set[int]) -> bool:
    """Whether `module` is an LSTM to swap: the source class itself (parametrized or not). A subclass of it is
    left as it is, with a warning: rebuilt as the target class it would lose what the subclass adds (its own
    forward, say). So is a layer whose call something else holds (compiled: the ids of the layers torch.compile
    wrapped)."""
    source = TORCH_LSTM if to == "fastlstm" else LSTM
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # the class parametrize generated derives from the module's own
    if cls is source:
        if id(module) in compiled:
            held = "torch.compile wrapped it"
        else:
            replaced = _replaced_on_instance(module)
            held = f"its call was replaced on the instance ({replaced})" if replaced else ""
        if held:
            warnings.warn(
                f"fastlstm.convert: left an {cls.__qualname__} unconverted: {held}, and this layer would go on "
                "serving the calls, blind to the weights the converted one is given afterwards; convert first, then "
                "compile or hook the converted layer",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )
            return False
        return True
    if issubclass(cls, source):
        warnings.warn(
            f"fastlstm.convert: left {cls.__qualname__} unconverted: it subclasses "
            f"{'torch.nn.LSTM' if to == 'fastlstm' else 'fastlstm.LSTM'}, and the converted layer would drop what "
            "the subclass adds",
            UserWarning,
            stacklevel=outside_stacklevel(),
        )
    return False


def _compiled_layers(model: nn.Module) -> set[int]:
    """The ids of the modules in `model` (itself included) that torch.compile wrapped: an OptimizedModule holds one
    as its _orig_mod, and its compiled call is bound to that module, not to whatever _orig_mod later holds. None
    exists before torch._dynamo is imported, which a check need not then do (~1 s)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    if optimized is None:
        return set()
    return {id(m._orig_mod) for m in model.modules() if isinstance(m, optimized)}


def _replaced_on_instance(module: nn.Module) -> str:
    """What replaced the module's call on the instance itself, or "": Module.compile() (a compiled call of the
    module's bound _call_impl), a forward set on the instance (accelerate's hooks: a partial holding the module), or
    any other attribute bound to the module. Copied into the converted layer, each would keep calling this one."""
    own = vars(module)
    if own.get("_compiled_call_impl") is not None:
        return "Module.compile()"
    if "forward" in own:
        return "a forward of its own"
    for name, value in own.items():
        bound = getattr(value, "__self__", None) is module
        if bound or (isinstance(value, functools.partial) and any(arg is module for arg in value.args)):
            return f"{name!r}, an attribute bound to it"
    return ""


def convert(model: nn.Module, to: str = "fastlstm", backend: str | None = None) -> nn.Module:
    """Replace every nn.LSTM in `model` by fastlstm.LSTM (or back, with to="torch"), in place. Subclasses are
    left as they are (with a warning).

    The replacements hold the same Parameter objects, so an optimizer built before the conversion keeps
    working. Returns the model, or the replacement when `model` itself is an LSTM.
    backend: the fastlstm backend for the converted layers (None: $FASTLSTM_BACKEND or auto).
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: to must be 'fastlstm' or 'torch', got {to!r}")
    if backend is not None:
        dispatch.validate_name(backend)

    swapped: dict[int, nn.Module] = {}  # id -> replacement: a layer used in several places stays one layer

    def swap(module: nn.Module) -> nn.Module:
        if id(module) not in swapped:
            # its own children first (an LSTM holding an LSTM): the rebuilt layer takes a copy of its _modules
            swap_children(module)
            new = rebuilt_as(module, _TARGETS[to])
            rebind_load_pre_hooks(new, module)
            if to == "fastlstm":
                new.backend = backend
            swapped[id(module)] = new
        return swapped[id(module)]

    def swap_children(parent: nn.Module) -> None:
        # _modules itself, not named_children(): that names a module held under two names only once
        for name, child in list(parent._modules.items()):
            if child is not None and _is_source(child, to, compiled):
                setattr(parent, name, swap(child))

    compiled = _compiled_layers(model)
    if _is_source(model, to, compiled):
        return swap(model)
    for parent in list(model.modules()):
        if id(parent) not in swapped:  # a replaced layer's children were swapped before it was rebuilt
            swap_children(parent)
    return model
