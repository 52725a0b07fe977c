"""The layer ops' FLOPs for torch.utils.flop_counter.FlopCounterMode, which counts an op only through a formula
registered for it: without these a model's fastlstm layers counted 0 on cpp and triton, and lost the products
nn.LSTM's ATen path shows (a projection, packed input). As FlopCounterMode counts every op: products alone, 2 per
multiply-add; the cell's pointwise work is not counted. (nn.LSTM's oneDNN and cuDNN calls count 0, and the native
path counts as nn.LSTM does.)"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys
import threading

from torch import Tensor


def layer_flops(
    rows, input_size, hidden_size, proj_size, backward: bool = False, weight_grads: bool = True, input_grad: bool = True
):
    """One (layer, direction) over `rows` (step, sequence) rows. Forward: x @ w_ih^T and h @ w_hh^T for the four
    gates, and the projection. Backward: the same products for dx (with input_grad), the recurrent dh and the
    projection's, and with weight_grads those of the weights' gradients again (a full backward twice its
    forward)."""
    per_row = 4 * hidden_size * (input_size + (proj_size or hidden_size)) + hidden_size * proj_size
    if not backward:
        return 2 * rows * per_row
    dx = 4 * hidden_size * input_size
    return 2 * rows * ((per_row if input_grad else per_row - dx) + (per_row if weight_grads else 0))


def rows(x: Tensor, batch_sizes: Tensor | None):
    """The rows a layer computes: a pack's live ones where its batch sizes can be read, else every row of x (a
    traced or fake pack's values are unknown: its padded rows)."""
    if batch_sizes is not None and type(batch_sizes) is Tensor and batch_sizes.device.type == "cpu":
        return int(batch_sizes.sum())
    return math.prod(x.shape[:-1])


def _layer(x, w_ih, w_hh, w_hr, batch_sizes, **kind):
    proj_size = 0 if w_hr is None else w_hr.shape[0]
    return layer_flops(rows(x, batch_sizes), w_ih.shape[1], w_hh.shape[0] // 4, proj_size, **kind)


# One formula per op, by its schema's argument order (cpu.py's schemas, triton/ops.py's custom ops).


def forward(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, *_, **__):
    """cpp_lstm_fwd, triton_forward."""
    return _layer(x, w_ih, w_hh, w_hr, batch_sizes)


def cpp_backward(gy, ghT, gcT, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, g, ch, rev, bias, weight_grads=True,
                 input_grad=True, **__):  # fmt: skip
    return _layer(x, w_ih, w_hh, w_hr, batch_sizes, backward=True, weight_grads=weight_grads, input_grad=input_grad)


def cpp_backward_rows(gy, ghT, gcT, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, g, ch, rev, input_grad=True, **__):
    """Without the weights' gradients, which its caller sums per sample in ops of torch's own (counted there)."""
    return _layer(x, w_ih, w_hh, w_hr, batch_sizes, backward=True, weight_grads=False, input_grad=input_grad)


def triton_backward(gy, ghT, gcT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, rev, kernel, bias,
                    input_grad=True, **__):  # fmt: skip
    return _layer(x, w_ih, w_hh, w_hr, batch_sizes, backward=True, input_grad=input_grad)


def triton_backward_rows(gy, ghT, gcT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, rev, kernel,
                         input_grad=True, **__):  # fmt: skip
    return _layer(x, w_ih, w_hh, w_hr, batch_sizes, backward=True, weight_grads=False, input_grad=input_grad)


def stack_forward(x, h0, c0, weights, batch_sizes, biases, proj, bidirectional, **__):
    """cpp_lstm_stack_fwd: every (layer, direction) of the stack, each over the same rows."""
    per_layer = 2 + biases + int(proj)
    total = 0
    for k in range(0, len(weights), per_layer):
        w_hr = weights[k + 2 + biases] if proj else None
        total = total + _layer(x, weights[k], weights[k + 1], w_hr, batch_sizes)
    return total


# (op, formula) pairs waiting for torch.utils.flop_counter. fastlstm does not import it (it imports triton: 0.15 s
# more of `import fastlstm` measured), and each FlopCounterMode copies the registry when made: so the formulas
# register as that module finishes importing (_AfterCounterImport), or at once where it is already imported.
_COUNTER = "torch.utils.flop_counter"
_waiting: list = []
_lock = threading.Lock()


def register(op, formula) -> None:
    """`formula` (given the op's raw arguments) for op in FlopCounterMode's registry, now or once it is imported."""
    with _lock:
        _waiting.append((op, formula))
    if _COUNTER in sys.modules:
        _register_waiting()
    elif not any(isinstance(finder, _AfterCounterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterCounterImport())


def _register_waiting() -> None:
    counter = sys.modules.get(_COUNTER)
    register_formula = getattr(counter, "register_flop_formula", None)  # absent from a torch without the registry
    if register_formula is None:
        return
    with _lock:
        registry = getattr(counter, "flop_registry", {})
        for op, formula in _waiting:
            if op not in registry:
                register_formula(op, get_raw=True)(formula)
            # torch 2.4's registers the op's overloads, and its counter looks ops up by packet (torch.ops.x.y): an
            # entry by packet as later releases make, which is what their counter reads
            registry.setdefault(op, formula)
        _waiting.clear()


class _AfterCounterImport(importlib.abc.MetaPathFinder):
    """Finds torch.utils.flop_counter as the path finder does, and registers the waiting formulas once its module has
    run; then leaves sys.meta_path (not before: find_spec alone, without an import, runs no module)."""

    def find_spec(self, name, path=None, target=None):
        if name != _COUNTER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        loader = None if spec is None else spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def run_then_register(module) -> None:
            run_module(module)
            _register_waiting()
            if self in sys.meta_path:
                sys.meta_path.remove(self)

        loader.exec_module = run_then_register
        return spec
