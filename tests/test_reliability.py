"""Peer death, torn updates, lifecycle, authentication and integrity.

Kill tests use real processes: a peer dies with SIGKILL in the middle of an
update and every survivor must raise TransferError within ``timeout_s`` (plus
slack), stay alive, and be able to join a new group.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.harness import ADDR, digest, free_port, gloo_trainer, run_processes, run_threads
from torchxfer import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    ParallelConfig,
    TransferError,
    WeightTransferConfig,
    destroy_side_group,
)

TIMEOUT = 4.0
SLACK = 6.0
BUF = 4096


def _model(seed: int, n: int = 12) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(300 + 17 * i, generator=gen)) for i in range(n)]


def _worker_engine(rank: int, world: int, timeout: float = TIMEOUT) -> NCCLWeightTransferEngine:
    return NCCLWeightTransferEngine(
        WeightTransferConfig(backend="gloo", timeout_s=timeout),
        ParallelConfig(rank=rank - 1, tensor_parallel_size=world - 1),
    )


def _trainer(port: int, world: int, timeout: float = TIMEOUT, token: str | None = None) -> dist.ProcessGroup:
    return gloo_trainer(port, world, timeout=timeout, token=token)


def _collect(store: list) -> callable:
    def load(batch: list) -> None:
        store.extend((name, digest(t)) for name, t in batch)

    return load


# -- trainer dies mid-update ---------------------------------------------------------------


def _trainer_dies(rank: int, port: int, port2: int, both_failed: Any = None) -> object:
    world = 3
    if rank == 0:  # trainer A: one good update, then dies inside the second
        group = _trainer(port, world)
        NCCLWeightTransferEngine.trainer_send_weights(iter(_model(1)), group, packed=True, packed_buffer_size_bytes=BUF)

        def dying() -> object:
            for i, item in enumerate(_model(2)):
                if i == 6:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield item

        NCCLWeightTransferEngine.trainer_send_weights(dying(), group, packed=True, packed_buffer_size_bytes=BUF)
        return None
    if rank == 3:  # trainer B: the replacement, on a new port
        group = _trainer(port2, world, timeout=60)
        NCCLWeightTransferEngine.trainer_send_weights(iter(_model(3)), group, packed=True, packed_buffer_size_bytes=BUF)
        destroy_side_group(group)
        return None
    engine = _worker_engine(rank, world)
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, world))
    first: list = []
    engine.receive_weights(None, _collect(first))
    version = engine.weights_version
    start = time.monotonic()
    partial: list = []
    with pytest.raises(TransferError) as err:
        engine.receive_weights(None, _collect(partial))
    elapsed = time.monotonic() - start
    torn = engine.torn
    assert engine.weights_version == version
    engine.shutdown()
    engine.shutdown()  # idempotent
    # Each worker notices the death within its own timeout_s; the two re-join together, so the
    # first one's init (bounded by the same timeout_s) does not run out waiting for the second.
    both_failed.wait(2 * TIMEOUT + SLACK)
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port2, 1, world))
    third: list = []
    engine.receive_weights(None, _collect(third))
    after = (engine.weights_version, engine.torn)
    engine.shutdown()
    return {"first": first, "third": third, "elapsed": elapsed, "torn": torn, "error": str(err.value),
            "broken": err.value.broken, "after": after, "loaded": len(partial)}  # fmt: skip


@pytest.mark.process
def test_trainer_killed_mid_update_workers_survive_and_reconnect():
    port, port2 = free_port(), free_port()
    both_failed = mp.get_context("spawn").Barrier(2)  # the two workers, after their error
    outcomes = run_processes(_trainer_dies, 4, port, port2, both_failed, deadline_s=120, expect_ok=False)
    assert outcomes[0].error is not None  # killed: no report
    assert outcomes[3].ok, outcomes[3].tb
    want1 = [(n, digest(t)) for n, t in _model(1)]
    want3 = [(n, digest(t)) for n, t in _model(3)]
    for out in outcomes[1:3]:
        assert out.ok, out.tb
        v = out.value
        assert v["first"] == want1
        assert v["third"] == want3
        assert v["elapsed"] < TIMEOUT + SLACK, v
        assert v["broken"] is True
        # Torn exactly when buckets of the dead update reached load_weights (how many
        # did depends on how far the dead trainer's last sends got).
        assert v["torn"] is (v["loaded"] > 0), v
        assert v["after"] == (0, False)  # the new trainer's first update; no longer torn


# -- worker dies mid-update ------------------------------------------------------------------


def _worker_dies(rank: int, port: int, trainer_port: int) -> object:
    # ranks 0, 1: the trainer world (own default group); ranks 2, 3: workers 1, 2 of the side group.
    world = 3
    if rank in (0, 1):
        dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2)
        result = {}
        if rank == 0:
            group = _trainer(port, world)
            NCCLWeightTransferEngine.trainer_send_weights(iter(_model(1)), group, packed=True, packed_buffer_size_bytes=BUF)
            start = time.monotonic()
            with pytest.raises(TransferError) as err:
                NCCLWeightTransferEngine.trainer_send_weights(iter(_model(2)), group, packed=True, packed_buffer_size_bytes=BUF)
            result = {"elapsed": time.monotonic() - start, "error": str(err.value)}
            destroy_side_group(group)
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)  # the trainer's own group is unaffected
        result["all_reduce"] = t.item()
        dist.destroy_process_group()
        return result
    side_rank = rank - 1
    engine = _worker_engine(side_rank, world)
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, world))
    engine.receive_weights(None, lambda batch: None)
    calls = [0]

    def load(batch: list) -> None:
        calls[0] += 1
        if side_rank == 2 and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(TransferError):
        engine.receive_weights(None, load)
    elapsed = time.monotonic() - start
    engine.shutdown()
    return {"elapsed": elapsed}


@pytest.mark.process
def test_worker_killed_mid_update_trainer_raises_and_default_group_lives():
    port, trainer_port = free_port(), free_port()
    outcomes = run_processes(_worker_dies, 4, port, trainer_port, deadline_s=120, expect_ok=False)
    assert outcomes[3].error is not None  # the killed worker
    for out in outcomes[:3]:
        assert out.ok, out.tb
    assert outcomes[0].value["elapsed"] < TIMEOUT + SLACK
    assert outcomes[0].value["all_reduce"] == 3.0
    assert outcomes[1].value["all_reduce"] == 3.0
    assert outcomes[2].value["elapsed"] < TIMEOUT + SLACK


# -- atomic receive never tears ----------------------------------------------------------------


def _send_then_fail(port: int, world: int) -> callable:
    def body(rank: int) -> object:
        if rank == 0:
            group = _trainer(port, world)
            NCCLWeightTransferEngine.trainer_send_weights(iter(_model(1)), group, packed=True, packed_buffer_size_bytes=BUF)

            def failing() -> object:
                for i, item in enumerate(_model(2)):
                    if i == 8:
                        raise KeyError("source exploded")
                    yield item

            with pytest.raises(KeyError):
                NCCLWeightTransferEngine.trainer_send_weights(failing(), group, packed=True, packed_buffer_size_bytes=BUF)
            NCCLWeightTransferEngine.trainer_send_weights(iter(_model(3)), group, packed=True, packed_buffer_size_bytes=BUF)
            with pytest.raises(TransferError, match="worker 2 refuses the last bucket"):
                NCCLWeightTransferEngine.trainer_send_weights(iter(_model(4)), group, packed=True, packed_buffer_size_bytes=BUF)
            destroy_side_group(group)
            return None
        engine = _worker_engine(rank, world)
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, world))
        atomic = rank == 1
        model = {}

        def load(batch: list) -> None:
            model.update((n, t.clone()) for n, t in batch)

        engine.receive_weights(None, load, atomic=atomic)
        with pytest.raises(TransferError, match="source exploded"):
            engine.receive_weights(None, load, atomic=atomic)
        state = (engine.weights_version, engine.torn, {n: digest(t) for n, t in model.items()})
        engine.receive_weights(None, load, atomic=atomic)
        final = (engine.weights_version, engine.torn, {n: digest(t) for n, t in model.items()})
        # Every byte sent, then another worker fails loading the last bucket: the atomic worker,
        # which had received everything, must not apply.
        last, calls = _model(4)[-1][0], []

        def refusing(batch: list) -> None:
            calls.append(len(batch))
            if rank == 2 and any(n == last for n, _ in batch):
                raise ValueError("worker 2 refuses the last bucket")
            load(batch)

        with pytest.raises(TransferError, match="worker 2 refuses the last bucket"):
            engine.receive_weights(None, refusing, atomic=atomic)
        other = (engine.weights_version, engine.torn, {n: digest(t) for n, t in model.items()}, len(calls))
        engine.shutdown()
        return state, final, other

    return body


def test_atomic_receive_is_never_torn_streaming_receive_reports_torn():
    port = free_port()
    outcomes = run_threads(_send_then_fail(port, 3), 3, deadline_s=60)
    v1 = {n: digest(t) for n, t in _model(1)}
    v3 = {n: digest(t) for n, t in _model(3)}
    (atomic_state, atomic_final, atomic_other), (stream_state, stream_final, stream_other) = outcomes[1].value, outcomes[2].value
    assert atomic_state == (0, False, v1)  # untouched by the failed update
    assert stream_state[:2] == (0, True)  # some buckets of update 1 were loaded
    assert stream_state[2] != v1
    assert atomic_final == (2, False, v3) and stream_final == (2, False, v3)
    # Update 3 failed on the streaming worker at its last bucket: the atomic one never called
    # load_weights and kept update 2 whole; the streaming one loaded all but that bucket.
    assert atomic_other == (2, False, v3, 0), atomic_other[:2] + atomic_other[3:]
    assert stream_other[:2] == (2, True) and stream_other[3] > 1 and stream_other[2] != v3


# -- lifecycle -----------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_init_shutdown_50_times_leaks_nothing():
    def cycle(port: int) -> None:
        def body(rank: int) -> None:
            if rank == 0:
                group = _trainer(port, 2)
                NCCLWeightTransferEngine.trainer_send_weights(iter(_model(0, 3)), group, packed=True)
                destroy_side_group(group)
            else:
                engine = _worker_engine(1, 2)
                engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))
                engine.receive_weights(None, lambda batch: None)
                engine.shutdown()

        run_threads(body, 2, deadline_s=30)

    cycle(free_port())  # warm up lazily created torch state
    import gc

    cycle(free_port())
    gc.collect()
    fds, threads, rss = _fds(), _native_threads(), _rss()
    for _ in range(50):
        cycle(free_port())
    gc.collect()
    assert _fds() <= fds + 2, (fds, _fds())
    assert _native_threads() <= threads + 2, (threads, _native_threads())
    # Each cycle allocates new buffers and Gloo state; 50 cycles must not keep them.
    assert _rss() - rss < 32 << 20, (rss, _rss())


def test_two_side_groups_coexist_in_one_process():
    """One trainer thread serves two independent groups (two servers) at once."""
    port_a, port_b = free_port(), free_port()

    def body(rank: int) -> object:
        if rank == 0:
            groups = [None, None]

            def init(i: int, port: int) -> None:
                groups[i] = _trainer(port, 2)

            inits = [threading.Thread(target=init, args=(i, p)) for i, p in enumerate((port_a, port_b))]
            for t in inits:
                t.start()
            for t in inits:
                t.join()
            for step, group in enumerate(groups * 2):
                NCCLWeightTransferEngine.trainer_send_weights(iter(_model(10 + step % 2)), group, packed=True)
            for group in groups:
                destroy_side_group(group)
            return None
        port = port_a if rank == 1 else port_b
        engine = _worker_engine(1, 2)
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))
        got: list = []
        for _ in range(2):
            got.clear()
            engine.receive_weights(None, _collect(got))
        engine.shutdown()
        return got

    outcomes = run_threads(body, 3, deadline_s=60)
    assert outcomes[1].value == [(n, digest(t)) for n, t in _model(10)]
    assert outcomes[2].value == [(n, digest(t)) for n, t in _model(11)]


# -- authentication ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [("s3cret", "s3cret", "s3cret"), ("s3cret", "s3cret", "b4d-t0ken"),
                                    ("s3cret", None, "s3cret"), (None, "s3cret", None)])  # fmt: skip
def test_token_checked_before_any_payload(tokens):
    port = free_port()
    received: list = []

    def body(rank: int) -> object:
        if rank == 0:
            group = _trainer(port, 3, token=tokens[0])
            NCCLWeightTransferEngine.trainer_send_weights(iter(_model(5, 2)), group, packed=True)
            destroy_side_group(group)
            return "sent"
        engine = _worker_engine(rank, 3)
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 3, token=tokens[rank]))
        engine.receive_weights(None, _collect(received))
        engine.shutdown()
        return "received"

    outcomes = run_threads(body, 3, deadline_s=30, expect_ok=False)
    if len(set(tokens)) == 1:
        assert all(o.ok for o in outcomes), outcomes
        return
    for out in outcomes:
        assert isinstance(out.error, TransferError), out
        assert "authentication failed" in str(out.error)
        assert "s3cret" not in str(out.error) and "b4d-t0ken" not in str(out.error)
    assert received == []


# -- integrity --------------------------------------------------------------------------------------


def test_checksum_mismatch_names_the_bucket_tensors(monkeypatch):
    import torchxfer.control as control

    real = control.checksum

    def corrupt_on_worker_2(data: torch.Tensor) -> int:
        value = real(data)
        return value + 1 if threading.current_thread().name == "rank2" else value

    monkeypatch.setattr(control, "checksum", corrupt_on_worker_2)
    port = free_port()

    def body(rank: int) -> object:
        if rank == 0:
            group = _trainer(port, 3)
            with pytest.raises(TransferError, match="checksum mismatch") as err:
                NCCLWeightTransferEngine.trainer_send_weights(
                    iter(_model(7, 3)), group, packed=True, checksum=True, packed_buffer_size_bytes=BUF
                )
            # The group stays usable: the next update (without the bad rank's check) succeeds.
            monkeypatch.setattr(control, "checksum", real)
            NCCLWeightTransferEngine.trainer_send_weights(iter(_model(8, 3)), group, packed=True, checksum=True)
            destroy_side_group(group)
            return str(err.value)
        engine = _worker_engine(rank, 3)
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 3))
        with pytest.raises(TransferError, match="checksum mismatch"):
            engine.receive_weights(None, lambda batch: None)
        got: list = []
        engine.receive_weights(None, _collect(got))
        engine.shutdown()
        return got

    outcomes = run_threads(body, 3, deadline_s=60)
    assert "'w0'" in outcomes[0].value and "rank 2" in outcomes[0].value
    for out in outcomes[1:]:
        assert out.value == [(n, digest(t)) for n, t in _model(8, 3)]


def test_silent_worker_times_out_on_every_rank():
    """A worker stuck in load_weights (alive, silent): the trainer and the other
    worker raise TransferError within timeout_s, not after a watchdog's 10 minutes."""
    port = free_port()
    timeout = 2.0
    release = threading.Event()

    def body(rank: int) -> object:
        start = time.monotonic()
        if rank == 0:
            group = _trainer(port, 3, timeout=timeout)
            try:
                with pytest.raises(TransferError, match="stopped responding within 2 s"):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(_model(4)), group, packed=True, packed_buffer_size_bytes=BUF)
                return time.monotonic() - start
            finally:
                release.set()
                destroy_side_group(group)
        engine = _worker_engine(rank, 3, timeout=timeout)
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 3))
        start = time.monotonic()

        def load(batch: list) -> None:
            if rank == 2:
                release.wait(30)

        with pytest.raises(TransferError):
            engine.receive_weights(None, load)
        engine.shutdown()
        return time.monotonic() - start

    outcomes = run_threads(body, 3, deadline_s=60)
    assert outcomes[0].value < timeout + SLACK
    assert outcomes[1].value < 2 * timeout + SLACK


def test_store_listens_only_on_master_address_and_only_until_the_group_forms():
    import socket

    port = free_port()
    seen: dict = {}

    def body(rank: int) -> None:
        if rank == 0:
            group = _trainer(port, 2)  # waits for the worker, so the store is up meanwhile
            destroy_side_group(group)
            return
        def reachable() -> bool:
            try:
                socket.create_connection((ADDR, port), timeout=2).close()
                return True
            except OSError:
                return False

        deadline = time.monotonic() + 10
        while not reachable():  # where asked: reachable once the trainer has bound it
            assert time.monotonic() < deadline, "the trainer's store never listened"
            time.sleep(0.01)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=2).close()  # another local address: refused
        engine = _worker_engine(1, 2)
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))
        # Formed: rank 0 closes its listener as it finishes forming (it may finish a
        # moment after this worker), so nothing listens from then on.
        deadline = time.monotonic() + 5
        while reachable() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["after"] = "listening" if reachable() else "closed"
        engine.shutdown()

    run_threads(body, 2, deadline_s=30)
    assert seen["after"] == "closed"
