"""What a broadcast costs by how it is launched, on NCCL between GPU 0 and GPU 1 (2 GPUs needed).

The bucket sizes ``scripts/bench.py``'s transformer layout gets at 256 MiB (22 buckets) and
at 1 GiB (5), broadcast back to back from one preallocated buffer, with no packing and no
control traffic, against one flat broadcast of the same bytes: synchronous on the current
stream, ``async_op=True`` on a normal- and on a high-priority group (as torchxfer's side
group), and into fresh tensors on the receiver (as unpacked mode). Median of 10 rounds;
rank 0 prints one line per case. A development tool: ``python3 scripts/diag_broadcast_modes.py``.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from demo_util import free_port  # scripts/ is on sys.path when run as a script
from diag_util import high_priority_group, nccl_pair, sync

SIZES_MIB = {
    256: [250, 216, 240, 240, 216, 176, 216, 176, 216, 176, 216, 176, 216, 176, 216, 176, 216, 176, 216, 176, 88, 250],
    1024: [946, 1000, 960, 1000, 514],
}
CASES = ("flat", "sync_cur", "async_lp", "async_hp", "async_hp_fresh")
ROUNDS, WARMUP = 12, 2


def main(rank: int, port: int) -> None:
    device = nccl_pair(rank, port)
    high = high_priority_group()
    normal = dist.new_group([0, 1], backend="nccl")
    flat = torch.empty(sum(SIZES_MIB[256]) << 20, dtype=torch.uint8, device=device)

    def views(mib: int) -> list[torch.Tensor]:
        out, offset = [], 0
        for size in SIZES_MIB[mib]:
            out.append(flat[offset : offset + (size << 20)])
            offset += size << 20
        return out

    def run(case: str, mib: int) -> None:
        if case == "flat":
            dist.broadcast(flat, src=0, group=normal)
        elif case == "sync_cur":
            for v in views(mib):
                dist.broadcast(v, src=0, group=normal)
        else:
            group = normal if case == "async_lp" else high
            fresh = case == "async_hp_fresh" and rank != 0
            works = [dist.broadcast(torch.empty_like(v) if fresh else v, src=0, group=group, async_op=True)
                     for v in views(mib)]  # fmt: skip
            for work in works:
                work.wait()

    results = {}
    for mib in SIZES_MIB:
        for case in CASES:
            times = []
            for i in range(ROUNDS):
                sync(device)
                start = time.perf_counter()
                run(case, mib)
                torch.cuda.synchronize()
                sync(device)
                if i >= WARMUP:
                    times.append((time.perf_counter() - start) * 1e3)
            results[mib, case] = statistics.median(times)
    if rank == 0:
        for (mib, case), ms in results.items():
            floor = results[mib, "flat"]
            print(f"rank0 {mib} MiB buckets {case}: {ms:.2f} ms (flat {floor:.2f}, {floor / ms:.3f}x)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(free_port(),), nprocs=2)
