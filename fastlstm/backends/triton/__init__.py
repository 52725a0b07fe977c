"""The Triton backend: fused LSTM kernels for CUDA (and for CPU tensors under TRITON_INTERPRET=1).

Importing this package never imports triton; `BACKEND.layer` does, on first use.

Two kernels, chosen per call by `ops.choose_kernel` (force one with `layer(..., kernel="step"|"sequence")`
or env FASTLSTM_TRITON_KERNEL=step|sequence):
- step: one launch per time step, grid (batch tiles, hidden tiles); h @ W_hh^T for all four gates and the
  pointwise cell fused (a second small launch per step applies W_hr when proj_size is set).
- sequence: one launch for the whole time loop, one program per batch tile owning every hidden unit of its
  rows; used for small batches and hidden sizes up to ops.SEQ_MAX_HIDDEN.
Both have a backward of the same shape; the weight and input grads are torch GEMMs over all T*B rows.
The step kernel's loops (inference, and training's forward and backward) are replayed as CUDA graphs of
fixed-length chunks from a configuration's second call on (graphs.py; FASTLSTM_TRITON_GRAPHS=0 turns that off).
Tiles and warps come from ops._blocks; env FASTLSTM_TRITON_CONFIG (e.g. "BLOCK_K=32,num_warps=8") overrides
them, for benchmarks/gpu_tune.py.

Dtypes: float32, bfloat16, float16 on CUDA; float32, float64 (triton 3.5+) and float16 under the interpreter
(float64 is for gradcheck-grade tests, float16 checks the half-precision casts; float64 on CUDA is left to the native
backend). Not bfloat16: triton 3.6-3.9's interpreter multiplies bfloat16 tiles in tl.dot wrongly (a 16 x 16
product of normal values came out ~1e10) and rounds float32 to bfloat16 differently from torch.
c and every accumulation are fp32 (fp64 for float64).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fastlstm.backends import Backend, LayerCall, LayerResult

CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRETER_DTYPES = (torch.float32, torch.float64, torch.float16)
# The oldest triton the kernels are used with. Under triton 3.0 and 3.1 (what torch 2.4 and 2.5 pin) the
# interpreter ran them to wrong numbers (outputs never written), and no GPU was at hand to tell whether compiled
# kernels fare better; 3.2-3.6, 3.8 and 3.9 pass the whole interpreter suite (3.2-3.4 without float64, next; 3.7
# was not run).
MIN_TRITON = (3, 2)
# tl.dot of float64 tiles under the interpreter: "Unsupported lhs dtype fp64" before triton 3.5.
INTERPRETER_FLOAT64_TRITON = (3, 5)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed triton, which must be importable."""
    import triton

    major, minor = (int("".join(ch for ch in part if ch.isdigit()) or 0) for part in triton.__version__.split(".")[:2])
    return major, minor


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except ImportError as e:
            if (e.name or "").split(".")[0] != "triton":  # triton is there; what it imports is not (numpy, say)
                return f"importing triton failed: {e} (pip install 'fastlstm[triton]' brings what it needs)"
            return f"triton is not installed: {e} (pip install 'fastlstm[triton]', Linux only)"
        except Exception as e:  # a broken install must not break dispatch
            return f"triton is installed but cannot be imported: {type(e).__name__}: {e}"
        if triton_version() < MIN_TRITON:
            return (
                f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest release "
                "fastlstm's kernels are tested with (pip install 'triton>=3.2' with a torch that accepts it)"
            )
        if not torch.cuda.is_available() and not _interpreting():
            return "triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on CPU tensors)"
        return None

    def load_ops(self) -> None:
        # Only where the ops can have run (a CUDA build of torch, or the interpreter) and triton is installed;
        # the module defines the ops without importing triton. Not torch.cuda.is_available(): at import time
        # it would initialise CUDA in the parent of every later fork().
        if (torch.version.cuda or _interpreting()) and importlib.util.find_spec("triton") is not None:
            import fastlstm.backends.triton.ops  # noqa: F401

    def unsupported_reason(self, call: LayerCall) -> str | None:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if call.device_type == "cuda":
            if call.dtype not in CUDA_DTYPES:
                return f"dtype {call.dtype} is not supported by the triton kernels on CUDA (float32/bfloat16/float16)"
        elif call.device_type == "cpu":
            if not _interpreting():
                return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
            if call.dtype not in INTERPRETER_DTYPES:
                return f"dtype {call.dtype} is not supported by the triton interpreter (float32/float64/float16)"
            if call.dtype == torch.float64 and triton_version() < INTERPRETER_FLOAT64_TRITON:
                return "float64 under the triton interpreter needs triton 3.5 or later (tl.dot of float64 tiles)"
        else:
            return f"device {call.device_type!r} is not supported by the triton backend (cuda only)"
        if call.forward_ad:
            return "forward-mode AD (torch.func.jvp, jacfwd, dual tensors): the triton op has no forward derivative"
        from fastlstm.backends.triton.ops import HAS_VMAP_RULE, size_reason

        if call.vmapped and not HAS_VMAP_RULE:
            return f"torch.vmap: the triton op's vmap rule needs torch 2.6 or later (torch {torch.__version__} here)"
        sizes = (call.seq_len, call.batch, call.hidden_size, call.out_size)
        # A traced call (dynamo shows a dynamic size as an int) leaves the int32 limit to the op, which checks the
        # sizes it runs at: comparing them here would guard the program, and torch.export refused a batch Dim that
        # the limit bounds where the length is static
        traced = torch.compiler.is_compiling() or not all(type(v) is int for v in sizes)
        return size_reason(*sizes, traced=traced)

    def self_test(self, call: LayerCall) -> str | None:
        """Runs the kernels this call needs once on a two-step input and checks them against native (ops.self_test)."""
        from fastlstm.backends.triton import ops

        return ops.self_test(call)

    def crash_reason(self, call: LayerCall) -> str | None:
        """Builds the kernels `call` needs in a child process first, on a GPU (build_guard)."""
        from fastlstm.backends.triton import build_guard, ops

        kernel = ops.choose_kernel(call.batch, call.hidden_size, call.out_size, call.dtype)
        return build_guard.crash_reason(call, kernel)

    def layer(self, x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, kernel: str | None = None) -> LayerResult:
        """One layer, one direction (fastlstm.reference); `kernel` forces "step" or "sequence"."""
        from fastlstm.backends.triton import ops

        return ops.layer(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, kernel)


BACKEND = TritonBackend()
