"""fastlstm: a drop-in, faster torch.nn.LSTM."""

from fastlstm import backends
from fastlstm.convert import convert
from fastlstm.dispatch import BackendUnavailableError
from fastlstm.explain import Explanation, explain
from fastlstm.module import LSTM

__version__ = "0.1.0"


def available_backends() -> dict[str, str | None]:
    """Every backend and why it cannot run on this machine (None when it can)."""
    return {name: backends.get(name).unavailable_reason() for name in backends.names()}


__all__ = [
    "LSTM",
    "BackendUnavailableError",
    "Explanation",
    "available_backends",
    "backends",
    "convert",
    "explain",
    "__version__",
]
