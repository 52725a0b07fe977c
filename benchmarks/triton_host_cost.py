"""Host time the triton backend's step loops spend per time step, with every kernel launch stubbed out.

    python benchmarks/triton_host_cost.py [--steps 100] [--reps 200]

No GPU needed: the launchers run on CPU tensors and launch nothing, so what is timed is fastlstm's own Python
per step (indices, arguments), not triton's launch (which comes on top on a GPU) nor any kernel. The step kernel
launches once a step (twice with a projection, forward and backward): where a step's kernel runs for less
time than the host takes to issue it, the GPU waits on the host, so this is the floor of a step's time where
the loop runs launch by launch (packed input, compiled programs; eager dense calls replay CUDA graphs instead,
graphs.py). Best of --reps runs.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["TRITON_INTERPRET"] = "0"  # the launchers' real path; nothing reaches the interpreter or a GPU

import torch  # noqa: E402

from fastlstm.__main__ import _positive_int  # noqa: E402
from fastlstm.backends.triton import kernels, ops  # noqa: E402

STEP_KERNELS = ("fwd_step_kernel", "fwd_proj_kernel", "bwd_step_kernel", "bwd_dh_kernel", "bwd_proj_cell_kernel")


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _best_per_step(fn, steps: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e6


def host_cost(steps: int, reps: int, proj_size: int) -> tuple[float, float]:
    """(forward, backward) microseconds a step, at sizes small enough that the CPU work around the loop (the
    backward's input-gradient GEMM, the buffers) stays negligible."""
    T, B, H = steps, 4, 16
    P = proj_size or H
    x, w_ih, w_hh = torch.zeros(T, B, H), torch.zeros(4 * H, H), torch.zeros(4 * H, P)
    w_hr = torch.zeros(P, H) if proj_size else None
    buf = ops.forward_buffers(T, B, H, P, x.dtype, x.device, w_hr is not None, True, xg=torch.zeros(T, B, 4 * H),
                              w_hh=w_hh, w_hr=w_hr)  # fmt: skip
    live = [B] * T
    forward = _best_per_step(lambda: ops.run_forward_loop(buf, live, False, w_hr is not None, "step"), T, reps)
    grads = torch.zeros(T, B, P), torch.zeros(B, P), torch.zeros(B, H)
    saved = buf.acts, buf.hs, buf.cs, buf.r
    backward = _best_per_step(
        lambda: ops.backward_rows_impl(*grads, x, w_ih, w_hh, w_hr, None, *saved, False, "step"), T, reps
    )
    return forward, backward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_positive_int, default=100)
    parser.add_argument("--reps", type=_positive_int, default=200)
    args = parser.parse_args(argv)
    originals = {name: getattr(kernels, name) for name in STEP_KERNELS}
    try:
        for name in STEP_KERNELS:
            setattr(kernels, name, _NoLaunch())
        for proj_size in (0, 8):
            forward, backward = host_cost(args.steps, args.reps, proj_size)
            what = f"projection {proj_size}" if proj_size else "no projection"
            print(f"{what}: forward {forward:.2f} us a step, backward {backward:.2f} us a step (host only)")
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
