"""benchmarks/gpu_grid.py's and gpu_tune.py's pieces that decide what a GPU run measures and how it reports it,
and gpu_check.sh's worst-case length (the runs themselves need a GPU; `bash benchmarks/gpu_check.sh --dry-run`
and `gpu_tune.py --dry-run` smoke-test them on the CPU)."""

from __future__ import annotations

import os

import torch
from helpers import load_benchmark_script, require_triton

require_triton()

gpu_grid = load_benchmark_script("gpu_grid")
gpu_tune = load_benchmark_script("gpu_tune")


def _shape(batch, hidden, mode):
    return dict(batch=batch, hidden=hidden, seq=100, layers=1, dtype="bf16", input=hidden, mode=mode)


def test_variants_time_the_other_kernel_and_the_loop_without_its_graph():
    from fastlstm.backends.triton import graphs, ops

    small = gpu_grid.variant_envs(_shape(16, 128, "inference"), torch)  # auto: sequence
    assert small == {
        "step": {ops.ENV_KERNEL: "step"},
        "step (no graph)": {ops.ENV_KERNEL: "step", graphs.ENV: "0"},
    }
    mid = gpu_grid.variant_envs(_shape(16, 512, "training"), torch)  # auto: step, graphed in training too
    no_graph = {ops.ENV_KERNEL: "step", graphs.ENV: "0"}
    assert mid == {"sequence": {ops.ENV_KERNEL: "sequence"}, "step (no graph)": no_graph}
    assert gpu_grid.variant_envs(_shape(256, 1024, "training"), torch) == {"step (no graph)": no_graph}


def test_with_env_sets_and_restores(monkeypatch):
    monkeypatch.setenv("FASTLSTM_TRITON_KERNEL", "step")
    monkeypatch.delenv("FASTLSTM_TRITON_GRAPHS", raising=False)
    seen = []
    run = gpu_grid.with_env(
        {"FASTLSTM_TRITON_KERNEL": "sequence", "FASTLSTM_TRITON_GRAPHS": "0"},
        lambda: seen.append((os.environ["FASTLSTM_TRITON_KERNEL"], os.environ["FASTLSTM_TRITON_GRAPHS"])),
    )
    run()
    assert seen == [("sequence", "0")]
    assert os.environ["FASTLSTM_TRITON_KERNEL"] == "step" and "FASTLSTM_TRITON_GRAPHS" not in os.environ


def test_markdown_rows_have_the_header_s_cells():
    ok = dict(_shape(1, 128, "inference"), status="ok", native_ms=2.0, triton_ms=1.0, speedup=2.0,
              max_abs_diff_y=1e-3, variants={"step": dict(ms=1.5, speedup=1.33)})  # fmt: skip
    failed = dict(_shape(1, 128, "training"), status="error", error="RuntimeError: x | y")
    lines = gpu_grid.markdown(dict(gpu="g", torch="t", cuda="c", triton="tr", commit="x", date="d"), [ok, failed])
    table = [line for line in lines.splitlines() if line.startswith("|")]
    cells = {line.count("|") for line in table}
    assert len(cells) == 1, table
    assert "step 1.33x" in table[2] and "RuntimeError: x / y" in table[3]


def test_tune_candidates_are_valid_configurations():
    from fastlstm.backends.triton import ops

    for kernel, candidates in gpu_tune.CANDIDATES.items():
        assert kernel in ops.KERNELS and candidates[0] == ""  # the default is always timed
        for config in candidates[1:]:
            assert ops._parse_config(config)


def test_tune_markdown_marks_the_best_and_keeps_failures():
    row = dict(_shape(64, 512, "inference"), kernel="step", status="ok", native_ms=3.0, best="num_warps=8",
               candidates={"default": dict(ms=2.0, speedup=1.5), "num_warps=8": dict(ms=1.5, speedup=2.0),
                           "BLOCK_K=32": dict(error="CompilationError: out of resources")})  # fmt: skip
    skipped = dict(_shape(1, 256, "inference"), kernel="sequence", status="skipped", error="time budget spent")
    text = gpu_tune.markdown(dict(gpu="g", torch="t", cuda="c", triton="tr", commit="x", date="d"), [row, skipped])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table
    assert "**num_warps=8: 2x**" in table[2] and "BLOCK_K=32: failed (CompilationError" in table[2]
    assert "skipped: time budget spent" in table[3]


def test_host_cost_script_times_both_loops_and_puts_the_kernels_back():
    """benchmarks/triton_host_cost.py (its own process: it sets TRITON_INTERPRET=0 for the launchers' real path)
    prints a forward and a backward figure with and without a projection, and leaves the kernels as it found
    them."""
    from helpers import run_python

    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import triton_host_cost as h; "
        "from fastlstm.backends.triton import kernels; before = {n: getattr(kernels, n) for n in h.STEP_KERNELS}; "
        "assert h.main(['--steps', '5', '--reps', '2']) == 0; "
        "assert all(getattr(kernels, n) is k for n, k in before.items())"
    )
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["no projection", "projection 8"], done.stdout
    assert all(" us a step, backward " in line and line.endswith("us a step (host only)") for line in lines)


def test_float32_rows_also_time_tf32_dots():
    """cuDNN multiplies float32 in TF32 by default, triton only when torch's matmul switch says so: the grid times
    that way too, and puts the switch back."""
    from fastlstm.backends.triton.build_guard import _tf32_switch as read  # what the backend reads

    seen = []
    before = read()
    variants = gpu_grid.variants_of(dict(_shape(16, 512, "training"), dtype="fp32"), lambda: seen.append(read()), torch)
    assert list(variants) == ["sequence", "step (no graph)", "tf32"]
    variants["tf32"]()
    assert seen == [True] and read() == before
    assert "tf32" not in gpu_grid.variants_of(_shape(16, 512, "training"), lambda: None, torch)  # bf16


def test_graph_captures_counts_a_stream_of_lengths():
    """benchmarks/graph_captures.py: calls of any length share one configuration's chunk graphs, so a stream of
    200 lengths in 1-64 captures at most one graph per chunk length (7), launches only the first call's chunks
    step by step, and replays every later call's."""
    counts = load_benchmark_script("graph_captures").count(200, 64, 0)
    assert counts["captures"] <= 7 and counts["launched"] <= 7
    assert counts["replays"] >= 199


# ---- the CUDA speed rule: dispatch reads fastlstm/measured_cuda.py, which benchmarks/cuda_rule.py writes ----------

cuda_rule = load_benchmark_script("cuda_rule")

_MEASURED = (
    ("9.0", "inference", "bf16", 1, 1, 128, 100, 1.39),
    ("9.0", "inference", "bf16", 1, 16, 128, 100, 1.2),
    ("9.0", "inference", "bf16", 2, 16, 128, 100, 0.9),  # the same shape with two layers: the slower decides
    ("9.0", "inference", "bf16", 1, 64, 128, 100, 1.3),
    ("9.0", "training", "bf16", 1, 1, 128, 100, 0.97),
)


def _cuda_call(**fields):
    from fastlstm.backends import LayerCall

    values = dict(
        device_type="cuda", dtype=torch.bfloat16, seq_len=100, batch=1, input_size=128, hidden_size=128, proj_size=0,
        bias=True, packed=False, reverse=False, needs_grad=False, device_index=0,
    )  # fmt: skip
    return LayerCall(**{**values, **fields})


def _slower(capability="9.0", **fields):
    from fastlstm import dispatch

    return dispatch._triton_slower_reason(_cuda_call(**fields), _MEASURED, capability)


def test_cuda_rule_takes_triton_where_the_nearest_measured_shapes_won():
    assert _slower() is None  # measured 1.39x
    assert _slower(batch=2, hidden_size=200, seq_len=300) is None  # within 4x of that shape only
    assert _slower(reverse=True) is None  # the same kernels, the other way through time
    assert _slower(batch=64) is None and _slower(batch=100) is None  # 1.3x at batch 64; batch 256 unmeasured
    # batch 16: one of its two rows (two layers) ran at 0.9x; batch 4 is as near to it as to batch 1
    for batch in (16, 4, 8):
        assert "0.900x of cuDNN" in _slower(batch=batch) and "2 layers" in _slower(batch=batch)
    assert _slower(batch=32) is not None  # as near to batch 16 (0.9x) as to 64
    assert "0.970x" in _slower(needs_grad=True)  # training: its own rows, below the margin


def test_cuda_rule_keeps_unmeasured_calls_on_cudnn():
    class SymbolicInt(int):  # what a dynamic size is to the rule: not a plain int
        pass

    for reason, call in [
        ("within 4x", dict(batch=512)),
        ("within 4x", dict(seq_len=10)),
        ("within 4x", dict(hidden_size=1024)),
        ("fp32 inference", dict(dtype=torch.float32)),
        ("fp16 inference", dict(dtype=torch.float16)),
        ("compute capability 8.0", dict(capability="8.0")),
        ("projection", dict(proj_size=64)),
        ("packed", dict(packed=True)),
        ("dynamic", dict(batch=SymbolicInt(1))),
    ]:
        got = _slower(**call)
        assert got is not None and reason in got, (call, got)


def test_cuda_rule_reads_no_size_while_dynamo_traces():
    """Dynamo shows a dynamic size to Python as an int (isinstance and type() alike): the rule compared the sizes of
    a compiled call, which guarded the program on them, and its min(key=) broke fullgraph=True ("invalid call to
    builtin op handler"). Compiled calls keep cuDNN, in one graph for every size."""
    from torch._dynamo.utils import counters

    def rule(x):
        reason = _slower(seq_len=x.shape[0], batch=x.shape[1])
        return x + (0 if reason is None else 1), reason

    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(rule, dynamic=True, fullgraph=True, backend="eager")
    assert _slower(batch=2) is None and _slower(batch=16) is not None  # eager: triton at batch 2, cuDNN at 16
    for batch in (2, 16, 64):  # not 1: torch.compile specializes a size of 1
        y, reason = compiled(torch.zeros(100, batch))
        assert reason is not None and "torch.compile" in reason and bool((y == 1).all()), (batch, reason)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_auto_keeps_cuda_calls_native_while_nothing_is_measured(monkeypatch):
    from fastlstm import dispatch, measured_cuda

    monkeypatch.setattr(dispatch, "_cuda_capability", lambda index: "9.0")
    monkeypatch.setattr(measured_cuda, "MEASURED", ())
    assert "no CUDA speed measured" in dispatch._faster_than_native("triton", _cuda_call())
    monkeypatch.setattr(measured_cuda, "MEASURED", _MEASURED)
    assert dispatch._faster_than_native("triton", _cuda_call()) is None
    # what is committed: rows of the documented form, read by the rule without error
    for row in measured_cuda.MEASURED:
        assert [type(v) for v in row] == [str, str, str, int, int, int, int, float], row
        assert row[1] in cuda_rule.MODES and row[2] in cuda_rule.DTYPES, row


def _grid(capability, rows):
    head = dict(gpu="NVIDIA H200", torch="2.11.0", triton="3.6.0", commit="abc1234", capability=capability)
    base = dict(mode="inference", dtype="bf16", layers=1, batch=1, hidden=128, seq=100, status="ok")
    return {"header": head, "rows": [{**base, **row} for row in rows]}


def test_cuda_rule_script_writes_the_measured_shapes(tmp_path):
    import json
    import runpy

    first = _grid("9.0", [
        dict(speedup=1.4),
        dict(batch=16, speedup=1.1),
        dict(batch=64, speedup=None, status="error: out of memory"),  # not timed: left out
        dict(batch=64, speedup=3.0, impl="stacked"),  # a variant of the grid's dry run: left out
        dict(mode="training", dtype="fp32", layers=2, batch=256, hidden=512, seq=1000, speedup=0.8123456),
        dict(batch=256, speedup=1.0496),  # just below the rule's margin: rounded down, it stays below
    ])  # fmt: skip
    second = _grid("9.0", [dict(speedup=1.3), dict(batch=16, speedup=1.25)])  # shape timed twice: the lower
    paths = []
    for k, grid in enumerate((first, second)):
        paths.append(tmp_path / f"grid{k}.json")
        paths[-1].write_text(json.dumps(grid))
    out = tmp_path / "measured.py"
    assert cuda_rule.main([*map(str, paths), "--out", str(out)]) == 0
    written = runpy.run_path(str(out))
    assert written["MEASURED"] == (
        ("9.0", "inference", "bf16", 1, 1, 128, 100, 1.3),
        ("9.0", "inference", "bf16", 1, 16, 128, 100, 1.1),
        ("9.0", "inference", "bf16", 1, 256, 128, 100, 1.049),
        ("9.0", "training", "fp32", 2, 256, 512, 1000, 0.812),
    )
    assert "NVIDIA H200, torch 2.11.0, triton 3.6.0, commit abc1234" in written["SOURCE"]
    text = out.read_text()
    assert "'" not in text.split('"""')[2]  # strings as ruff's formatter writes them: the file is committed as is


def test_cuda_rule_script_says_how_the_grid_stands_against_the_targets(tmp_path, capsys):
    import json

    grid = _grid("9.0", [
        dict(speedup=2.0),
        dict(batch=16, speedup=1.2),
        dict(batch=4, hidden=512, speedup=0.9),  # below the margin: auto keeps cuDNN (1.00x)
        dict(batch=64, speedup=None, status="error: out of memory"),
        dict(mode="training", batch=64, speedup=1.1),
        dict(mode="training", batch=256, speedup=0.8),
    ])  # fmt: skip
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    assert cuda_rule.main([str(path), "--out", str(tmp_path / "measured.py")]) == 0
    out = capsys.readouterr().out
    for line in [
        "(5 shapes timed, 1 not: skipped or failed)",
        # auto (2.0 * 1.2 * 1.0) ** (1/3), triton (2.0 * 1.2 * 0.9) ** (1/3)
        "inference, batch <= 16: geometric mean over 3 shapes: auto 1.34x (missed; target >= 1.5x), triton alone 1.29x",
        "training, batch >= 64: geometric mean over 2 shapes: auto 1.05x (met; target >= 1.0x), triton alone 0.94x",
        "(the grid's figures): on 3 of 5 shapes, slowest 1.100x at training bf16 L1 B64 H128 T100 (never below 0.95x: "
        "met)",
        # Left out, batch 4 at hidden 512 is as near to batch 1 and 16 at hidden 128 (both won), and batch 256 in
        # training to batch 64: the rule would give both to triton, where it lost
        "(each shape by the others' figures): on 2 of 5 shapes, slowest 0.800x at training bf16 L1 B256 H128 T100 "
        "(never below 0.95x: missed: 0.900x at inference bf16 L1 B4 H512 T100; 0.800x at training bf16 L1 B256 H128 "
        "T100)",
    ]:
        assert line in out, (line, out)


def test_cuda_rule_script_needs_one_compute_capability(tmp_path, capsys):
    import json

    old, other = tmp_path / "old.json", tmp_path / "other.json"
    old.write_text(json.dumps(_grid(None, [dict(speedup=1.4)])))  # written before headers kept the capability
    other.write_text(json.dumps(_grid("8.0", [dict(speedup=1.4)])))
    out = tmp_path / "measured.py"
    assert cuda_rule.main([str(old), "--out", str(out)]) == 2 and "--capability" in capsys.readouterr().err
    assert cuda_rule.main([str(old), "--out", str(out), "--capability", "9.0"]) == 0
    nine = tmp_path / "nine.json"
    nine.write_text(json.dumps(_grid("9.0", [dict(speedup=1.4)])))
    assert cuda_rule.main([str(nine), str(other), "--out", str(out)]) == 2
    assert "different compute capabilities" in capsys.readouterr().err


def test_gpu_check_ends_within_six_minutes_at_worst(tmp_path):
    """Issue 4 asks for the check in under 6 minutes, which leaves a device session's 15 room to run it again.
    Every `timeout LIMIT` of the script is stubbed by one that sleeps LIMIT/100 s, notes when it ran and answers the
    probe's question (a GPU, and pytest's plugins: "1 1 1"), and Python by a stub that returns at once (so a call
    without a limit takes no time here: the test fails if one is left out); the longest chain of limits that ran
    one after another is then the script's worst case."""
    import json
    import subprocess
    import sys

    scale = 100
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls.jsonl"
    stub_timeout = stubs / "timeout"
    stub_timeout.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time\n"
        "start = time.monotonic()\n"
        f"time.sleep(float(sys.argv[1]) / {scale})\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    f.write(json.dumps([float(sys.argv[1]), start, time.monotonic(), sys.argv[2:]]) + '\\n')\n"
        "print('1 1 1')\n"
    )
    stub_python = stubs / "python"
    stub_python.write_text("#!/bin/sh\nexit 0\n")
    for stub in (stub_timeout, stub_python):
        stub.chmod(0o755)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", PYTHON=str(stub_python),
               OUT=str(tmp_path / "out"))  # fmt: skip
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    commands = [" ".join(argv) for _, _, _, argv in runs]
    assert any("gpu_grid.py --warm" in c for c in commands) and any("gpu_grid.py --out" in c for c in commands)
    assert any("-m pytest" in c for c in commands) and any("-m fastlstm" in c for c in commands), commands
    assert any("cuda_rule.py" in c for c in commands) and any(c.endswith("python -") for c in commands), commands
    # A call's worst end: its limit after the latest worst end of the calls that had ended before it began.
    margin = 0.5 / scale  # the stubs' own start-up, far below the shortest limit's sleep
    worst_end = {}
    for i, (limit, start, _, _) in sorted(enumerate(runs), key=lambda r: r[1][1]):
        before = [worst_end[j] for j, (_, _, end, _) in enumerate(runs) if j in worst_end and end <= start + margin]
        worst_end[i] = max(before, default=0.0) + limit
    assert max(worst_end.values()) < 6 * 60, sorted(zip(worst_end.values(), commands))


def test_the_grid_times_the_rows_issue_4_judges_first_and_every_row_in_both_modes():
    rows = gpu_grid.grid(dry_run=False)
    judged = [(r["mode"] == "inference" and r["batch"] <= 16) or (r["mode"] == "training" and r["batch"] >= 64)
              for r in rows]  # fmt: skip
    assert judged == sorted(judged, reverse=True) and any(judged) and not all(judged)
    by_mode = {m: sorted(gpu_grid._row(r) for r in rows if r["mode"] == m) for m in ("inference", "training")}
    assert by_mode["inference"] == by_mode["training"] and len(set(by_mode["inference"])) == len(rows) // 2
    # Within the rest, inference first: a training row that outlasts the budget leaves no inference row untimed.
    rest = [r["mode"] for r, j in zip(rows, judged) if not j]
    assert rest == sorted(rest)


def test_collecting_the_cuda_tests_builds_nothing(tmp_path):
    """gpu_check.sh's `pytest -m cuda tests/` imports every test module in every worker: a module that asked
    whether cpp is available at import built the C++ extension there, 20-40 s of the step's 160 before the first
    CUDA test, for tests it then deselected."""
    from helpers import run_python

    cache = tmp_path / "cache"
    done = run_python(
        "-m", "pytest", "-m", "cuda", "--co", "-q", "-p", "no:cacheprovider", "tests",
        env=dict(os.environ, FASTLSTM_CACHE_DIR=str(cache)), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "tests collected" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert not cache.exists() or not any(cache.glob("cpp-*")), list(cache.iterdir())
