"""Benchmark: the same bytes over the side group several ways, against the floor.

    python scripts/bench.py                      # CPU, gloo, 1 trainer + 2 workers
    python scripts/bench.py --backend nccl --device cuda --workers 1 \\
        --layouts transformer,huge,tiny,moe --modes flat,packed,seed,per-tensor,unpacked \\
        --buffer-mib 1024,256 --num-buffers 2 --out bench.json
    python scripts/bench.py --pack-only --device cuda   # plain-torch pack/unpack vs device copy
    python scripts/bench.py --modes flat,packed,ipc,d2d --buffer-mib 32,64 --num-buffers 2   # colocated, CPU
    python scripts/bench.py --backend gloo --device cuda --workers 1 --layouts transformer,tiny \
        --modes flat,ipc,d2d --buffer-mib 1024,256 --num-buffers 2   # colocated, one GPU

Modes, each on the same group in the same run:
  flat       one dist.broadcast of a single uint8 tensor of the layout's total
             bytes: the floor for this link (always run);
  packed     trainer_send_weights(packed=True) / receive_weights(None, ...),
             swept over buffer size and number of buffers;
  seed       the seed's packed algorithm as a reference row, same sweep: per
             bucket (greedy: tensors in order into buckets of at most the
             buffer size; a larger tensor alone), torch.cat of flattened uint8
             views into a fresh buffer on the slot's own CUDA stream (one per
             buffer slot, made once; synchronized before the slot is reused),
             one raw broadcast; the receiver knows the layout out of band,
             receives into a fresh buffer on the slot's stream, synchronizes
             and unpacks views. No streams on the CPU;
  per-tensor one raw dist.broadcast per tensor, the receiver allocating each
             tensor (the seed's one-by-one path);
  unpacked   trainer_send_weights(packed=False) / receive_weights(None, ...);
  sharded    packed, sent by a 2-rank DTensor trainer through send_model;
  ipc        colocated (IPCWeightTransferEngine): workers on the trainer's
             device (the CPU, or the trainer's GPU) read its shared buffers and
             load with ModuleLoader into a module of the layout, same sweep;
  d2d        the colocated floor: two copies of the layout's bytes on the
             trainer's device (the pack and the load), rank 0 only.
The summary also prints, per layout, the best ipc row against the best packed
row (speedup) and against d2d (ratio): the colocated targets.
Every timed phase ends with a one-element all_reduce so the clock covers
delivery, not the sender's enqueue. Each mode runs back to back with the flat
broadcast, round after round (one warm-up round first); the ratio to flat is
the median of the per-round ratios, so drift of the machine cancels. Reports
median time, GB/s, that ratio, and peak extra memory over all rounds of the
mode, buffers included (sender, and the largest over receivers).

Sizes: ``--total-mib`` applies to every layout. Without it, the CPU uses
192 MiB; CUDA uses about 4 GiB for transformer and huge, 32 MiB for tiny
(8192 x 4 KiB fp32) and the full ~31 GB for moe. Rounds: ``--repeats`` timed
rounds after one warm-up; without it, 3 on the CPU and 5 on CUDA (3 for
layouts over 8 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchxfer import NCCLWeightTransferEngine, ParallelConfig, WeightTransferConfig  # noqa: E402
from torchxfer import NCCLWeightTransferInitInfo, destroy_side_group, send_model  # noqa: E402
from torchxfer import IPCWeightTransferEngine, IPCWeightTransferInitInfo, ModuleLoader  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
COLOCATED_MODES = ("ipc", "d2d")
"""Modes timed in rounds of their own (their floor is d2d); the others each alternate with a flat round."""
MODES = ("flat", "packed", "seed", "per-tensor", "unpacked", "sharded", "ipc", "d2d")
Spec = tuple[str, tuple[int, ...], torch.dtype]


# -- layouts ---------------------------------------------------------------------------


def layout(name: str, total_mib: int | None) -> list[Spec]:
    """(name, shape, dtype) lists: deterministic, about ``total_mib`` MiB (None: the layout's full size)."""
    dt = torch.bfloat16
    if name == "moe":
        return moe_layout(total_mib)
    total_mib = 192 if total_mib is None else total_mib
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


MOE_LAYERS, MOE_EXPERTS, MOE_HIDDEN, MOE_FFN, MOE_VOCAB = 24, 128, 2048, 768, 151936


def moe_layout(total_mib: int | None) -> list[Spec]:
    """A mixture-of-experts decoder: per layer 128 experts x (gate, up: 768x2048;
    down: 2048x768), GQA attention (q 4096x2048, k/v 512x2048, o 2048x4096), a
    128x2048 router and two norms; plus embedding and lm_head. Full size: 24
    layers, 9,387 tensors, 31.2 GB (29.1 GiB), all bf16.

    A smaller ``total_mib`` keeps every tensor shape but scales the vocabulary
    by the size ratio, the layer count by its square root, and fills the rest
    with as many experts per layer as fit (at least one).
    """
    dt, h, f = torch.bfloat16, MOE_HIDDEN, MOE_FFN
    full = _moe_specs(MOE_LAYERS, MOE_EXPERTS, MOE_VOCAB)
    target = sum(_nbytes(s) for s in full) if total_mib is None else total_mib * MiB
    full_bytes = sum(_nbytes(s) for s in full)
    if target >= full_bytes:
        return full
    ratio = target / full_bytes
    vocab = max(1024, int(MOE_VOCAB * ratio) // 64 * 64)
    layers = max(1, min(MOE_LAYERS, round(MOE_LAYERS * ratio**0.5)))
    fixed = sum(_nbytes(s) for s in _moe_specs(layers, 0, vocab))
    per_expert = 3 * f * h * dt.itemsize
    experts = max(1, min(MOE_EXPERTS, (target - fixed) // (layers * per_expert)))
    return _moe_specs(layers, int(experts), vocab)


def _moe_specs(layers: int, experts: int, vocab: int) -> list[Spec]:
    dt, h, f = torch.bfloat16, MOE_HIDDEN, MOE_FFN
    q = 32 * 128  # heads x head dim
    kv = 4 * 128
    specs: list[Spec] = [("model.embed_tokens.weight", (vocab, h), dt)]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        specs += [(p + "input_layernorm.weight", (h,), dt)]
        specs += [(p + "self_attn.q_proj.weight", (q, h), dt), (p + "self_attn.k_proj.weight", (kv, h), dt),
                  (p + "self_attn.v_proj.weight", (kv, h), dt), (p + "self_attn.o_proj.weight", (h, q), dt)]  # fmt: skip
        specs += [(p + "post_attention_layernorm.weight", (h,), dt)]
        specs += [(p + "mlp.gate.weight", (experts, h), dt)]  # the router
        for e in range(experts):
            x = p + f"mlp.experts.{e}."
            specs += [(x + "gate_proj.weight", (f, h), dt), (x + "up_proj.weight", (f, h), dt),
                      (x + "down_proj.weight", (h, f), dt)]  # fmt: skip
    return specs + [("model.norm.weight", (h,), dt), ("lm_head.weight", (vocab, h), dt)]


def _nbytes(spec: Spec) -> int:
    n = 1
    for d in spec[1]:
        n *= d
    return n * spec[2].itemsize


def layout_mib(name: str, args: argparse.Namespace) -> int | None:
    """The size asked for one layout: ``--total-mib``, else the device's default."""
    if args.total_mib is not None:
        return args.total_mib
    if args.device.startswith("cuda"):
        return {"transformer": 4096, "huge": 4096, "tiny": 32, "moe": None}.get(name, 4096)
    return 192


def rounds_for(total_bytes: int, args: argparse.Namespace) -> int:
    if args.repeats is not None:
        return args.repeats
    if not args.device.startswith("cuda"):
        return 3
    return 3 if total_bytes > 8 * GiB else 5


def make_tensors(specs: list[Spec], device: torch.device, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Random values (never zeros). On CUDA drawn on the device: 30 GB of host
    randn on one thread would take minutes."""
    if device.type == "cuda":
        gen = torch.Generator(device=device).manual_seed(seed)
        return [(n, torch.randn(shape, generator=gen, dtype=dt, device=device)) for n, shape, dt in specs]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [(n, torch.randn(shape, generator=gen, dtype=torch.float32).to(dt)) for n, shape, dt in specs]


def greedy_buckets(specs: list[Spec], buffer_bytes: int) -> list[list[int]]:
    """Tensor indices per bucket: in order, at most ``buffer_bytes`` a bucket,
    a tensor larger than that alone in its own."""
    buckets: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i, spec in enumerate(specs):
        n = _nbytes(spec)
        if cur and cur_bytes + n > buffer_bytes:
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += n
    if cur:
        buckets.append(cur)
    return buckets


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


# -- the seed's packed algorithm, as a reference row ------------------------------------------


class SeedPacked:
    """The seed's packed broadcast, re-written: one CUDA stream per buffer slot
    (made once, reused by every update), a fresh ``torch.cat`` buffer per
    bucket, the layout known to both sides out of band."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streams: dict[int, list[torch.cuda.Stream]] = {}

    def _streams(self, num_buffers: int) -> list[Any]:
        if self.device.type != "cuda":
            return [None] * num_buffers
        if num_buffers not in self.streams:
            self.streams[num_buffers] = [torch.cuda.Stream(self.device) for _ in range(num_buffers)]
        return self.streams[num_buffers]

    @staticmethod
    def _on(stream: Any) -> Any:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def send(self, tensors: list[tuple[str, torch.Tensor]], buckets: list[list[int]], pg: Any, num_buffers: int) -> None:
        streams = self._streams(num_buffers)
        held: list[torch.Tensor | None] = [None] * num_buffers  # the slot's buffer, alive until reused
        for i, bucket in enumerate(buckets):
            slot = i % num_buffers
            if streams[slot] is not None:
                streams[slot].synchronize()
            with self._on(streams[slot]):
                held[slot] = torch.cat([tensors[j][1].reshape(-1).view(torch.uint8) for j in bucket])
                dist.broadcast(held[slot], group=pg, group_src=0)

    def receive(self, specs: list[Spec], buckets: list[list[int]], pg: Any, num_buffers: int, load: Callable) -> None:
        streams = self._streams(num_buffers)
        for i, bucket in enumerate(buckets):
            slot = i % num_buffers
            stream = streams[slot]
            if stream is not None:
                stream.synchronize()
            size = sum(_nbytes(specs[j]) for j in bucket)
            with self._on(stream):
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
                dist.broadcast(buf, group=pg, group_src=0)
            if stream is not None:
                stream.synchronize()
            views, offset = [], 0
            for j in bucket:
                name, shape, dtype = specs[j]
                n = _nbytes(specs[j])
                views.append((name, buf[offset : offset + n].view(dtype).view(shape)))
                offset += n
            load(views)


# -- the distributed run ---------------------------------------------------------------------


def configs(args: argparse.Namespace, name: str) -> list[dict]:
    """One layout's rows other than flat, in run order; every rank computes the same list."""
    plan = []
    sweep = [(mib, nb) for mib in args.buffer_mib for nb in args.num_buffers]
    for mode in ("packed", "seed", "ipc"):
        if mode in args.modes:
            plan += [{"layout": name, "mode": mode, "buffer_mib": mib, "num_buffers": nb} for mib, nb in sweep]
    if "d2d" in args.modes:
        plan.append({"layout": name, "mode": "d2d"})
    if "sharded" in args.modes:
        plan.append({"layout": name, "mode": "sharded", "buffer_mib": sweep[0][0], "num_buffers": sweep[0][1]})
    for mode in ("per-tensor", "unpacked"):
        if mode in args.modes:
            plan.append({"layout": name, "mode": mode})
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
        specs = layout(lay, layout_mib(lay, args))
        sharded = _shard(make_tensors(specs, device), device)
        kwargs = dict(packed_buffer_size_bytes=args.buffer_mib[0] * MiB, packed_num_buffers=args.num_buffers[0])
        for _ in range(rounds_for(sum(_nbytes(s) for s in specs), args) + 1):
            send_model(sharded, None, **kwargs)
    dist.destroy_process_group()


def _sync(pg: dist.ProcessGroup, device: torch.device) -> None:
    t = torch.zeros(1, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, group=pg)
    if device.type == "cuda":
        torch.cuda.synchronize()


def _noop(batch: list) -> None:
    pass


def _profile(fn: Any, folder: str, name: str, device: torch.device) -> None:
    """One more update under torch.profiler; a Chrome trace per rank in ``folder``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    os.makedirs(folder, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    prof.export_chrome_trace(os.path.join(folder, f"{name}.json"))


def _cprofile(fn: Any, folder: str, name: str, rank: int) -> None:
    """One more update under cProfile; its 30 most costly functions (own time) appended to
    ``folder/cprofile_rank{rank}.txt``, one section per row."""
    import cProfile
    import io
    import pstats

    os.makedirs(folder, exist_ok=True)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    seconds = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats(os.environ.get("BENCH_CPROFILE_SORT", "tottime")).print_stats(30)
    with open(os.path.join(folder, f"cprofile_rank{rank}.txt"), "a") as f:
        f.write(f"==== {name}: {seconds * 1e3:.2f} ms under cProfile\n{text.getvalue()}\n")


def _module(specs: list, device: torch.device) -> torch.nn.Module:
    """A module whose buffers are the layout's tensors, by their dotted names (for ModuleLoader)."""
    root = torch.nn.Module()
    for name, shape, dtype in specs:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, torch.zeros(shape, dtype=dtype, device=device))
    return root


def apply_dev(settings: list[str]) -> None:
    """``--dev MODULE.NAME=INT``: development knobs, module constants of the package set in this
    rank before anything runs (for A/B runs)."""
    for setting in settings:
        name, value = setting.split("=", 1)
        module, attr = name.rsplit(".", 1)
        target = importlib.import_module(f"torchxfer.{module}")
        if not hasattr(target, attr):
            raise SystemExit(f"--dev {setting}: torchxfer.{module} has no {attr}")
        setattr(target, attr, type(getattr(target, attr))(int(value)))


def rank_main(rank: int, args: argparse.Namespace, port: int, out: Any, trainer_port: int = 0,
              ipc_port: int = 0) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if rank == args.workers + 1:
        return _trainer_peer(args, trainer_port)
    torch.set_num_threads(1)
    apply_dev(args.dev)
    device = torch.device(args.device)
    if device.type == "cuda":
        # Trainer on cuda:0 (sources, flat floor, send buffers); worker r on cuda:r.
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    world = args.workers + 1
    info = dict(master_address="127.0.0.1", master_port=port, world_size=world)
    if rank == 0:
        if "sharded" in args.modes:
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
    ipc_pg, ipc_engine, ipc_device = None, None, device
    if "ipc" in args.modes:
        # Colocated: every worker on the trainer's device (cuda:0 or the CPU).
        ipc_device = torch.device("cuda", 0) if device.type == "cuda" else device
        ipc_info = dict(master_address="127.0.0.1", master_port=ipc_port, world_size=world)
        if rank == 0:
            ipc_pg = IPCWeightTransferEngine.trainer_init(ipc_info, timeout_s=args.timeout, device=ipc_device)
        else:
            ipc_engine = IPCWeightTransferEngine(
                WeightTransferConfig(backend="ipc", timeout_s=args.timeout, device=ipc_device),
                ParallelConfig(rank=rank - 1, tensor_parallel_size=args.workers),
            )
            ipc_engine.init_transfer_engine(IPCWeightTransferInitInfo("127.0.0.1", ipc_port, 1, world))
    seed = SeedPacked(device)
    results = []
    for lay in args.layouts:
        specs = layout(lay, layout_mib(lay, args))
        total = sum(_nbytes(s) for s in specs)
        rounds = rounds_for(total, args)
        if rank == 0:
            print(f"[{lay}] {len(specs)} tensors, {total / MiB:.1f} MiB, {rounds} timed rounds", file=sys.stderr, flush=True)
        tensors = make_tensors(specs, device) if rank == 0 else []
        if args.share_memory and device.type == "cpu":  # as model.share_memory(): CPU direct reads can apply
            for _, t in tensors:
                t.share_memory_()
        by_name = dict(tensors)
        sharded = _shard(tensors, device) if rank == 0 and "sharded" in args.modes else None
        # The floor's buffer exists (touched) up front; the sender's holds random bytes.
        if rank == 0:
            flat = torch.randint(0, 256, (total,), dtype=torch.uint8, device=device)
        else:
            flat = torch.zeros(total, dtype=torch.uint8, device=device)
        buckets_by_size: dict[int, list[list[int]]] = {}
        loader = ModuleLoader(_module(specs, ipc_device)) if rank != 0 and "ipc" in args.modes else None
        copy_dst = torch.empty_like(flat) if rank == 0 and "d2d" in args.modes else None

        def run_once(cfg: dict) -> float:
            mode = cfg["mode"]
            if mode == "seed" and cfg["buffer_mib"] not in buckets_by_size:
                buckets_by_size[cfg["buffer_mib"]] = greedy_buckets(specs, cfg["buffer_mib"] * MiB)
            _sync(pg, device)
            start = time.perf_counter()
            if mode == "flat":
                dist.broadcast(flat, group=pg, group_src=0)
            elif mode in ("packed", "sharded", "unpacked"):
                kwargs: dict[str, Any] = dict(packed=mode != "unpacked")
                if mode != "unpacked":
                    kwargs.update(packed_buffer_size_bytes=cfg["buffer_mib"] * MiB, packed_num_buffers=cfg["num_buffers"])
                if rank != 0:
                    engine.receive_weights(None, _noop)
                elif mode == "sharded":  # gathered per bucket from trainer rank 1, overlapped with the send
                    send_model(sharded, pg, **{k: v for k, v in kwargs.items() if k != "packed"})
                else:
                    NCCLWeightTransferEngine.trainer_send_weights(iter(tensors), pg, **kwargs)
            elif mode == "ipc":
                kw = dict(packed_buffer_size_bytes=cfg["buffer_mib"] * MiB, packed_num_buffers=cfg["num_buffers"])
                if rank == 0:
                    IPCWeightTransferEngine.trainer_send_weights(iter(tensors), ipc_pg, **kw)
                else:
                    with loader.update():
                        ipc_engine.receive_weights(None, loader)
                    if ipc_device.type == "cuda":
                        torch.cuda.synchronize(ipc_device)
            elif mode == "d2d":
                if rank == 0:
                    copy_dst.copy_(flat)
                    copy_dst.copy_(flat)
            elif mode == "seed":
                buckets = buckets_by_size[cfg["buffer_mib"]]
                if rank == 0:
                    seed.send(tensors, buckets, pg, cfg["num_buffers"])
                else:
                    seed.receive(specs, buckets, pg, cfg["num_buffers"], _noop)
            else:  # per-tensor
                for name, shape, dtype in specs:
                    t = by_name[name] if rank == 0 else torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(t, group=pg, group_src=0)
                    del t
            _sync(pg, device)
            return time.perf_counter() - start

        # Each mode runs in rounds back to back with the floor, so the machine's
        # drift hits both alike; the ratio is the median of per-round ratios.
        # Round 0 is the warm-up.
        modes = configs(args, lay)
        flat_all: list[float] = []
        for n, cfg in enumerate(modes):
            if rank == 0:
                print(f"[{lay} {n + 1}/{len(modes)}] {cfg}", file=sys.stderr, flush=True)
            times, ratios, floors = [], [], []
            # The colocated rows compare with d2d, not with the broadcast: on a GPU the Gloo floor (a
            # second or more of host copies) between their rounds only adds noise to them.
            floor = cfg["mode"] not in COLOCATED_MODES
            # Peak over every round, from before the first: includes the buffers' allocation.
            with PeakMemory(device) as mem:
                for rnd in range(rounds + 1):
                    t_flat = run_once({"mode": "flat"}) if floor else None
                    t_mode = run_once(cfg)
                    if rnd:
                        times.append(t_mode)
                        if t_flat is not None:
                            flat_all.append(t_flat)
                            floors.append(t_flat)
                            ratios.append(t_flat / t_mode)
            if args.cprofile and cfg["mode"] in ("packed", "ipc", "unpacked") \
                    and lay in args.profile_layouts.split(","):  # fmt: skip
                _cprofile(lambda: run_once(cfg), args.cprofile, f"{lay} {cfg['mode']} {cfg.get('buffer_mib')} MiB", rank)
            if args.profile and cfg["mode"] in args.profile_modes.split(",") and lay in args.profile_layouts.split(","):
                if n == 0:  # the floor, once per layout
                    _profile(lambda: run_once({"mode": "flat"}), args.profile, f"{lay}_flat_rank{rank}", device)
                _profile(lambda: run_once(cfg), args.profile,
                         f"{lay}_{cfg['mode']}_{cfg.get('buffer_mib', 0)}mib_rank{rank}", device)
            med = statistics.median(times)
            if rank == 0:
                print(f"[{lay} {n + 1}/{len(modes)}] rounds (ms): " + " ".join(f"{t * 1e3:.2f}" for t in times),
                      file=sys.stderr, flush=True)  # fmt: skip
            results.append({**cfg, "rank": rank, "bytes": total, "tensors": len(specs), "seconds": med,
                            "all_seconds": times, "flat_seconds": floors,
                            "gb_per_s": total / med / 1e9, "ratio_to_flat": statistics.median(ratios) if ratios else None,
                            "rounds": rounds, "peak_extra_bytes": mem.peak})  # fmt: skip
        if not flat_all:  # no other mode: time the floor alone
            for rnd in range(rounds + 1):
                t_flat = run_once({"mode": "flat"})
                if rnd:
                    flat_all.append(t_flat)
        med = statistics.median(flat_all)
        for r in results:
            if r["layout"] == lay and r["ratio_to_flat"] is None:
                r["ratio_to_flat"] = med / r["seconds"]
        results.append({"layout": lay, "mode": "flat", "rank": rank, "bytes": total, "tensors": len(specs),
                        "seconds": med, "gb_per_s": total / med / 1e9, "ratio_to_flat": 1.0,
                        "rounds": len(flat_all), "peak_extra_bytes": 0})  # fmt: skip
        # Free this layout (30 GB for moe) before the next one.
        del tensors, by_name, sharded, flat, loader, copy_dst
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    if ipc_pg is not None:
        destroy_side_group(ipc_pg)
    if ipc_engine is not None:
        ipc_engine.shutdown()
    if rank == 0:
        destroy_side_group(pg)
        if "sharded" in args.modes:
            dist.destroy_process_group()
    else:
        engine.shutdown()
    out.put(results)


def run_distributed(args: argparse.Namespace) -> list[dict]:
    import socket

    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    count = args.workers + 1 + (1 if "sharded" in args.modes else 0)  # + trainer rank 1 of a sharded trainer
    procs = [ctx.Process(target=rank_main, args=(r, args, ports[0], queue, ports[1], ports[2])) for r in range(count)]
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
            row.update({k: r[k] for k in ("seconds", "gb_per_s", "ratio_to_flat", "all_seconds", "flat_seconds") if k in r},
                       sender_peak_bytes=r["peak_extra_bytes"])  # fmt: skip
        else:
            row["receiver_peak_bytes"] = max(row.get("receiver_peak_bytes", 0), r["peak_extra_bytes"])
    order = {m: i for i, m in enumerate(MODES)}
    layouts = list(dict.fromkeys(r["layout"] for r in results))
    return sorted(rows.values(), key=lambda r: (layouts.index(r["layout"]), order[r["mode"]],
                                                -(r.get("buffer_mib") or 0), r.get("num_buffers") or 0))  # fmt: skip


def _buffer(r: dict) -> str:
    return f"{r['buffer_mib']} MiB x {r['num_buffers']}" if r.get("buffer_mib") else "-"


def print_table(rows: list[dict]) -> None:
    """Every column: tensors, sizes, memory."""
    print(f"{'layout':12} {'mode':10} {'buffer':>14} {'tensors':>7} {'MiB':>9} {'ms':>9} "
          f"{'GB/s':>8} {'x flat':>6} {'send peak MiB':>13} {'recv peak MiB':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['layout']:12} {r['mode']:10} {_buffer(r):>14} {r['tensors']:>7} {r['bytes'] / MiB:>9.1f} "
              f"{r['seconds'] * 1e3:>9.2f} {r['gb_per_s']:>8.3f} {r['ratio_to_flat']:>6.2f} "
              f"{r.get('sender_peak_bytes', 0) / MiB:>13.1f} {r.get('receiver_peak_bytes', 0) / MiB:>13.1f}")  # fmt: skip


def print_short_table(rows: list[dict]) -> None:
    """The summary, printed last: layout, mode, buffer, median ms, GB/s, ratio to flat."""
    print()
    print(f"{'layout':12} {'mode':10} {'buffer':>14} {'median ms':>10} {'GB/s':>8} {'x flat':>6}")
    for r in rows:
        print(f"{r['layout']:12} {r['mode']:10} {_buffer(r):>14} {r['seconds'] * 1e3:>10.2f} "
              f"{r['gb_per_s']:>8.2f} {r['ratio_to_flat']:>6.2f}")  # fmt: skip
    for r in rows:
        if r["layout"] == "tiny" and r["mode"] in ("packed", "ipc"):
            print(f"tiny ({r['tensors']} x 4 KiB fp32), {r['mode']} {_buffer(r)}: {r['seconds'] * 1e3:.2f} ms per update")
    for lay in dict.fromkeys(r["layout"] for r in rows):
        best = {m: min((r["seconds"] for r in rows if r["layout"] == lay and r["mode"] == m), default=None)
                for m in ("ipc", "packed", "d2d")}  # fmt: skip
        if best["ipc"] is None:
            continue
        parts = [f"{lay}: ipc best {best['ipc'] * 1e3:.2f} ms"]
        if best["packed"] is not None:
            parts.append(f"{best['packed'] / best['ipc']:.2f}x faster than the best packed row")
        if best["d2d"] is not None:
            parts.append(f"{best['ipc'] / best['d2d']:.2f}x the time of two device copies (d2d)")
        print("; ".join(parts))


# -- pack / unpack against the device copy (plain torch, no torchxfer internals) ----------------


def run_pack_only(args: argparse.Namespace) -> list[dict]:
    """Time a plain-torch pack and unpack against one device-to-device copy of
    the same bytes: ``torch._foreach_copy_`` of every tensor of a bucket into
    (pack) or out of (unpack) uint8 views of one buffer, and the seed's
    ``torch.cat`` into a fresh buffer. Buckets follow :func:`greedy_buckets`;
    two buffers alternate, each sized for the largest bucket."""
    device = torch.device(args.device)
    rows = []
    for name in args.layouts:
        specs = layout(name, layout_mib(name, args))
        tensors = make_tensors(specs, device)
        srcs = [t.reshape(-1).view(torch.uint8) for _, t in tensors]
        dests = [torch.empty_like(t) for _, t in tensors]
        dst_bytes = [d.reshape(-1).view(torch.uint8) for d in dests]
        total = sum(_nbytes(s) for s in specs)
        src_flat = torch.randint(0, 256, (total,), dtype=torch.uint8, device=device)
        dst_flat = torch.empty_like(src_flat)
        for mib in args.buffer_mib:
            buckets = greedy_buckets(specs, mib * MiB)
            size = max(sum(_nbytes(specs[j]) for j in b) for b in buckets)
            buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(min(len(buckets), 2))]
            slots = []  # per bucket: (buffer views, source bytes, destination bytes)
            for i, bucket in enumerate(buckets):
                buf, views, offset = buffers[i % len(buffers)], [], 0
                for j in bucket:
                    views.append(buf[offset : offset + srcs[j].numel()])
                    offset += srcs[j].numel()
                slots.append((views, [srcs[j] for j in bucket], [dst_bytes[j] for j in bucket]))

            def copy() -> None:
                dst_flat.copy_(src_flat)

            def pack() -> None:
                for views, src, _ in slots:
                    torch._foreach_copy_(views, src)

            def unpack() -> None:
                for views, _, dst in slots:
                    torch._foreach_copy_(dst, views)

            def cat() -> None:
                for _, src, _ in slots:
                    torch.cat(src)

            fns = (("copy", copy), ("pack", pack), ("unpack", unpack), ("cat", cat))
            timings = {k: _time(fn, device, args.repeats or 5) for k, fn in fns}
            for d in dst_bytes:
                d.fill_(0xA5)  # poison, then a round trip bucket by bucket (buffers are reused)
            for views, src, dst in slots:
                torch._foreach_copy_(views, src)
                torch._foreach_copy_(dst, views)
            exact = all(torch.equal(d, s) for d, s in zip(dst_bytes, srcs))
            row = {"layout": name, "buffer_mib": mib, "bytes": total, "tensors": len(specs), "buckets": len(buckets),
                   "exact": exact, **{f"{k}_ms": v * 1e3 for k, v in timings.items()}}  # fmt: skip
            # Copy bandwidth counts bytes read plus bytes written.
            for k in timings:
                row[f"{k}_GBps_rw"] = 2 * total / timings[k] / 1e9
            for k in ("pack", "unpack", "cat"):
                row[f"{k}_vs_copy"] = timings["copy"] / timings[k]
            rows.append(row)
            print(f"{name:12} buf {mib:>5} MiB {len(specs):>5} tensors {total / MiB:>8.1f} MiB: copy "
                  f"{row['copy_GBps_rw']:>8.1f} GB/s rw; of copy: foreach pack {row['pack_vs_copy']:.3f}x, "
                  f"unpack {row['unpack_vs_copy']:.3f}x, cat {row['cat_vs_copy']:.3f}x; exact={exact}", flush=True)  # fmt: skip
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
        for mode in ("packed", "seed"):
            for nb in sorted({r["num_buffers"] for r in rows if r["mode"] == mode}):
                pts = sorted((r["buffer_mib"], r["gb_per_s"]) for r in rows
                             if r["layout"] == lay and r["mode"] == mode and r["num_buffers"] == nb)  # fmt: skip
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{lay} {mode} x{nb}")
        flat = [r["gb_per_s"] for r in rows if r["layout"] == lay and r["mode"] == "flat"]
        if flat:
            ax.axhline(flat[0], linestyle="--", linewidth=1, label=f"{lay} flat (floor)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("buffer size (MiB)")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layouts", default="transformer,tiny,huge", type=lambda s: s.split(","),
                   help="any of transformer, huge, tiny, moe")  # fmt: skip
    p.add_argument("--modes", default="flat,packed,seed,per-tensor", type=lambda s: s.split(","),
                   help=f"any of {', '.join(MODES)} (flat, the floor, always runs)")  # fmt: skip
    p.add_argument("--total-mib", type=int, default=None,
                   help="size of every layout (default: 192 on cpu; on cuda ~4 GiB, tiny 32 MiB, moe full ~31 GB)")  # fmt: skip
    p.add_argument("--buffer-mib", default=None, type=_ints, help="packed/seed buffer sizes (default cpu 4,16,64; cuda 1024,256)")
    p.add_argument("--num-buffers", default=None, type=_ints, help="buffer counts (default cpu 2,3; cuda 2)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after each row of --profile-modes, profile one more update on every rank (Chrome traces in DIR)")
    p.add_argument("--cprofile", default=None, metavar="DIR",
                   help="after each packed/ipc/unpacked row, one more update under cProfile on every rank "
                        "(the costliest functions in DIR/cprofile_rank{r}.txt)")  # fmt: skip
    p.add_argument("--profile-layouts", default="transformer", help="layouts to profile with --profile/--cprofile")
    p.add_argument("--profile-modes", default="packed", help="modes to profile with --profile (and the floor once)")
    p.add_argument("--dev", action="append", default=[], metavar="MODULE.NAME=INT",
                   help="development: set a constant of the package in every rank, e.g. sender.STATUS_LAG=4 "
                        "(repeatable)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after one warm-up (default cpu 3; cuda 5, 3 over 8 GiB)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--share-memory", action="store_true",
                   help="CPU: the trainer's tensors in shared memory (share_memory_()); with TORCHXFER_DIRECT_READS=1 "
                        "colocated workers read the large ones in place")  # fmt: skip
    p.add_argument("--deadline", type=float, default=1800.0)
    p.add_argument("--skip-per-tensor", action="store_true", help="same as leaving per-tensor out of --modes")
    p.add_argument("--sharded", action="store_true", help="same as adding sharded to --modes")
    p.add_argument("--pack-only", action="store_true", help="time pack/unpack against a device copy, no group")
    p.add_argument("--out", "--json", dest="out", help="write all rows here (JSON)")
    p.add_argument("--plot", help="draw throughput against buffer size (needs matplotlib)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.buffer_mib is None:
        args.buffer_mib = [1024, 256] if cuda else [4, 16, 64]
    if args.num_buffers is None:
        args.num_buffers = [2] if cuda else [2, 3]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {MODES}")
    for lay in args.layouts:
        layout(lay, 1)  # ValueError on an unknown name, before any process starts
    if args.skip_per_tensor:
        args.modes = [m for m in args.modes if m != "per-tensor"]
    if args.sharded and "sharded" not in args.modes:
        args.modes.append("sharded")
    if args.pack_only:
        rows = run_pack_only(args)
    else:
        rows = summarize(run_distributed(args))
        print_table(rows)
        if args.plot:
            plot(rows, args.plot)
    meta = {"argv": sys.argv, "torch": torch.__version__, "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if not args.pack_only:
        print_short_table(rows)


if __name__ == "__main__":
    main()
