"""fastlstm.explain: which backend would run each layer of a call, and why."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fastlstm.dispatch import Choice
from fastlstm.module import LSTM, _no_live_row, _not_dense_call


@dataclass(frozen=True)
class Explanation:
    """Which backend serves each layer and direction of one call, and why (str() prints it a line each).

    requested: the backend the module asked for ("auto", a forced name, or $FASTLSTM_BACKEND's value).
    layers: (layer, "forward" | "reverse", dispatch.Choice(backend, reason)) in the order the module runs them.
    """

    requested: str
    layers: list[tuple[int, str, Choice]]

    @property
    def backends(self) -> list[str]:
        """The backend of each entry of `layers`, in order."""
        return [choice.backend for _, _, choice in self.layers]

    def __str__(self) -> str:
        lines = [f"backend requested: {self.requested}"]
        for layer, direction, choice in self.layers:
            lines.append(f"  layer {layer} {direction}: {choice.backend} ({choice.reason})")
        return "\n".join(lines)


def explain(module: LSTM, input, hx: tuple[Tensor, Tensor] | None = None, *, lengths=None) -> Explanation:
    """Which backend `module(input, hx, lengths=lengths)` would run for each (layer, direction), and why; under
    autocast, planned in autocast's dtype as the call is. Computes nothing of the call itself (auto may run a fast
    backend's one-time kernel self-test on a tiny input, and under autocast nn.LSTM's dtypes are read off a
    1-step call of its own, as the call would)."""
    if not isinstance(module, LSTM):
        raise TypeError(f"explain() takes a fastlstm.LSTM, got {type(module).__name__}; see fastlstm.convert")
    directions = ["forward", "reverse"] if module.bidirectional else ["forward"]
    sparse = _not_dense_call(input, hx)
    if lengths is not None:
        lengths, (_, longest) = module._check_lengths(input, lengths)
    # lengths= packs sparse input for nn.LSTM's own forward (LSTM._forward_lengths)
    if sparse and (lengths is None or lengths.numel()):
        choice = Choice("native", "sparse or nested input: nn.LSTM's own forward takes the call")
        return _explanation(module, [choice] * (module.num_layers * len(directions)), directions)
    # In the caller's grad mode, as the call prepares: under no_grad the rows that a lengths= call or an unsorted
    # pack reorders (index_select, not a view) lost requires_grad, and a call that trains was planned as inference
    module._update_flat_weights()
    data, state, batch_sizes, *_ = module._prepare(input, hx)
    if lengths is not None and lengths.numel():
        data, state, batch_sizes, *_ = module._sorted_by_length(data, state, lengths, longest)
    # Under autocast, backends compute in its dtype, which can depend on grad mode: the caller's, as the call's
    amp = module._autocast_dtypes(data, state, batch_sizes)
    choices = module._plan(data, state, batch_sizes, amp)
    if _no_live_row(data, batch_sizes):
        choices = [Choice("native", "a pack with no live row: nn.LSTM's own call answers it")] * len(choices)
    return _explanation(module, choices, directions)


def _explanation(module: LSTM, choices, directions: list[str]) -> Explanation:
    from fastlstm import dispatch

    layers = [(k // len(directions), directions[k % len(directions)], c) for k, c in enumerate(choices)]
    return Explanation(dispatch.requested(module.backend), layers)
