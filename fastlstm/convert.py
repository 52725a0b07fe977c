"""Swap torch.nn.LSTM and fastlstm.LSTM inside a model, in place, sharing the very same Parameter objects."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

from fastlstm import dispatch
from fastlstm.module import LSTM

_TARGETS = {"fastlstm": LSTM, "torch": nn.LSTM}


def _rebuild(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A `cls` instance holding `module`'s state: parameters, buffers, hooks, mode, device and dtype stay."""
    if parametrize.is_parametrized(module):
        # parametrize swaps the class for a generated subclass holding the parametrized properties;
        # build the same kind of subclass over the target class.
        generated = type(module)
        namespace = {k: v for k, v in vars(generated).items() if k not in ("__dict__", "__weakref__")}
        cls = type(generated.__name__, (cls,), namespace)
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(module).items()})
    new._flat_weights_names = list(module._flat_weights_names)
    new._all_weights = [list(w) for w in module._all_weights]
    new._flat_weights = list(module._flat_weights)
    return new


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
            stacklevel=3,
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

    def swap(module: nn.Module) -> nn.Module:
        new = _rebuild(module, _TARGETS[to])
        if to == "fastlstm":
            new.backend = backend
        else:
            new.__dict__.pop("backend", None)
            new.__dict__.pop("_mixed_dtypes", None)
        return new

    if _is_source(model, to):
        return swap(model)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if _is_source(child, to):
                setattr(parent, name, swap(child))
    return model
