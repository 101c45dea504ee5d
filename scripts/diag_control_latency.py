"""Latency of one small Gloo all_gather between two GPU processes (2 GPUs needed).

torchxfer's control rows are such all_gathers on a Gloo group beside the NCCL payload group.
Cases: both ranks post at once (idle); rank 0 posts 0.4 ms later (idle_lag); rank 0 first
queues a 256 MiB NCCL broadcast that rank 1 matches only after the all_gather (nccl_pending,
with and without the lag). Each rank prints the median time from its own post to completion,
and from the start of the round. A development tool: ``python3 scripts/diag_control_latency.py``.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from demo_util import free_port  # scripts/ is on sys.path when run as a script

ROUNDS, WARMUP = 40, 5
CASES = ("idle", "idle_lag", "nccl_pending", "nccl_pending_nolag")


def main(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    gloo = dist.new_group(backend="gloo")
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    out = torch.empty(16, dtype=torch.int64)
    row = torch.zeros(8, dtype=torch.int64)

    def sync() -> None:
        one = torch.ones(1, device="cuda")
        dist.all_reduce(one)
        torch.cuda.synchronize()
        dist.barrier(group=gloo)

    for case in CASES:
        own, total = [], []
        for i in range(ROUNDS):
            sync()
            start = time.perf_counter()
            if rank == 0 and case.startswith("nccl"):
                dist.broadcast(big, src=0)  # unmatched until rank 1 has its row
            if rank == 0 and case in ("idle_lag", "nccl_pending"):
                while time.perf_counter() - start < 4e-4:
                    pass
            posted = time.perf_counter()
            dist.all_gather_into_tensor(out, row, group=gloo, async_op=True).wait()
            done = time.perf_counter()
            if rank == 1 and case.startswith("nccl"):
                dist.broadcast(big, src=0)
            torch.cuda.synchronize()
            if i >= WARMUP:
                own.append((done - posted) * 1e3)
                total.append((done - start) * 1e3)
        print(f"rank {rank} {case}: from own post {statistics.median(own):.3f} ms, "
              f"from start {statistics.median(total):.3f} ms (max {max(total):.3f})", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(free_port(),), nprocs=2)
