"""Hostile input at group formation: strangers, replays, silent and stopped peers.

Attackers are threads of this process using plain ``torch.distributed`` (a
TCPStore client, a Gloo backend built on the group's store keys), a raw
socket that accepts and never answers, or a spawned trainer that is
SIGSTOPped. Every wait is bounded: the library's ``timeout_s`` (1-3 s here)
< the harness deadline < pytest-timeout; spawned processes are killed by PID.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import torchxfer.group as group_mod
import torchxfer.rendezvous as rendezvous_mod
from tests.harness import ADDR, free_port, gloo_trainer, gloo_worker, run_threads
from torchxfer import (
    NCCLWeightTransferEngine,
    TransferError,
    destroy_side_group,
    side_group,
)

TIMEOUT = 2.0
SLACK = 1.5
PREFIX = "torchxfer/v1/"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(port: int, world: int, token: str | None = None, timeout: float = TIMEOUT) -> dist.ProcessGroup:
    return gloo_trainer(port, world, timeout=timeout, token=token)


def _worker(rank: int, port: int, world: int, token: str | None = None,
            timeout: float = TIMEOUT) -> NCCLWeightTransferEngine:  # fmt: skip
    return gloo_worker(rank, port, world, timeout=timeout, token=token)


def _timed(fn) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - inspected by the test
        return e, time.monotonic() - start
    return None, time.monotonic() - start


def _client(port: int, timeout: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore(ADDR, port, None, False, datetime.timedelta(seconds=timeout))


def _wait_key(store: dist.Store, key: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not store.check([key]):
        assert time.monotonic() < end, f"{key} never appeared"
        time.sleep(0.002)


# -- a stranger inside the backends ------------------------------------------------------


@pytest.mark.parametrize("macs", [True, False], ids=["store_macs", "proof_over_connections"])
@pytest.mark.parametrize("victim", [0, 1], ids=["forged_trainer", "stolen_worker_seat"])
def test_stranger_in_the_backends_is_caught_before_any_weight_byte(monkeypatch, victim, macs):
    """The store is unauthenticated: once the legitimate ranks have passed the
    token checks, a stranger builds the group's Gloo backends in the place of
    rank ``victim`` (here: the victim is held back, so the stranger wins the
    race every time). Its records in the store carry no HMAC under the token,
    so the legitimate rank's backends refuse them before parsing a byte
    (``rendezvous.Store.authenticate``). Without that layer (``macs`` False: as if the
    stranger had got past it), the proof over the connections themselves
    (``rendezvous.bind``) refuses it. Either way the stranger never gets a
    header through, and nothing is sent or loaded."""
    port = free_port()
    real_build = group_mod._build_backend
    release = threading.Event()

    def held_back(pg, name, store, timeout_s, **kwargs):
        if pg.rank() == victim:
            release.wait(TIMEOUT + 1)
            raise TransferError("held back by the test")
        return real_build(pg, name, store, timeout_s, **kwargs)

    monkeypatch.setattr(group_mod, "_build_backend", held_back)
    if not macs:
        monkeypatch.setattr(rendezvous_mod.Store, "authenticate", lambda self, token, nonce: None)
    loaded: list = []

    def legit(rank: int) -> tuple[BaseException | None, float]:
        if rank == 0:
            return _timed(lambda: NCCLWeightTransferEngine.trainer_send_weights(
                iter([("w", torch.arange(8.0))]), _trainer(port, 2, token="s3cret")))  # fmt: skip
        return _timed(lambda: _worker(1, port, 2, token="s3cret").receive_weights(None, loaded.extend))

    def stranger() -> dict:
        store = _client(port)
        _wait_key(dist.PrefixStore(PREFIX, store), f"ok/{victim}")
        seen: dict = {}
        timeout = datetime.timedelta(seconds=3 if not macs else 1)  # with MACs its backends never form
        try:
            backends = [dist.ProcessGroupGloo(dist.PrefixStore(f"{PREFIX}{name}/", store), victim, 2, timeout)
                        for name in ("payload", "control")]  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the legitimate rank refused the stranger's records
            seen["broadcast"] = f"failed: no backends ({type(e).__name__})"
            return seen
        for b in backends:
            b._set_sequence_number_for_group()
        control = backends[1]
        for round_ in ("nonces", "macs"):  # take part, without the token
            outs = [torch.zeros(32, dtype=torch.uint8) for _ in range(2)]
            try:
                control.allgather([outs], [torch.randint(0, 255, (32,), dtype=torch.uint8)]).wait()
            except Exception as e:  # noqa: BLE001 - the legitimate rank has left
                seen["broadcast"] = f"failed: {round_} ({type(e).__name__})"
                return seen
            seen[round_] = True
        header = torch.zeros(4096, dtype=torch.uint8)
        try:  # as rank 1: wait for the first header; as rank 0: push a forged one
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            control.broadcast([header], opts).wait()
            seen["broadcast"] = bool(header.any()) if victim == 1 else "sent"
        except Exception as e:  # noqa: BLE001 - the legitimate rank has left
            seen["broadcast"] = f"failed: {type(e).__name__}"
        return seen

    box: dict = {}
    def run_stranger() -> None:
        try:
            box["stranger"] = stranger()
        except Exception as e:  # noqa: BLE001 - shown by the assertion below
            box["stranger"] = {"broadcast": f"raised {type(e).__name__}: {e}"}

    thread = threading.Thread(target=run_stranger, daemon=True)
    thread.start()
    legit_rank = 1 - victim
    outcomes = run_threads(lambda r: legit(r) if r == legit_rank else (legit(r), release.set()), 2, deadline_s=20)
    out = outcomes[legit_rank].value
    release.set()
    thread.join(15)
    error, elapsed = out
    assert isinstance(error, TransferError), error
    assert "tampered with" in str(error) and ("HMAC" in str(error)) == macs, error
    assert elapsed < TIMEOUT + SLACK, elapsed
    if not macs:  # refused by the proof itself, which names the stranger's seat: not a timeout
        assert f"on the control group's connections, rank(s) [{victim}] did not prove" in str(error), error
        assert elapsed < TIMEOUT, elapsed
    assert loaded == []
    # Seated as the worker, the stranger never got a header; as the trainer, it could not push one.
    assert box["stranger"]["broadcast"].startswith("failed"), box



# -- the store phase: replays, junk and forged errors --------------------------------------


@pytest.mark.parametrize("rewrite_nonce", [True, False])
def test_replayed_proof_is_refused(monkeypatch, rewrite_nonce):
    """A sniffer recorded the trainer's record and a worker's hello from one
    session; in the next it replays them as rank 1 (rewriting the nonce first,
    or not). Rank 0 checks proofs against the nonce it generated itself."""
    recorded: dict = {}
    real_write = rendezvous_mod.Rendezvous.write

    def sniff(self, key, value):
        recorded[key] = json.dumps(value)
        real_write(self, key, value)

    monkeypatch.setattr(rendezvous_mod.Rendezvous, "write", sniff)
    port = free_port()
    run_threads(lambda r: destroy_side_group(_trainer(port, 2, "s3cret")) if r == 0
                else _worker(1, port, 2, "s3cret").shutdown(), 2, deadline_s=20)  # fmt: skip
    monkeypatch.undo()

    port = free_port()

    def replayer() -> None:
        store = dist.PrefixStore(PREFIX, _client(port))
        _wait_key(store, "trainer")
        if rewrite_nonce:
            store.set("trainer", recorded["trainer"])
        store.add("claim/1", 1)
        store.set("hello/1", recorded["hello/1"])

    threading.Thread(target=replayer, daemon=True).start()
    error, elapsed = _timed(lambda: _trainer(port, 2, "s3cret"))
    assert isinstance(error, TransferError), error
    phrase = "tampered with" if rewrite_nonce else "authentication failed"
    assert phrase in str(error), error
    assert elapsed < TIMEOUT + SLACK


JUNK = [b"\xff\xfe not json", b"[1, 2, 3]", b'{"protocol": [], "nonce": {}, "proof": 5, "pid": "x"}', b"x" * (1 << 20)]


@pytest.mark.parametrize("junk", JUNK, ids=["bytes", "list", "types", "huge"])
def test_junk_in_the_store_never_crashes_a_rank(junk):
    port = free_port()

    def stranger() -> None:
        store = dist.PrefixStore(PREFIX, _client(port))
        _wait_key(store, "trainer")
        store.add("claim/1", 1)
        store.set("hello/1", junk)

    threading.Thread(target=stranger, daemon=True).start()
    error, elapsed = _timed(lambda: _trainer(port, 2))
    assert type(error) is TransferError, repr(error)
    assert elapsed < TIMEOUT + SLACK
    assert "xxxxxxxxxx" not in str(error)


# Text any process may write into the store: beyond ASCII, and a lone surrogate (JSON carries it).
ODD_TEXT = ["\u00e9" * 64, "\ud800" * 64]


@pytest.mark.parametrize("text", ODD_TEXT, ids=["non_ascii", "surrogate"])
def test_a_proof_or_nonce_beyond_ascii_is_a_failed_authentication(text):
    """A stranger's hello carries a proof and a nonce that are not ASCII: the trainer
    reports a failed authentication, not a lost store."""
    from torchxfer import wire

    port = free_port()

    def stranger() -> None:
        store = dist.PrefixStore(PREFIX, _client(port))
        _wait_key(store, "trainer")
        store.add("claim/1", 1)
        store.set("hello/1", json.dumps({"pid": 1, "host": "h", "nonce": text, "protocol": wire.PROTOCOL_VERSION,
                                         "wire": wire.WIRE_SIGNATURE, "proof": text}))  # fmt: skip

    threading.Thread(target=stranger, daemon=True).start()
    error, elapsed = _timed(lambda: _trainer(port, 2, "s3cret"))
    assert type(error) is TransferError, repr(error)
    assert "authentication failed between the trainer (rank 0) and rank 1" in str(error), error
    assert elapsed < TIMEOUT + SLACK


@pytest.mark.parametrize("text", ODD_TEXT, ids=["non_ascii", "surrogate"])
def test_a_trainer_proof_or_nonce_beyond_ascii_is_a_failed_authentication(text):
    """A fake trainer (a bare store) hands a worker a nonce and a proof that are not ASCII."""
    from torchxfer import wire

    host = dist.TCPStore(ADDR, 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    store = dist.PrefixStore(PREFIX, host)
    store.set("trainer", json.dumps({"nonce": text[:32], "world_size": 2, "protocol": wire.PROTOCOL_VERSION,
                                     "wire": wire.WIRE_SIGNATURE}))  # fmt: skip
    store.set("hello/0", json.dumps({"pid": 1, "host": "h", "nonce": "ab" * 16, "protocol": wire.PROTOCOL_VERSION,
                                     "wire": wire.WIRE_SIGNATURE, "proof": ""}))  # fmt: skip
    store.set("auth/1", json.dumps({"proof": text}))
    error, elapsed = _timed(lambda: _worker(1, host.port, 2, "s3cret"))
    assert type(error) is TransferError, repr(error)
    assert "the trainer did not prove it knows the token" in str(error), error
    assert elapsed < TIMEOUT + SLACK


@pytest.mark.parametrize("text", ODD_TEXT, ids=["non_ascii", "surrogate"])
def test_an_error_beyond_ascii_written_by_a_stranger_is_labelled(text):
    port = free_port()

    def stranger() -> None:
        store = dist.PrefixStore(PREFIX, _client(port))
        _wait_key(store, "trainer")
        store.set("error", json.dumps({"rank": 1, "message": text, "mac": text}))

    threading.Thread(target=stranger, daemon=True).start()
    error, elapsed = _timed(lambda: _trainer(port, 2, "s3cret"))
    assert type(error) is TransferError, repr(error)
    assert str(error).startswith("the side group could not form; the store holds this error, unauthenticated")
    assert elapsed < TIMEOUT + SLACK


def test_error_written_by_a_stranger_is_labelled():
    port = free_port()

    def stranger() -> None:
        store = dist.PrefixStore(PREFIX, _client(port))
        _wait_key(store, "trainer")
        store.set("error", json.dumps({"rank": 1, "message": "send your weights to evil.example", "mac": "00"}))

    threading.Thread(target=stranger, daemon=True).start()
    error, elapsed = _timed(lambda: _trainer(port, 2, "s3cret"))
    assert isinstance(error, TransferError), error
    assert str(error).startswith("the side group could not form; the store holds this error, unauthenticated")
    assert elapsed < TIMEOUT + SLACK


def test_wire_version_mismatch_fails_clearly_on_each_side():
    """A fake trainer (a bare store) speaking protocol 999 to a real worker, and a
    fake worker speaking it to a real trainer."""
    host = dist.TCPStore(ADDR, 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    dist.PrefixStore(PREFIX, host).set("trainer", json.dumps(
        {"nonce": "ab" * 16, "world_size": 2, "protocol": 999, "wire": "v999"}))
    error, elapsed = _timed(lambda: _worker(1, host.port, 2))
    assert isinstance(error, TransferError) and "wire protocol mismatch" in str(error), error
    assert "999" in str(error) and elapsed < TIMEOUT + SLACK

    port = free_port()

    def old_worker() -> None:
        store = dist.PrefixStore(PREFIX, _client(port))
        _wait_key(store, "trainer")
        store.add("claim/1", 1)
        store.set("hello/1", json.dumps({"pid": 1, "host": "h", "nonce": "cd" * 16, "protocol": 999, "wire": "v999",
                                         "proof": ""}))  # fmt: skip

    threading.Thread(target=old_worker, daemon=True).start()
    error, elapsed = _timed(lambda: _trainer(port, 2))
    assert isinstance(error, TransferError) and "wire protocol mismatch" in str(error), error
    assert elapsed < TIMEOUT + SLACK


# -- bounded inits and released ports ------------------------------------------------------


def test_silent_listener_and_empty_port_bound_the_worker_init():
    silent = socket.socket()
    silent.bind((ADDR, 0))
    silent.listen(8)
    accepted: list = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    try:
        for port in (silent.getsockname()[1], free_port()):  # accepts and never answers; nothing listens
            error, elapsed = _timed(lambda: _worker(1, port, 2))
            assert isinstance(error, TransferError), error
            assert elapsed < TIMEOUT + SLACK, (port, elapsed)
    finally:
        silent.close()


def test_failed_init_releases_the_port_at_once():
    port = free_port()
    first, elapsed = _timed(lambda: _trainer(port, 2, timeout=1.0))  # nobody comes
    assert isinstance(first, TransferError) and "timed out" in str(first), first
    assert elapsed < 1.0 + SLACK
    # The exception (and its traceback) is still referenced: the retry must bind anyway.
    out = run_threads(lambda r: destroy_side_group(_trainer(port, 2)) if r == 0
                      else _worker(1, port, 2).shutdown(), 2, deadline_s=20)  # fmt: skip
    assert all(o.ok for o in out) and first is not None


def test_a_worker_that_claims_a_rank_and_dies_leaves_rank_0_its_precise_error_and_the_port():
    """A worker claims rank 1, then goes (a bare store client here). Rank 0 lingers after its
    timeout for that worker to read the error, but never past its caller's grace: its own
    error ("timed out ... missing") reaches the caller, and the port is free at once."""
    port = free_port()

    def dead_worker() -> None:
        end = time.monotonic() + 10
        while True:
            try:
                store = _client(port)
                break
            except Exception:  # noqa: BLE001 - the trainer's store is not up yet
                assert time.monotonic() < end
                time.sleep(0.02)
        claims = dist.PrefixStore(PREFIX, store)
        claims.add("claimants", 1)
        claims.add("claim/1", 1)

    threading.Thread(target=dead_worker, daemon=True).start()
    first, elapsed = _timed(lambda: _trainer(port, 2, timeout=TIMEOUT))
    assert isinstance(first, TransferError) and "timed out" in str(first) and "hello/1" in str(first), first
    assert elapsed < TIMEOUT + 0.5, elapsed
    out = run_threads(lambda r: destroy_side_group(_trainer(port, 2)) if r == 0
                      else _worker(1, port, 2).shutdown(), 2, deadline_s=20)  # fmt: skip
    assert all(o.ok for o in out)


def test_backend_records_carry_an_hmac_under_the_token():
    """What the backends read from the store (Gloo's listener records, NCCL's unique id) must
    carry an HMAC under the token over the group's nonce, the key and the value: a forged,
    moved, cut or replayed record is a TransferError before a backend parses a byte of it."""
    inner = dist.HashStore()

    def signed(token: str, nonce: str) -> rendezvous_mod.Store:
        store = rendezvous_mod.Store(inner)
        store.authenticate(token, nonce)
        return store

    store = signed("s3cret", "nonce-1")
    store.set("payload//0/1", b"\x01\x02record")
    assert store.get("payload//0/1") == b"\x01\x02record"
    store.set("text", "abc")
    assert store.get("text") == b"abc" and store.written == [b"\x01\x02record", b"abc"]
    inner.set("forged", b"\xff" * 8 + b"x" * 40)
    inner.set("short", b"x")
    inner.set("moved", inner.get("payload//0/1"))
    inner.set("cut", inner.get("payload//0/1")[1:])
    for reader, key in [(store, "forged"), (store, "short"), (store, "moved"), (store, "cut"),
                        (signed("s3cret", "nonce-2"), "payload//0/1"), (signed("other", "nonce-1"), "payload//0/1")]:
        with pytest.raises(TransferError, match="tampered with.*HMAC"):
            reader.get(key)
    assert store.add("counter", 2) == 2 and store.check(["counter"])
    plain = rendezvous_mod.Store(inner)  # no token: values pass as they are
    plain.set("raw", b"abc")
    assert inner.get("raw") == b"abc" == plain.get("raw")


def test_a_stranger_writing_gloo_records_never_crashes_a_rank():
    """A stranger who knows only the port overwrites rank 1's Gloo listener record, in a loop,
    with one whose length fields point far outside it (Gloo does not bound them: unchecked,
    this crashed the reading rank with SIGSEGV). Every legitimate rank either forms the group
    (it read the real record first) or raises TransferError naming the missing HMAC; the
    process survives either way."""
    port = free_port()
    stop = threading.Event()
    bad = (1 << 30).to_bytes(8, "little") + b"x" * 8

    def stranger() -> None:
        end = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < end:
            try:
                store = _client(port, timeout=2.0)
                break
            except Exception:  # noqa: BLE001 - the trainer's store is not up yet
                time.sleep(0.01)
        else:
            return
        while not stop.is_set():
            try:
                for name in ("payload", "control"):
                    store.set(f"{PREFIX}{name}//0/1", bad)
            except Exception:  # noqa: BLE001 - the store went away
                return

    thread = threading.Thread(target=stranger, daemon=True)
    thread.start()

    def rank(r: int) -> str:
        try:
            if r == 0:
                destroy_side_group(_trainer(port, 2, token="s3cret"))
            else:
                _worker(1, port, 2, token="s3cret").shutdown()
            return "formed"
        except TransferError as e:
            return str(e)

    out = run_threads(rank, 2, deadline_s=20)
    stop.set()
    thread.join(5)
    assert all(o.ok for o in out), out  # formed, or a TransferError: nothing else, and no crash
    failed = [o.value for o in out if o.value != "formed"]
    assert not failed or any("HMAC" in v for v in failed), failed


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 here")
def test_an_ipv6_gloo_listener_is_sealed_too():
    """seal_listeners finds this rank's listeners by the addresses it published and drops every
    new connection to them: IPv6 ones too (their family read from the socket itself)."""
    try:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        listener.listen(8)
        port = listener.getsockname()[1]
        record = (10).to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4) + socket.inet_pton(socket.AF_INET6, "::1")
        with socket.create_connection(("::1", port), timeout=2):
            pass  # open before sealing
        rendezvous_mod.seal_listeners([b"gloo" + record + bytes(4)])
        with pytest.raises(OSError):  # the SYN is dropped: the connect times out
            socket.create_connection(("::1", port), timeout=0.5).close()


def _late_then_stopped_worker(port: int, ready: Any, slow_s: float) -> None:
    """A worker process that builds its first backend ``slow_s`` late, then stops (SIGSTOP)
    just before the payload group's nonce exchange."""
    import torchxfer.group as g
    import torchxfer.rendezvous as r

    real_build, real_gather = g._build_backend, r._all_gather_bytes
    late = [True]

    def slow_build(*args: Any, **kwargs: Any) -> Any:
        if late[0]:
            late[0] = False
            time.sleep(slow_s)
        return real_build(*args, **kwargs)

    def stop_in_payload(group: Any, which: Any, payload: bytes, device: Any, data: bool, *rest: Any) -> Any:
        if data:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real_gather(group, which, payload, device, data, *rest)

    g._build_backend, r._all_gather_bytes = slow_build, stop_in_payload
    ready.set()
    with contextlib.suppress(Exception):
        gloo_worker(1, port, 2, timeout=TIMEOUT)


def test_a_peer_stopped_in_the_connection_check_costs_the_trainer_no_more_than_its_timeout():
    """The worker is late to build its backends, then stops inside the proof exchange. The
    trainer's init raises within its timeout (plus the grace for its init thread), and dropping
    that exception returns at once: no collective is left pending past the deadline, whose
    teardown would block the thread (the backend's own timeout dates from before it was built)."""
    import multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_late_then_stopped_worker, args=(port, ready, 1.5), daemon=True)
    proc.start()
    try:
        assert ready.wait(60)
        start = time.monotonic()
        try:
            _trainer(port, 2, timeout=TIMEOUT)
        except TransferError:
            raised = time.monotonic() - start
        else:
            pytest.fail("the trainer formed a group with a stopped worker")
        dropped = time.monotonic() - start - raised
        assert raised < TIMEOUT + 0.5 + SLACK, raised
        assert dropped < 0.5, dropped
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)


_STOPPABLE = """
import sys, threading, torchxfer
def serve(port, world):
    try:
        torchxfer.NCCLWeightTransferEngine.trainer_init(
            dict(master_address="127.0.0.1", master_port=port, world_size=world), backend="gloo", timeout_s=60)
    except Exception:
        pass
threads = [threading.Thread(target=serve, args=(int(p), 3)) for p in sys.argv[1:]]
[t.start() for t in threads]
[t.join(60) for t in threads]
"""


def test_stopped_trainer_bounds_every_worker_init():
    """A trainer process is SIGSTOPped: one worker had joined it before, the
    other connects after. Both raise within timeout_s."""
    joined, fresh = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen([sys.executable, "-c", _STOPPABLE, str(joined), str(fresh)], env=env)
    try:
        end = time.monotonic() + 30
        for port in (joined, fresh):
            while True:
                assert time.monotonic() < end and proc.poll() is None, "the trainer never listened"
                try:
                    socket.create_connection((ADDR, port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        results: dict = {}

        def worker(name: str, port: int) -> None:
            results[name] = _timed(lambda: _worker(1, port, 3))

        first = threading.Thread(target=worker, args=("joined", joined), daemon=True)
        first.start()
        watcher = _client(joined)
        _wait_key(dist.PrefixStore(PREFIX, watcher), "hello/1")  # joined: now waiting in the rendezvous for rank 2
        del watcher
        os.kill(proc.pid, signal.SIGSTOP)
        second = threading.Thread(target=worker, args=("fresh", fresh), daemon=True)
        second.start()
        first.join(TIMEOUT + 5)
        second.join(TIMEOUT + 5)
        for name in ("joined", "fresh"):
            error, elapsed = results[name]
            assert isinstance(error, TransferError), (name, error)
            limit = TIMEOUT + SLACK + (0.5 if name == "joined" else 0.0)
            assert elapsed < limit, (name, elapsed)
    finally:
        proc.kill()
        proc.wait(10)


# -- a formed group ------------------------------------------------------------------------


def test_formed_group_closes_the_store_and_close_interrupts_a_wait(caplog):
    """After formation nothing listens on the port and a stranger's earlier
    connection is closed; close() from another thread ends a blocked receive
    well within timeout_s; formation and shutdown are logged at INFO."""
    caplog.set_level(logging.INFO, logger="torchxfer")
    port = free_port()
    timeout = 30.0
    seen: dict = {}

    def body(rank: int) -> object:
        if rank == 0:
            group = _trainer(port, 2, timeout=timeout)
            seen["formed"] = True
            return group
        end = time.monotonic() + 10
        while True:  # a stranger, before formation: as soon as the trainer listens
            try:
                early = socket.create_connection((ADDR, port), timeout=2)
                break
            except OSError:
                assert time.monotonic() < end, "the trainer never listened"
                time.sleep(0.01)
        engine = _worker(1, port, 2, timeout=timeout)
        early.settimeout(2)
        seen["early"] = early.recv(16)
        with pytest.raises(OSError):
            socket.create_connection((ADDR, port), timeout=2).close()
        pg = engine.model_update_group
        threading.Timer(0.3, side_group(pg).close).start()
        error, elapsed = _timed(lambda: engine.receive_weights(None, lambda batch: None))
        engine.shutdown()
        return error, elapsed

    out = run_threads(body, 2, deadline_s=30)
    destroy_side_group(out[0].value)
    error, elapsed = out[1].value
    assert isinstance(error, TransferError) and "closed" in str(error), error
    assert elapsed < 1.5, elapsed
    assert seen["early"] == b""
    messages = [r.getMessage() for r in caplog.records if r.name == "torchxfer"]
    assert any("side group formed: rank 1 of 2, gloo" in m for m in messages), messages
    assert any("side group closed" in m for m in messages), messages


def test_a_store_lost_mid_rendezvous_is_a_transfer_error(monkeypatch):
    """A store call that fails inside the rendezvous (rank 0 went away between two
    calls) reaches the worker as a TransferError naming the store, within the
    timeout, never as torch's raw DistNetworkError."""
    port = free_port()
    host = dist.TCPStore(ADDR, port, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)

    def lost(*args, **kwargs):
        raise dist.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed.")

    monkeypatch.setattr(rendezvous_mod, "rendezvous", lost)
    start = time.monotonic()
    with pytest.raises(TransferError, match=rf"rank 1 lost the trainer's store at {ADDR}:{port} during the rendezvous"):
        group_mod.create_side_group(ADDR, port, 1, 2, backend="gloo", timeout_s=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT
    del host


@pytest.mark.parametrize("token", [None, "s3cret"], ids=["no_token", "token"])
@pytest.mark.parametrize("text", ["m" * 9000, "\u00e9" * 3000, "\ud800" * 2000], ids=["ascii", "non_ascii", "surrogate"])
def test_an_error_longer_than_a_store_record_reaches_every_rank_cut_short_and_signed(token, text):
    """A rank's error longer than one store record (a timeout naming many missing keys in a
    large world) is published cut short as valid JSON: another rank raises it, still vouched
    for by the token, not labelled as a stranger's."""
    store = dist.HashStore()
    failing = rendezvous_mod.Rendezvous(store, 1, 3, 1.0, time.monotonic() + 1.0, token)
    reader = rendezvous_mod.Rendezvous(store, 2, 3, 1.0, time.monotonic() + 1.0, token)
    reader.trusted = True  # a worker the trainer has answered: it reads errors from the store
    message = "timed out waiting for every rank: missing " + text
    with pytest.raises(TransferError) as own:
        failing.fail(message)
    assert str(own.value) == message  # the failing rank raises it whole
    record = store.get("error")
    assert len(record) <= rendezvous_mod._MAX_VALUE_BYTES
    with pytest.raises(TransferError) as other:
        reader._raise_published()
    published = json.loads(record)["message"]
    assert published.endswith("...") and message.startswith(published[:-3]) and len(published) > 500
    if token is None:
        assert "unauthenticated" in str(other.value) and "timed out waiting for every rank: missing" in str(other.value)
    else:
        assert str(other.value) == published


# -- a worker reads nothing of unbounded length before the trainer's proof ---------------------------


@pytest.mark.parametrize("tokens", [("s3cret",) * 3, ("s3cret", "s3cret", "b4d-t0ken")], ids=["good", "one_bad_token"])
def test_a_worker_with_a_token_reads_no_store_value_before_the_trainer_proved_itself(monkeypatch, tokens):
    """torch's store client allocates whatever length the store's host claims for a value. A
    worker with a token reads values (get, compare_set) only once the trainer's proof held;
    before that, counters and checks only. Every rank still gets the failed authentication."""
    rdvs: dict[str, Any] = {}
    early: list = []
    real_init = rendezvous_mod.Rendezvous.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        rdvs[threading.get_ident()] = self  # formation runs in an init thread of each rank

    def watch(name: str):
        real = getattr(rendezvous_mod.Store, name)

        def call(self, key, *args):
            rdv = rdvs.get(threading.get_ident())
            if rdv is not None and rdv.rank != 0 and not rdv.trusted:
                early.append((rdv.rank, name, key))
            return real(self, key, *args)

        return call

    monkeypatch.setattr(rendezvous_mod.Rendezvous, "__init__", init)
    for name in ("get", "compare_set"):
        monkeypatch.setattr(rendezvous_mod.Store, name, watch(name))
    port = free_port()

    def body(rank: int) -> str | None:
        try:
            if rank == 0:
                destroy_side_group(_trainer(port, 3, tokens[0]))
            else:
                _worker(rank, port, 3, tokens[rank]).shutdown()
        except TransferError as e:
            return str(e)
        return None

    errors = [o.value for o in run_threads(body, 3, deadline_s=60)]
    assert early == []
    assert sorted(rdv.rank for rdv in rdvs.values()) == [0, 1, 2]
    assert all(rdv.trusted for rdv in rdvs.values() if tokens[rdv.rank] == tokens[0])
    if len(set(tokens)) == 1:
        assert errors == [None, None, None]
    else:
        assert all(e and "authentication failed" in e for e in errors), errors
        assert "rank 2" in errors[1]  # the honest worker was answered first, and read the trainer's precise error


def _fake_store_host() -> tuple[socket.socket, list]:
    """A process posing as the trainer: it speaks torch's store protocol (2.13's request codes),
    answers every counter with 0 and every check with "set" (but of an error), and answers a value's read with a
    claimed length of 2**62 bytes (a client that believed it would try to allocate that much).
    Returns its listening socket and the log of request codes it saw."""
    def take(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = conn.recv(n - len(data))
            if not more:
                raise EOFError
            data += more
        return data

    def text(conn: socket.socket) -> bytes:
        return take(conn, int.from_bytes(take(conn, 8), "little"))

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError, EOFError), conn:
            while True:
                code = take(conn, 1)[0]
                log.append(code)
                if code == 0:  # validate: a magic number, no answer
                    take(conn, 4)
                elif code == 13:  # ping: echo
                    conn.sendall(take(conn, 4))
                elif code == 1:  # set
                    text(conn), text(conn)
                elif code == 4:  # add
                    text(conn), take(conn, 8)
                    conn.sendall((0).to_bytes(8, "little"))
                elif code == 5:  # check: every key is set but an error
                    keys = [text(conn) for _ in range(int.from_bytes(take(conn, 8), "little"))]
                    conn.sendall(b"\x01" if any(k.endswith(b"error") for k in keys) else b"\x00")
                elif code in (2, 3, 9):  # compare_set, get, multi_get: a value of any length
                    conn.sendall((1 << 62).to_bytes(8, "little"))
                    return
                else:
                    return

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()

    log: list = []
    server = socket.create_server((ADDR, 0))
    threading.Thread(target=accept, daemon=True).start()
    return server, log


def test_a_process_posing_as_the_trainer_cannot_make_a_worker_with_a_token_read_a_value():
    server, log = _fake_store_host()
    try:
        error, elapsed = _timed(lambda: _worker(1, server.getsockname()[1], 2, "s3cret", timeout=3.0))
    finally:
        server.close()
    assert type(error) is TransferError and "authentication failed" in str(error), repr(error)
    assert "the trainer did not prove it knows the token" in str(error)
    assert elapsed < 3.0 + SLACK
    assert 4 in log and not {2, 3, 9} & set(log), log  # counters read, no value


def _formation_errors(port: int, setups: dict[int, tuple]) -> dict[int, str | None]:
    """Rank r forms its side of a group as ``setups[r] = (world, token, timeout)`` (thread-ranks,
    Gloo); each rank's TransferError message, or None."""
    def body(rank: int) -> str | None:
        world, token, timeout = setups[rank]
        try:
            if rank == 0:
                destroy_side_group(_trainer(port, world, token, timeout=timeout))
            else:
                _worker(rank, port, world, token, timeout=timeout).shutdown()
        except TransferError as e:
            return str(e)
        return None

    return {o.rank: o.value for o in run_threads(body, len(setups), deadline_s=60)}


def test_with_a_token_an_honest_worker_still_reads_another_workers_precise_error():
    """Worker 2 is told another world size: worker 1, answered by the trainer before it
    fails, reads the precise message instead of a generic one."""
    errors = _formation_errors(free_port(), {0: (3, "s3cret", 3.0), 1: (3, "s3cret", 3.0), 2: (4, "s3cret", 3.0)})
    for rank, message in errors.items():
        assert message and "rank 2 was given world_size=4 but the trainer has world_size=3" in message, (rank, message)


@pytest.mark.parametrize("token", [None, "s3cret"], ids=["no_token", "token"])
def test_a_worker_that_times_out_first_names_the_rank_that_never_came(token):
    """Rank 2 never comes; worker 1's deadline comes before the trainer's: it names the missing
    rank (hello/2), not the trainer's answer it was waiting for."""
    port = free_port()

    def body(rank: int) -> str | None:
        try:
            if rank == 0:
                destroy_side_group(_trainer(port, 3, token, timeout=4.0))
            else:
                _worker(1, port, 3, token, timeout=1.0).shutdown()
        except TransferError as e:
            return str(e)
        return None

    worker_error = run_threads(body, 2, deadline_s=30)[1].value
    assert worker_error and "timed out after 1 s waiting for every rank to join" in worker_error
    assert "hello/2" in worker_error and "auth/1" not in worker_error, worker_error


def test_counters_of_the_trainer_changed_by_a_stranger_are_reported_as_tampering():
    """A stranger adds to one of the trainer's record counters (its nonce) once the trainer set
    them; the worker joins after that: the trainer reports tampering, and no rank forms a group."""
    port = free_port()
    bumped = threading.Event()

    def body(rank: int) -> str | None:
        try:
            if rank == 0:
                destroy_side_group(_trainer(port, 2, "s3cret", timeout=3.0))
            elif rank == 1:
                assert bumped.wait(10)
                _worker(1, port, 2, "s3cret", timeout=3.0).shutdown()
            else:  # the stranger
                store = dist.PrefixStore(PREFIX, _client(port))
                _wait_key(store, "trainer")  # rank 0 sets its counters before this record
                store.add("trainer/nonce0", 1)
                bumped.set()
        except TransferError as e:
            return str(e)
        return None

    errors = [o.value for o in run_threads(body, 3, deadline_s=60)]
    assert errors[0] and "the side group was tampered with" in errors[0], errors[0]
    assert errors[1] is not None
