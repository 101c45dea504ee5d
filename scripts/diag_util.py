"""What the two-GPU NCCL diagnostics (``scripts/diag_*.py``) share: a world of two ranks, one
per GPU, a high-priority group as torchxfer's side group uses, and a sync between rounds."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["high_priority_group", "nccl_pair", "sync"]


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
