"""Builds a call's kernels in a child process first, so that a compiler crash ends the child, not the user's process.

Triton compiles a kernel on its first launch, inside the launching process, and its LLVM can abort there (triton
3.9: an assertion in the SLP vectorizer on float32 tiles 16 wide, which ops.FMA_NARROW_WIDTH now steers around).
An abort is no exception: nothing catches it, and the process ends with the user's model and training state.
So before this process builds the kernels a CUDA call needs, a child process runs that call's self-test
(ops._run_self_test: the same sizes, flags, kernel, precision and GPU, on two steps). A child ended by a fault
(an abort, a bad access) means building them here would kill this process too: the call goes to native (auto) or
raises (a forced backend), and the verdict is kept. One killed by SIGKILL (out of memory, most likely) counts so
for this process only. A child that ends any other way (stopped by a Ctrl+C or a job's SIGTERM, failing on its
own) changes nothing: the kernels are built here as before, and any error they raise is an ordinary exception.
Dispatch asks (crash_reason) when it plans a call, and the launchers ask again (check_launch, a dict lookup once
known) for what changed since: tiles or kernel set in the environment between calls, the compiled op's launches.

One child serves a process (_Builder): it starts on the first configuration to build (seconds: importing torch
and triton, initialising CUDA) and each build after costs the self-test's time; its compiles land in triton's
cache, which this process's own build then reads. The verdicts are kept on disk in fastlstm's cache
(backends.writable_cache_root(), "triton-builds"), per triton, torch and kernel source, GPU model, the kernels'
constants and tiles (not the batch, input size or packing, which compile nothing new) and TRITON_* /
FASTLSTM_TRITON_* environment, so that a later process starts no child for what is known. The
self-test's launch has its configuration's tiles and kernels but two time steps of one batch size, which builds
every kernel the configuration's other calls launch: no integer argument is specialised (kernels.py).

FASTLSTM_TRITON_BUILD_IN_CHILD=0 turns the guard off; under TRITON_INTERPRET=1 nothing is compiled and it is off.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from fastlstm.backends import (
    MISSING,
    BuildCrashError,
    LayerCall,
    constant_under_compile,
    remember,
    writable_cache_root,
)
from fastlstm.backends.triton import _interpreting

ENV_SWITCH = "FASTLSTM_TRITON_BUILD_IN_CHILD"
# The environment a build depends on (triton's settings, the backend's tiles and kernel choice), sent with each one
ENV_PREFIXES = ("TRITON_", "FASTLSTM_TRITON_")
# Where triton keeps or writes things, which changes no kernel: out of a verdict's key (inductor sets
# TRITON_CACHE_DIR per device on its first kernel, which had given every rank's GPU its own verdicts)
ENV_LOCATIONS = ("TRITON_CACHE_DIR", "TRITON_DUMP_DIR")
ENV_TILES = "FASTLSTM_TRITON_CONFIG"  # ops.ENV_CONFIG, named from here: what a tuning loop changes
# A child still building after this long is stopped and the call served without triton: a compile this slow is
# itself a fault (a cold build of every kernel one call needs takes seconds).
CHILD_TIMEOUT_S = 600
# A child with no build to do for this long leaves (its CUDA context holds GPU memory); the next build starts one.
CHILD_IDLE_S = 60
# What the child writes to stderr as it begins each build: a crash's words are those after the last one.
BUILD_MARK = "fastlstm build_guard: building"
# How a compiler crash ends a process (LLVM's assertions abort; a bad access faults). Any other signal came from
# outside (Ctrl+C, a job's SIGTERM, the OOM killer's SIGKILL) and says nothing about the build.
FAULT_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGTRAP")
    if hasattr(signal, name)
)
# Lines of the child's stderr quoted in a crash's reason: where LLVM says which assertion failed.
QUOTED_LINES = 4

# What of a LayerCall the child's self-test takes (the rest, and the length, it sets itself). A verdict's key holds
# less: what decides the kernels compiled (_kernels_built)
BUILD_FIELDS = ("device_type", "dtype", "batch", "input_size", "hidden_size", "proj_size", "bias", "packed", "reverse",
                "needs_grad")  # fmt: skip

_log = logging.getLogger("fastlstm")
# Both keyed by the batch too, so remembered at most REMEMBERED_MAX (backends.remember); a verdict forgotten is a
# disk-cache lookup away.
_VERDICTS: dict[str, str | None] = {}  # the disk cache's key -> verdict, for this process
_LAUNCHES: dict[tuple, str | None] = {}  # check_launch's cheap key -> verdict
# Set in the child's environment (so in anything it starts too): its own builds are the guarded ones. Not a module
# global: the child was started as `python -m` this module, so its code ran as __main__ and set the flag there,
# while ops read a second copy imported under the package's name: every child started a child for its own
# self-test, each with a CUDA context, a chain that filled an H200's memory before it unwound (a first training
# call ran for minutes).
CHILD_ENV = "FASTLSTM_BUILD_GUARD_CHILD"


def check_launch(x, batch: int, input_size: int, hidden: int, proj_size: int, bias: bool, packed: bool,
                 reverse: bool, needs_grad: bool, kernel: str) -> None:  # fmt: skip
    """Raises BuildCrashError before the launchers build kernels a child crashed building; a dict lookup once known.

    Dispatch asks crash_reason when it plans a call; this backstop, at every launch, also covers launches planned
    before their environment changed (a tuning loop setting FASTLSTM_TRITON_CONFIG or the kernel between calls)
    and the compiled op's (inductor calls it with no plan in between).
    """
    dtype = x.dtype
    key = (x.device, dtype, batch, input_size, hidden, proj_size, bias, packed, reverse, needs_grad, kernel,
           _tf32(dtype), os.environ.get(ENV_TILES))  # fmt: skip
    reason = _LAUNCHES.get(key, MISSING)
    if reason is MISSING:
        call = LayerCall(device_type=x.device.type, dtype=dtype, seq_len=2, batch=batch, input_size=input_size,
                         hidden_size=hidden, proj_size=proj_size, bias=bias, packed=packed, reverse=reverse,
                         needs_grad=needs_grad, device_index=x.device.index if x.is_cuda else None)  # fmt: skip
        reason = crash_reason(call, kernel)
        remember(_LAUNCHES, key, reason)
    if reason is not None:
        raise BuildCrashError(reason)


def crash_reason(call: LayerCall, kernel: str) -> str | None:
    """Why building the kernels `call` needs (with `kernel`) would crash this process, or None."""
    if not _applies(call):
        return None
    payload = _payload(call, kernel)
    key = _key(payload)
    reason = _VERDICTS.get(key, MISSING)
    if reason is MISSING:
        with _LOCK:  # threads asking for one configuration at once (DataParallel's) build it once
            reason = _VERDICTS.get(key, MISSING)
            if reason is MISSING:
                cached = _read_verdict(key)
                if cached is not None:
                    reason = cached["reason"]
                else:
                    reason, keep = _BUILDER.build(payload)
                    if keep:
                        _write_verdict(key, reason)
                remember(_VERDICTS, key, reason)
    return reason


def describe() -> str:
    """Where kernels are first built, and the verdicts kept on this machine (`fastlstm info`)."""
    if _interpreting():
        return "none (TRITON_INTERPRET=1 runs the kernels uncompiled)"
    if not _switched_on():
        return f"in this process ({ENV_SWITCH}=0): a compiler crash would end it"
    directory = _cache_dir()
    if directory is None:
        return "CUDA kernels first in a child process; no writable cache folder keeps their verdicts"
    verdicts = [v for v in (_read_file(path) for path in sorted(directory.glob("*.json"))) if v is not None]
    crashed = [v["reason"] for v in verdicts if v["reason"] is not None]
    text = f"CUDA kernels first in a child process; {len(verdicts)} configurations known in {directory}"
    return text + "".join(f"\n  crashed: {reason}" for reason in crashed)


def _tf32(dtype: torch.dtype) -> bool:
    """Whether float32 dots may run as TF32 (ops._precision), as torch's matmuls on CUDA do; half precision ignores
    the switch."""
    return dtype == torch.float32 and _tf32_switch()


@constant_under_compile
def _tf32_switch() -> bool:
    """torch's TF32 switch for CUDA matmuls, read through fp32_precision where torch has it (2.9+): it answers after
    either of torch's switches, where allow_tf32 raises once the newer one was set. Dynamo cannot trace that getter:
    a compiled call reads it once as a constant, and dynamo's global-state guard (which holds the switch)
    recompiles when it changes (tested)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(torch._C, "_get_fp32_precision_getter"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def _applies(call: LayerCall) -> bool:
    # Only where triton compiles: CUDA tensors, not the interpreter, and not in the child itself. A CUDA graph
    # capture may be running here: the child shares no stream with this process.
    return call.device_type == "cuda" and not _interpreting() and _switched_on() and not _in_child()


def _in_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def _switched_on() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def _payload(call: LayerCall, kernel: str) -> dict:
    """What the child needs to rebuild the call: JSON, so it crosses the process boundary as text."""
    # Not the length (the self-test runs two steps), the layer's index or the transforms around the call, which
    # change no kernel: a model fed sequences of many lengths, or stacking equal layers, is built once.
    fields = {name: getattr(call, name) for name in BUILD_FIELDS}
    fields["dtype"] = str(call.dtype).removeprefix("torch.")
    device = None
    if call.device_type == "cuda":
        device = torch.cuda.current_device() if call.device_index is None else call.device_index
    return {
        "call": fields, "kernel": kernel, "device": device, "tf32": _tf32(call.dtype),
        # As it is now: the child's own environment is the one this process had when it started the child, and
        # a tuning loop sets FASTLSTM_TRITON_CONFIG between calls
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    }  # fmt: skip


def _key(payload: dict) -> str:
    import triton

    # The GPU's model, not its index: the ranks of one job on eight equal GPUs share their verdicts
    device = payload["device"]
    gpu = None
    if device is not None:
        gpu = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    build = {k: v for k, v in payload.items() if k not in ("device", "call")}
    build["kernels"] = _kernels_built(payload)
    build["env"] = {k: v for k, v in build["env"].items() if k not in ENV_LOCATIONS}
    material = [build, gpu, triton.__version__, torch.__version__, _source_digest()]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _kernels_built(payload: dict) -> dict:
    """What of a build's call decides the kernels it compiles: their constants (sizes, dtype, whether they save the
    gates for backward, the sequence kernels' direction) and tiles, which follow the batch. Not the batch itself,
    the packing or the step kernels' direction (runtime arguments, none specialised: kernels.py), nor the input
    size or the bias (a torch GEMM's): a training run's new batch sizes (its last batch, its first evaluation)
    then start no child, which costs seconds where the idle one left after CHILD_IDLE_S."""
    from fastlstm.backends.triton import ops

    call, kernel = payload["call"], payload["kernel"]
    hidden, proj = call["hidden_size"], call["proj_size"]
    tiles = ops._blocks(call["batch"], hidden, proj or hidden, kernel, getattr(torch, call["dtype"]))
    return {
        "dtype": call["dtype"], "hidden_size": hidden, "proj_size": proj, "needs_grad": call["needs_grad"],
        "reverse": call["reverse"] if kernel == "sequence" else None, "tiles": tiles,
    }  # fmt: skip


@functools.cache
def _source_digest() -> str:
    """A digest of the backend's sources: a verdict holds for the kernels it was reached with."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _child_command() -> list[str]:
    # The child imports this fastlstm, wherever it was imported from (an installed copy, a source tree): its
    # root first where it is not on the path already, and not the working directory that -c puts first (a
    # fastlstm folder there had shadowed the installed one, and the failed child turned the guard off).
    root = str(Path(__file__).resolve().parents[3])
    code = (
        f"import os, sys; root = {root!r}; sys.path[:] = [p for p in sys.path if p != '']; "
        "sys.path.insert(0, root) if root not in {os.path.realpath(p) for p in sys.path} else None; "
        f"from {__name__} import _child_main; sys.exit(_child_main())"
    )
    return [sys.executable, "-c", code]


class _Builder:
    """The child process of this process: it builds configurations one after another, as they are asked for.

    One child serves a process's whole life (importing torch and triton and initialising CUDA take it seconds;
    each build after that costs what the self-test costs), and leaves after CHILD_IDLE_S without work, so
    that its CUDA context does not hold GPU memory through a training run whose configurations are all known.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.owner = 0  # the pid that started it: a forked process starts its own
        self.stderr = None
        self.unable: str | None = None  # why no child can run here (then none is tried again)
        self.stops_at_exit = False

    def build(self, payload: dict) -> tuple[str | None, bool]:
        """(the crash's reason or None, whether that verdict may be kept on disk)."""
        if self.unable is not None:
            return None, False
        try:
            outcome = self._build_once(payload)
            if outcome == "left":  # it left, idle, as the request went out: once more, with a new child
                outcome = self._build_once(payload)
        except OSError as error:  # the pipes failed: nothing learnt, the in-process build decides
            self._stop()
            self.unable = f"failed: {type(error).__name__}: {error}"
            _log.info("fastlstm: the child process building triton kernels %s", self.unable)
            return None, False
        except BaseException:
            # A KeyboardInterrupt while it builds, say: its reply would come to the next request, answering for
            # another configuration
            self._stop()
            raise
        return (None, False) if outcome == "left" else outcome

    def _build_once(self, payload: dict) -> tuple[str | None, bool] | str:
        what = f"the triton {payload['kernel']} kernels for {_describe(payload['call'])}"
        if self.process is None or self.owner != os.getpid() or self.process.poll() is not None:
            try:
                self._start()
            except OSError as error:  # nothing learnt: the in-process build decides, as without the guard
                self.unable = f"could not start: {error}"
                _log.info("fastlstm: no child process to build triton kernels in: %s", error)
                return None, False
        start = time.monotonic()
        request = json.dumps(payload) + "\n"
        try:
            self.process.stdin.write(request.encode())
            self.process.stdin.flush()
            reply = _read_line(self.process.stdout.fileno(), start + CHILD_TIMEOUT_S)
        except BrokenPipeError:  # it died before reading: how it ended says why
            reply = b""
        except TimeoutError:
            self._stop()
            return f"building {what} took over {CHILD_TIMEOUT_S} s in a child process", False
        if reply:
            return None, True  # built, whatever the self-test said: this process's own self-test or call reports it
        code = self.process.wait()
        said = self._said_since_request()
        self._forget()
        if code < 0 and -code in FAULT_SIGNALS:
            quoted = " | ".join(_cause(said))
            return (
                f"building {what} killed a child process with {_signal_name(-code)} (a compiler crash that would "
                f"have ended this process)" + (f"; it said: {quoted}" if quoted else "")
            ), True
        if code == -signal.SIGKILL:  # the out-of-memory killer, most likely: the build here could meet it too
            return f"building {what} got a child process killed (SIGKILL: out of memory?); not kept", False
        if code < 0:  # asked to stop from outside (a signal to the job): nothing learnt about the build
            _log.info("fastlstm: the child process building %s was stopped by %s", what, _signal_name(-code))
            return None, False
        if code == 0:
            return "left"
        # It failed on its own: it cannot run builds at all (no CUDA for a second process, say)
        tail = " | ".join(said.strip().splitlines()[-QUOTED_LINES:])
        self.unable = f"exited with {code}: {tail}"
        _log.info("fastlstm: the child process building triton kernels %s", self.unable)
        return None, False

    def _start(self) -> None:
        self._forget()  # one that exited, or the parent's (inherited by a fork): its pipes are closed here
        if not self.stops_at_exit:
            atexit.register(self._stop)  # a child still building when this process ends ends with it
            self.stops_at_exit = True
        env = {**os.environ, CHILD_ENV: "1"}
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: nothing blocks on what the compiler writes
        # In this process's group: a Ctrl+C or a job's SIGTERM ends it with this process (which says nothing
        # about the build; see _build_once), and timeout's kill of the group reaches it
        self.process = subprocess.Popen(
            _child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env
        )
        self.owner = os.getpid()

    def _stop(self) -> None:
        if self.process is not None and self.owner == os.getpid():
            self.process.kill()
            self.process.wait()
        self._forget()

    def _forget(self) -> None:
        if self.process is not None:
            for pipe in (self.process.stdin, self.process.stdout, self.stderr):
                try:
                    pipe.close()
                except OSError:  # a write the child never read: nothing to keep
                    pass
        self.process = self.stderr = None

    def _said_since_request(self) -> str:
        """What the child wrote to stderr since it began the last build (it marks each one)."""
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace")
        return text.rpartition(BUILD_MARK)[2]


def _read_line(fd: int, deadline: float) -> bytes:
    """A line from the pipe, b"" at its end; TimeoutError after `deadline` (time.monotonic())."""
    waiting = select.poll()  # not select.select: a busy process's descriptors pass FD_SETSIZE (1024)
    waiting.register(fd, select.POLLIN)
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not waiting.poll(left * 1000):
            raise TimeoutError
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        line += chunk
    return line


_BUILDER = _Builder()
_LOCK = threading.Lock()  # one conversation with the child at a time (DataParallel calls from threads)


def _cause(stderr: str) -> list[str]:
    """The lines of a crashed child's stderr that say why: LLVM's assertion or error (a stack dump follows them),
    else the last few."""
    lines = [line.strip()[:500] for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if "Assertion" in line or "LLVM ERROR" in line or "error:" in line]
    return said[:QUOTED_LINES] or lines[-QUOTED_LINES:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe(fields: dict) -> str:
    proj = f"-P{fields['proj_size']}" if fields["proj_size"] else ""
    flags = "".join(
        f"-{name}" for name, on in [("nobias", not fields["bias"]), ("packed", fields["packed"]),
                                    ("reverse", fields["reverse"]), ("grad", fields["needs_grad"])] if on
    )  # fmt: skip
    return f"{fields['dtype']} B{fields['batch']}-I{fields['input_size']}-H{fields['hidden_size']}{proj}{flags}"


def _cache_dir() -> Path | None:
    """Where verdicts are kept; None without a usable cache folder (each process then builds in a child)."""
    try:
        return writable_cache_root() / "triton-builds"
    except OSError:
        return None


def _read_verdict(key: str) -> dict | None:
    directory = _cache_dir()
    return None if directory is None else _read_file(directory / f"{key}.json")


def _read_file(path: Path) -> dict | None:
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and "reason" in verdict else None


def _write_verdict(key: str, reason: str | None) -> None:
    """Atomically (processes of one job may build the same configuration at once); a cache that cannot be written
    only costs the next process a child."""
    directory = _cache_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
            json.dump({"reason": reason}, f)
        os.replace(f.name, directory / f"{key}.json")
    except OSError as error:
        _log.info("fastlstm: could not keep a triton build verdict in %s: %s", directory, error)


def _child_main() -> int:
    """Runs in the child: one self-test per line read (what _payload wrote), one line of reply each."""
    os.environ[CHILD_ENV] = "1"  # also when started by hand
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints (the kernels, torch) goes to stderr, not into the replies
    from fastlstm.backends.triton import ops

    # select on a buffered stdin is sound here: the parent sends a line only after the reply to the one before.
    while select.select([sys.stdin], [], [], CHILD_IDLE_S)[0]:
        line = sys.stdin.readline()
        if not line:
            break  # the parent is gone
        sys.stderr.write(f"{BUILD_MARK} {line}")
        sys.stderr.flush()
        payload = json.loads(line)
        for name in [name for name in os.environ if name.startswith(ENV_PREFIXES)]:
            del os.environ[name]
        os.environ.update(payload["env"])
        fields = dict(payload["call"], dtype=getattr(torch, payload["call"]["dtype"]), seq_len=2)
        if payload["device"] is not None:
            torch.cuda.set_device(payload["device"])
        torch.backends.cuda.matmul.allow_tf32 = payload["tf32"]
        try:
            failed = ops._run_self_test(LayerCall(**fields), payload["kernel"])
        except Exception as error:  # an ordinary failure, which the parent's own self-test or call meets and reports
            failed = f"{type(error).__name__}: {error}"
        if payload["device"] is not None:
            torch.cuda.empty_cache()  # hold no more GPU memory than the context while idle
        replies.write(json.dumps({"self_test": failed}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
