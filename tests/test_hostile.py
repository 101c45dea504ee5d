"""Hostile input (issue 10, items 4-6), thread tier: every hostile value a peer can send
becomes an agreed TransferError on every rank, within the timeout, and nothing wrong loads.

Hostile peers are driven by hand: a fake trainer posts its own rows and table frames
through :class:`torchxfer.control.ControlChannel` (:class:`FakeTrainer`); a hostile worker
is a real receiver whose rows are rewritten. Honest ranks run the public API. Each world
runs under :func:`tests.harness.run_threads` (deadline ``DEADLINE``), with the library's
``timeout_s`` (``TIMEOUT``) well below it.

Also: header frames carry exactly the frame (no uninitialised bytes); a generator may
reuse one staging tensor (CPU, and CUDA when present); strangers who connect to a
formed group's listeners grow no file descriptor.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests import harness
from tests.harness import ADDR, gloo_trainer, gloo_worker
from torchxfer import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
    TransferError,
    destroy_side_group,
    side_group,
)
from torchxfer import control as control_mod
from torchxfer import receiver as receiver_mod
from torchxfer import wire
from torchxfer.control import ControlChannel
from torchxfer.group import SideGroup
from torchxfer.packing import TensorSpec
from torchxfer.plan import BucketPlan, first_bucket
from torchxfer.sender import SenderState
from torchxfer.wire import FLAG_PACKED, Kind, make_row

TIMEOUT = 5.0
SLOW_TIMEOUT = 15.0
"""For the round trips of megabytes: they check what arrives, not how fast (ranks share two cores)."""
DEADLINE = 60.0


# -- worlds ----------------------------------------------------------------------------------


def trainer(port: int, world: int, timeout: float = TIMEOUT) -> Any:
    return gloo_trainer(port, world, timeout=timeout)


def worker(rank: int, port: int, world: int, device: str | None = None,
           timeout: float = TIMEOUT) -> NCCLWeightTransferEngine:  # fmt: skip
    return gloo_worker(rank, port, world, timeout=timeout, device=device, dp=True)


def run_world(body: Callable[[int, int], Any], world: int) -> list[Any]:
    return harness.run_world(body, world, deadline_s=DEADLINE)


def model(seed: int, n: int = 4, numel: int = 150) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(numel + i, generator=gen)) for i in range(n)]


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).tolist())


def same(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> bool:
    return [(n, t.dtype, tuple(t.shape), raw(t)) for n, t in got] == \
        [(n, t.dtype, tuple(t.shape), raw(t)) for n, t in want]  # fmt: skip


class Collector:
    """A load_weights that keeps a copy of every batch (views into a reused buffer)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, torch.Tensor]] = []

    def __call__(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        self.got.extend((name, t.clone()) for name, t in batch)


# -- a fake trainer ---------------------------------------------------------------------------


def frame_of(body: Any) -> bytes:
    """A table frame around ``body`` (a JSON value, or raw bytes), with a correct prefix."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return wire._PREFIX.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 2, 0, len(payload)) + payload


def slot(index: int, name: str, dtype: str, shape: list, start: int, length: int, offset: int) -> list:
    return [index, name, dtype, shape, start, length, offset]


class FakeTrainer:
    """Rank 0 speaking the protocol by hand: rows, frames and payload of its choosing."""

    def __init__(self, pg: Any) -> None:
        self.group = side_group(pg)
        self.channel = ControlChannel(self.group)
        self.steps: list[Any] = []

    def begin(self, *, packed: bool, buffer_size: int = 0, num_buffers: int = 2, update_id: int = 100,
              flags: int | None = None) -> None:  # fmt: skip
        flags = (FLAG_PACKED if packed else 0) if flags is None else flags
        step = self.channel.post(make_row(Kind.BEGIN, update_id, flags, buffer_size, num_buffers, 0, -1), "fake begin")
        self.void_bucket()
        rows = step.rows()
        self.channel.settle(rows, b"", "fake begin")

    def void_bucket(self) -> None:
        """What every trainer sends right after a BEGIN row that does not carry bucket 0:
        void broadcasts of the sizes of the bucket 0 the workers posted ahead, if any."""
        state = SenderState.of(self.group)
        plan = first_bucket(state.layout, state.confirmed != 0)
        for start, end, _ in plan.runs if plan is not None else ():
            work = dist.broadcast(torch.empty(end - start, dtype=torch.uint8), group=self.group.pg, group_src=0,
                                  async_op=True)  # fmt: skip
            self.group.wait(work, "fake void payload", data=True)

    def table(self, bucket: int, frame: bytes, *, last: int = 1, frame_bytes: int | None = None) -> None:
        """TABLE row, then exactly ``frame_bytes`` bytes (the frame cut or padded), then SYNC;
        raises the workers' agreed TransferError if they rejected it."""
        n = len(frame) if frame_bytes is None else frame_bytes
        self.steps.append(self.channel.post(make_row(Kind.TABLE, bucket, last, 0, n), "fake table"))
        self.channel.send_frame((frame + bytes(max(0, n - len(frame))))[:n], "fake frame")
        rows = self.channel.post(make_row(Kind.SYNC), "fake check").rows()
        self.channel.settle(rows, b"", "fake check")

    def payload(self, slots: tuple, buffer_size: int | None, data: torch.Tensor, bucket: int) -> None:
        """The bucket's broadcasts, as the planner lays them out, filled from ``data``."""
        plan = BucketPlan.make(bucket, slots, buffer_size, backend="gloo")
        for start, end, _ in plan.runs:
            work = dist.broadcast(data[start:end].clone(), group=self.group.pg, group_src=0, async_op=True)
            self.group.wait(work, "fake payload", data=True)


def hostile_trainer_world(cases: list[Callable[[FakeTrainer], None]], world: int = 3,
                          info: Callable[[], Any] | None = None) -> list[Any]:  # fmt: skip
    """A good update, then each case from a fake trainer, then a good update again.

    Returns, per rank, the list of (message, loads during the case, weights_version after it).
    Every case must end in a TransferError on every rank that leaves the group usable.
    """
    first, final = model(1), model(2)

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world)
            out = []
            try:
                NCCLWeightTransferEngine.trainer_send_weights(first, pg, packed=True)
                fake = FakeTrainer(pg)
                for case in cases:
                    with pytest.raises(TransferError) as err:
                        case(fake)
                    out.append(str(err.value))
                NCCLWeightTransferEngine.trainer_send_weights(final, pg, packed=True)
            finally:
                destroy_side_group(pg)
            return out
        engine = worker(rank, port, world)
        out = []
        try:
            load = Collector()
            engine.receive_weights(None, load)
            assert same(load.got, first)
            for _ in cases:
                load = Collector()
                with pytest.raises(TransferError) as err:
                    engine.receive_weights(info() if info else None, load)
                assert not err.value.broken, err.value
                out.append((str(err.value), load.got, engine.weights_version))
            load = Collector()
            engine.receive_weights(None, load)
            assert same(load.got, final) and engine.weights_version == 1
        finally:
            engine.shutdown()
        return out

    return run_world(body, world)


def unpacked(body: Any, **table: Any) -> Callable[[FakeTrainer], None]:
    def case(fake: FakeTrainer) -> None:
        fake.begin(packed=False)
        fake.table(0, frame_of(body), **table)
    return case


def packed(body: Any, buffer_size: int = 1024, **table: Any) -> Callable[[FakeTrainer], None]:
    def case(fake: FakeTrainer) -> None:
        fake.begin(packed=True, buffer_size=buffer_size)
        fake.table(0, frame_of(body), **table)
    return case


def one(*slots: list) -> dict:
    return {"index": 0, "slots": list(slots)}


GOOD = slot(0, "w0", "float32", [4], 0, 16, 0)

# (case, a fragment every rank's message must contain)
TABLE_CASES = {
    "unpacked bucket with no slots": (unpacked({"index": 0, "slots": []}), "not a list of 1 to"),
    "unpacked slot of 2**40 bytes": (unpacked(one(slot(0, "w", "uint8", [1 << 40], 0, 1 << 40, 0))), "cannot allocate"),
    "packed slot of 2**40 bytes": (packed(one(slot(0, "w", "uint8", [1 << 40], 0, 1 << 40, 0)), buffer_size=1 << 41),
                                   "cannot allocate"),
    "split tensor of 2**40 bytes": (packed(one(slot(0, "w", "uint8", [1 << 40], 0, 1024, 0))), "cannot allocate"),
    "unpacked bucket over its byte cap": (unpacked(one(slot(0, "a", "uint8", [200 << 20], 0, 200 << 20, 0),
                                                       slot(1, "b", "uint8", [100 << 20], 0, 100 << 20, 0))),
                                          "more than"),
    "split continued in the same bucket": (packed(one(slot(0, "w", "uint8", [2048], 0, 512, 0),
                                                      slot(0, "w", "uint8", [2048], 512, 512, 512))),
                                           "not the bucket's last slot"),
    "frame index is another bucket": (packed({"index": 1, "slots": [GOOD]}), "where bucket 0 was due"),
    "frame longer than it declares": (packed(one(GOOD), frame_bytes=len(frame_of(one(GOOD))) + 5), "disagree"),
    "frame shorter than it declares": (packed(one(GOOD), frame_bytes=len(frame_of(one(GOOD))) - 3), "truncated"),
    "not JSON": (packed(b"\xff\xfe{"), "not JSON"),
    "dtype float128": (packed(one(slot(0, "w", "float128", [4], 0, 16, 0))), "not a supported torch dtype"),
    "dtype as a number": (packed(one(slot(0, "w", 7, [4], 0, 16, 0))), "dtype name must be a string"),
    "dtype torch.nn": (packed(one(slot(0, "w", "torch.nn", [4], 0, 16, 0))), "not a supported torch dtype"),
    "dtype qint8": (packed(one(slot(0, "w", "qint8", [4], 0, 16, 0))), "not a supported torch dtype"),
    "negative dimension": (packed(one(slot(0, "w", "float32", [-1], 0, 16, 0))), "shape[0]"),
    "dimension of 2**63": (packed(one(slot(0, "w", "float32", [1 << 63], 0, 16, 0))), "shape[0]"),
    "dimension as a string": (packed(one(slot(0, "w", "float32", ["4"], 0, 16, 0))), "shape[0]"),
    "dimension as a bool": (packed(one(slot(0, "w", "float32", [True], 0, 4, 0))), "shape[0]"),
    "65 dimensions": (packed(one(slot(0, "w", "float32", [1] * 65, 0, 4, 0))), "bad shape"),
    "tensor of 2**93 bytes": (packed(one(slot(0, "w", "float32", [1 << 31] * 3, 0, 16, 0))), "too large"),
    "misaligned offset": (packed(one(slot(0, "w", "float32", [4], 0, 16, 8))), "misaligned"),
    "negative offset": (packed(one(slot(0, "w", "float32", [4], 0, 16, -16))), "'offset'"),
    "offset past the buffer": (packed(one(slot(0, "w", "float32", [4], 0, 16, 1024))), "past the buffer"),
    "overlapping slots": (packed(one(GOOD, slot(1, "w1", "float32", [4], 0, 16, 0))), "overlaps"),
    "slot outside its tensor": (packed(one(slot(0, "w", "float32", [4], 8, 16, 0))), "outside the tensor"),
    "tensors out of order": (packed(one(slot(5, "w", "float32", [4], 0, 16, 0))), "out of order"),
}


def test_every_hostile_table_is_an_agreed_error_and_nothing_loads():
    names = list(TABLE_CASES)
    values = hostile_trainer_world([TABLE_CASES[n][0] for n in names])
    for rank, per_rank in enumerate(values):
        for name, result in zip(names, per_rank):
            message = result if rank == 0 else result[0]
            assert TABLE_CASES[name][1] in message, f"rank {rank}, {name}: {message}"
            if rank:
                _, loads, version = result
                assert loads == [] and version == 0, (name, loads, version)
    # The agreed message is the same on every rank.
    for i, name in enumerate(names):
        tail = {re.sub(r"^.*?failed: ", "", v[i] if r == 0 else v[i][0]) for r, v in enumerate(values)}
        assert len(tail) == 1, (name, tail)


def test_reused_bucket_index_and_stray_split_continuation_are_agreed_errors():
    """Bucket 0 arrives whole (a split tensor's head, with its payload); then bucket 1's table
    reuses index 0, or continues the split tensor from the wrong byte."""
    head = slot(0, "w", "uint8", [2048], 0, 1024, 0)

    def after_head(second: dict) -> Callable[[FakeTrainer], None]:
        def case(fake: FakeTrainer) -> None:
            fake.begin(packed=True, buffer_size=1024)
            fake.table(0, frame_of(one(head)), last=0)
            spec = TensorSpec("w", torch.uint8, (2048,))
            from torchxfer.packing import Slot
            fake.payload((Slot(0, 0, spec, 0, 1024, 0),), 1024, torch.arange(1024, dtype=torch.int64).to(torch.uint8), 0)
            fake.table(1, frame_of(second))
        return case

    cases = [
        after_head({"index": 0, "slots": [head]}),  # bucket index reused
        after_head({"index": 1, "slots": [slot(0, "w", "uint8", [2048], 512, 1024, 0)]}),  # from the wrong byte
        after_head({"index": 1, "slots": [slot(1, "v", "uint8", [16], 0, 16, 0)]}),  # the split tensor dropped
    ]
    values = hostile_trainer_world(cases)
    wants = ["where bucket 1 was due", "does not continue", "does not continue"]
    for rank, per_rank in enumerate(values):
        for want, result in zip(wants, per_rank):
            message = result if rank == 0 else result[0]
            assert want in message, (rank, message)
            if rank:
                assert result[1] == [] and result[2] == 0


@pytest.mark.parametrize("row", [
    pytest.param((Kind.BEGIN, 100, 0xFF, 0, 2, 0, -1), id="begin-flags"),
    pytest.param((Kind.BEGIN, 100, FLAG_PACKED, -16, 2, 0, -1), id="begin-negative-buffer"),
    pytest.param((Kind.BEGIN, 100, FLAG_PACKED, 1024, 1000, 0, -1), id="begin-1000-buffers"),
    pytest.param((Kind.BEGIN, -1, 0, 0, 2, 0, -1), id="begin-negative-update-id"),
    pytest.param((Kind.END, 5, 0), id="end-without-begin"),
])  # fmt: skip
def test_hostile_trainer_row_breaks_the_group_on_every_worker_at_once(row):
    """A trainer row outside the protocol: the ranks cannot agree on what follows, so each
    worker raises TransferError(broken=True) at that row, well within the timeout."""
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world)
            try:
                ControlChannel(side_group(pg)).post(make_row(*row), "fake").rows()
            finally:
                destroy_side_group(pg)
            return None
        engine = worker(rank, port, world)
        try:
            load = Collector()
            with pytest.raises(TransferError) as err:
                engine.receive_weights(None, load)
            return str(err.value), err.value.broken, load.got, engine.weights_version
        finally:
            engine.shutdown()

    for message, broken, loads, version in run_world(body, world)[1:]:
        assert broken and "the trainer" in message and loads == [] and version is None, message


# -- a hostile worker -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [-1, 1 << 40, (64 << 10) + 1])
def test_hostile_worker_status_length_is_an_agreed_error(monkeypatch, status):
    """Worker 2 declares an error length outside [1, 64 KiB] in its rows: every rank raises
    the same TransferError naming it, at the first update (the trainer waits for BEGIN) and
    mid-update in the steady state (the trainer reads the status late and aborts), with no
    broadcast of that length; the honest worker's version does not move; the group stays usable."""
    world, hostile = 3, {"on": False}
    real_row = receiver_mod.Receiver.row

    def row(self: Any) -> list[int]:
        words = real_row(self)
        if hostile["on"] and self.group.rank() == 2:
            words[2] = status
        return words

    monkeypatch.setattr(receiver_mod.Receiver, "row", row)
    # update 0 hostile (blocking BEGIN), 1 and 2 good (2 from the cached layout), 3 hostile (cached), 4 good
    plan = [True, False, False, True, False]
    send = dict(packed=True, packed_buffer_size_bytes=1024)
    barrier = threading.Barrier(world)

    def body(rank: int, port: int) -> Any:
        out = []
        if rank == 0:
            pg = trainer(port, world)
            try:
                for step, bad in enumerate(plan):
                    barrier.wait(DEADLINE)
                    hostile["on"] = bad
                    barrier.wait(DEADLINE)
                    if bad:
                        with pytest.raises(TransferError) as err:
                            NCCLWeightTransferEngine.trainer_send_weights(model(step), pg, **send)
                        out.append(str(err.value))
                    else:
                        NCCLWeightTransferEngine.trainer_send_weights(model(step), pg, **send)
            finally:
                destroy_side_group(pg)
            return out
        engine = worker(rank, port, world)
        try:
            for step, bad in enumerate(plan):
                barrier.wait(DEADLINE)
                barrier.wait(DEADLINE)
                before, load = engine.weights_version, Collector()
                if bad:
                    with pytest.raises(TransferError) as err:
                        engine.receive_weights(None, load)
                    assert not err.value.broken
                    # Whatever loaded before the abort are the trainer's true bytes (torn, not wrong).
                    assert all(raw(t) == raw(dict(model(step))[n]) for n, t in load.got)
                    out.append((str(err.value), before, engine.weights_version))
                else:
                    engine.receive_weights(None, load)
                    assert same(load.got, model(step))
        finally:
            engine.shutdown()
        return out

    values = run_world(body, world)
    for rank, per_rank in enumerate(values):
        assert len(per_rank) == 2
        for result in per_rank:
            message = result if rank == 0 else result[0]
            assert f"[rank 2] (declared an invalid error length {status})" in message, (rank, message)
            if rank:
                assert result[1] == result[2], result  # weights_version did not move


# -- lone surrogates in names and messages --------------------------------------------------------

ODD = "layer.\udc80.weight"


@pytest.mark.parametrize("where", ["round-trip", "update-info", "load-weights", "source"])
def test_lone_surrogate_in_a_name_or_message(where):
    world = 3
    tensors = [(ODD, torch.arange(6, dtype=torch.float32)), ("w", torch.arange(3, dtype=torch.int64))]

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        yield tensors[0]
        if where == "source":
            raise ValueError(f"cannot gather {ODD}")
        yield tensors[1]

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world)
            try:
                if where == "round-trip":
                    NCCLWeightTransferEngine.trainer_send_weights(source(), pg, packed=True)
                    return "ok"
                with pytest.raises(ValueError if where == "source" else TransferError) as err:
                    NCCLWeightTransferEngine.trainer_send_weights(source(), pg, packed=True)
                return str(err.value)
            finally:
                destroy_side_group(pg)
        engine = worker(rank, port, world)
        try:
            info = None
            if where == "update-info":
                info = NCCLWeightTransferUpdateInfo.from_named_tensors(
                    [(ODD + "\ud800", tensors[0][1]), tensors[1]], packed=True)

            load = Collector()

            def loader(batch: list) -> None:
                if where == "load-weights" and rank == 2:
                    raise KeyError(f"no parameter {ODD}")
                load(batch)

            if where == "round-trip":
                engine.receive_weights(info, loader)
                assert same(load.got, tensors)
                return "ok"
            with pytest.raises(TransferError) as err:
                engine.receive_weights(info, loader)
            assert engine.weights_version is None
            return str(err.value)
        finally:
            engine.shutdown()

    values = run_world(body, world)
    if where == "round-trip":
        assert values == ["ok"] * world
        return
    for rank, message in enumerate(values):
        if rank == 0 and where == "source":
            assert ODD in message, message  # the trainer gets its source's own error
        else:
            assert "udc80" in message, message  # escaped on the way, never an encoding error
        message.encode("utf-8", "backslashreplace")


# -- header frames carry exactly the frame --------------------------------------------------------


def test_header_frames_carry_exactly_the_frame(monkeypatch):
    """Every broadcast on the control group from the trainer is one well-formed frame, byte for
    byte (re-encoding its decoded table gives the same bytes), and each worker receives into
    exactly that many bytes; a marker planted in freed trainer memory never travels."""
    world = 3
    marker = b"SECRET-MARKER-0123456789"
    sent: list[bytes] = []
    received: list[int] = []
    lock = threading.Lock()
    real = SideGroup.control_broadcast
    controls: dict = {}

    def spy(group: SideGroup, tensor: torch.Tensor, src: int) -> Any:
        if group.control in controls and src == 0:
            with lock:
                if controls[group.control] == 0:
                    sent.append(bytes(tensor.tolist()))
                else:
                    received.append(tensor.numel())
        return real(group, tensor, src)

    monkeypatch.setattr(SideGroup, "control_broadcast", spy)

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world)
            controls[side_group(pg).control] = 0
            try:
                for step in range(3):  # each a new layout: names change
                    planted = torch.frombuffer(bytearray(marker * 100_000), dtype=torch.uint8).clone()
                    del planted
                    pairs = [(f"s{step}.{n}", t) for n, t in model(step, n=30)]
                    NCCLWeightTransferEngine.trainer_send_weights(pairs, pg, packed=True, packed_buffer_size_bytes=4096)
            finally:
                destroy_side_group(pg)
            return None
        engine = worker(rank, port, world)
        controls[side_group(engine.model_update_group).control] = rank
        try:
            for step in range(3):
                engine.receive_weights(None, Collector())
        finally:
            engine.shutdown()
        return None

    run_world(body, world)
    assert sent, "no frame was broadcast"
    for data in sent:
        assert wire.encode(wire.decode(data)) == data
        assert marker[:8] not in data
    assert sorted(received) == sorted([len(d) for d in sent] * (world - 1))


# -- a generator that reuses one staging tensor ---------------------------------------------------


def one_stage(pairs: list[tuple[str, torch.Tensor]], device: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor yielded through the same staging memory, refilled for each."""
    stage = torch.empty(max(t.numel() * t.element_size() for _, t in pairs), dtype=torch.uint8, device=device)
    for name, t in pairs:
        view = stage[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        yield name, view


def staging_model(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        out.append((f"small{i}", torch.randn(7, 5, generator=gen)))
        out.append((f"large{i}", torch.randn(1 << 19, generator=gen).half()))  # 1 MiB: travels alone
        out.append((f"split{i}", torch.randint(-(2**31), 2**31 - 1, (3 << 17,), generator=gen, dtype=torch.int32)))
    return out


def staging_round_trips(device: str, send: dict) -> None:
    world, updates = 3, 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world, timeout=SLOW_TIMEOUT)
            try:
                for step in range(updates):
                    NCCLWeightTransferEngine.trainer_send_weights(one_stage(staging_model(step), device), pg, **send)
            finally:
                destroy_side_group(pg)
            return None
        engine = worker(rank, port, world, device=None if device == "cpu" else device, timeout=SLOW_TIMEOUT)
        try:
            for step in range(updates):
                load = Collector()
                engine.receive_weights(None, load)
                assert same(load.got, staging_model(step)), f"rank {rank} update {step}"
        finally:
            engine.shutdown()
        return None

    run_world(body, world)


MODES = [
    pytest.param(dict(packed=True, packed_buffer_size_bytes=1 << 20, zero_copy=True), id="packed-zero-copy"),
    pytest.param(dict(packed=True, packed_buffer_size_bytes=1 << 20, zero_copy=False), id="packed"),
    pytest.param(dict(packed=False), id="unpacked"),
]


@pytest.mark.parametrize("send", MODES)
def test_one_staging_tensor_arrives_as_each_value_yielded_cpu(send):
    staging_round_trips("cpu", send)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("send", MODES)
def test_one_staging_tensor_arrives_as_each_value_yielded_cuda(send):
    """CUDA staging memory refilled on the current stream while earlier sends may still read it."""
    staging_round_trips("cuda", send)


# -- strangers after formation ----------------------------------------------------------------------

STRANGER = r"""
import selectors, socket, sys
ports = [int(p) for p in sys.argv[1:]]
socks = []
for port in ports:
    for _ in range(__N__):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
connected = set()
sel = selectors.DefaultSelector()  # epoll: no limit on descriptor numbers, unlike select()
for s in socks:
    sel.register(s, selectors.EVENT_WRITE)
pending = len(socks)
import time
end = time.monotonic() + 1.0
while pending and time.monotonic() < end:
    for key, _ in sel.select(max(0.0, end - time.monotonic())):
        s = key.fileobj
        sel.unregister(s)
        pending -= 1
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            connected.add(s)
            try:
                s.send(b"\x00" * 8 + b"junk" * 256)
            except OSError:
                pass
print(len(connected), flush=True)
sys.stdin.readline()
"""


def listening_ports() -> list[int]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.append(int(fields[1].split(":")[1], 16))
    return ports


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors in /proc")
def test_strangers_connecting_after_formation_grow_no_file_descriptor():
    """A stranger opens 50 connections to every port this process listens on (the group's Gloo
    listeners) and to the store's port, and writes junk: none is accepted, the process holds
    no more descriptors while the stranger keeps them open or after it leaves, the store is
    gone, and the group still works."""
    world, n = 2, 50
    # Groups of earlier tests in this process that are only kept by reference cycles (exceptions
    # their ranks returned) still listen until collected, and a group closed while a Gloo
    # collective was posted keeps its backends on a thread of torchxfer's for its timeout
    # (group.SideGroup.close): let those go, then collect, so that the stranger meets this
    # test's group alone and no other descriptor closes while this one counts.
    for thread in threading.enumerate():
        if thread.name == "torchxfer-release":
            thread.join(DEADLINE / 2)
    gc.collect()
    ready, done = threading.Barrier(world), threading.Barrier(world)
    seen: dict = {}

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world)
            try:
                ready.wait(DEADLINE)
                done.wait(DEADLINE)
                NCCLWeightTransferEngine.trainer_send_weights(model(7), pg, packed=True)
            finally:
                destroy_side_group(pg)
            return None
        engine = worker(rank, port, world)
        try:
            ready.wait(DEADLINE)
            ports = listening_ports()
            seen["listeners"] = len(ports)
            before = len(os.listdir("/proc/self/fd"))
            code = STRANGER.replace("__N__", str(n))
            proc = subprocess.Popen([sys.executable, "-c", code, *map(str, ports + [port])],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
            try:
                seen["connected"] = int(proc.stdout.readline())
                seen["during"] = len(os.listdir("/proc/self/fd")) - 2  # our two pipes to the stranger
            finally:
                proc.stdin.write("\n")
                proc.stdin.close()
                proc.wait(10)
                proc.stdout.close()
            seen["before"], seen["after"] = before, len(os.listdir("/proc/self/fd"))
            with pytest.raises(OSError):
                socket.create_connection((ADDR, port), timeout=1).close()
            done.wait(DEADLINE)
            load = Collector()
            engine.receive_weights(None, load)
            assert same(load.got, model(7))
        finally:
            engine.shutdown()
        return None

    run_world(body, world)
    assert seen["listeners"] >= 2, seen  # each rank's payload and control listeners
    assert seen["connected"] == 0, seen
    assert seen["during"] == seen["before"] == seen["after"], seen


def test_a_worker_error_shorter_than_its_row_declares_carries_no_stray_bytes(monkeypatch):
    """Worker 2's row declares a 10-byte error, then its error broadcast carries 3 bytes (Gloo
    accepts a shorter message). Every rank's agreed error holds those 3 bytes and zeros: never
    bytes of its own memory that happened to lie in the receive buffer."""
    world = 3
    real_row, real_settle = receiver_mod.Receiver.row, control_mod.ControlChannel.settle

    def row(self: Any) -> list[int]:
        words = real_row(self)
        if self.group.rank() == 2:
            words[2] = 10  # the error length this rank declares (row word 2: its first argument)
        return words

    def settle(self: Any, rows: list, mine: bytes, what: str) -> None:
        if self.group.rank() == 2 and rows[2].args[0] == 10:
            self._broadcast(control_mod.owned(b"xyz"), "hostile error broadcast", src=2)
            raise TransferError("the hostile worker is done")
        return real_settle(self, rows, mine, what)

    monkeypatch.setattr(receiver_mod.Receiver, "row", row)
    monkeypatch.setattr(control_mod.ControlChannel, "settle", settle)

    def body(rank: int, port: int) -> Any:
        try:
            if rank == 0:
                pg = trainer(port, world)
                try:
                    NCCLWeightTransferEngine.trainer_send_weights(model(0), pg, packed=True)
                finally:
                    destroy_side_group(pg)
            else:
                engine = worker(rank, port, world)
                try:
                    engine.receive_weights(None, Collector())
                finally:
                    engine.shutdown()
        except TransferError as e:
            return str(e)
        return "ok"

    values = run_world(body, world)
    for rank in (0, 1):
        # The zeros each rank posted (escaped: a peer's text is made printable), nothing else.
        assert "[rank 2] xyz" + "\\x00" * 7 in values[rank], (rank, values[rank])
