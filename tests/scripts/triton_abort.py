"""Compiles, for sm_90, a float32 step-kernel launch that triton 3.9's LLVM aborts on (32 x 16 FMA tiles at a
recurrent width of 16, which ops._blocks avoids), forced with FASTLSTM_TRITON_CONFIG: a real compiler crash on a
machine without a GPU, for tests/test_triton_build_guard.py. Exits 0 where this triton compiles it.

The kernels' sigmoid is 1 - e / (1 + e) towards 1 now, and with it this launch compiles; the crash comes with the
sigmoid they had before, 1 / (1 + e^-x), which this script puts back in their module before compiling."""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ["FASTLSTM_TRITON_CONFIG"] = "BLOCK_B=32,BLOCK_H=16"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton_compile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastlstm.backends.triton import kernels, ops  # noqa: E402


@triton.jit
def _sigmoid_rounded_twice(x):
    return 1.0 / (1.0 + tl.exp(-x))


kernels._sigmoid = _sigmoid_rounded_twice  # read when the kernel compiles, as every global it calls

config = triton_compile.Config(torch.float32, 40, 16, 0, False, "step")
launch = next(launch for launch in triton_compile.launches(config) if launch.kernel.__name__ == "fwd_step_kernel")
source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs)
triton.compile(source, target=GPUTarget("cuda", 90, 32), options=ops._launch_options())
print("compiled")
