"""Shared test settings: tolerances, markers, seeding, and the Triton interpreter on GPU-less machines."""

import os

import pytest

# Triton kernels run on CPU tensors through its interpreter; the variable must be set before triton is
# imported anywhere in the process, so it is set here, before any test module loads.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # torch missing: every test will fail loudly at import anyway
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _worker_threads() -> int | None:
    """A pytest-xdist worker's share of the CPUs this process may run on (None outside xdist). torch starts one
    thread a core in every worker: `-n auto` on 2 cores ran 4 threads on 2 CPUs, and OpenMP's barriers and the C++
    backend's team loop then waited on descheduled threads (a test 2 s alone took 20 s in the suite; test_parity,
    test_properties, test_lengths_streaming and test_module on 2 cores, alternating: 166-176 s, and 121-122 s at a
    share each). Tests of the multi-thread paths set their counts themselves."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return None
    from fastlstm.__main__ import usable_cpus  # after TRITON_INTERPRET is set above: fastlstm may import triton

    return max(1, min(torch.get_num_threads(), usable_cpus() // workers))


_threads = _worker_threads()
if _threads is not None:
    torch.set_num_threads(_threads)

# (atol, rtol) against nn.LSTM with the same weights.
TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-4),
}


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a developer's $FASTLSTM_BACKEND must not leak in."""
    monkeypatch.delenv("FASTLSTM_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _fresh_dispatch_cache():
    """Tests that swap a backend out must not see plans cached by earlier tests."""
    from fastlstm.module import forget_plans

    forget_plans()
    yield
    forget_plans()
