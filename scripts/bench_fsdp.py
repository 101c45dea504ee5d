"""Benchmark: send_model from an FSDP2 trainer against one flat broadcast, same group, same run.

    python scripts/bench_fsdp.py --out fsdp.json                 # 2 GPUs: the issue's setup
    python scripts/bench_fsdp.py --device cpu --layers 4 --hidden 1024 --ffn 2816 --out cpu.json

Setup (defaults): a trainer of 2 ranks (GPU 0 and GPU 1, NCCL trainer group,
plus a Gloo group of the same ranks for the lockstep) holding
24 x [LayerNorm(4096), Linear(4096 -> 11264)] in bf16 (2.2 GB), ``fully_shard``
per block and at the root; one inference worker on GPU 1; an NCCL side group
(trainer rank 0 and the worker); 1 GiB x 2 buffers. Each round times one flat
``dist.broadcast`` of a uint8 tensor of the same total bytes on the side group,
then one ``send_model`` (rank 1 calls it with group None), each ended by a
tiny all_reduce and a device synchronize. Both trainer ranks enter each timed
``send_model`` together (a barrier on a Gloo group of the two, before rank 0
starts its clock), as after a training step, so rank 1's own preparation counts;
``--free-running`` drops that barrier (rank 1 then calls again as soon as its
last call returned, as before 2026-11-30's sixth session). Warm-up rounds first; the ratio is
the median of the per-round ratios flat / send_model. Every wait is bounded:
the side group's ``--timeout``, and ``--deadline`` for the whole run, after
which every process is killed and the script exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchxfer import (  # noqa: E402
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    ParallelConfig,
    WeightTransferConfig,
    destroy_side_group,
    send_model,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import _cprofile, _profile, apply_dev  # noqa: E402


def _maybe_profiled(args: argparse.Namespace, r: int, rank: int, fn):
    """``fn()``; the last round's under cProfile (``--cprofile``) or the torch profiler
    (``--profile``: a Chrome trace per rank, GPU kernels included) when asked."""
    if r != args.warmup + args.repeats - 1 or not (args.cprofile or args.profile):
        return fn()
    out = []
    if args.cprofile:
        _cprofile(lambda: out.append(fn()), args.cprofile, f"fsdp send_model round {r}", rank)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        _profile(lambda: out.append(fn()), args.profile, f"fsdp_rank{rank}", device)
    return out[0]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.LayerNorm(args.hidden), torch.nn.Linear(args.hidden, args.ffn))
              for _ in range(args.layers)]  # fmt: skip
    return torch.nn.Sequential(*blocks).to(device=device, dtype=torch.bfloat16)


def _sync(pg: dist.ProcessGroup, device: torch.device) -> None:
    t = torch.zeros(1, device=device)
    dist.all_reduce(t, group=pg)
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rank(rank: int, args: argparse.Namespace, ports: tuple[int, int], queue: mp.Queue) -> None:
    faulthandler.dump_traceback_later(max(5.0, args.deadline - 10.0), exit=False)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    apply_dev(args.dev)
    cuda = args.device == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(min(rank, 1))  # trainer ranks on GPU 0 and 1, the worker on GPU 1
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    side_port, trainer_port = ports
    rounds = args.warmup + args.repeats
    kw = dict(packed_buffer_size_bytes=args.buffer_mib << 20, packed_num_buffers=args.num_buffers,
              timeout_s=args.timeout)  # fmt: skip
    if rank == 2:  # the worker
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend=backend, timeout_s=args.timeout, device=device),
                                          ParallelConfig())  # fmt: skip
        engine.init_transfer_engine(NCCLWeightTransferInitInfo("127.0.0.1", side_port, 1, 2))
        pg = engine.model_update_group
        flat = torch.empty(args.total_bytes, dtype=torch.uint8, device=device)
        for r in range(rounds):
            _sync(pg, device)
            dist.broadcast(flat, group=pg, group_src=0)
            _sync(pg, device)
            _sync(pg, device)
            _maybe_profiled(args, r, rank, lambda: engine.receive_weights(None, lambda batch: None))
            _sync(pg, device)
        engine.shutdown()
        queue.put((rank, None))
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=args.timeout))  # fmt: skip
    # Status traffic off NCCL (the default), or on the trainer's own NCCL group (--lockstep nccl).
    lockstep = dist.new_group(backend="gloo") if args.lockstep == "gloo" or not cuda else None
    mesh = init_device_mesh(device.type, (2,))
    together = None if args.free_running else dist.new_group(backend="gloo")

    def enter() -> None:  # both trainer ranks start each send_model together, as after a training step
        if together is not None:
            dist.barrier(group=together)
    net = _model(args, device)
    for block in net:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    total = sum(p.numel() * p.element_size() for p in net.state_dict().values())
    if rank == 1:
        for r in range(rounds):
            enter()
            _maybe_profiled(args, r, rank, lambda: send_model(net, None, trainer_group=lockstep, **kw))
        dist.destroy_process_group()
        queue.put((rank, None))
        return
    group = NCCLWeightTransferEngine.trainer_init(dict(master_address="127.0.0.1", master_port=side_port,
                                                       world_size=2), backend=backend, timeout_s=args.timeout)  # fmt: skip
    flat = torch.randint(0, 256, (total,), dtype=torch.uint8, device=device)
    flats, sends, ratios = [], [], []
    for r in range(rounds):
        _sync(group, device)
        start = time.perf_counter()
        dist.broadcast(flat, group=group, group_src=0)
        _sync(group, device)
        t_flat = time.perf_counter() - start
        _sync(group, device)
        enter()
        start = time.perf_counter()
        stats = _maybe_profiled(args, r, rank, lambda: send_model(net, group, trainer_group=lockstep, **kw))
        _sync(group, device)
        t_send = time.perf_counter() - start
        print(f"round {r}{' (warm-up)' if r < args.warmup else ''}: flat {t_flat * 1e3:.2f} ms, send_model "
              f"{t_send * 1e3:.2f} ms, {t_flat / t_send:.2f}x flat", file=sys.stderr, flush=True)  # fmt: skip
        if r >= args.warmup:
            flats.append(t_flat)
            sends.append(t_send)
            ratios.append(t_flat / t_send)
    destroy_side_group(group)
    dist.destroy_process_group()
    queue.put((rank, {
        "setup": f"FSDP2 trainer of 2 ranks ({args.device}), {args.layers} x [LayerNorm({args.hidden}), "
                 f"Linear({args.hidden}->{args.ffn})] bf16, 1 worker, {backend} side group, "
                 f"trainer_group {'the default (NCCL) group' if cuda and args.lockstep == 'nccl' else 'a Gloo group'}, "
                 f"{'rank 1 free-running' if args.free_running else 'trainer ranks enter together'}, "
                 f"{args.buffer_mib} MiB x {args.num_buffers} buffers",
        "bytes": total, "tensors": stats.num_tensors, "rounds": args.repeats,
        "flat_ms": statistics.median(flats) * 1e3, "send_model_ms": statistics.median(sends) * 1e3,
        "ratio_to_flat": statistics.median(ratios),
        "flat_ms_all": [t * 1e3 for t in flats], "send_model_ms_all": [t * 1e3 for t in sends],
    }))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11264)
    p.add_argument("--buffer-mib", type=int, default=1024)
    p.add_argument("--num-buffers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lockstep", default="gloo", choices=["gloo", "nccl"],
                   help="send_model's trainer_group: a Gloo group of the trainer ranks, or None (the default "
                        "NCCL group, whose status traffic send_model moves to a Gloo twin where it can)")
    p.add_argument("--free-running", action="store_true",
                   help="no barrier of the trainer ranks before each send_model (rank 1 runs ahead)")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on every wait on the side and trainer groups")
    p.add_argument("--deadline", type=float, default=300.0, help="kill everything after this many seconds")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="the last round under the torch profiler on every rank (DIR/fsdp_rank{r}.json)")
    p.add_argument("--cprofile", default=None, metavar="DIR",
                   help="profile the last round on every rank (DIR/cprofile_rank{r}.txt)")
    p.add_argument("--dev", action="append", default=[], metavar="MODULE.NAME=INT",
                   help="development: set a constant of the package in every rank (repeatable)")
    p.add_argument("--out", required=True, help="write the result here (JSON)")
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs (trainer ranks on GPU 0 and 1, the worker on GPU 1)")
    h, f = args.hidden, args.ffn
    args.total_bytes = args.layers * (2 * h + f * h + f) * 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports = (_port(), _port())
    procs = [ctx.Process(target=_rank, args=(r, args, ports, queue), daemon=True) for r in range(3)]
    for proc in procs:
        proc.start()
    end = time.monotonic() + args.deadline
    results: dict = {}
    try:
        while len(results) < 3:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                raise RuntimeError(f"a rank died: exit codes {[proc.exitcode for proc in procs]}")
            try:
                rank, value = queue.get(timeout=max(0.1, min(1.0, end - time.monotonic())))
            except Exception:
                if time.monotonic() > end:
                    raise TimeoutError(f"deadline of {args.deadline} s passed") from None
                continue
            results[rank] = value
    except Exception as e:
        print(f"bench_fsdp failed: {e}", file=sys.stderr)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        sys.exit(1)
    for proc in procs:
        proc.join(10)
    row = results[0]
    print(f"{row['setup']}\n{row['bytes'] / 1e9:.2f} GB, {row['tensors']} tensors: flat {row['flat_ms']:.2f} ms, "
          f"send_model {row['send_model_ms']:.2f} ms, {row['ratio_to_flat']:.2f}x flat (median of {row['rounds']})")
    with open(args.out, "w") as fh:
        json.dump(row, fh, indent=1)


if __name__ == "__main__":
    main()
