"""The triton backend builds a call's kernels in a child process first (build_guard): a compiler that aborts ends
the child, and the call goes to native (auto) or raises (backend="triton") instead of the process dying.

On a GPU-less machine the guard is off (the interpreter compiles nothing); these tests switch it on for CPU calls,
whose child runs the self-test under the interpreter, and stand in crashing children where a GPU build would crash.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import auto_falls_back_to_native, require_triton, small_layer_call  # noqa: E402

triton = require_triton()

import fastlstm  # noqa: E402
from fastlstm import dispatch  # noqa: E402
from fastlstm.backends import LayerCall  # noqa: E402
from fastlstm.backends.triton import BACKEND, build_guard, triton_version  # noqa: E402
from fastlstm.backends.triton import ops as triton_ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SCRIPTS = Path(__file__).parent / "scripts"
# What a crashing compiler leaves on stderr: LLVM's assertion, then its stack dump (shortened).
LLVM_CRASH = (
    "import os, sys\n"
    "sys.stderr.write('some warning first\\n')\n"
    'sys.stderr.write("python: SLPVectorizer.cpp:27316: void scheduleBlock(): Assertion `all_of(...)\' failed.\\n")\n'
    "sys.stderr.write('Stack dump:\\n0.  Program arguments: python\\n #0 0x00007f llvm::sys::PrintStackTrace\\n')\n"
    "sys.stderr.flush()\n"
    "os.abort()\n"
)

# A child that speaks the protocol (a line of reply for each line read) without building anything.
ANSWERING_CHILD = "import sys\nfor line in sys.stdin:\n    print('{\"self_test\": null}', flush=True)\n"


def _call(**kw) -> LayerCall:
    return small_layer_call(kw.pop("device_type", DEVICE), **kw)


@pytest.fixture
def guard(monkeypatch, tmp_path):
    """The guard on for this device's calls, with an empty verdict cache on disk and in memory."""
    monkeypatch.setenv("FASTLSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build_guard, "_VERDICTS", {})
    monkeypatch.setattr(build_guard, "_LAUNCHES", {})
    monkeypatch.setattr(build_guard, "_applies", lambda call: True)
    monkeypatch.setattr(build_guard, "_BUILDER", build_guard._Builder())
    monkeypatch.setattr(triton_ops, "_SELF_TESTS", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    yield tmp_path / "triton-builds"
    build_guard._BUILDER._stop()


@pytest.fixture
def sigint_reaches_children():
    """Children start with SIGINT as a terminal's Ctrl+C finds it. A test process that ignores it (pytest run as a
    background job of a non-interactive shell: `pytest ... &` in a script) hands that on through exec, and a child
    then outlives the signal the test sends; a Python handler in the parent is reset to the default in the child."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _child_runs(monkeypatch, code: str | None = None) -> list[list[str]]:
    """Makes the guard's child run `code` (python -c; None: the real child), and returns the commands it starts."""
    commands = []
    real = build_guard._child_command()

    def command():
        commands.append(real if code is None else [sys.executable, "-c", code])
        return commands[-1]

    monkeypatch.setattr(build_guard, "_child_command", command)
    return commands


def _ask_child(*payloads: dict) -> list[dict]:
    """Builds asked of one real child, by hand: its replies."""
    child = subprocess.Popen(build_guard._child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    replies, _ = child.communicate("".join(json.dumps(p) + "\n" for p in payloads), timeout=300)
    assert child.returncode == 0
    return [json.loads(line) for line in replies.splitlines()]


def _verdicts(folder: Path) -> list:
    return [json.loads(path.read_text())["reason"] for path in sorted(folder.glob("*.json"))]


def test_off_for_the_interpreter_and_cpu_tensors(monkeypatch):
    monkeypatch.setattr(build_guard, "_child_command", lambda: pytest.fail("no child may run here"))
    assert build_guard.crash_reason(_call(device_type="cpu"), "step") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert build_guard.crash_reason(_call(device_type="cuda"), "step") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(build_guard.ENV_SWITCH, "0")
    assert build_guard.crash_reason(_call(device_type="cuda"), "step") is None


def test_the_child_runs_the_self_test(guard):
    """The real child: this fastlstm's self-test of the call, in a fresh interpreter (here under TRITON_INTERPRET)."""
    assert _ask_child(build_guard._payload(_call(), "sequence")) == [{"self_test": None}]


@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
def test_the_child_starts_no_child_of_its_own(needs_grad, guard, monkeypatch, tmp_path):
    """The child's self-test launches its kernels through the guard's check as well, where the guard must be off.
    On an H200 it was not (the child ran as `python -m`, its flag set on a copy of the module that ops did not
    read): each child started one for its own self-test, a chain of processes with a CUDA context each, until the
    GPU's memory ran out (a first training call ran for minutes). Here the real child counts its CPU calls as a
    GPU's, and records any child it would start instead of starting it."""
    hook, started = tmp_path / "hook", tmp_path / "started.txt"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import dataclasses\n"
        "from fastlstm.backends.triton import build_guard\n"
        "real = build_guard._applies\n"
        "build_guard._interpreting = lambda: False\n"
        "build_guard._applies = lambda call: real(dataclasses.replace(call, device_type='cuda'))\n"
        "def record(self):\n"
        f"    with open({str(started)!r}, 'a') as f:\n"
        "        f.write('a child of the child\\n')\n"
        "    raise OSError('recorded, not started')\n"
        "build_guard._Builder._start = record\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    assert build_guard.crash_reason(_call(needs_grad=needs_grad), "sequence") is None
    assert _verdicts(guard) == [None]  # the child answered
    assert not started.exists(), started.read_text()


def test_the_child_imports_this_fastlstm_not_one_in_the_working_directory(guard, monkeypatch, tmp_path):
    """python -c puts the working directory first on the child's path: a fastlstm folder there (a checkout, with
    an installed copy serving this process) failed the child, and a failed child turns the guard off."""
    (tmp_path / "fastlstm").mkdir()
    (tmp_path / "fastlstm" / "__init__.py").write_text("raise ImportError('the wrong fastlstm')\n")
    monkeypatch.chdir(tmp_path)
    assert build_guard.crash_reason(_call(), "sequence") is None
    assert build_guard._BUILDER.unable is None
    assert _verdicts(guard) == [None]  # the child answered


def test_an_interrupted_build_leaves_no_reply_for_the_next(guard, monkeypatch):
    """A KeyboardInterrupt while the child builds: the child is stopped, so its late reply cannot answer the next
    configuration's request (a stand-in child that crashes on batch 2 had been read as building it fine)."""
    _child_runs(monkeypatch, ANSWERING_CHILD)
    real_read = build_guard._read_line

    def interrupted(fd, deadline):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_guard, "_read_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_guard.crash_reason(_call(), "step")
    assert build_guard._BUILDER.process is None
    monkeypatch.setattr(build_guard, "_read_line", real_read)
    assert build_guard.crash_reason(_call(hidden_size=16), "step") is None
    assert len(_verdicts(guard)) == 1  # the interrupted one left no verdict


def test_the_childs_path_finds_this_fastlstm_through_a_symlinked_entry(tmp_path):
    """Where the path reaches this fastlstm's root through a symlink (a venv under a linked home), the child keeps
    the path's order: its resolved root, compared with the resolved entries, is already there."""
    root = Path(build_guard.__file__).resolve().parents[3]
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    code = build_guard._child_command()[2]
    probe = code.split("from fastlstm")[0] + "print(sys.path[:2])"
    env = {**os.environ, "PYTHONPATH": str(link)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert ast.literal_eval(out)[0] == str(link), out  # not the resolved root inserted ahead of it


def test_threads_asking_at_once_build_a_configuration_once(guard, monkeypatch):
    """DataParallel's threads meet a new configuration together: one build, which the others wait for."""
    import threading
    import time

    builds = []

    def build(payload):
        builds.append(payload)
        time.sleep(0.2)
        return None, True

    monkeypatch.setattr(build_guard._BUILDER, "build", build)
    barrier = threading.Barrier(4)

    def ask():
        barrier.wait()
        build_guard.crash_reason(_call(), "step")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1


def test_a_ctrl_c_ends_the_child_by_the_signal(guard, sigint_reaches_children):
    """A Ctrl+C reaches the child with its parent's process group: it must end by SIGINT (Python ends an uncaught
    KeyboardInterrupt so; the child catches only Exception), which the parent reads as "stopped" (nothing
    learnt), not by an exit status, which reads as a child that cannot build and turns the guard off."""
    child = subprocess.Popen(build_guard._child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child.stdin.write(json.dumps(build_guard._payload(_call(), "step")) + "\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline()) == {"self_test": None}  # now waiting for the next request
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) == -signal.SIGINT
    finally:
        child.kill()
        child.wait()


def test_one_child_builds_every_configuration_and_the_verdicts_are_kept(guard, monkeypatch):
    commands = _child_runs(monkeypatch)
    kernel = "sequence"
    assert build_guard.crash_reason(_call(), kernel) is None
    assert build_guard.crash_reason(_call(hidden_size=16, proj_size=3, reverse=True), "step") is None
    assert len(commands) == 1 and build_guard._BUILDER.process.poll() is None
    assert _verdicts(guard) == [None, None]
    # Another process (an empty memory) reads the verdict instead of starting a child, whatever the call's length
    monkeypatch.setattr(build_guard, "_VERDICTS", {})
    monkeypatch.setattr(build_guard, "_child_command", lambda: pytest.fail("the verdict was on disk"))
    assert build_guard.crash_reason(_call(seq_len=1000, layer=3), kernel) is None


def test_the_child_builds_with_each_requests_environment_and_survives_failing_kernels(guard, monkeypatch):
    """Each build runs with the environment the request carries (a tuning loop sets FASTLSTM_TRITON_CONFIG between
    calls, after the child started). A kernel that raises is an ordinary error, which the self-test in this
    process reports: the child replies with it and goes on, so nothing is taken for a crash."""
    plain = build_guard._payload(_call(), "step")
    monkeypatch.setenv(triton_ops.ENV_CONFIG, "BLOCK_B=3")  # not a power of two: the launcher refuses it
    tuned = build_guard._payload(_call(), "step")
    monkeypatch.delenv(triton_ops.ENV_CONFIG)
    replies = _ask_child(plain, tuned, plain)
    assert replies[0] == replies[2] == {"self_test": None}
    assert "BLOCK_B must be a power of two" in replies[1]["self_test"]


def test_a_crashing_child_is_reported_with_llvms_words_and_kept(guard, monkeypatch):
    commands = _child_runs(monkeypatch, LLVM_CRASH)
    reason = build_guard.crash_reason(_call(proj_size=5, packed=True), "sequence")
    assert "killed a child process with SIGABRT" in reason
    assert "sequence kernels for float32 B3-I4-H8-P5-packed-grad" in reason
    assert "Assertion `all_of(...)' failed." in reason
    assert "Stack dump" not in reason and "some warning" not in reason
    assert _verdicts(guard) == [reason]
    assert build_guard.crash_reason(_call(proj_size=5, packed=True), "sequence") == reason
    assert len(commands) == 1  # the verdict is remembered in memory
    assert build_guard.crash_reason(_call(), "sequence") is not None
    assert len(commands) == 2  # the next build starts a new child


@pytest.mark.parametrize(
    "code, why",
    [
        ("raise SystemExit(3)", "failed"),
        ("pass", "left"),
        ("import os; os.kill(os.getpid(), 11)", "fault"),
        ("import os; os.kill(os.getpid(), 9)", "killed"),
        ("import os; os.kill(os.getpid(), 15)", "stopped"),
        ("import os; os.kill(os.getpid(), 2)", "stopped"),
    ],
    ids=["failed", "left", "SIGSEGV", "SIGKILL", "SIGTERM", "SIGINT"],
)
def test_how_a_child_ends_decides(code, why, guard, monkeypatch, sigint_reaches_children):
    """A child that fails (no CUDA for it, say) could build nothing: nothing learnt, nothing kept, and no other is
    started in this process. One that leaves (idle) as a request goes out is started again, once. One ended by a
    fault signal is taken as a crash and kept; by SIGKILL (the out-of-memory killer, most likely), as a crash for
    this process only; by a signal asking it to stop (a job's SIGTERM, a Ctrl+C), as nothing learnt: that
    verdict, kept, had sent the configuration to native in every later process."""
    commands = _child_runs(monkeypatch, code)
    reason = build_guard.crash_reason(_call(), "step")
    if why == "fault":
        assert "killed a child process with SIGSEGV" in reason
        assert _verdicts(guard) == [reason]
        return
    if why == "killed":
        assert "SIGKILL" in reason and "not kept" in reason
        assert _verdicts(guard) == []
        return
    assert reason is None and _verdicts(guard) == []
    assert build_guard.crash_reason(_call(hidden_size=16), "step") is None
    assert len(commands) == {"failed": 1, "left": 4, "stopped": 2}[why]


def test_a_forked_process_starts_its_own_child(guard, monkeypatch):
    """A fork (a DataLoader worker, say) inherits the parent's child, which answers the parent: it starts its own
    and leaves the parent's alone."""
    commands = _child_runs(monkeypatch, ANSWERING_CHILD)
    assert build_guard.crash_reason(_call(), "step") is None
    parents_child = build_guard._BUILDER.process
    pid = os.fork()
    if pid == 0:  # the forked process: exit status 0 only if it built with a child of its own
        ok = False
        try:
            ok = build_guard.crash_reason(_call(hidden_size=16), "step") is None and len(commands) == 2
            ok = ok and build_guard._BUILDER.process is not parents_child
            build_guard._BUILDER._stop()
        finally:
            os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert parents_child.poll() is None and build_guard._BUILDER.process is parents_child
    assert build_guard.crash_reason(_call(batch=3), "sequence") is None
    assert len(commands) == 1


def test_a_process_with_many_open_files_still_hears_its_child(guard, monkeypatch):
    """The child's pipes get descriptors past 1024, where select.select refuses them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if soft < wanted + 64:
        if hard != resource.RLIM_INFINITY and hard < wanted + 64:
            pytest.skip(f"this process may open {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted + 64, hard))
        monkeypatch.setattr(build_guard, "_BUILDER", build_guard._Builder())  # restored before the limit
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(wanted)]
    try:
        _child_runs(monkeypatch, ANSWERING_CHILD)
        assert build_guard.crash_reason(_call(), "step") is None
        assert build_guard._BUILDER.process.stdout.fileno() > 1024
        build_guard._BUILDER._stop()
    finally:
        for fd in held:
            os.close(fd)
        if soft < wanted + 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_child_that_hangs_is_stopped_and_not_kept(guard, monkeypatch):
    _child_runs(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(build_guard, "CHILD_TIMEOUT_S", 1)
    reason = build_guard.crash_reason(_call(), "step")
    assert reason is not None and "took over 1 s in a child process" in reason
    assert _verdicts(guard) == []


def test_a_verdict_cache_that_cannot_be_written_costs_only_a_child(guard, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTLSTM_CACHE_DIR", str(blocker))  # a file: the folder under it cannot be made
    commands = _child_runs(monkeypatch, LLVM_CRASH)
    assert "SIGABRT" in build_guard.crash_reason(_call(), "step")
    monkeypatch.setattr(build_guard, "_VERDICTS", {})
    assert "SIGABRT" in build_guard.crash_reason(_call(), "step")
    assert len(commands) == 2


def test_verdicts_are_kept_apart_by_what_the_build_depends_on(guard, monkeypatch):
    key = build_guard._key(build_guard._payload(_call(), "step"))
    # What compiles nothing new shares a verdict: the length, the layer, a batch with the same tiles, the input
    # size, the bias, packing, and the step kernels' direction (runtime arguments)
    same = [
        _call(seq_len=77, layer=2), _call(batch=1), _call(batch=32), _call(input_size=100), _call(bias=False),
        _call(packed=True), _call(reverse=True),
    ]  # fmt: skip
    assert {build_guard._key(build_guard._payload(call, "step")) for call in same} == {key}
    others = [
        build_guard._payload(_call(), "sequence"),
        build_guard._payload(_call(reverse=True), "sequence"),  # the sequence kernels' direction is a constant
        build_guard._payload(_call(hidden_size=16), "step"),
        build_guard._payload(_call(proj_size=4), "step"),
        build_guard._payload(_call(dtype=torch.float16), "step"),
        build_guard._payload(_call(dtype=torch.float16, batch=33), "step"),  # other tiles (float32's are 16 x 16 here)
        build_guard._payload(_call(needs_grad=False), "step"),
    ]
    assert len({key, *(build_guard._key(p) for p in others)}) == 8
    monkeypatch.setenv(triton_ops.ENV_CONFIG, "num_warps=8")
    assert build_guard._key(build_guard._payload(_call(), "step")) != key
    monkeypatch.delenv(triton_ops.ENV_CONFIG)
    # where triton keeps its files is no part of a build (inductor sets TRITON_CACHE_DIR per device)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/triton/1")
    assert build_guard._key(build_guard._payload(_call(), "step")) == key
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    assert build_guard._key(build_guard._payload(_call(), "step")) != key
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION")
    # torch's switch through the API other tests may have used (after fp32_precision was set, allow_tf32 raises);
    # a property of torch's: monkeypatch cannot restore it
    matmul = torch.backends.cuda.matmul
    switch = "fp32_precision" if hasattr(torch._C, "_get_fp32_precision_getter") else "allow_tf32"
    before = getattr(matmul, switch)
    flipped = ("ieee" if build_guard._tf32_switch() else "tf32") if switch == "fp32_precision" else not before
    setattr(matmul, switch, flipped)
    try:
        assert build_guard._key(build_guard._payload(_call(), "step")) != key
    finally:
        setattr(matmul, switch, before)


def test_the_child_builds_on_the_calls_device_not_the_current_one(monkeypatch):
    """A model on cuda:1 in a process that never called torch.cuda.set_device: the child builds and tests on
    device 1, which the call names (LayerCall.device_index), not on the current device 0. The module passes the
    input's device index through its plan."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert build_guard._payload(_call(device_type="cuda", device_index=1), "step")["device"] == 1
    assert build_guard._payload(_call(device_type="cuda"), "step")["device"] == 0
    from fastlstm import module

    shape = module._CallShape("cuda", torch.float32, 5, 3, False, True, 4, 8, 0, 2, 1, True, device_index=1)
    monkeypatch.setattr(module.dispatch, "plan", lambda requested, calls: [call.device_index for call in calls])
    assert module._plan_for.__wrapped__("auto", shape) == (1, 1)


def test_auto_routes_around_a_crashing_build_and_a_forced_triton_raises(guard, monkeypatch):
    """auto (made to pick triton here) warns once and gives native's numbers; backend="triton" raises the crash
    as an error at the call, where the build would have ended the process."""
    monkeypatch.setattr(triton_ops, "_run_self_test", lambda call, kernel: pytest.fail("built after a crash"))
    _child_runs(monkeypatch, LLVM_CRASH)
    _, x = auto_falls_back_to_native(monkeypatch, DEVICE, "triton backend is unavailable.*SIGABRT.*Assertion")
    forced = fastlstm.LSTM(4, 8, 2, device=DEVICE, backend="triton")
    with pytest.raises(fastlstm.backends.BuildCrashError, match="cannot serve layer 0.*SIGABRT"):
        forced(x)


def test_a_launch_planned_before_its_environment_changed_is_guarded_too(guard, monkeypatch):
    """A tuning loop plans a call, then sets other tiles (FASTLSTM_TRITON_CONFIG) or the other kernel between calls:
    the launchers ask again before building, and raise where a child crashed building them."""
    commands = _child_runs(monkeypatch, ANSWERING_CHILD)
    torch.manual_seed(0)
    m = fastlstm.LSTM(4, 8, device=DEVICE, backend="triton")
    x = torch.randn(5, 3, 4, device=DEVICE)
    m(x)
    assert len(commands) == 1  # dispatch's question and the launch's: one build
    build_guard._BUILDER._stop()
    _child_runs(monkeypatch, LLVM_CRASH)
    monkeypatch.setenv(triton_ops.ENV_CONFIG, "num_warps=2")
    with pytest.raises(build_guard.BuildCrashError, match="SIGABRT.*Assertion"):
        m(x)
    monkeypatch.delenv(triton_ops.ENV_CONFIG)
    m(x)  # the tiles it was planned with still run
    other = "sequence" if triton_ops.choose_kernel(3, 8, 8, x.dtype) == "step" else "step"
    monkeypatch.setenv(triton_ops.ENV_KERNEL, other)
    with pytest.raises(fastlstm.BackendUnavailableError):  # what a forced backend raises when it cannot serve
        m(x)


def test_check_counts_a_crash_as_a_failure(guard, monkeypatch, capsys):
    """`python -m fastlstm check --backend triton` on a GPU whose compiler crashes: each configuration says CRASH
    and the run fails (a backend that cannot serve a dtype is skipped instead)."""
    from fastlstm.__main__ import main

    _child_runs(monkeypatch, LLVM_CRASH)
    assert main(["check", "--backend", "triton", "--device", DEVICE, "--dtype", "float32"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("triton ")]
    assert lines and all(" CRASH fastlstm backend 'triton' cannot serve layer 0" in line for line in lines), lines
    assert all("SIGABRT" in line for line in lines)


def test_info_says_where_kernels_are_built_and_what_crashed(guard, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert build_guard.describe().startswith("none (TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(build_guard.ENV_SWITCH, "0")
    assert "in this process" in build_guard.describe()
    monkeypatch.delenv(build_guard.ENV_SWITCH)
    _child_runs(monkeypatch, ANSWERING_CHILD)
    build_guard.crash_reason(_call(), "step")
    build_guard._BUILDER._stop()
    _child_runs(monkeypatch, LLVM_CRASH)
    crash = build_guard.crash_reason(_call(hidden_size=16), "step")
    (guard / "partial.json").write_text("{")  # a file cut short is not a verdict
    assert build_guard.describe() == (
        f"CUDA kernels first in a child process; 2 configurations known in {guard}\n  crashed: {crash}"
    )


@pytest.mark.skipif(
    triton_version() != (3, 9), reason="the launch scripts/triton_abort.py compiles aborted triton 3.9's compiler"
)
def test_a_real_compiler_abort_is_caught(guard, monkeypatch):
    """Triton 3.9's LLVM, compiling for sm_90 (no GPU needed) a tile ops._blocks avoids, aborts the child."""
    pytest.importorskip("triton.backends.nvidia", reason="this triton build has no NVIDIA backend")
    script = [sys.executable, str(SCRIPTS / "triton_abort.py")]
    monkeypatch.setattr(build_guard, "_child_command", lambda: script)
    reason = build_guard.crash_reason(_call(hidden_size=16, batch=40), "step")
    assert f"killed a child process with {signal.SIGABRT.name}" in reason
    assert "SLPVectorizer" in reason and "must be scheduled at this point" in reason


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_build_in_a_child_once(dtype, monkeypatch, tmp_path):
    """On a GPU the real guard: the child builds and runs the kernels, and the next process reads its verdict."""
    monkeypatch.setenv("FASTLSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build_guard, "_VERDICTS", {})
    call = _call(device_type="cuda", dtype=dtype, batch=5, hidden_size=48, proj_size=24)
    assert BACKEND.crash_reason(call) is None
    assert _verdicts(tmp_path / "triton-builds") == [None]


def test_remembered_verdicts_stay_bounded_whatever_the_batches(monkeypatch):
    """Each new batch size is a new launch key: a stream of varying batches must not grow the remembered verdicts
    (or the self-tests) without bound, and a verdict forgotten is found again."""
    monkeypatch.setattr(fastlstm.backends, "REMEMBERED_MAX", 8)
    monkeypatch.setattr(build_guard, "_LAUNCHES", {})
    monkeypatch.setattr(triton_ops, "_SELF_TESTS", {})
    monkeypatch.setattr(triton_ops, "_run_self_test", lambda call, kernel: "wrong numbers" if call.batch == 3 else None)
    x = torch.zeros(2, 1, 3)
    for batch in range(1, 40):
        build_guard.check_launch(x, batch, 3, 4, 0, True, False, False, False, "sequence")
        assert triton_ops.self_test(_call(batch=batch)) == ("wrong numbers" if batch == 3 else None)
        assert len(build_guard._LAUNCHES) <= 8 and len(triton_ops._SELF_TESTS) <= 8
    assert triton_ops.self_test(_call(batch=3)) == "wrong numbers"  # forgotten, then asked again
