"""DistributedDataParallel (gloo, 2 processes, one machine) gives fastlstm the same gradients as nn.LSTM."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import fast_cpu_backends

SCRIPT = Path(__file__).parent / "scripts" / "ddp_grads.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


def _grads(folder, name, *args):
    out, store = folder / f"{name}.pt", folder / f"{name}.store"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(store), *args],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def nn_lstm_grads(tmp_path_factory):
    return _grads(tmp_path_factory.mktemp("ddp"), "torch", "torch")


FAST = fast_cpu_backends()


@pytest.mark.parametrize("backend", ["auto", "reference", *FAST])
def test_ddp_gradients_match_nn_lstm(tmp_path, nn_lstm_grads, backend):
    expected = nn_lstm_grads
    got = _grads(tmp_path, "fast", "fastlstm", backend)
    assert expected.keys() == got.keys() and len(got) == 2 * 2 * 5
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-9, rtol=1e-7, msg=name)
