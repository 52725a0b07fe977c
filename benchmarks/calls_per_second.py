"""Back-to-back inference calls for a few seconds: calls per second, the median call and the slowest 1% of calls.
Medians hide calls that wait now and then, as every call does once a container's CPU quota is spent for the
period (README, "In a container with a CPU limit"). nn.LSTM and each fastlstm backend named, with the same weights,
taking turns in rounds of a few hundred milliseconds. --python-threads N: N Python threads call one model at once,
as a server's workers do (calls per second then counts them all), each at --worker-threads torch threads if given.

    python benchmarks/calls_per_second.py SHAPE [SHAPE...] [--backend NAME]... [--seconds S] [--threads N]
        [--python-threads N] [--worker-threads N] [--json OUT]

To time under a CPU quota (cgroup v1, as root): mkdir /sys/fs/cgroup/cpu/q; echo 100000 >
/sys/fs/cgroup/cpu/q/cpu.cfs_quota_us; then run this from a shell whose pid was written to
/sys/fs/cgroup/cpu/q/cgroup.procs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from fastlstm import backends
from fastlstm.__main__ import _positive_int, _shape_argument, _thread_count, machine_header, timing_notes
from fastlstm.benchmark import check_script_arguments, make_models

ROUNDS = 4


def _calls(model, x, seconds: float, latencies: list[float]) -> float:
    """Calls for about `seconds`, each call's time appended; returns the time they took in all."""
    start = time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            began = time.perf_counter()
            model(x)
            latencies.append(time.perf_counter() - began)
    return time.perf_counter() - start


def _calls_from_threads(model, x, seconds: float, latencies: list[float], threads: int, worker_threads) -> float:
    """_calls in `threads` Python threads at once (each at `worker_threads` torch threads if given); returns the
    wall time they took."""

    def worker(times: list[float]) -> None:
        if worker_threads:
            torch.set_num_threads(worker_threads)
        _calls(model, x, seconds, times)

    per_thread: list[list[float]] = [[] for _ in range(threads)]
    workers = [threading.Thread(target=worker, args=(times,)) for times in per_thread]
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for times in per_thread:
        latencies.extend(times)
    return time.perf_counter() - start


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


_positive_float.__name__ = "positive number"  # argparse names the type in its error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", type=_shape_argument, help="as `python -m fastlstm bench --shape`")
    parser.add_argument(
        "--backend", action="append", choices=["auto", *backends.names()],
        help="fastlstm backend (repeatable; default cpp)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=_positive_float, default=3.0, help="of calls per model and shape (default 3)")
    parser.add_argument("--threads", type=_thread_count, help="torch.set_num_threads(N) first")
    parser.add_argument(
        "--python-threads", type=_positive_int, default=1, help="Python threads calling at once (default 1)"
    )
    parser.add_argument(
        "--worker-threads", type=_thread_count, help="torch.set_num_threads(N) in each of those threads (2+ of them)"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.worker_threads is not None and args.python_threads < 2:
        parser.error("--worker-threads sets the threads of --python-threads' callers: give --python-threads 2 or more")
    check_script_arguments(parser, args.shapes, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine_header("cpu")
    print("calls per second: " + ", ".join(f"{k} {v}" for k, v in header.items()))
    for note in timing_notes():
        print(f"note: {note}")
    results = {}
    for shape in args.shapes:
        torch.manual_seed(0)
        models = make_models(shape, args.backend or ["cpp"], "cpu", torch.float32)
        x = shape.model_input(torch.randn(shape.seq_len, shape.batch, shape.input_size))
        latencies: dict[str, list[float]] = {name: [] for name in models}
        wall = dict.fromkeys(models, 0.0)
        for model in models.values():
            _calls(model, x, 0.1, [])  # warm up: a first call builds and packs
        for _ in range(ROUNDS):
            for name, model in models.items():
                if args.python_threads > 1:
                    wall[name] += _calls_from_threads(
                        model, x, args.seconds / ROUNDS, latencies[name], args.python_threads, args.worker_threads
                    )
                else:
                    wall[name] += _calls(model, x, args.seconds / ROUNDS, latencies[name])
        results[str(shape)] = {}
        for name, times in latencies.items():
            times.sort()
            entry = {
                "calls_per_s": len(times) / wall[name],
                "median_ms": 1e3 * statistics.median(times),
                "slowest_1pct_ms": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
                "calls": len(times),
            }
            results[str(shape)][name] = entry
            print(
                f"{shape} {name}: {entry['calls_per_s']:.0f} calls/s, median {entry['median_ms']:.2f} ms, "
                f"slowest 1% {entry['slowest_1pct_ms']:.2f} ms",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            run = {"machine": header, "seconds": args.seconds, "python_threads": args.python_threads}
            run.update(worker_threads=args.worker_threads, results=results)
            json.dump(run, f, indent=1)


if __name__ == "__main__":
    main()
