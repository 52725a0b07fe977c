"""How fast could any LSTM run on this CPU? Upper bounds on the speedup over nn.LSTM, per benchmark shape.

    python benchmarks/cpu_bounds.py RESULTS.json [--threads N]   (default N: the threads the bench run used)

RESULTS.json is what `python -m fastlstm bench --json` wrote on this machine (its nn.LSTM medians are used).
The script measures, with a small C++ kernel built here (OpenMP, -march=native):
  * the FMA peak: independent multiply-add chains in registers, no memory traffic;
  * read bandwidth for a working set the size of one direction's recurrent weight (L2, L3 or DRAM);
and the rates of torch.mm and of oneDNN's matmul on 2048^3 float32: the better of the two is what a tuned GEMM
library reaches here (on AMD CPUs torch.mm runs MKL's generic code: on Zen 5 at less than half oneDNN's rate).

Model, per shape: an LSTM must do its FLOPs (input projection + recurrent product, + the projection's with
proj_size; x3 for training: forward, dgates @ W_hh, dx, dW_ih, dW_hh) over the (step, sequence) pairs it computes
(a packed shape's lengths as bench fed them) and must stream each direction's W_hh [4H, P] (and W_hr [P, H]) once
per step (twice in training) -- it cannot be reused across steps when it does not fit in registers. So

    time >= max(FLOPs / rate, steps * |W_hh| / bandwidth(|W_hh|))

and nn.LSTM's time over that bound caps the speedup of any implementation. Two columns: at the FMA peak (a
hard ceiling) and at the best GEMM's rate (what the best GEMM code here reaches on its best shape).
Bounds assume float32 outside autocast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.utils.cpp_extension

from fastlstm.__main__ import _thread_count
from fastlstm.benchmark import Shape

_SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>
#include <chrono>
#include <cstdlib>
#include <vector>

#ifdef __AVX512F__
typedef float vf __attribute__((vector_size(64)));
#else
typedef float vf __attribute__((vector_size(32)));
#endif
constexpr int kLanes = sizeof(vf) / sizeof(float);

// Twelve independent chains in named variables (an array gets spilled to memory by the compiler).
__attribute__((noinline)) vf fma_chains(long iters, vf m, vf b) {
  vf a0 = m, a1 = m + b, a2 = m + 2 * b, a3 = m + 3 * b, a4 = m + 4 * b, a5 = m + 5 * b;
  vf a6 = m + 6 * b, a7 = m + 7 * b, a8 = m + 8 * b, a9 = m + 9 * b, a10 = m + 10 * b, a11 = m + 11 * b;
  for (long i = 0; i < iters; ++i) {
    a0 = a0 * m + b; a1 = a1 * m + b; a2 = a2 * m + b; a3 = a3 * m + b; a4 = a4 * m + b; a5 = a5 * m + b;
    a6 = a6 * m + b; a7 = a7 * m + b; a8 = a8 * m + b; a9 = a9 * m + b; a10 = a10 * m + b; a11 = a11 * m + b;
  }
  return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
}

double fma_peak_gflops(int64_t threads) {
  const long iters = 20000000;
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    float sink = 0;
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      vf m, b;
      for (int i = 0; i < kLanes; ++i) { m[i] = 0.999f; b[i] = 1e-3f; }
      vf r = fma_chains(iters, m, b);
      sink += r[0];
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
    if (sink == 1.2345f) std::abort();
  }
  return 2.0 * kLanes * 12 * iters * threads / best / 1e9;
}

// Read bandwidth over a working set of `bytes` split across the threads, read again and again.
double read_gbps(int64_t bytes, int64_t threads) {
  const int64_t per = std::max<int64_t>(4096, bytes / threads) / sizeof(vf) / 4 * 4;
  const int64_t reps = std::max<int64_t>(4, (int64_t(1) << 31) / (per * sizeof(vf) * threads));
  double best = 1e30;
  float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    std::vector<vf> buf(per);
    for (auto& v : buf) for (int i = 0; i < kLanes; ++i) v[i] = 1.0f;
    vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int trial = 0; trial < 3; ++trial) {
#pragma omp barrier
      auto t0 = std::chrono::steady_clock::now();
      for (int64_t r = 0; r < reps; ++r)
        for (int64_t i = 0; i < per; i += 4) { s0 += buf[i]; s1 += buf[i + 1]; s2 += buf[i + 2]; s3 += buf[i + 3]; }
#pragma omp barrier
#pragma omp master
      {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (s < best) best = s;
      }
    }
    vf t = s0 + s1 + s2 + s3;
    for (int i = 0; i < kLanes; ++i) total += t[i];
  }
  if (total == 1.2345f) std::abort();
  return double(reps) * per * sizeof(vf) * threads / best / 1e9;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fma_peak_gflops", &fma_peak_gflops);
  m.def("read_gbps", &read_gbps);
}
"""


def _kernels():
    return torch.utils.cpp_extension.load_inline(
        "fastlstm_cpu_bounds",
        cpp_sources=_SOURCE,
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _gflops(product) -> float:
    """The best of five runs of a 2048^3 float32 product."""
    product()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def _gemm_gflops() -> dict[str, float]:
    """2048^3 float32 rates of the GEMM libraries libtorch carries: torch.mm (MKL on x86 wheels, which runs
    generic code on AMD CPUs) and, where present, oneDNN's matmul (the op behind inductor's linear layers, which
    nn.LSTM's oneDNN path and cpp's large products use)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rates = {"torch.mm": _gflops(lambda: torch.mm(a, b))}
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if linear is not None:
        rates["oneDNN matmul"] = _gflops(lambda: linear(a, b, None, "none", [], ""))
    return rates


def _work(label: str, training: bool) -> tuple[float, list[int]]:
    """FLOPs, and the recurrent weight bytes (w_hh, and w_hr with a projection) streamed per step for each (layer,
    direction) with its steps, for a shape as bench labels it (Shape.parse: a projection, packed input too; a
    packed batch's lengths are the ones bench fed, Shape.sequence_lengths)."""
    shape = Shape.parse(label)
    lengths = shape.sequence_lengths()
    rows = int(lengths.sum()) if lengths is not None else shape.batch * shape.seq_len  # (step, sequence) pairs computed
    hidden, recurrent = shape.hidden_size, shape.proj_size or shape.hidden_size
    directions = 2 if shape.bidirectional else 1
    flops = 0.0
    streams: list[int] = []
    for layer in range(shape.num_layers):
        layer_in = shape.input_size if layer == 0 else recurrent * directions
        per_row = (layer_in + recurrent) * 4 * hidden + (hidden * recurrent if shape.proj_size else 0)
        flops += directions * 2.0 * rows * per_row
        weight_bytes = (4 * hidden * recurrent + (hidden * recurrent if shape.proj_size else 0)) * 4
        streams += [weight_bytes] * directions * shape.seq_len * (2 if training else 1)
    return flops * (3 if training else 1), streams


def bounded_rows(bench: dict, threads: int | None) -> tuple[int, list[dict]]:
    """The threads the bounds are measured at (the bench run's own, unless given) and the nn.LSTM rows they bound.
    The model counts float32 products outside autocast; a streamed step (`--mode step`) is another workload."""
    setting = {"dtype": bench.get("dtype", "float32"), "autocast": bench.get("autocast")}
    if setting != {"dtype": "float32", "autocast": None}:
        raise SystemExit(f"cpu_bounds: the bounds assume float32 outside autocast; this run has {setting}")
    if threads is None:
        threads = int(bench.get("machine", {}).get("threads") or torch.get_num_threads())
    rows = [row for row in bench["results"] if row["provider"] == "nn.LSTM" and row["mode"] != "step"]
    return threads, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="JSON written by `python -m fastlstm bench --json` on this machine")
    parser.add_argument("--threads", type=_thread_count, default=None, help="default: the threads the bench run used")
    args = parser.parse_args(argv)
    try:
        with open(args.results) as f:
            bench = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"{args.results}: {e}")
    if not isinstance(bench, dict) or not isinstance(bench.get("results"), list):
        parser.error(f"{args.results}: not a JSON of `python -m fastlstm bench --json` (no list of results)")
    threads, results = bounded_rows(bench, args.threads)
    if not results:
        parser.error(f"{args.results}: no nn.LSTM inference or training rows to bound (step rows are another workload)")
    torch.set_num_threads(threads)

    kernels = _kernels()
    peak = kernels.fma_peak_gflops(threads)
    gemm_rates = _gemm_gflops()
    sgemm = max(gemm_rates.values())
    bandwidth: dict[int, float] = {}

    def read_rate(nbytes: int) -> float:
        if nbytes not in bandwidth:
            bandwidth[nbytes] = kernels.read_gbps(nbytes, threads)
        return bandwidth[nbytes]

    rates = ", ".join(f"{name} {rate:.0f}" for name, rate in gemm_rates.items())
    print(f"threads {threads}: FMA peak {peak:.0f} GFLOP/s; 2048^3 float32: {rates} GFLOP/s")
    print("| shape | mode | nn.LSTM ms | nn.LSTM GFLOP/s | W_hh read GB/s | cap (FMA peak) | cap (best GEMM rate) |")
    print("|---|---|---|---|---|---|---|")
    caps: dict[str, dict[str, list[float]]] = {}
    for row in results:
        training = row["mode"] == "training"
        flops, streams = _work(row["shape"], training)
        stream_s = sum(n / (read_rate(n) * 1e9) for n in streams)
        native_s = row["median_ms"] / 1e3
        cap_peak = native_s / max(flops / (peak * 1e9), stream_s)
        cap_sgemm = native_s / max(flops / (sgemm * 1e9), stream_s)
        per_mode = caps.setdefault(row["mode"], {"peak": [], "sgemm": []})
        per_mode["peak"].append(cap_peak)
        per_mode["sgemm"].append(cap_sgemm)
        print(
            f"| {row['shape']} | {row['mode']} | {row['median_ms']:.2f} | {flops / native_s / 1e9:.0f} "
            f"| {read_rate(streams[0]):.0f} | {cap_peak:.2f}x | {cap_sgemm:.2f}x |"
        )
    for mode, per in caps.items():
        geo = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in per.items()}
        print(
            f"{mode}: geometric mean of the caps {geo['peak']:.2f}x at the FMA peak, {geo['sgemm']:.2f}x at "
            f"the best GEMM's rate; the smallest cap {min(per['peak']):.2f}x / {min(per['sgemm']):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
