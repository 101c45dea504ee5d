"""Hostile and mistaken layouts, thread tier: a cached layout announced under another
configuration, a name sent twice, allocations a trainer's table asks for, and what a worker
keeps of the frames it received.

Ranks are threads of this process (``tests.harness.run_world``, deadline ``DEADLINE``); every
wait is bounded by the library's ``timeout_s`` (``TIMEOUT``), well below it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.harness import bytes_equal
from tests.test_hostile import TIMEOUT, Collector, FakeTrainer, model, run_world, same, trainer, worker
from tests.test_hostile2 import _ipc_trainer, _ipc_worker
from torchxfer import (
    IPCWeightTransferEngine,
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
    TransferError,
    destroy_side_group,
)
from torchxfer import receiver as receiver_mod
from torchxfer.packing import parse_dtype
from torchxfer.receiver import ReceiverState
from torchxfer.sender import SenderState
from torchxfer.wire import FLAG_CACHED, FLAG_PACKED, Kind, make_row

W = [(f"w{i}", torch.full((4,), float(i + 1))) for i in range(3)]


# -- a cached layout under another configuration ----------------------------------------------


@pytest.mark.parametrize("cached_flag", [True, False], ids=["announced-cached", "agreed-at-begin"])
def test_a_cached_layout_named_under_another_configuration_breaks_the_group_and_loads_nothing(cached_flag):
    """The workers hold an unpacked layout (and packed buffers from an earlier update). A BEGIN
    row names that layout's fingerprint but says packed, 1 MiB buffers: read under that
    configuration, every tensor would be viewed at offset 0 of one buffer, each loading the
    last one's bytes. Each worker raises TransferError(broken=True) at BEGIN instead, whether
    the row announces the layout as cached or every worker's BEGIN row says it holds it; no
    tensor reaches load_weights and the version does not move."""
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world)
            try:
                NCCLWeightTransferEngine.trainer_send_weights(model(1), pg, packed=True)
                for _ in range(2):  # the second one leaves the layout confirmed by every worker
                    NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=False)
                fake = FakeTrainer(pg)
                state = SenderState.of(fake.group)
                flags = FLAG_PACKED | (FLAG_CACHED if cached_flag else 0)
                row = make_row(Kind.BEGIN, 50, flags, 1 << 20, 2, state.layout.fingerprint, 3)
                step = fake.channel.post(row, "fake begin")
                fake.void_bucket()  # the workers posted the confirmed layout's bucket 0 ahead
                step.rows()
            finally:
                destroy_side_group(pg)
            return None
        engine = worker(rank, port, world)
        try:
            for _ in range(3):
                engine.receive_weights(None, Collector())
            version = engine.weights_version
            load = Collector()
            with pytest.raises(TransferError) as err:
                engine.receive_weights(None, load)
            return str(err.value), err.value.broken, load.got, version, engine.weights_version
        finally:
            engine.shutdown()

    for message, broken, loads, before, after in run_world(body, world)[1:]:
        assert broken and "another configuration" in message, message
        assert loads == [] and after == before == 2, (loads, before, after)


# -- a name twice ------------------------------------------------------------------------------


def _duplicates(kind: str) -> tuple[list, list]:
    """(first update, update with a name twice): the second departs from the first's layout
    after its first tensor, so the repeat is found where the layout is planned afresh."""
    a, b = torch.arange(6.0), torch.arange(6.0) + 100
    first = [("w", a), ("v", b)]
    if kind == "same-bucket":
        return first, [("w", a), ("w", b)]
    if kind == "later-bucket":  # in a bucket after the cached layout's last
        return first, [("w", a), ("v", b), ("w", b)]
    return first, [("w", a), ("x", torch.arange(3.0)), ("w", b)]  # departs mid-layout


@pytest.mark.parametrize("kind", ["same-bucket", "later-bucket", "after-departure"])
@pytest.mark.parametrize("mode", ["packed", "unpacked", "colocated"])
def test_a_name_sent_twice_in_one_update_is_a_value_error_and_the_group_stays_usable(mode, kind):
    """A source that yields one name twice: workers could not tell which tensor to load. The
    trainer raises ValueError naming it, every worker an agreed TransferError, nothing of that
    update is loaded, and the next update on the same group arrives bit for bit."""
    first, twice = _duplicates(kind)
    final = [("w", torch.arange(6.0) - 7), ("v", torch.arange(6.0) * 3)]
    kw: dict = {"packed": mode == "packed", "packed_buffer_size_bytes": 64}
    if mode == "colocated":
        kw = {"packed_buffer_size_bytes": 64}
    world = 2

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = _ipc_trainer(port, world) if mode == "colocated" else trainer(port, world)
            send = (IPCWeightTransferEngine if mode == "colocated" else NCCLWeightTransferEngine).trainer_send_weights
            try:
                send(iter(first), pg, **kw)
                with pytest.raises(ValueError, match="'w' comes twice"):
                    send(iter(twice), pg, **kw)
                send(iter(final), pg, **kw)
            finally:
                destroy_side_group(pg)
            return None
        engine = _ipc_worker(rank, port, world) if mode == "colocated" else worker(rank, port, world)
        try:
            engine.receive_weights(None, Collector())
            load = Collector()
            with pytest.raises(TransferError, match="comes twice"):
                engine.receive_weights(None, load)
            partial = [name for name, _ in load.got]
            load = Collector()
            engine.receive_weights(None, load)
            return partial, load.got, engine.weights_version
        finally:
            engine.shutdown()

    partial, got, version = run_world(body, world)[1]
    assert "w" not in partial[1:], partial  # the second 'w' never reached load_weights
    assert same(got, final) and version == 2, (got, version)


def test_update_info_listing_a_name_twice_is_a_value_error():
    with pytest.raises(ValueError, match="'w' twice"):
        NCCLWeightTransferUpdateInfo(["w", "v", "w"], ["float32"] * 3, [[2]] * 3)
    with pytest.raises(ValueError, match="non-empty"):
        NCCLWeightTransferUpdateInfo([""], ["float32"], [[2]])


def test_dtype_names_are_only_looked_up_in_the_package_tables(monkeypatch):
    """A dtype name from a peer is never resolved with getattr on torch (whose lazy imports run
    for names such as "_dynamo"): an attribute of torch that is a dtype but not one of the
    package's names is refused, and torch's own aliases still parse."""
    monkeypatch.setattr(torch, "xfer_probe_dtype", torch.float32, raising=False)
    with pytest.raises(ValueError, match="not a supported torch dtype"):
        parse_dtype("xfer_probe_dtype")
    for name in ("_dynamo", "_inductor", "onnx", "has_cuda", "Tensor"):
        with pytest.raises(ValueError, match="not a supported torch dtype"):
            parse_dtype(name)
    assert [parse_dtype(n) for n in ("float", "torch.half", "long", "cfloat", "bfloat16")] == \
        [torch.float32, torch.float16, torch.int64, torch.complex64, torch.bfloat16]  # fmt: skip


# -- allocations a table asks for ----------------------------------------------------------------


def test_a_worker_probes_exactly_what_its_buffer_grows_to():
    """``reserve`` probes ``grown_size`` before the agreement; ``buffer`` allocates the same
    after it, for growth from nothing, geometric growth, the cap and another device."""
    state = ReceiverState.__new__(ReceiverState)
    state.buffers, state.device = [], None
    state.prepare(torch.device("cpu"), 2)
    limit = 40 << 20
    for b, nbytes in [(0, 100), (0, 3 << 20), (0, (3 << 20) + 1), (1, 5 << 20), (0, 30 << 20), (0, 100)]:
        want = state.grown_size(b, nbytes, limit, torch.device("cpu"))
        before = state.buffers[b].numel()
        state.buffer(b, nbytes, limit)
        after = state.buffers[b].numel()
        assert (want == 0 and after == before) or after == want >= nbytes, (b, nbytes, want, before, after)
    assert state.grown_size(0, 10, limit, torch.device("meta")) == 1 << 20  # another device: from nothing


def test_an_allocation_that_fails_after_the_agreement_is_a_transfer_error(monkeypatch):
    """Memory that ``reserve`` found free is gone by the time the bucket is posted (another
    process took it): the worker raises TransferError (broken), not the allocator's
    RuntimeError, and the trainer a TransferError within its timeout."""
    real = ReceiverState.buffer

    def failing(self: ReceiverState, b: int, nbytes: int, limit: int) -> torch.Tensor:
        if self.buffers[b].numel() < nbytes:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, b, nbytes, limit)

    monkeypatch.setattr(receiver_mod.ReceiverState, "buffer", failing)

    message, broken = _both_fail(W, timeout=TIMEOUT)
    assert broken and "cannot allocate" in message and "simulated" in message, message


def _both_fail(weights: list, **kwargs: Any) -> tuple[str, str | None]:
    """One packed update of ``weights`` (``kwargs`` to the group and the send) that the
    trainer and one worker must each end with TransferError: the worker's message and
    ``broken``."""
    group_kwargs = {k: kwargs.pop(k) for k in ("timeout",) if k in kwargs}

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, 2, **group_kwargs)
            try:
                with pytest.raises(TransferError):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(weights), pg, packed=True, **kwargs)
            finally:
                destroy_side_group(pg)
            return None
        engine = worker(rank, port, 2, **group_kwargs)
        try:
            with pytest.raises(TransferError) as err:
                engine.receive_weights(None, Collector())
            return str(err.value), err.value.broken
        finally:
            engine.shutdown()

    return run_world(body, 2)[1]


# -- what a worker keeps ---------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False])
def test_a_worker_keeps_only_the_digest_of_each_table_frame(packed):
    """A trainer may pad a table frame up to the frame cap, and a layout lives as long as its
    group: a worker keeps each bucket's digest, never its frame, and still holds the very
    fingerprint the trainer does (the next update is announced as cached and arrives)."""
    world = 2
    second = [(n, t + 1) for n, t in W]

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = trainer(port, world)
            try:
                for weights in (W, second):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(weights), pg, packed=packed,
                                                                  packed_buffer_size_bytes=32)  # fmt: skip
                from torchxfer import side_group

                layout = SenderState.of(side_group(pg)).layout
                return layout.fingerprint, [len(p.frame) for p in layout.buckets]
            finally:
                destroy_side_group(pg)
        engine = worker(rank, port, world)
        try:
            engine.receive_weights(None, Collector())
            load = Collector()
            engine.receive_weights(None, load)
            from torchxfer import side_group

            layout = ReceiverState.of(side_group(engine.model_update_group)).layout
            return layout.fingerprint, [len(p.frame) for p in layout.buckets], load.got
        finally:
            engine.shutdown()

    (sent, sender_frames), (held, frames, got) = run_world(body, world)
    assert sent == held and all(n > 0 for n in sender_frames) and frames == [0] * len(sender_frames)
    assert len(frames) >= (2 if packed else 1) and all(bytes_equal(t, want) for (_, t), (_, want) in zip(got, second))


@pytest.mark.parametrize("mode", ["broadcast", "colocated"])
def test_an_atomic_worker_that_cannot_stage_the_update_fails_it_for_every_rank(monkeypatch, mode):
    """An atomic worker copies every tensor until the apply step; when a copy cannot be made
    (the update outgrew its memory: simulated), that is this rank's failure, agreed by every
    rank as TransferError, not the allocator's RuntimeError escaping a worker; nothing is
    applied, and the next update on the same group arrives whole."""
    import threading

    oom = threading.local()
    real_clone = torch.Tensor.clone

    def clone(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(oom, "on", False):
            raise RuntimeError("out of memory (simulated)")
        return real_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone)
    final = [(n, t * 2) for n, t in W]
    colocated = mode == "colocated"

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = _ipc_trainer(port, 2) if colocated else trainer(port, 2)
            send = (IPCWeightTransferEngine if colocated else NCCLWeightTransferEngine).trainer_send_weights
            kw = {} if colocated else {"packed": True}
            try:
                with pytest.raises(TransferError, match="cannot stage"):
                    send(iter(W), pg, **kw)
                send(iter(final), pg, **kw)
            finally:
                destroy_side_group(pg)
            return None
        engine = _ipc_worker(rank, port, 2) if colocated else worker(rank, port, 2)
        try:
            load = Collector()
            oom.on = True
            try:
                with pytest.raises(TransferError, match="cannot stage") as err:
                    engine.receive_weights(None, load, atomic=True)
            finally:
                oom.on = False
            failed = (load.got, engine.weights_version, err.value.broken)
            load = Collector()
            engine.receive_weights(None, load, atomic=True)
            return failed, load.got, engine.weights_version
        finally:
            engine.shutdown()

    (loads, version, broken), got, after = run_world(body, 2)[1]
    assert loads == [] and version is None and not broken, (loads, version, broken)
    assert same(got, final) and after == 1, (got, after)


# -- an update of no tensor at all ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["packed", "unpacked", "colocated"])
def test_an_empty_update_is_checked_against_update_info(mode):
    """A trainer whose source yields nothing sends an update of no bucket at all (its count
    is not known ahead: a generator). A worker whose update_info lists tensors fails it, on
    every rank, as TransferError (not broken: the group stays usable) with nothing loaded and
    its version unchanged; a worker without update_info, or with one listing no tensor,
    accepts it and takes its version; the next update on the same group arrives whole."""
    colocated = mode == "colocated"
    names = [n for n, _ in W]
    info = NCCLWeightTransferUpdateInfo(names=names, dtype_names=["float32"] * 3, shapes=[[4]] * 3,
                                        packed=mode == "packed")  # fmt: skip
    nothing = NCCLWeightTransferUpdateInfo(names=[], dtype_names=[], shapes=[], packed=mode == "packed")

    def empty() -> Any:
        yield from ()

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = _ipc_trainer(port, 2) if colocated else trainer(port, 2)
            send = (IPCWeightTransferEngine if colocated else NCCLWeightTransferEngine).trainer_send_weights
            kw = {} if colocated else {"packed": mode == "packed"}
            try:
                with pytest.raises(TransferError, match="trainer sent 0 tensors, update_info lists 3") as err:
                    send(empty(), pg, version=5, **kw)
                assert not err.value.broken
                send(empty(), pg, version=6, **kw)
                send(empty(), pg, version=7, **kw)
                send(iter(W), pg, version=8, **kw)
            finally:
                destroy_side_group(pg)
            return None
        engine = _ipc_worker(rank, port, 2) if colocated else worker(rank, port, 2)
        try:
            load = Collector()
            before = engine.weights_version
            with pytest.raises(TransferError, match="trainer sent 0 tensors, update_info lists 3") as err:
                engine.receive_weights(info, load)
            failed = (list(load.got), engine.weights_version == before, err.value.broken)
            engine.receive_weights(None, load)
            versions = [engine.weights_version]
            engine.receive_weights(nothing, load)
            versions.append(engine.weights_version)
            empty_loads = list(load.got)
            engine.receive_weights(info, load)
            versions.append(engine.weights_version)
            return failed, versions, empty_loads, load.got
        finally:
            engine.shutdown()

    failed, versions, empty_loads, got = run_world(body, 2)[1]
    assert failed == ([], True, False)
    assert versions == [6, 7, 8] and empty_loads == []
    assert same(got, W)


def test_an_assembly_that_cannot_be_allocated_after_the_agreement_is_a_transfer_error(monkeypatch):
    """A split tensor's head that shares its bucket with another split tensor's tail arrives in
    the buffer and is copied into the assembly tensor after that bucket's load: memory the
    worker's probe found free may be gone by then (simulated). The worker raises
    TransferError (broken), not the allocator's RuntimeError; the trainer a TransferError."""
    import threading

    loading = threading.local()
    real_assembly, real_after_load = ReceiverState.assembly_for, receiver_mod.Receiver.after_load

    def failing(self: ReceiverState, nbytes: int, device: torch.device) -> None:
        if getattr(loading, "on", False):
            raise RuntimeError("out of memory (simulated)")
        real_assembly(self, nbytes, device)

    def after_load(self: Any) -> None:
        loading.on = True
        try:
            real_after_load(self)
        finally:
            loading.on = False

    monkeypatch.setattr(receiver_mod.ReceiverState, "assembly_for", failing)
    monkeypatch.setattr(receiver_mod.Receiver, "after_load", after_load)
    # Two tensors of 160 bytes in 96-byte buffers: w0 splits 96 + 64, w1's head shares w0's tail's bucket.
    weights = [("w0", torch.arange(40, dtype=torch.float32)), ("w1", torch.arange(40, dtype=torch.float32) + 1)]

    message, broken = _both_fail(weights, packed_buffer_size_bytes=96)
    assert broken and "cannot allocate memory to load bucket" in message and "simulated" in message, message
