"""The C++ CPU backend: csrc/ (lstm_cpu.cpp, lstm_ops.cpp, headers) built on first use with cpp_extension + ninja.

Build and cache
    The extension is compiled lazily (first call of `unavailable_reason()`, `layer()` or `build()`, never at
    import) into a per-user cache directory, `$FASTLSTM_CACHE_DIR` or `$XDG_CACHE_HOME/fastlstm` or
    `~/.cache/fastlstm`, in a sub-directory named by a hash of the sources, torch and Python versions, the
    compiler, the flags and the CPU (the build uses -march=native). A finished build leaves a `BUILT` marker
    (the library's size and SHA-256); later processes load the library straight from there without running the
    compiler. `import fastlstm` defines the ops' schemas without loading anything (saved torch.export programs
    name the ops, and load before any call); the first call of an op loads the library. A library that no
    longer matches its marker is never loaded (a truncated one crashed dlopen); the next first use rebuilds it.
    A build first logs one warning through the `fastlstm` logger (stderr by default): the call that triggers it
    blocks meanwhile.
    Concurrent builds in the same directory are serialised by an exclusive flock on `build.lock` there, which
    the kernel releases when its holder dies: a build killed half way (a CI timeout, the OOM killer) does not
    leave the next process waiting forever on cpp_extension's own lock file, as that file alone did.
    `$FASTLSTM_CXX` (or else `$CXX`) chooses the compiler; `$FASTLSTM_CXXFLAGS` adds compiler flags after
    ours (e.g. `-march=x86-64-v3` to build for a family of CPUs rather than this one). A failing build never
    raises out of `unavailable_reason()`; it returns the compiler's error text, and `layer()` raises a
    RuntimeError naming it.

Ops (namespace `fastlstm`; schemas and fakes here, at import; kernels and autograd (cpp_lstm_fwd's Autograd
kernel) in C++, loaded on first use, with stand-ins that load them until then; under torch.func's gradient
transforms, which cannot run a C++ autograd Function, the layer takes the same ops through _FuncLayer instead)
    cpp_lstm_stack_fwd(x, h0?, c0?, weights, batch_sizes?, biases, proj, bidirectional) -> (y, h_n, c_n):
                 inference of every layer and direction in one call (the module's one-call inference stack)
    cpp_lstm_fwd(x, h0, c0, w_ih, w_hh, b?, w_hr?, batch_sizes?, reverse, save) -> (y, hT, cT, gates, c_hist):
                 gates and c_hist are the state backward reads; a gradient reaching them is ignored (they require
                 grad with the rest: compiled autograd refuses a C++ function that marks an output otherwise)
    cpp_lstm_bwd(grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, w_hr?, batch_sizes?, y, gates, c_hist,
                 reverse, has_bias, weight_grads=True, input_grad=True) -> (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr):
                 the weight gradients empty ([0]) without weight_grads, which the layer's autograd passes where no
                 weight needs a gradient (frozen weights), and dx without input_grad (an input that needs none)
    cpp_lstm_bwd_rows(grad_y, ..., c_hist, reverse, input_grad=True) -> (dx, dh0, dc0, dgates, h_prev, dh_out,
                 h_raw): backward without the weight gradients, for their sums per sample under torch.vmap
                 (float32, float64); dx empty without input_grad
    gates [T, B, 4H] (activated) and c_hist [T, B, H] are what backward needs; they are empty ([0]) when
    save is false (inference), and float32 for bfloat16 and float16 inputs.

Tuning knobs (read once per process by the C++ code; for measurements and tests, not for users). Numbers are
whole numbers of 0 or more (FASTLSTM_TEAM_MIN_HIDDEN and FASTLSTM_INFERENCE_CHUNK_STEPS: 1 or more), switches 1
or 0 (true/false, on/off, yes/no), spaces around either ignored, a blank one unset: anything else warns once and
keeps the default (csrc/env.h).
    FASTLSTM_MKL_MIN_ROWS   float32 uses MKL's packed GEMM for the per-step product from this batch size on, at
                            any width (default: on Intel CPUs from 8 rows of a w_hh 256+ wide, never elsewhere,
                            where MKL measured slow); a huge value forces the register-blocked kernel, which
                            builds without MKL always use.
    FASTLSTM_DGEMM_MIN_ROWS float64 uses a plain BLAS dgemm per step from this batch size on (default 16; never
                            on Zen 5).
    FASTLSTM_ONEDNN_MIN_MACS float32 computes the input projection and dx with oneDNN's matmul from this many
                            multiply-adds on (default: 2**22 on CPUs other than Intel's, where it measured
                            faster than MKL's sgemm; never on Intel); else BLAS.
    FASTLSTM_OWN_PROJECTION_MAX_KB float32 computes the input projection up front and dx below 8 rows
                            (FASTLSTM_FUSE_MIN_ROWS) on the register-blocked kernel up to this many KB of w_ih
                            (default 1024; 0 never), else as FASTLSTM_ONEDNN_MIN_MACS says.
    FASTLSTM_ONEDNN_WEIGHT_GRADS 1 / 0: float32 weight gradients through oneDNN's matmul (from 2**24
                            multiply-adds, or FASTLSTM_ONEDNN_MIN_MACS when set, on Intel too) or BLAS (default:
                            oneDNN on Zen 4 and 5, where it measured faster than MKL's sgemm, at half oneDNN's
                            rate on Zen 5; BLAS elsewhere).
    FASTLSTM_TEAM_MAX_MACS  the time loop runs as one team of threads up to this many multiply-adds a step
                            (default 2**20; forward 2**23 on Zen 5, and on Zen 3 below 8 rows; 0 never);
                            above, each step's product is split over threads.
    FASTLSTM_TEAM_MIN_HIDDEN hidden units each team thread must own (default 24 forward / 20 backward for
                            float32, 16 for float64); fewer threads, or one, below that.
    FASTLSTM_FUSE_MIN_ROWS  the input projection runs per step beside the recurrent product from this batch
                            size on (0: at every batch; default 8, 16 for bfloat16 on AMX tiles), else as one
                            GEMM for all steps up front.
    FASTLSTM_ROW_SPLIT_MAX_KB batches of 3+ rows a thread split their rows among the threads, each running the
                            whole time loop, where a step reads at most this many KB of weights (default: a
                            core's L2 as the C library reports it, else 1024; 0 never).
    FASTLSTM_DOT_ROWS       the forward's recurrent product as dot products over w_hh as stored, not packed, up
                            to this batch size whatever the width (0 never; default: batch 1, at rows of 16+
                            vectors, or 8+ over at most 16 steps).
    FASTLSTM_DOT_INPUT_ROWS the input projection up front as dot products over w_ih as stored, up to this many
                            rows (T * B) whatever its size (0 never; default: up to 8 rows of a w_ih of 1 MB+).
    FASTLSTM_ONE_STEP_ROWS  a single step (T = 1: streaming, LSTM.step) multiplies every weight as stored, up to
                            this batch size whatever the size (0 never; default: up to 8 rows, 16 where the
                            weights take 8 MB+).
    FASTLSTM_FEW_STEPS      a call of up to this many steps, inference or training, multiplies every weight as
                            stored, as a single step does (up to FASTLSTM_ONE_STEP_ROWS' batch; 0 never;
                            default: float32 inference of 2-10 steps from batch 2, with 4 MB of w_ih and w_hh and
                            more, up to one row of a step, T * B, for every 512 KB of them).
    FASTLSTM_INFERENCE_CHUNK_STEPS a long inference that projects its input up front runs in chunks of this many
                            steps (default: as many steps' gates as fit 64 MiB).
    FASTLSTM_KEEP_TENSORS_MB MiB of training's large temporary tensors (saved gates, cell history, gate
                            gradients) kept between calls instead of returned to the system (default 512; 0 none).
    FASTLSTM_AMX            0: bfloat16 products never take AMX tiles, on CPUs that have them (default: they do).
    FASTLSTM_AMX_MIN_ROWS   products of this many rows and more take the AMX tiles (default 1; a huge value
                            keeps them off).
    FASTLSTM_BF16_DOT       0: bfloat16 computes in float32 math even where the CPU has bf16 dot products
                            (AVX512-BF16), which it otherwise uses (h rounded to bf16 each step, as native).
    `python -m fastlstm info` prints the resulting choices.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fastlstm.backends import (
    VMAP_RULES,
    Backend,
    LayerCall,
    LayerResult,
    autograd_tracks,
    cache_root,
    constant_under_compile,
    exporting,
    fake_on_x_device,
    flops,
    functorch_grad_levels,
    layer_backward,
    materialize_grads_for_vmap,
    on_noexec_mount,
    per_sample_layer_grads,
    rows_side_by_side,
    vmap_layer_op,
    vmap_per_sample,
    writable_cache_root,
)

# Compiled, at once (ninja runs one compiler a core): the layer's kernels and the ops. They include the headers,
# which the build key covers too.
_SOURCES = ("lstm_cpu.cpp", "lstm_ops.cpp")
_HEADERS = (
    "amx.h",
    "blas.h",
    "cell.h",
    "cpu_id.h",
    "env.h",
    "layer.h",
    "memory.h",
    "simd.h",
    "step_product.h",
    "team.h",
    "threads.h",
)
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# A failed build's warning quotes this many lines of what the compiler said; the whole log goes to FAILED_BUILD_LOG
QUOTED_COMPILER_LINES = 12
QUOTED_LINE_CHARS = 400  # a template's error names types thousands of characters long
FAILED_BUILD_LOG = "failed-build.log"
# ninja's own lines in a failed build's output: progress ("[2/3] <command>"), "FAILED: <target>", "ninja: ..."
_NINJA_LINE = re.compile(r"^(\[\d+/\d+\] |FAILED: |ninja: )")
_STALE_LOCK_S = 15 * 60  # without flock (Windows): a lock file older than this was left by a build that died

_log = logging.getLogger("fastlstm")
_lock = threading.Lock()
_state: dict[str, object] = {"done": False, "error": None, "path": None}


def _after_fork_in_child() -> None:
    """A process forked while another thread was building or loading the library (a DataLoader worker started
    meanwhile): that thread is not in the child, and its lock would hold the child's first call forever; so would
    the build lock's file, whose lock the child shares with the parent. The child serves calls without the library."""
    global _lock
    if _lock.locked() and not _state["done"]:
        _lock = threading.Lock()
        _state.update(
            done=True,
            error="this process was forked while another thread was building or loading the C++ extension: it "
            "serves calls without it (build or load it before forking: `python -m fastlstm build`, or a first call)",
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def source_dir() -> Path:
    """csrc/ of a source checkout (<repo>/csrc) or of an installed wheel (fastlstm/csrc)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES + _HEADERS):
            return candidate
    raise FileNotFoundError(f"fastlstm C++ sources {_SOURCES + _HEADERS} not found next to {here.parents[1]}")


def _compiler() -> str:
    return os.environ.get("FASTLSTM_CXX") or os.environ.get("CXX") or "c++"


def _cflags() -> list[str]:
    """Our flags, then the user's: a later -march or -m option overrides ours."""
    return _CFLAGS + shlex.split(os.environ.get("FASTLSTM_CXXFLAGS", ""))


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _build_key(src: Path) -> str:
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    for part in (torch.__version__, sys.version, _compiler(), " ".join(_cflags() + _LDFLAGS), _cpu_id()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One fastlstm build at a time in build_dir, across processes.

    An exclusive flock on build_dir/build.lock: the kernel drops it when the holding process dies, however it
    dies. Holding it, no live fastlstm process builds here, so cpp_extension's own lock file (`lock`, which it
    waits on without a timeout and which a killed build leaves behind) is stale if present, and goes.
    """
    try:
        import fcntl
    except ImportError:  # Windows: only the age of cpp_extension's lock file tells
        _clear_stale_lock(build_dir)
        yield
        return
    with open(build_dir / "build.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.warning("fastlstm: waiting for another process that is building the C++ backend in %s", build_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_library(build_dir: Path, name: str) -> Path | None:
    for suffix in (".so", ".pyd", ".dylib"):
        path = build_dir / (name + suffix)
        if path.is_file():
            return path
    return None


def _fingerprint(lib: Path) -> str:
    """What the BUILT marker records of the library: name, size and SHA-256 (~1 ms for the ~0.7 MB library)."""
    data = lib.read_bytes()
    return f"{lib.name}\n{len(data)}\n{hashlib.sha256(data).hexdigest()}\n"


def _cached_library(build_dir: Path, name: str) -> Path | None:
    """The library of a finished build in `build_dir` whose bytes are still the ones it wrote, else None. A damaged
    file (a disk filled up, a copy cut short) is not loaded: a truncated library crashed the process in dlopen
    (SIGBUS). The next build replaces it."""
    lib = _find_library(build_dir, name)
    try:
        return lib if lib is not None and (build_dir / "BUILT").read_text() == _fingerprint(lib) else None
    except OSError:
        return None


def _remove_damaged_build(build_dir: Path, name: str) -> None:
    """After a finished build whose library no longer matches its marker: remove the library and the objects, as
    ninja, going by their timestamps, would keep them. Only the process that claims the marker (an atomic
    rename) removes anything; with no marker there is nothing finished to remove, or another process is building."""
    claimed = build_dir / f"BUILT.damaged.{os.getpid()}"
    try:
        os.rename(build_dir / "BUILT", claimed)
    except OSError:
        return
    lib = _find_library(build_dir, name)
    if lib is not None and claimed.read_text() == _fingerprint(lib):  # another process rebuilt it meanwhile
        os.replace(claimed, build_dir / "BUILT")
        return
    for path in [lib, *build_dir.glob("*.o"), claimed]:
        if path is not None:
            path.unlink(missing_ok=True)


class _CompilerError(RuntimeError):
    """The C++ compiler cannot run, or fails its own check (_check_compiler)."""


def _check_compiler() -> None:
    """Run the compiler once on its own so that its own error text reaches the user (cpp_extension hides it)."""
    compiler = _compiler()
    try:
        proc = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise _CompilerError(
            f"cannot run the C++ compiler {compiler!r}: {error} (install one, or set FASTLSTM_CXX or CXX to one)"
        ) from error
    if proc.returncode != 0:
        raise _CompilerError(
            f"the C++ compiler {compiler!r} fails (`{compiler} --version` exited {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()}"
        )


def _ninja_dir() -> str | None:
    """Where the ninja that pip installed with fastlstm lies, when `ninja` is not on PATH (else None).

    cpp_extension runs `ninja` from PATH. A virtual environment's python run by its path, not activated (a
    service's ExecStart, an IDE, a container's CMD), has its ninja in a folder that is not on PATH: the build
    then failed with "Ninja is required", although the dependency is installed.
    """
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja  # the PyPI package: only its folder is used
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", "")
    return folder if folder and shutil.which("ninja", path=folder) is not None else None


@contextlib.contextmanager
def _build_environment():
    """CXX set to our compiler and pip's ninja reachable on PATH for the build, the environment as before after.
    LC_ALL=C: the compiler speaks English, as _out_of_room reads it (a full disk said in the user's language, as a
    localised libc says it, went unrecognised), and so does what a failed build's warning quotes."""
    saved = {key: os.environ.get(key) for key in ("CXX", "PATH", "LC_ALL")}
    ours = {"CXX": _compiler(), "LC_ALL": "C"}
    folder = _ninja_dir()
    if folder is not None:
        ours["PATH"] = os.pathsep.join(p for p in (folder, saved["PATH"]) if p)
    os.environ.update(ours)
    try:
        yield
    finally:
        for key, value in ours.items():
            if os.environ.get(key) != value:
                continue  # another thread set it meanwhile: its value stays
            if saved[key] is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved[key]


def _build_and_load(verbose: bool) -> str:
    """Compile (or find in the cache) and load the library; returns its path. Raises on failure."""
    src = source_dir()
    key = _build_key(src)
    name = f"fastlstm_cpp_{key}"
    home = cache_root()
    # a finished build is loaded from the home cache even where that is read-only (an image built ahead of time)
    lib = None if home is None else _cached_library(home / f"cpp-{key}", name)
    if lib is None:
        build_dir = writable_cache_root() / f"cpp-{key}"
        lib = _cached_library(build_dir, name)
        if lib is None:
            build_dir.mkdir(parents=True, exist_ok=True)
            if on_noexec_mount(build_dir):
                raise OSError(
                    f"its cache folder {build_dir} is on a noexec mount, from which no library loads (set "
                    "FASTLSTM_CACHE_DIR to a folder elsewhere)"
                )
            with _build_lock(build_dir):
                lib = _cached_library(build_dir, name)  # another process may have built it while this one waited
                if lib is None:
                    return str(_build(src, name, build_dir, build_dir / "BUILT", verbose))
    with _library_loading():
        torch.ops.load_library(str(lib))
    return str(lib)


def _build(src: Path, name: str, build_dir: Path, marker: Path, verbose: bool) -> Path:
    """Compile and load the library (the caller holds the build lock); marks the build complete."""
    from torch.utils import cpp_extension  # imports setuptools: only when building

    _check_compiler()
    with _build_environment():  # no promise of a build that cannot start (the failure is the warning then)
        cpp_extension.verify_ninja_availability()
    _remove_damaged_build(build_dir, name)
    # The first call of a model blocks on the compiler for tens of seconds: say why, once, on stderr
    # (logging's default for warnings; `logging.getLogger("fastlstm")` silences or redirects it).
    _log.warning(
        "fastlstm: compiling the C++ CPU backend for this machine (once; tens of seconds; cached in %s). "
        "`python -m fastlstm build` does it ahead of time.",
        build_dir,
    )
    try:
        with _build_environment(), _library_loading():  # cpp_extension.load loads the library it builds
            lib_path = cpp_extension.load(
                name=name,
                sources=[str(src / s) for s in _SOURCES],
                extra_cflags=list(_cflags()),
                extra_ldflags=list(_LDFLAGS),  # copies: cpp_extension appends torch's libraries in place
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
    except BaseException as error:
        # torch notes a name's sources before building them, and skips the build of sources it has noted: after an
        # interrupted build (Ctrl-C in a notebook) the next call only tried to load a library never made, and the
        # backend stayed off for the process. Forgetting the note lets the next call build.
        getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", {}).pop(name, None)
        if isinstance(error.__cause__, subprocess.CalledProcessError):
            raise _CompilerError(_compiler_said(str(error), build_dir / FAILED_BUILD_LOG)) from error
        raise
    lib = Path(lib_path) if lib_path else _find_library(build_dir, name)
    if lib is None:
        raise RuntimeError(f"the build in {build_dir} produced no library")
    (build_dir / FAILED_BUILD_LOG).unlink(missing_ok=True)  # an earlier failure's, which no longer holds
    tmp = marker.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(_fingerprint(lib))
    os.replace(tmp, marker)  # atomic: other processes see either no marker or a complete one
    return lib


def _compiler_said(log: str, log_path: Path) -> str:
    """What the compiler said about a failed build, for a warning: its own lines, not ninja's progress lines and the
    long command lines it echoes (torch's error carries them all: kilobytes for one bad flag, far more for an error
    in a template), at most QUOTED_COMPILER_LINES; the whole log is written to `log_path`, and named."""
    said: dict[str, None] = {}  # in order, each once (two sources compiled at once fail alike)
    echoed = False
    for line in log.splitlines()[1:]:  # the first: torch's "Error building extension ...: [1/3] <command>"
        line = line.rstrip()
        if echoed or not line or _NINJA_LINE.match(line):
            echoed = line.startswith("FAILED:")  # ninja echoes the failed command on the line after
            continue
        said.setdefault(line[:QUOTED_LINE_CHARS] + ("..." if len(line) > QUOTED_LINE_CHARS else ""))
    try:
        log_path.write_text(log)
        where = f"the whole log: {log_path}"
    except OSError as error:
        where = f"the whole log could not be written to {log_path}: {error}"
    lines = list(said)
    more = len(lines) - QUOTED_COMPILER_LINES
    quoted = lines[:QUOTED_COMPILER_LINES] + ([f"... {more} more lines"] if more > 0 else [])
    return "it printed:\n  " + "\n  ".join(quoted or ["(nothing captured)"]) + f"\n({where})"


def _compiler_failed(error: BaseException) -> bool:
    """Whether a build failed in the compiler: its own check or a step ninja ran (both _CompilerError: _build turns
    torch's "Error building extension" into one), or a compiler query (torch 2.7 and before ask `c++ -v` first)."""
    return isinstance(error, (_CompilerError, subprocess.CalledProcessError))


def _out_of_room(error: BaseException, text: str) -> bool:
    """Whether a build failed for want of disk space or quota: the compiler, writing its object or temporary files,
    says so in its output; Python's own writes raise it."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(words in text for words in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)))


def _folder_named(folder: Callable[[], object]) -> str:
    """A folder the build writes to, for a message; a placeholder where it cannot be worked out (a disk too full for
    tempfile to write its probe leaves it no temporary folder: raised here, the build's reason had crashed the call
    that was to fall back)."""
    try:
        return str(folder())
    except OSError:
        return "(none usable)"


def _ensure(verbose: bool = False) -> str | None:
    """Build/load once per process. Returns None when the ops are available, else the reason (cached)."""
    if _state["done"]:
        return _state["error"]  # type: ignore[return-value]
    with _lock:
        if not _state["done"]:
            try:
                _state["path"] = _build_and_load(verbose)
            except Exception as error:  # noqa: BLE001 - a failed build must never crash the user's model
                # our own words as they are; anything else with its exception's type
                text = (
                    str(error)
                    if isinstance(error, _CompilerError)
                    else "".join(traceback.format_exception_only(type(error), error)).strip()
                )
                # A compiler query that failed (torch 2.7 and before ask `c++ -v` first): what it printed says why
                output = getattr(error, "output", None) if isinstance(error, subprocess.CalledProcessError) else None
                if output:
                    text += ": " + (output.decode(errors="replace") if isinstance(output, bytes) else output).strip()
                if isinstance(error, PermissionError) or getattr(error, "errno", None) == errno.EROFS:
                    _state["error"] = (
                        "building the fastlstm C++ extension failed: its cache folder cannot be written (set "
                        f"FASTLSTM_CACHE_DIR to a writable folder): {text}"
                    )
                elif _out_of_room(error, text):
                    _state["error"] = (
                        "building the fastlstm C++ extension failed: no room left on the disk that holds its cache "
                        f"folder {_folder_named(writable_cache_root)} or the compiler's temporary folder "
                        f"{_folder_named(tempfile.gettempdir)} "
                        f"(free some, or set FASTLSTM_CACHE_DIR or TMPDIR to a folder elsewhere): {text}"
                    )
                elif _compiler_failed(error):
                    _state["error"] = f"building the fastlstm C++ extension failed (compiler {_compiler()!r}): {text}"
                else:  # ninja missing, no temporary folder, a library that would not load: not the compiler's
                    _state["error"] = f"building the fastlstm C++ extension failed: {text}"
            _state["done"] = True
    return _state["error"]  # type: ignore[return-value]


@constant_under_compile
def _availability() -> str | None:
    """_ensure() run eagerly even while torch.compile traces: the build is not traceable, its outcome is constant."""
    return _ensure()


def _require_library() -> None:
    """Raise, with the reason, when the ops cannot run (a call forced onto cpp where it is unavailable)."""
    reason = _availability()
    if reason is not None:
        raise RuntimeError(f"fastlstm cpp backend is unavailable: {reason}")


def build(verbose: bool = False) -> str:
    """Build (or load from the cache) ahead of time. Returns the library path; raises RuntimeError on failure."""
    error = _ensure(verbose)
    if error is not None:
        raise RuntimeError(error)
    return str(_state["path"])


def build_error() -> str | None:
    """The compiler's error text when the build failed, None when it succeeded (builds if not yet tried)."""
    return _ensure()


def build_flags() -> str:
    """The compiler and flags the extension is built with (FASTLSTM_CXX / FASTLSTM_CXXFLAGS applied)."""
    return " ".join([_compiler(), *_cflags()]) + f" (link: {' '.join(_LDFLAGS)})"


def kernel_choices() -> str | None:
    """Which kernel serves which product on this CPU, knobs applied; None when the extension is unavailable."""
    if _ensure() is not None:
        return None
    return torch.ops.fastlstm.cpp_kernel_choices()


def release_memory() -> int:
    """Free the memory the C++ backend keeps between calls (packed weights and scratch buffers, at most 64 MiB of
    each per thread, and the process's kept training tensors, at most 512 MiB: kept so that calls do not pay page
    faults): now for the calling thread and its OpenMP threads and the process's tensors, at their next call for
    other threads. Returns the bytes freed now; 0 when the extension is not loaded (this never builds it). Later
    calls keep memory again as they need it."""
    if not _state["done"] or _state["error"] is not None:
        return 0
    return int(torch.ops.fastlstm.cpp_release_memory())


@constant_under_compile
def uses_bf16_dot() -> bool:
    """Whether bfloat16 multiplies in bf16 dot products (the build has AVX512-BF16 and FASTLSTM_BF16_DOT is not
    0) rather than in float32 math; False when the extension is unavailable. Builds if not yet tried."""
    return _ensure() is None and bool(torch.ops.fastlstm.cpp_bf16_dot())


@constant_under_compile
def uses_amx() -> bool:
    """Whether those bf16 dot products run on AMX tiles (the build has AMX-BF16, Linux grants the tiles' state and
    FASTLSTM_AMX is not 0); False when the extension is unavailable. Builds if not yet tried."""
    return _ensure() is None and bool(torch.ops.fastlstm.cpp_amx())


@constant_under_compile
def uses_onednn_weight_grads() -> bool:
    """Whether float32 weight gradients run through oneDNN's matmul (by default from Zen 4 on: AMD family 0x19
    with AVX-512, and 0x1A; FASTLSTM_ONEDNN_WEIGHT_GRADS overrides) rather than BLAS; False when the extension is
    unavailable. Builds if not yet tried."""
    return _ensure() is None and bool(torch.ops.fastlstm.cpp_onednn_weight_grads())


@constant_under_compile
def float32_forward_rows(seq_len: int, batch: int, input_size: int, hidden_size: int, proj_size: int) -> list[int]:
    """The first row of each thread the float32 forward of one unpacked layer splits its batch over, then the
    batch ([0, batch]: no split), with torch's thread count as it is now; [0, batch] when the extension is
    unavailable. Builds if not yet tried."""
    if _ensure() is not None:
        return [0, batch]
    return list(torch.ops.fastlstm.cpp_float32_forward_rows(seq_len, batch, input_size, hidden_size, proj_size))


# ------------------------------------------------------------------------------------------------------------
# The ops' schemas and fake kernels, defined at import whether or not the library is built: a program saved by
# torch.export names the ops, and loads only where their schemas exist. Until the library loads, each op has a
# stand-in kernel (on the CPU and Autograd keys) that builds or loads it and calls the op again, now served by
# the library's kernels (the C++ Autograd kernel included); the stand-ins are dropped before the library loads.

FWD_SCHEMA = (
    "cpp_lstm_fwd(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b, Tensor? w_hr, "
    "Tensor? batch_sizes, bool reverse, bool save) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "cpp_lstm_bwd(Tensor grad_y, Tensor grad_hT, Tensor grad_cT, Tensor x, Tensor h0, Tensor c0, Tensor w_ih, "
    "Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, Tensor y, Tensor gates, Tensor c_hist, bool reverse, "
    "bool has_bias, bool weight_grads=True, bool input_grad=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)"
)
BWD_ROWS_SCHEMA = (
    "cpp_lstm_bwd_rows(Tensor grad_y, Tensor grad_hT, Tensor grad_cT, Tensor x, Tensor h0, Tensor c0, Tensor w_ih, "
    "Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, Tensor y, Tensor gates, Tensor c_hist, bool reverse, "
    "bool input_grad=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# A whole stack at inference in one call (CppBackend.inference_stack); no autograd.
STACK_FWD_SCHEMA = (
    "cpp_lstm_stack_fwd(Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, Tensor? batch_sizes, int biases, "
    "bool proj, bool bidirectional) -> (Tensor, Tensor, Tensor)"
)
_schemas = torch.library.Library("fastlstm", "FRAGMENT")
_schemas.define(FWD_SCHEMA)
_schemas.define(BWD_SCHEMA)
_schemas.define(BWD_ROWS_SCHEMA)
_schemas.define(STACK_FWD_SCHEMA)


@torch.library.register_fake("fastlstm::cpp_lstm_fwd", lib=_schemas)
def _fwd_fake(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, save):
    fake_on_x_device("cpp", x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes)
    T, B = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    saved_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    y = x.new_empty((T, B, P))
    hT = x.new_empty((B, P))
    cT = x.new_empty((B, H))
    if save:
        gates = x.new_empty((T, B, 4 * H), dtype=saved_dtype)
        c_hist = x.new_empty((T, B, H), dtype=saved_dtype)
    else:
        gates = x.new_empty((0,), dtype=saved_dtype)
        c_hist = x.new_empty((0,), dtype=saved_dtype)
    return y, hT, cT, gates, c_hist


@torch.library.register_fake("fastlstm::cpp_lstm_bwd", lib=_schemas)
def _bwd_fake(
    grad_y,
    grad_hT,
    grad_cT,
    x,
    h0,
    c0,
    w_ih,
    w_hh,
    w_hr,
    batch_sizes,
    y,
    gates,
    c_hist,
    reverse,
    has_bias,
    weight_grads=True,
    input_grad=True,
):
    fake_on_x_device("cpp", x, grad_y, grad_hT, grad_cT, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, gates, c_hist)
    H = w_hh.shape[0] // 4
    # The kernel returns contiguous gradients whatever the inputs' strides: new_empty, not empty_like. Gradients
    # left out (weight_grads or input_grad false) come back empty, as a missing bias's and projection's.
    sizes = [w_ih.shape, w_hh.shape, (4 * H,) if has_bias else (0,), w_hr.shape if w_hr is not None else (0,)]
    weight_rows = [x.new_empty(size if weight_grads else (0,)) for size in sizes]
    dx = x.new_empty(x.shape if input_grad else (0,))
    return (dx, h0.new_empty(h0.shape), c0.new_empty(c0.shape), *weight_rows)


@torch.library.register_fake("fastlstm::cpp_lstm_bwd_rows", lib=_schemas)
def _bwd_rows_fake(
    grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, gates, c_hist, reverse, input_grad=True
):
    fake_on_x_device("cpp", x, grad_y, grad_hT, grad_cT, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, gates, c_hist)
    T, B = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    with_proj = w_hr is not None
    return (
        x.new_empty(x.shape if input_grad else (0,)),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        x.new_empty((T, B, 4 * H)),
        x.new_empty((T, B, P)),
        x.new_empty((T, B, P) if with_proj else (0,)),
        x.new_empty((T, B, H) if with_proj else (0,)),
    )


@torch.library.register_fake("fastlstm::cpp_lstm_stack_fwd", lib=_schemas)
def _stack_fwd_fake(x, h0, c0, weights, batch_sizes, biases, proj, bidirectional):
    fake_on_x_device("cpp", x, h0, c0, *weights, batch_sizes)
    per_layer = 2 + biases + proj
    count, last_w_hh = len(weights) // per_layer, weights[-per_layer + 1]  # (layer, direction) pairs
    H, P = last_w_hh.shape[0] // 4, last_w_hh.shape[1]
    directions = 2 if bidirectional else 1
    # Packed data [N, I]: y packed too, with as many rows as the batch sizes sum to: N, but for a hand-built pack
    # with rows past them, which a fake cannot tell from its batch sizes' values. The batch is batch_sizes[0].
    if x.dim() == 2 and batch_sizes is not None:
        B = torch.library.get_ctx().new_dynamic_size()
        return x.new_empty((x.shape[0], P * directions)), x.new_empty((count, B, P)), x.new_empty((count, B, H))
    steps, B = x.shape[:-2], x.shape[-2]  # x [T, B, I], or [B, I] for one step
    y = x.new_empty((*steps, B, P * directions))
    return y, x.new_empty((count, B, P)), x.new_empty((count, B, H))


def _fwd_vmap(info, in_dims, *args):
    """torch.vmap of one layer: the samples side by side as one batch (backends.vmap_layer_op)."""
    save = args[-1]  # without it, gates and c_hist are empty
    batch_axes = (1, 0, 0, 1, 1) if save else (1, 0, 0, None, None)
    return vmap_layer_op(torch.ops.fastlstm.cpp_lstm_fwd.default, info, in_dims, args, batch_axes)


def _bwd_vmap(info, in_dims, *args):
    """torch.vmap of backward (per-sample gradients, torch.func.vmap of grad). Each sample needs weight gradients
    of its own, which one call over all the samples' rows would sum: the samples' rows run side by side through
    cpp_lstm_bwd_rows, which leaves the weight gradients out, and each sample's are summed from its rows here
    (float32 and float64; weights that differ per sample, and bfloat16 and float16, take one call per sample)."""
    grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, gates, c_hist, reverse, has_bias = args[:15]
    weight_grads = args[15] if len(args) > 15 else True
    input_grad = args[16] if len(args) > 16 else True
    if (
        any(dim is not None for dim in in_dims[6:10])
        or x.dtype not in (torch.float32, torch.float64)
        or not weight_grads
    ):
        return vmap_per_sample(torch.ops.fastlstm.cpp_lstm_bwd.default, info, in_dims, args)
    samples = info.batch_size
    rows = (grad_y, grad_hT, grad_cT, x, h0, c0, y, gates, c_hist)
    dims = in_dims[:6] + in_dims[10:13]
    folded = [rows_side_by_side(t, dim, axis, samples) for t, dim, axis in zip(rows, dims, (1, 0, 0, 1, 0, 0, 1, 1, 1))]
    grad_y, grad_hT, grad_cT, x, h0, c0, y, gates, c_hist = folded
    folded_sizes = None if batch_sizes is None else batch_sizes * samples
    dx, dh0, dc0, dgates, h_prev, dh_out, h_raw = torch.ops.fastlstm.cpp_lstm_bwd_rows.default(
        grad_y, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, w_hr, folded_sizes, y, gates, c_hist, reverse, input_grad
    )
    proj_rows = (dh_out, h_raw) if w_hr is not None else None
    return per_sample_layer_grads(samples, dx, dh0, dc0, dgates, x, h_prev, has_bias, proj_rows, input_grad)


for _op, _formula in (
    (torch.ops.fastlstm.cpp_lstm_fwd, flops.forward),
    (torch.ops.fastlstm.cpp_lstm_bwd, flops.cpp_backward),
    (torch.ops.fastlstm.cpp_lstm_bwd_rows, flops.cpp_backward_rows),
    (torch.ops.fastlstm.cpp_lstm_stack_fwd, flops.stack_forward),
):
    flops.register(_op, _formula)

if VMAP_RULES:
    torch.library.register_vmap("fastlstm::cpp_lstm_fwd", _fwd_vmap, lib=_schemas)
    torch.library.register_vmap("fastlstm::cpp_lstm_bwd", _bwd_vmap, lib=_schemas)


class _FuncLayer(torch.autograd.Function):
    """The layer's autograd where a torch.func gradient transform (grad, vjp, jacrev) tracks it: those cannot run
    cpp_lstm_fwd's C++ autograd ("cannot use C++ torch::autograd::Function with functorch transforms"). The same
    two ops, their autograd in Python; under torch.vmap, each op's vmap rule batches it (per-sample gradients)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse):
        with torch._C._AutoDispatchBelowAutograd():  # the CPU kernel (or the vmap rule), not the C++ autograd
            return torch.ops.fastlstm.cpp_lstm_fwd.default(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse = inputs
        y, _, _, gates, c_hist = output
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, y, gates, c_hist)
        ctx.reverse = reverse
        ctx.mark_non_differentiable(gates, c_hist)
        # Which outputs got a gradient decides what is differentiated twice (zeros where torch.vmap before 2.7 needs)
        ctx.set_materialize_grads(materialize_grads_for_vmap((x, h0, c0, w_ih, w_hh, b, w_hr)))

    @staticmethod
    def backward(ctx, grad_y, grad_hT, grad_cT, _grad_gates, _grad_c_hist):
        x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, y, gates, c_hist = ctx.saved_tensors
        inputs = (x, h0, c0, w_ih, w_hh, b, w_hr)
        start = layer_backward(inputs, batch_sizes, ctx.reverse, (grad_y, grad_hT, grad_cT), y.shape)
        if start.differentiable is not None:
            return (*start.differentiable, None, None)  # batch_sizes and reverse get none
        with torch.no_grad():  # these gradients are not differentiated: no graph of an op that has no derivative
            dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = torch.ops.fastlstm.cpp_lstm_bwd.default(
                *start.grads, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, gates, c_hist, ctx.reverse, b is not None,
                input_grad=ctx.needs_input_grad[0],
            )  # fmt: skip
        dx = dx if ctx.needs_input_grad[0] else None
        grads = (dx, dh0, dc0, dw_ih, dw_hh, db if b is not None else None, dw_hr if start.proj_used else None)
        return (*grads, None, None)


def _loaded_then(op_name: str):
    """A stand-in kernel for op `op_name`: load (building if need be) the library, then call the op again."""

    def kernel(*args):
        error = _ensure()
        if error is not None:
            raise RuntimeError(error)
        if _lazy["lib"] is not None:  # the library loaded but its kernels are not the ones serving: never loop
            raise RuntimeError(f"fastlstm::{op_name}: the C++ library loaded without replacing the stand-in kernel")
        return getattr(torch.ops.fastlstm, op_name).default(*args)

    return kernel


_lazy: dict[str, torch.library.Library | None] = {"lib": None}


def _register_lazy_kernels() -> None:
    if _lazy["lib"] is not None:
        return
    lib = torch.library.Library("fastlstm", "IMPL")
    fwd, bwd = _loaded_then("cpp_lstm_fwd"), _loaded_then("cpp_lstm_bwd")
    lib.impl("cpp_lstm_fwd", fwd, "CPU")
    lib.impl("cpp_lstm_fwd", fwd, "Autograd")  # so that the op's first call still records the C++ autograd node
    lib.impl("cpp_lstm_bwd", bwd, "CPU")
    lib.impl("cpp_lstm_bwd_rows", _loaded_then("cpp_lstm_bwd_rows"), "CPU")
    lib.impl("cpp_lstm_stack_fwd", _loaded_then("cpp_lstm_stack_fwd"), "CPU")
    _lazy["lib"] = lib


@contextlib.contextmanager
def _library_loading():
    """Around loading the library: its kernels replace the stand-ins, which come back if loading fails (the ops
    then keep a kernel that reports the failure)."""
    lib, _lazy["lib"] = _lazy["lib"], None
    if lib is not None:
        lib._destroy()
    try:
        yield
    except BaseException:
        _register_lazy_kernels()
        raise


_register_lazy_kernels()


# ------------------------------------------------------------------------------------------------------------


class CppBackend(Backend):
    name = "cpp"

    def unavailable_reason(self) -> str | None:
        return _availability()  # dispatch asks while torch.compile traces too

    def unsupported_reason(self, call: LayerCall) -> str | None:
        if call.device_type != "cpu":
            return f"the cpp backend runs on the CPU only, not {call.device_type}"
        if call.dtype not in _SUPPORTED_DTYPES:
            return f"the cpp backend supports float32, float64, bfloat16 and float16, not {call.dtype}"
        if call.forward_ad:
            return "forward-mode AD (torch.func.jvp, jacfwd, dual tensors): the cpp ops have no forward derivative"
        return None

    def layer(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b: Tensor | None,
        w_hr: Tensor | None,
        batch_sizes: Tensor | None,
        reverse: bool,
    ) -> LayerResult:
        """x: [T, B, I], h0: [B, P], c0: [B, H] -> y [T, B, P], hT [B, P], cT [B, H] (fastlstm.reference)."""
        _require_library()
        tensors = (x, h0, c0, w_ih, w_hh, b, w_hr)
        if torch._C._are_functorch_transforms_active() and functorch_grad_levels(tensors):
            y, hT, cT, _, _ = _FuncLayer.apply(*tensors, batch_sizes, reverse)
            return y, hT, cT
        # An exported program bakes the flag in: one exported under no_grad may still be trained, as nn.LSTM's is
        save = (torch.is_grad_enabled() or exporting()) and any(t is not None and t.requires_grad for t in tensors)
        if not save and torch.is_grad_enabled() and torch._C._are_functorch_transforms_active():
            save = any(t is not None and autograd_tracks(t) for t in tensors)  # vmap's wrappers hide requires_grad
        # The overload itself, not the packet: the packet resolves it on every call, ~5 us at batch 1
        forward = torch.ops.fastlstm.cpp_lstm_fwd.default
        y, hT, cT, _, _ = forward(x, h0, c0, w_ih, w_hh, b, w_hr, batch_sizes, reverse, save)
        return y, hT, cT

    has_inference_stack = True

    def inference_stack(self, x, hx, weights, batch_sizes, biases, proj, bidirectional) -> LayerResult:
        _require_library()
        h0, c0 = (None, None) if hx is None else hx
        op = torch.ops.fastlstm.cpp_lstm_stack_fwd.default
        return op(x, h0, c0, weights, batch_sizes, biases, proj, bidirectional)

    def autocast_weights(self, weights: list[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
        # The library's op takes them from autocast's cache. Eager calls only: a graph being traced records
        # plain casts (fake tensors must not enter the cache), and under torch.func's transforms the
        # weights are wrappers that the cache would keep beyond the transform.
        present = [w for w in weights if w is not None]
        if (
            _availability() is not None
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active()
            or not present
        ):
            return super().autocast_weights(weights, dtype)
        cast = iter(torch.ops.fastlstm.cpp_autocast_weights.default(present, dtype))
        return [None if w is None else next(cast) for w in weights]


BACKEND = CppBackend()
