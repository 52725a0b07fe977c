"""Which backend serves each (layer, direction) of a call, and why. The only place that chooses.

`backend="auto"`: on CUDA, triton where it is available, supports the call, is measured faster than cuDNN and
its kernels pass a self-test on this GPU (they compile and agree with native); on the CPU, cpp where it is built,
supports the call and is measured faster than oneDNN/ATen, and every call torch.compile traces (nn.LSTM's CPU
path breaks a compiled graph's backward; the speed rule is not asked); native everywhere else, except where
nn.LSTM's kernels cannot run the call (torch.vmap, forward-mode AD): there the fast backend if it serves the
call, else the reference loop. Any other name forces that backend and raises BackendUnavailableError when it
cannot serve the call (and a forced backend's kernel errors reach the caller). A module's backend=None (its
default) reads `FASTLSTM_BACKEND` at each call, "auto" when unset.

Whatever is requested, forced or not, calls inside torch.onnx.export or torch.jit.trace take native: the exported
or traced graph then holds ONNX's LSTM or aten::lstm, which run where fastlstm is not installed, with nn.LSTM's
numbers.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import warnings
from dataclasses import dataclass

import torch

from fastlstm import backends, measured_cuda
from fastlstm.backends import BackendUnavailableError, BuildCrashError, LayerCall, native

AUTO = "auto"
ENV_VAR = "FASTLSTM_BACKEND"
_log = logging.getLogger("fastlstm")
_warned: set[str] = set()


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def requested(module_backend: str | None) -> str:
    """The backend name in force: the module's own, else $FASTLSTM_BACKEND, else auto."""
    if module_backend:
        validate_name(module_backend)
        return module_backend
    name = os.environ.get(ENV_VAR) or AUTO
    try:
        validate_name(name)
    except ValueError as error:
        raise ValueError(f"{error} (from ${ENV_VAR})") from None
    return name


def validate_name(name: str) -> None:
    if name != AUTO and name not in backends.names():
        raise ValueError(f"unknown fastlstm backend {name!r}; expected 'auto' or one of {', '.join(backends.names())}")


_FAST_BACKENDS = {"cpu": "cpp", "cuda": "triton"}  # each device's fast backend
FUNCTIONALIZED = (
    "torch.func.functionalize around a gradient transform: torch has no functionalize rule for the autograd.Function "
    "the fast backends run there"
)


def cannot_serve(name: str, call: LayerCall) -> str | None:
    """Why backend `name` cannot serve `call`, or None."""
    backend = backends.get(name)
    if call.functionalized and name in _FAST_BACKENDS.values():
        return FUNCTIONALIZED
    return backend.unavailable_reason() or backend.unsupported_reason(call)


def _fast_backend_for(device_type: str) -> str | None:
    return _FAST_BACKENDS.get(device_type)


@backends.constant_under_compile  # dynamo refuses torch.cpu's probes; what the CPU can do is constant anyway
def _cpu_bf16_kind() -> str | None:
    """How this CPU multiplies bfloat16 natively, which oneDNN's bf16 LSTM uses: "amx", "avx512_bf16", None
    (it converts to float32), or "unknown" (neither torch's probes nor /proc/cpuinfo to tell)."""
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    avx = getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx is not None or avx is not None:
        tiles, dots = amx is not None and amx(), avx is not None and avx()
    else:  # torch 2.4 has no probes: the kernel's flags tell
        flags = cpu_flags()
        if flags is None:
            return "unknown"
        tiles, dots = {"amx_tile", "amx_bf16"} <= flags, "avx512_bf16" in flags
    if tiles:
        return "amx"
    return "avx512_bf16" if dots else None


@backends.constant_under_compile
def _cpu_fp16_units() -> str | None:
    """How oneDNN can run float16 natively here, where nn.LSTM's float16 inference takes oneDNN's fused LSTM
    instead of ATen's float16 loop: "amx" (AMX-FP16 tiles), "avx512" (AVX512-FP16), None (it cannot), or "unknown"
    (no /proc/cpuinfo: the rule then keeps native, as for AMX)."""
    amx = getattr(getattr(torch, "cpu", None), "_is_amx_fp16_supported", None)
    flags = cpu_flags()
    if amx is not None:
        tiles = amx()
    else:  # torch 2.4 and 2.5 have no probe
        tiles = flags is not None and "amx_fp16" in flags
    if tiles:
        return "amx"
    if flags is None:
        return "unknown"
    return "avx512" if "avx512_fp16" in flags else None


def cpuinfo_fields(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, str] | None:
    """The first processor's entry of /proc/cpuinfo as {field: value}; None where there is none to read."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor's entry is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields


@backends.cached_constant
def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first processor's flags in /proc/cpuinfo (None without it). Read once: /proc/cpuinfo grows with the core
    count, and every new call shape asks."""
    fields = cpuinfo_fields(cpuinfo_path)
    return None if fields is None else frozenset(fields.get("flags", "").split())


@backends.cached_constant
def _cpu_architecture() -> str:
    """platform.machine(), read once and outside any trace ("x86_64", "aarch64", ...)."""
    return platform.machine()


def _cpu_is_x86() -> bool:
    """Whether this is an x86-64 CPU, the only architecture the CPU rule below was measured on."""
    return _cpu_architecture().lower() in ("x86_64", "amd64")


@backends.cached_constant
def _cpu_amd_family(cpuinfo_path: str = "/proc/cpuinfo") -> int:
    """AMD's CPU family number (0x19 Zen 3-4, 0x1A Zen 5), 0 on other CPUs or without /proc/cpuinfo. A VM names
    Zen 4 and Zen 5 both "AMD EPYC"; the family tells them apart, and they measured differently."""
    fields = cpuinfo_fields(cpuinfo_path)
    if fields is None or fields.get("vendor_id") != "AuthenticAMD":
        return 0
    try:
        return int(fields.get("cpu family", "0"))
    except ValueError:
        return 0


def _cpu_intel_amx() -> bool:
    """Whether this is an Intel CPU with AMX (Sapphire Rapids and later: no other CPU has the tiles), where float32
    measured differently (see _cpp_slower_reason)."""
    return _cpu_bf16_kind() == "amx"


@backends.cached_constant
def _cpu_amd_zen3(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU is AMD family 0x19 without AVX-512: Zen 3 (Zen 4, the same family, has AVX-512). oneDNN runs
    its AVX2 LSTM there, and float32 measured differently (see _cpp_slower_reason)."""
    if _cpu_amd_family(cpuinfo_path) != 0x19:
        return False
    return "avx512f" not in (cpu_flags(cpuinfo_path) or ())


@backends.constant_under_compile
def _cpp_bf16_dot() -> bool:
    """Whether the cpp build multiplies bfloat16 in bf16 dot products (see fastlstm.backends.cpu)."""
    from fastlstm.backends import cpu

    return cpu.uses_bf16_dot()


@backends.constant_under_compile
def _cpp_amx() -> bool:
    """Whether the cpp build's bfloat16 products run on AMX tiles (see fastlstm.backends.cpu)."""
    from fastlstm.backends import cpu

    return cpu.uses_amx()


@backends.constant_under_compile
def _cpp_onednn_weight_grads() -> bool:
    """Whether the cpp build takes float32 weight gradients through oneDNN (see fastlstm.backends.cpu)."""
    from fastlstm.backends import cpu

    return cpu.uses_onednn_weight_grads()


def _one_thread() -> bool:
    """Whether torch runs one thread (a serving worker, say): the Intel AMX rules and Zen 4's bfloat16 inference
    rule were measured at two, where cpp splits a batch's rows between the threads and oneDNN synchronises them at
    every step. Plans are remembered per thread count (the module's call key and _CallShape hold it)."""
    return torch.get_num_threads() == 1


# The fewest steps the cpp forward splits its rows for (csrc/team.h, kRowSplitMinSteps; a test holds the two equal).
CPP_ROW_SPLIT_MIN_STEPS = 8


def _cpp_splits_rows(call: LayerCall) -> bool:
    """Whether the cpp float32 forward of `call` splits its rows among threads (the row split, csrc/team.h), or would
    were it CPP_ROW_SPLIT_MIN_STEPS steps long: a shorter call runs the team loop instead, faster than the split
    there on the Xeon with AMX (csrc/team.h), and the Zen rule that reads this was measured at 20-300 steps, the
    split's lengths, with cpp given every call whose rows split (shorter ones too, before the split took a length)."""
    from fastlstm.backends import cpu

    steps = max(call.seq_len, CPP_ROW_SPLIT_MIN_STEPS)
    bounds = cpu.float32_forward_rows(steps, call.batch, call.input_size, call.hidden_size, call.proj_size)
    return len(bounds) > 2


def _cpp_slower_reason(call: LayerCall) -> str | None:
    """The measured CPU rule: cpp where it beat nn.LSTM on every measured shape of its class, native elsewhere.

    Measured with `python -m fastlstm bench --grid cpu-full --backend cpp --mode both --dtype D` on two 2-core
    machines: an AMD EPYC (Zen 4, AVX512-BF16; benchmarks/results/cpu-amd-epyc-zen4-2core-*.json) and, in an
    earlier session whose tables were not kept, an Intel Xeon (AVX-512, no BF16 instructions; geomeans float64
    1.92x / 2.57x, bfloat16 3.18x / 2.76x, inference / training). Ratios are nn.LSTM time / cpp time, same
    process, interleaved.
    - float64: cpp won everywhere (EPYC, last two grids: inference 1.11-5.38x, training 1.16-14.8x).
    - With a projection (proj_size > 0) nn.LSTM leaves oneDNN (which has no projection) for ATen's per-step
      loop, and cpp won every shape, 10 shapes (batch 1-64, hidden 64-512, 1-2 layers, uni- and bidirectional)
      twice (`-projection-run*.json`): float32 inference 1.62-6.28x, training 1.46-17.9x; bfloat16 (in bf16 dot
      products) inference 1.55-19.4x, training 1.08-27.6x.
    - Packed input (a PackedSequence, or lengths=) likewise takes nn.LSTM off oneDNN's fused LSTM onto ATen's
      loop. The grid's 14 shapes packed (unsorted lengths in [T/2, T]), twice (`-packed-run*.json`): at batch
      2-64 cpp won every shape, float32 inference 1.48-3.43x, training 1.48-13.2x, bfloat16 (bf16 dot products)
      inference 1.32-4.55x, training 1.45-9.15x; batch 1 (lengths all T) measured as unpacked (float32 inference
      0.98-1.49x, training 1.09-1.88x; bfloat16 1.00-1.79x / 1.49-2.95x).
    - oneDNN off (`torch.backends.mkldnn.enabled = False`, a `flags()` block, or a torch built without it;
      LayerCall.onednn): nn.LSTM runs every call on ATen's loop, float32 at BLAS's GEMM a step and
      bfloat16 on ATen's own bf16 GEMM. Zen 4, 2 threads, `bench --no-onednn --backend auto`
      (`-float32-onednn-off-*.json`, `-bfloat16-onednn-off.json`): the cpu-full grid twice, float32 inference
      1.45-10.9x, training 1.43-28.4x; five of its shapes in bfloat16, inference 9.98-19.5x, training 16.9-28.5x;
      the cpu-short grid (1 and 10 steps, batch 8-64, hidden 128-512) float32 inference 1.17-2.24x, training
      1.08-2.42x; one step in training from hidden 256 was mixed (0.72-1.26x, a script at batch 1-64: the
      few-steps rule's float32 case below). So cpp there, as for float64.
    - float32: oneDNN runs near the machine's GEMM peak, so cpp only wins reliably where per-step overhead
      dominates: small batches. Batch 1 (EPYC, last four grids: inference 1.01-2.14x, training 1.09-2.08x).
      Batch 2, two runs each of 15 shapes (H 64-1024, T 35-500, 1-3 layers, uni- and bidirectional): inference
      1.15-2.01x except B2-T50-I100-H300-bi at 0.92-0.93x (that shape is weak at batch 1 too: 0.81-0.95x),
      training 1.05-1.87x. Batch 3-4 training, 14 shapes twice: 0.97-1.87x (the 0.97x, B4-T200-H256-L2-bi, was
      1.16x in the other run). Batch 3-4 inference was mixed (0.91-1.83x) until the weight packing went through
      vector registers and the per-step split was evened out (64b9b5b): then 14 shapes twice (H 128-1024, T
      35-200, 1-2 layers, uni- and bidirectional; `-float32-batch3-4-run*.json`) measured 0.98-2.47x, all but
      B4-T100-H384-bi (1.00x, 0.98x) above 1.02x. Batch 6, the same 7 shapes twice (`-float32-batch6-run*.json`),
      was mixed (inference 0.87-1.65x, training 0.98-1.30x). Batch 8 lost (B8-T100-H256: 0.91-0.96x in both
      modes; 0.96-1.00x in the grids at 64b9b5b / aa90fae). At batch >= 8 the last three grids measured 0.79-1.18x at
      inference and 0.87-1.28x in training, winning some shapes and losing others by more than run-to-run noise.
      Small hidden sizes are the exception: there the per-step products are too small for oneDNN to run at
      GEMM speed. Hidden 16-64 (no projection) at batch 4-16, T 50-500, 1-2 layers, uni- and bidirectional, 18
      shapes twice each: inference 1.01-1.66x, training 1.06-1.76x. Beyond batch 16 it is mixed (batch 32:
      inference 0.77-1.13x; batch 64: 0.75-1.10x), and hidden 100 at batch 16 was even (0.88-1.02x).
      Short sequences are the other: a call of few steps pays oneDNN's per-call setup (weight reorders) over
      few steps, and cpp keeps its packed-weight memory between calls. Batch 8-64, hidden 128-512 (input size =
      hidden), one layer (`--grid cpu-short`), twice (`-float32-short-run*.json`): one step won every shape
      (1.12-3.96x, both modes); 10 steps won at batch 8-16 (1.03-2.00x) and was mixed beyond (batch 32:
      inference 0.96-1.03x, training 1.01-1.50x; batch 64: 0.87-1.03x). 4 steps at batch 5-16 once
      (`-float32-short-t4.json`): 1.13-3.29x.
    - CPUs without AVX-512: the cpp build's vectors are one register of the CPU it is built on (32 bytes with
      AVX2, 16 with SSE4). Measured on the same EPYC with every library held to the older instructions (cpp
      built with FASTLSTM_CXXFLAGS=-march=x86-64-v3 / -v2; ONEDNN_MAX_CPU_ISA=AVX2 / SSE41,
      MKL_ENABLE_INSTRUCTIONS=AVX2 / SSE4_2, ATEN_CPU_CAPABILITY=avx2 / default for nn.LSTM), the grid
      (`-as-avx2-*.json`, `-as-sse4-*.json`), float32 twice each: at batch 1-4 AVX2 inference 1.05-1.78x,
      training 1.11-2.10x, SSE4 1.14-1.81x / 1.39-1.99x; beyond batch 4 AVX2 0.98-1.54x in both modes, SSE4
      inference 0.81-1.07x, training 1.03-1.31x. float64 AVX2 twice: inference 1.09-5.59x, training 1.14-12.4x.
      bfloat16 AVX2 once (cpp in float32 math; oneDNN held to AVX2 has no bf16 instructions either): inference
      2.43-10.8x, training 10.7-45.3x. The rule holds there as written.
    - float16: cpp computes it in float32 math; nn.LSTM runs ATen's float16 loop, except at inference on CPUs
      with float16 units (AVX512-FP16, AMX-FP16) without a projection or packed input, where oneDNN runs it. The
      grid twice (EPYC, no float16 units; `-float16-run*.json`): inference 2.02-13.4x, training 13.2-60.2x. On
      the Xeon with AVX512-FP16 (no AMX-FP16; `cpu-intel-xeon-amx-2core-float16-*.json`), twice: the grid's
      inference 1.09-7.64x (training, once: 1.29x and up); a projection or packed input (5 shapes) 1.30-4.38x; beyond
      batch 64 B128-T50-H256 1.01x, B256-T35-H512 0.81x. So float16 inference goes native on such a CPU beyond
      batch 64, and on CPUs with AMX-FP16 (oneDNN on tiles, which beat cpp's vector kernel in bf16; not
      measured) without a projection or packed input.
    - bfloat16 depends on the CPU. Without bf16 instructions oneDNN converts to float32 and cpp won (Xeon:
      geomean about 3x). With AVX512-BF16 (EPYC) cpp multiplies in bf16 dot products as oneDNN does; the grid
      three times and 25 more shapes twice (batch 1-128, hidden 16-1024;
      benchmarks/results/cpu-amd-epyc-zen4-2core-bfloat16*.json): inference won wherever batch x hidden <= 1024
      (22 shapes: 0.97-2.22x, the weakest B1-T100-H512 at 0.97-1.04x) and lost or tied beyond (17 shapes:
      0.70-1.14x); training won at batch <= 16 on all 28 shapes (1.01-4.17x) and beyond it at hidden >= 512 (6
      shapes: 1.08-1.68x), and was mixed at batch > 16 below hidden 512 (5 shapes: 0.81-1.25x); with a
      projection or packed input it won everywhere (above). Measured again on Zen 4 at bd90f9b (since the
      first measurement, among other changes, the large training tensors are kept between calls: csrc/memory.h),
      twice each: training beyond batch 16, 23 shapes (batch 17-512, hidden 64-1024, 1-2 layers, uni- and bidirectional;
      `-bfloat16-training-beyond-batch16-run*.json`, `-beyond-batch128-run*.json`, `-large-hidden-run*.json`)
      1.05-1.75x but B256-T20-H128 (0.98x, 1.02x): so on Zen 4 bfloat16 training goes to cpp at any batch.
      Inference at bd90f9b, twice each: batch 6-16 at hidden 64-256, 10 shapes (1-2 layers, uni- and
      bidirectional; `-bfloat16-inference-hidden-64-256-run*.json`, `-inference-batch5-16-run*.json`)
      1.04-1.65x; beyond batch 16 at hidden 64-256, 10 shapes, mixed (0.93-1.62x: B24-H96 1.56x, 1.62x but
      B128-H256 0.93x, 0.94x, B64-H128 1.01x, 0.99x); the grid once (`-inference-grid-at-bd90f9b.json`) 0.92-1.07x
      beyond the rule at hidden 256-512. So bfloat16 inference also goes to cpp up to batch 16 at hidden <= 256,
      on Zen 4 as on Zen 5. Batch 17-32 at hidden 64-160 on Zen 4, 11 shapes twice (8 in
      `-bfloat16-inference-batch17-32-run*.json`): 1.03-1.62x, so there too (on Zen 5 beyond batch 16 was even or
      lost, above). At ff3f223 (2026-12-06), hidden 16-64 at batch 33-96, 14 shapes twice (1-2 layers, uni- and
      bidirectional; `-bfloat16-inference-small-hidden-beyond-batch32-run*.json`, `-...-more-run*.json`):
      1.01-1.75x, the grid's B64-T50-H64-L2-bi among them (1.11-1.23x in five runs); beyond batch 96 it was even
      (B128-H32-L2 1.01x, 0.95x; B128/B256-H64 1.02-1.05x), and hidden 96-128 at batch 48-128 0.91-1.00x. So on
      Zen 4 inference also goes to cpp up to batch 96 at hidden <= 64. At one thread (`--threads 1`), the same
      day, 14 shapes twice (`-bfloat16-inference-one-thread-run*.json`): batch 8-48 at hidden 64-256 lost
      (0.88-1.00x: B32-H64 0.88x, 0.89x; B16-T500-H128 0.93x, 0.96x), batch 4 was even (B4-T100-H256 1.03x, 0.98x)
      and bidirectional H48-64 at batch 64-96 even (0.98-1.04x): so at one thread bfloat16 inference from batch 8
      at hidden <= 256 goes native on Zen 4, as on the Xeon with AMX. Training at one thread, ten shapes twice
      (`-bfloat16-training-one-thread-*.json`): one-layer unidirectional shapes from batch 24 at hidden 64-320 lost
      (0.88-0.97x) where the input needs its gradient, and won or tied where it needs none (0.99-1.18x; B256-H64
      0.90x, 0.96x; `-training-data-one-thread-*.json`); 2-layer bidirectional H64 stacks won (0.99-1.55x).
      2026-12-07, `--backend auto --backend cpp`: with a first rule (every such call native), 10 training shapes
      twice (`-training-one-thread-input-grad-rule-run*.json`), auto 0.96-1.01x where it went native against cpp's
      0.91-1.00x; bidirectional stacks and hidden 384 stayed on cpp (1.00-1.24x). A stack with its first layer on
      cpp (an input needing no gradient) and the rest native lost to cpp on both layers (training-data
      B64-T35-H200-L2 1.12x against 1.22x, B64-H64-L2-bi 1.01x against 1.07x, once, a version that split them), so
      every layer follows the input: with the input needing no gradient stacks stay on cpp
      (`-training-data-one-thread-input-grad-rule-run*.json`: 1.01-1.29x). The cpu-full grid under that first rule
      (`-one-thread-grid-at-2afc966.json`) showed B32-T100-H256 lost to it (cpp 1.17x, auto native 1.00x); lengths
      swept (`-training-one-thread-length-sweep.json`, cpp alone): oneDNN slows down past a size, B64-H128 lost at
      50-90 steps (0.87-0.94x) and won from 100 (1.21-1.27x), B32-H256 tied at 80 and won from 100; B128-T50-H128,
      as large, measured both ways (0.87-0.90x once, 1.21-1.24x three times). So below 786,432 steps x batch x
      hidden only, four runs of 12 shapes (`-training-one-thread-volume-*-run*.json`): where auto goes native (30
      results) 0.94-1.03x (geomean 0.99x) against cpp's 0.88-1.07x (0.94x), where it keeps cpp (18) 0.87-1.36x
      (1.17x). So bfloat16 training of a unidirectional module at one thread on Zen 4, its input needing its
      gradient, goes native from batch 24 at hidden 64-320 below that size.
      Short sequences (`--grid cpu-short --dtype bfloat16`, twice, `-bfloat16-short-run*.json`): one step won at
      batch 8-64 (inference 1.01-1.64x, training 1.12-3.55x), 10 steps at batch 8-16 (inference 1.00-1.44x,
      training 1.12-2.84x); 10 steps beyond was mixed (batch 32-64: inference 0.78-1.02x, training 0.95-1.54x).
      With AMX, see the Intel paragraph below.
      A cpp build that computes bf16 in float32 math on such a CPU (FASTLSTM_BF16_DOT=0, or built for another
      CPU) lost inference on 13 of 14 grid shapes (0.44-1.62x) but won training at batch 1-2 (1.16-3.22x), and
      hidden 16-64 (no projection) at batch 1-8 (10 shapes twice: inference 1.06-1.85x, training 1.10-1.72x;
      the `-bfloat16-f32math-*` JSONs).
    - Zen 5 (AMD EPYC, family 0x1A, AVX-512 on full-width units), every class above measured again once at
      ad9520d (benchmarks/results/cpu-amd-epyc-zen5-2core*): the classes given to cpp won (float64 1.08-11.05x,
      1.42x and up at 8dfb771; float32 batch 1-4 1.14-3.29x, hidden <= 64 1.11-2.81x, projection 1.88-19.8x,
      packed 1.18-10.7x, one step 1.07-6.21x, 10 steps at batch 8-16 1.00-2.29x; bfloat16 as above) but one
      bfloat16 training shape,
      B16-T500-H128 (0.84x in the grid, 0.93x and 0.98x alone: its calls alternate between two speeds); float32
      beyond batch 4 measured inference 1.00-1.20x, training 0.89-1.58x: close to even, so native.
      Float32 training beyond batch 4 changed once the weight gradients' transposing copies were made by the
      backend (weight_grad in csrc/blas.h; before, oneDNN's and at::copy_'s took 0.63 ms of a 6.9 ms training
      step at B8-T100-H256): the grid's 9 such shapes three times 1.05-1.81x (`-float32-at-ad5aac7-run*.json`), `--grid
      cpu-short` training at batch 8-64 once 0.98-4.50x, 12 more shapes (batch 6-256, hidden 96-1024, 1-3
      layers, 20-300 steps) twice 0.97-1.35x (`-float32-training-beyond-batch4-run*.json`). So float32 training
      goes to cpp at any batch where the build takes its weight gradients through oneDNN
      (cpu.uses_onednn_weight_grads(): AMD family 0x1A on, by default). Inference at batch 5-8 won on Zen 5:
      12 shapes (batch 5-8, hidden 128-1024, 1-2 layers, uni- and bidirectional; the Zen 4 batch-6 set and five
      more) twice, 1.03-1.47x (`-float32-batch5-8-inference-run*.json`), and the grid's batch-8 shapes
      1.07-1.13x: so on AMD family 0x1A on (_cpu_amd_family) float32 inference goes to cpp up to batch 8. Beyond
      it inference stayed close to even (0.98-1.13x): native, except where the rows split evenly.
      The row split (csrc/team.h: each thread runs the time loop on its own rows, then from 8 rows a thread where
      a step's weights fit the core's L2) took float32 inference 1.05-1.31x faster than the team loop before it.
      Against nn.LSTM on Zen 5, 2 threads: the grid's three shapes it serves, three runs each, 1.09-1.38x
      (`-float32-at-c385603-run*.json`), and 10 more shapes (batch 16-256, hidden 64-180, input 32-256, 35-300
      steps, 1-2 layers, uni- and bidirectional; `-float32-row-split-shapes-run*.json`) three times: 1.02-2.11x
      on the nine whose threads take equal shares, and 0.88x, 1.29x, 0.91x on B24-T200-H96, whose 24 rows split
      16 + 8 (the split then ran whole blocks of 8 rows a thread).
      So on Zen 5 float32 inference also went to cpp where the forward split its rows in equal shares. Since
      unpacked rows split in shares as even as rows allow (each thread forming its own row blocks; 24 rows: 12
      + 12, no longer 16 + 8), 15 shapes whose rows do not split in equal whole blocks (batch 17-200, hidden
      64-160, 35-200 steps, 1-2 layers, uni- and bidirectional; `-float32-even-rows-run*.json`, three runs on the
      commit that made the shares even) measured inference 0.99-1.30x (B25-T50-H160 0.99-1.00x, B120-T35-H128
      0.99-1.02x, the other 13 1.01-1.30x) and training 1.00-1.88x. So it goes to cpp wherever the forward splits
      its rows (_cpp_splits_rows, asked of the build: cpu.float32_forward_rows). Since the split takes 3+ rows a
      thread (it took 8+), batch 9-15 splits where the weights fit: 10 such shapes (hidden 64-180, 35-200 steps,
      1-2 layers, uni- and bidirectional) six runs each, 1.05-1.95x (`-float32-split-from-3-rows-run*.json`,
      `-float32-batch9-15-run*.json`). On Zen 4 too, at bd90f9b: 17 shapes whose rows split (batch 12-256,
      hidden 64-180, 20-300 steps, 1-2 layers, uni- and bidirectional) twice each, 0.97-1.66x (B25-T50-H160
      1.17x, 0.97x; the others 1.01x and up; `cpu-amd-epyc-zen4-2core-float32-row-split-inference-*.json`),
      while three beside them whose rows do not split (batch 9-16 at hidden 200-256) measured 0.88-1.04x: so on
      Zen 4 float32 inference goes to cpp wherever the rows split as well.
      Float32 training beyond batch 4 on Zen 4 had measured 0.95-1.17x with the weight gradients through MKL
      (native). Through oneDNN (weight_grad in csrc/blas.h, its transposing copies made by the backend), the
      products alone ran 1.0-1.4x faster than MKL's, and cpp's training against nn.LSTM, alternating processes
      with FASTLSTM_ONEDNN_WEIGHT_GRADS=0 and 1 three rounds each (`-float32-training-weight-grads-*.json`):
      20 shapes beyond batch 4 (batch 5-512, hidden 64-1024, 10-300 steps, 1-3 layers, uni- and bidirectional)
      0.98-1.51x through oneDNN against 0.97-1.45x through MKL, 18 shapes' medians as fast or faster, two a
      little slower (B6-T200-H128-L2 1.23x against 1.31x, the runs spanning 1.11-1.40x and 1.12-1.33x;
      B32-T100-H1024 1.06x against 1.08x); at batch 1-4 (10 shapes, which went to cpp already) the two within
      the runs' spread, nn.LSTM's own time swinging up to 1.7x between processes. So the build takes them
      through oneDNN on Zen 4 too, and float32 training goes to cpp at any batch there by the rule above.
      bfloat16 (bf16 dot products) on Zen 5 at e4fb7e5, beyond the Zen 4 rule's classes, twice or three times
      each (`-bfloat16-batch8-16-inference-run*.json`, `-bfloat16-training-batch17-32-run*.json`,
      `-bfloat16-training-beyond-batch32-run*.json`, `-bfloat16-beyond-zen4-rule-run*.json`):
      inference at batch 8, 5 shapes (hidden 128-1024) 1.01-1.31x; batch 9-16 at hidden 128-256, 7 shapes
      1.02-1.64x, at hidden 320-1024 mixed (5 shapes 0.93-1.13x); beyond batch 16 close to even or lost (18
      shapes 0.80-1.26x). Training at batch 17-32: hidden 64-256 and 512, 8 shapes 1.00-2.60x; hidden 320-384
      mixed (B24-T100-H384 0.92x, 0.97x; B28-T50-H320-L2 1.04x, 1.24x). Beyond batch 32: hidden 512 mixed or lost
      (B64-T100-H512 0.86-0.97x in five runs, B128-T50-H512 0.87-1.13x, B48-T50-H512 0.98x, 1.11x), hidden
      640-1024 won (4 shapes 1.06-1.52x), below 512 mixed (8 shapes 0.90-1.78x). So on Zen 5 bfloat16 inference
      also goes to cpp up to batch 8, and up to batch 16 at hidden <= 256; training up to batch 32 at hidden
      <= 256 or >= 512, and at hidden >= 640 at any batch (no longer at hidden 512 beyond batch 32).
    - Zen 3 (AMD family 0x19 without AVX-512: oneDNN runs its AVX2 LSTM; cpp builds AVX2 vectors), 2 threads, at
      340a26f (benchmarks/results/cpu-amd-epyc-zen3-2core*): float32 beyond batch 4 won far more than on the CPUs
      above. The grid three times: per-shape medians 1.04-2.11x at inference, 1.01-2.25x in training (single runs
      1.00x and up; batch 8-64: 1.04-1.42x, 1.01-1.62x). 78 more shapes (the batch 5-512 sets measured on Zen 5
      above, five more at hidden 640-1024) once, the 29 of them below 1.10x or at hidden >= 640 twice: below
      hidden 640 (65 shapes) inference 0.93-1.82x (B6-T300-H256 1.07x then 0.93x, B6-T200-H256 1.10x then 0.95x,
      the others 1.00x and up), training 1.01-1.71x; hidden 640-2048 at batch 6-8 (4 shapes) 0.99-1.67x and
      1.01-1.64x; beyond batch 8 (9 shapes) 0.97-1.15x and 0.87-1.41x, training below 0.95x on seven. So on Zen 3
      float32 goes to cpp at any batch below hidden 640, and up to batch 8 from it.
    - Intel with AMX (a 2-core Xeon, family 6 model 167 as its VM reports it: AMX-BF16, AVX512-BF16, AVX512-FP16;
      benchmarks/results/cpu-intel-xeon-amx-2core*). float32, the grid twice and 18 more shapes twice (batch 1-256,
      hidden 32-1024; `-float32-grid-run*.json`, `-float32-extra-run*.json`), once cpp's step left MKL's packed
      GEMM below 8 rows and at a w_hh narrower than 256 (csrc/blas.h): training won every shape (beyond batch 4,
      1.06-2.53x); inference beyond batch 4 won every shape below hidden 256 (9 shapes 1.09-3.72x) and was mixed
      from it, where MKL runs the step (15 shapes 0.92-1.42x; hidden 256 at batch 8-256 0.92-1.09x). Measured
      again at 2269ae7, 28 shapes beyond batch 4 from hidden 256 (batch 5-256, hidden 256-1024, 35-200 steps, 1-2
      layers, uni- and bidirectional) twice (`-float32-inference-beyond-batch4-run*.json`,
      `-float32-inference-beyond-batch4-more-run*.json`): batch 5-7 won at every hidden (5 shapes 1.07-1.21x;
      B6-H384 1.38-1.42x before), hidden 384-1024 up to batch 32 won every shape (7 shapes 1.07-1.44x; with the
      earlier runs' B8-H1024, B16-H512, B24-H384 1.09x and up), beyond batch 32 there it was close to even
      (B40-H448 0.94x, 1.00x; B256-H512 0.89x, 0.91x; six more 1.02-1.07x), and hidden 256-320 beyond batch 7
      even or lost (hidden 256: 9 shapes 0.92-1.05x; hidden 320: 1.00-1.05x). From hidden 640 beyond batch 32
      (2026-12-05, `-float32-inference-wide-*.json`): at two threads, two runs, 1.01-1.15x to hidden 1024 (batch
      40-512), 1.37-1.45x at hidden 1536-2048; at one thread, three runs, 0.99-1.17x to hidden 896 but
      B192-T40-H640 0.94x (B256-T20-H640 1.06x), 1.07-1.38x at hidden 1024 (batch 40-512), 1.22-1.63x at
      1536-2048; `auto` on four more shapes, 1.02-1.15x and 0.99x (B200-T25-H640), at one thread 1.02-1.17x. So
      on Intel with AMX float32 goes to cpp in training at any batch, and at inference below hidden 256, up to
      batch 7, from hidden 384 up to batch 32, and from hidden 640 at any batch.
      bfloat16: oneDNN runs it on AMX tiles, and cpp's vdpbf16ps kernel
      lost inference on 11 of the grid's 14 shapes (0.17-0.79x; `-bfloat16-vector-kernel.json`). With cpp's bf16
      products on the tiles too (csrc/amx.h), twice each: the grid, inference 1.01-1.80x, training 0.95-5.57x
      (B64-T100-H512 0.95x, 1.02x); `--grid cpu-short` (1 and 10 steps, batch 8-64) 1.05-1.49x and 1.10-2.41x; a
      projection or packed input (4 shapes) 2.21-5.78x and 1.97-7.18x; 22 more shapes (batch 1-256, hidden
      32-2048; `-bfloat16-amx-extra-run*.json`): inference won at batch <= 8 (with the grid's: 1.13-3.94x), at
      hidden <= 256 up to batch 128 (1.11-1.80x) and at hidden 512-2048 up to batch 48 (1.04-1.31x); it lost at
      hidden 320-384 beyond batch 8 (4 shapes 0.92-0.98x), B64-H1024 (0.89-0.92x), B128-H1024 (0.86-0.89x) and
      batch 256 (0.80-1.12x), and was even at B64-H512 (1.01x). Training won up to batch 48 (1.24-5.57x) and at
      hidden <= 256 up to batch 96 (3 shapes 1.23-1.62x); beyond, mixed (B64-H512 0.95x, 1.02x; B64-H1024
      1.02-1.03x; B128-H256 0.95-0.99x; B128-H1024 0.86-0.89x; B256-H512 0.76-0.81x; B256-H128 1.46-1.48x). With
      two row blocks a panel at once (56db7f2), twice more (`-bfloat16-amx-pairs-extra-run*.json`): training
      B64-H512 1.37-1.38x (0.95-1.02x in the grid runs), B64-H1024 1.16-1.19x, B96-H768 1.23-1.25x, B128-H1024
      0.91-0.95x; inference still at most even beyond the rule below (B64-H512 0.96-0.97x, B64-H1024 1.02-1.04x,
      B96-H768 0.93-0.94x, B128-H1024 0.90-0.91x, B16-H384 0.92-0.93x). So where the build multiplies on the
      tiles (cpu.uses_amx()) bfloat16 goes to cpp with a projection or packed input, for up to 10 steps at batch
      <= 64, at inference up to batch 8, up to batch 96 at hidden <= 256 and up to batch 48 from hidden 512, and
      in training at any batch: once the large training tensors were kept between calls (csrc/memory.h), training
      beyond batch 96 won twice (`-bfloat16-amx-kept-tensors-training-run*.json`): B128-H256 1.46-1.48x,
      B128-H1024 1.08-1.12x, B256-H512 1.06-1.08x, B64-H512 1.14-1.25x; B256-H128 1.38x and 0.77x, then
      1.37-1.48x three times, B192-H384 1.29-1.33x three times. A build without the tiles (FASTLSTM_AMX=0, or
      built for another CPU) goes native there. At one thread (`--threads 1`, inference, 50 steps,
      `-bfloat16-inference-one-thread-run{1,2}.json`), where oneDNN loses its synchronisation of two threads at
      every step: hidden 384-511 won up to batch 24 (B12-B24 1.10-1.57x; B16-H384 1.19x and 1.14x), even at B32-48
      (1.01-1.08x) and lost beyond (0.92-0.93x); hidden 320 was even (0.93-1.05x); hidden 256 lost from batch 8
      (0.74-0.97x), as before; hidden 512 kept the two threads' rule (B16-48 1.02-1.29x, B64-96 0.95-0.98x).
      Training at one thread (2026-12-07, `--threads 1 --backend cpp`, 76 shapes, most twice;
      `-bfloat16-training-one-thread-*.json`), unlike at two: hidden <= 128 from batch 24 lost (batch 24-256,
      hidden 32-128, 50-100 steps, and 20 steps from batch 128: 0.74-0.98x; bidirectional B32-H128 0.91x, 2-layer
      bidirectional H64 at B64-96 0.90-0.92x, at B32 1.02x), B24-32 at 20 steps tied or won (0.95-1.09x), batch
      8-16 won or tied (0.96-1.37x); hidden 160-320 lost from batch 64 at 35 steps and more (0.80-0.98x,
      B64-T35-H256 0.96x and 1.02x) but for B64-T35-H256 bidirectional (1.34x, 1.03x), and won or tied below
      batch 64 (B24-48 at hidden 160 0.92-1.08x; hidden 200-320 at batch 16-48 1.06-1.76x). Where the input
      needs no gradient (`--mode training-data`, 10 of the losing shapes once) it lost alike, 0.77-0.98x.
      oneDNN slows down past a size, as on Zen 4: B64-H128 lost at 70 and 90 steps (0.77x) and won from 100
      (1.20-1.25x), B128-T50-H128 and B256-T50-H64 (819,200) won 1.26-1.27x, B64-T60-H200 (768,000) 1.19x,
      B128-T35-H160 (716,800) lost 0.80x. Short calls: one step won (B64-H128 1.05-1.10x), 2-5 steps at batch 64
      from hidden 128 tied or won (0.99-1.30x) but B128-T5-H64 lost (0.87x, 0.94x), 10 steps lost from batch 48
      at hidden <= 128 (0.80-0.93x) and won at B32 (1.05-1.07x); hidden 200-320 at batch 64 tied or won to 20
      steps (1.00-1.13x). So bfloat16 training at one thread on AMX goes native below 768,000 steps x batch x
      hidden at hidden <= 128 from batch 48 (from 2 steps) and from batch 24 beyond 20 steps, and at hidden 129-320
      from batch 64 beyond 20 steps in one direction. With the rule, `--backend auto --backend cpp` on 13 shapes
      twice (`-training-one-thread-auto-run*.json`): where auto went native (8 shapes) 0.96-1.05x against cpp's
      0.69-0.94x, where it kept cpp (5) 1.02-1.27x; training-data, 10 shapes once, auto (native) 0.97-1.04x
      against cpp's 0.69-1.11x (B24-T50-H128 1.11x there, 0.95x before).
    - Other architectures (aarch64: Graviton, Ampere, Apple silicon under Linux): nothing measured. nn.LSTM runs
      float32 through oneDNN's fused LSTM there too (aarch64, torch 2.8: aten::mkldnn_rnn_layer), while cpp runs
      16-byte NEON vectors, so where nn.LSTM stays on oneDNN the call goes native. float64, a projection and
      packed input take nn.LSTM off oneDNN onto ATen's per-step loop on every CPU: cpp, as above (it matched
      nn.LSTM there on aarch64 under qemu: `python -m fastlstm check --backend cpp`, float32 and float64), but for
      the short calls of _few_steps_slower_reason, on every CPU.
    """
    if call.dtype == torch.bfloat16 and call.needs_grad and native.openmp_starves():
        # not speed: torch's bfloat16 products are wrong there (oneDNN's bf16 matmul: NaN), which ATen's path takes;
        # oneDNN's bf16 LSTM trained right on a Zen 4 (not measured elsewhere); cpp's backward multiplies in float32
        return None
    few_steps = _few_steps_slower_reason(call)
    if few_steps is not None:
        return few_steps
    if call.dtype == torch.float64 or not call.onednn:
        return None
    if not _cpu_is_x86() and not (call.proj_size or call.packed):
        return (
            f"{str(call.dtype).removeprefix('torch.')} on this {_cpu_architecture()} CPU: cpp was measured against "
            "oneDNN's fused LSTM on x86-64 CPUs only"
        )
    if call.dtype == torch.float32:
        if _cpu_intel_amx() and _one_thread() and _packed_inference_to_aten(call):
            return (
                "float32 packed inference on Intel with AMX at one thread, beyond batch 32 from hidden 384: nn.LSTM's "
                "ATen loop (MKL's GEMM a step) measured faster"
            )
        if call.proj_size or call.packed or call.batch <= 4:
            return None
        if _cpu_amd_zen3() and not (call.hidden_size >= 640 and call.batch > 8):
            return None
        # Measured at 35-50 steps (benchmarks/results/cpu-intel-xeon-amx-2core.md, "One thread": cpp 0.91-0.96x).
        # At 1-5 steps cpp won (an audit's B24-T1-I276-H117-L2 1.27-1.56x; batch 24-48, hidden 96-240: 1.02-2.20x,
        # at 10 steps 0.96-1.29x; `-float32-one-thread-short-calls.json`).
        one_thread_loss = not call.needs_grad and call.batch > 16 and 64 <= call.hidden_size < 256
        if _cpu_intel_amx() and _one_thread() and one_thread_loss and call.seq_len > 5:
            return (
                "float32 inference on Intel with AMX at one thread, beyond batch 16 at hidden 64-255 and beyond 5 "
                "steps (where at two threads cpp splits the rows): oneDNN measured faster"
            )
        if _cpu_intel_amx() and (call.needs_grad or call.hidden_size < 256 or call.batch <= 7):
            return None
        if _cpu_intel_amx() and (call.hidden_size >= 640 or (call.hidden_size >= 384 and call.batch <= 32)):
            return None
        if not call.needs_grad and _cpu_amd_family() >= 0x1A and call.batch <= 8:
            return None
        if not call.needs_grad and _cpu_amd_family() >= 0x19 and _cpp_splits_rows(call):
            return None
        if call.hidden_size <= 64 and call.batch <= 16:
            return None
        if _short_sequence(call):
            return None
        if call.needs_grad and _cpp_onednn_weight_grads():
            return None
        return (
            "float32 beyond batch 4 (16 at hidden <= 64 or at most 10 steps; any batch for one step; inference on "
            "Zen 4 and 5 where the rows split among threads, on Zen 5 up to batch 8; training where the cpp build "
            "takes its weight gradients through oneDNN; on Zen 3 any batch below hidden 640, up to batch 8 from it; "
            "on Intel with AMX training at any batch, inference below hidden 256, up to batch 7, from hidden 384 up "
            "to batch 32 and from hidden 640 at any batch): oneDNN measured as fast or faster"
        )
    if call.dtype == torch.bfloat16:
        return _cpp_bf16_slower_reason(call)
    if call.dtype == torch.float16:
        units = _cpu_fp16_units()
        if call.needs_grad or call.proj_size or call.packed or units is None:
            return None
        if units != "avx512":
            return f"float16 inference on a CPU with float16 units ({units}): oneDNN runs it natively (not measured)"
        if call.seq_len == 1 and call.batch <= 96:  # single steps were measured to batch 96: their own rule
            if not _float16_step_to_native(call):
                return None
            return (
                "a float16 inference step on a CPU with AVX512-FP16 above hidden 512 beyond batch 1, from hidden 512 "
                "beyond batch 16, or at batch 17-48 from hidden 256 (on one thread: above hidden 512, or above 128 "
                "beyond batch 4): oneDNN measured faster"
            )
        if call.batch <= 64:
            return None
        return "float16 inference beyond batch 64 on a CPU with AVX512-FP16: oneDNN measured as fast or faster"
    return f"no measurement for {call.dtype}"


def _few_steps_slower_reason(call: LayerCall) -> str | None:
    """Short calls where nn.LSTM runs ATen's per-step loop at the dtype's full speed (float64, a projection, float16
    on a CPU that multiplies it natively; oneDNN's fused LSTM takes none of these in training) and a few steps'
    products are all there is, so that cpp's fixed costs per call (its fused backward's; packing w_hh for one step
    beyond 8 rows; in float16 its float32 copies of the weights) outweigh its faster steps. The classes' own
    measurements above were of 35-500 steps; an audit of 360 random shapes found these.
    The Xeon with AMX, one layer, input = hidden, proj = hidden / 2, at 2 threads (one thread where said): a script
    timing nn.LSTM, cpp and fastlstm's native path interleaved in one process, 9 rounds (not kept), and `python -m
    fastlstm bench --backend auto --backend cpp --backend native --repeats 11` (benchmarks/results/cpu-intel-xeon-
    amx-2core-{float32-projection-one-step,float64-one-step-training,float16-few-steps-training}.json). fastlstm's
    native path ran 0.71-1.26x of nn.LSTM's own call on these calls (0.1-300 ms; its Python then cost 15-25 us more a
    call, 3-4 us at inference since the call key read the weights in one pass, which calls of a millisecond and up do
    not see).
    - One step in training, batch 1-64: float64 at hidden 256-512 cpp 0.62-1.06x (13 of 16 shapes at batch 8-64
      below native's 0.71-1.09x), a projection at hidden 256-1024 0.72-0.96x (native 0.81-1.06x), float16 at
      hidden 256-1024 0.16-0.78x (native 0.88-1.18x); at hidden 128 cpp and native were even (0.79-1.09x,
      0.79-0.93x). Two steps won or were even (float64 1.05-1.50x, a projection 0.94-1.32x), three won (1.04x and
      up), but in float16. Packed input won one step everywhere (ATen's packed loop: 1.06-8.04x).
    - float16 training, batch 1-64: up to 5 steps from hidden 512 (to 1024) cpp lost (2-3 steps 0.22-0.94x, 5 steps
      0.68-0.95x; native 0.95-1.26x), and won at hidden 256 from 3 steps (1.15-1.62x); 10 steps were mixed at hidden
      768-1024 (0.86-1.12x, native 0.99-1.08x) and won at 512 (1.05-1.19x); 35 steps won (1.08-1.78x; B64-H1024
      0.98x). `-float16-few-steps-more.json` has 6 of these shapes. Below hidden 512:
      _float16_few_steps_training_to_native.
    - One projected step at inference, beyond 8 rows (below, cpp's single step multiplies the weights as stored),
      float32, 2 threads, once a call of few steps no longer split its rows (csrc/team.h, kRowSplitMinSteps): at
      batch 9-16 cpp won at hidden 192 (1.11-1.17x) and lost at 256-512 (0.74-0.94x, native 0.85-0.95x; B12-H256
      0.94x against native's 0.86x); at batch 17-48 it won or tied at hidden 192-512 (0.92-1.33x, native
      0.89-0.96x); before that change, the split had lost there (0.69-0.99x). One thread (no split): native the
      faster at batch 9-16 from hidden 192 (cpp 0.66-0.90x, native 0.83-0.97x) and at 17-48 from 256 (cpp
      0.79-0.96x, native 0.86-0.98x). float16 at batch 12-24, hidden 256-512: cpp 0.59-0.89x, native 0.91-0.94x.
      bfloat16 and float64 there won (1.03-1.38x) but at one shape each. Batch 1 and hidden 128 won (1.03-1.50x),
      and batch 64 from hidden 512 (1.00-1.10x). fastlstm's step() follows (B16-H256-P128, 50 steps: cpp 0.58x,
      native 0.84-0.86x of nn.LSTM's 1-step calls; `-float32-projection-step-mode.json`).
    Not measured on other CPUs (Zen, aarch64): nn.LSTM runs the same loop there and cpp does the same work per call,
    so the rule holds there too, but for float16, whose loop runs at full speed only with AVX512-FP16."""
    if call.packed or call.batch > 64:
        return None
    if call.dtype in (torch.bfloat16, torch.float16) and native.openmp_starves():
        # not speed: torch's half-precision products are wrong there (NaN), and nn.LSTM's loop takes them
        return None
    # ATen's half-precision GEMMs are oneDNN's, where it is on; off, ATen's own (bfloat16's: 300x slower)
    fp16_native = call.dtype == torch.float16 and _cpu_fp16_units() == "avx512" and call.onednn
    float32_loop = call.dtype == torch.float32 and not call.onednn
    full_speed_loop = call.dtype == torch.float64 or call.proj_size > 0 or fp16_native or float32_loop
    if call.needs_grad:
        if full_speed_loop and call.seq_len == 1 and call.hidden_size >= 256:
            return (
                "one step in training from hidden 256 where nn.LSTM runs its per-step loop at full speed (float64, a "
                "projection, float32 with oneDNN off, float16 on a CPU with AVX512-FP16): its products measured "
                "faster than cpp's fixed costs"
            )
        if fp16_native and _float16_few_steps_training_to_native(call):
            return (
                "float16 training of a few steps with AVX512-FP16 (up to 5 from hidden 512, 2 from 384, and at small "
                "batches 2 from 256 and 3 from 448): nn.LSTM measured faster"
            )
        return None
    if call.seq_len != 1 or not call.proj_size or not 8 < call.batch <= 48:
        return None
    if fp16_native and 256 <= call.hidden_size <= 512:
        return "a float16 projected step at inference at batch 9-48, hidden 256-512: nn.LSTM measured faster"
    if call.dtype != torch.float32:
        return None
    if _one_thread():
        measured = (192 if call.batch <= 16 else 256) <= call.hidden_size <= 512
    else:
        measured = call.batch <= 16 and 256 <= call.hidden_size <= 512
    if measured:
        return (
            "a float32 projected step at inference at batch 9-16, hidden 256-512 (one thread: 192-512, and 256-512 at "
            "batch 17-48): nn.LSTM measured faster"
        )
    return None


def _float16_few_steps_training_to_native(call: LayerCall) -> bool:
    """float16 training of 2-5 steps on AVX512-FP16, batch <= 64 (not packed; one step is the rule above), where
    nn.LSTM's per-step loop multiplies float16 as stored and cpp's fixed costs (float32 copies of the weights, its
    fused backward's) outweigh its faster steps. The Xeon with AMX, `python -m fastlstm bench --dtype float16 --mode
    training --backend auto --backend cpp --backend native --repeats 9`, one layer, input = hidden (and two layers
    from input 8): up to 5 steps lost from hidden 512 (the rule's first measurements, in _few_steps_slower_reason).
    An audit found B3-T2-I3-H509-L2 at 0.46-0.51x (native 0.92-1.04x), and below 512
    (`benchmarks/results/cpu-intel-xeon-amx-2core-float16-few-steps-training-{t1,t1-more,t2}.json`):
    - 2 steps from hidden 384 lost or tied at batch 3-64 (2 threads 0.56-1.01x, one thread batch 3-16 0.55-0.83x;
      native 0.89-1.02x); at hidden 256-320 it lost at batch 3 (0.50-0.83x) and, at one thread, mostly to batch 16
      (0.77-1.01x, native 0.95-1.01x), and won beyond (2 threads, batch 8-64: 1.01-1.16x); at hidden 160-224 it won
      but at one thread at batch 3 (0.78-0.82x).
    - 3 steps at hidden 448 lost at batch 3 (0.54-1.00x) and, at one thread, to batch 16 (0.70-0.88x); won at 2
      threads from batch 8 (1.01-1.06x); at hidden 256-384 it won or was mixed (0.82-1.23x; native 0.93-1.02x).
    - 4-5 steps at hidden 320-448 won or were mixed (0.78-1.37x; 4 steps at hidden 448, one thread: 0.88-1.04x)."""
    small_batch = call.batch <= (16 if _one_thread() else 4)
    if call.hidden_size >= 512:
        return call.seq_len <= 5
    if call.seq_len == 2:
        return call.hidden_size >= 384 or (call.hidden_size >= 256 and small_batch)
    return call.seq_len == 3 and call.hidden_size >= 448 and small_batch


def _float16_step_to_native(call: LayerCall) -> bool:
    """One float16 step at inference on AVX512-FP16, where oneDNN multiplies the float16 weights as stored and cpp
    float32 copies of them beyond 8 rows (twice the bytes a step reads). The Xeon with AMX, 2 threads, cpp's step()
    against nn.LSTM on 1-step sequences, streams of 50-100 steps (`python -m fastlstm bench --dtype float16 --mode
    step`; benchmarks/results/cpu-intel-xeon-amx-2core-float16-step-*.json), two to four runs a shape: hidden 128
    won at batch 1-96 (1.02-2.22x; so beyond batch 64 too, where longer float16 calls go native); hidden 256 at
    batch 1-16 and 64-96 (1.05-2.08x) but not 32-48 (0.92-0.99x); hidden 384-512 up to batch 16 (0.86-1.34x, all
    but one run 0.93x and up), hidden 512 beyond it lost (0.81-0.94x; 384 there is taken as 256 and 512 were);
    hidden 768-1024 beyond batch 1 lost or was mixed (0.45-1.21x; batch 1 0.89-1.09x). Ten steps a call won every
    shape up to batch 64 (hidden 256-1024, once, `-float16-t10.json`: 1.05-2.72x), so only a single step changes.
    One thread (`--threads 1`, two runs, `-float16-step-one-thread-run*.json`), where cpp's products lose the second
    thread's share of the weights: hidden 128 won to batch 64 (1.04-2.07x; 0.98-1.00x at 96); hidden 256-512 at
    batch 1-4 (0.99-1.38x), at 384 to batch 8 (1.04x), but lost from batch 8 at 256 and 512 (0.66-0.99x) and from
    16 at 384 (0.89-0.96x); hidden 768 lost at every batch (0.63-0.98x)."""
    if _one_thread():
        return call.hidden_size > 512 or (call.hidden_size > 128 and call.batch > 4)
    if call.hidden_size > 512:
        return call.batch > 1
    if call.hidden_size >= 512:
        return call.batch > 16
    return call.hidden_size >= 256 and 16 < call.batch <= 48


def _packed_inference_to_aten(call: LayerCall) -> bool:
    """float32 packed input at inference, no projection, on Intel with AMX at one thread: nn.LSTM leaves oneDNN for
    ATen's loop, whose step is one MKL GEMM. `python -m fastlstm bench --dtype float32 --mode both --threads 1
    --backend cpp` (T = 20, one layer, `cpu-intel-xeon-amx-2core-float32-packed-one-thread.json`, and once more
    without a file): cpp lost inference from batch 48 at hidden 384-768 (0.91-0.99x; 2 layers bidirectional
    B64-H512 0.92x), won at batch 16-32 (hidden 512: 1.10-1.18x) and was even at B64-H256 (1.01x); training won
    every shape (1.08-1.22x)."""
    return call.packed and not call.needs_grad and not call.proj_size and call.batch > 32 and call.hidden_size >= 384


def _short_sequence(call: LayerCall) -> bool:
    """One step at any batch, or up to 10 steps at batch <= 16: where cpp beat oneDNN in float32 and in bfloat16
    (bf16 dot products) on `--grid cpu-short` (figures in _cpp_slower_reason)."""
    return call.seq_len == 1 or (call.seq_len <= 10 and call.batch <= 16)


def _cpp_bf16_slower_reason(call: LayerCall) -> str | None:
    """The bfloat16 part of _cpp_slower_reason (the measurements are listed there)."""
    kind = _cpu_bf16_kind()
    if kind is None:
        return None
    if kind == "amx" and _cpp_amx():
        return _cpp_amx_slower_reason(call)
    if kind != "avx512_bf16":
        return f"bfloat16 on a CPU with native bf16 ({kind}): not measured against oneDNN there"
    if not _cpp_bf16_dot():
        small_hidden = call.hidden_size <= 64 and call.proj_size == 0
        if (call.batch <= 2 and call.needs_grad) or (small_hidden and call.batch <= 8):
            return None
        return "bfloat16 in float32 math (this cpp build) on a CPU with bf16 instructions: oneDNN measured faster"
    if call.proj_size or call.packed:
        return None
    if _short_sequence(call):
        return None
    zen5 = _cpu_amd_family() >= 0x1A
    if call.needs_grad:
        if not zen5 and _one_thread() and _zen4_one_thread_training_loss(call):
            return (
                "bfloat16 training of one direction on Zen 4 at one thread, the input needing its gradient, from "
                f"batch 24 at hidden 64-320 below {_ZEN4_ONEDNN_TRAINING_SLOWS:,} steps x batch x hidden: oneDNN "
                "measured faster"
            )
        if call.batch <= 16 or not zen5:
            return None
        if call.hidden_size >= 640 or (call.batch <= 32 and not 256 < call.hidden_size < 512):
            return None
        return (
            "bfloat16 training on Zen 5 beyond batch 16, but for batch <= 32 at hidden <= 256 or >= 512 and "
            "hidden >= 640 at any batch: oneDNN measured as fast or faster"
        )
    if _one_thread() and not zen5 and call.batch >= 8 and call.hidden_size <= 256:
        return "bfloat16 inference on Zen 4 at one thread from batch 8 at hidden <= 256: oneDNN measured faster"
    if call.batch * call.hidden_size <= 1024 or (call.batch <= 16 and call.hidden_size <= 256):
        return None
    if zen5 and call.batch <= 8:
        return None
    zen4_small_hidden = (call.batch <= 32 and call.hidden_size <= 160) or (call.batch <= 96 and call.hidden_size <= 64)
    if not zen5 and zen4_small_hidden:
        return None
    return (
        "bfloat16 inference beyond batch x hidden 1024, but for batch <= 16 at hidden <= 256 (on Zen 5 also up "
        "to batch 8; on Zen 4 up to batch 32 at hidden <= 160 and 96 at hidden <= 64): oneDNN measured as fast or "
        "faster"
    )


# Steps x batch x hidden from which oneDNN's bfloat16 training at one thread on Zen 4 slowed down past cpp's: its
# time, not cpp's, jumps there (B64-H128: 2.7x from 50 steps to 100, cpp's 1.85x; 90 steps lost, 100 won).
_ZEN4_ONEDNN_TRAINING_SLOWS = 768 * 1024


def _zen4_one_thread_training_loss(call: LayerCall) -> bool:
    """Where bfloat16 training at one thread on Zen 4 lost to oneDNN (measured in _cpp_slower_reason): a
    unidirectional module whose input needs its gradient, from batch 24 at hidden 64-320, below
    _ZEN4_ONEDNN_TRAINING_SLOWS. Every layer of such a stack goes native alike: a stack with its first layer on cpp
    (an input that needs no gradient) and the rest native lost to cpp throughout."""
    if not call.input_grad or call.bidirectional or call.batch < 24 or not 64 <= call.hidden_size <= 320:
        return False
    return call.seq_len * call.batch * call.hidden_size < _ZEN4_ONEDNN_TRAINING_SLOWS


# Steps x batch x hidden from which oneDNN's bfloat16 training at one thread on the Xeon with AMX ran slower than
# cpp's (B64-H128: 90 steps lost, 100 won; B64-T60-H200, 768,000, won 1.19x): as on Zen 4, oneDNN's time jumps there.
_AMX_ONEDNN_TRAINING_SLOWS = 768_000


def _amx_one_thread_training_loss(call: LayerCall) -> bool:
    """Where bfloat16 training at one thread on Intel with AMX lost to oneDNN (measured in _cpp_slower_reason),
    below _AMX_ONEDNN_TRAINING_SLOWS: hidden <= 128 from batch 48 (from 2 steps) and from batch 24 (beyond 20
    steps); hidden 129-320 from batch 64 beyond 20 steps, in one direction. Whether or not the input needs its
    gradient (it lost both ways, unlike on Zen 4), so every layer of a stack alike."""
    if call.seq_len * call.batch * call.hidden_size >= _AMX_ONEDNN_TRAINING_SLOWS:
        return False
    if call.hidden_size <= 128:
        return (call.batch >= 48 and call.seq_len >= 2) or (call.batch >= 24 and call.seq_len > 20)
    return call.hidden_size <= 320 and call.batch >= 64 and call.seq_len > 20 and not call.bidirectional


def _cpp_amx_slower_reason(call: LayerCall) -> str | None:
    """bfloat16 where both cpp and oneDNN multiply on AMX tiles (the measurements are listed in _cpp_slower_reason)."""
    if call.proj_size or call.packed:
        return None
    if call.needs_grad and _one_thread() and _amx_one_thread_training_loss(call):
        return (
            "bfloat16 training on AMX at one thread, at hidden <= 128 from batch 48 (batch 24 beyond 20 steps) and "
            "at hidden 129-320 from batch 64 beyond 20 steps (one direction), below "
            f"{_AMX_ONEDNN_TRAINING_SLOWS:,} steps x batch x hidden: oneDNN measured faster"
        )
    if call.needs_grad or (call.seq_len <= 10 and call.batch <= 64):
        return None
    if _one_thread() and call.batch >= 8 and call.hidden_size <= 256:
        return "bfloat16 inference on AMX at one thread from batch 8 at hidden <= 256: oneDNN measured faster"
    if _one_thread() and 384 <= call.hidden_size < 512 and call.batch <= 24:
        return None
    if (
        call.batch <= 8
        or (call.batch <= 96 and call.hidden_size <= 256)
        or (call.batch <= 48 and call.hidden_size >= 512)
    ):
        return None
    return (
        "bfloat16 inference on AMX beyond batch 8 at hidden 257-511 (at one thread: 257-383, and beyond batch 24 at "
        "384-511), beyond batch 48 from hidden 512 and beyond batch 96 at hidden <= 256: oneDNN measured as fast or "
        "faster"
    )


def _faster_than_native(name: str, call: LayerCall) -> str | None:
    """Why the measured rule prefers native over `name` for this call, or None when `name` wins.

    The rules come from the benchmark grid (benchmarks/, `python -m fastlstm bench`), not guesses.
    """
    if call.batch == 0:
        return "empty batch: nothing to compute"
    if name == "cpp":
        return _cpp_slower_reason(call)
    if name == "triton":
        return _triton_slower_reason(call, measured_cuda.MEASURED, _cuda_capability(call.device_index))
    return "no measured speed rule for this backend yet"


# A call takes triton where every nearest measured shape ran at least this much faster than cuDNN: run-to-run noise
# on a shared GPU is a few percent, and the floor is 0.95x wherever auto picks triton.
CUDA_MARGIN = 1.05
# How far (a factor, in each of batch, hidden size and length) a call may be from the shapes its rule reads: the
# grid's batches are 1, 16, 64 and 256, its lengths 100 and 1000.
CUDA_REACH = 4.0
_CUDA_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@backends.cached_constant
def _cuda_capability(index: int | None) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}"


def _triton_slower_reason(call: LayerCall, measured, capability: str) -> str | None:
    """The measured CUDA rule: triton where the grid's nearest shapes (benchmarks/gpu_grid.py, the figures in
    fastlstm/measured_cuda.py) all ran CUDA_MARGIN faster than cuDNN, on a GPU of this compute capability, in this
    mode and dtype; native elsewhere, and wherever nothing was measured within CUDA_REACH of the call in each of
    batch, hidden size and length. Nearest: the least of the largest factor between the call and a row's batch,
    hidden size and length (rows of 1 and 2 layers alike; each layer is one call). The grid measures neither a
    projection nor packed input: those stay native."""
    if call.proj_size:
        return "a projection: no CUDA speed measured for one"
    if call.packed:
        return "packed input: no CUDA speed measured for it"
    mode = "training" if call.needs_grad else "inference"
    dtype = _CUDA_DTYPES.get(call.dtype, str(call.dtype))
    rows = [r for r in measured if r[0] == capability and r[1] == mode and r[2] == dtype]
    if not rows:
        return f"no CUDA speed measured for {dtype} {mode} on a GPU of compute capability {capability}"
    if torch.compiler.is_compiling():
        # Dynamo shows a dynamic size as an int (to isinstance and type() alike), so here it cannot be told from a
        # static one; comparing it would guard the program on it (a recompile, or torch.export refusing a dynamic
        # batch), and the rule's min(key=) broke fullgraph=True. Compiled calls keep cuDNN.
        return "torch.compile: the CUDA rule reads sizes, which would guard the compiled program"
    size = (call.batch, call.hidden_size, call.seq_len)
    if not all(type(v) is int for v in size):
        # Symbolic sizes outside dynamo (torch.export's non-strict trace, FakeTensorMode): the same
        return "a size the trace keeps dynamic: the CUDA rule reads sizes"

    def factor(row) -> float:
        return max(max(a, b) / min(a, b) for a, b in zip(size, row[4:7]))

    nearest = min(factor(r) for r in rows)
    if nearest > CUDA_REACH:
        return f"no CUDA speed measured within {CUDA_REACH:g}x of batch {size[0]}, hidden {size[1]}, length {size[2]}"
    closest = [r for r in rows if factor(r) == nearest]
    slowest = min(closest, key=lambda r: r[7])
    if slowest[7] >= CUDA_MARGIN:
        return None
    layers, batch, hidden, seq, speedup = slowest[3:8]
    return (
        f"measured {speedup:.3f}x of cuDNN at the nearest {dtype} {mode} shape "
        f"(batch {batch}, hidden {hidden}, length {seq}, {layers} layer{'s' if layers > 1 else ''})"
    )


@backends.constant_under_compile  # warnings.warn cannot be traced; a compiled model's first call warns eagerly
def _warn_once(name: str, reason: str, key: str | None = None) -> None:
    key = key or name
    if key in _warned:
        return
    _warned.add(key)
    message = (
        f"fastlstm: the {name} backend is unavailable, using nn.LSTM's own kernels instead (the reference loop for "
        f"calls they cannot serve; fastlstm.explain says which): {reason}"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=backends.outside_stacklevel())
    _log.info(message)


def in_onnx_export() -> bool:
    """torch.onnx.is_in_onnx_export(), without importing torch.onnx (~30 ms on a process's first call) when
    nothing has: then no export can be running."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def choose(name: str, call: LayerCall) -> Choice:
    """The backend that serves one (layer, direction) when `name` is requested."""
    if in_onnx_export():
        # ONNX has no counterpart for fastlstm's custom ops; the native LSTM exports as ONNX's own LSTM.
        return Choice("native", "ONNX export: only the native path can be exported")
    if torch.jit.is_tracing():
        # A traced graph is a TorchScript program, often saved to run where fastlstm is not installed (C++
        # libtorch): aten::lstm runs there, fastlstm's custom ops would not.
        return Choice("native", "TorchScript tracing: the graph records aten::lstm, which runs without fastlstm")
    where = f"layer {call.layer} ({'reverse' if call.reverse else 'forward'})"
    if call.mixed_dtypes:
        reason = (
            "the module's weights, or its c0 and input, do not all share one dtype: only nn.LSTM's own path "
            "decides what that gives"
        )
        return _own_call(name, where, reason)
    if name != AUTO:
        reason = cannot_serve(name, call)
        if reason is not None:
            raise BackendUnavailableError(f"fastlstm backend {name!r} cannot serve {where}: {reason}")
        crash = None if torch.compiler.is_compiling() else backends.get(name).crash_reason(call)
        if crash is not None:
            raise BuildCrashError(f"fastlstm backend {name!r} cannot serve {where}: {crash}")
        return Choice(name, "forced")
    native_fails = _native_cannot_run(call)
    fast = _fast_backend_for(call.device_type)
    if fast is None:
        return _fallback(native_fails, f"no fast backend for device type {call.device_type!r}")
    if call.grad_of_grad:
        # A fast backward is not differentiable: cpp's would recompute the layer in plain ops, as the reference does
        return _fallback(native_fails, "a transform's gradients through it are differentiated again")
    if call.functionalized:
        return _fallback(native_fails, FUNCTIONALIZED)
    # The speed rule first: it is cheap, and where native wins anyway there is no reason to build or load
    # the fast backend (a first build compiles C++) nor to warn that it is missing.
    compiling = _native_fails_to_compile(call)
    # Compiled CPU calls go to cpp whatever the rule says, and asking it would guard the graph on the sizes it
    # reads (torch.export with a dynamic batch failed: "Not all values of b ... satisfy the generated guard").
    slower = None if compiling else _faster_than_native(fast, call)
    if slower is not None and native_fails is None:
        return Choice("native", f"{fast} not measured faster here: {slower}")
    backend = backends.get(fast)
    missing = backend.unavailable_reason()
    if missing is not None:
        _warn_once(fast, missing)
        return _fallback(native_fails, f"{fast} unavailable: {missing}")
    unsupported = backend.unsupported_reason(call)
    if unsupported is not None:
        return _fallback(native_fails, f"{fast} does not support this call: {unsupported}")
    # Kernels built at run time (triton's) can fail to compile on a GPU they were never tried on: find out
    # on a tiny input now, not in the user's call. Not while tracing: the plan is then part of a graph.
    failed = None if torch.compiler.is_compiling() else backend.self_test(call)
    if failed is not None:
        _warn_once(fast, f"its kernels failed a self-test on this device: {failed}", key=f"{fast} self-test")
        return _fallback(native_fails, f"{fast} failed its self-test here: {failed}")
    if native_fails is not None and slower is not None:
        return Choice(fast, f"native cannot serve it: {native_fails} ({fast} not measured faster: {slower})")
    if compiling:
        return Choice(fast, "torch.compile: nn.LSTM's CPU path does not compile (the speed rule is not asked)")
    if not call.onednn:
        return Choice(fast, "measured faster than native for this shape (oneDNN off: nn.LSTM runs ATen's loop)")
    return Choice(fast, "measured faster than native for this shape")


def _native_fails_to_compile(call: LayerCall) -> bool:
    """Whether torch.compile is tracing a CPU call. nn.LSTM's CPU path then breaks the graph's backward (torch 2.13,
    a model whose calls auto gave to native: inductor "expected Tensor() for op: aten.mkldnn_rnn_layer", aot_eager
    an AssertionError in save_from_forward), so such calls go to cpp whatever the speed rule says: an opaque custom
    op that compiles. Eager calls of the same model keep the rule."""
    return call.device_type == "cpu" and torch.compiler.is_compiling()


def _native_cannot_run(call: LayerCall) -> str | None:
    """Why nn.LSTM's own kernels fail under the transform around this call (see LSTM._transforms), or give wrong
    numbers for it (_onednn_bf16_grads_wrong), or None.

    Under torch.vmap aten::lstm has no batching rule (torch 2.13: "Batching rule not implemented for
    aten::lstm.input", every dtype on the CPU). oneDNN's fused LSTM (float32 on the CPU) has no forward-mode
    derivative, nor has cuDNN's; ATen's per-step loop has one, and nn.LSTM takes it on the CPU for float64 and
    for a projection (which oneDNN's LSTM does not take). Packed input fails under torch.func's jvp (torch 2.13:
    "Cannot access data pointer of Tensor that doesn't have storage"; torch.autograd.forward_ad runs it on ATen's
    loop, but the call does not tell the two apart: the reference loop serves both), and elsewhere which path
    nn.LSTM takes is its own business, so every other forward-mode call counts. Packed input fails under torch.func's
    grad, vjp and jacrev too, float32 and float64, whatever needs the gradient (the same error, torch 2.13): auto had
    sent such calls whose gradients are differentiated again (MAML's inner step, jacrev(jacrev(f))) there. A
    compiled CPU training call on oneDNN's LSTM fails to compile its backward (native.compiled_backward_fails).
    """
    if call.vmapped:
        return "torch.vmap: nn.LSTM's kernels have no batching rule"
    atens_loop = call.device_type == "cpu" and not call.packed and (call.dtype == torch.float64 or call.proj_size)
    if call.forward_ad and not atens_loop:
        return "forward-mode AD: nn.LSTM's kernels have no forward-mode derivative here (oneDNN's, cuDNN's, packed)"
    if call.packed and call.func_grad:
        return "torch.func with packed input: nn.LSTM's packed kernels read the data of the transform's tensors"
    if native.compiled_backward_fails(call.device_type, call.dtype, call.needs_grad, call.packed, bool(call.proj_size)):
        return native.COMPILED_BACKWARD_FAILS
    if _onednn_bf16_grads_wrong(call):
        return (
            "nn.LSTM's oneDNN bfloat16 backward gives wrong gradients on this CPU (AMX) at hidden >= 1024 in "
            "multiples of 32"
        )
    return None


def _onednn_bf16_grads_wrong(call: LayerCall) -> bool:
    """Whether nn.LSTM's bfloat16 training of this call runs oneDNN's LSTM where its gradients are wrong: on an Intel
    CPU with AMX (a Sapphire Rapids Xeon; torch 2.11 and 2.13, 1 and 2 threads), at hidden 1024 and beyond in
    multiples of 32, dx and every weight's gradient are off by 0.3-1.2 of their largest value against float64, at
    any batch and length, stacked or bidirectional, in a bfloat16 model and under CPU bfloat16 autocast alike;
    hidden 1000, 1023, 1025, 1040 and 1048, and every hidden below 1024 measured, err by 3e-3 to 1e-2 as cpp does
    (`python benchmarks/onednn_bf16_grads.py`). Its forward is right; projections run ATen's loop, which is right
    too. Packed input counts: nn.LSTM runs a pack whose sequences all have one length (every pack of one sequence)
    on oneDNN's LSTM, with the same wrong gradients (torch 2.13; ragged packs run ATen's loop, right), and the
    call does not tell the two apart. On a Zen 4 (AVX512-BF16, no AMX; torch 2.13) they are right at hidden
    768-2048 (4.5e-3 to 6.5e-3); Zen 5 and Cooper Lake were not measured."""
    return (
        call.needs_grad
        and call.device_type == "cpu"
        and call.dtype == torch.bfloat16
        and not call.proj_size
        and call.hidden_size >= 1024
        and call.hidden_size % 32 == 0
        and _cpu_bf16_kind() == "amx"
    )


def _fallback(native_fails: str | None, reason: str) -> Choice:
    """native, for a call auto does not give to the fast backend; the reference step loop where nn.LSTM's kernels
    cannot run the call or give wrong numbers for it (native_fails: _native_cannot_run's answer): it is plain
    PyTorch ops, which have batching rules and forward-mode derivatives."""
    if native_fails is None:
        return Choice("native", reason)
    return Choice("reference", f"{reason}; native cannot serve it: {native_fails}")


def _own_call(name: str, where: str, reason: str) -> Choice:
    """native for a call (or `where` of it) whose outcome only nn.LSTM's own call decides (`reason`), when `name` is
    requested: another forced backend cannot serve it."""
    if name not in (AUTO, "native"):
        raise BackendUnavailableError(f"fastlstm backend {name!r} cannot serve {where}: {reason}")
    return Choice("native", reason)


def own_call_only(name: str, count: int, reason: str) -> tuple[Choice, ...]:
    """_own_call for each of `count` (layer, direction)s: the whole call is nn.LSTM's."""
    return (_own_call(name, "this call", reason),) * count


def plan(module_backend: str | None, calls: list[LayerCall]) -> list[Choice]:
    """One Choice per entry of `calls` (ordered layer-major, forward direction before reverse)."""
    name = requested(module_backend)
    return [choose(name, call) for call in calls]


def native_step_in_cells(dtype: torch.dtype) -> bool:
    """Whether a step the native path serves (every layer native) runs ATen's cells rather than nn.LSTM's own call.

    float32 and float64: the cells, to float rounding of nn.LSTM's numbers: on the CPU nn.LSTM's own call costs far
    more for one step at small batches (oneDNN reorders every weight on each call; float32 B8-H256, 2 layers: 241 us
    against 517). Below float32, nn.LSTM's own call: the cells round every gate to the dtype, 2.5-3x nn.LSTM's error
    against float64 (bfloat16 and float16, batch 8-256, hidden 128-512), and oneDNN was as fast or faster from batch
    128, where auto sends such steps native."""
    return dtype in (torch.float32, torch.float64)
