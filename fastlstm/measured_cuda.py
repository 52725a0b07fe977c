"""Triton against cuDNN (through nn.LSTM) on benchmarks/gpu_grid.py's grid: the figures dispatch's CUDA rule reads.

Written by `python benchmarks/cuda_rule.py GRID.json [...]` from the grid's JSON; regenerate rather than edit. Each
row is one measured shape: (compute capability, mode, dtype, layers, batch, hidden, seq, speedup), speedup being
nn.LSTM's median time over triton's, same process, interleaved. Empty until a GPU run has measured the grid: `auto`
then keeps every CUDA call on cuDNN.
"""

from __future__ import annotations

SOURCE = "none: no grid measured yet"

MEASURED: tuple[tuple[str, str, str, int, int, int, int, float], ...] = ()
