"""What packing costs the link, and what sending a bucket's tensors as one NCCL group would save.

NCCL between GPU 0 (sender) and GPU 1 (receiver); 2 GPUs needed. The tensors of
``scripts/bench.py``'s transformer layout (about 4 GiB of bf16), grouped greedily into
buckets of at most 256 MiB or 1 GiB, moved in five ways against one flat broadcast of
the same bytes:

- ``raw``: one broadcast per bucket from two preallocated buffers, nothing packed
  (the floor of any packed pipeline with this many broadcasts);
- ``pack``: the same, with each bucket first packed into its buffer by one
  ``torch.cat`` on a side stream, buffer reuse ordered by CUDA events (an ideal packed
  pipeline: no control traffic, no Python between buckets);
- ``alone``: one broadcast per tensor, straight from its memory, not grouped;
- ``group``: one broadcast per tensor, straight from its memory, each bucket's
  broadcasts issued as one NCCL group (``_coalescing_manager``); the receiver gets
  them into views of its two buffers;
- ``group_pack_small``: as ``group``, with tensors under 1 MiB packed into a small
  staging buffer sent as one more broadcast of the group.

Median of 10 rounds; rank 0 prints one line per case.
A development tool: ``python3 scripts/diag_pack_contention.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import _coalescing_manager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import layout  # noqa: E402
from demo_util import free_port  # noqa: E402
from diag_util import high_priority_group, nccl_pair, sync  # noqa: E402

CASES = ("flat", "raw", "pack", "alone", "group", "group_pack_small")
ROUNDS, WARMUP = 12, 2
SMALL = 1 << 20


def buckets(sizes: list[int], limit: int) -> list[list[int]]:
    """Tensor indices per bucket: greedy, a bucket closes when the next tensor would overflow it."""
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if out[-1] and used + n > limit:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


def main(rank: int, port: int) -> None:
    device = nccl_pair(rank, port)
    group = high_priority_group()
    specs = layout("transformer", 4096)
    gen = torch.Generator(device=device).manual_seed(1)
    tensors = [torch.randn(shape, generator=gen, device=device).to(dt) for _, shape, dt in specs]
    flat_src = [t.view(-1).view(torch.uint8) for t in tensors]
    sizes = [t.numel() for t in flat_src]
    total = sum(sizes)
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    pack_stream = torch.cuda.Stream(device)

    def run(case: str, limit: int, bufs: list[torch.Tensor], plan: list[list[int]]) -> None:
        cur = torch.cuda.current_stream()
        if case == "flat":
            dist.broadcast(flat, src=0, group=group)
            return
        if case == "alone":
            works = [dist.broadcast(t if rank == 0 else bufs[0][: t.numel()], src=0, group=group, async_op=True)
                     for t in flat_src]  # fmt: skip
            for w in works:
                w.wait()
            return
        free = [torch.cuda.Event() for _ in bufs]
        works = []
        for k, idx in enumerate(plan):
            buf = bufs[k % len(bufs)]
            nbytes = sum(sizes[i] for i in idx)
            if case in ("raw", "pack"):
                if case == "pack" and rank == 0:
                    if k >= len(bufs):
                        pack_stream.wait_event(free[k % len(bufs)])
                    with torch.cuda.stream(pack_stream):
                        torch.cat([flat_src[i] for i in idx], out=buf[:nbytes])
                    cur.wait_stream(pack_stream)
                works.append(dist.broadcast(buf[:nbytes], src=0, group=group, async_op=True))
            else:
                small = [i for i in idx if sizes[i] < SMALL] if case == "group_pack_small" else []
                big = [i for i in idx if i not in small]
                with _coalescing_manager(group, device, async_ops=True) as cm:
                    offset = 0
                    for i in big:
                        dst = flat_src[i] if rank == 0 else buf[offset : offset + sizes[i]]
                        dist.broadcast(dst, src=0, group=group, async_op=True)
                        offset += sizes[i]
                    if small:
                        n = sum(sizes[i] for i in small)
                        stage = buf[offset : offset + n]
                        if rank == 0:
                            torch.cat([flat_src[i] for i in small], out=stage)
                        dist.broadcast(stage, src=0, group=group, async_op=True)
                works.extend(cm.works)
            works[-1].wait()  # the current stream waits for the bucket's broadcast (no CPU wait)
            free[k % len(bufs)].record(cur)
        for w in works:
            w.wait()

    results = {}
    for mib in (256, 1024):
        bufs = [torch.empty(mib << 20, dtype=torch.uint8, device=device) for _ in range(2)]
        plan = buckets(sizes, mib << 20)
        for case in CASES:
            times = []
            for i in range(ROUNDS):
                sync(device)
                start = time.perf_counter()
                run(case, mib, bufs, plan)
                torch.cuda.synchronize()
                sync(device)
                if i >= WARMUP:
                    times.append((time.perf_counter() - start) * 1e3)
            results[mib, case] = statistics.median(times)
        del bufs
    if rank == 0:
        print(f"rank0 {len(tensors)} tensors, {total / 2**30:.2f} GiB", flush=True)
        for (mib, case), ms in results.items():
            floor = results[mib, "flat"]
            print(f"rank0 {mib} MiB buckets {case}: {ms:.2f} ms (flat {floor:.2f}, {floor / ms:.3f}x)", flush=True)
    # Bit-exactness of the grouped path: one bucket, compared with the sender's bytes.
    plan = buckets(sizes, 256 << 20)
    idx = plan[1]
    buf = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    with _coalescing_manager(group, device, async_ops=True) as cm:
        offset = 0
        for i in idx:
            dist.broadcast(flat_src[i] if rank == 0 else buf[offset : offset + sizes[i]], src=0, group=group, async_op=True)
            offset += sizes[i]
    cm.wait()
    torch.cuda.synchronize()
    if rank == 1:
        offset, ok = 0, True
        for i in idx:
            ok &= torch.equal(buf[offset : offset + sizes[i]], flat_src[i])
            offset += sizes[i]
        print(f"rank1 grouped bucket bit-exact: {ok} ({len(idx)} tensors)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(free_port(),), nprocs=2)
