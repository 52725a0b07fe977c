"""How the triton backend's inference graphs are used over a stream of calls of random lengths: captures, replays
and chunks run launch by launch, counted with the capture and the step loop stubbed out.

    python benchmarks/graph_captures.py [--calls 1000] [--max-len 64] [--seed 0]

No GPU needed: CPU tensors go through graphs.forward with `capture` replaced by a counter whose replay counts
too, and the loop launches nothing. What it shows is the policy (which calls capture, which replay), not time:
at 2a3e07d, 1,000 calls of lengths 1-64 (B4-H16) captured 7 graphs (one per power-of-two chunk length) and
replayed 2,983 chunks, the first call running launch by launch; whole-call graphs keyed by length (before
2bcec70) had captured 106 times, replayed a kept graph 14 times and run 880 calls launch by launch.
"""

from __future__ import annotations

import argparse
import random

import torch

from fastlstm.__main__ import _positive_int
from fastlstm.backends.triton import graphs, ops


def count(calls: int, max_len: int, seed: int, batch: int = 4, input_size: int = 8, hidden: int = 16) -> dict:
    """{"captures", "replays", "launched": chunks run launch by launch} over `calls` inference calls."""
    counts = {"captures": 0, "replays": 0, "launched": 0}

    def capture(loop):
        counts["captures"] += 1
        return lambda: counts.__setitem__("replays", counts["replays"] + 1)

    def launched(*args, **kwargs):
        counts["launched"] += 1

    saved = graphs.capture, graphs.DEVICES, ops.run_forward_loop
    graphs.capture, graphs.DEVICES, ops.run_forward_loop = capture, ("cuda", "cpu"), launched
    try:
        graphs.clear()
        rng = random.Random(seed)
        w_ih, w_hh, b = torch.zeros(4 * hidden, input_size), torch.zeros(4 * hidden, hidden), torch.zeros(4 * hidden)
        h0 = c0 = torch.zeros(batch, hidden)
        for _ in range(calls):
            x = torch.zeros(rng.randint(1, max_len), batch, input_size)
            graphs.forward(x, h0, c0, w_ih, w_hh, b, None, False)
    finally:
        graphs.capture, graphs.DEVICES, ops.run_forward_loop = saved
        graphs.clear()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=_positive_int, default=1000)
    parser.add_argument("--max-len", type=_positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = count(args.calls, args.max_len, args.seed)
    print(f"{args.calls} calls of lengths 1-{args.max_len}: {counts['captures']} captures, {counts['replays']} "
          f"replayed chunks, {counts['launched']} chunks launched step by step")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
