"""Compiles the Triton backend's kernels for a GPU this machine lacks: ahead of time, ptxas included; nothing runs.

CI has no GPU, and the interpreter that runs the kernels there executes their arithmetic without checking
most of what only the compiler checks (dot operand shapes and dtypes, float16 / bfloat16 code, what a GPU
generation lacks, shared memory). This records the launches the backend's launchers issue for a
configuration (the kernels swapped for recorders, so the launchers run on CPU tensors and launch nothing),
then compiles each distinct launch with triton.compile for the target GPU.

Launches compile without the specialisations a real launch adds (integer arguments equal to 1, pointers
aligned to 16 bytes): those change code generation, not what the kernels may do.

    TRITON_INTERPRET=0 python tests/triton_compile.py [--arch 90] [--full] [--resources [--max-stack BYTES]]
        [--shard K/N]

--shard K/N compiles every N-th distinct launch from the K-th (0-based): N processes with K = 0..N-1 share the
work (a compile takes one core; on a cold cache the short list takes minutes on one).

Prints one line per compiled kernel ("KERNEL (CONFIG): ok, ..." or "...: FAILED: why"), named before it compiles,
and ends with "N compiles, F failures"; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastlstm.backends.triton import kernels, ops

KERNEL_NAMES = (
    "fwd_seq_kernel",
    "bwd_seq_kernel",
    "fwd_step_kernel",
    "fwd_proj_kernel",
    "bwd_step_kernel",
    "bwd_dh_kernel",
    "bwd_proj_cell_kernel",
)
POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float64: "*fp64",
    torch.int32: "*i32",
}
# Shared memory a block may use (opt-in maximum) by compute capability, from NVIDIA's CUDA programming guide.
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class Config:
    dtype: torch.dtype
    batch: int
    hidden: int
    proj_size: int
    reverse: bool
    kernel: str
    tf32: bool = False

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.") + ("-tf32" if self.tf32 else "")
        proj = f"-P{self.proj_size}" if self.proj_size else ""
        return f"{name} B{self.batch}-H{self.hidden}{proj}{'-rev' if self.reverse else ''} {self.kernel}"


@dataclass(frozen=True)
class Launch:
    kernel: object  # the triton.JITFunction
    signature: dict
    constexprs: dict

    @property
    def key(self) -> tuple:
        constants = tuple(sorted((name, str(value)) for name, value in self.constexprs.items()))
        return self.kernel.__name__, tuple(sorted(self.signature.items())), constants


class _Recorder:
    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(_launch(self.kernel, args, kwargs))


def _launch(kernel, args: tuple, kwargs: dict) -> Launch:
    values = dict(zip(kernel.arg_names, args))
    values.update({name: value for name, value in kwargs.items() if name in kernel.arg_names})
    signature, constexprs = {}, {}
    for param, name in zip(kernel.params, kernel.arg_names):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        else:
            signature[name] = "i32"
    return Launch(kernel, signature, constexprs)


@contextlib.contextmanager
def _recording(sink: list):
    originals = {name: getattr(kernels, name) for name in KERNEL_NAMES}
    try:
        for name, kernel in originals.items():
            setattr(kernels, name, _Recorder(kernel, sink))
        yield
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)


def launches(config: Config, seq_len: int = 3, input_size: int = 8) -> list[Launch]:
    """The launches training's forward and backward and inference's forward issue for `config` (with its CPU
    tensors; nothing runs)."""
    T, B, I, H = seq_len, config.batch, input_size, config.hidden
    P = config.proj_size or H

    def zeros(*shape):
        return torch.zeros(*shape, dtype=config.dtype)

    sink: list[Launch] = []
    w_hr = zeros(P, H) if config.proj_size else None
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    try:
        with _recording(sink):
            x, w_ih, w_hh = zeros(T, B, I), zeros(4 * H, I), zeros(4 * H, P)
            y, hT, cT, acts, hs, cs, r = ops.forward_impl(
                x, zeros(B, P), zeros(B, H), w_ih, w_hh, zeros(4 * H), w_hr, None, config.reverse, config.kernel
            )
            ops.backward_impl(
                y, hT, cT, x, w_ih, w_hh, w_hr, None, acts, hs, cs, r, config.reverse, config.kernel, True
            )
            ops.forward_impl(  # inference: the gates are not stored
                x,
                zeros(B, P),
                zeros(B, H),
                w_ih,
                w_hh,
                zeros(4 * H),
                w_hr,
                None,
                config.reverse,
                config.kernel,
                save_acts=False,
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return sink


def configs(full: bool) -> list[Config]:
    """The short list: every kernel in every CUDA dtype, with and without a projection; the sequence kernel
    backwards too (REVERSE is one of its constants) and with TF32 dots, in float32. --full: the hidden and
    batch sizes of the GPU grid, every combination."""
    if full:
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        hiddens, batches = (16, 100, 128, 256, 512, 1024), (1, 64, 256)
        grid = itertools.product(dtypes, hiddens, batches, (False, True), (False, True), ops.KERNELS)
        out = [Config(d, b, h, h // 2 if proj else 0, rev, k) for d, h, b, proj, rev, k in grid]
        return out + [Config(torch.float32, 64, 256, 0, False, k, tf32=True) for k in ops.KERNELS]
    out = [Config(torch.float32, 5, 100, proj, True, "sequence") for proj in (0, 37)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for proj in (0, 37):
            out += [Config(dtype, 5, 100, proj, False, "sequence"), Config(dtype, 40, 100, proj, False, "step")]
    # float32 where a recurrent K of 64 once compiled to kilobytes of local memory a thread, and where one of 16
    # or less aborted triton 3.9's compiler at 32 rows (see ops._blocks; the sequence kernel is not chosen for a
    # projection of 16 or less under a wider hidden size)
    out += [
        Config(torch.float32, 40, hidden, proj, False, k)
        for hidden, proj in ((64, 0), (128, 64), (16, 0))
        for k in ops.KERNELS
    ]
    out.append(Config(torch.float32, 40, 33, 16, False, "step"))
    return out + [Config(torch.float32, 5, 100, 0, False, "sequence", tf32=True)]


def _registers(cubin: bytes) -> tuple[int, int]:
    """Registers a thread and stack bytes (where ptxas spills registers), from the cuobjdump triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return int(fields["REG"]), int(fields["STACK"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--full", action="store_true", help="the GPU grid's sizes (minutes) instead of the short list")
    parser.add_argument("--resources", action="store_true", help="registers and stack per kernel (cuobjdump)")
    parser.add_argument(
        "--max-stack", type=int, metavar="BYTES", help="with --resources: fail a kernel that spills more a thread"
    )
    parser.add_argument("--shard", default="0/1", metavar="K/N", help="compile every N-th launch from the K-th")
    args = parser.parse_args(argv)
    try:
        shard, shards = (int(part) for part in args.shard.split("/"))
    except ValueError:
        parser.error(f"--shard {args.shard!r}: expected K/N, e.g. 0/2")
    if not 0 <= shard < shards:
        parser.error(f"--shard {args.shard!r}: expected 0 <= K < N")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run with TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled")
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch)
    seen: set[tuple] = set()
    failures = compiled = 0
    start = time.perf_counter()
    for config in configs(args.full):
        for launch in launches(config):
            if launch.key in seen:
                continue
            seen.add(launch.key)
            if (len(seen) - 1) % shards != shard:
                continue
            # Named before it compiles: a compiler that aborts the process (triton 3.9's LLVM did, on float32
            # tiles ops._blocks now avoids) leaves the launch it died on as the last line.
            print(f"{launch.kernel.__name__} ({config}): ", end="", flush=True)
            try:
                binary = triton.compile(
                    ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs),
                    target=target,
                    options=ops._launch_options(),  # with FASTLSTM_TRITON_CONFIG's num_warps / num_stages
                )
            except Exception as error:  # report every kernel that fails, then fail the run
                failures += 1
                print(f"FAILED: {type(error).__name__}: {error}", flush=True)
                continue
            compiled += 1
            shared = binary.metadata.shared
            if limit is not None and shared > limit:
                failures += 1
                print(f"FAILED: {shared} bytes of shared memory, sm_{args.arch} allows {limit}")
                continue
            usage = ""
            if args.resources:
                registers, stack = _registers(binary.asm["cubin"])
                usage = f", {registers} registers, {stack} bytes of stack"
                if args.max_stack is not None and stack > args.max_stack:
                    failures += 1
                    print(f"FAILED: {stack} bytes of stack a thread, --max-stack {args.max_stack}")
                    continue
            print(f"ok, {shared} bytes of shared memory{usage}", flush=True)
    elapsed = time.perf_counter() - start
    part = f" (shard {shard}/{shards} of {len(seen)} distinct launches)" if shards > 1 else ""
    print(
        f"sm_{args.arch}, triton {triton.__version__}: {compiled} compiles, {failures} failures, {elapsed:.0f} s{part}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
