"""Could a worker on trainer rank 1's GPU take rank 1's half of the weights from rank 1's own memory
while rank 0 broadcasts only its half? The bound of the FSDP2 setup of issue 11 (trainer ranks on
GPU 0 and GPU 1, one worker on GPU 1), measured without the library. Three processes: rank 0 on
GPU 0 (trainer rank 0), rank 1 on GPU 1 (trainer rank 1), rank 2 on GPU 1 (the worker); a NCCL
group of ranks 0 and 2 on high-priority streams, as the side group.

    python3 scripts/diag_two_source.py      (needs 2 GPUs)

Cases, each the median of 10 rounds in ms (the slowest rank's time; every rank enters each round
together): ``flat`` 2 GiB broadcast 0 -> 2; ``half`` 1 GiB broadcast 0 -> 2; ``local`` the worker
copies 1 GiB from rank 1's memory (CUDA IPC, same GPU) into its own, on a side stream;
``half+local`` both at once (the two-source design); ``flat+pull`` rank 0 copies 1 GiB from rank
1's memory into GPU 0 while it broadcasts 2 GiB (what ``send_model`` does today, by peer reads);
``push`` rank 1 copies 1 GiB from its memory into rank 0's on GPU 0 by GPU 1's copy engines
(``cudaMemcpyAsync`` on a GPU 1 stream, peer access enabled), and ``flat+push`` beside the 2 GiB
broadcast (rank 1's half would then cross the link against the broadcast's direction, by the other
GPU's engines).
The 1 GiB source is shared once by CUDA IPC (torch.multiprocessing queues: a development tool,
not the library).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_util import free_port  # noqa: E402
from diag_util import run_ranks  # noqa: E402

from torchxfer.ipc_transport import _cudart  # noqa: E402  (the CUDA runtime torch loaded)

GiB = 1 << 30
ROUNDS = 10


def rank_main(rank: int, port: int, queues: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", 0 if rank == 0 else 1)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo", rank=rank, world_size=3)
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    side = dist.new_group([0, 2], backend="nccl", pg_options=options)  # every rank calls it
    payload = torch.empty(2 * GiB, dtype=torch.uint8, device=device) if rank != 1 else None
    if rank == 1:
        mine = torch.randint(0, 255, (GiB,), dtype=torch.uint8, device=device)
        queues[0].put(mine)
        queues[2].put(mine)
        other = queues[1].get()  # rank 0's landing buffer on GPU 0, mapped here
        lib = _cudart()
        lib.cudaDeviceEnablePeerAccess(0, 0)  # from GPU 1 to GPU 0 (704: already enabled)
        lib.cudaGetLastError()
    else:
        mine = torch.empty(GiB, dtype=torch.uint8, device=device)  # where a copy lands
        if rank == 0:
            queues[1].put(mine)
        other = queues[rank].get()  # rank 1's half, mapped here
    stream = torch.cuda.Stream(device)
    if rank != 1:
        dist.broadcast(payload[:1024], group_src=0, group=side)  # the communicator, made outside the timing

    def sync() -> None:
        torch.cuda.synchronize(device)
        dist.barrier()

    def timed(case: str) -> float:
        parts = case.split("+")
        times = []
        for rnd in range(ROUNDS + 1):
            sync()
            start = time.perf_counter()
            if ("local" in parts and rank == 2) or ("pull" in parts and rank == 0):
                with torch.cuda.stream(stream):
                    mine.copy_(other)
            if "push" in parts and rank == 1:
                code = lib.cudaMemcpyAsync(ctypes.c_void_p(other.data_ptr()), ctypes.c_void_p(mine.data_ptr()),
                                           ctypes.c_size_t(GiB), 4, ctypes.c_void_p(stream.cuda_stream))
                assert code == 0, f"cudaMemcpyAsync: {code}"
            if rank != 1 and ("flat" in parts or "half" in parts):
                size = 2 * GiB if "flat" in parts else GiB
                dist.broadcast(payload[:size], group_src=0, group=side)
            torch.cuda.synchronize(device)
            took = torch.tensor([(time.perf_counter() - start) * 1e3])
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            if rnd:
                times.append(took.item())
        return statistics.median(times)

    for case in ("flat", "half", "local", "half+local", "flat+pull", "push", "flat+push",
                 "flat", "half+local", "flat+pull", "flat+push"):
        ms = timed(case)
        if rank == 0:
            print(f"rank0 {case:12s} {ms:.2f} ms", flush=True)
    dist.destroy_process_group()


def main() -> None:
    run_ranks(rank_main, 3, lambda ctx: (free_port(), [ctx.Queue() for _ in range(3)]))


if __name__ == "__main__":
    main()
