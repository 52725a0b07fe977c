"""A real training script for nn.LSTM runs unmodified with torch.nn.LSTM patched to fastlstm.LSTM."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fast_cpu_backends

SCRIPT = Path(__file__).parent / "scripts" / "train_tagger.py"

PATCHED = """
import runpy, sys, torch, fastlstm
torch.nn.LSTM = fastlstm.LSTM
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _final_loss(cmd, env=None) -> tuple[float, str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("final loss "), done.stdout
    return float(last.split()[-1]), done.stderr


# triton is left out: under the CPU interpreter this script takes about 90 s, and its kernels are covered by the
# parity, DDP, compile and property tests. (Not unavailable_reason(): that builds cpp while pytest collects, as
# `pytest -m cuda` on a GPU machine does for tests it then deselects.)
FAST = [name for name in fast_cpu_backends() if name != "triton"]


@pytest.fixture(scope="module")
def plain_loss(tmp_path_factory):
    """The script's final loss with nn.LSTM, run once for every backend's comparison."""
    return _final_loss([sys.executable, str(SCRIPT), str(tmp_path_factory.mktemp("plain") / "plain.pt")])[0]


@pytest.mark.parametrize("backend", ["auto", "reference", *FAST])
def test_patched_training_script_reaches_the_same_loss(tmp_path, backend, plain_loss):
    plain = plain_loss
    env = dict(os.environ, FASTLSTM_BACKEND=backend)
    patched, _ = _final_loss([sys.executable, "-c", PATCHED, str(SCRIPT), str(tmp_path / "fast.pt")], env=env)
    assert plain < 1.0  # it learned something
    assert patched == pytest.approx(plain, rel=1e-3, abs=1e-4)
