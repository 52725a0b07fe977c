"""Two processes over gloo (file rendezvous, no network), DistributedDataParallel and FSDP2's fully_shard: writes
rank 0's gradients.

python ddp_grads.py OUT_FILE STORE_FILE KIND [KIND ...]

KIND is `torch` (nn.LSTM) or a fastlstm backend's name. OUT_FILE gets {KIND: {parameter name: gradient}} for DDP
and {KIND/fsdp: ...} for fully_shard (the whole gradients, gathered from the shards) where torch has it. Every kind
trains in the same two processes, one after the other (each process start and gloo rendezvous costs seconds).
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastlstm


def worker(rank, out, store, kinds):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=_timeout())
    grads = {kind: _train(rank, kind) for kind in kinds}
    if _fully_shard() is not None:
        grads.update({f"{kind}/fsdp": _train(rank, kind, sharded=True) for kind in kinds})
    if rank == 0:
        torch.save(grads, out)
    # Gloo's teardown aborted a rank now and then on loaded machines ("terminate called without an active
    # exception", also with backend="reference", which runs no fastlstm kernel). So: meet at a barrier, drop the
    # DDP reducers (the process group's last users) while the interpreter is fully alive, destroy the group, and
    # leave without interpreter finalisation, which is not what this script tests.
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)


def _train(rank, kind, sharded=False):
    """Rank 0's gradients after two steps of a model whose LSTM is nn.LSTM (`torch`) or fastlstm's `kind`: under
    DDP, or sharded by FSDP2 (each gradient then gathered whole from the ranks' shards)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, 2, bidirectional=True, proj_size=5, batch_first=True).double()
    if kind != "torch":
        lstm = fastlstm.convert(lstm, backend=kind)
    model = _fully_shard()(lstm) if sharded else nn.parallel.DistributedDataParallel(lstm)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 7, 6, generator=gen, dtype=torch.float64)
    for _ in range(2):
        model.zero_grad()
        y, (h, c) = model(x)
        (y.pow(2).sum() + h.sum() + c.sum()).backward()
    if sharded:
        return {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return {n: p.grad.clone() for n, p in model.module.named_parameters()}


def _fully_shard():
    """FSDP2's fully_shard where this torch has it (2.6 and later; before, under torch.distributed._composable) and
    it runs on the CPU: torch 2.6's stand-in CPU stream has no record_event, which fully_shard's all-gather calls
    (nn.LSTM's run failed there alike)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard if hasattr(torch.cpu.Stream, "record_event") else None


def _timeout():
    import datetime

    return datetime.timedelta(seconds=60)


if __name__ == "__main__":
    out, store, *kinds = sys.argv[1:]
    mp.spawn(worker, args=(out, store, kinds), nprocs=2, join=True)
