"""What the two-GPU NCCL diagnostics (``scripts/diag_*.py``) share: a world of two ranks, one
per GPU, a high-priority group as torchxfer's side group uses, and a sync between rounds."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["high_priority_group", "nccl_pair", "run_ranks", "sync"]


def nccl_pair(rank: int, port: int) -> torch.device:
    """Join the default NCCL world of two ranks on 127.0.0.1:``port``; returns this rank's GPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=device)
    return device


def high_priority_group() -> dist.ProcessGroup:
    """A NCCL group of both ranks on high-priority streams (as torchxfer's side group)."""
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return dist.new_group([0, 1], backend="nccl", pg_options=options)


def sync(device: torch.device) -> None:
    """Both ranks done with everything queued: an all_reduce, then a device sync."""
    dist.all_reduce(torch.ones(1, device=device))
    torch.cuda.synchronize()


def run_ranks(target: Callable[..., None], n: int, make_args: Callable[[Any], tuple]) -> None:
    """Run ``target(rank, *make_args(ctx))`` in ``n`` spawned processes (``make_args`` gets the
    spawn context, for queues), kill any still alive after 300 s, and exit with the worst code."""
    ctx = mp.get_context("spawn")
    args = make_args(ctx)
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for p in procs:
        if p.is_alive():
            p.kill()
    sys.exit(max(p.exitcode or 0 for p in procs))
