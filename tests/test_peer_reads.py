"""Peer reads: the sender of send_model copies the other trainer ranks' shards itself.

Pure tier: the row format, the vote, the plan test. Process tier on the CPU:
two trainer ranks (Gloo) and one worker, with the CUDA parts replaced by a
stand-in that "maps" rank 1's shards as the test knows them, so the
protocol around peer reads (no lockstep steps, the other ranks waiting for
the sender's outcome, a failure reaching every rank, the fallback to
collective gathers when the sender cannot map, a rank voting no) runs on
every CI machine, bit-exact. With 2 GPUs: the real thing (FSDP2, NCCL side
group, the worker sharing GPU 1 with trainer rank 1).
"""

from __future__ import annotations

import datetime
import logging
import types

import pytest
import torch

from tests.harness import ADDR, digest, free_port, run_processes
from torchxfer import peer_reads

SIDE_TIMEOUT = 10.0
BUF = 4096  # several buckets

LAYOUT = {  # name -> (shape, dtype, placement)
    "emb": ((67, 32), torch.float32, "shard0"),  # uneven
    "col": ((48, 33), torch.float32, "shard1"),  # uneven, along columns
    "step": ((6,), torch.int64, "shard0"),  # never cast
    "rep": ((8, 4), torch.float32, "replicate"),
    "plain": ((5,), torch.float32, "plain"),
    **{f"tail.{i}": ((40, 32), torch.float32, "shard0") for i in range(4)},
}


# -- pure -------------------------------------------------------------------------------------


def test_a_row_round_trips_bit_for_bit_handles_with_nul_bytes_included():
    handle = bytes([0, 1, 0, 255] * 16)
    row = peer_reads.encode_row(True, 3, {0: (0, 4096, 128), 2: (1, 0, 8)}, [(handle, 1 << 21, 7), (b"\xff" * 64, 512, 9)])
    assert row.dtype == torch.int64 and row.numel() == peer_reads.row_words(3)
    got = peer_reads.decode_row(row, 3)
    assert got.vote and got.host == peer_reads.host_id()
    assert got.pieces == [(0, 4096, 128), (-1, 0, 0), (1, 0, 8)]
    assert got.segments == [(handle, 1 << 21, 7), (b"\xff" * 64, 512, 9)]


def test_a_no_vote_carries_nothing_and_a_malformed_row_is_a_no_vote():
    no = peer_reads.decode_row(peer_reads.encode_row(False, 2, {0: (0, 0, 8)}, [(b"\0" * 64, 8, 1)]), 2)
    assert not no.vote and no.pieces == [(-1, 0, 0)] * 2 and no.segments == []
    good = peer_reads.encode_row(True, 2, {0: (0, 0, 8)}, [(b"\1" * 64, 8, 1)])
    assert not peer_reads.decode_row(good[:-1], 2).vote  # short
    assert not peer_reads.decode_row(good, 3).vote  # another plan's length
    for word, value in ((0, 2), (5, 3), (5, -1)):  # a vote that is not 1; more segments than entries
        bad = good.clone()
        bad[word] = value
        assert not peer_reads.decode_row(bad, 2).vote, (word, value)
    # More segments than entries never leaves this rank.
    assert not peer_reads.decode_row(peer_reads.encode_row(True, 1, {}, [(b"\1" * 64, 8, 1)] * 2), 1).vote


def test_every_rank_must_vote_yes_from_one_host():
    yes = peer_reads.decode_row(peer_reads.encode_row(True, 1), 1)
    no = peer_reads.decode_row(peer_reads.encode_row(False, 1), 1)
    elsewhere = peer_reads.Row(True, [1, 2, 3, 4], yes.pieces, [])
    assert peer_reads.agreed([yes, yes])
    assert not peer_reads.agreed([yes, no])
    assert not peer_reads.agreed([yes, elsewhere])
    assert not peer_reads.agreed([])


def test_the_plan_decides_whether_to_ask_and_the_switch_turns_it_off(monkeypatch):
    def entry(how, device_type="cuda"):
        return types.SimpleNamespace(how=how, collective=how != "local",
                                     tensor=types.SimpleNamespace(device_mesh=types.SimpleNamespace(device_type=device_type)))  # fmt: skip

    assert peer_reads.candidate([entry("local"), entry("shard")])
    assert not peer_reads.candidate([entry("local")])  # nothing to gather
    assert not peer_reads.candidate([entry("shard"), entry("full")])  # full_tensor() takes every rank
    assert not peer_reads.candidate([entry("shard", "cpu")])
    monkeypatch.setenv(peer_reads.ENV, "0")
    assert not peer_reads.enabled()


# -- process tier, CPU: the protocol around peer reads -------------------------------------------


def _full(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randint(0, 1 << 40, s, generator=gen) if d == torch.int64 else torch.randn(s, generator=gen))
            for n, (s, d, _) in LAYOUT.items()}  # fmt: skip


def _stand_in(rank: int, state: dict) -> None:
    """Replace the CUDA parts: every rank may vote, rank 1 "exports" its shards at made-up
    offsets, and the sender "maps" them by copying the test's own copy of rank 1's pieces
    into place byte for byte, rows and pitch as given (the geometry is the code's)."""
    peer_reads.candidate = lambda entries: True
    peer_reads.enabled = lambda: state["vote"]
    peer_reads.export = lambda tensors: ({k: (0, (k << 20) + state["shift"], t.numel() * t.element_size())
                                          for k, t in tensors.items()}, [(bytes(range(64)), 1 << 40, 1)])  # fmt: skip

    def base(handle: bytes, size: int, buffer_id: int, device: object) -> int:
        if not state["map"]:
            raise peer_reads.PeerReadsUnavailable("this test's sender cannot map")
        return 0

    def copy_bytes(dst: int, src: int, width: int, rows: int, pitch: int, stream: object) -> None:
        # src is the made-up address of a piece the test holds: copy its bytes the way the
        # copy engines would (rows of width bytes, pitch apart at dst), on the CPU.
        import ctypes

        state["copies"] += 1
        piece = state["pieces"][src].contiguous()
        assert piece.numel() * piece.element_size() == width * rows, (src, width, rows)
        for r in range(rows):
            ctypes.memmove(dst + r * (pitch if rows > 1 else 0), piece.data_ptr() + r * width, width)

    peer_reads.Mappings.base = staticmethod(base)
    peer_reads.copy_bytes = copy_bytes


def _record_gatherers() -> list:
    """Every Gatherer this process makes from now on (one per send_model), for its counters."""
    import torchxfer.gather

    gatherers, init = [], torchxfer.gather.Gatherer.__init__

    def recording(self: object, *args: object) -> None:
        init(self, *args)
        gatherers.append(self)

    torchxfer.gather.Gatherer.__init__ = recording
    return gatherers


def _trainer(rank: int, side_port: int, trainer_port: int) -> object:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torchxfer import NCCLWeightTransferEngine, TransferError, send_model
    from torchxfer.sources import plan

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    mesh = init_device_mesh("cpu", (2,))
    # Status traffic on a group of its own until the gathers' mode is agreed, as with an NCCL
    # default group (its Gloo twin), so every switch between the two groups runs here too.
    import torchxfer.lockstep

    twin = dist.new_group(backend="gloo")
    torchxfer.lockstep.status_group = lambda trainer_group, timeout_s=None: twin
    exchanges, exchange = [], torchxfer.lockstep.Lockstep.exchange

    def counting(self: object, row: torch.Tensor) -> list:
        exchanges.append(1)
        return exchange(self, row)

    torchxfer.lockstep.Lockstep.exchange = counting
    state = {"vote": True, "map": True, "copies": 0, "pieces": {}, "shift": 0}
    _stand_in(rank, state)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    handler.setLevel(logging.WARNING)
    logging.getLogger("torchxfer").addHandler(handler)
    gatherers = _record_gatherers()
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=side_port, world_size=2),
                                                      backend="gloo", timeout_s=SIDE_TIMEOUT)  # fmt: skip
    out = []
    # (seed, dtype, rank 1 votes, the sender maps): peer reads, a cast (collective gathers),
    # failing at the worker, falling back, a no vote, then peer reads again on the same group,
    # twice: the second time the layout is the cached one (copies issued run by run, the first
    # group prepared while the plan check travels); then rank 1's shards move (new rows: what
    # was prepared during the check is dropped, and prepared again from the new rows).
    for seed, dtype, vote, can_map in ((0, None, True, True), (1, torch.bfloat16, True, True), (2, None, True, True),
                                       (3, None, True, False), (4, torch.bfloat16, False, True), (5, None, True, True),
                                       (6, None, True, True), (7, None, True, True)):  # fmt: skip
        state["shift"] = 4096 if seed == 7 else 0
        full = _full(seed)
        place = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}
        sd = {n: t if LAYOUT[n][2] == "plain" else distribute_tensor(t, mesh, place[LAYOUT[n][2]])
              for n, t in full.items()}  # fmt: skip
        state.update(vote=vote or rank == 0, map=can_map, copies=0)
        entries = plan(sd, dtype, None, True)
        shards = [e for e in entries if e.how == "shard"]
        # Rank 1's piece of each shard entry, where the stand-in "maps" it (as stored: not cast).
        state["pieces"] = {(k << 20) + state["shift"]: full[e.source_name].narrow(e.shard.dim, e.shard.sizes[0], e.shard.sizes[1])
                           for k, e in enumerate(shards)}  # fmt: skip
        gatherers.clear()
        warnings.clear()
        exchanges.clear()
        try:
            # The last two with buffers that hold every tensor whole (as the cached layout must).
            buf = BUF if seed < 5 else 4 * BUF
            stats = send_model(sd, group, dtype=dtype, packed_buffer_size_bytes=buf, timeout_s=30)
            result = None if stats is None else stats.num_tensors
        except TransferError as e:
            result = f"TransferError: {e}"
        g = gatherers[0]
        want = {n: digest(t.to(dtype) if dtype is not None and t.is_floating_point() else t) for n, t in full.items()}
        out.append({"result": result, "copies": state["copies"], "peer_reads": g.peer_reads, "exchanges": len(exchanges),
                    "posted": g.posted_groups, "warnings": list(warnings), "want": want,
                    "prefilled": g.prefilled, "late": g.issued_late, "launched": g.launched,
                    "early": g.early})  # fmt: skip
    # A status group the caller drops is let go, with what the sender keeps for it: the last
    # update's DONE post and the rows it mapped.
    import gc
    import weakref

    kept = {"told": twin in torchxfer.lockstep._told, "mapped": twin in torchxfer.lockstep.mapped}
    ref = weakref.ref(twin)
    dist.destroy_process_group(twin)
    twin = None
    gatherers.clear()
    gc.collect()
    kept.update(released=ref() is None, left=len(torchxfer.lockstep._told) + len(torchxfer.lockstep.mapped))
    out.append(kept)
    return _close(out, group, "cpu")


def _close(out: list, group: object, device: str) -> list:
    """A trainer rank's last step: its own group still works (2.0 appended), then shut down."""
    import torch.distributed as dist

    from torchxfer import destroy_side_group

    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    out.append(t.item())
    if group is not None:
        destroy_side_group(group)
    dist.destroy_process_group()
    return out


def _worker(side_port: int, updates: int, refused: int, device: str = "cpu") -> object:
    """One worker: ``updates`` updates, digests of what it loads; it refuses update ``refused``."""
    from torchxfer import (
        NCCLWeightTransferEngine,
        NCCLWeightTransferInitInfo,
        ParallelConfig,
        TransferError,
        WeightTransferConfig,
    )

    if device == "cpu":
        config = WeightTransferConfig(backend="gloo", timeout_s=SIDE_TIMEOUT)
    else:
        torch.cuda.set_device(device)
        config = WeightTransferConfig(backend="nccl", timeout_s=SIDE_TIMEOUT, device=device)
    engine = NCCLWeightTransferEngine(config, ParallelConfig())
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
    got = []
    for update in range(updates):
        batch: dict = {}

        def load(pairs: list, batch: dict = batch, update: int = update) -> None:
            if update == refused:
                raise RuntimeError(f"the server refuses update {refused}")
            batch.update((n, digest(t)) for n, t in pairs)

        try:
            engine.receive_weights(None, load)
            got.append(batch)
        except TransferError as e:
            got.append(f"TransferError: {e}")
    engine.shutdown()
    return got


def _rank(rank: int, side_port: int, trainer_port: int) -> object:
    return _worker(side_port, 8, 2) if rank == 2 else _trainer(rank, side_port, trainer_port)


@pytest.mark.process
def test_the_protocol_around_peer_reads_on_cpu_bit_exact_with_failure_fallback_and_a_no_vote():
    outcomes = run_processes(_rank, 3, free_port(), free_port(), deadline_s=150)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    (t0, t1), worker = [o.value for o in outcomes[:2]], outcomes[2].value
    assert t0[-1] == t1[-1] == 2.0  # the trainer's own group still works
    # The sender kept its last DONE post and mapped rows for the status group, and let both go
    # with the group; rank 1 kept nothing.
    assert t0[-2] == {"told": True, "mapped": True, "released": True, "left": 0}, t0[-2]
    assert t1[-2] == {"told": False, "mapped": False, "released": True, "left": 0}, t1[-2]
    t0, t1 = t0[:-1], t1[:-1]
    shards = sum(1 for n in LAYOUT if LAYOUT[n][2].startswith("shard"))
    for u in (0, 5, 6, 7):  # peer reads: every piece of rank 1 read by the sender, rank 1 posted nothing
        assert worker[u] == t0[u]["want"], u
        assert t0[u]["result"] == len(LAYOUT) and t1[u]["result"] is None
        assert t0[u]["copies"] == t0[u]["peer_reads"] == shards and t0[u]["posted"] > 0, (u, t0[u])
        assert t1[u]["copies"] == 0 and t1[u]["posted"] == 0, t1[u]
        assert not t0[u]["warnings"]
    # The cached layout: every shard gathered into the send buffer, its copies launched run by run.
    assert t0[6]["prefilled"] == t0[6]["late"] == t0[6]["launched"] == shards and t0[5]["late"] == 0, (t0[5], t0[6])
    # Prepared during the plan check: on the cached layout from rows as last mapped (update 6);
    # when rank 1's rows changed (update 7) that preparation is dropped, and the update is
    # prepared and bit-exact all the same, from the new rows.
    assert [t["early"] for t in t0[:-1]] == [False] * 6 + [True, False], [t["early"] for t in t0[:-1]]
    assert t0[7]["prefilled"] == t0[7]["late"] == t0[7]["launched"] == shards, t0[7]
    # A worker's failure under peer reads: TransferError on every rank, rank 1 with the sender's message.
    assert "refuses update 2" in worker[2], worker[2]
    assert t0[2]["result"].startswith("TransferError") and "refuses update 2" in t0[2]["result"], t0[2]
    assert t1[2]["result"].startswith("TransferError") and "trainer rank 0" in t1[2]["result"], t1[2]
    assert "refuses update 2" in t1[2]["result"], t1[2]
    # The sender cannot map: collective gathers, with a warning, bit-exact.
    assert worker[3] == t0[3]["want"] and t0[3]["result"] == len(LAYOUT)
    assert t0[3]["peer_reads"] == 0 and t1[3]["posted"] == t0[3]["posted"] > 0, (t0[3], t1[3])
    assert any("cannot read the other trainer ranks' shards" in w for w in t0[3]["warnings"]), t0[3]["warnings"]
    # Rows travel unless they are exactly those the sender last agreed on and mapped (update 3
    # repeats update 2's rows: the plan check alone carries them, and the sender, now unable to
    # map, still falls back).
    assert [t["exchanges"] for t in t0[:-1]] == [1, 1, 1, 0, 1, 1, 0, 1], [t["exchanges"] for t in t0[:-1]]
    assert [t["exchanges"] for t in t1[:-1]] == [1, 1, 1, 0, 1, 1, 0, 1], [t["exchanges"] for t in t1[:-1]]
    # Rank 1 votes no, or a cast (kept within the memory bound by the collective gathers):
    # collective gathers, no warning, bit-exact.
    for u in (1, 4):
        assert worker[u] == t0[u]["want"] and t0[u]["result"] == len(LAYOUT), u
        assert t0[u]["peer_reads"] == 0 and t1[u]["posted"] > 0 and not t0[u]["warnings"], (t0[u], t1[u])


def _slow_update_rank(rank: int, side_port: int, trainer_port: int, shared_dir: str) -> object:
    """Peer reads (the stand-in, rank 1's pieces in shared files the sender's copies read, as
    CUDA IPC reads rank 1's memory), send_model(timeout_s=2.5), and a worker whose every load
    takes 0.5 s: the update (12 buckets) outlasts the trainer ranks' timeout. Rank 1 behaves
    as a training loop that catches the error: it overwrites its shards at once."""
    import time

    gen = torch.Generator().manual_seed(11)
    full = {f"t{i:02d}": torch.randn(24, 32, generator=gen) for i in range(12)}  # one per 4 KiB bucket
    if rank == 2:
        from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, TransferError
        from torchxfer import WeightTransferConfig

        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=SIDE_TIMEOUT), ParallelConfig())
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 2))
        got: dict = {}

        def load(pairs: list) -> None:
            time.sleep(0.5)
            got.update((n, t.clone()) for n, t in pairs)

        try:
            engine.receive_weights(None, load)
            outcome = "loaded"
        except TransferError as e:
            outcome = f"TransferError: {e}"
        engine.shutdown()
        return outcome, {n: torch.equal(t, full[n]) for n, t in got.items()}

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import torchxfer.lockstep
    from torchxfer import NCCLWeightTransferEngine, TransferError, destroy_side_group, send_model
    from torchxfer.sources import plan

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    mesh = init_device_mesh("cpu", (2,))
    twin = dist.new_group(backend="gloo")
    torchxfer.lockstep.status_group = lambda trainer_group, timeout_s=None: twin
    state = {"vote": True, "map": True, "copies": 0, "pieces": {}, "shift": 0}
    _stand_in(rank, state)
    sd = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
    shards = [e for e in plan(sd, None, None, True) if e.how == "shard"]
    mine = []
    for k, e in enumerate(shards):  # rank 1's piece of each tensor, in a file both map
        piece = full[e.source_name].narrow(0, e.shard.sizes[0], e.shard.sizes[1]).contiguous()
        path = f"{shared_dir}/{k}"
        if rank == 1:
            torch.from_file(path, shared=True, size=piece.numel(), dtype=piece.dtype).copy_(piece.reshape(-1))
        dist.barrier()
        mapped = torch.from_file(path, shared=True, size=piece.numel(), dtype=piece.dtype)
        mine.append(mapped)
        state["pieces"][k << 20] = mapped.view(piece.shape)
    copied_at: list[float] = []
    copy = peer_reads.copy_bytes

    def timed(*args: object) -> None:
        copied_at.append(time.monotonic())
        copy(*args)

    peer_reads.copy_bytes = timed
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=side_port, world_size=2),
                                                      backend="gloo", timeout_s=SIDE_TIMEOUT)  # fmt: skip
    try:
        send_model(sd, group, packed_buffer_size_bytes=4096, timeout_s=2.5)
        outcome = "sent"
    except TransferError as e:
        outcome = f"TransferError: {e}"
        if rank == 1:  # the training loop goes on: its optimizer step writes the shards
            for m in mine:
                m.fill_(7.0)
    gave_up = time.monotonic()
    if group is not None:
        destroy_side_group(group)
    return outcome, gave_up, copied_at


@pytest.mark.process
def test_an_update_that_outlasts_timeout_s_under_peer_reads_stops_reading_before_the_others_give_up(tmp_path):
    """Rank 1 waits once for the sender's outcome, bounded by send_model's timeout_s; past
    that it returns, and its caller may overwrite its shards. The sender must not read them
    after that: it stops short of that deadline (a quarter of timeout_s, at most a second,
    before it), aborting the update for the workers. Every rank raises TransferError, every
    copy of rank 1's memory happened before rank 1 gave up, and every tensor the worker
    loaded is the one sent, bit for bit (none carries rank 1's new values)."""
    outcomes = run_processes(_slow_update_rank, 3, free_port(), free_port(), str(tmp_path), deadline_s=120)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    (sent, _, copies), (waited, gave_up, _), (loaded, exact) = [o.value for o in outcomes]
    assert sent.startswith("TransferError") and "timeout_s" in sent, sent
    assert waited.startswith("TransferError"), waited
    assert loaded.startswith("TransferError") and "timeout_s" in loaded, loaded
    assert copies and max(copies) < gave_up, (max(copies) - gave_up, len(copies))
    assert exact and all(exact.values()), exact


# -- process tier, 2 GPUs: the real peer reads ----------------------------------------------------


def _cuda_trainer(rank: int, side_port: int, trainer_port: int, lockstep: str) -> object:
    import os

    if lockstep == "expandable" and rank == 1:  # rank 1's shards cannot be exported: the sender falls back
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torchxfer import NCCLWeightTransferEngine, TransferError, send_model

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", rank))  # fmt: skip
    trainer_group = dist.new_group(backend="gloo") if lockstep == "gloo" else None
    mesh = init_device_mesh("cuda", (2,))
    warm = torch.ones(1, device="cuda")  # NCCL set up before the worker's first wait starts
    dist.all_reduce(warm)
    distribute_tensor(warm, mesh, [Replicate()])
    gatherers = _record_gatherers()
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=side_port, world_size=2),
                                                      timeout_s=SIDE_TIMEOUT)  # fmt: skip
    out: list = []

    def send(source: object, dtype: torch.dtype | None, want: dict, off: bool = False) -> None:
        os.environ[peer_reads.ENV] = "0" if off else "1"
        gatherers.clear()
        try:
            stats = send_model(source, group, dtype=dtype, packed_buffer_size_bytes=BUF << 4, timeout_s=60,
                               trainer_group=trainer_group)  # fmt: skip
            result = None if stats is None else stats.num_tensors
        except TransferError as e:
            result = f"TransferError: {e}"
        g = gatherers[0]
        out.append({"result": result, "peer_reads": g.peer_reads, "posted": g.posted_groups, "want": want,
                    "mapped": len(peer_reads.Mappings._open)})  # fmt: skip

    place = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}
    for seed, dtype, off in ((0, None, False), (1, torch.bfloat16, False), (2, None, True)):
        full = _full(seed)
        sd = {n: t.cuda() if LAYOUT[n][2] == "plain" else distribute_tensor(t.cuda(), mesh, place[LAYOUT[n][2]])
              for n, t in full.items()}  # fmt: skip
        send(sd, dtype, {n: digest(t.to(dtype) if dtype and t.is_floating_point() else t) for n, t in full.items()},
             off)  # fmt: skip
    # A fully_shard net trained between updates (uneven rows, fp32, the last update cast to bf16);
    # the third update fails at the worker.
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(24, 301), torch.nn.ReLU(), torch.nn.Linear(301, 9)).cuda()
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(5):
        net(torch.randn(5, 24, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()
        dtype = torch.bfloat16 if step == 4 else None
        send(net, dtype, {n: digest(p.full_tensor().to(dtype or p.dtype)) for n, p in net.state_dict().items()})
    return _close(out, group, "cuda")


def _cuda_rank(rank: int, side_port: int, trainer_port: int, lockstep: str) -> object:
    return _worker(side_port, 8, 5, "cuda:1") if rank == 2 else _cuda_trainer(rank, side_port, trainer_port, lockstep)


@pytest.mark.process
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")
@pytest.mark.parametrize("lockstep", ["gloo", "default-group", "expandable"])
def test_peer_reads_between_two_gpus_bit_exact_with_a_failure_and_the_switch(lockstep):
    outcomes = run_processes(_cuda_rank, 3, free_port(), free_port(), lockstep, deadline_s=240)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    (t0, t1), worker = [o.value for o in outcomes[:2]], outcomes[2].value
    assert t0[-1] == t1[-1] == 2.0
    for u in range(8):
        if u == 5:  # refused at the worker: every trainer rank raises
            assert "refuses update 5" in worker[u] and "refuses update 5" in t0[u]["result"], (worker[u], t0[u])
            assert t1[u]["result"].startswith("TransferError"), t1[u]
        else:
            assert worker[u] == t0[u]["want"], u
        # Update 2: switched off on both ranks; updates 1 and 7 cast, which peer reads leave to collectives.
        peer = lockstep != "expandable" and u not in (1, 2, 7)
        assert (t0[u]["peer_reads"] > 0) == peer and (t1[u]["posted"] == 0) == peer, (u, t0[u], t1[u])
    # Mappings stay bounded: only the allocations the last update named are mapped.
    assert max(t["mapped"] for t in t0[:-1]) <= 40, [t["mapped"] for t in t0[:-1]]


def _dying_rank(rank: int, side_port: int, trainer_port: int) -> object:
    """Rank 1 leaves after one update under peer reads (the sender did not wait for the final
    status exchange); the sender's next call must end in TransferError, within its timeout."""
    import os
    import time

    if rank == 2:
        return _worker(side_port, 1, -1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from torchxfer import NCCLWeightTransferEngine, TransferError, destroy_side_group, send_model
    from torchxfer.sources import plan

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    mesh = init_device_mesh("cpu", (2,))
    state = {"vote": True, "map": True, "copies": 0, "pieces": {}, "shift": 0}
    _stand_in(rank, state)
    full = {n: t for n, t in _full(7).items() if LAYOUT[n][2] == "shard0"}
    sd = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
    shards = [e for e in plan(sd, None, None, True) if e.how == "shard"]
    state["pieces"] = {k << 20: full[e.source_name].narrow(0, e.shard.sizes[0], e.shard.sizes[1])
                       for k, e in enumerate(shards)}  # fmt: skip
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=side_port, world_size=2),
                                                      backend="gloo", timeout_s=SIDE_TIMEOUT)  # fmt: skip
    first = send_model(sd, group, packed_buffer_size_bytes=4 * BUF, timeout_s=5)
    if rank == 1:
        os._exit(0)  # gone, as a crashed trainer rank would be
    start = time.monotonic()
    try:
        send_model(sd, group, packed_buffer_size_bytes=4 * BUF, timeout_s=5)
        second = "returned"
    except TransferError as e:
        second = f"TransferError: {e}"
    elapsed = time.monotonic() - start
    destroy_side_group(group)
    return first.num_tensors, second, elapsed, state["copies"]


@pytest.mark.process
def test_a_trainer_rank_that_dies_after_a_peer_read_update_fails_the_senders_next_call():
    outcomes = run_processes(_dying_rank, 3, free_port(), free_port(), deadline_s=90, expect_ok=False)
    assert outcomes[0].error is None, f"rank 0: {outcomes[0].error}\n{outcomes[0].tb}"
    assert outcomes[2].error is None, f"worker: {outcomes[2].error}\n{outcomes[2].tb}"
    num_tensors, second, elapsed, copies = outcomes[0].value
    shards = sum(1 for n in LAYOUT if LAYOUT[n][2] == "shard0")
    assert num_tensors == shards and copies == shards  # the first update was read from rank 1's memory
    want = {n: digest(t) for n, t in _full(7).items() if LAYOUT[n][2] == "shard0"}
    assert outcomes[2].value == [want]
    assert second.startswith("TransferError") and "trainer group" in second, second
    assert elapsed < 15, elapsed
