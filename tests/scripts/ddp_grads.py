"""Two-process DistributedDataParallel over gloo (file rendezvous, no network): writes rank 0's gradients.

python ddp_grads.py OUT_FILE STORE_FILE torch|fastlstm [BACKEND]
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastlstm


def worker(rank, out, store, kind, backend):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=_timeout())
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, 2, bidirectional=True, proj_size=5, batch_first=True).double()
    if kind == "fastlstm":
        lstm = fastlstm.convert(lstm, backend=backend)
    model = nn.parallel.DistributedDataParallel(lstm)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 7, 6, generator=gen, dtype=torch.float64)
    for _ in range(2):
        model.zero_grad()
        y, (h, c) = model(x)
        (y.pow(2).sum() + h.sum() + c.sum()).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
    # Gloo's teardown aborted a rank now and then on loaded machines ("terminate called without an active
    # exception", also with backend="reference", which runs no fastlstm kernel). So: meet at a barrier, drop the
    # DDP reducer (the process group's last user) while the interpreter is fully alive, destroy the group, and
    # leave without interpreter finalisation, which is not what this script tests.
    dist.barrier()
    del model, lstm
    gc.collect()
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)


def _timeout():
    import datetime

    return datetime.timedelta(seconds=60)


if __name__ == "__main__":
    out, store, kind = sys.argv[1:4]
    backend = sys.argv[4] if len(sys.argv) > 4 else None
    mp.spawn(worker, args=(out, store, kind, backend), nprocs=2, join=True)
