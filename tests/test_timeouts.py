"""Every wait after the group formed has the whole ``timeout_s``; an interrupt leaves at once.

Ranks are threads of this process (``tests.harness.run_world``, deadline ``DEADLINE``). The delays
here are the scenario (a peer that joins late, a server that takes its update late), never a
synchronization: the threads synchronize on events, and an interrupt is delivered to a rank's
thread (``PyThreadState_SetAsyncExc``) once it is known to wait.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import pytest
import torch

from tests.harness import gloo_trainer, gloo_worker, run_world
from tests.test_hostile import Collector, same
from torchxfer import NCCLWeightTransferEngine, TransferError, destroy_side_group, side_group
from torchxfer.group import SideGroup

DEADLINE = 60.0
W = [(f"w{i}", torch.arange(64, dtype=torch.float32) * (i + 1)) for i in range(3)]


# -- a group formed late in its init window -----------------------------------------------------


@pytest.mark.parametrize("late", ["worker", "trainer"])
def test_a_group_formed_late_in_the_init_window_keeps_the_whole_timeout_for_its_updates(late):
    """A server loads its model before it joins: the group forms near the end of the other
    side's init window. The first update then starts a while later (the other side is busy),
    within ``timeout_s`` but after what was left of that window: it arrives whole on both
    ranks (each collective carries the group's timeout, not what init had left)."""
    timeout, join_late_s, update_late_s = 4.0, 2.0, 3.0

    def body(rank: int, port: int) -> Any:
        if (rank == 0) == (late == "trainer"):
            time.sleep(join_late_s)  # this side joins late
        if rank == 0:
            pg = gloo_trainer(port, 2, timeout=timeout)
            try:
                if late == "worker":  # the side that joined early waits longest in its collectives
                    NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=True)
                else:
                    time.sleep(update_late_s)  # the trainer's step takes a while
                    NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=True)
            finally:
                destroy_side_group(pg)
            return None
        engine = gloo_worker(rank, port, 2, timeout=timeout, dp=True)
        try:
            load = Collector()
            if late == "worker":
                time.sleep(update_late_s)  # the server finishes a batch before it takes the update
            engine.receive_weights(None, load)
            return load.got
        finally:
            engine.shutdown()

    assert same(run_world(body, 2, deadline_s=DEADLINE)[1], W)


# -- interrupts -------------------------------------------------------------------------------


def _interrupt(thread_id: int, exc: type[BaseException]) -> None:
    """Raise ``exc`` in the thread ``thread_id`` at its next bytecode (its waits run in slices)."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc))
    assert done == 1, done


class _Waiting:
    """Sets ``event`` when the thread named ``thread_id`` enters ``SideGroup.wait`` for ``what``."""

    def __init__(self, monkeypatch: Any, what: str) -> None:
        self.what, self.thread_id, self.event = what, None, threading.Event()
        real = SideGroup.wait

        def wait(group: SideGroup, work: Any, what: str, **kwargs: Any) -> None:
            if threading.get_ident() == self.thread_id and self.what in what:
                self.event.set()
            return real(group, work, what, **kwargs)

        monkeypatch.setattr(SideGroup, "wait", wait)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_receive_leaves_at_once_and_shutdown_does_not_wait(monkeypatch, exc):
    """A server's SIGTERM handler raises SystemExit (or Ctrl-C a KeyboardInterrupt) while its
    worker waits for an update, in the steady state (the layout's bucket 0 already posted):
    ``receive_weights`` lets it go on at once, without draining the posted receives; the group
    is broken; ``shutdown()`` returns at once; the trainer raises TransferError within its
    timeout."""
    timeout = 4.0
    waiting = _Waiting(monkeypatch, "update (begin)")
    interrupted = threading.Event()

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = gloo_trainer(port, 2, timeout=timeout)
            try:
                NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=True)
                assert interrupted.wait(DEADLINE / 2)
                start = time.monotonic()
                with pytest.raises(TransferError):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=True)
                return time.monotonic() - start
            finally:
                destroy_side_group(pg)
        engine = gloo_worker(rank, port, 2, timeout=timeout, dp=True)
        try:
            engine.receive_weights(None, Collector())
            waiting.thread_id = threading.get_ident()
            me = waiting.thread_id
            threading.Thread(target=lambda: waiting.event.wait(DEADLINE / 2) and _interrupt(me, exc)).start()
            start = time.monotonic()
            with pytest.raises(exc):
                engine.receive_weights(None, Collector())
            left = time.monotonic() - start
            broken = side_group(engine.model_update_group).broken
            start = time.monotonic()
            engine.shutdown()
            shutdown = time.monotonic() - start
            interrupted.set()
            return left, broken, shutdown
        finally:
            interrupted.set()
            engine.shutdown()

    trainer_s, (left, broken, shutdown) = run_world(body, 2, deadline_s=DEADLINE)
    assert left < timeout / 2 and shutdown < timeout / 4, (left, shutdown)
    assert broken is not None and f"interrupted during an update ({exc.__name__})" in broken
    assert trainer_s < timeout + 2.0


def test_an_interrupted_send_leaves_at_once_and_the_group_is_released_at_once(monkeypatch):
    """The trainer is interrupted while it waits for a worker that does not take the update:
    ``trainer_send_weights`` lets the interrupt go on at once, the group is broken, and
    ``destroy_side_group`` returns at once; the worker's next receive raises TransferError
    within its timeout."""
    timeout = 4.0
    waiting = _Waiting(monkeypatch, "update")
    interrupted = threading.Event()

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            pg = gloo_trainer(port, 2, timeout=timeout)
            try:
                NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=True)
                waiting.thread_id = threading.get_ident()
                me = waiting.thread_id
                threading.Thread(target=lambda: waiting.event.wait(DEADLINE / 2) and _interrupt(me, KeyboardInterrupt)
                                 ).start()  # fmt: skip
                start = time.monotonic()
                with pytest.raises(KeyboardInterrupt):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=True)
                left = time.monotonic() - start
                broken = side_group(pg).broken
                start = time.monotonic()
                destroy_side_group(pg)
                return left, broken, time.monotonic() - start
            finally:
                interrupted.set()
                destroy_side_group(pg)
        engine = gloo_worker(rank, port, 2, timeout=timeout, dp=True)
        try:
            engine.receive_weights(None, Collector())
            assert interrupted.wait(DEADLINE / 2)
            start = time.monotonic()
            with pytest.raises(TransferError):
                engine.receive_weights(None, Collector())
            return time.monotonic() - start
        finally:
            engine.shutdown()

    (left, broken, released), worker_s = run_world(body, 2, deadline_s=DEADLINE)
    assert left < timeout / 2 and released < timeout / 4, (left, released)
    assert broken is not None and "interrupted during an update (KeyboardInterrupt)" in broken
    assert worker_s < timeout + 2.0


# -- shutdown during init ---------------------------------------------------------------------


@pytest.mark.parametrize("engine_kind", ["broadcast", "colocated"])
def test_shutdown_during_init_stops_it_and_the_engine_can_join_later(monkeypatch, engine_kind):
    """A server's shutdown() from another thread while ``init_transfer_engine`` waits for a
    trainer that has not come: the init raises TransferError(broken) within a second, the
    engine stays uninitialized (it does not take the group once the trainer comes), and the
    same engine then joins a trainer and receives an update."""
    import torchxfer.engine as engine_mod
    import torchxfer.ipc_engine as ipc_mod
    from tests.test_hostile2 import _ipc_trainer
    from torchxfer import (IPCWeightTransferEngine, IPCWeightTransferInitInfo, NCCLWeightTransferInitInfo,
                           ParallelConfig, WeightTransferConfig, create_engine)  # fmt: skip

    timeout = 6.0
    colocated = engine_kind == "colocated"
    forming = threading.Event()
    mod = ipc_mod if colocated else engine_mod
    real = mod.form_side_group

    def form(*args: Any, **kwargs: Any) -> Any:
        forming.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "form_side_group", form)
    cancelled = threading.Event()

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            assert cancelled.wait(DEADLINE / 2)  # the trainer comes after the worker gave up its first init
            pg = _ipc_trainer(port, 2) if colocated else gloo_trainer(port, 2, timeout=timeout)
            try:
                send = (IPCWeightTransferEngine if colocated else NCCLWeightTransferEngine).trainer_send_weights
                send(iter(W), pg, **({} if colocated else {"packed": True}))
            finally:
                destroy_side_group(pg)
            return None
        config = WeightTransferConfig(backend="ipc", timeout_s=timeout, device="cpu") if colocated else \
            WeightTransferConfig(backend="gloo", timeout_s=timeout)  # fmt: skip
        engine = create_engine(config, ParallelConfig())
        info = (IPCWeightTransferInitInfo if colocated else NCCLWeightTransferInitInfo)("127.0.0.1", port, 1, 2)
        try:
            stopper = threading.Thread(target=lambda: forming.wait(DEADLINE / 2) and engine.shutdown())
            stopper.start()
            start = time.monotonic()
            with pytest.raises(TransferError, match="shutdown") as err:
                engine.init_transfer_engine(info)
            stopped = (time.monotonic() - start, err.value.broken, engine.model_update_group)
            stopper.join()
        finally:
            cancelled.set()
        try:
            engine.init_transfer_engine(info)
            load = Collector()
            engine.receive_weights(None, load)
            return stopped, load.got
        finally:
            engine.shutdown()

    (seconds, broken, group), got = run_world(body, 2, deadline_s=DEADLINE)[1]
    assert seconds < 1.0 and broken and group is None, (seconds, broken, group)
    assert same(got, W)


@pytest.mark.parametrize("engine_kind", ["broadcast", "colocated"])
def test_shutdown_after_the_group_formed_but_before_init_returned_stops_it_at_once(monkeypatch, engine_kind):
    """The group has formed, and ``init_transfer_engine`` still proves the connections (the bind
    step; the colocated handshake after it) while the trainer is slow to do its half: a
    ``shutdown()`` then closes that group, and the init raises the shutdown TransferError within
    a second, not at the end of its init window; the trainer gets TransferError too."""
    import torchxfer.ipc_engine as ipc_mod
    import torchxfer.rendezvous as rdv
    from tests.test_hostile2 import _ipc_trainer
    from torchxfer import IPCWeightTransferInitInfo, NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig
    from torchxfer import create_engine

    timeout = 8.0
    colocated = engine_kind == "colocated"
    entered, stopped = threading.Event(), threading.Event()
    name = "trainer_handshake" if colocated else "bind"
    mod, worker_name = (ipc_mod, "worker_handshake") if colocated else (rdv, "bind")
    real_trainer, real_worker = getattr(mod, name), getattr(mod, worker_name)

    def trainer_half(group: Any, *args: Any) -> Any:
        assert stopped.wait(DEADLINE / 2)  # the trainer comes once the worker has given up
        return real_trainer(group, *args)

    def worker_half(group: Any, *args: Any) -> Any:
        entered.set()
        return real_worker(group, *args)

    def either(group: Any, *args: Any) -> Any:
        return (trainer_half if group.rank() == 0 else worker_half)(group, *args)

    if colocated:
        monkeypatch.setattr(mod, name, trainer_half)
        monkeypatch.setattr(mod, worker_name, worker_half)
    else:
        monkeypatch.setattr(mod, name, either)

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            start = time.monotonic()
            with pytest.raises(TransferError):
                pg = _ipc_trainer(port, 2) if colocated else gloo_trainer(port, 2, timeout=timeout)
                destroy_side_group(pg)
            return time.monotonic() - start
        config = WeightTransferConfig(backend="ipc", timeout_s=timeout, device="cpu") if colocated else \
            WeightTransferConfig(backend="gloo", timeout_s=timeout)  # fmt: skip
        engine = create_engine(config, ParallelConfig())
        info = (IPCWeightTransferInitInfo if colocated else NCCLWeightTransferInitInfo)("127.0.0.1", port, 1, 2)
        shut_at: list[float] = []

        def stop() -> None:
            if entered.wait(DEADLINE / 2):
                shut_at.append(time.monotonic())
                engine.shutdown()

        stopper = threading.Thread(target=stop)
        stopper.start()
        try:
            with pytest.raises(TransferError, match="shutdown") as err:
                engine.init_transfer_engine(info)
            took = time.monotonic() - shut_at[0]
            stopper.join()
            return took, err.value.broken, engine.model_update_group
        finally:
            stopped.set()
            engine.shutdown()

    trainer_s, (took, broken, group) = run_world(body, 2, deadline_s=DEADLINE)
    assert took < 1.0 and broken and group is None, (took, broken, group)
    assert trainer_s < 2 * timeout + 2.0


def test_shutdown_stops_an_init_that_waits_for_another_one():
    """Two ``init_transfer_engine`` calls on one engine (a retried request): the second waits for
    the first. ``shutdown()`` stops both; the second does not form a group once the first is
    gone, even when a trainer comes after ``shutdown()`` returned. An init called after
    ``shutdown()`` returned joins that trainer."""
    from torchxfer import NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig, create_engine
    import torchxfer.engine as engine_mod

    timeout = 6.0
    forming, stopped = threading.Event(), threading.Event()

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            assert stopped.wait(DEADLINE / 2)  # the trainer comes after shutdown() returned
            pg = gloo_trainer(port, 2, timeout=timeout)
            try:
                NCCLWeightTransferEngine.trainer_send_weights(iter(W), pg, packed=True)
            finally:
                destroy_side_group(pg)
            return None
        engine = create_engine(WeightTransferConfig(backend="gloo", timeout_s=timeout), ParallelConfig())
        info = NCCLWeightTransferInitInfo("127.0.0.1", port, 1, 2)
        outcomes: dict[str, BaseException | None] = {}
        waiting = threading.Event()
        real_acquire = engine._lock

        class Lock:  # tells when the second call waits for the first one's lock
            def __enter__(self) -> Any:
                if threading.current_thread().name == "second":
                    waiting.set()
                return real_acquire.__enter__()

            def __exit__(self, *exc: Any) -> Any:
                return real_acquire.__exit__(*exc)

        engine._lock = Lock()

        def init(tag: str) -> None:
            try:
                engine.init_transfer_engine(info)
                outcomes[tag] = None
            except BaseException as e:  # noqa: BLE001 - reported below
                outcomes[tag] = e

        real_form = engine_mod.form_side_group

        def form(*args: Any, **kwargs: Any) -> Any:
            forming.set()
            return real_form(*args, **kwargs)

        engine_mod.form_side_group = form
        try:
            first = threading.Thread(target=init, args=("first",), name="first")
            first.start()
            assert forming.wait(DEADLINE / 2)
            second = threading.Thread(target=init, args=("second",), name="second")
            second.start()
            assert waiting.wait(DEADLINE / 2)
            engine.shutdown()
            stopped.set()
            first.join(DEADLINE / 2)
            second.join(DEADLINE / 2)
        finally:
            engine_mod.form_side_group = real_form
            stopped.set()
        try:
            left = engine.model_update_group
            engine.init_transfer_engine(info)  # after shutdown(): joins the trainer
            load = Collector()
            engine.receive_weights(None, load)
            return outcomes, left, load.got
        finally:
            engine.shutdown()

    outcomes, left, got = run_world(body, 2, deadline_s=DEADLINE)[1]
    assert left is None
    for tag in ("first", "second"):
        assert isinstance(outcomes[tag], TransferError) and "shutdown" in str(outcomes[tag]), (tag, outcomes[tag])
    assert same(got, W)


def test_a_failed_init_leaves_nothing_of_its_group_on_the_engine(monkeypatch):
    """A worker's init fails after its group formed (the connections' proof fails): the group is
    closed and nothing of the engine keeps it (a server retrying its init would otherwise hold
    one group per failed try until it shuts the engine down)."""
    import gc
    import weakref

    import torchxfer.rendezvous as rdv
    from torchxfer import NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig, create_engine

    real_bind = rdv.bind
    refs: list[Any] = []

    def bind(group: Any, *args: Any, **kwargs: Any) -> Any:
        if group.rank() == 1:
            refs.append(weakref.ref(group))
            raise TransferError("the proof failed (simulated)")
        return real_bind(group, *args, **kwargs)

    monkeypatch.setattr(rdv, "bind", bind)

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            with pytest.raises(TransferError):
                destroy_side_group(gloo_trainer(port, 2, timeout=4.0))
            return None
        engine = create_engine(WeightTransferConfig(backend="gloo", timeout_s=4.0), ParallelConfig())
        try:
            with pytest.raises(TransferError, match="simulated"):
                engine.init_transfer_engine(NCCLWeightTransferInitInfo("127.0.0.1", port, 1, 2))
            gc.collect()
            return refs[0]() is None, engine.model_update_group
        finally:
            engine.shutdown()

    freed, group = run_world(body, 2, deadline_s=DEADLINE)[1]
    assert freed and group is None


_EXIT_AFTER_SHUTDOWN = """
import sys, threading
from torchxfer import NCCLWeightTransferInitInfo, ParallelConfig, TransferError, WeightTransferConfig, create_engine
import torchxfer.rendezvous as rdv

engine = create_engine(WeightTransferConfig(backend="gloo", timeout_s=10), ParallelConfig())
started = threading.Event()
real = rdv.make_store

def make_store(*args, **kwargs):
    started.set()
    return real(*args, **kwargs)

rdv.make_store = make_store
outcome = []

def init():
    try:
        engine.init_transfer_engine(NCCLWeightTransferInitInfo("127.0.0.1", int(sys.argv[1]), 1, 2))
    except TransferError as e:
        outcome.append(str(e))

thread = threading.Thread(target=init)
thread.start()
assert started.wait(30)
engine.shutdown()
thread.join(30)
assert outcome and "shutdown" in outcome[0], outcome
import time
until = time.monotonic() + 2.0  # the abandoned init thread notices the stop within 50 ms
while any(t.name == "torchxfer-init" for t in threading.enumerate()) and time.monotonic() < until:
    time.sleep(0.01)
print("exiting, init threads left:", sum(t.name == "torchxfer-init" for t in threading.enumerate()))
"""


def test_a_server_that_exits_right_after_shutdown_during_init_exits_cleanly():
    """A server stops while its worker still waits for a trainer that never came: ``shutdown()``,
    then the interpreter exits at once. The init thread the engine gave up on must be gone by
    then (it waits for the trainer's store in plain connection attempts that poll the stop);
    one left inside torch's store client made the interpreter abort at exit (SIGABRT)."""
    import subprocess
    import sys

    from tests.harness import free_port

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _EXIT_AFTER_SHUTDOWN, str(free_port())], capture_output=True,
                          text=True, timeout=DEADLINE)  # fmt: skip
    assert done.returncode == 0 and "exiting, init threads left: 0" in done.stdout, \
        (done.returncode, done.stdout, done.stderr[-2000:])  # fmt: skip
    assert time.monotonic() - start < 10.0 + 5.0  # not the init window, whatever the start-up takes
