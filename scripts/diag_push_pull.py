"""Does a copy from GPU 1 into GPU 0 slow a broadcast from GPU 0 to GPU 1, and does it matter
which process issues it? Two GPUs, one process each. ``send_model`` under peer reads does this:
rank 0 pulls trainer rank 1's shards from GPU 1 while it broadcasts to a worker on GPU 1.

    python3 scripts/diag_push_pull.py      (needs 2 GPUs; gpu_check.sh step ``pushpull``)

Cases, each the median of 10 rounds in ms, both ranks entering each round together:
``bcast`` 2 GiB broadcast from rank 0 alone; ``pull_alone`` rank 0 copies 1 GiB from GPU 1's
memory into its own (the copy engines, its side stream); ``push_alone`` rank 1 copies 1 GiB from
its memory into GPU 0's; ``back_alone`` rank 1 broadcasts 1 GiB to rank 0 on a second NCCL group
(the SMs, not the copy engines); ``bcast+pull``, ``bcast+push`` and ``bcast+back`` both at once.
The 1 GiB tensors are shared once by CUDA IPC (torch.multiprocessing queues: a development tool, not the library).
"""

from __future__ import annotations

import statistics
import sys
import time
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_util import free_port  # noqa: E402
from diag_util import high_priority_group, nccl_pair, run_ranks, sync  # noqa: E402

GiB = 1 << 30
ROUNDS = 10


def rank_main(rank: int, port: int, to_1: mp.Queue, to_0: mp.Queue) -> None:
    device = nccl_pair(rank, port)
    payload = torch.empty(2 * GiB, dtype=torch.uint8, device=device)
    if rank == 0:
        mine = torch.empty(GiB, dtype=torch.uint8, device=device)  # where the copies land
        to_1.put(mine)
        other = to_0.get()  # GPU 1's source, mapped in this process
    else:
        mine = torch.randint(0, 255, (GiB,), dtype=torch.uint8, device=device)  # what the copies read
        to_0.put(mine)
        other = to_1.get()  # GPU 0's destination, mapped in this process
    side = torch.cuda.Stream(device)
    reverse = high_priority_group()  # rank 1 -> rank 0 on communicators of its own
    back = torch.empty(GiB, dtype=torch.uint8, device=device) if rank == 0 else mine
    dist.broadcast(back, group_src=1, group=reverse)  # (the communicator made outside the timing)

    def copy() -> None:
        with torch.cuda.stream(side):
            if rank == 0:
                mine.copy_(other)  # pull
            else:
                other.copy_(mine)  # push

    def timed(case: str) -> float:
        kind = case.split("+")[-1].removesuffix("_alone")
        copier = {"pull": 0, "push": 1}.get(kind)
        times = []
        for rnd in range(ROUNDS + 1):
            sync(device)
            start = time.perf_counter()
            if copier == rank:
                copy()
            work = dist.broadcast(back, group_src=1, group=reverse, async_op=True) if kind == "back" else None
            if case.startswith("bcast"):
                dist.broadcast(payload, src=0)
            if work is not None:
                work.wait()
            side.synchronize()
            sync(device)
            if rnd:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    for case in ("bcast", "pull_alone", "push_alone", "back_alone", "bcast+pull", "bcast+push", "bcast+back",
                 "bcast", "bcast+pull", "bcast+back"):
        ms = timed(case)
        if rank == 0:
            print(f"rank0 {case:12s} {ms:.2f} ms", flush=True)
    dist.destroy_process_group()


def main() -> None:
    run_ranks(rank_main, 2, lambda ctx: (free_port(), ctx.Queue(), ctx.Queue()))


if __name__ == "__main__":
    main()
