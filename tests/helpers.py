"""Building matched nn.LSTM / fastlstm.LSTM pairs and comparing everything they compute."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _python_env(env: dict | None) -> dict:
    """env (or this process's), with this checkout first on the import path, and without pytest-xdist's worker
    variables: a pytest run in the child (the benchmark suite) would take itself for a worker of this one, and
    pytest-benchmark then disables itself."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_python(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process, in the repository root with this checkout first on the import path;
    output captured as text, the exit status left to the caller."""
    return run_pythons([(args, env)], timeout=timeout)[0]


def run_pythons(runs: list[tuple[tuple[str, ...], dict | None]], timeout: int = 300) -> list:
    """run_python for each (args, env) of `runs`, all at once: for processes that mostly wait on one core each (a
    compiler), so that a test building several variants takes about as long as it takes to build one."""
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_python_env(env),
        )
        for args, env in runs
    ]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


# Runs each command of argv[1] (a JSON list of run_python's argument lists) as `python ARGS` would, in this one
# process, and prints argv[2] (a marker) and a JSON list of [exit status, stdout, stderr].
_COMMANDS_IN_ONE_PROCESS = """
import contextlib, io, json, os, runpy, sys, traceback

COMMANDS, RESULTS = json.loads(sys.argv[1]), sys.argv[2]

def run(args):
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))  # as `python SCRIPT` puts it first
        try:
            runpy.run_path(args[0], run_name="__main__")
        finally:
            sys.path.pop(0)
    return 0

results = []
for args in COMMANDS:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = run(args)
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) or exit.code is None else 1
            if not isinstance(exit.code, int) and exit.code is not None:
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            status = 1
    results.append([status or 0, out.getvalue(), err.getvalue()])
sys.stdout.write(RESULTS + json.dumps(results))
"""


def run_in_one_python(commands: list[tuple[str, ...]], env: dict | None = None, timeout: int = 300) -> list:
    """run_python for each argument list of `commands`, one after the other in one fresh process (importing torch
    in a process of each costs seconds): for commands that end before they work, a usage error, say, as the
    modules they import stay imported from one to the next. Gives a CompletedProcess for each."""
    import json

    marker = "\nfastlstm-test-results:"
    commands_json = json.dumps([list(c) for c in commands])
    done = run_python("-c", _COMMANDS_IN_ONE_PROCESS, commands_json, marker, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(done.stdout.rsplit(marker, 1)[1])
    return [subprocess.CompletedProcess(c, *result) for c, result in zip(commands, results)]


def nn_lstm_under_cpu_autocast(call):
    """call() (running nn.LSTM) under CPU bfloat16 autocast; where nn.LSTM's oneDNN path cannot run that (oneDNN has
    no bfloat16 LSTM on CPUs without AVX-512: "could not create a primitive descriptor"), with oneDNN off, which is
    what fastlstm gives there."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call()
    except RuntimeError as error:
        if "could not create a primitive descriptor" not in str(error):
            raise
    with torch.backends.mkldnn.flags(enabled=False), torch.autocast("cpu", dtype=torch.bfloat16):
        return call()


def make_pair(*args, backend: str, dtype=torch.float64, **kwargs) -> tuple[nn.LSTM, fastlstm.LSTM]:
    """nn.LSTM and fastlstm.LSTM with the same state_dict."""
    ref = nn.LSTM(*args, dtype=dtype, **kwargs)
    fast = fastlstm.LSTM(*args, dtype=dtype, backend=backend, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _leaves(out):
    y, (h, c) = out
    return (y.data if isinstance(y, PackedSequence) else y), h, c


def _pack_fields(out) -> dict:
    """A packed output's batch_sizes, sorted_indices and unsorted_indices (none for a tensor output)."""
    if not isinstance(out[0], PackedSequence):
        return {}
    return {field: getattr(out[0], field) for field in ("batch_sizes", "sorted_indices", "unsorted_indices")}


def run_with_grads(module: nn.Module, inputs: list[torch.Tensor], call) -> dict[str, torch.Tensor]:
    """Forward through `call(module, *inputs)`, backward a loss touching y, h_n and c_n; all results."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = call(module, *inputs)
    y, h, c = _leaves(out)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in (y, h, c)]
    loss = sum((t * w).sum() for t, w in zip((y, h, c), weights))
    module.zero_grad(set_to_none=True)
    loss.backward()
    results = {"y": y.detach(), "h_n": h.detach(), "c_n": c.detach()}
    for k, t in enumerate(inputs):
        results[f"input{k}.grad"] = t.grad
    for name, p in module.named_parameters():
        results[f"{name}.grad"] = p.grad
    return {**results, **_pack_fields(out)}


def run_without_grads(module: nn.Module, inputs: list[torch.Tensor], call) -> dict[str, torch.Tensor]:
    """Forward through `call(module, *inputs)` under torch.no_grad() (inference: cpp runs a whole stack in one
    call there); its results as run_with_grads gives them."""
    with torch.no_grad():
        out = call(module, *inputs)
    return {**dict(zip(("y", "h_n", "c_n"), _leaves(out))), **_pack_fields(out)}


def assert_same_results(
    ref: nn.Module, fast: nn.Module, inputs: list[torch.Tensor], call, atol, rtol, run=run_with_grads
) -> None:
    """nn.LSTM's results (run: run_with_grads, or run_without_grads for inference) and fastlstm's: the same keys,
    shapes, dtypes, layouts of the outputs and numbers."""
    expected = run(ref, inputs, call)
    got = run(fast, inputs, call)
    assert expected.keys() == got.keys()
    for key in expected:
        if expected[key] is None:
            assert got[key] is None, key
            continue
        assert got[key] is not None, f"{key}: no gradient"
        assert got[key].shape == expected[key].shape, key
        assert got[key].dtype == expected[key].dtype, key
        if key in ("y", "h_n", "c_n"):  # code written for nn.LSTM may .view() them
            assert got[key].is_contiguous() == expected[key].is_contiguous(), key
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}")


def assert_threads_get_lone_results(run, jobs: list, threads: int, repeats: int) -> None:
    """`threads` Python threads at once, thread k calling run(jobs[k % len(jobs)]) `repeats` times: each result
    (a sequence of tensors) bitwise what a lone call gave, no exception, no thread hung."""
    import threading

    expected = [run(job) for job in jobs]
    failures: list[str] = []

    def worker(k: int) -> None:
        try:
            for _ in range(repeats):
                got = run(jobs[k % len(jobs)])
                if not all(torch.equal(a, b) for a, b in zip(got, expected[k % len(jobs)], strict=True)):
                    failures.append(f"thread {k}: numbers differ from a lone call")
                    return
        except Exception as error:  # reported below: an exception in a thread would otherwise go unseen
            failures.append(f"thread {k}: {type(error).__name__}: {error}")

    started = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in started), "a thread hung"
    assert not failures, failures


@contextlib.contextmanager
def torch_threads(count: int):
    """torch.set_num_threads(count) for the block, the count before it restored after (a test worker's, conftest)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def lstm_call(module, x, *state):
    """module(x) or module(x, (h0, c0))."""
    return module(x, tuple(state)) if state else module(x)


def assert_same_double_backward(backend: str, packed: bool, atol: float, rtol: float, batch_first=False) -> None:
    """create_graph=True (a gradient penalty on the input and weight gradients) through a float64 stack with
    projection and both directions: first- and second-order gradients equal nn.LSTM's; packed with unsorted
    lengths, or padded (batch_first: an input the module transposes, which a backend then copies)."""
    torch.manual_seed(5)
    ref, fast = make_pair(4, 6, 2, bidirectional=True, proj_size=3, backend=backend, batch_first=batch_first)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    results = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        inp = pack_padded_sequence(xi, torch.tensor([4, 5, 2]), enforce_sorted=False) if packed else xi
        y, h, c = _leaves(m(inp))
        loss = (y * y).sum() + h.sum() + c.sin().sum()
        first = torch.autograd.grad(loss, [xi, *m.parameters()], create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        results.append([*first, *torch.autograd.grad(penalty, [xi, *m.parameters()])])
    for got, exp in zip(results[1], results[0]):
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol)


def assert_backward_rows_match(bwd_op, rows_op, bwd_args, x, h_prev, proj_rows=None) -> None:
    """A fast backend's backward by rows (per-sample gradients) against its full backward on the same arguments
    (bwd_args, ending in has_bias, which the rows op does not take): opcheck, the same input gradients (dx left
    out without input_grad), and rows whose products are the weight gradients. h_prev(rows): the h each step read;
    proj_rows(rows): with a projection, (gradient reaching each output h, unprojected h), else None."""
    rows_args, has_bias = bwd_args[:-1], bwd_args[-1]
    torch.library.opcheck(rows_op, rows_args)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = bwd_op(*bwd_args)
    rows = rows_op(*rows_args)
    for got, expected in zip(rows[:3], (dx, dh0, dc0)):
        torch.testing.assert_close(got, expected)
    # Without the input's gradient (per-sample gradients of a first layer fed data): dx empty, the rest the same
    torch.library.opcheck(rows_op, (*rows_args, False))
    no_dx = rows_op(*rows_args, False)
    assert no_dx[0].shape == (0,)
    assert all(torch.equal(a, b) for a, b in zip(no_dx[1:], rows[1:]))

    def product(grad_rows, input_rows):  # summed over every (t, b) row
        return grad_rows.flatten(0, 1).t() @ input_rows.flatten(0, 1)

    tol = dict(atol=1e-5, rtol=1e-5)
    dgates = rows[3]
    torch.testing.assert_close(product(dgates, x), dw_ih, **tol)
    torch.testing.assert_close(product(dgates, h_prev(rows)), dw_hh, **tol)
    if has_bias:
        torch.testing.assert_close(dgates.flatten(0, 1).sum(0), db, **tol)
    if proj_rows is not None and proj_rows(rows) is not None:
        torch.testing.assert_close(product(*proj_rows(rows)), dw_hr, **tol)


def require_triton():
    """triton, for a test module of the triton backend: skips the module where triton is missing or older than the
    backend takes (it then reports itself unavailable, and its own tests say so)."""
    triton = pytest.importorskip("triton")
    from fastlstm.backends.triton import MIN_TRITON, triton_version

    if triton_version() < MIN_TRITON:
        pytest.skip(f"triton {triton.__version__}: the backend needs {MIN_TRITON}+", allow_module_level=True)
    return triton


def interpreter_has_float64() -> bool:
    """Whether the installed triton's interpreter multiplies float64 tiles (the triton tests' float64 cases)."""
    from fastlstm.backends.triton import INTERPRETER_FLOAT64_TRITON, triton_version

    return triton_version() >= INTERPRETER_FLOAT64_TRITON


def fast_cpu_backends() -> list[str]:
    """cpp and triton where they serve a float64 call on the CPU here, as the tests that compare in float64 need
    (triton under the interpreter from triton 3.5 on)."""
    from fastlstm import backends
    from fastlstm.backends import LayerCall

    call = LayerCall("cpu", torch.float64, 3, 2, 4, 4, 0, True, False, False, True)
    return [name for name in ("cpp", "triton") if backends.get(name).unsupported_reason(call) is None]


# torch.compile(fullgraph=True) and torch.export of a model holding fastlstm.LSTM: from torch 2.5 on (in 2.4 the
# layer runs outside the graph; fastlstm/module.py, TRACEABLE).
needs_tracing = pytest.mark.skipif(
    not fastlstm.module.TRACEABLE, reason=f"fastlstm.LSTM is traced from torch 2.5 on (torch {torch.__version__})"
)

# A tensor made inside a torch.func transform (jvp, vmap of grad) cannot be read (tolist, item) before torch 2.10:
# "Cannot access data pointer of Tensor that doesn't have storage". Packed or lengths= input under such a transform
# reads its batch sizes, and the fast backends' per-sample gradients do too: seen failing so on 2.4-2.9, passing
# on 2.10 and later.
TRANSFORM_TENSORS_READABLE = torch.torch_version.TorchVersion(torch.__version__) >= "2.10"
needs_readable_transform_tensors = pytest.mark.skipif(
    not TRANSFORM_TENSORS_READABLE,
    reason=f"tensors made under torch.func transforms are readable from torch 2.10 on (torch {torch.__version__})",
)

# torch.onnx.export(dynamo=True) says it is exporting (torch.onnx.is_in_onnx_export, which sends the layer to the
# native path ONNX knows) from torch 2.8 on. On 2.5-2.7 that exporter traces the layer's fast ops, which it has no
# ONNX function for ("No ONNX function found for fastlstm.cpp_lstm_fwd").
needs_onnx_export_flag = pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < "2.8",
    reason=f"torch.onnx.export(dynamo=True) says it is exporting from torch 2.8 on (torch {torch.__version__})",
)


def auto_falls_back_to_native(monkeypatch, device: str, warning: str) -> tuple[fastlstm.LSTM, torch.Tensor]:
    """A 2-layer fastlstm.LSTM whose auto is made to pick triton on `device` (measured faster): its calls warn once
    (`warning`, a regex), give nn.LSTM's numbers bitwise, and the second call neither warns again nor retries.
    Returns the module and its input, for what a test checks after."""
    from fastlstm import dispatch

    monkeypatch.setattr(dispatch, "_fast_backend_for", lambda device_type: "triton")
    monkeypatch.setattr(dispatch, "_faster_than_native", lambda name, call: None)
    torch.manual_seed(0)
    m = fastlstm.LSTM(4, 8, 2, device=device)
    ref = nn.LSTM(4, 8, 2, device=device)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4, device=device)
    with pytest.warns(RuntimeWarning, match=warning) as seen:
        y, (h, c) = m(x)
        m(x)
    assert len([w for w in seen if issubclass(w.category, RuntimeWarning)]) == 1
    y_ref, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close((y, h, c), (y_ref, h_ref, c_ref), rtol=0, atol=0)
    assert fastlstm.explain(m, x).backends == ["native", "native"]
    return m, x


def small_layer_call(device_type: str, **changes):
    """A LayerCall for a small float32 layer (T5-B3-I4-H8, bias, gradients), with `changes` applied: what the
    triton tests ask the backend's questions (self-test, build guard) about."""
    from fastlstm.backends import LayerCall

    base = dict(device_type=device_type, dtype=torch.float32, seq_len=5, batch=3, input_size=4, hidden_size=8,
                proj_size=0, bias=True, packed=False, reverse=False, needs_grad=True)  # fmt: skip
    return LayerCall(**{**base, **changes})
