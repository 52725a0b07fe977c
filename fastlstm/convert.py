"""Swap torch.nn.LSTM and fastlstm.LSTM inside a model, in place, sharing the very same Parameter objects."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

from fastlstm import dispatch
from fastlstm.backends import outside_stacklevel
from fastlstm.module import LSTM, rebuilt_as

_TARGETS = {"fastlstm": LSTM, "torch": nn.LSTM}


def _is_source(module: nn.Module, to: str) -> bool:
    """Whether `module` is an LSTM to swap: the source class itself (parametrized or not). A subclass of it is
    left as it is, with a warning: rebuilt as the target class it would lose what the subclass adds (its own
    forward, say)."""
    source = nn.LSTM if to == "fastlstm" else LSTM
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # the class parametrize generated derives from the module's own
    if cls is source:
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
            new = rebuilt_as(module, _TARGETS[to])
            if to == "fastlstm":
                new.backend = backend
            swapped[id(module)] = new
        return swapped[id(module)]

    if _is_source(model, to):
        return swap(model)
    for parent in list(model.modules()):
        # _modules itself, not named_children(): that names a module held under two names only once
        for name, child in list(parent._modules.items()):
            if child is not None and _is_source(child, to):
                setattr(parent, name, swap(child))
    return model
