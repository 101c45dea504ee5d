"""DTensor-sharded trainers, process tier: two trainer ranks (Gloo world, CPU device
mesh) gather lazily, rank 0 sends, worker processes load with ModuleLoader.

Each spawn runs several checks in sequence (a spawn costs a torch import per
process). Trainer ranks are 0 and 1 of their own default group; workers are
separate processes in the side group only.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch

from tests.harness import ADDR, digest, free_port, run_processes

pytestmark = pytest.mark.process

SIDE_TIMEOUT = 8.0
SEND_TIMEOUT = 20.0
BUF = 4096  # small: the embedding (bf16, 4288 bytes) is split across buckets


# -- the sharded state dict -------------------------------------------------------------------

# name -> (shape, placement); "partial" is a sum of one contribution per rank.
LAYOUT = {
    "embed.weight": ((67, 32), "shard0"),  # uneven over 2 ranks
    "layers.0.w": ((48, 33), "shard1"),  # uneven, sharded along columns
    "layers.0.b": ((48,), "shard0"),
    "layers.1.w": ((32, 48), "replicate"),
    "layers.1.partial": ((16, 8), "partial"),
    "step": ((6,), "shard0_int"),  # int64: never cast
    "norm.weight": ((32,), "plain"),  # an ordinary tensor beside the DTensors
    # About a bucket each: when a worker fails early, rank 1 must stop long before these.
    **{f"tail.{i}": ((40, 32), "shard0") for i in range(10)},
}
SHARDED = [n for n, (_, kind) in LAYOUT.items() if kind in ("shard0", "shard1", "partial", "shard0_int")]


def _full(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, kind) in LAYOUT.items():
        if kind == "shard0_int":
            out[name] = torch.randint(0, 1000, shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen)
    return out


def _partial_part(seed: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(LAYOUT["layers.1.partial"][0], generator=gen)


def _rename(name: str) -> str:
    """The server's own (flat) parameter names."""
    return "served_" + name.replace(".", "_")


def _sharded(seed: int, mesh: object, rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import (
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
    )

    out = {}
    for name, t in _full(seed).items():
        kind = LAYOUT[name][1]
        if kind in ("shard0", "shard0_int"):
            out[name] = distribute_tensor(t, mesh, [Shard(0)])
        elif kind == "shard1":
            out[name] = distribute_tensor(t, mesh, [Shard(1)])
        elif kind == "replicate":
            out[name] = distribute_tensor(t, mesh, [Replicate()])
        elif kind == "partial":
            out[name] = DTensor.from_local(_partial_part(seed, rank), mesh, [Partial()], run_check=False)
        else:
            out[name] = t
    return out


def _plain_info(seed: int = 0):  # what update_info_for sees: names, global shapes, dtypes
    from torchxfer import update_info_for

    return update_info_for(_full(seed), dtype=torch.bfloat16, name_map=_rename, packed_buffer_size_bytes=BUF)


def _served_state_dict_module(drop: str | None = None) -> torch.nn.Module:
    from torch import nn

    served = nn.Module()
    for name, (shape, kind) in LAYOUT.items():
        if name == drop:
            continue
        if kind == "shard0_int":
            served.register_buffer(_rename(name), torch.full(shape, -1, dtype=torch.int64))
        else:  # poisoned, so an unwritten element shows
            poison = torch.full(shape, float("nan"), dtype=torch.bfloat16)
            served.register_parameter(_rename(name), nn.Parameter(poison))
    return served


# -- the fully_shard model --------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(37, 16)
        self.l1 = torch.nn.Linear(16, 24)
        self.l2 = torch.nn.Linear(24, 16)
        self.register_buffer("scale", torch.tensor([2.0, 0.5]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(self.emb(tokens)))) * self.scale.sum()


NET_MAP = {"emb.weight": "tok.weight", "l1.weight": "up.weight", "l1.bias": "up.bias"}


def _served_net() -> torch.nn.Module:
    from torch import nn

    net = nn.Module()
    net.tok = nn.Embedding(37, 16, dtype=torch.bfloat16)
    net.up = nn.Linear(16, 24, dtype=torch.bfloat16)
    net.l2 = nn.Linear(24, 16, dtype=torch.bfloat16)
    net.register_buffer("scale", torch.zeros(2, dtype=torch.bfloat16))
    return net


def _fully_shard_net(mesh: object) -> torch.nn.Module:
    """A fully_shard-ed net after one real training step (Gloo on the CPU, torch >= 2.6)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(7)
    net = _Net()
    fully_shard(net.l1, mesh=mesh)
    fully_shard(net.l2, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.arange(10) % 37).square().mean().backward()
    opt.step()
    return net


def _collective_groups(sd: dict) -> int:
    """How many bucket groups of the plan hold a gather (each is posted once per update)."""
    from torchxfer.sources import gather_groups, plan

    entries = plan(sd, torch.bfloat16, _rename, True)
    return sum(any(entries[i].collective for i in g) for g in gather_groups(entries, BUF))


# -- end to end -------------------------------------------------------------------------------


def _e2e(rank: int, side_port: int, trainer_port: int, info0: object) -> object:
    import torch.distributed as dist

    from torchxfer import (
        ModuleLoader,
        NCCLWeightTransferEngine,
        NCCLWeightTransferInitInfo,
        ParallelConfig,
        TransferError,
        WeightTransferConfig,
        send_model,
        update_info_for,
    )

    if rank >= 2:  # workers 1, 2 of the side group
        engine = NCCLWeightTransferEngine(
            WeightTransferConfig(backend="gloo", timeout_s=SIDE_TIMEOUT),
            ParallelConfig(rank=rank - 2, tensor_parallel_size=2),
        )
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 3))
        out: dict = {}
        served = _served_state_dict_module()
        loader = ModuleLoader(served)
        loader.check(info0)
        ptrs = {n: t.data_ptr() for n, t in served.state_dict().items()}
        with loader.update():  # u0: sharded state dict, bf16, renamed, split across buckets
            engine.receive_weights(info0, loader)
        out["u0"] = {n: digest(t) for n, t in served.state_dict().items()}
        out["in_place"] = ptrs == {n: t.data_ptr() for n, t in served.state_dict().items()}
        net = _served_net()
        net_loader = ModuleLoader(net)
        with net_loader.update():  # u1: fully_shard model, unpacked, checksummed
            engine.receive_weights(None, net_loader)
        out["u1"] = {n: digest(t) for n, t in net.state_dict().items()}
        # u2: this server has no embedding, so its strict loader rejects the update.
        strict = ModuleLoader(_served_state_dict_module(drop="embed.weight"))
        try:
            with strict.update():
                engine.receive_weights(None, strict)
            out["u2"] = "loaded?!"
        except TransferError as e:
            out["u2"] = str(e)
        # u3 (misordered trainer ranks) never reaches the side group.
        with loader.update():  # u4: the next update over the same groups
            engine.receive_weights(None, loader)
        out["u4"] = {n: digest(t) for n, t in served.state_dict().items()}
        # u5 (a bad name_map on rank 1 only) never reaches the side group; u6 is aborted
        # by rank 0 when rank 1 fails part-way; u7 goes through.
        try:
            with loader.update():
                engine.receive_weights(None, loader)
            out["u6"] = "loaded?!"
        except TransferError as e:
            out["u6"] = str(e)
        with loader.update():
            engine.receive_weights(None, loader)
        out["u7"] = {n: digest(t) for n, t in served.state_dict().items()}
        out["version"] = engine.weights_version
        engine.shutdown()
        return out

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    mesh = init_device_mesh("cpu", (2,))
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(
            dict(master_address=ADDR, master_port=side_port, world_size=3), backend="gloo", timeout_s=SIDE_TIMEOUT
        )
    out = {}
    kw = dict(dtype=torch.bfloat16, name_map=_rename, packed_buffer_size_bytes=BUF, timeout_s=SEND_TIMEOUT)

    def reference(source: dict) -> dict:
        """The trainer's own full tensors, gathered the plain way (after the send), as the server names them."""
        ref = {}
        for name, t in source.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            ref[_rename(name)] = digest(full.bfloat16() if full.is_floating_point() else full)
        return ref

    # u0: sharded state dict.
    sd = _sharded(0, mesh, rank)
    out["info_matches"] = update_info_for(sd, dtype=torch.bfloat16, name_map=_rename,
                                          packed_buffer_size_bytes=BUF) == info0  # fmt: skip
    stats = send_model(sd, group, **kw)
    out["u0_tensors"] = None if stats is None else stats.num_tensors
    out["u0_ref"] = reference(sd)

    # u1: fully_shard model, dict rename, unpacked, checksum.
    net = _fully_shard_net(mesh)
    out["fsdp_dtensor"] = all(isinstance(p, DTensor) for p in net.parameters())
    send_model(net, group, dtype=torch.bfloat16, name_map=NET_MAP, packed=False, checksum=True, timeout_s=SEND_TIMEOUT)
    ref = {}
    for name, t in net.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        ref[NET_MAP.get(name, name)] = digest(full.detach().bfloat16())
    out["u1_ref"] = ref

    # u2: a worker rejects the update; rank 1 must learn it at its next lockstep
    # point instead of gathering the rest of the model (or waiting in a gather).
    import torchxfer.gather as gather_mod

    gathers = [0]
    real = gather_mod.Gatherer.post

    def counting(self: object, posted: object) -> None:
        gathers[0] += 1
        return real(self, posted)

    gather_mod.Gatherer.post = counting
    start = time.monotonic()
    try:
        send_model(_sharded(2, mesh, rank), group, **kw)
        out["u2"] = "sent?!"
    except TransferError as e:
        out["u2"] = str(e)
    finally:
        gather_mod.Gatherer.post = real
    out["u2_elapsed"] = time.monotonic() - start
    out["u2_gathers"] = gathers[0]

    # u3: rank 1 iterates in another order. Unchecked, its gathers would pair with
    # the wrong tensors (Gloo aborts the process on the size mismatch); checked, both
    # ranks raise ValueError before anything moves.
    sd3 = _sharded(3, mesh, rank)
    if rank == 1:
        sd3 = dict(reversed(list(sd3.items())))
    start = time.monotonic()
    try:
        send_model(sd3, group, **kw)
        out["u3"] = "sent?!"
    except ValueError as e:
        out["u3"] = str(e)
    out["u3_elapsed"] = time.monotonic() - start

    # u4: both groups are still usable.
    sd4 = _sharded(4, mesh, rank)
    send_model(sd4, group, **kw)
    out["u4_ref"] = reference(sd4)

    # u5: rank 1's name_map fails while planning: every rank raises before anything moves.
    def bad_map(name: str) -> str:
        if rank == 1:
            raise KeyError(f"no server name for {name!r}")
        return _rename(name)

    try:
        send_model(sd4, group, **{**kw, "name_map": bad_map})
        out["u5"] = "sent?!"
    except (ValueError, KeyError) as e:
        out["u5"] = f"{type(e).__name__}: {e}"

    # u6: rank 1 fails on its own part-way (its third tensor): rank 0 learns it at its
    # next lockstep point and aborts the update for the workers.
    real_prepare, calls = gather_mod.Gatherer.prepare, [0]

    def failing(self: object, g: int, *rest: object) -> object:
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            raise RuntimeError("simulated out of memory on rank 1")
        return real_prepare(self, g, *rest)

    gather_mod.Gatherer.prepare = failing
    try:
        send_model(_sharded(6, mesh, rank), group, **kw)
        out["u6"] = "sent?!"
    except (TransferError, RuntimeError) as e:
        out["u6"] = f"{type(e).__name__}: {e}"
    finally:
        gather_mod.Gatherer.prepare = real_prepare
    out["groups"] = _collective_groups(sd4)

    # u7: everything still works.
    send_model(sd4, group, **kw)
    out["all_reduce"] = _trainer_group_works_then_close(rank, group)
    return out


def _trainer_group_works_then_close(rank: int, group: object) -> float:
    """The trainer ranks' own group still reduces (the sum of rank + 1); then everything is released."""
    import torch.distributed as dist

    from torchxfer import destroy_side_group

    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    if group is not None:
        destroy_side_group(group)
    dist.destroy_process_group()
    return t.item()


def test_sharded_trainer_end_to_end_bit_exact_failures_and_misorder():
    info0 = _plain_info(0)
    outcomes = run_processes(_e2e, 4, free_port(), free_port(), info0, deadline_s=150)
    t0, t1, w1, w2 = (o.value for o in outcomes)
    # What arrived is exactly the trainer's full tensors, cast to bf16, renamed.
    for seed, key, ref in ((0, "u0", "u0_ref"), (4, "u4", "u4_ref")):
        want = {_rename(n): digest(t.bfloat16() if t.is_floating_point() else t) for n, t in _full(seed).items()
                if LAYOUT[n][1] != "partial"}  # fmt: skip
        assert {k: v for k, v in t0[ref].items() if k in want} == want  # cast-then-gather == gather-then-cast
        assert t0[ref] == t1[ref]
        for w in (w1, w2):
            assert w[key] == t0[ref], key
    assert t0["info_matches"] and t1["info_matches"]
    assert t0["u0_tensors"] == len(LAYOUT) and t1["u0_tensors"] is None
    assert t0["fsdp_dtensor"]
    for w in (w1, w2):
        assert w["in_place"]
        assert w["u1"] == t0["u1_ref"]
        assert w["u7"] == t0["u4_ref"]
        # u0, u1, u2 (failed), u4, u6 (aborted), u7: u3 and u5 never began.
        assert w["version"] == 5
        assert "simulated out of memory on rank 1" in w["u6"], w["u6"]
    # u5: the rank with the bad input raises its own error; the other learns it.
    assert t1["u5"].startswith("KeyError") and "no server name" in t1["u5"], t1["u5"]
    assert t0["u5"].startswith("ValueError") and "no server name" in t0["u5"], t0["u5"]
    # u6: rank 1's own failure reaches rank 0 (TransferError), then the workers (aborted update).
    assert t1["u6"].startswith("RuntimeError: simulated"), t1["u6"]
    assert t0["u6"].startswith("TransferError: send_model failed on another trainer rank"), t0["u6"]
    assert "[trainer rank 1] RuntimeError: simulated" in t0["u6"], t0["u6"]
    # u2: every rank fails, the rest of the model is not gathered, nobody waits for a timeout.
    for w in (w1, w2):
        assert "unexpected 'served_embed_weight'" in w["u2"], w["u2"]
    assert "unexpected 'served_embed_weight'" in t0["u2"], t0["u2"]
    assert "send_model failed on another trainer rank" in t1["u2"] and "unexpected" in t1["u2"], t1["u2"]
    print(f"\nu2: rank 1 posted {t1['u2_gathers']} of {t0['groups']} groups of gathers, rank 0 {t0['u2_gathers']}; "
          f"failed after {t1['u2_elapsed']:.2f} s (rank 1), {t0['u2_elapsed']:.2f} s (rank 0); "
          f"misorder caught after {t1['u3_elapsed']:.3f} s")
    assert t1["u2_gathers"] <= t0["u2_gathers"] + 1 < t0["groups"], (t0["u2_gathers"], t1["u2_gathers"])
    for t in (t0, t1):
        assert t["u2_elapsed"] < SIDE_TIMEOUT, t
    # u3: a misordered rank is caught on both ranks before any gather.
    for t in (t0, t1):
        assert "planned different updates" in t["u3"], t["u3"]
        assert t["u3_elapsed"] < SIDE_TIMEOUT, t
        assert t["all_reduce"] == 3.0


# -- peak memory on the sender ------------------------------------------------------------------

MiB = 1 << 20
MEM_BUF = 4 * MiB
MEM_NUM = 2
MEM_SHAPES = [(512, 1024)] * 24 + [(2048, 1024)]  # 48 MiB + 8 MiB in fp32
MEM_SLACK = 4 * MiB  # allocator, Gloo and Python overhead (about 2 MiB measured)


def _rss() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _peak_rss(fn: object) -> int:
    """Bytes by which this process's resident memory peaked above where it was
    when ``fn`` started: the high-water mark is reset first (Linux
    ``/proc/self/clear_refs``). Every allocation counts: gathers, casts,
    buffers, temporaries, Gloo's own. The test runs its ranks with a fixed
    glibc mmap threshold, so freed tensors leave RSS at once."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = _rss()
    fn()
    return _rss()[1] - before


def _group_bytes(numel: list[int], itemsize: int) -> list[int]:
    from torchxfer.packing import TensorSpec
    from torchxfer.sources import Entry, gather_groups

    entries = [Entry(f"w{i}", f"w{i}", torch.empty(0), torch.float32 if itemsize == 4 else torch.bfloat16,
                     (n,), "local") for i, n in enumerate(numel)]  # fmt: skip
    return [sum(TensorSpec("x", entries[i].dtype, entries[i].shape).nbytes for i in g)
            for g in gather_groups(entries, MEM_BUF)]  # fmt: skip


def _memory(rank: int, side_port: int, trainer_port: int, release: object) -> object:
    import torch.distributed as dist

    from torchxfer import (
        NCCLWeightTransferEngine,
        NCCLWeightTransferInitInfo,
        ParallelConfig,
        TransferError,
        WeightTransferConfig,
        destroy_side_group,
        send_model,
    )

    dtypes = [torch.bfloat16, torch.bfloat16, torch.float32]  # bf16 twice: buffers made, then reused
    if rank == 2:  # the one worker: digests of what arrived
        config = WeightTransferConfig(backend="gloo", timeout_s=SIDE_TIMEOUT)
        engine = NCCLWeightTransferEngine(config, ParallelConfig())
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
        got = []
        for _ in dtypes:
            batch_digests: dict = {}
            engine.receive_weights(None, lambda b, d=batch_digests: d.update((n, digest(t)) for n, t in b))
            got.append(batch_digests)
        engine.shutdown()
        return got

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(11)
    sd = {f"w{i}": distribute_tensor(torch.randn(shape, generator=gen), mesh, [Shard(0)])
          for i, shape in enumerate(MEM_SHAPES)}  # fmt: skip
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(
            dict(master_address=ADDR, master_port=side_port, world_size=2), backend="gloo", timeout_s=SIDE_TIMEOUT
        )
    out: dict = {"peaks": [], "want": []}
    for dtype in dtypes:
        def send(dtype: torch.dtype = dtype) -> None:
            send_model(sd, group, dtype=dtype, packed_buffer_size_bytes=MEM_BUF, packed_num_buffers=MEM_NUM,
                       timeout_s=SEND_TIMEOUT)

        out["peaks"].append(_peak_rss(send))
        out["want"].append({n: digest(t.full_tensor().to(dtype)) for n, t in sd.items()})
    # What the issue's users do today: gather the whole model first.
    out["gather_all"] = _peak_rss(lambda: [t.full_tensor() for t in sd.values()])
    # Rank 1 never calls send_model (it waits for rank 0 here instead): rank 0's
    # send fails within its timeout_s instead of waiting forever.
    start = time.monotonic()
    if rank == 0:
        try:
            send_model(sd, group, timeout_s=2.0)
            out["absent"] = "sent?!"
        except TransferError as e:
            out["absent"] = str(e)
        out["absent_elapsed"] = time.monotonic() - start
        release.set()
        destroy_side_group(group)
    else:
        release.wait(60)
    # The trainer group has rank 0's abandoned collective pending: leave it to process exit.
    return out


def test_sender_peak_memory_is_buffers_plus_two_buckets_and_an_absent_rank_times_out(monkeypatch):
    import multiprocessing as mp

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    # A fixed threshold: large blocks are mmapped and unmapped on free, so RSS follows live tensors.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    release = mp.get_context("spawn").Event()
    outcomes = run_processes(_memory, 3, free_port(), free_port(), release, deadline_s=150)
    t0, t1, worker = (o.value for o in outcomes)
    numel = [torch.Size(s).numel() for s in MEM_SHAPES]
    print(f"\npeak RSS above the start of send_model, model {sum(numel) * 4 // MiB} MiB fp32, buffers {MEM_NUM} x "
          f"{MEM_BUF // MiB} MiB, largest tensor {max(numel) * 4 // MiB} MiB fp32; [bf16 (buffers made), bf16 "
          f"(buffers reused), fp32]: rank 0 {[round(p / MiB, 2) for p in t0['peaks']]} MiB, rank 1 "
          f"{[round(p / MiB, 2) for p in t1['peaks']]} MiB; gathering the whole model first: "
          f"{t0['gather_all'] / MiB:.2f} MiB")  # fmt: skip
    for i, itemsize in enumerate((2, 2, 4)):
        # The bound the README states: buffers + about two buckets of gathered tensors.
        # Groups are the sender's buckets (a tensor larger than a buffer alone); at
        # most a group in hand and the next in flight, plus this rank's own shards of it;
        # Gloo's gather holds its output twice for a moment (a flat temporary).
        sizes = _group_bytes(numel, itemsize)
        two = max(a + 2 * b + b // 2 for a, b in zip(sizes, sizes[1:]))
        # The sender keeps a private copy of a tensor it splits across buffers.
        two += max([n * itemsize for n in numel if n * itemsize > MEM_BUF], default=0)
        buffers = MEM_NUM * MEM_BUF if i == 0 else 0  # made in the first update, reused after
        assert t0["peaks"][i] <= buffers + two + MEM_SLACK, (i, t0["peaks"][i], sizes)
        assert t1["peaks"][i] <= two // 2 + MEM_SLACK, (i, t1["peaks"][i])
        assert t0["peaks"][i] < t0["gather_all"] / 2
    for i in range(3):
        assert worker[i] == t0["want"][i] == t1["want"][i]
    assert "send_model plan check on the trainer group failed" in t0["absent"], t0["absent"]
    assert t0["absent_elapsed"] < 2.0 + SIDE_TIMEOUT, t0


# -- CUDA: FSDP2 with CPU offload, NCCL trainer group --------------------------------------------


def _cuda_offload(rank: int, side_port: int, trainer_port: int, world: int) -> object:
    import torch.distributed as dist

    from torchxfer import (
        ModuleLoader,
        NCCLWeightTransferEngine,
        NCCLWeightTransferInitInfo,
        ParallelConfig,
        TransferError,
        WeightTransferConfig,
        destroy_side_group,
        send_model,
    )

    mem_shapes = [(4096, 1024)] * 8 + [(8192, 2048)]  # 16 MiB each and 64 MiB in fp32: 192 MiB
    if rank == world:  # a CPU worker over Gloo
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=30), ParallelConfig())
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
        net = _served_net()
        loader = ModuleLoader(net)
        with loader.update():
            engine.receive_weights(None, loader)
        got = {n: digest(t) for n, t in net.state_dict().items()}
        try:  # a server whose module has none of these names rejects the update
            engine.receive_weights(None, ModuleLoader(torch.nn.Linear(1, 1)))
            failed = "loaded?!"
        except TransferError as e:
            failed = str(e)
        big: dict = {}
        engine.receive_weights(None, lambda b: big.update((n, digest(t)) for n, t in b))
        engine.shutdown()
        return {"net": got, "failed": failed, "big": big}

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Shard

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    mesh = init_device_mesh("cuda", (world,))
    torch.manual_seed(7)
    net = _Net().cuda()
    for module in (net.l1, net.l2, net):
        fully_shard(module, mesh=mesh, offload_policy=CPUOffloadPolicy())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.arange(10, device="cuda") % 37).square().mean().backward()
    opt.step()
    params = dict(net.named_parameters())
    out = {"offloaded": all(isinstance(p, DTensor) and p.to_local().device.type == "cpu" for p in params.values())}
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(
            dict(master_address=ADDR, master_port=side_port, world_size=2), backend="gloo", timeout_s=30
        )
    send_model(net, group, dtype=torch.bfloat16, name_map=NET_MAP, packed_buffer_size_bytes=BUF, timeout_s=60)
    # Reference without DTensor: every rank's shard, concatenated along dim 0.
    ref = {}
    for name, t in net.state_dict().items():
        if isinstance(t, DTensor):
            shards: list = [None] * world
            dist.all_gather_object(shards, t.to_local().detach().cpu())
            t = torch.cat(shards)
        ref[NET_MAP.get(name, name)] = digest(t.detach().bfloat16())
    out["ref"] = ref
    try:
        send_model(net, group, dtype=torch.bfloat16, name_map=NET_MAP, timeout_s=60)
        out["failed"] = "sent?!"
    except TransferError as e:
        out["failed"] = str(e)
    # Peak GPU memory of a larger offloaded state dict: exact, from the CUDA caching allocator.
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for i, shape in enumerate(mem_shapes):
        full = torch.randn(shape, generator=gen)
        local = full.chunk(world)[rank].clone()  # CPU shard on a CUDA mesh, as CPUOffloadPolicy keeps it
        sd[f"w{i}"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                         shape=full.shape, stride=full.stride())  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    buf, num = 16 << 20, 2
    send_model(sd, group, dtype=torch.bfloat16, packed_buffer_size_bytes=buf, packed_num_buffers=num, timeout_s=60)
    torch.cuda.synchronize()
    out["gpu_peak"] = torch.cuda.max_memory_allocated() - base
    largest = max(torch.Size(s).numel() for s in mem_shapes) * 2
    # Buffers, two buckets gathered, a shard; plus 64 KiB for the lockstep's status tensors and the
    # allocator's 512-byte rounding (measured on 2x H200: 512 bytes over the three terms).
    out["gpu_bound"] = (num * buf if rank == 0 else 0) + 2 * largest + largest // world + (64 << 10)
    gen = torch.Generator().manual_seed(3)
    out["big_ref"] = {f"w{i}": digest(torch.randn(s, generator=gen).bfloat16()) for i, s in enumerate(mem_shapes)}
    if group is not None:
        destroy_side_group(group)
    dist.destroy_process_group()
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fsdp2_cpu_offload_trainer():
    """FSDP2 with CPUOffloadPolicy on a CUDA mesh over NCCL: each shard lives on the
    CPU and is gathered on the GPU. Two trainer ranks with 2 GPUs (NCCL needs a GPU
    per rank), else one; a CPU worker over Gloo."""
    world = 2 if torch.cuda.device_count() >= 2 else 1
    outcomes = run_processes(_cuda_offload, world + 1, free_port(), free_port(), world, deadline_s=240)
    trainers, worker = [o.value for o in outcomes[:world]], outcomes[world].value
    t0 = trainers[0]
    print(f"\nGPU peak during send_model of a 192 MiB fp32 CPU-offloaded model as bf16 ({world} trainer rank(s)): "
          + ", ".join(f"rank {r} {t['gpu_peak'] / MiB:.1f} MiB (bound {t['gpu_bound'] / MiB:.1f})"
                      for r, t in enumerate(trainers)))  # fmt: skip
    assert worker["net"] == t0["ref"]
    assert worker["big"] == t0["big_ref"]
    assert "unexpected" in worker["failed"] and "unexpected" in t0["failed"], (worker["failed"], t0["failed"])
    for r, t in enumerate(trainers):
        assert t["offloaded"] and t["ref"] == t0["ref"]
        assert t["gpu_peak"] <= t["gpu_bound"], t
        if r > 0:
            assert "send_model failed on another trainer rank" in t["failed"], t["failed"]


def _abandoned_step(rank: int, trainer_port: int) -> object:
    import torch.distributed as dist

    from torchxfer import TransferError
    from torchxfer.lockstep import Lockstep

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    status, other = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
    out = None
    if rank == 1:  # rank 0 never joins this step: rank 1's wait runs out and its all_reduce stays posted
        try:
            Lockstep(status, 1.0).step()
            first = "stepped"
        except TransferError as e:
            first = str(e)
        start = time.monotonic()
        try:
            Lockstep(status, 1.0).post_begin([], "b", 0, None)
            second = "posted"
        except TransferError as e:
            second = str(e)
        out = first, second, time.monotonic() - start
    dist.barrier(group=other)
    dist.destroy_process_group()
    return out


@pytest.mark.process
def test_a_status_group_whose_wait_ran_out_is_refused_from_then_on():
    """A lockstep wait that ran out leaves its collective posted (Gloo cannot take it back):
    another rank's next collective on that group would pair with it, and a whole update could
    go on without the rank that left. So the rank refuses that group at once, from its next
    send_model on, naming why, without posting anything more on it."""
    outcomes = run_processes(_abandoned_step, 2, free_port(), deadline_s=60)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    first, second, elapsed = outcomes[1].value
    assert "no longer usable" in first, first
    assert "cannot use this trainer group" in second and "send_model status failed" in second, second
    assert elapsed < 0.5, elapsed


_ODD = "layer.\udc80.weight"  # a lone surrogate: a name trainer_send_weights carries, escaped on the wire


def _odd_name(rank: int, side_port: int, trainer_port: int) -> object:
    import torch.distributed as dist

    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig
    from torchxfer import destroy_side_group, send_model

    if rank == 2:
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=10), ParallelConfig())
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
        got: list = []
        engine.receive_weights(None, lambda batch: got.extend((n, t.tolist()) for n, t in batch))
        engine.shutdown()
        return got
    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=side_port, world_size=2),
                                                      backend="gloo", timeout_s=10)  # fmt: skip
    send_model({_ODD: torch.arange(4.0)}, group, timeout_s=10)
    if group is not None:
        destroy_side_group(group)
    dist.destroy_process_group()
    return None


@pytest.mark.process
def test_send_model_carries_a_name_with_a_lone_surrogate():
    """The trainer ranks' plan check digests every name, lone surrogates included, as the
    wire carries them: send_model moves such a tensor as trainer_send_weights does."""
    outcomes = run_processes(_odd_name, 3, free_port(), free_port(), deadline_s=90)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    got = outcomes[2].value
    assert got == [(_ODD, [0.0, 1.0, 2.0, 3.0])], got


# -- awkward shards on a 2 x 2 mesh ------------------------------------------------------------


def _awkward_full() -> dict[str, torch.Tensor]:
    """Full tensors every process can make: dtypes Gloo cannot gather as such (fp8, int16),
    complex, and values for lazy conjugate and negative views."""
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(8, 6, generator=gen)
    return {
        "fp8": (torch.randn(8, 6, generator=gen) * 4).to(torch.float8_e4m3fn),
        "i16": torch.randint(-30000, 30000, (8, 6), generator=gen, dtype=torch.int32).to(torch.int16),
        "c64": torch.complex(real, torch.randn(8, 6, generator=gen)),
        "conj": torch.complex(torch.randn(9, 4, generator=gen), torch.randn(9, 4, generator=gen)),  # uneven rows
        "neg": torch.randn(7, 5, generator=gen),
    }


def _awkward(rank: int, side_port: int, trainer_port: int) -> object:
    import torch.distributed as dist

    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, TransferError
    from torchxfer import WeightTransferConfig, send_model, update_info_for

    if rank == 4:  # the worker
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=SIDE_TIMEOUT),
                                          ParallelConfig())  # fmt: skip
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
        out: dict = {}

        def keep(key: str) -> object:
            out[key] = {}
            return lambda batch: out[key].update((n, digest(t)) for n, t in batch)

        engine.receive_weights(None, keep("awkward"))
        try:
            engine.receive_weights(None, keep("oom"))
            out["oom_error"] = None
        except TransferError as e:
            out["oom_error"] = str(e)
        engine.receive_weights(None, keep("last"))
        out["version"] = engine.weights_version
        engine.shutdown()
        return out

    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import torchxfer.sources as sources_mod

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=4,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    mesh = init_device_mesh("cpu", (2, 2))
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=side_port, world_size=2),
                                                      backend="gloo", timeout_s=SIDE_TIMEOUT)  # fmt: skip
    full = _awkward_full()
    row, col = mesh.get_coordinate()
    # distribute_tensor would scatter fp8 over Gloo, which has no fp8: each rank takes its block.
    sd = {name: DTensor.from_local(full[name][4 * row : 4 * row + 4, 3 * col : 3 * col + 3], mesh,
                                   [Shard(0), Shard(1)], run_check=False, shape=(8, 6), stride=(6, 1))
          for name in ("fp8", "i16", "c64")}  # fmt: skip
    # Lazy views as local shards, their values the full tensor's rows (Shard(0) over mesh dim 0):
    # a conjugate view of conjugated memory, the imaginary part of a conjugate view (negative bit).
    rows = [full["conj"][:5], full["conj"][5:]][row]
    sd["conj"] = DTensor.from_local(rows.conj().resolve_conj().conj(), mesh, [Shard(0), Replicate()],
                                    run_check=False, shape=full["conj"].shape, stride=(4, 1))  # fmt: skip
    rows = [full["neg"][:4], full["neg"][4:]][row]
    neg = torch.complex(torch.zeros_like(rows), -rows).conj().imag
    assert neg.is_neg() and sd["conj"].to_local().is_conj()
    sd["neg"] = DTensor.from_local(neg, mesh, [Shard(0), Replicate()], run_check=False, shape=full["neg"].shape,
                                   stride=(5, 1))  # fmt: skip
    out = {"info": [(s.name, str(s.dtype), tuple(s.shape)) for s in _specs(update_info_for(sd))]}
    kw = dict(packed_buffer_size_bytes=256, timeout_s=SEND_TIMEOUT)
    send_model(sd, group, **kw)
    out["want"] = {n: digest(t) for n, t in full.items()}

    def outcome(fn: object) -> str:
        start = time.monotonic()
        try:
            fn()
            return "sent"
        except Exception as e:  # noqa: BLE001 - reported
            return f"{type(e).__name__}: {e} ({time.monotonic() - start:.2f} s)"

    # A dtype torch cannot cast to: ValueError before anything moves, on every rank.
    float4 = getattr(torch, "float4_e2m1fn_x2", None)
    if float4 is not None:
        out["float4"] = outcome(lambda: send_model(sd, group, dtype=float4, **kw))
    # A Partial tensor whose local shape is wrong on rank 1 (full_tensor() would abort a process).
    part = torch.ones(3, 3) if rank != 1 else torch.ones(2, 3)
    bad = {"p": DTensor.from_local(part, mesh, [Partial(), Replicate()], run_check=False, shape=(3, 3),
                                   stride=(3, 1))}  # fmt: skip
    out["partial_shape"] = outcome(lambda: send_model(bad, group, **kw))
    # A DTensor on a mesh that leaves ranks 0 and 1 out.
    sub = DeviceMesh("cpu", [2, 3])
    out["submesh"] = outcome(lambda: send_model({"x": distribute_tensor(torch.ones(4, 2), sub, [Shard(0)])}, group, **kw))
    # Rank 1 cannot stage its shard of a tensor gathered by full_tensor(): every rank learns it
    # at once (before, the others waited in that gather for the mesh group's own timeout).
    real, calls = DTensor.from_local, [0]

    def failing(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise torch.OutOfMemoryError("simulated: out of memory staging a shard on trainer rank 1")
        return real(*args, **kwargs)

    sources_mod.DTensor.from_local = failing
    try:
        out["oom"] = outcome(lambda: send_model(sd, group, **kw))
    finally:
        sources_mod.DTensor.from_local = real
    send_model(sd, group, **kw)
    out["all_reduce"] = _trainer_group_works_then_close(rank, group)
    return out


def _specs(info: object) -> list:
    from types import SimpleNamespace

    return [SimpleNamespace(name=n, dtype=d, shape=s) for n, d, s in zip(info.names, info.dtype_names, info.shapes)]


def test_awkward_shards_arrive_bit_exact_and_bad_ones_fail_on_every_rank_at_once():
    """Four trainer ranks on a 2 x 2 CPU mesh, one worker. Gathered by full_tensor() (two mesh
    dims sharded): fp8 and int16 (which Gloo cannot gather as such) and complex64; gathered
    shard by shard: lazy conjugate and negative views as local shards. All arrive bit-exact.
    Then, each on every trainer rank at once, before anything moves: a cast torch has no kernel
    for, a Partial shard of the wrong shape on one rank, a DTensor on a mesh without the
    sender; and once the update began, one rank failing to stage its shard of a full_tensor()
    gather. The trainer's own group still works after all of it."""
    outcomes = run_processes(_awkward, 5, free_port(), free_port(), deadline_s=150)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    trainers, worker = [o.value for o in outcomes[:4]], outcomes[4].value
    want = trainers[0]["want"]
    assert worker["awkward"] == want and worker["last"] == want
    assert worker["version"] == 2 and "simulated: out of memory" in worker["oom_error"], worker
    assert trainers[0]["info"] == [("fp8", "float8_e4m3fn", (8, 6)), ("i16", "int16", (8, 6)),
                                   ("c64", "complex64", (8, 6)), ("conj", "complex64", (9, 4)),
                                   ("neg", "float32", (7, 5))]  # fmt: skip
    for rank, t in enumerate(trainers):
        assert t["all_reduce"] == 10.0
        if "float4" in t:
            assert t["float4"].startswith("ValueError") and "cannot cast" in t["float4"], t["float4"]
        assert t["partial_shape"].startswith("ValueError") and "DTensor's rules give this rank [3, 3]" in \
            t["partial_shape"], t["partial_shape"]  # fmt: skip
        assert t["submesh"].startswith("ValueError") and "does not hold this rank" in t["submesh"], t["submesh"]
        if rank == 1:
            assert t["oom"].startswith("OutOfMemoryError: simulated"), t["oom"]
        else:
            assert "TransferError: send_model failed on another trainer rank" in t["oom"], t["oom"]
        assert float(t["oom"].rsplit("(", 1)[1].split(" s)")[0]) < SIDE_TIMEOUT / 2, t["oom"]


def _partial_cast_fails(rank: int, side_port: int, trainer_port: int) -> object:
    import torch.distributed as dist

    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, TransferError
    from torchxfer import WeightTransferConfig, send_model

    if rank == 2:  # the worker
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=SIDE_TIMEOUT),
                                          ParallelConfig())  # fmt: skip
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
        got: list[dict] = [{}, {}]
        for u in range(2):
            try:
                engine.receive_weights(None, lambda batch: got[u].update((n, t.tolist()) for n, t in batch))
            except TransferError as e:
                got[u] = {"failed": str(e)}
        engine.shutdown()
        return got

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    import torchxfer.gather as gather_mod

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    mesh = init_device_mesh("cpu", (2,))
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=side_port, world_size=2),
                                                      backend="gloo", timeout_s=SIDE_TIMEOUT)  # fmt: skip
    sd = {"p": DTensor.from_local(torch.full((2, 3), rank + 1.0), mesh, [Partial()], run_check=False, shape=(2, 3),
                                  stride=(3, 1))}  # fmt: skip
    kw = dict(dtype=torch.bfloat16, packed_buffer_size_bytes=256, timeout_s=SEND_TIMEOUT)
    real = gather_mod.finish_full

    def failing(entry: object, full: torch.Tensor) -> torch.Tensor:
        if rank == 1:
            raise torch.OutOfMemoryError("simulated: out of memory casting a reduced tensor on trainer rank 1")
        return real(entry, full)

    gather_mod.finish_full = failing
    start = time.monotonic()
    try:
        send_model(sd, group, **kw)
        outcome = "sent"
    except Exception as e:  # noqa: BLE001 - reported
        outcome = f"{type(e).__name__}: {e}"
    finally:
        gather_mod.finish_full = real
    elapsed = time.monotonic() - start
    send_model(sd, group, **kw)
    return outcome, elapsed, _trainer_group_works_then_close(rank, group)


def test_a_rank_failing_after_a_full_tensor_gather_stops_every_rank_at_once():
    """A Partial tensor is reduced by full_tensor() on every rank, then cast; rank 1 fails in that
    cast (local work after the collective, which used to leave rank 0 waiting at its next lockstep
    point): it raises its own error and rank 0 a TransferError, both at once. Rank 0's own reduced
    tensor is whole, so the worker either loaded it (3 = 1 + 2, in bf16) or had the update aborted,
    never anything else; the next update goes through."""
    outcomes = run_processes(_partial_cast_fails, 3, free_port(), free_port(), deadline_s=120)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    (out0, s0, sum0), (out1, s1, sum1), got = (o.value for o in outcomes)
    assert out1.startswith("OutOfMemoryError: simulated"), out1
    assert out0.startswith("TransferError: send_model failed on another trainer rank") and "simulated" in out0, out0
    assert s0 < SIDE_TIMEOUT / 2 and s1 < SIDE_TIMEOUT / 2, (s0, s1)
    want = {"p": [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]}
    assert got[0] == want or "simulated" in got[0].get("failed", ""), got[0]
    assert got[1] == want, got[1]
    assert sum0 == sum1 == 3.0
