"""Benchmark: the same bytes over the side group three ways, against the floor.

    python scripts/bench.py                      # CPU, gloo, 1 trainer + 2 workers
    python scripts/bench.py --backend nccl --device cuda --workers 1
    python scripts/bench.py --pack-only --device cuda   # pack/unpack vs device copy

Modes, each on the same group in the same run:
  flat       one dist.broadcast of a single uint8 tensor of the layout's total
             bytes: the floor for this link;
  packed     trainer_send_weights(packed=True) / receive_weights(None, ...),
             swept over buffer size and number of buffers;
  per-tensor one raw dist.broadcast per tensor, the receiver allocating each
             tensor (the seed's one-by-one path).
Every timed phase ends with a one-element all_reduce so the clock covers
delivery, not the sender's enqueue. Each mode runs back to back with the flat
broadcast, round after round (one warm-up round first); the ratio to flat is
the median of the per-round ratios, so drift of the machine cancels. Reports
median time, GB/s, that ratio, and peak extra memory over all rounds of the
mode, buffers included (sender, and the largest over receivers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchxfer import NCCLWeightTransferEngine, ParallelConfig, WeightTransferConfig  # noqa: E402
from torchxfer import NCCLWeightTransferInitInfo, destroy_side_group, send_model  # noqa: E402
from torchxfer.packing import TensorSpec, pack_slot, plan_slots, slot_view, typed_view  # noqa: E402

MiB = 1 << 20


# -- layouts ---------------------------------------------------------------------------


def layout(name: str, total_mib: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) lists: deterministic, about ``total_mib`` MiB."""
    dt = torch.bfloat16
    if name == "transformer":
        # A decoder's tensor mix, layer by layer as in a Llama-style state dict:
        # embeddings, q/k/v/o and gate/up/down projections, tiny norms. Layers
        # are added until the size is reached (hundreds of tensors at 192 MiB).
        hidden = 512 if total_mib < 1024 else 4096
        ffn, vocab = hidden * 11 // 4, 16 * hidden if total_mib < 1024 else 32000
        specs = [("embed.weight", (vocab, hidden), dt)]
        layer = 0
        while sum(_nbytes(s) for s in specs) + vocab * hidden * dt.itemsize < total_mib * MiB:
            p = f"layers.{layer}."
            specs += [(p + "input_norm.weight", (hidden,), dt)]
            specs += [(p + f"attn.{x}_proj.weight", (hidden, hidden), dt) for x in "qkvo"]
            specs += [(p + "post_norm.weight", (hidden,), dt)]
            specs += [(p + "mlp.gate_proj.weight", (ffn, hidden), dt), (p + "mlp.up_proj.weight", (ffn, hidden), dt)]
            specs += [(p + "mlp.down_proj.weight", (hidden, ffn), dt)]
            layer += 1
        return specs + [("norm.weight", (hidden,), dt), ("lm_head.weight", (vocab, hidden), dt)]
    if name == "tiny":
        count = max(1, min(total_mib, 32) * MiB // 4096)  # 8192 tensors of 4 KiB at most
        return [(f"t{i}", (1024,), torch.float32) for i in range(count)]
    if name == "huge":
        side = int((total_mib * MiB // 3 // 2) ** 0.5)
        return [(f"h{i}", (side, side), dt) for i in range(3)]
    raise ValueError(f"unknown layout {name!r}")


def _nbytes(spec: tuple[str, tuple[int, ...], torch.dtype]) -> int:
    n = 1
    for d in spec[1]:
        n *= d
    return n * spec[2].itemsize


def make_tensors(specs: list, device: torch.device, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for name, shape, dtype in specs:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        out.append((name, t.to(device)))
    return out


# -- memory ------------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak extra memory of one phase: CUDA allocator peak, or host peak RSS (VmHWM reset)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                pass
            self.base = _rss_bytes("VmRSS:")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_bytes("VmHWM:") - self.base


# -- the distributed run ---------------------------------------------------------------------


def configs(args: argparse.Namespace) -> list[dict]:
    """The run plan; every rank computes the same list."""
    plan = []
    for name in args.layouts:
        plan.append({"layout": name, "mode": "flat"})
        for mib in args.buffer_mib:
            for nb in args.num_buffers:
                plan.append({"layout": name, "mode": "packed", "buffer_mib": mib, "num_buffers": nb})
        if args.sharded:
            plan.append({"layout": name, "mode": "sharded", "buffer_mib": args.buffer_mib[0],
                         "num_buffers": args.num_buffers[0]})  # fmt: skip
        if not args.skip_per_tensor:
            plan.append({"layout": name, "mode": "per-tensor"})
    return plan


def _shard(tensors: list[tuple[str, torch.Tensor]], device: torch.device) -> dict:
    """The layout as a 2-rank trainer holds it: every tensor a DTensor, Shard(0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (2,))
    return {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in tensors}


def _trainer_peer(args: argparse.Namespace, trainer_port: int) -> None:
    """Trainer rank 1 of a sharded trainer: only gathers, in step with rank 0's sends."""
    torch.set_num_threads(1)
    device = torch.device(args.device)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{trainer_port}", rank=1, world_size=2)
    for lay in args.layouts:
        sharded = _shard(make_tensors(layout(lay, args.total_mib), device), device)
        for _ in range(args.repeats + 1):
            send_model(sharded, None)
    dist.destroy_process_group()


def _sync(pg: dist.ProcessGroup, device: torch.device) -> None:
    t = torch.zeros(1, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, group=pg)
    if device.type == "cuda":
        torch.cuda.synchronize()


def rank_main(rank: int, args: argparse.Namespace, port: int, out: Any, trainer_port: int = 0) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if rank == args.workers + 1:
        return _trainer_peer(args, trainer_port)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    world = args.workers + 1
    info = dict(master_address="127.0.0.1", master_port=port, world_size=world)
    if rank == 0:
        if args.sharded:
            dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{trainer_port}", rank=0, world_size=2)
        pg = NCCLWeightTransferEngine.trainer_init(info, backend=args.backend, timeout_s=args.timeout)
        engine = None
    else:
        engine = NCCLWeightTransferEngine(
            WeightTransferConfig(backend=args.backend, timeout_s=args.timeout, device=device),
            ParallelConfig(rank=rank - 1, tensor_parallel_size=args.workers),
        )
        engine.init_transfer_engine(NCCLWeightTransferInitInfo("127.0.0.1", port, 1, world))
        pg = engine.model_update_group
    results = []
    for lay in args.layouts:
        specs = layout(lay, args.total_mib)
        total = sum(_nbytes(s) for s in specs)
        tensors = make_tensors(specs, device) if rank == 0 else []
        by_name = dict(tensors)
        sharded = _shard(tensors, device) if rank == 0 and args.sharded else None
        flat = torch.zeros(total, dtype=torch.uint8, device=device)  # the floor's buffer exists (touched) up front

        def run_once(cfg: dict) -> float:
            _sync(pg, device)
            start = time.perf_counter()
            if cfg["mode"] == "flat":
                dist.broadcast(flat, group=pg, group_src=0)
            elif cfg["mode"] in ("packed", "sharded"):
                kwargs = dict(packed_buffer_size_bytes=cfg["buffer_mib"] * MiB, packed_num_buffers=cfg["num_buffers"])
                if rank != 0:
                    engine.receive_weights(None, lambda batch: None)
                elif cfg["mode"] == "packed":
                    NCCLWeightTransferEngine.trainer_send_weights(iter(tensors), pg, packed=True, **kwargs)
                else:  # gathered one DTensor at a time with trainer rank 1
                    send_model(sharded, pg, **kwargs)
            else:
                for name, shape, dtype in specs:
                    t = by_name[name] if rank == 0 else torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(t, group=pg, group_src=0)
                    del t
            _sync(pg, device)
            return time.perf_counter() - start

        # Each mode runs in rounds back to back with the floor, so the machine's
        # drift hits both alike; the ratio is the median of per-round ratios.
        # Round 0 is the warm-up.
        modes = [cfg for cfg in configs(args) if cfg["layout"] == lay and cfg["mode"] != "flat"]
        flat_all: list[float] = []
        for n, cfg in enumerate(modes):
            if rank == 0:
                print(f"[{lay} {n + 1}/{len(modes)}] {cfg}", file=sys.stderr, flush=True)
            times, ratios = [], []
            # Peak over every round, from before the first: includes the buffers' allocation.
            with PeakMemory(device) as mem:
                for rnd in range(args.repeats + 1):
                    t_flat = run_once({"mode": "flat"})
                    t_mode = run_once(cfg)
                    if rnd:
                        times.append(t_mode)
                        flat_all.append(t_flat)
                        ratios.append(t_flat / t_mode)
            peak = mem.peak
            med = statistics.median(times)
            results.append({**cfg, "rank": rank, "bytes": total, "tensors": len(specs), "seconds": med,
                            "gb_per_s": total / med / 1e9, "ratio_to_flat": statistics.median(ratios),
                            "peak_extra_bytes": peak})  # fmt: skip
        med = statistics.median(flat_all)
        results.append({"layout": lay, "mode": "flat", "rank": rank, "bytes": total, "tensors": len(specs),
                        "seconds": med, "gb_per_s": total / med / 1e9, "ratio_to_flat": 1.0,
                        "peak_extra_bytes": 0})  # fmt: skip
        flat = None  # free the floor's buffer before the next layout
    if rank == 0:
        destroy_side_group(pg)
        if args.sharded:
            dist.destroy_process_group()
    else:
        engine.shutdown()
    out.put(results)


def run_distributed(args: argparse.Namespace) -> list[dict]:
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    count = args.workers + 1 + (1 if args.sharded else 0)  # + trainer rank 1 of a sharded trainer
    procs = [ctx.Process(target=rank_main, args=(r, args, ports[0], queue, ports[1])) for r in range(count)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in range(args.workers + 1):
            results += queue.get(timeout=args.deadline)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return results


def summarize(results: list[dict]) -> list[dict]:
    """One row per config: rank 0's time and ratio to flat, the largest peak over workers."""
    rows: dict[tuple, dict] = {}
    for r in results:
        key = (r["layout"], r["mode"], r.get("buffer_mib"), r.get("num_buffers"))
        row = rows.setdefault(key, {k: v for k, v in r.items() if k not in ("rank", "peak_extra_bytes")})
        if r["rank"] == 0:
            row.update(seconds=r["seconds"], gb_per_s=r["gb_per_s"], ratio_to_flat=r["ratio_to_flat"],
                       sender_peak_bytes=r["peak_extra_bytes"])
        else:
            row["receiver_peak_bytes"] = max(row.get("receiver_peak_bytes", 0), r["peak_extra_bytes"])
    return sorted(rows.values(), key=lambda r: (r["layout"], r["mode"] != "flat", r["mode"], r.get("buffer_mib") or 0,
                                                r.get("num_buffers") or 0))


def print_table(rows: list[dict]) -> None:
    print(f"{'layout':12} {'mode':10} {'buf MiB':>7} {'bufs':>4} {'tensors':>7} {'MiB':>7} {'ms':>9} "
          f"{'GB/s':>7} {'x flat':>6} {'send peak MiB':>13} {'recv peak MiB':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['layout']:12} {r['mode']:10} {r.get('buffer_mib') or '-':>7} {r.get('num_buffers') or '-':>4} "
              f"{r['tensors']:>7} {r['bytes'] / MiB:>7.1f} {r['seconds'] * 1e3:>9.2f} {r['gb_per_s']:>7.3f} "
              f"{r['ratio_to_flat']:>6.2f} {r.get('sender_peak_bytes', 0) / MiB:>13.1f} "
              f"{r.get('receiver_peak_bytes', 0) / MiB:>13.1f}")  # fmt: skip


# -- pack / unpack against the device copy -----------------------------------------------------


def run_pack_only(args: argparse.Namespace) -> list[dict]:
    """Time the library's pack and unpack steps against one device-to-device copy."""
    device = torch.device(args.device)
    rows = []
    for name in args.layouts:
        specs = layout(name, args.total_mib)
        tensors = make_tensors(specs, device)
        dests = [torch.empty_like(t) for _, t in tensors]
        total = sum(_nbytes(s) for s in specs)
        src_flat = torch.randint(0, 255, (total,), dtype=torch.uint8, device=device)
        dst_flat = torch.empty_like(src_flat)
        for mib in args.buffer_mib:
            size = mib * MiB
            slots = list(plan_slots((TensorSpec.of(n, t) for n, t in tensors), size))
            nb = 1 + max(s.bucket for s in slots)
            buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(min(nb, 2))]

            def copy() -> None:
                dst_flat.copy_(src_flat)

            def pack() -> None:
                for s in slots:
                    pack_slot(buffers[s.bucket % len(buffers)], s, tensors[s.index][1])

            def unpack() -> None:
                # What a receiver does: view each slot and copy it into the model.
                for s in slots:
                    if s.is_whole:
                        dests[s.index].copy_(typed_view(slot_view(buffers[s.bucket % len(buffers)], s), s.spec))
                    else:
                        dests[s.index].view(-1).view(torch.uint8)[s.start : s.start + s.length].copy_(
                            slot_view(buffers[s.bucket % len(buffers)], s))

            timings = {k: _time(fn, device, args.repeats) for k, fn in (("copy", copy), ("pack", pack), ("unpack", unpack))}
            pack()
            unpack()
            exact = all(torch.equal(d.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))
                        for d, (_, t) in zip(dests, tensors)) if nb <= 2 else None  # fmt: skip
            row = {"layout": name, "buffer_mib": mib, "bytes": total, "tensors": len(specs), "buckets": nb,
                   "exact": exact, **{f"{k}_ms": v * 1e3 for k, v in timings.items()}}  # fmt: skip
            # Copy bandwidth counts bytes read plus bytes written.
            for k in timings:
                row[f"{k}_GBps_rw"] = 2 * total / timings[k] / 1e9
            row["pack_vs_copy"] = timings["copy"] / timings["pack"]
            row["unpack_vs_copy"] = timings["copy"] / timings["unpack"]
            rows.append(row)
            print(f"{name:12} buf {mib:>5} MiB {len(specs):>5} tensors {total / MiB:>8.1f} MiB: copy "
                  f"{row['copy_GBps_rw']:>8.1f} GB/s rw, pack {row['pack_vs_copy']:.3f}x, unpack "
                  f"{row['unpack_vs_copy']:.3f}x of copy, exact={exact}", flush=True)  # fmt: skip
    return rows


def _time(fn: Any, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for lay in sorted({r["layout"] for r in rows}):
        for nb in sorted({r["num_buffers"] for r in rows if r["mode"] == "packed"}):
            pts = sorted((r["buffer_mib"], r["gb_per_s"]) for r in rows
                         if r["layout"] == lay and r["mode"] == "packed" and r["num_buffers"] == nb)  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{lay} packed x{nb}")
        flat = [r["gb_per_s"] for r in rows if r["layout"] == lay and r["mode"] == "flat"]
        if flat:
            ax.axhline(flat[0], linestyle="--", linewidth=1, label=f"{lay} flat (floor)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("buffer size (MiB)")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layouts", default="transformer,tiny,huge", type=lambda s: s.split(","))
    p.add_argument("--total-mib", type=int, default=192)
    p.add_argument("--buffer-mib", default="4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--num-buffers", default="2,3", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--deadline", type=float, default=1800.0)
    p.add_argument("--skip-per-tensor", action="store_true")
    p.add_argument("--sharded", action="store_true",
                   help="add a row sent by a 2-rank trainer holding every tensor as a DTensor (Shard(0))")
    p.add_argument("--pack-only", action="store_true", help="time pack/unpack against a device copy, no group")
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--plot", help="draw throughput against buffer size (needs matplotlib)")
    args = p.parse_args()
    if args.pack_only:
        rows = run_pack_only(args)
    else:
        rows = summarize(run_distributed(args))
        print_table(rows)
        if args.plot:
            plot(rows, args.plot)
    meta = {"argv": sys.argv, "torch": torch.__version__, "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
