"""Every common sharding through send_model, bit-exact against the unsharded tensors.

Process tier: trainer ranks with a 1-D mesh over all of them and a 2-D mesh
(HSDP: replicate x shard), one worker over a Gloo side group. On the CPU: 4
trainer ranks (Gloo). On CUDA with >= 2 GPUs: the same over NCCL (2-D mesh
(1, 2), or (2, 2) with 4 GPUs). Also: trainer_send_weights given a DTensor
fails at once with a ValueError naming send_model, and the group stays usable.
"""

from __future__ import annotations

import datetime

import pytest
import torch

from tests.harness import ADDR, digest, free_port, run_processes

pytestmark = pytest.mark.process

SIDE_TIMEOUT = 10.0
BUF = 64 << 10  # several buckets: gathers overlap with sends
STEADY_UPDATES = 4  # of the trained fully_shard net after its first update (the last one cast to bf16)


def _layout(two_d: tuple[int, int]) -> dict:
    """name -> (shape, dtype, kind); uneven and even shards, large ones gathered alone."""
    return {
        "emb": ((67, 32), torch.float32, "shard0"),  # uneven over the 1-D mesh
        "tp_col": ((48, 33), torch.float32, "shard1"),  # uneven along columns
        "tp_row": ((40, 24), torch.bfloat16, "shard1"),
        "rep": ((32, 16), torch.float32, "replicate"),
        "plain": ((31,), torch.float32, "plain"),
        "step": ((6,), torch.int64, "shard0"),  # never cast
        "hsdp.big": ((512, 256), torch.float32, "hsdp"),  # 512 KiB bf16 per rank pair: packed
        "hsdp.direct": ((1024, 1024), torch.float32, "hsdp"),  # even, >= 1 MiB: straight into its tensor
        "hsdp.uneven": ((37, 8), torch.float32, "hsdp"),
        "hsdp.col": ((16, 45), torch.float32, "hsdp1"),  # Shard(1) on the shard mesh dim
        "two_dims": ((36, 20), torch.float32, "2d_both"),  # sharded on both mesh dims: full_tensor
        "tail": ((300, 64), torch.float32, "shard0"),
    }


def _full(layout: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype, _) in layout.items():
        if dtype == torch.int64:
            out[name] = torch.randint(0, 1 << 40, shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
    return out


def _want(full: dict, dtype: torch.dtype) -> dict[str, str]:
    return {n: digest(t.to(dtype) if t.is_floating_point() else t) for n, t in full.items()}


def _trainer_rank(rank: int, side_port: int, trainer_port: int, world: int, device_type: str, two_d: tuple) -> object:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torchxfer import NCCLWeightTransferEngine, TransferError, destroy_side_group, send_model

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    flat = init_device_mesh(device_type, (world,))
    hsdp = init_device_mesh(device_type, two_d, mesh_dim_names=("replicate", "shard"))
    layout = _layout(two_d)
    placements = {"shard0": (flat, [Shard(0)]), "shard1": (flat, [Shard(1)]), "replicate": (flat, [Replicate()]),
                  "hsdp": (hsdp, [Replicate(), Shard(0)]), "hsdp1": (hsdp, [Replicate(), Shard(1)]),
                  "2d_both": (hsdp, [Shard(0), Shard(1)])}  # fmt: skip
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(
            dict(master_address=ADDR, master_port=side_port, world_size=2), backend=backend, timeout_s=SIDE_TIMEOUT
        )
    out: dict = {"kinds": {}}
    for seed, dtype in ((0, torch.bfloat16), (1, torch.float32)):
        full = _full(layout, seed)
        sd = {}
        for name, t in full.items():
            kind = layout[name][2]
            t = t.to(device_type)
            sd[name] = t if kind == "plain" else distribute_tensor(t, *placements[kind])
        if seed == 0:
            from torchxfer.sources import plan

            out["kinds"] = {e.name: e.how for e in plan(sd, dtype, None, True)}
        stats = send_model(sd, group, dtype=dtype, packed_buffer_size_bytes=BUF, timeout_s=60)
        out[f"sent{seed}"] = None if stats is None else stats.num_tensors
        out[f"want{seed}"] = _want(full, dtype)
    # The seed API refuses DTensors at once (no collective: rank 1 is not in it).
    if rank == 0:
        try:
            NCCLWeightTransferEngine.trainer_send_weights(iter(sd.items()), group, packed=True)
            out["refused"] = "sent?!"
        except ValueError as e:
            out["refused"] = str(e)
        mixed = [("plain", sd["plain"]), ("emb", sd["emb"])]  # a DTensor after a plain tensor: aborted
        try:
            NCCLWeightTransferEngine.trainer_send_weights(iter(mixed), group, packed=True)
            out["refused_later"] = "sent?!"
        except ValueError as e:
            out["refused_later"] = str(e)
        # A transform hands over a DTensor, or is handed one: both refused as the pair is pulled.
        for key, post in (("refused_post", lambda kv: sd["emb"]), ("refused_raw", lambda kv: getattr(kv[1], "to_local", lambda: kv[1])())):
            source = [("plain", sd["plain"]), ("emb2", sd["emb"] if key == "refused_raw" else sd["plain"])]
            try:
                NCCLWeightTransferEngine.trainer_send_weights(iter(source), group, packed=True, post_iter_func=post)
                out[key] = "sent?!"
            except ValueError as e:
                out[key] = str(e)
    # A fully_shard model on the 2-D mesh (HSDP) after a training step.
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(5)
    # Several buckets of BUF, every tensor whole in one.
    net = torch.nn.Sequential(torch.nn.Linear(24, 300), torch.nn.ReLU(), torch.nn.Linear(300, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 9)).to(device_type)  # fmt: skip
    fully_shard(net[0], mesh=hsdp)
    fully_shard(net[2], mesh=hsdp)
    fully_shard(net, mesh=hsdp)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(5, 24, device=device_type)).square().mean().backward()
    opt.step()
    send_model(net, group, packed_buffer_size_bytes=BUF, timeout_s=60)
    out["net"] = {n: digest(p.full_tensor()) for n, p in net.state_dict().items()}
    # The same model, trained between updates: the steady state (a cached layout, bulk packing of
    # gathered tensors, each bucket posted before the next group is gathered), value for value.
    # From the second update of the layout on, rank 0 gathers straight into its send buffers.
    import torchxfer.gather

    gatherers, init = [], torchxfer.gather.Gatherer.__init__

    def recording(self: object, *args: object) -> None:
        init(self, *args)
        gatherers.append(self)

    torchxfer.gather.Gatherer.__init__ = recording
    out["steps"], out["prefilled"] = [], []
    cast = STEADY_UPDATES - 1  # the last steady update is cast to bf16: a new layout
    for step in range(STEADY_UPDATES):
        net(torch.randn(5, 24, device=device_type)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        gatherers.clear()
        send_model(net, group, dtype=torch.bfloat16 if step == cast else None, packed_buffer_size_bytes=BUF,
                   timeout_s=60)  # fmt: skip
        out["prefilled"].append(sum(g.prefilled for g in gatherers))
        out["steps"].append({n: digest(p.full_tensor().to(torch.bfloat16 if step == cast else p.dtype))
                             for n, p in net.state_dict().items()})  # fmt: skip
    torchxfer.gather.Gatherer.__init__ = init
    t = torch.ones(1, device=device_type)
    dist.all_reduce(t)
    out["all_reduce"] = t.item()
    if group is not None:
        destroy_side_group(group)
    dist.destroy_process_group()
    return out


def _worker(side_port: int, device_type: str, gpu: int) -> object:
    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig

    if device_type == "cuda":  # an NCCL side group: the worker on the last trainer rank's GPU
        torch.cuda.set_device(gpu)
        config = WeightTransferConfig(backend="nccl", timeout_s=SIDE_TIMEOUT, device=f"cuda:{gpu}")
    else:
        config = WeightTransferConfig(backend="gloo", timeout_s=SIDE_TIMEOUT)
    engine = NCCLWeightTransferEngine(config, ParallelConfig())
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
    got = []
    # Two state dicts, the fully_shard net, then its steady updates (the refused updates never
    # began, or were aborted).
    for _ in range(3 + STEADY_UPDATES):
        batch: dict = {}
        while True:
            try:
                engine.receive_weights(None, lambda b, d=batch: d.update((n, digest(t)) for n, t in b))
                break
            except Exception as e:  # the aborted mixed update: keep receiving
                batch.clear()
                got.append(f"error: {e}")
        got.append(batch)
    engine.shutdown()
    return got


def _rank(rank: int, side_port: int, trainer_port: int, world: int, device_type: str, two_d: tuple,
          batched: bool = False) -> object:  # fmt: skip
    if rank == world:
        return _worker(side_port, device_type, world - 1)
    if batched:  # NCCL's message layout (one section per rank, every rank in every batch), here over Gloo
        import torchxfer.gather

        torchxfer.gather.one_by_one = lambda pg: False
    return _trainer_rank(rank, side_port, trainer_port, world, device_type, two_d)


def _check(outcomes: list, world: int) -> None:
    trainers, worker = [o.value for o in outcomes[:world]], outcomes[world].value
    t0 = trainers[0]
    # Sharded on both mesh dims needs full_tensor(), unless one of them has a single rank (a (1, 2) mesh).
    two_dims = "full" if world >= 4 else "shard"
    assert t0["kinds"] == {**{n: "shard" for n in t0["kinds"]}, "rep": "local", "plain": "local",
                           "two_dims": two_dims}, t0["kinds"]  # fmt: skip
    batches = [b for b in worker if isinstance(b, dict)]
    errors = [b for b in worker if isinstance(b, str)]
    assert batches[0] == t0["want0"] and batches[1] == t0["want1"]
    assert batches[2] == t0["net"]
    assert batches[3:] == t0["steps"] and len(t0["steps"]) == STEADY_UPDATES
    # Every sharded tensor of the net (all 6) gathered into the send buffer while the layout holds.
    assert t0["prefilled"] == [6] * (STEADY_UPDATES - 1) + [0], t0["prefilled"]
    assert all(t["prefilled"] == [0] * STEADY_UPDATES for t in trainers[1:])
    assert len({str(sorted(b.items())) for b in batches[2:]}) == 1 + STEADY_UPDATES, \
        [{n: d[:8] for n, d in b.items()} for b in batches[2:]]  # each update new values
    assert t0["sent0"] == len(t0["want0"]) and all(t["sent0"] is None for t in trainers[1:])
    for t in trainers:
        assert t["net"] == t0["net"] and t["all_reduce"] == world
    assert "send_model" in t0["refused"] and "DTensor" in t0["refused"], t0["refused"]
    assert "'emb'" in t0["refused_later"] and "send_model" in t0["refused_later"], t0["refused_later"]
    assert "'plain'" in t0["refused_post"] and "send_model" in t0["refused_post"], t0["refused_post"]
    assert "'emb2'" in t0["refused_raw"] and "send_model" in t0["refused_raw"], t0["refused_raw"]
    assert len(errors) == 3 and all("send_model" in e for e in errors), errors


@pytest.mark.parametrize("batched", [False, True], ids=["gloo-messages", "nccl-messages"])
def test_every_placement_bit_exact_on_cpu_gloo(batched):
    world = 4
    outcomes = run_processes(_rank, world + 1, free_port(), free_port(), world, "cpu", (2, 2), batched,
                             deadline_s=150)  # fmt: skip
    _check(outcomes, world)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")
def test_every_placement_bit_exact_on_nccl():
    world = 4 if torch.cuda.device_count() >= 4 else 2
    two_d = (2, 2) if world == 4 else (1, 2)
    outcomes = run_processes(_rank, world + 1, free_port(), free_port(), world, "cuda", two_d, deadline_s=240)
    _check(outcomes, world)
