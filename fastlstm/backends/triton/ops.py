"""Launchers and torch.library ops of the Triton backend (imported only when triton is importable).

Ops (namespace fastlstm; fakes and autograd registered here, as the CPU backend's in fastlstm.backends.cpu):
    fastlstm::triton_forward  -> y, hT, cT and what backward needs (acts, hs, cs, r)
    fastlstm::triton_backward -> grads of x, h0, c0, w_ih, w_hh, b, w_hr
    fastlstm::triton_backward_rows -> grads of x, h0, c0, and the rows the weights' are sums of (dgates; with a
        projection the gradient reaching each output h): frozen weights, per-sample weight gradients under vmap
The backward ops take input_grad=True: without it dx is empty ([0]) and its GEMM skipped.
All take `kernel`: "step" (one launch per time step) or "sequence" (one launch for the whole loop), chosen
before the op by `choose_kernel`; or "auto", which the op resolves by the same rule from its own sizes (a traced
call's: so that a program's batch is not bound by the rule, see `layer`).
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op reads the ops' annotations as objects and
# rejects them as strings ("Parameter x has unsupported type Tensor").
import functools
import math
import os
import threading
from typing import NamedTuple

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from fastlstm import reference
from fastlstm.backends import (
    MISSING,
    VMAP_RULES,
    LayerCall,
    cell_state_as,
    dispatch_mode_active,
    fake_on_x_device,
    fake_tensors_in_play,
    flops,
    functorch_grad_levels,
    host_to_device,
    layer_backward,
    layer_op_grads,
    materialize_grads_for_vmap,
    per_sample_layer_grads,
    remember,
    rows_side_by_side,
    vmap_layer_op,
    vmap_per_sample,
)
from fastlstm.backends.native import BACKEND as NATIVE
from fastlstm.backends.native import live_mask
from fastlstm.backends.triton import CUDA_DTYPES, INTERPRETER_DTYPES, build_guard

# triton itself (and the kernels) are imported where kernels launch: importing this module only defines the
# torch ops, which `import fastlstm` does so that saved programs holding them load (TritonBackend.load_ops).

KERNELS = ("step", "sequence")
ENV_KERNEL = "FASTLSTM_TRITON_KERNEL"
ENV_CONFIG = build_guard.ENV_TILES
CONFIG_KEYS = ("BLOCK_B", "BLOCK_H", "BLOCK_P", "BLOCK_K", "num_warps", "num_stages")
# The sequence kernel runs one program per batch tile that loops over every hidden unit, so it pays off
# where the per-step grid is small and launch overhead dominates. These bounds are a first guess, to be
# tuned with benchmarks/gpu_grid.py on a GPU.
SEQ_MAX_HIDDEN = 256
SEQ_MAX_BATCH = 64
INT32_MAX = 2**31 - 1
# Compiler options of every launch. FMA contraction stays on, as triton up to 3.9 does by default: 3.9 warns
# once a process when a compile leaves it unset, and says 3.10 turns the default off.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)
# Recurrent widths (hidden, or the projection) up to this abort triton 3.9's compiler in float32's FMA forward
# kernels with the usual tiles (see _blocks and choose_kernel, which both steer around it).
FMA_NARROW_WIDTH = 16


def _kernel_setting() -> str:
    """$FASTLSTM_TRITON_KERNEL, spaces around it trimmed; "auto" where unset or blank (as the C++ knobs read)."""
    return (os.environ.get(ENV_KERNEL) or "").strip() or "auto"


def choose_kernel(batch: int, hidden: int, out_size: int, dtype: torch.dtype, kernel: str | None = None) -> str:
    """Which kernel serves a call: `kernel` if given, else env FASTLSTM_TRITON_KERNEL, else the size rule."""
    kernel = kernel or _kernel_setting()
    if kernel == "auto":
        fits = hidden <= SEQ_MAX_HIDDEN and out_size <= SEQ_MAX_HIDDEN and batch <= SEQ_MAX_BATCH
        # Triton 3.9's LLVM aborts the process compiling the sequence kernel's FMA dots (float32 without TF32)
        # where a projection of 16 or less meets a wider hidden size, whatever the tiles tried (see _blocks); the
        # step kernel compiles there. Forcing the sequence kernel there on a GPU still meets the abort.
        aborts = _fma_dot(dtype) and out_size <= FMA_NARROW_WIDTH < hidden
        return "sequence" if fits and not aborts else "step"
    if kernel not in KERNELS:
        raise ValueError(f"{ENV_KERNEL} / kernel must be one of auto, step, sequence; got {kernel!r}")
    return kernel


def _kernel_of(x: Tensor, w_hh: Tensor, kernel: str) -> str:
    """An op's kernel: `kernel`, or for "auto" the size rule's choice at these sizes (choose_kernel)."""
    return choose_kernel(x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1], x.dtype, kernel)


def setting_errors() -> list[str]:
    """What is wrong with this process's triton settings ($FASTLSTM_TRITON_KERNEL, $FASTLSTM_TRITON_CONFIG), which
    every triton call would raise (`fastlstm info` says so up front)."""
    errors = []
    if _kernel_setting() not in ("auto", "step", "sequence"):
        errors.append(f"{ENV_KERNEL} must be one of auto, step, sequence; got {os.environ[ENV_KERNEL]!r}")
    if os.environ.get(ENV_CONFIG, "").strip():
        try:
            _parse_config(os.environ[ENV_CONFIG])
        except ValueError as error:
            errors.append(str(error))
    return errors


def kernel_choices() -> str:
    """Which kernel serves which call, the tiles, and the step loops' graphs, knobs applied (`fastlstm info`)."""
    from fastlstm.backends.triton import graphs

    forced = os.environ.get(ENV_KERNEL)
    rule = (f"{forced} ({ENV_KERNEL})" if forced and forced != "auto" else
            f"sequence kernel up to batch {SEQ_MAX_BATCH} and hidden {SEQ_MAX_HIDDEN} (float32 without TF32: not "
            "for a projection of 16 or less), else per-step")  # fmt: skip
    override = os.environ.get(ENV_CONFIG, "").strip()
    tiles = (
        f"{ENV_CONFIG}={override}"
        if override
        else "tiles: BLOCK_B 16 or 32 by batch, BLOCK_H / BLOCK_P the next power of two of the hidden / projection "
        "size within 16-64, BLOCK_K 16 for float32 without TF32 (and float64), else 64 (32 below 64); 4 warps"
    )
    return f"{rule}; {tiles}; step loops as CUDA graphs: {graphs.describe()}"


def size_reason(T: int, B: int, H: int, P: int, traced: bool = False) -> str | None:
    """Why the kernels cannot take these sizes (int32 offsets), or None; where `traced`, the empty sizes only."""
    if T < 1 or B < 1:
        return f"empty input (seq_len={T}, batch={B})"
    if traced:
        return None
    if (T + 2) * B * 4 * H > INT32_MAX or (T + 1) * B * P > INT32_MAX:
        return f"buffers over 2**31 elements (seq_len={T}, batch={B}, hidden={H}); kernels use int32 offsets"
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own TF32 switch for matmuls (off by default): exact fp32 unless the user opts in.
    return "tf32" if build_guard._tf32(dtype) else "ieee"


def _fma_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot runs without tensor cores (float32 without TF32, float64): as FMA loops over register tiles."""
    return dtype in (torch.float32, torch.float64) and _precision(dtype) == "ieee"


def _block(n: int) -> int:
    """A tile's width over n units: a power of two from 16 to 64."""
    import triton

    return max(16, min(64, triton.next_power_of_2(n)))


def _blocks(B: int, H: int, P: int, kernel: str, dtype: torch.dtype) -> dict:
    if kernel == "sequence":
        block_b = 16 if B <= 16 else 32
    else:
        block_b = 16 if B <= 32 else 32
    # Dots without tensor cores (float32 without TF32, float64) run as FMA loops that keep their tiles in
    # registers. Compiled for sm_90 (triton 3.6 and 3.9, `tests/triton_compile.py --resources`), BLOCK_K 64 put
    # 8-10 KB a thread into local memory in both forward kernels wherever the recurrent K was 64 (hidden 64, or
    # a projection of 64; at batch > 32 a projection of 32 too, with BLOCK_K 32) and spilled 100-1800 bytes
    # elsewhere. BLOCK_K 16 spilled least wherever the three were compared (every step kernel over batch 1-256,
    # hidden 16-1024, at most 120 bytes; sequence kernels up to batch 64), and the --full grid compiled with it
    # spills at most 528 bytes. Chosen from the compiler's figures, not timed: benchmarks/gpu_tune.py times others.
    fma_dot = _fma_dot(dtype)
    block_k = 16 if fma_dot else 64 if min(H, P) >= 64 else 32
    block_h = _block(H)
    if fma_dot and P <= FMA_NARROW_WIDTH:
        # Triton 3.9's LLVM aborts the process (an assertion in its SLP vectorizer, "must be scheduled at this
        # point") compiling the forward kernels for sm_90 where the recurrent width is 16 or less (hidden <= 16,
        # or a projection <= 16) and a gate tile holds 4 or more values a thread (32 x 16 and up with 4 warps).
        # 16 x 16 tiles compile in the step kernel, and in the sequence kernel up to hidden 16 (beyond it,
        # choose_kernel takes the step kernel); triton 3.6 compiles every tile. tests/triton_compile.py's short
        # list holds such launches. Seen with the sigmoid 1 / (1 + e^-x); with today's (kernels._sigmoid) the 32 x 16
        # step launch compiles, but the other widths and kernels were not tried again, so the rule stays.
        block_b = block_h = 16
    blk = dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_P=_block(P), BLOCK_K=block_k)
    blk.update((k, v) for k, v in config_override().items() if k.startswith("BLOCK_"))
    return blk


def _launch_options() -> dict:
    options = dict(LAUNCH_OPTIONS)
    options.update((k, v) for k, v in config_override().items() if not k.startswith("BLOCK_"))
    return options


def config_override() -> dict[str, int]:
    """Tile sizes and launch options from env FASTLSTM_TRITON_CONFIG, for tuning on a GPU (benchmarks/gpu_tune.py):
    e.g. "BLOCK_B=16,BLOCK_H=32,BLOCK_K=32,num_warps=8". They apply to every launch of both kernels."""
    text = os.environ.get(ENV_CONFIG, "")
    return _parse_config(text) if text.strip() else {}


@functools.lru_cache(maxsize=16)
def _parse_config(text: str) -> dict[str, int]:
    config = {}
    for item in (part.strip() for part in text.split(",")):
        name, _, value = (s.strip() for s in item.partition("="))
        if name not in CONFIG_KEYS or not value.isdigit():
            raise ValueError(
                f"{ENV_CONFIG} takes NAME=INTEGER items separated by commas, NAME one of {', '.join(CONFIG_KEYS)}; "
                f"got {item!r} in {text!r}"
            )
        number = int(value)
        if name.startswith("BLOCK_") and (number < 16 or number & (number - 1)):
            raise ValueError(f"{ENV_CONFIG}: {name} must be a power of two >= 16 (tl.dot's least); got {number}")
        if name == "num_warps" and (number < 1 or number & (number - 1)):
            raise ValueError(f"{ENV_CONFIG}: num_warps must be a power of two; got {number}")
        if name == "num_stages" and number < 1:
            raise ValueError(f"{ENV_CONFIG}: num_stages must be at least 1; got {number}")
        config[name] = number
    return config


def _check_shapes(x: Tensor, expected: dict[str, tuple[Tensor | None, tuple[int, ...] | None]]) -> None:
    """Each tensor's shape (None: any) and device, x's, before any launch: the kernels index them by the layer's
    sizes, so one smaller than they take is read or written out of bounds. On a GPU that is an illegal memory
    access, which ends every later CUDA call of the process; under the interpreter it segfaulted or corrupted the
    heap (a fuzz of the raw ops: a w_hr of 0 columns, grad_cT one row short, batch sizes above B)."""
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"fastlstm triton: {name} is on {t.device}, x on {x.device}")
        if not t.is_floating_point():
            raise RuntimeError(f"fastlstm triton: {name} must be floating point, got {t.dtype}")
        if shape is not None and tuple(t.shape) != shape:
            raise RuntimeError(f"fastlstm triton: {name} must be {list(shape)}, got {list(t.shape)}")


def _layer_sizes(x: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Tensor | None, kernel: str) -> tuple[int, ...]:
    """T, B, I, H, P of a layer's arguments, checked for rank and for sizes the kernels can take."""
    if kernel not in KERNELS:
        raise ValueError(f"fastlstm triton: kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if x.dim() != 3 or w_ih.dim() != 2 or w_hh.dim() != 2 or w_ih.shape[0] % 4:
        raise RuntimeError(f"fastlstm triton: x must be [T, B, I], w_ih [4H, I] and w_hh [4H, P], got "
                           f"{list(x.shape)}, {list(w_ih.shape)}, {list(w_hh.shape)}")  # fmt: skip
    T, B, I = x.shape
    H, P = w_ih.shape[0] // 4, w_hh.shape[1]
    if min(T, B) < 1:  # the module sends neither to a fast backend; backward could not take them
        raise RuntimeError(f"fastlstm triton: x must hold one step and one row or more, got {list(x.shape)}")
    if min(I, H, P) < 1:
        raise RuntimeError(f"fastlstm triton: input, hidden and projection sizes must be positive, got {I}, {H}, {P}")
    if w_hr is None and P != H:
        raise RuntimeError(f"fastlstm triton: without w_hr, w_hh must be [4H, H] = [{4 * H}, {H}], got {[4 * H, P]}")
    too_large = size_reason(T, B, H, P)  # dispatch asks it of eager calls; a traced program's sizes are known here
    if too_large is not None:
        raise RuntimeError(f"fastlstm triton: {too_large}")
    return T, B, I, H, P


# Triton's interpreter swaps triton.language's functions for its own while a kernel runs and puts them back after,
# for the whole process: a second Python thread's kernel finishing mid-run left the first one calling the originals
# ("`_semantic` argument must be provided outside of JIT functions"). Kernels on CPU tensors take turns.
_INTERPRETER_TURN = threading.RLock()


def on_input_device(fn):
    """Run `fn` with its first argument's CUDA device current: triton launches on the current device and its
    stream, whatever device the tensors live on (a model on cuda:1 without torch.cuda.set_device(1)). CPU tensors
    (the interpreter) run one call at a time."""

    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs):
        if first.device.type != "cuda":
            with _INTERPRETER_TURN:
                return fn(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(first, *args, **kwargs)

    return wrapper


def dense(t: Tensor | None) -> Tensor | None:
    """t as the kernels read it: contiguous, and with its values in memory. A tensor with the negative bit (a lazy
    negation, torch._neg_view's) keeps it through .contiguous(), and the kernels read its memory un-negated: a
    w_hh so negated gave errors of 3.5e-3 against nn.LSTM's numbers (an audit)."""
    return None if t is None else t.resolve_neg().contiguous()


def _padded_sizes(live: list[int], device: torch.device) -> Tensor:
    """bs[T+2] int32 with bs[t+1] = live rows of time t and zeros at both ends (see kernels.py).

    On CUDA not copied from pageable host memory: that copy waits for the stream (so every call of the sequence
    kernel waited for the GPU to drain) and is refused inside a caller's CUDA graph capture. Dense calls fill it
    on the GPU; packed ones copy from pinned memory without waiting."""
    if device.type != "cuda":
        return torch.tensor([0, *live, 0], dtype=torch.int32, device=device)
    if min(live) == max(live):
        bs = torch.full((len(live) + 2,), live[0], dtype=torch.int32, device=device)
        bs[:: len(live) + 1] = 0
        return bs
    return host_to_device(torch.tensor([0, *live, 0], dtype=torch.int32, device="cpu"), device)


class ForwardBuffers(NamedTuple):
    """What the forward loop reads and writes: xg [T,B,4H] (x @ w_ih^T + b), hs [T+1,B,P] and cs [T+1,B,H] (the
    states, the initial one in slot T when reverse, else 0), acts [T,B,4H], r [T,B,H] ([0] without a
    projection), y [T,B,P], and the weights the kernels read (w_hr is w_hh's pointer without a projection)."""

    xg: Tensor
    hs: Tensor
    cs: Tensor
    acts: Tensor
    r: Tensor
    y: Tensor
    w_hh: Tensor
    w_hr: Tensor


def forward_buffers(T: int, B: int, H: int, P: int, dtype: torch.dtype, device: torch.device, has_proj: bool,
                    save_acts: bool, xg: Tensor | None = None, w_hh: Tensor | None = None,
                    w_hr: Tensor | None = None) -> ForwardBuffers:  # fmt: skip
    """Buffers for one layer's forward loop; xg and the weights are allocated when not given, acts only when
    saved for backward (inference leaves it empty: it is the largest buffer, fp32 [T, B, 4H])."""
    cdt = _compute_dtype(dtype)
    if xg is None:
        xg = torch.empty(T, B, 4 * H, dtype=dtype, device=device)
    if w_hh is None:
        w_hh = torch.empty(4 * H, P, dtype=dtype, device=device)
    if w_hr is None:
        w_hr = torch.empty(P, H, dtype=dtype, device=device) if has_proj else w_hh
    return ForwardBuffers(
        xg=xg,
        hs=torch.empty(T + 1, B, P, dtype=dtype, device=device),
        cs=torch.empty(T + 1, B, H, dtype=cdt, device=device),
        acts=torch.empty(T, B, 4 * H, dtype=cdt, device=device) if save_acts else xg.new_empty(0, dtype=cdt),
        r=torch.empty(T, B, H, dtype=dtype, device=device) if has_proj else xg.new_empty(0),
        y=torch.empty(T, B, P, dtype=dtype, device=device),
        w_hh=w_hh,
        w_hr=w_hr,
    )


def run_forward_loop(buf: ForwardBuffers, live: list[int], reverse: bool, has_proj: bool, kernel: str,
                     steps: int | None = None) -> None:  # fmt: skip
    """The time loop over buffers whose initial state slot is filled: one launch (sequence) or T (step). `steps`
    (step kernel): only the loop's first steps, in the order it takes them (a graph's chunk)."""
    import triton

    from fastlstm.backends.triton import kernels

    T, B, P = buf.y.shape
    H = buf.cs.shape[2]
    blk, common = _launch_config(B, H, P, kernel, buf.y.dtype)
    save_acts = buf.acts.numel() > 0
    if kernel == "sequence":
        bs = _padded_sizes(live, buf.y.device)
        grid = (triton.cdiv(B, blk["BLOCK_B"]),)
        kernels.fwd_seq_kernel[grid](
            buf.xg, buf.hs, buf.cs, buf.acts, buf.r, buf.y, buf.w_hh, buf.w_hr, bs, T, B, H=H, P=P,
            HAS_PROJ=has_proj, REVERSE=reverse, SAVE_ACTS=save_acts, **blk, **common,
        )  # fmt: skip
        return
    # Everything but the step's indices is the same for every launch: made once, outside the loop
    step = kernels.fwd_step_kernel[(triton.cdiv(B, blk["BLOCK_B"]), triton.cdiv(H, blk["BLOCK_H"]))]
    step_consts = dict(H=H, P=P, HAS_PROJ=has_proj, SAVE_ACTS=save_acts, BLOCK_B=blk["BLOCK_B"],
                       BLOCK_H=blk["BLOCK_H"], BLOCK_K=blk["BLOCK_K"], **common)  # fmt: skip
    proj = kernels.fwd_proj_kernel[(triton.cdiv(B, blk["BLOCK_B"]), triton.cdiv(P, blk["BLOCK_P"]))]
    proj_consts = dict(H=H, P=P, BLOCK_B=blk["BLOCK_B"], BLOCK_P=blk["BLOCK_P"], BLOCK_K=blk["BLOCK_K"], **common)
    xg, hs, cs, acts, r, y, w_hh, w_hr = buf.xg, buf.hs, buf.cs, buf.acts, buf.r, buf.y, buf.w_hh, buf.w_hr
    h_out = r if has_proj else hs
    for s in range(T if steps is None else steps):
        t = T - 1 - s if reverse else s
        prev, out = (t + 1, t) if reverse else (t, t + 1)
        step(xg, hs, cs, acts, h_out, y, w_hh, t, prev, out, live[t], B, **step_consts)
        if has_proj:
            proj(r, w_hr, hs, y, t, prev, out, live[t], B, **proj_consts)


def _launch_config(B: int, H: int, P: int, kernel: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """Tiles, and the constants and launch options every kernel of a layer takes, for the layer's dtype."""
    common = dict(ACC=_tl_acc(dtype), PREC=_precision(dtype), **_launch_options())
    return _blocks(B, H, P, kernel, dtype), common


def start_state(buf: ForwardBuffers, h0: Tensor, c0: Tensor, reverse: bool) -> None:
    """h0, c0 into the slot the loop starts from: T when reverse, else 0."""
    first = buf.y.shape[0] if reverse else 0
    buf.hs[first].copy_(h0)
    buf.cs[first].copy_(c0)


def final_state(buf: ForwardBuffers, reverse: bool) -> tuple[Tensor, Tensor]:
    """hT, cT (fresh tensors, cT in the input dtype) of a finished loop."""
    last = 0 if reverse else buf.y.shape[0]
    return buf.hs[last].clone(), cell_state_as(buf.cs[last], buf.y.dtype)


def checked_sizes(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, kernel, save_acts):
    """T, B, I, H, P and the live rows of each step, once every tensor's shape and device fits them and the launch
    check passed (build_guard.check_launch: launches of a configuration whose build crashed a child raise)."""
    T, B, I, H, P = _layer_sizes(x, w_ih, w_hh, w_hr, kernel)
    _check_shapes(x, {
        "h0": (h0, (B, P)), "c0": (c0, (B, H)), "w_ih": (w_ih, (4 * H, I)), "w_hh": (w_hh, (4 * H, P)),
        "b": (b, (4 * H,)), "w_hr": (w_hr, (P, H)),
    })  # fmt: skip
    live = reference.live_rows(batch_sizes, T, B)
    build_guard.check_launch(x, B, I, H, P if w_hr is not None else 0, b is not None, batch_sizes is not None,
                             reverse, save_acts, kernel)  # fmt: skip
    return T, B, I, H, P, live


@on_input_device
def forward_impl(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b: Tensor | None,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    reverse: bool,
    kernel: str,
    save_acts: bool = True,
    graph: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward op's work; a training call (save_acts) through CUDA graphs where they apply (graphs.py) unless
    graph=False, launch by launch otherwise."""
    from fastlstm.backends.triton import graphs

    T, B, I, H, P, live = checked_sizes(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, kernel, save_acts)
    has_proj = w_hr is not None
    if save_acts and graph and graphs.applies(x, w_hh, w_hr, batch_sizes, kernel, "forward"):
        return graphs.training_forward(x, h0, c0, w_ih, w_hh, b, w_hr, reverse)
    xg = project_inputs(x, w_ih, b)
    buf = forward_buffers(T, B, H, P, x.dtype, x.device, has_proj, save_acts, xg=xg, w_hh=dense(w_hh),
                          w_hr=dense(w_hr))  # fmt: skip
    start_state(buf, h0, c0, reverse)
    run_forward_loop(buf, live, reverse, has_proj, kernel)
    hT, cT = final_state(buf, reverse)
    return buf.y, hT, cT, buf.acts, buf.hs, buf.cs, buf.r


@on_input_device
def backward_impl(
    grad_y: Tensor,
    grad_hT: Tensor,
    grad_cT: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    acts: Tensor,
    hs: Tensor,
    cs: Tensor,
    r: Tensor,
    reverse: bool,
    kernel: str,
    has_bias: bool,
    graph: bool = True,
    input_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dh0, dc0, dg, dhy = backward_rows_impl(
        grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, reverse, kernel, graph,
        input_grad,
    )  # fmt: skip
    T, B, I = x.shape
    dg2 = dg.reshape(T * B, -1)
    dw_ih = dg2.t() @ x.reshape(T * B, I)
    dw_hh = dg2.t() @ previous_h(hs, reverse, batch_sizes).reshape(T * B, -1)
    db = dg2.sum(0, dtype=_compute_dtype(x.dtype)).to(x.dtype) if has_bias else x.new_empty(0)
    dw_hr = dhy.reshape(T * B, -1).t() @ r.reshape(T * B, -1) if w_hr is not None else x.new_empty(0)
    return dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr


def project_inputs(x: Tensor, w_ih: Tensor, b: Tensor | None) -> Tensor:
    """Every step's x @ w_ih^T + b in one GEMM, [T, B, 4H].

    The one call every forward loop makes, launch by launch and graphed (graphs.py copies it into its windows
    chunk by chunk): cuBLAS may choose another kernel for another call (F.linear on [T, B, I], or a GEMM per
    chunk), which rounds otherwise in half precision, and a graphed call's numbers then differed from the plain
    loop's (an H200, float16 and bfloat16)."""
    T, B, I = x.shape
    out = x.new_empty(T, B, w_ih.shape[0])
    rows, out_rows = x.reshape(T * B, I), out.view(T * B, -1)
    if b is None:
        torch.mm(rows, w_ih.t(), out=out_rows)
    else:
        torch.addmm(b, rows, w_ih.t(), out=out_rows)
    return out


def previous_h(hs: Tensor, reverse: bool, batch_sizes: Tensor | None) -> Tensor:
    """The state each step read, [T, B, P] from the forward's h history hs [T+1, B, P]: slots 0..T-1 forward,
    1..T reverse, aligned with dgates in time order; zero at rows not live at a step (packed). There hs holds the
    state a row carries past its end (or h0 before its start, in reverse) and dgates are zero: a NaN in it would
    make 0 * NaN terms of dw_hh that nn.LSTM's packed loop never forms."""
    h_prev = hs[1:] if reverse else hs[:-1]
    if batch_sizes is None:
        return h_prev
    live = host_to_device(live_mask(batch_sizes, h_prev.shape[1]), h_prev.device)
    return h_prev.masked_fill(~live[..., None], 0)


class BackwardBuffers(NamedTuple):
    """What the backward loop reads and writes: dgb [T+2,B,4H] (dgates of time t at slot t + 1, zero slots at both
    ends), the weights it reads (w_hr is w_hh without a projection), grad_y [T,B,P], the fp32 carries dh [B,P] and
    dc [B,H], dhy [T,B,P] (dh itself without a projection), and the forward's acts [T,B,4H] and cs [T+1,B,H]."""

    dgb: Tensor
    w_hh: Tensor
    w_hr: Tensor
    grad_y: Tensor
    dh: Tensor
    dhy: Tensor
    dc: Tensor
    acts: Tensor
    cs: Tensor


def backward_buffers(T: int, B: int, H: int, P: int, dtype: torch.dtype, device: torch.device,
                     has_proj: bool) -> BackwardBuffers:  # fmt: skip
    """Empty backward buffers for a window of T steps (graphs.py), dgb zeroed."""
    cdt = _compute_dtype(dtype)
    dh = torch.empty(B, P, dtype=cdt, device=device)
    w_hh = torch.empty(4 * H, P, dtype=dtype, device=device)
    return BackwardBuffers(
        dgb=torch.zeros(T + 2, B, 4 * H, dtype=dtype, device=device),
        w_hh=w_hh,
        w_hr=torch.empty(P, H, dtype=dtype, device=device) if has_proj else w_hh,
        grad_y=torch.empty(T, B, P, dtype=dtype, device=device),
        dh=dh,
        dhy=torch.empty(T, B, P, dtype=dtype, device=device) if has_proj else dh,
        dc=torch.empty(B, H, dtype=cdt, device=device),
        acts=torch.empty(T, B, 4 * H, dtype=cdt, device=device),
        cs=torch.empty(T + 1, B, H, dtype=cdt, device=device),
    )


def run_backward_loop(bb: BackwardBuffers, live: list[int], reverse: bool, has_proj: bool, steps: int | None = None,
                      live_before: int = 0) -> None:  # fmt: skip
    """The step kernel's reverse time loop over backward buffers whose carries hold the gradients reaching the
    forward's last state. `steps`: only the loop's first steps, in the order it takes them (a graph's chunk);
    live_before: the live rows of the step processed before the loop's first (whose dgates it reads from the slot
    past its end), 0 for none."""
    import triton

    from fastlstm.backends.triton import kernels

    T, B, P = bb.grad_y.shape
    H = bb.cs.shape[2]
    blk, common = _launch_config(B, H, P, "step", bb.grad_y.dtype)
    grid_h = (triton.cdiv(B, blk["BLOCK_B"]), triton.cdiv(H, blk["BLOCK_H"]))
    grid_p = (triton.cdiv(B, blk["BLOCK_B"]), triton.cdiv(P, blk["BLOCK_P"]))
    # Everything but the step's indices is the same for every launch: made once, outside the loop
    tiles_h = dict(BLOCK_B=blk["BLOCK_B"], BLOCK_H=blk["BLOCK_H"], BLOCK_K=blk["BLOCK_K"], **common)
    tiles_p = dict(H=H, P=P, BLOCK_B=blk["BLOCK_B"], BLOCK_P=blk["BLOCK_P"], BLOCK_K=blk["BLOCK_K"], **common)
    step, dh_step = kernels.bwd_step_kernel[grid_h], kernels.bwd_dh_kernel[grid_p]
    cell_step = kernels.bwd_proj_cell_kernel[grid_h]
    dgb, w_hh, w_hr, grad_y, dh, dhy, dc, acts, cs = bb
    for s in range(T if steps is None else steps):
        t = s if reverse else T - 1 - s
        nxt = t - 1 if reverse else t + 1
        prev, out = (t + 1, t) if reverse else (t, t + 1)
        n_next = live[nxt] if 0 <= nxt < T else live_before
        if has_proj:
            dh_step(dgb, w_hh, grad_y, dh, dhy, 1, t, nxt, live[t], n_next, B, HAS_PROJ=True, **tiles_p)
            cell_step(dh, w_hr, acts, cs, dc, dgb, t, prev, out, live[t], B, H=H, P=P, **tiles_h)
        else:
            step(dgb, w_hh, grad_y, dh, acts, cs, dc, t, prev, out, nxt, live[t], n_next, B, H=H, **tiles_h)


def run_final_dh(bb: BackwardBuffers, first: int, n_first: int) -> None:
    """dh0 into the carry dh: the dgates of the forward's first step (`first`, live rows n_first) @ W_hh where
    that step was live, the carry elsewhere."""
    import triton

    from fastlstm.backends.triton import kernels

    _, B, P = bb.grad_y.shape
    H = bb.cs.shape[2]
    blk, common = _launch_config(B, H, P, "step", bb.grad_y.dtype)
    grid_p = (triton.cdiv(B, blk["BLOCK_B"]), triton.cdiv(P, blk["BLOCK_P"]))
    tiles_p = dict(H=H, P=P, BLOCK_B=blk["BLOCK_B"], BLOCK_P=blk["BLOCK_P"], BLOCK_K=blk["BLOCK_K"], **common)
    kernels.bwd_dh_kernel[grid_p](
        bb.dgb, bb.w_hh, bb.grad_y, bb.dh, bb.dh, 0, 0, first, 0, n_first, B, HAS_PROJ=False, **tiles_p
    )


@on_input_device
def backward_rows_impl(
    grad_y: Tensor,
    grad_hT: Tensor,
    grad_cT: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    acts: Tensor,
    hs: Tensor,
    cs: Tensor,
    r: Tensor,
    reverse: bool,
    kernel: str,
    graph: bool = True,
    input_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward up to the weight gradients: dx, dh0, dc0, dgates [T, B, 4H] and, with a projection, the gradient
    reaching each output h [T, B, P] (else empty), whose products with x, previous_h and r are the weights'. The
    step kernel's loop runs through CUDA graphs where they apply (graphs.py) unless graph=False. Without
    input_grad (an input that needs no gradient) dx is empty: its GEMM is as large as each weight gradient's."""
    import triton

    from fastlstm.backends.triton import graphs, kernels

    T, B, I, H, P = _layer_sizes(x, w_ih, w_hh, w_hr, kernel)
    _check_shapes(x, {
        "grad_y": (grad_y, (T, B, P)), "grad_hT": (grad_hT, (B, P)), "grad_cT": (grad_cT, (B, H)),
        "w_ih": (w_ih, (4 * H, I)), "w_hh": (w_hh, (4 * H, P)), "w_hr": (w_hr, (P, H)),
        "acts (saved)": (acts, (T, B, 4 * H)), "hs (saved)": (hs, (T + 1, B, P)), "cs (saved)": (cs, (T + 1, B, H)),
        "r (saved)": (r, (T, B, H) if w_hr is not None else None),
    })  # fmt: skip
    live = reference.live_rows(batch_sizes, T, B)
    dtype = x.dtype
    cdt = _compute_dtype(dtype)
    has_proj = w_hr is not None
    dev = x.device
    grad_y = dense(grad_y)
    # The forward's saved tensors are contiguous, except as a vmap rule slices one sample out of several
    acts, hs, cs, r = dense(acts), dense(hs), dense(cs), dense(r)
    w_hh = dense(w_hh)
    w_hr_c = dense(w_hr) if has_proj else w_hh
    # dgates in the input dtype (the weight-grad GEMMs run in it, as native does); carries in fp32.
    dgb = torch.zeros(T + 2, B, 4 * H, dtype=dtype, device=dev)
    dh = grad_hT.to(cdt).contiguous().clone()
    dc = grad_cT.to(cdt).contiguous().clone()
    dhy = torch.empty(T, B, P, dtype=dtype, device=dev) if has_proj else dh
    blk, common = _launch_config(B, H, P, kernel, dtype)
    first = T - 1 if reverse else 0  # the first step the forward pass processed
    if kernel == "sequence":
        bs = _padded_sizes(live, dev)
        grid = (triton.cdiv(B, blk["BLOCK_B"]),)
        kernels.bwd_seq_kernel[grid](
            dgb, w_hh, w_hr_c, grad_y, dh, dhy, dc, acts, cs, bs, T, B, H=H, P=P, HAS_PROJ=has_proj,
            REVERSE=reverse, **blk, **common,
        )  # fmt: skip
    else:
        bb = BackwardBuffers(dgb, w_hh, w_hr_c, grad_y, dh, dhy, dc, acts, cs)
        # graphs fill dgb, dhy, dh and dc as the two calls below do, where they apply and have memory for it
        applies = graph and graphs.applies(x, w_hh, w_hr, batch_sizes, kernel, "backward")
        if not (applies and graphs.training_backward(bb, reverse, has_proj)):
            run_backward_loop(bb, live, reverse, has_proj)
            run_final_dh(bb, first, live[first])  # the first step the forward processed
    dg = dgb[1 : T + 1]  # [T, B, 4H] in time order
    dx = (dg.reshape(T * B, 4 * H) @ w_ih).view(T, B, I) if input_grad else x.new_empty(0)
    return dx, dh.to(dtype), dc.to(dtype), dg, dhy if has_proj else x.new_empty(0)


# --------------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------------


def _check_dtype(x: Tensor) -> None:
    """A layer op's dtype, where the kernels run: the interpreter computes bfloat16 wrong (the module never sends it
    there), and float64 reaches no CUDA kernel. (tests/triton_compile.py calls forward_impl itself with CPU tensors
    of every CUDA dtype, recording the launches a GPU would make.)"""
    supported = CUDA_DTYPES if x.device.type == "cuda" else INTERPRETER_DTYPES
    if x.dtype not in supported:
        raise RuntimeError(f"fastlstm triton: x must be one of {', '.join(map(str, supported))} here, got {x.dtype}")


@torch.library.custom_op("fastlstm::triton_forward", mutates_args=())
def triton_forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b: Tensor | None,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    reverse: bool,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y [T,B,P], hT [B,P], cT [B,H], and for backward: acts [T,B,4H], hs [T+1,B,P], cs [T+1,B,H], r [T,B,H]|[0]."""
    _check_dtype(x)
    # Never through graphs.py's: a compiled program calls the op, and under CUDA graph trees (mode="reduce-overhead")
    # its warm-up allocates from the trees' private pool, which would hand a kept window's memory to their outputs
    return forward_impl(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, _kernel_of(x, w_hh, kernel), graph=False)


def _on_x_device(x: Tensor, batch_sizes: Tensor | None, *tensors: Tensor | None) -> None:
    """fake_on_x_device for the triton ops, whose batch_sizes stay on the CPU (or are meta with x)."""
    fake_on_x_device("triton", x, *tensors)
    if batch_sizes is not None and batch_sizes.device.type not in ("cpu", x.device.type):
        raise RuntimeError(f"fastlstm triton: batch_sizes must be on the CPU, got {batch_sizes.device}")


@triton_forward.register_fake
def _(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, kernel):
    _on_x_device(x, batch_sizes, h0, c0, w_ih, w_hh, b, w_hr)
    T, B = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    cdt = _compute_dtype(x.dtype)
    return (
        x.new_empty(T, B, P),
        x.new_empty(B, P),
        x.new_empty(B, H),
        x.new_empty(T, B, 4 * H, dtype=cdt),
        x.new_empty(T + 1, B, P),
        x.new_empty(T + 1, B, H, dtype=cdt),
        x.new_empty(T, B, H) if w_hr is not None else x.new_empty(0),
    )


@torch.library.custom_op("fastlstm::triton_backward", mutates_args=())
def triton_backward(
    grad_y: Tensor,
    grad_hT: Tensor,
    grad_cT: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    acts: Tensor,
    hs: Tensor,
    cs: Tensor,
    r: Tensor,
    reverse: bool,
    kernel: str,
    has_bias: bool,
    input_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx ([0] without input_grad), dh0, dc0, dw_ih, dw_hh, db ([0] without bias), dw_hr ([0] without
    projection)."""
    _check_dtype(x)
    # Never through graphs.py's, as triton_forward's
    return backward_impl(
        grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, reverse,
        _kernel_of(x, w_hh, kernel), has_bias, graph=False, input_grad=input_grad,
    )  # fmt: skip


@triton_backward.register_fake
def _(grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, reverse, kernel, has_bias,
      input_grad=True):  # fmt: skip
    _on_x_device(x, batch_sizes, grad_y, grad_hT, grad_cT, w_ih, w_hh, w_hr, acts, hs, cs, r)
    B, P, H = hs.shape[1], hs.shape[2], cs.shape[2]
    return (
        torch.empty_like(x) if input_grad else x.new_empty(0),
        x.new_empty(B, P),
        x.new_empty(B, H),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        x.new_empty(4 * H) if has_bias else x.new_empty(0),
        torch.empty_like(w_hr) if w_hr is not None else x.new_empty(0),
    )


@torch.library.custom_op("fastlstm::triton_backward_rows", mutates_args=())
def triton_backward_rows(
    grad_y: Tensor,
    grad_hT: Tensor,
    grad_cT: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    acts: Tensor,
    hs: Tensor,
    cs: Tensor,
    r: Tensor,
    reverse: bool,
    kernel: str,
    input_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """triton_backward without the weight gradients (backward_rows_impl), for frozen weights and for their sums
    per sample under vmap. dx is empty ([0]) without input_grad."""
    _check_dtype(x)
    dx, dh0, dc0, dg, dhy = backward_rows_impl(
        grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, reverse,
        _kernel_of(x, w_hh, kernel), graph=False, input_grad=input_grad,
    )  # fmt: skip
    return dx, dh0, dc0, dg.clone(), dhy  # dg is a view into backward's buffer, at an offset the fake does not have


@triton_backward_rows.register_fake
def _(grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, reverse, kernel,
      input_grad=True):  # fmt: skip
    _on_x_device(x, batch_sizes, grad_y, grad_hT, grad_cT, w_ih, w_hh, w_hr, acts, hs, cs, r)
    T, B = x.shape[0], x.shape[1]
    P, H = hs.shape[2], cs.shape[2]
    return (
        torch.empty_like(x) if input_grad else x.new_empty(0),
        x.new_empty(B, P),
        x.new_empty(B, H),
        x.new_empty(T, B, 4 * H),
        x.new_empty(T, B, P) if w_hr is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, kernel = inputs
    _, _, _, acts, hs, cs, r = output
    ctx.save_for_backward(x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, h0, c0, b)
    ctx.reverse = reverse
    ctx.kernel = kernel
    ctx.mark_non_differentiable(acts, hs, cs, r)
    # unused gradients stay None, not [T, B, 4H] of zeros (zeros where torch.vmap before torch 2.7 needs them)
    ctx.set_materialize_grads(materialize_grads_for_vmap((x, h0, c0, w_ih, w_hh, b, w_hr)))


def _backward(ctx, grad_y, grad_hT, grad_cT, *_unused, eager: bool = False):
    """The layer's backward: through the backward ops (traced calls: the op's own autograd), or for an eager
    call (_EagerLayer) through their implementations, whose step loops may replay CUDA graphs (graphs.py)."""
    x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, h0, c0, b = ctx.saved_tensors
    inputs = (x, h0, c0, w_ih, w_hh, b, w_hr)
    y_shape = (x.shape[0], hs.shape[1], hs.shape[2])
    start = layer_backward(inputs, batch_sizes, ctx.reverse, (grad_y, grad_hT, grad_cT), y_shape)
    if start.differentiable is not None:
        return layer_op_grads(*start.differentiable)
    grad_y, grad_hT, grad_cT = start.grads
    # No graph: these gradients are not differentiated. And the op's autograd layer (torch.library's
    # autograd.Function, without setup_context) raises under a torch.func gradient transform if it records one.
    rows_of, grads_of = triton_backward_rows, triton_backward
    if eager:
        rows_of, grads_of = (
            functools.partial(backward_rows_impl, graph=True),
            functools.partial(backward_impl, graph=True),
        )
    input_grad = ctx.needs_input_grad[0]  # a first layer fed data: dx's GEMM skipped
    if not any(ctx.needs_input_grad[3:7]):  # frozen weights: the rows alone, without the weight gradients' GEMMs
        with torch.no_grad():
            dx, dh0, dc0, _, _ = rows_of(
                grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, ctx.reverse, ctx.kernel,
                input_grad=input_grad,
            )  # fmt: skip
        return layer_op_grads(dx if input_grad else None, dh0, dc0, None, None, None, None)
    with torch.no_grad():
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = grads_of(
            grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, ctx.reverse, ctx.kernel,
            b is not None, input_grad=input_grad,
        )  # fmt: skip
    has_bias, has_proj = b is not None, start.proj_used
    dx = dx if input_grad else None
    return layer_op_grads(dx, dh0, dc0, dw_ih, dw_hh, db if has_bias else None, dw_hr if has_proj else None)


triton_forward.register_autograd(_backward, setup_context=_setup_context)


def _forward_vmap(info, in_dims, *args):
    """torch.vmap of one layer: the samples side by side as one batch (backends.vmap_layer_op). Both kernels take
    any batch, so the kernel chosen for one sample's serves them all."""
    w_hr = args[6]
    batch_axes = (1, 0, 0, 1, 1, 1, None if w_hr is None else 1)  # r is empty without a projection
    return vmap_layer_op(triton_forward, info, in_dims, args, batch_axes)


# torch >= 2.5 (torch.library's vmap rules); before, a custom op under torch.vmap raises: dispatch then says so
def _backward_vmap(info, in_dims, *args):
    """torch.vmap of backward (per-sample gradients). Each sample needs weight gradients of its own, which one call
    over all the samples' rows would sum: the rows run side by side through triton_backward_rows, and each
    sample's weight gradients are summed from its own rows here. Weights that differ per sample: one call each."""
    grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, batch_sizes, acts, hs, cs, r, reverse, kernel, has_bias = args[:15]
    input_grad = args[15] if len(args) > 15 else True
    if any(dim is not None for dim in in_dims[4:8]):
        return vmap_per_sample(triton_backward, info, in_dims, args)
    samples = info.batch_size
    rows = (grad_y, grad_hT, grad_cT, x, acts, hs, cs) + ((r,) if w_hr is not None else ())  # r: [0] otherwise
    dims = in_dims[:4] + in_dims[8 : 8 + len(rows) - 4]
    folded = [rows_side_by_side(t, dim, axis, samples) for t, dim, axis in zip(rows, dims, (1, 0, 0, 1, 1, 1, 1, 1))]
    grad_y, grad_hT, grad_cT, x, acts, hs, cs = folded[:7]
    r = folded[7] if w_hr is not None else r
    folded_sizes = None if batch_sizes is None else batch_sizes * samples
    dx, dh0, dc0, dg, dhy = triton_backward_rows(
        grad_y, grad_hT, grad_cT, x, w_ih, w_hh, w_hr, folded_sizes, acts, hs, cs, r, reverse, kernel, input_grad
    )
    proj_rows = (dhy, r) if w_hr is not None else None
    h_prev = previous_h(hs, reverse, folded_sizes)
    return per_sample_layer_grads(samples, dx, dh0, dc0, dg, x, h_prev, has_bias, proj_rows, input_grad)


for _op, _formula in (
    (torch.ops.fastlstm.triton_forward, flops.forward),
    (torch.ops.fastlstm.triton_backward, flops.triton_backward),
    (torch.ops.fastlstm.triton_backward_rows, flops.triton_backward_rows),
):
    flops.register(_op, _formula)

HAS_VMAP_RULE = VMAP_RULES and hasattr(triton_forward, "register_vmap")
if HAS_VMAP_RULE:
    triton_forward.register_vmap(_forward_vmap)
    triton_backward.register_vmap(_backward_vmap)


# torch.autograd.grad's is_grads_batched vmaps backward with torch's legacy BatchedTensor (not torch.func's)
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


class _EagerLayer(torch.autograd.Function):
    """triton_forward with its autograd, for eager calls, without torch.library's per-call Python.

    Same kernels, same context, the op's backward computation, less Python: with the kernels stubbed out, a
    layer's training call (forward and backward) measured 145 us of CPU time this way against 194-322 us through
    the op, and an inference call 19 us against 24-44 us. On a GPU at small sizes that is time the kernels wait
    for. It calls the ops' implementations, whose step loops replay CUDA graphs (graphs.py), which the ops never
    do. Traced calls (torch.compile, torch.export) keep the op: it is opaque to them and has a fake kernel.
    """

    @staticmethod
    def forward(ctx, *inputs):
        output = forward_impl(*inputs, graph=True)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        # Compiled autograd traces this backward: the ops then, as a compiled program's (see triton_forward). So
        # too for gradients batched by torch.autograd.grad(..., is_grads_batched=True), whose legacy vmap hands
        # this backward BatchedTensors that the kernels cannot read: the ops run once a sample (torch's fallback).
        # is_compiling first: dynamo cannot trace is_legacy_batchedtensor (a graph break a layer, and under the
        # triton interpreter a traced kernel launch); a traced backward is never handed BatchedTensors anyway
        eager = not torch.compiler.is_compiling() and not any(g is not None and _legacy_batched(g) for g in grads)
        return _backward(ctx, *grads, eager=eager)


class _FuncLayer(torch.autograd.Function):
    """triton_forward with its autograd where a torch.func gradient transform (grad, vjp, jacrev) tracks the layer,
    which needs setup_context; under torch.vmap each op's vmap rule batches it (per-sample gradients)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        with torch._C._AutoDispatchBelowAutograd():  # the kernels (or the vmap rule), not the op's autograd
            return triton_forward(*inputs)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def layer(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, kernel: str | None = None):
    """One layer, one direction, per the contract in fastlstm.reference; `kernel` forces step/sequence."""
    _check_dtype(x)  # as the ops check it, also for the eager paths, which call their implementations
    for t in (h0, c0, w_ih, w_hh, b, w_hr):
        # The module checks the weights' dtypes once per reading of them; a `.data` swapped to another dtype in
        # place since then reaches here, and the kernels would read it as x's dtype. nn.LSTM raises too.
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"fastlstm triton: every tensor of a layer must have x's dtype {x.dtype}, got {t.dtype}")
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    traced = torch.compiler.is_compiling() or fake_tensors_in_play(x)
    if traced and (kernel or _kernel_setting()) == "auto":
        # The op chooses at run time: here the rule's `batch <= 64` would be a guard of the program (a recompile
        # past it; torch.export refused a batch dimension without that bound)
        chosen = "auto"
    else:
        chosen = choose_kernel(x.shape[1], H, P, x.dtype, kernel)
    # The states and weights as given: autograd saves them, and its version check then catches a weight changed in
    # place before backward (an optimizer step) as nn.LSTM's does; a dense copy saved instead would hand backward
    # the old values silently. The implementations densify what the kernels read. x as nn.LSTM keeps it: a copy
    # where it is not dense (batch_first), which the caller may then refill before backward.
    inputs = (dense(x), h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, bool(reverse), chosen)
    transforms = torch._C._are_functorch_transforms_active()
    if transforms and functorch_grad_levels(inputs[:7]):
        # A torch.func gradient transform cannot run the op's autograd (torch.library's has no setup_context), also
        # where make_fx traces it (a dispatch mode, fake tensors): _FuncLayer, as cpp's layer
        y, hT, cT, *_ = _FuncLayer.apply(*inputs)
        return y, hT, cT
    # The op where it is opaque to a trace and has a fake, under any dispatch mode, which sees the op (and its
    # FLOPs: FlopCounterMode) where the eager paths below would show it only their few torch ops, and under
    # torch.vmap alone, through its vmap rule (the eager autograd.Function has none)
    if traced or dispatch_mode_active() or transforms:
        y, hT, cT, *_ = triton_forward(*inputs)
        return y, hT, cT
    from fastlstm.backends.triton import graphs

    # Under inference_mode autograd records nothing, even with grad mode on inside it (a validation loop's
    # enable_grad): its outputs are inference tensors, which the autograd Function could not save
    recording = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    needs_grad = recording and any(t is not None and t.requires_grad for t in inputs[:7])
    if needs_grad:
        y, hT, cT, *_ = _EagerLayer.apply(*inputs)
    elif graphs.applies(x, w_hh, w_hr, batch_sizes, chosen):
        y, hT, cT = graphs.forward(*inputs[:7], inputs[8])
    else:
        y, hT, cT, *_ = forward_impl(*inputs, save_acts=False)
    return y, hT, cT


# --------------------------------------------------------------------------------------------------
# self-test: do this call's kernels build and compute on this device?
# --------------------------------------------------------------------------------------------------

_SELF_TESTS: dict[tuple, str | None] = {}
# Largest error allowed against native, relative to 1 + the largest native value: loose enough for TF32 and
# half precision over two steps, tight enough to catch a kernel that builds but computes garbage.
_SELF_TEST_TOL = {torch.float64: 1e-7, torch.float32: 2e-2, torch.bfloat16: 1e-1, torch.float16: 1e-1}


def self_test(call: LayerCall) -> str | None:
    """Why the kernels `call` needs fail on this device, or None when they work.

    Runs them once on a two-step input of the call's sizes and flags (forward, and backward when the call
    needs gradients) and compares with the native path. Triton compiles a kernel on its first launch, so a
    kernel that cannot be built for this GPU (out of shared memory, an instruction the GPU lacks) fails here
    instead of in the user's call. Cached per configuration; the compile it triggers is one the real call
    needs anyway. Inputs are made without the random generator, so the user's random stream is untouched.
    On a GPU a child process builds the kernels first (build_guard): a compiler crash ends the child, not this one.
    """
    if call.device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # nothing may run or synchronise inside a CUDA graph capture; the real call decides
    kernel = choose_kernel(call.batch, call.hidden_size, call.out_size, call.dtype)
    key = (
        call.device_type, call.device_index, call.dtype, kernel, call.batch, call.input_size, call.hidden_size,
        call.proj_size, call.bias, call.packed, call.reverse, call.needs_grad, _precision(call.dtype),
        os.environ.get(ENV_CONFIG),
    )  # fmt: skip
    reason = _SELF_TESTS.get(key, MISSING)
    if reason is MISSING:
        # Outside any torch.func transform the call is made under (its first call may be vmap's or grad's): the
        # test's own tensors are no transform's, and its requires_grad_ raised in there, which cached a failure
        # and sent the configuration to native for the process's life (seen on an H200 under torch.vmap).
        try:
            with temporarily_clear_interpreter_stack():
                reason = build_guard.crash_reason(call, kernel) or _run_self_test(call, kernel)
        except Exception as error:  # whatever the kernels raise here, the real call would raise too
            reason = f"the {kernel} kernel failed: {type(error).__name__}: {error}"
        remember(_SELF_TESTS, key, reason)  # keyed by the batch too, as the launches' verdicts
    return reason


def _run_self_test(call: LayerCall, kernel: str) -> str | None:
    from fastlstm.backends.triton import graphs

    device, dtype = torch.device(call.device_type, call.device_index), call.dtype
    T, B, I, H, P = 2, call.batch, call.input_size, call.hidden_size, call.out_size

    def data(*shape: int, scale: float) -> Tensor:
        values = torch.arange(math.prod(shape), dtype=torch.float64, device="cpu").mul_(0.7).sin_().mul_(scale)
        return values.view(shape).to(device, dtype)

    scale = 2.0 / math.sqrt(I + P)
    inputs = [
        data(T, B, I, scale=1.0), data(B, P, scale=0.5), data(B, H, scale=0.5), data(4 * H, I, scale=scale),
        data(4 * H, P, scale=scale), data(4 * H, scale=0.1) if call.bias else None,
        data(P, H, scale=1.0 / math.sqrt(H)) if call.proj_size else None,
    ]  # fmt: skip
    batch_sizes = torch.tensor([B, max(1, B - 1)], device="cpu") if call.packed else None
    leaves = [t.requires_grad_(call.needs_grad) for t in inputs if t is not None]
    # Not through graphs: the test's buffers would take one of the kept configurations' places
    with torch.autocast(call.device_type, enabled=False), torch.set_grad_enabled(call.needs_grad), graphs.kept_off():
        got = list(layer(*inputs, batch_sizes, call.reverse, kernel))
        want = list(NATIVE.layer(*inputs, batch_sizes, call.reverse))
        if call.needs_grad:
            weights = [data(*t.shape, scale=1.0) for t in want]
            got += torch.autograd.grad([(g * w).sum() for g, w in zip(got, weights)], leaves)
            want += torch.autograd.grad([(n * w).sum() for n, w in zip(want, weights)], leaves)
    for index, (g, w) in enumerate(zip(got, want)):
        if g.numel() == 0:
            continue
        err = (g.double() - w.double()).abs().max().item()
        allowed = _SELF_TEST_TOL[dtype] * (1.0 + w.double().abs().max().item())
        if not err <= allowed:  # written so that a NaN error fails too
            what = f"output {index}" if index < 3 else f"gradient {index - 3}"
            return f"the {kernel} kernel's {what} differs from native by {err:.3g} (allowed {allowed:.3g}, {dtype})"
    return None
