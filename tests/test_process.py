"""Multi-rank transfer tests, process tier: real processes, each with its own torch.

* A torchrun-like trainer world of 2 ranks (its own default Gloo group; only
  global rank 0 joins the side group) beside DP=2 x TP=2 inference workers
  with ``rank_offset=1`` (side world of 5) that have no default group at all:
  several updates, packed and unpacked, out-of-band and in-band, list and
  generator sources, checked bit-exact by sha256; the default group and direct
  collectives on the side group keep working.
* Group formation errors: port in use, a worker rank outside the world, two
  workers claiming one rank, world sizes that disagree; each raises on every
  rank within a few seconds, and the same processes then form a good group.

Each spawn imports torch (~3 s on the shared 2 cores), so every spawn checks
several things. Processes start together at a barrier, so that ``timeout_s``
bounds hold regardless of import skew.
"""

from __future__ import annotations

import os

import multiprocessing as mp
import socket
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.harness import ADDR, digest, free_port, run_processes
from tests.test_transfer import BUF, DIRECT_BUF, direct_model, generate, zoo
from torchxfer import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
    ParallelConfig,
    TransferError,
    WeightTransferConfig,
    destroy_side_group,
)

pytestmark = pytest.mark.process

TIMEOUT = 5.0
SLACK = 3.0
WORLD_TIMEOUT = 20.0
"""The trainer-world test checks bit-exactness and coexistence, not timing: between
updates the trainer builds its next model while the workers already wait for it, which
on two loaded cores can take longer than TIMEOUT."""
BARRIER_S = 60.0

DP, TP = 2, 2
SIDE_WORLD = 1 + DP * TP

# (packed, out_of_band, source, buffer_size, num_buffers, model)
UPDATES = [
    (True, True, "list", BUF, 2, "zoo"),
    (True, False, "gen", 1000, 3, "zoo"),
    (False, True, "gen", BUF, 2, "zoo"),
    (False, False, "list", BUF, 1, "zoo"),
    (True, False, "gen", DIRECT_BUF, 2, "direct"),
    (True, True, "gen", BUF, 1, "zoo"),  # after the direct collectives on the side group
]
DIRECT_OPS_AFTER = 4  # index of the last update before the direct collectives


# TORCHXFER_TEST_DEVICE=cuda runs the same world with CUDA tensors over Gloo
# (trainer and workers sharing one GPU), exercising the stream logic.
DEVICE = os.environ.get("TORCHXFER_TEST_DEVICE", "cpu")


def _model(step: int) -> list[tuple[str, torch.Tensor]]:
    pairs = zoo(300 + step) if UPDATES[step][5] == "zoo" else direct_model(300 + step)
    return [(n, t.to(DEVICE)) for n, t in pairs]


def _fingerprint(pairs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...], str]]:
    return [(name, str(t.dtype), tuple(t.shape), digest(t)) for name, t in pairs]


def _update_info_dict(step: int) -> dict[str, Any]:
    """The update info as a control plane would carry it: a plain dict."""
    packed, _, _, buf, nb, _ = UPDATES[step]
    info = NCCLWeightTransferUpdateInfo.from_named_tensors(
        _model(step), packed=packed, packed_buffer_size_bytes=buf, packed_num_buffers=nb
    )
    return dict(names=info.names, dtype_names=info.dtype_names, shapes=info.shapes, packed=info.packed,
                packed_buffer_size_bytes=info.packed_buffer_size_bytes, packed_num_buffers=info.packed_num_buffers)  # fmt: skip


def _direct_source() -> torch.Tensor:
    return torch.arange(10, dtype=torch.float64) * 1.5 + 0.25


# -- coexistence: trainer world + DP x TP workers -----------------------------------------------------


def _coexist(proc: int, side_port: int, world_port: int, barrier: Any) -> Any:
    """proc 0, 1: the trainer world (global ranks 0, 1); proc 2..5: workers (dp, tp)."""
    barrier.wait(BARRIER_S)
    if proc < 2:
        return _trainer_rank(proc, side_port, world_port)
    return _worker_rank(proc - 2, side_port)


def _trainer_rank(rank: int, side_port: int, world_port: int) -> Any:
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{world_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    out: dict[str, Any] = {"all_reduce": [], "stats": []}
    group = None
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(
            NCCLWeightTransferInitInfo(ADDR, side_port, 1, SIDE_WORLD), backend="gloo", timeout_s=WORLD_TIMEOUT
        )
        out["side"] = (group.rank(), group.size())
    out["world"] = (dist.get_rank(), dist.get_world_size())
    for step, (packed, _, source, buf, nb, _) in enumerate(UPDATES):
        if rank == 0:
            pairs = _model(step)
            stats = NCCLWeightTransferEngine.trainer_send_weights(
                generate(pairs) if source == "gen" else pairs, group,
                packed=packed, packed_buffer_size_bytes=buf, packed_num_buffers=nb,
            )  # fmt: skip
            out["stats"].append((stats.update_id, stats.num_tensors, stats.num_bytes))
            if step == DIRECT_OPS_AFTER:
                t = _direct_source()
                dist.broadcast(t, group=group, group_src=0)
                s = torch.tensor([float(group.rank() + 1)])
                dist.all_reduce(s, group=group)
                out["direct"] = (digest(t), s.item())
        # The trainer's own default group, between updates.
        t = torch.tensor([rank + 1.0 + step])
        dist.all_reduce(t)
        out["all_reduce"].append(t.item())
    if group is not None:
        destroy_side_group(group)
    t = torch.tensor([10.0 * (rank + 1)])
    dist.all_reduce(t)
    out["all_reduce_after"] = t.item()
    dist.destroy_process_group()
    return out


def _worker_rank(index: int, side_port: int) -> Any:
    dp, tp = divmod(index, TP)
    engine = NCCLWeightTransferEngine(
        WeightTransferConfig(backend="gloo", timeout_s=WORLD_TIMEOUT, device=DEVICE),
        ParallelConfig(data_parallel_rank=dp, rank=tp, tensor_parallel_size=TP, pipeline_parallel_size=1,
                       data_parallel_size=DP),
    )  # fmt: skip
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, SIDE_WORLD))
    group = engine.model_update_group
    out: dict[str, Any] = {"side": (group.rank(), group.size()), "updates": [], "versions": []}
    for step, (_, oob, *_rest) in enumerate(UPDATES):
        got: list[tuple[str, torch.Tensor]] = []
        stats = engine.receive_weights(
            _update_info_dict(step) if oob else None, lambda batch: got.extend((n, t.clone()) for n, t in batch)
        )
        out["updates"].append((_fingerprint(got), (stats.update_id, stats.num_tensors, stats.num_bytes)))
        out["versions"].append((engine.weights_version, engine.torn))
        if step == DIRECT_OPS_AFTER:
            t = torch.full((10,), -7.0, dtype=torch.float64)  # poison
            dist.broadcast(t, group=group, group_src=0)
            s = torch.tensor([float(group.rank() + 1)])
            dist.all_reduce(s, group=group)
            out["direct"] = (digest(t), s.item())
    engine.shutdown()
    out["default_group"] = dist.is_initialized()
    return out


def _retry_on_taken_ports(run: Any) -> Any:
    """Run ``run(ports)`` with fresh ports; once more if a port was taken behind our back."""
    for attempt in range(2):
        outcomes = run()
        taken = any(not o.ok and "in use" in (o.tb or "") for o in outcomes)
        if not taken or attempt == 1:
            return outcomes
    raise AssertionError("unreachable")


def _failures(outcomes: list) -> str:
    return "\n".join(f"--- proc {o.rank} ---\n{o.tb}" for o in outcomes if not o.ok)


def test_trainer_world_beside_dp_tp_workers_bit_exact_and_groups_coexist():
    ctx = mp.get_context("spawn")

    def run() -> list:
        return run_processes(_coexist, 2 + DP * TP, free_port(), free_port(), ctx.Barrier(2 + DP * TP),
                             deadline_s=90, expect_ok=False)  # fmt: skip

    outcomes = _retry_on_taken_ports(run)
    assert all(o.ok for o in outcomes), _failures(outcomes)
    trainer0, trainer1 = outcomes[0].value, outcomes[1].value
    want = [_fingerprint(_model(step)) for step in range(len(UPDATES))]
    want_stats = [(step, len(_model(step)), sum(t.numel() * t.element_size() for _, t in _model(step)))
                  for step in range(len(UPDATES))]  # fmt: skip

    assert trainer0["side"] == (0, SIDE_WORLD)
    assert trainer0["world"] == (0, 2) and trainer1["world"] == (1, 2)
    assert trainer0["stats"] == want_stats
    for t in (trainer0, trainer1):
        assert t["all_reduce"] == [3.0 + 2 * step for step in range(len(UPDATES))]
        assert t["all_reduce_after"] == 30.0
    expected_direct = (digest(_direct_source()), float(sum(range(1, SIDE_WORLD + 1))))
    assert trainer0["direct"] == expected_direct

    for index, out in enumerate(o.value for o in outcomes[2:]):
        dp, tp = divmod(index, TP)
        assert out["side"] == (dp * TP + tp + 1, SIDE_WORLD)
        assert out["default_group"] is False
        assert out["direct"] == expected_direct
        for step, (fingerprint, stats) in enumerate(out["updates"]):
            assert fingerprint == want[step], (index, step, UPDATES[step])
            assert stats == want_stats[step]
        assert out["versions"] == [(step, False) for step in range(len(UPDATES))]


# -- group formation errors ------------------------------------------------------------------------


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((ADDR, port))
    sock.listen(8)
    return sock


def _timed(fn: Any, exc: type) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(exc) as err:
        fn()
    return str(err.value), time.monotonic() - start


def _worker_engine(dp: int, rank: int, tp: int, pp: int, dps: int) -> NCCLWeightTransferEngine:
    return NCCLWeightTransferEngine(
        WeightTransferConfig(backend="gloo", timeout_s=TIMEOUT),
        ParallelConfig(data_parallel_rank=dp, rank=rank, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                       data_parallel_size=dps),
    )  # fmt: skip


def _formation(proc: int, ports: dict[str, int], barrier: Any) -> Any:
    """proc 0: the trainer; proc 1, 2: workers. Scenarios run in step, each starting at the barrier."""
    out: dict[str, Any] = {}
    trainer = lambda port, world: NCCLWeightTransferEngine.trainer_init(  # noqa: E731
        dict(master_address=ADDR, master_port=port, world_size=world), backend="gloo", timeout_s=TIMEOUT
    )

    # 1. The trainer's port is taken (we hold it); workers: a rank outside the world.
    if proc == 0:
        sock = _listening(ports["in_use"])
        try:
            out["in_use"] = _timed(lambda: trainer(ports["in_use"], 2), TransferError)
        finally:
            sock.close()
    else:
        # DP=2 x TP=2: (dp 1, rank 1) + offset 1 = 4, outside a world of 4; with PP: 0*4 + 3 + 2 = 5 >= 5.
        layout, offset, world = ((1, 1, 2, 1, 2), 1, 4) if proc == 1 else ((0, 3, 2, 2, 1), 2, 5)
        sock = _listening(ports[f"outside{proc}"])  # a listener that would see any connection attempt
        try:
            engine = _worker_engine(*layout)
            info = NCCLWeightTransferInitInfo(ADDR, ports[f"outside{proc}"], offset, world)
            out["outside"] = _timed(lambda: engine.init_transfer_engine(info), ValueError)
            sock.setblocking(False)
            try:
                sock.accept()[0].close()
                out["outside_connected"] = True
            except BlockingIOError:
                out["outside_connected"] = False
            out["outside_group"] = engine.model_update_group
        finally:
            sock.close()

    # 2. Two workers claim rank 1 of a world of 3 (rank 2 never comes).
    barrier.wait(BARRIER_S)
    if proc == 0:
        out["duplicate"] = _timed(lambda: trainer(ports["duplicate"], 3), TransferError)
    else:
        engine = _worker_engine(0, 0, 1, 1, 1)
        info = NCCLWeightTransferInitInfo(ADDR, ports["duplicate"], 1, 3)
        out["duplicate"] = _timed(lambda: engine.init_transfer_engine(info), TransferError)
        assert engine.model_update_group is None

    # 3. Worker 1 is told world_size=2, the trainer and worker 2 world_size=3.
    barrier.wait(BARRIER_S)
    if proc == 0:
        out["world_size"] = _timed(lambda: trainer(ports["world_size"], 3), TransferError)
    else:
        engine = _worker_engine(0, proc - 1, 2, 1, 1)
        info = NCCLWeightTransferInitInfo(ADDR, ports["world_size"], 1, 2 if proc == 1 else 3)
        out["world_size"] = _timed(lambda: engine.init_transfer_engine(info), TransferError)

    # 4. The same processes then form a good group and move an update.
    barrier.wait(BARRIER_S)
    pairs = zoo(77)
    if proc == 0:
        group = trainer(ports["ok"], 3)
        NCCLWeightTransferEngine.trainer_send_weights(generate(pairs), group, packed=True, packed_buffer_size_bytes=BUF)
        destroy_side_group(group)
        out["ok"] = None
    else:
        engine = _worker_engine(0, proc - 1, 2, 1, 1)
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, ports["ok"], 1, 3))
        got: list = []
        engine.receive_weights(None, lambda batch: got.extend((n, digest(t)) for n, t in batch))
        engine.shutdown()
        out["ok"] = got
    return out


def test_group_formation_errors_on_every_rank_within_the_timeout():
    ctx = mp.get_context("spawn")

    def run() -> list:
        ports = {k: free_port() for k in ("in_use", "outside1", "outside2", "duplicate", "world_size", "ok")}
        return run_processes(_formation, 3, ports, ctx.Barrier(3), deadline_s=90, expect_ok=False)

    outcomes = _retry_on_taken_ports(run)
    assert all(o.ok for o in outcomes), _failures(outcomes)
    trainer, workers = outcomes[0].value, [o.value for o in outcomes[1:]]

    message, elapsed = trainer["in_use"]
    assert "in use" in message and elapsed < SLACK, trainer["in_use"]

    for w, (rank, world) in zip(workers, ((4, 4), (5, 5))):
        message, elapsed = w["outside"]
        assert f"worker rank {rank}" in message and f"world_size {world}" in message, message
        assert elapsed < 1.0, w["outside"]
        assert w["outside_connected"] is False  # refused before connecting
        assert w["outside_group"] is None

    for out in [trainer, *workers]:
        message, elapsed = out["duplicate"]
        assert "claim rank 1" in message, message
        assert elapsed < TIMEOUT + SLACK, out["duplicate"]

        message, elapsed = out["world_size"]
        assert "world_size=2" in message and "world_size=3" in message, message
        assert elapsed < TIMEOUT + SLACK, out["world_size"]

    want = [(n, digest(t)) for n, t in zoo(77)]
    assert workers[0]["ok"] == want and workers[1]["ok"] == want
