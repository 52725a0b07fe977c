"""python -m fastlstm info | build | check | bench"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

import fastlstm
from fastlstm import backends, dispatch
from fastlstm.backends import BuildCrashError, cpu, native
from fastlstm.benchmark import (
    CPU_FULL_GRID,
    CPU_SHORT_GRID,
    DEFAULT_GRID,
    NN_LSTM_ONEDNN_OFF,
    Shape,
    geometric_mean,
    time_shape,
)
from fastlstm.check import CHECK_CASES, DROPOUT_ON_CUDA, TOLERANCE, compare, exact_cudnn, random_cases
from fastlstm.dispatch import BackendUnavailableError, cpuinfo_fields

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAST_BACKEND = {"cpu": "cpp", "cuda": "triton"}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them: a virtual machine
    may name two generations alike ("AMD EPYC" for Zen 4 and Zen 5), whose kernel choices differ."""
    fields = cpuinfo_fields() or {}
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


_ISA_VARIABLES = (
    "FASTLSTM_CXXFLAGS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
    "FASTLSTM_BF16_DOT",
    "FASTLSTM_AMX",
)


def machine_header(device: str) -> dict[str, str]:
    """What a result depends on: device, library versions, threads."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as error:  # any import failure just means "not there"
        triton_version = f"unavailable ({type(error).__name__})"
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastlstm": fastlstm.__version__,
        "threads": str(torch.get_num_threads()),
    }
    quota = cgroup_cpu_quota()
    if quota is not None:
        info["cpu quota"] = _cpus(quota)
    if device == "cpu":
        info["aten isa"] = torch.backends.cpu.get_cpu_capability()
        if not native.onednn_lstm_available():
            info["onednn"] = "off (nn.LSTM runs ATen's per-step loop)"
    # Variables that change which instructions run (how a run here stands in for an older CPU, say).
    knobs = [f"{name}={os.environ[name]}" for name in _ISA_VARIABLES if os.environ.get(name)]
    if knobs:
        info["isa env"] = " ".join(knobs)
    # The C++ backend's tuning knobs (fastlstm/backends/cpu.py), which A/B runs set.
    tuning = sorted(
        f"{name}={value}"
        for name, value in os.environ.items()
        if name.startswith("FASTLSTM_") and name not in _ISA_VARIABLES and name != "FASTLSTM_CACHE_DIR" and value
    )
    if tuning:
        info["knobs"] = " ".join(tuning)
    return info


def cmd_info(args) -> int:
    """What this machine has and what fastlstm makes of it; exit 1 where a setting would make calls fail."""
    for key, value in machine_header(_default_device()).items():
        print(f"{key:>9}: {value}")
    print(f"{'cuda':>9}: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    errors = []
    try:
        default = dispatch.requested(None)
    except ValueError as error:  # every model built without backend= raises it on its first call
        default = "none"
        errors.append(str(error))
    print(f"default backend: {default}")
    print("backends:")
    available = fastlstm.available_backends()
    for name, reason in available.items():
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"cpp build: {cpu.build_flags()}")
    if "cpp" in available and available["cpp"] is None:
        print(f"cpp kernels: {cpu.kernel_choices()}")
    if "triton" in available and available["triton"] is None:
        from fastlstm.backends.triton import build_guard, ops

        errors += ops.setting_errors()
        print(f"triton kernels: {ops.kernel_choices()}")
        print(f"triton builds: {build_guard.describe()}")
        print(f"cuda speed rule: {_measured_cuda()}")
    for error in errors:
        print(f"{_prog()} info: error: {error}", file=sys.stderr)
    return 1 if errors else 0


def _measured_cuda() -> str:
    """What `auto` reads to choose between triton and cuDNN (dispatch._triton_slower_reason)."""
    from fastlstm import measured_cuda

    capabilities = sorted({row[0] for row in measured_cuda.MEASURED})
    if not capabilities:
        return "no grid measured: auto keeps CUDA calls on cuDNN"
    shapes = len(measured_cuda.MEASURED)
    return f"{shapes} measured shapes, compute capability {', '.join(capabilities)} ({measured_cuda.SOURCE})"


def cmd_build(args) -> int:
    cpu = backends.get("cpp")
    reason = cpu.unavailable_reason()
    if reason is not None:
        print(f"C++ backend build failed: {reason}", file=sys.stderr)
        return 1
    print("C++ backend built and loaded")
    return 0


def _excess(error: float, allowed: float) -> float:
    """error / allowed, NaN as infinity (a comparison with NaN is false, so max() would pass over it)."""
    ratio = error / allowed
    return math.inf if math.isnan(ratio) else ratio


def cmd_check(args) -> int:
    device = args.device or _default_device()
    failures = checked = 0
    skipped, missing = [], []
    requested = list(dict.fromkeys(args.backend or []))  # a name given twice is checked once
    what = ", ".join(requested) if requested else "every available backend"
    cases = CHECK_CASES + random_cases(args.random, args.seed)
    dropout_off = device != "cpu" and any(case.dropout for case in cases)
    if dropout_off:
        cases = [replace(case, dropout=0.0) for case in cases]
    # float64 checks the math tightly; float32 is what models run (other kernels on the CPU)
    dtypes = [DTYPES[name] for name in dict.fromkeys(args.dtype)] if args.dtype else [torch.float64, torch.float32]
    extra = f", and {args.random} random configurations of seed {args.seed}" if args.random else ""
    in_dtypes = " and ".join(str(dtype)[6:] for dtype in dtypes)
    print(
        f"fastlstm check on {device} in {in_dtypes}: {what} against nn.LSTM, forward and backward, and without "
        f"gradients{extra}"
    )
    if dropout_off:
        print(f"dropout between layers is checked on the CPU only ({DROPOUT_ON_CUDA}): here its cases run without it")
    for name in requested or backends.names():
        reason = backends.get(name).unavailable_reason()
        if reason is not None and name in requested:  # asked for by name: its absence is the failure
            print(f"{name:<10} UNAVAILABLE: {reason}")
            missing.append(name)
            continue
        if reason is not None:
            print(f"{name:<10} skipped: {reason}")
            skipped.append(name)
            continue
        served_in = dict.fromkeys(dtypes, 0)
        for case in cases:
            for dtype in dtypes:
                label = f"{name:<10} {case!s:<45} {str(dtype)[6:]:<8}"
                try:
                    errors = compare(case, name, device, dtype)
                except BuildCrashError as error:  # the backend serves the call, but its compiler crashes on it
                    served_in[dtype], failures = served_in[dtype] + 1, failures + 1
                    print(f"{label} CRASH {error}")
                    continue
                except BackendUnavailableError as error:
                    print(f"{label} skipped: {error}")
                    continue
                except Exception as error:  # a kernel that raises is a failure to report, and the others go on
                    served_in[dtype], failures = served_in[dtype] + 1, failures + 1
                    print(f"{label} ERROR {type(error).__name__}: {error}")
                    continue
                served_in[dtype] += 1
                worst_key = max(errors, key=lambda key: _excess(*errors[key]))
                worst, tolerance = errors[worst_key]
                ok = worst <= tolerance
                failures += not ok
                status = "ok" if ok else "MISMATCH"
                if ok and tolerance >= 1:  # a result the dtype does not resolve (it underflows, or cancels)
                    status += " (nn.LSTM's own error in this dtype is 50%+ here: the dtype cannot resolve it)"
                print(f"{label} max err {worst:.2e} ({worst_key}) tol {tolerance:.0e} {status}", flush=True)
        served = sum(served_in.values())
        checked += served
        if not served and name in requested:  # asked for by name, and it served none of the calls: nothing checked
            print(f"{name:<10} UNAVAILABLE: it serves none of these calls (see above)")
            missing.append(name)
        elif name in requested and args.dtype:  # a dtype asked for, in which it served none: that dtype unchecked
            for dtype in (dtype for dtype, count in served_in.items() if not count):
                print(f"{name:<10} UNAVAILABLE in {str(dtype)[6:]}: it serves none of these calls in it (see above)")
                missing.append(f"{name} in {str(dtype)[6:]}")
    if not checked and not failures and not missing:
        print("nothing checked: no backend served any of these calls (see above)")
        return 1
    if failures:
        print(f"{failures} mismatches or errors")
    if missing:
        print(f"not available, though asked for: {', '.join(missing)} (see above)")
    if not failures and not missing:
        unchecked = f"; not checked: {', '.join(skipped)} (unavailable, see above)" if skipped else ""
        print(f"all checked backends match nn.LSTM{unchecked}")
    return 1 if failures or missing else 0


def _bench_backends(device: str, requested: list[str] | None) -> list[str]:
    if requested:
        return requested
    chosen = ["auto"]
    fast = FAST_BACKEND.get(device)
    if fast and backends.get(fast).unavailable_reason() is None:
        chosen.append(fast)
    return chosen


def _validate(
    shape: Shape, names: list[str], modes: list[str], device: str, dtype: torch.dtype, autocast=None
) -> dict[str, bool]:
    """Every provider against nn.LSTM on the benchmark shape itself, in each mode to be timed: inference's outputs,
    training's outputs and every gradient, the streamed steps' outputs and state (under autocast: both in autocast's
    dtype, and results of the same dtypes). Returns, for each mode, whether nn.LSTM ran with oneDNN off
    (nn_lstm_region)."""
    from fastlstm.benchmark import autocast_region, make_models, nn_lstm_region, validation_results

    device_type = torch.device(device).type
    # float32 at check's tolerance (cpp against nn.LSTM on the cpu-full grid: 3e-6 at most, 2-core Xeon; 1e-3 had
    # let a cell off by 5e-4 be timed; triton against exact cuDNN not yet measured on a GPU); half precision rounds
    # on both sides here, against float64 in check
    tolerance = {torch.float64: 1e-8, torch.float32: TOLERANCE[torch.float32]}.get(autocast or dtype, 5e-2)
    half = (autocast or dtype) not in (torch.float64, torch.float32)
    onednn_off = {}
    for mode in modes:
        models = make_models(shape, names, device, dtype)  # fresh gradients
        x = torch.randn(shape.seq_len, shape.batch, shape.input_size, device=device, dtype=dtype)
        region = autocast_region(device_type, autocast)
        with exact_cudnn():
            reference = models.pop("nn.LSTM")
            native_region, onednn_off[mode], expected = nn_lstm_region(reference, x, mode, shape, region)
            if expected is None:  # no probe ran, or it found oneDNN cannot
                expected = validation_results(reference, x, mode, shape, native_region)
            results = {name: validation_results(m, x, mode, shape, region) for name, m in models.items()}
        gold = None
        for name, got in results.items():
            for label, want in expected.items():
                a = got[label]
                if (a is None) != (want is None):
                    which = f"{name} has no {label}" if a is None else f"nn.LSTM has no {label}, {name} has one"
                    raise SystemExit(f"{which}, on {shape} {mode}")
                if want is None:
                    continue
                if a.dtype != want.dtype:
                    raise SystemExit(f"{name} gives {label} in {a.dtype}, nn.LSTM in {want.dtype}, on {shape} {mode}")
                err = (a.double() - want.double()).abs().max().item()
                if err <= tolerance * max(1.0, want.double().abs().max().item()):
                    continue
                detail = f"{label}: max error {err:.2e}"
                if half:  # either may be the one off (nn.LSTM's ATen loop sums a bias gradient in bfloat16)
                    gold = gold or _float64_results(reference, x, mode, shape)
                    own, theirs = ((t.double() - gold[label]).abs().max().item() for t in (a, want))
                    if own <= theirs:
                        continue
                    detail += f"; against float64 {own:.2e}, nn.LSTM's {theirs:.2e}"
                raise SystemExit(f"{name} disagrees with nn.LSTM on {shape} {mode} ({detail})")
    return onednn_off


def _float64_results(reference: torch.nn.Module, x: torch.Tensor, mode: str, shape: Shape) -> dict:
    """A mode's results in float64 on nn.LSTM's weights and input as the benchmark's dtype rounds them: the arbiter
    where a half-precision provider and nn.LSTM disagree (a provider passes if it errs no more than nn.LSTM)."""
    from fastlstm.benchmark import validation_results

    gold = copy.deepcopy(reference).double()
    gold.zero_grad(set_to_none=True)
    results = validation_results(gold, x.double(), mode, shape, contextlib.nullcontext)
    return {label: t.double() for label, t in results.items() if t is not None}


def _shape_argument(text: str) -> Shape:
    try:
        shape = Shape.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    sizes = (shape.batch, shape.seq_len, shape.input_size, shape.hidden_size, shape.num_layers)
    if max(sizes) > 2**31 - 1:  # torch's sizes are int64, its products of them too: a size this big cannot run
        raise argparse.ArgumentTypeError(f"shape {text!r}: a size over 2**31 - 1")
    return shape


def cmd_bench(args) -> int:
    if not args.no_onednn:
        return _bench(args)
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # the header says so
    try:
        return _bench(args)
    finally:  # as it was, for a caller in the same process
        torch.backends.mkldnn.enabled = enabled


def _bench(args) -> int:
    device = args.device or _default_device()
    dtype = DTYPES[args.dtype]
    autocast = DTYPES[args.autocast] if args.autocast else None
    if args.shape:
        shapes = args.shape
    elif args.grid == "cpu-full":
        shapes = CPU_FULL_GRID
    elif args.grid == "cpu-short":
        shapes = CPU_SHORT_GRID
    else:
        shapes = DEFAULT_GRID.get(device, DEFAULT_GRID["cpu"])
    names = _bench_backends(device, args.backend)
    modes = ["inference", "training"] if args.mode == "both" else [args.mode]
    if args.mode == "step":
        unstreamed = [shape for shape in shapes if not shape.streamable]
        if unstreamed and args.shape:
            error = f"--mode step streams unidirectional, unpacked shapes, not {unstreamed[0]}"
            print(f"{_prog()} bench: error: {error}", file=sys.stderr)
            return 2
        if unstreamed:  # a grid's: time the shapes a stream can feed, and say which were left out
            shapes = [shape for shape in shapes if shape.streamable]
            left = ", ".join(map(str, unstreamed))
            print(f"fastlstm bench: note: --mode step leaves out the grid's bidirectional and packed shapes: {left}",
                  file=sys.stderr)  # fmt: skip
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before the header, which reports it
    header = machine_header(device)
    print("fastlstm bench: " + ", ".join(f"{k} {v}" for k, v in header.items()))
    notes = timing_notes()
    for note in notes:
        print(f"fastlstm bench: note: {note}", file=sys.stderr)
    results = []
    total = len(shapes) * len(modes)
    done = 0
    try:
        for shape in shapes:
            onednn_off = {} if args.no_check else _validate(shape, names, modes, device, dtype, autocast)
            for mode in modes:
                done += 1
                print(f"\r[{done}/{total}] {shape} {mode}...".ljust(60), end="", file=sys.stderr, flush=True)
                results += time_shape(
                    shape, names, mode, device, dtype, args.repeats, autocast=autocast, onednn_off=onednn_off.get(mode)
                )
    except BackendUnavailableError as error:  # a forced backend that cannot serve these calls
        print(f"\n{_prog()} bench: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not _out_of_memory(error):
            raise
        detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        print(f"\n{_prog()} bench: error: out of memory at {shape}: {detail}", file=sys.stderr)
        return 2
    print("\r".ljust(60), file=sys.stderr)
    unlike = _onednn_off_note(results)
    if unlike:
        notes = [*notes, unlike]
    if args.json:  # before the table: a reader that closes the pipe early (`| head`) does not cost the results
        run = {
            "machine": header, "dtype": args.dtype, "autocast": args.autocast, "repeats": args.repeats,
            "checked": not args.no_check, "notes": notes,  # a run unchecked, or on a busy machine, says so
        }  # fmt: skip
        try:
            with open(args.json, "w") as f:
                json.dump({**run, "results": [r.as_dict() for r in results]}, f, indent=1)
        except OSError as error:  # writable when the run began (_check_arguments), not now: a full disk, say
            print(format_table(results, dtype, autocast))  # the results, at least on the screen
            print(f"{_prog()} bench: error: could not write {args.json}: {error}", file=sys.stderr)
            return 1
    print(format_table(results, dtype, autocast))
    if unlike:
        print(f"fastlstm bench: note: {unlike}", file=sys.stderr)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _onednn_off_note(results) -> str | None:
    """Where nn.LSTM ran with oneDNN off (its oneDNN path cannot run the call under CPU autocast), it ran ATen's loop
    with its products in autocast's dtype and returned float32, and the fast backends, giving that dtype, computed in
    float32: those rows time unlike work, which the table's label alone does not say."""
    rows = sorted({f"{r.shape} {r.mode}" for r in results if r.backends_used == NN_LSTM_ONEDNN_OFF})
    if not rows:
        return None
    return (
        f"nn.LSTM's oneDNN path cannot run {', '.join(rows)} under autocast here: it ran ATen's loop (products in "
        "autocast's dtype, float32 output), where fastlstm's fast backends compute in float32, as nn.LSTM's output "
        "dtype asks: their speedups there compare unlike work"
    )


def _out_of_memory(error: RuntimeError) -> bool:
    """An allocation that failed: torch's OutOfMemoryError (CUDA), or the CPU allocator's refusal."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)


def format_table(results, dtype, autocast=None) -> str:
    under = f" under {str(autocast)[6:]} autocast" if autocast else ""
    lines = [
        f"dtype {str(dtype)[6:]}{under}; speedup = nn.LSTM median / provider median, same process, interleaved",
        "",
        "| shape | mode | provider | runs on | median ms | speedup |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.shape} | {r.mode} | {r.provider} | {r.backends_used} | {r.median_ms:.3f} | {r.speedup:.2f}x |"
        )
    lines.append("")
    providers = sorted({(r.provider, r.mode) for r in results if r.provider != "nn.LSTM"})
    for provider, mode in providers:
        speedups = [r.speedup for r in results if r.provider == provider and r.mode == mode]
        lines.append(
            f"geometric mean speedup {provider} {mode}: {geometric_mean(speedups):.2f}x (min {min(speedups):.2f}x)"
        )
    return "\n".join(lines)


def _busy_note() -> str | None:
    """A warning when other processes keep the CPUs busy: timings then swing by several times from run to run,
    interleaving or not (seen: the same code path measured 0.11x and 2.16x against itself)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
    cpus = os.cpu_count() or 1  # the load average is the whole machine's
    if load < 0.75 * cpus:
        return None
    return (
        f"load average {load:.1f} on {cpus} CPUs: other processes compete for them, so the "
        "timings below may be noise; rerun on an idle machine"
    )


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a container's cpuset), where the platform says."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _oversubscribed_note() -> str | None:
    """A warning when torch runs more threads than the CPUs this process may run on: nn.LSTM's calls then wait for
    CPUs (64 threads on 1 CPU: 3.96 ms for a call of 0.1 ms' work, an audit), while cpp caps its own threads, and
    the speedups below measure the waiting."""
    threads, cpus = torch.get_num_threads(), usable_cpus()
    if threads <= cpus:
        return None
    return (
        f"torch runs {threads} threads on {_cpus(cpus)} this process may use: threads wait for one another, "
        f"nn.LSTM's most, so the speedups below are not a machine's (`python -m fastlstm bench --threads {cpus}`)"
    )


def _unescape_mount_path(path: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as a backslash and three octal digits."""
    return re.sub(r"\\([0-7]{3})", lambda digits: chr(int(digits.group(1), 8)), path)


def _cgroup_dirs(mountinfo: Path, cgroup: Path) -> list[tuple[Path, bool]]:
    """The cgroup directories whose CPU quota bounds this process, each with whether it is cgroup v2's: its
    cgroup in v2 and in the v1 cpu controller's hierarchy, and every cgroup above it up to what the mount shows.
    A container without a cgroup namespace sees its own cgroup mounted as the root (mountinfo's root field names
    it), so the process's path is taken relative to that."""
    mounts: dict[bool, tuple[str, Path]] = {}  # v2 or not: (root, mount point), the first mount of each
    for line in mountinfo.read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        fields, rest = fields.split(), rest.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        v2 = rest[0] == "cgroup2"
        if v2 or (rest[0] == "cgroup" and "cpu" in rest[2].split(",")):
            mounts.setdefault(v2, (_unescape_mount_path(fields[3]), Path(_unescape_mount_path(fields[4]))))
    dirs = []
    for line in cgroup.read_text().splitlines():  # hierarchy-id:controllers:path
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v2 = hierarchy == "0" and not controllers
        if not (v2 or "cpu" in controllers.split(",")) or v2 not in mounts:
            continue
        root, point = mounts[v2]
        if root != "/":
            path = path[len(root) :] if path == root or path.startswith(root + "/") else ""
        here = point.joinpath(*[part for part in path.split("/") if part])
        dirs += [(d, v2) for d in [here, *here.parents] if d == point or point in d.parents]
    return dirs


def cgroup_cpu_quota(mountinfo: str = "/proc/self/mountinfo", cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPUs' worth of time the tightest of this process's cgroup quotas allows it (cgroup v2's cpu.max, the v1
    cpu controller's cpu.cfs_quota_us over cpu.cfs_period_us), or None where none is set or none can be read.

    A container limited to fewer CPUs than it sees (docker --cpus, a Kubernetes CPU limit) still has torch take
    a thread for every CPU it sees; those threads spend the quota early in each period and then all wait for the
    next one (100 ms by default), so calls that hit the wait take tens of milliseconds more."""
    try:
        dirs = _cgroup_dirs(Path(mountinfo), Path(cgroup))
    except (OSError, UnicodeDecodeError):  # not Linux, or no cgroups to read
        return None
    quotas = []
    for directory, v2 in dirs:
        try:
            if v2:
                limit, period = (directory / "cpu.max").read_text().split()[:2]
            else:
                limit = (directory / "cpu.cfs_quota_us").read_text().strip()
                period = (directory / "cpu.cfs_period_us").read_text().strip()
            if limit != "max" and int(limit) > 0 and int(period) > 0:  # v1 writes -1 for no quota
                quotas.append(int(limit) / int(period))
        except (OSError, ValueError):  # no quota file at this level, or no controller enabled here
            continue
    return min(quotas) if quotas else None


def _cpus(count: float) -> str:
    return f"{count:g} CPU" + ("" if count == 1 else "s")


def _quota_note() -> str | None:
    """A warning when torch runs more threads than the CPU quota allows: the timings then mix calls that ran at
    full speed with calls that waited for the next period. 2-core Zen 4 under a quota of 1 CPU, 4 s of calls:
    nn.LSTM B1-T100-H128 inference 876 calls/s on 2 threads against 1761 on 1; the slowest 1% 50 ms against 0.7
    ms (benchmarks/results/cpu-amd-epyc-zen4-2core.md)."""
    quota = cgroup_cpu_quota()
    threads = torch.get_num_threads()
    fits = None if quota is None else math.ceil(quota)
    if fits is None or threads <= fits:
        return None
    return (
        f"torch runs {threads} threads, but this process's cgroup allows {_cpus(quota)} of "
        f"time: once the threads have spent it, they wait for the next period, and the timings below mix both; "
        f"torch.set_num_threads({fits}) fits the quota (`python -m fastlstm bench --threads {fits}`)"
    )


def timing_notes() -> list[str]:
    """What makes this machine's timings unreliable now (for `bench` and the pytest-benchmark suite)."""
    return [note for note in (_busy_note(), _quota_note(), _oversubscribed_note()) if note]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


_positive_int.__name__ = "positive integer"  # argparse names the type in its error ("invalid positive integer value")


def _thread_count(text: str) -> int:
    """--threads: a positive integer a process can start that many threads for. torch.set_num_threads(100000)
    ended the process at the first call (a segmentation fault in its thread pool, torch 2.13; 30000 ran)."""
    value = _positive_int(text)
    limit = max(4096, os.cpu_count() or 1)
    if value > limit:
        raise argparse.ArgumentTypeError(f"expected at most {limit} threads, got {text}")
    return value


_thread_count.__name__ = "thread count"


def _check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """What argparse cannot check by itself, before any work starts."""
    if getattr(args, "shape", None) and getattr(args, "grid", None):
        parser.error("--grid and --shape: give one of them (--shape times only the shapes it names)")
    if getattr(args, "random", 0) < 0:
        parser.error(f"--random: expected 0 or more configurations, got {args.random}")
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if getattr(args, "autocast", None) and args.dtype != "float32":
        parser.error(f"--autocast runs float32 models under autocast, not {args.dtype} ones (--dtype float32)")
    if getattr(args, "json", None) is not None:
        problem = _unwritable(args.json)  # fail now, not after the whole benchmark has run
        if problem:
            parser.error(f"--json {args.json}: {problem}")


def _unwritable(path: str) -> str | None:
    """Why `path` could not be written, found by opening it to append (which leaves a file there as it was), and
    removing it again where that created it: a failed run leaves no empty file behind. os.access had passed
    whatever root asked for, /proc/x.json too, and the run ended in a traceback after all its timing."""
    if not path:
        return "expected a file name"
    if os.path.isdir(path):
        return "Is a directory"
    existed = os.path.lexists(path)
    if existed and not os.path.isfile(path):
        # a FIFO, a device or a link to nothing: opening would block or hand a reader its end, or make the link's
        # target; these are asked, not tried
        return None if not os.path.exists(path) or os.access(path, os.W_OK) else "Permission denied"
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        return error.strerror or str(error)
    if not existed:
        with contextlib.suppress(OSError):
            os.remove(path)
    return None


def _prog() -> str:
    """The command's name in usage and error lines: the console script's where it was run by it, else how the
    README runs it."""
    return "fastlstm" if os.path.basename(sys.argv[0]) == "fastlstm" else "python -m fastlstm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("info", "versions, device and which backends are available (and why not)"),
        ("build", "build the C++ CPU backend now instead of on first use"),
    ):
        sub.add_parser(name, help=text, description=text)
    check_text = "every available backend against nn.LSTM (training and inference); exit 1 on a mismatch"
    check = sub.add_parser("check", help=check_text, description=check_text)
    check.add_argument("--device", choices=["cpu", "cuda"])
    check.add_argument(
        "--backend",
        action="append",
        choices=backends.names(),
        help="check only this backend (repeatable), and exit 1 if it is unavailable (a failed C++ build, say)",
    )
    check.add_argument(
        "--random",
        type=int,
        default=0,
        metavar="N",
        help="also N random configurations, sized to cross the fast backends' size rules, a third of the stacked "
        "ones with dropout between layers on the CPU (slow for the Python reference and the Triton interpreter at "
        "those sizes)",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the random configurations (default 0)")
    check.add_argument(
        "--dtype",
        action="append",
        choices=list(DTYPES),
        help="check in this dtype (repeatable; default float64 and float32); from float32 down a tensor may err 3 "
        "times as much as nn.LSTM's own result in that dtype (on the CPU, where it errs more, the larger of its "
        "oneDNN and ATen paths' errors), or 2e-4 (float32) / 3e-2 (bfloat16) / 4e-3 (float16) of its largest value "
        "where that is larger (1e-1 / 2e-2 for the halves on CUDA); a result the dtype barely resolves (its float64 "
        "value moves 8+ rounding units when the input and weights move by one) may err twice that movement",
    )
    bench_text = (
        "time fastlstm against nn.LSTM (first checks each timed mode against nn.LSTM: outputs, gradients, steps)"
    )
    bench = sub.add_parser("bench", help=bench_text, description=bench_text)
    bench.add_argument("--device", choices=["cpu", "cuda"])
    bench.add_argument("--dtype", choices=list(DTYPES), default="float32")
    bench.add_argument(
        "--backend",
        action="append",
        choices=["auto", *backends.names()],
        help="fastlstm backend to time (repeatable; default auto + the fast one)",
    )
    bench.add_argument(
        "--shape",
        action="append",
        type=_shape_argument,
        help="B,T,I,H[,L[,bi]] or a table label like B32-T100-I256-H256-L2-bi (with a projection: "
        "B32-T100-I256-H256-P128-L2-bi; a PackedSequence of lengths in [T/2, T]: B32-T100-I256-H256-L2-bi-packed; "
        "repeatable; default: a grid per device)",
    )
    bench.add_argument(
        "--grid",
        choices=["default", "cpu-full", "cpu-short"],
        help="shape grid (instead of --shape; default: the device's default grid); cpu-short: 1 and 10 steps at "
        "batch 8-64",
    )
    bench.add_argument(
        "--mode",
        choices=["inference", "training", "training-data", "both", "step"],
        default="both",
        help="both: inference and training; training-data: training where the input needs no gradient (a first "
        "layer fed data); step: streaming, the sequence fed one step a call with the state carried (fastlstm's "
        "step() against nn.LSTM on 1-step sequences)",
    )
    bench.add_argument(
        "--autocast",
        choices=["bfloat16", "float16"],
        help="time every provider under torch.autocast in this dtype (float32 models; one autocast region a "
        "timed call, training step or stream)",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=10,
        help="timed runs per provider (default 10), rounded up to whole cycles of the round order (nn.LSTM and one "
        "backend: 2 rounds; and two: 6)",
    )
    bench.add_argument(
        "--threads", type=_thread_count, help="torch.set_num_threads(N) before timing (default: torch's own)"
    )
    bench.add_argument(
        "--no-onednn",
        action="store_true",
        help="torch.backends.mkldnn.enabled = False for the run, as a program may set it: nn.LSTM then runs ATen's "
        "per-step loop, and auto decides knowing that",
    )
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--no-check", action="store_true", help="skip validating outputs against nn.LSTM")
    args = parser.parse_args(argv)
    _check_arguments(sub.choices[args.command], args)  # errors in the subcommand's usage, as argparse's own
    commands = {"info": cmd_info, "build": cmd_build, "check": cmd_check, "bench": cmd_bench}
    try:
        return commands[args.command](args)
    except BrokenPipeError:  # the reader went away (`| head`): say nothing more, and not at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"\n{_prog()} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
