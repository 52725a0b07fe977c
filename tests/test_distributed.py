"""DistributedDataParallel and FSDP2's fully_shard (gloo, 2 processes, one machine) give fastlstm the same gradients
as nn.LSTM."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import fast_cpu_backends

SCRIPT = Path(__file__).parent / "scripts" / "ddp_grads.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

BACKENDS = ["auto", "reference", *fast_cpu_backends()]


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    """Every kind's gradients from one run of the script: nn.LSTM's and each backend's, in the same processes."""
    folder = tmp_path_factory.mktemp("ddp")
    out, store = folder / "grads.pt", folder / "store"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(store), "torch", *BACKENDS],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_gradients_match_nn_lstm(ddp_grads, backend):
    expected, got = ddp_grads["torch"], ddp_grads[backend]
    assert expected.keys() == got.keys() and len(got) == 2 * 2 * 5
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_sharded_gradients_match_nn_lstm(ddp_grads, backend):
    """FSDP2 (fully_shard) swaps each parameter for its gathered whole around forward and backward: the
    gradients, gathered from the shards, are nn.LSTM's under it, and DDP's (both average over the ranks)."""
    if "torch/fsdp" not in ddp_grads:
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard that runs on the CPU (ddp_grads.py)")
    expected, got = ddp_grads["torch/fsdp"], ddp_grads[f"{backend}/fsdp"]
    assert expected.keys() == got.keys() == ddp_grads["torch"].keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-9, rtol=1e-7, msg=name)
        torch.testing.assert_close(got[name], ddp_grads["torch"][name], atol=1e-9, rtol=1e-7, msg=name)
