"""GPU benchmark grid: fastlstm's Triton backend against nn.LSTM (cuDNN) with the same weights.

    python benchmarks/gpu_grid.py [--out DIR] [--budget SECONDS]      # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_grid.py --dry-run         # tiny shapes on the CPU (smoke test)

For every shape (batch, hidden, seq, layers, dtype) and mode (inference: no_grad forward; training:
forward + backward), native and triton runs are interleaved, each timed with CUDA events, and the
speedup is the ratio of medians (native / triton). The triton side is `fastlstm.LSTM(..., backend="triton")`
when that module can be built, else the backend's layer stacked per layer by hand. A shape that fails
records its error and the grid goes on; shapes left when the time budget runs out are recorded as skipped.
Writes gpu_grid.json and gpu_grid.md to --out (default $OUT, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import faulthandler
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# A grid shape's timing rounds stop after this many seconds (three rounds at least): the grid's 52 rows share
# gpu_check.sh's 115 s, and its largest (batch 256, 1000 steps) may take a second or more a round. The tuner's
# shapes, ten candidates a round, keep 20 (run_all's default).
PER_SHAPE_SECONDS = 8.0


def grid(dry_run: bool) -> list[dict]:
    """The shapes, most informative first (the budget may cut the tail)."""
    if dry_run:
        rows = [dict(batch=2, hidden=16, seq=3, layers=layers, dtype="fp32", input=8) for layers in (1, 2)]
        rows.append(dict(batch=2, hidden=16, seq=3, layers=2, dtype="fp32", input=8, impl="stacked"))
        rows.append(dict(batch=1, hidden=16, seq=2, layers=1, dtype="bf16", input=8))  # unsupported: records error
        return [dict(r, mode=m) for r in rows for m in ("inference", "training")]
    rows = []
    for hidden in (128, 256, 512, 1024):  # batch x hidden sweep, bf16, one layer, seq 100
        for batch in (1, 16, 64, 256):
            rows.append(dict(batch=batch, hidden=hidden, seq=100, layers=1, dtype="bf16"))
    for dtype in ("fp32", "fp16"):
        rows += [
            dict(batch=64, hidden=512, seq=100, layers=1, dtype=dtype),
            dict(batch=1, hidden=256, seq=100, layers=1, dtype=dtype),
        ]
    rows += [
        dict(batch=64, hidden=512, seq=100, layers=2, dtype="bf16"),
        dict(batch=16, hidden=256, seq=100, layers=2, dtype="fp32"),
        dict(batch=16, hidden=256, seq=1000, layers=1, dtype="bf16"),
        dict(batch=1, hidden=128, seq=1000, layers=2, dtype="fp32"),
        dict(batch=256, hidden=1024, seq=1000, layers=1, dtype="bf16"),
        dict(batch=256, hidden=512, seq=1000, layers=2, dtype="fp16"),
    ]
    for r in rows:
        r.setdefault("input", r["hidden"])
    # The rows issue 4's targets judge first (inference at batch <= 16, training at batch >= 64), then the rest,
    # inference before training in each: the budget cuts the tail, and on the first H200 run one training row
    # outlasted it, leaving the inference rows behind it untimed.
    inference = [dict(r, mode="inference") for r in rows]
    training = [dict(r, mode="training") for r in rows]
    targets = [r for r in inference if r["batch"] <= 16] + [r for r in training if r["batch"] >= 64]
    return targets + [r for r in inference + training if r not in targets]


def header(torch, device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"unavailable ({type(e).__name__}: {e})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "uncommitted"  # fmt: skip
    except Exception:
        commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "none (CPU dry run)",
        # what fastlstm/measured_cuda.py keys its figures by (benchmarks/cuda_rule.py)
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
        "triton kernels": _triton_choices(),
    }


def _triton_choices() -> str:
    """The backend's kernel rule, tiles and graph setting as `python -m fastlstm info` prints them."""
    try:
        from fastlstm.backends.triton import ops

        return ops.kernel_choices()
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"


class StackedTriton:
    """nn.LSTM's weights run through fastlstm.backends.triton layer by layer (unidirectional, dense)."""

    def __init__(self, ref, backend, torch):
        self.ref, self.backend, self.torch = ref, backend, torch

    def __call__(self, x):
        ref = self.ref
        B = x.shape[1]
        out, hs, cs = x, [], []
        for k in range(ref.num_layers):
            w_ih, w_hh = getattr(ref, f"weight_ih_l{k}"), getattr(ref, f"weight_hh_l{k}")
            b = getattr(ref, f"bias_ih_l{k}") + getattr(ref, f"bias_hh_l{k}")
            h0 = x.new_zeros(B, w_hh.shape[1])
            c0 = x.new_zeros(B, w_hh.shape[0] // 4)
            out, h, c = self.backend.layer(out, h0, c0, w_ih, w_hh, b, None, None, False)
            hs.append(h)
            cs.append(c)
        return out, (self.torch.stack(hs), self.torch.stack(cs))


def build(shape: dict, torch, device: str):
    """(native nn.LSTM, triton callable, how the triton side was built)."""
    dtype = getattr(torch, DTYPES[shape["dtype"]])
    torch.manual_seed(0)
    ref = torch.nn.LSTM(shape["input"], shape["hidden"], num_layers=shape["layers"]).to(device, dtype)
    try:
        if shape.get("impl") == "stacked":
            raise RuntimeError("stacked layers requested")
        import fastlstm

        fast = fastlstm.LSTM(shape["input"], shape["hidden"], num_layers=shape["layers"], backend="triton")
        fast = fast.to(device, dtype)
        fast.load_state_dict(ref.state_dict())
        return ref, fast, "fastlstm.LSTM(backend='triton')"
    except Exception as e:
        from fastlstm.backends.triton import BACKEND

        reason = BACKEND.unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason) from e
        return (
            ref,
            StackedTriton(ref, BACKEND, torch),
            f"BACKEND.layer stacked ({type(e).__name__} building fastlstm.LSTM)",
        )


def check_supported(shape: dict, torch, device: str) -> None:
    from fastlstm.backends import LayerCall
    from fastlstm.backends.triton import BACKEND

    for k in range(shape["layers"]):
        call = LayerCall(device_type=device, dtype=getattr(torch, DTYPES[shape["dtype"]]), seq_len=shape["seq"],
                         batch=shape["batch"], input_size=shape["input"] if k == 0 else shape["hidden"],
                         hidden_size=shape["hidden"], proj_size=0, bias=True, packed=False, reverse=False,
                         needs_grad=shape["mode"] == "training", layer=k)  # fmt: skip
        reason = BACKEND.unsupported_reason(call)
        if reason is not None:
            raise RuntimeError(f"triton backend cannot serve layer {k}: {reason}")


def timed(fn, torch, device: str) -> float:
    """Milliseconds of one call."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def make_step(model, x, training: bool, torch):
    """One timed unit of work: inference (no_grad forward) or training (forward + backward of a scalar)."""

    def go():
        if training:
            y, (h, c) = model(x)
            (y.float().sum() + h.float().sum() + c.float().sum()).backward()
        else:
            with torch.no_grad():
                model(x)

    return go


def interleaved_medians(providers: list, torch, device: str, reps: int, max_seconds: float) -> tuple[list, int]:
    """Median milliseconds of each provider (a no-argument callable) and the rounds run: warm-up first (triton
    compiles, cuDNN picks algorithms, the step loop's graph is captured), then rounds that time every provider
    once, in alternating order, so that drift (clocks, other tenants) hits them alike."""
    for _ in range(3):
        for fn in providers:
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in providers]
    t_start = time.perf_counter()
    for k in range(reps):
        order = list(zip(providers, times))
        for fn, sink in order if k % 2 == 0 else order[::-1]:
            sink.append(timed(fn, torch, device))
        if k >= 2 and time.perf_counter() - t_start > max_seconds:
            break
    return [statistics.median(t) for t in times], len(times[0])


class Phases:
    """Seconds spent in each phase of one shape, each phase named on stdout as it begins: a run stopped by its
    time limit shows where it was (on an H200 one training shape ran past 200 s with nothing to say why)."""

    def __init__(self, torch, device: str, prefix: str = "    "):
        self.torch, self.device, self.prefix, self.seconds = torch, device, prefix, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"{self.prefix}{name} ...", flush=True)
        start = time.perf_counter()
        yield
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        self.seconds[name] = round(time.perf_counter() - start, 3)


def prepared(shape: dict, torch, device: str, phase: Phases):
    """(nn.LSTM, the triton side, how it was built, x, nn.LSTM's timed unit, triton's, {variant: its unit}) for one
    shape, and every triton way called once: that compiles what each needs (or reads it from the cache --warm
    filled) and asks the build guard once."""
    check_supported(shape, torch, device)
    dtype = getattr(torch, DTYPES[shape["dtype"]])
    with phase("build"):
        ref, fast, impl = build(shape, torch, device)
    training = shape["mode"] == "training"
    x = torch.randn(shape["seq"], shape["batch"], shape["input"], device=device, dtype=dtype)
    x.requires_grad_(training)
    run_native, run_fast = make_step(ref, x, training, torch), make_step(fast, x, training, torch)
    variants = variants_of(shape, run_fast, torch)
    for name, run in {"default": run_fast, **variants}.items():
        with phase(f"first call: {name}"):
            run()
    return ref, fast, impl, x, run_native, run_fast, variants


def run_shape(shape: dict, torch, device: str, reps: int, max_seconds: float) -> dict:
    phase = Phases(torch, device)
    ref, fast, impl, x, run_native, run_fast, variants = prepared(shape, torch, device, phase)
    with phase("native's first call"):
        run_native()
    # Accuracy against native in the same dtype (not a test: the tests assert; this is context for the table).
    with phase("accuracy"), torch.no_grad():
        y_ref, _ = ref(x)
        y_fast, _ = fast(x)
        max_diff = (y_ref.float() - y_fast.float()).abs().max().item()
    with phase("timing"):
        (nat, fst, *var), rounds = interleaved_medians([run_native, run_fast, *variants.values()], torch, device,
                                                       reps, max_seconds)  # fmt: skip
    return dict(status="ok", impl=impl, reps=rounds, native_ms=nat, triton_ms=fst, speedup=nat / fst,
                max_abs_diff_y=max_diff, seconds=phase.seconds,
                variants={name: dict(ms=ms, speedup=nat / ms) for name, ms in zip(variants, var)})  # fmt: skip


def _row(shape: dict) -> tuple:
    """A shape without its mode: the row its inference and training share."""
    return tuple((key, value) for key, value in shape.items() if key != "mode")


def warm(shapes: list[dict], part: str, torch, device: str) -> int:
    """prepared() for every shape of one part ("K/N": every N-th row from the K-th), untimed, so that N processes
    started side by side compile the grid's kernels on N cores before one process times it. Exit status 0: a
    shape that fails here fails again, with its error recorded, when timed."""
    k, n = (int(v) for v in part.split("/"))
    mine = set(list(dict.fromkeys(map(_row, shapes)))[k::n])  # both modes of a row: they share the forward's kernels
    for shape in [s for s in shapes if _row(s) in mine]:
        t0 = time.perf_counter()
        name = f"gpu_grid --warm {part}: {shape_label(shape)}"
        phase = Phases(torch, device, prefix=f"{name}: ")
        try:
            prepared(shape, torch, device, phase)
            msg = "ok"
        except Exception as e:
            msg = f"{type(e).__name__}: {e}".strip()[:200]
        print(f"{name}: {msg} in {time.perf_counter() - t0:.1f} s {phase.seconds}", flush=True)
    return 0


def variant_envs(shape: dict, torch) -> dict[str, dict[str, str]]:
    """Other ways the triton backend can run this shape, timed beside its default so one GPU run can set the
    rules: the kernel `auto` did not pick (where the sequence kernel is plausible), and the step kernel's loops
    launched step by step instead of replayed as CUDA graphs (inference, and training's forward and backward)."""
    from fastlstm.backends.triton import graphs, ops

    chosen = ops.choose_kernel(shape["batch"], shape["hidden"], shape["hidden"], getattr(torch, DTYPES[shape["dtype"]]))
    out = {}
    if shape["batch"] <= 64 and shape["hidden"] <= 512:
        other = "sequence" if chosen == "step" else "step"
        out[other] = {ops.ENV_KERNEL: other}
    out["step (no graph)"] = {ops.ENV_KERNEL: "step", graphs.ENV: "0"}
    return out


def variants_of(shape: dict, run_fast, torch) -> dict:
    """name -> run_fast run another way: variant_envs' ways, and in float32 with TF32 dots (cuDNN's default for
    float32, torch.backends.cudnn.allow_tf32, where triton follows torch's matmul switch, off by default)."""
    out = {name: with_env(env, run_fast) for name, env in variant_envs(shape, torch).items()}
    if shape["dtype"] == "fp32":
        out["tf32"] = with_tf32(run_fast, torch)
    return out


def with_tf32(fn, torch):
    """fn run with torch's TF32 switch for matmuls on, which the triton backend reads at each call."""
    matmul = torch.backends.cuda.matmul
    newer = hasattr(torch._C, "_get_fp32_precision_getter")  # 2.9+: allow_tf32 raises once this one was set

    def go():
        name, on = ("fp32_precision", "tf32") if newer else ("allow_tf32", True)
        before = getattr(matmul, name)
        setattr(matmul, name, on)
        try:
            fn()
        finally:
            setattr(matmul, name, before)

    return go


def with_env(env: dict[str, str], fn):
    """fn run with these environment variables set (the backend reads its kernel and graph switches per call)."""

    def go():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return go


def title_lines(title: str, head: dict) -> list[str]:
    """A results page's title and the line naming the GPU, versions and commit."""
    return [
        f"# {title}",
        "",
        f"GPU: {head['gpu']} | torch {head['torch']} (CUDA {head['cuda']}) | triton {head['triton']} | "
        f"commit {head['commit']} | {head['date']}",
        "",
    ]


def markdown(head: dict, rows: list[dict]) -> str:
    lines = [
        *title_lines("fastlstm triton vs nn.LSTM (cuDNN)", head),
        "Speedup = median native time / median triton time (>1: triton faster). Interleaved runs, CUDA events.",
        "",
        "Other ways to run the shape, same process, interleaved: speedup over native of the kernel `auto` did not",
        "pick, and of the step kernel's loops launched step by step (`no graph`) instead of replayed as CUDA",
        "graphs (inference, and training's forward and backward).",
        "",
        "| mode | dtype | layers | batch | hidden | seq | native ms | triton ms | speedup | max abs diff y "
        "| other ways | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            others = "; ".join(f"{name} {v['speedup']:.3g}x" for name, v in r.get("variants", {}).items())
            nums = (f"{r['native_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.3g}x | {r['max_abs_diff_y']:.1e} | "
                    f"{others}")  # fmt: skip
            status = "ok"
        else:
            nums = " |  |  |  | "
            status = f"{r['status']}: {r.get('error', '')}".replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['layers']} | {r['batch']} | {r['hidden']} | {r['seq']} | "
                     f"{nums} | {status} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(out_dir: str, stem: str, head: dict, rows: list[dict], render=None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"header": head, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write((render or markdown)(head, rows))


def device_for(args, tool: str, torch) -> str | None:
    """ "cuda", or "cpu" for a dry run (under the interpreter), or None (said on stderr) when there is no GPU."""
    if args.dry_run and not torch.cuda.is_available():
        # Must be set before triton is imported (fastlstm imports it lazily, on first use).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        print(f"{tool}: no CUDA device; use --dry-run for a CPU smoke test", file=sys.stderr)
        return None
    sys.path.insert(0, ROOT)
    # A run its time limit stops (timeout sends SIGTERM) says where every thread was.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    return device


def run_all(
    tool: str, stem: str, shapes: list[dict], measure, label, summary, render, args, torch, device: str,
    per_shape: float = 20.0,
) -> int:  # fmt: skip
    """measure(shape, torch, device, reps, max_seconds) for every shape within args.budget seconds (its timing
    rounds within per_shape seconds, or half what is left), each row printed (label(shape): summary(row)) and the
    results written after every shape (a killed run keeps them). Exit status 0 when at least one shape ran."""
    head = header(torch, device)
    deadline = time.perf_counter() + args.budget
    rows = []
    for i, shape in enumerate(shapes):
        left = deadline - time.perf_counter()
        row = dict(shape)
        print(f"[{i + 1}/{len(shapes)}] {label(shape)}: started", flush=True)
        if left <= 0:
            row.update(status="skipped", error="time budget spent")
        else:
            try:
                row.update(measure(shape, torch, device, args.reps, max_seconds=min(per_shape, left / 2)))
            except Exception as e:
                row.update(status="error", error=f"{type(e).__name__}: {e}".strip())
                row["traceback"] = traceback.format_exc(limit=6)
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        msg = summary(row) if row["status"] == "ok" else f"{row['status']}: {row.get('error', '')[:120]}"
        print(f"[{i + 1}/{len(shapes)}] {label(shape)}: {msg}", flush=True)
        write(args.out, stem, head, rows, render)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{tool}: {ok}/{len(rows)} shapes ok; wrote {args.out}/{stem}.json and {stem}.md")
    return 0 if ok else 1


def parse_args(argv, description: str, budget: float, reps: int, warm: bool = False):
    """The options both GPU scripts take: --dry-run, --out, --budget (seconds), --reps (timed rounds at most);
    with warm, the grid's --warm K/N."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget", type=float, default=budget, help="seconds for all shapes")
    ap.add_argument("--reps", type=int, default=reps, help="timed rounds per shape (at most)")
    if warm:
        ap.add_argument("--warm", metavar="K/N", type=_part, help="only compile: one call of every N-th shape from "
                        "the K-th (0-based), untimed, nothing written")  # fmt: skip
    return ap.parse_args(argv)


def shape_label(shape: dict) -> str:
    s = shape
    return f"{s['mode']} {s['dtype']} L{s['layers']} B{s['batch']} H{s['hidden']} T{s['seq']}"


def _part(text: str) -> str:
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return text


def main(argv=None) -> int:
    args = parse_args(argv, __doc__.splitlines()[0], budget=180.0, reps=15, warm=True)

    import torch

    device = device_for(args, "gpu_grid", torch)
    if device is None:
        return 2

    def summary(row):
        return f"{row['speedup']:.3g}x"

    if args.warm:
        return warm(grid(args.dry_run), args.warm, torch, device)
    stem = "gpu_grid_dry_run" if args.dry_run else "gpu_grid"
    return run_all("gpu_grid", stem, grid(args.dry_run), run_shape, shape_label, summary, markdown, args, torch,
                   device, per_shape=PER_SHAPE_SECONDS)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
