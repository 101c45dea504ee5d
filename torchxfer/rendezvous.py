"""Who may join a side group: the store, the checks made through it, and the proof over the
connections that every member knows the token.

Everything here runs inside :func:`torchxfer.group.create_side_group`, on every rank together,
within its one deadline. The store is unauthenticated, so everything read from it is untrusted:
values are size-checked and parsed field by field, and text from it appears in an error only
quoted and labelled as unauthenticated unless an HMAC under the token vouches for it. Once the
group has formed, :func:`seal_listeners` makes this rank's Gloo listeners drop every new
connection. No private torch API is used here.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import errno
import hashlib
import hmac
import json
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import wire
from .config import wait_timeout
from .errors import TransferError

if TYPE_CHECKING:
    from .group import SideGroup

__all__ = ["Rendezvous", "Store", "bind", "bounded", "left", "make_store", "rendezvous", "seal_listeners"]

POLL_S = (0.002, 0.05)
"""Store polls back off from the first value to the second (seconds)."""
# Rendezvous values are a few hundred bytes; anything larger was not written by torchxfer.
_MAX_VALUE_BYTES = 4096
# Rank 0 lingers at most this long after a failure for arrived ranks to read it,
_LINGER_S = 1.0
# and never this long past the deadline: less than the caller's grace for its init thread
# (group._GRACE_S, 0.5 s), so rank 0's own precise error still reaches its caller, and the
# failed call releases the port.
_LINGER_PAST_DEADLINE_S = 0.3
# and at most this long (never past the deadline) for ranks that have not arrived yet.
_NEWCOMER_S = 3.0
_NONCE_BYTES = 32
_MAC_BYTES = 32  # an HMAC-SHA256 after each backend record (Store.authenticate)
_TRAINER_WORDS = ("protocol", "wire", "world_size", "nonce0", "nonce1", "nonce2", "nonce3")
"""Rank 0's record as store counters, for workers with a token (see :func:`rendezvous`)."""
_PROOF_WORDS = 8
"""An HMAC-SHA256 in hex as store counters: 8 hex digits a counter."""
_ANSWER_GRACE_S = 1.0
"""A worker with a token that sees an error before rank 0's answer waits this long (never past
its deadline) for the answer: rank 0 answers every worker whose proof holds before it fails."""


_WIRE_WORD = int(hashlib.sha256(wire.WIRE_SIGNATURE.encode()).hexdigest()[:8], 16)
"""The wire signature as one counter."""


def _to_words(hex_text: str) -> list[int]:
    return [int(hex_text[i : i + 8], 16) for i in range(0, len(hex_text), 8)]


def _from_words(words: list[int]) -> str | None:
    """Hex text of counters read from the store; None if one is not an 8-hex-digit word."""
    if not all(isinstance(w, int) and 0 <= w < 1 << 32 for w in words):
        return None
    return "".join(f"{w:08x}" for w in words)


def left(deadline: float) -> float:
    """Seconds to ``deadline`` (monotonic clock), at least 0.01."""
    return max(0.01, deadline - time.monotonic())


# -- store -------------------------------------------------------------------------


class Store(dist.Store):
    """The store handed to the backends: forwards to the TCPStore until detached.

    Backends keep a reference to their store for as long as they live; this
    indirection lets a formed group drop the TCPStore (and so rank 0's
    listener) while its backends stay up. Calls after ``detach`` raise.

    Once :meth:`authenticate` ran (after the rendezvous, before the backends
    are built, when the group has a token), every value set carries an HMAC
    under the token, over the group's rendezvous nonce, the full key and the
    value, and every value got must carry a valid one, or the get raises
    TransferError before the backend reads a byte of it. The backends parse
    what they read (Gloo: its peers' listener records, with lengths it does
    not bound; NCCL: the communicator's unique id): without this, a process
    that can reach the store but does not know the token could hand them a
    record that crashes the rank or points it at the stranger's own listener.
    Counters (``add``) and waits pass through.
    """

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self._inner: dist.Store | None = inner
        self._mac_key: bytes | None = None
        self.written: list[bytes] = []
        """Every value this rank set (a few KiB in all): where its backends published their listeners."""

    def authenticate(self, token: str, nonce: str) -> None:
        """From now on, sign every value set and check every value got (see the class docstring)."""
        self._mac_key = hmac.new(token.encode(), f"torchxfer backend records|{nonce}".encode(), hashlib.sha256).digest()

    def detach(self) -> None:
        self._inner = None

    def _s(self) -> dist.Store:
        inner = self._inner
        if inner is None:
            raise RuntimeError("torchxfer: the side group's store was closed after the group formed")
        return inner

    def _mac(self, key: str, value: bytes) -> bytes:
        name = key.encode("utf-8", "surrogatepass")
        return hmac.new(self._mac_key, len(name).to_bytes(8, "little") + name + value, hashlib.sha256).digest()

    def set(self, key: str, value: Any) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._s().set(key, data if self._mac_key is None else data + self._mac(key, data))
        self.written.append(data)

    def get(self, key: str) -> bytes:
        raw = self._s().get(key)
        if self._mac_key is None:
            return raw
        raw = bytes(raw)
        data, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) < _MAC_BYTES or not hmac.compare_digest(mac, self._mac(key, data)):
            raise TransferError(f"the side group was tampered with: the store's record {key!r:.120} does not carry "
                                "the token's HMAC (a process that does not know the token wrote it)")  # fmt: skip
        return data

    def add(self, key: str, amount: int) -> int:
        return self._s().add(key, amount)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return self._s().compare_set(key, expected, desired)

    def check(self, keys: list[str]) -> bool:
        return self._s().check(keys)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        if timeout is None:
            self._s().wait(keys)
        else:
            self._s().wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        return self._s().delete_key(key)

    def num_keys(self) -> int:
        return self._s().num_keys()



def _listen(address: str, port: int) -> socket.socket:
    """Bind ``address:port`` and listen. TransferError if the port is taken."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise TransferError(f"cannot resolve master_address {address!r}: {e}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise TransferError(f"port {port} on {address} is already in use: another trainer or "
                                "process is listening there; pick another master_port") from None
        raise TransferError(f"cannot listen on {address}:{port}: {e}") from None
    return sock


def make_store(address: str, port: int, rank: int, deadline: float,
               cancel: Cancel | None = None) -> tuple[Store, int]:  # fmt: skip
    """Rank 0 hosts the store on ``address:port``; the others connect to it.

    Blocks (a worker's connection can block without bound on a silent peer;
    the caller runs this in the bounded init thread). The TCPStore is held by
    the returned wrapper alone, so detaching it releases the port. A worker
    first waits, polling ``cancel``, for anything to accept connections there
    (see :func:`_await_listener`).
    """
    if rank == 0:
        sock = _listen(address, port)
        real_port = sock.getsockname()[1]
        try:
            # master_listen_fd hands the bound socket to the store, so the store
            # listens exactly where asked (the store alone would bind every
            # interface). The store owns the fd from here on (torch 2.6-2.13).
            store = Store(dist.TCPStore(
                address, real_port, None, True, wait_timeout(left(deadline)),
                wait_for_workers=False, master_listen_fd=sock.fileno(),
            ))  # fmt: skip
        except Exception as e:
            sock.close()
            raise TransferError(f"cannot start the store on {address}:{real_port}: {e}") from None
        sock.detach()
        return store, real_port
    _await_listener(address, port, rank, deadline, cancel)
    try:
        return Store(dist.TCPStore(address, port, None, False, wait_timeout(left(deadline)))), port
    except Exception as e:
        raise TransferError(
            f"rank {rank} could not reach the trainer's store at {address}:{port}: {e}"
        ) from None


def _await_listener(address: str, port: int, rank: int, deadline: float, cancel: Cancel | None) -> None:
    """Until something accepts a TCP connection on ``address:port`` (the trainer's store, which
    often starts after its workers): plain connection attempts, a few a second, ``cancel``
    polled between them. torch's store client would retry inside C++ until its own timeout,
    which nothing can interrupt: a worker stopped by ``shutdown()`` would leave a thread there,
    and a process exiting meanwhile aborts. TransferError at ``deadline``."""
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancel.error()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError(f"rank {rank} could not reach the trainer's store at {address}:{port}: nothing "
                                "accepted a connection there within the init window (is the trainer up?)")  # fmt: skip
        try:
            with socket.create_connection((address, port), timeout=min(4 * _CANCEL_POLL_S, remaining)):
                return
        except OSError:
            pass
        wait = min(_CANCEL_POLL_S, max(0.0, deadline - time.monotonic()))
        if cancel is not None:
            cancel.wait(wait)
        else:
            time.sleep(wait)


# -- rendezvous ---------------------------------------------------------------------


def _mac(token: str | None, *parts: object) -> str:
    """HMAC-SHA256 of ``parts`` under the token ("" without a token)."""
    if token is None:
        return ""
    # surrogatepass: a part read from the store (a nonce, an error message) may hold a lone
    # surrogate, which JSON carries and strict UTF-8 cannot encode.
    message = "|".join(["torchxfer", *map(str, parts)]).encode("utf-8", "surrogatepass")
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def _same(expected: str, got: object) -> bool:
    """Whether ``got``, text read from the store, equals ``expected`` (an HMAC in hex), in
    constant time. Compared as UTF-8 bytes: ``hmac.compare_digest`` refuses a str holding
    any character outside ASCII, which any process can write into the store."""
    return hmac.compare_digest(expected.encode(), str(got).encode("utf-8", "surrogatepass"))


def _quote(text: str, limit: int = 300) -> str:
    """Text read from the store, made printable and short, for an error message."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return f'"{clean}"' + ("..." if len(text) > limit else "")


class Rendezvous:
    """Store-based checks made by every rank before a backend is built.

    Everything read from the store is untrusted: a stranger can write any key.
    Values are size-checked and parsed field by field; text from the store
    appears in an error only quoted and labelled as unauthenticated, unless
    an HMAC under the token vouches for it.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float, deadline: float,
                 token: str | None) -> None:  # fmt: skip
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.deadline = deadline
        self.token = token
        self.nonce = ""  # rank 0's nonce: generated by rank 0, read from the store by the others
        # Whether this rank may read values of any length from the store: a worker with a token
        # only once the store's host proved it knows the token. torch's store client allocates
        # whatever length the host claims for a value, so a process posing as the trainer
        # (listening on its address first) could make a worker allocate gigabytes; counters,
        # checks and waits have replies of fixed size.
        self.trusted = rank == 0 or token is None
        self.mine = ""  # a worker's own nonce, once its hello is written (its answer can then come)
        self.words: list[int] = []  # rank 0: its record as counters (_TRAINER_WORDS)

    # -- errors ----------------------------------------------------------------

    def fail(self, message: str) -> None:
        """Publish ``message`` so every rank raises it, then raise it here. A message too long
        for one store record is published cut short (and signed as cut), never as cut JSON."""
        def record_of(text: str) -> str:
            return json.dumps({"rank": self.rank, "message": text,
                               "mac": _mac(self.token, "error", self.nonce, self.rank, text)})  # fmt: skip

        record = record_of(message)
        if len(record) > _MAX_VALUE_BYTES:  # the longest head that fits (JSON escapes: 1 to 12 bytes a character)
            low, high = 0, len(message)
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if len(record_of(message[:mid] + "...")) <= _MAX_VALUE_BYTES else (low, mid - 1)
            record = record_of(message[:low] + "...")
        with contextlib.suppress(Exception):
            if not self.store.check(["error"]):  # not compare_set: its reply is a value, of any length
                self.store.set("error", record)
        self._seen()
        raise TransferError(message)

    def _seen(self) -> None:
        """Count this worker among those that read the error; on rank 0, linger for them.

        Rank 0 hosts the store, so before its store goes away it waits until
        every worker has read the error: at most _LINGER_S for those that have
        claimed a rank (even past the deadline), and at most _NEWCOMER_S, never
        past the deadline, for those that have not come yet (one that arrives
        later can only report that the store is gone).
        """
        with contextlib.suppress(Exception):
            if self.rank != 0:
                self.store.add("error_seen", 1)
                return
            now = time.monotonic()
            claimed_by = min(now + min(_LINGER_S, self.timeout_s), self.deadline + _LINGER_PAST_DEADLINE_S)
            newcomers_by = min(now + _NEWCOMER_S, self.deadline)
            while True:
                seen, t = self.store.add("error_seen", 0), time.monotonic()
                if seen >= self.world_size - 1:
                    break  # every worker read it
                if t >= newcomers_by and (t >= claimed_by or seen >= self._claimants()):
                    break  # no more waiting for newcomers, and the arrived ones read it (or their time is up)
                time.sleep(POLL_S[0])

    def _claimants(self) -> int:
        """Workers that have claimed a rank so far (two processes may claim one rank)."""
        return self.store.add("claimants", 0)  # one key, whatever the world size: rank 0 polls it

    def _raise_published(self) -> None:
        refused = False
        if not self.trusted and self.mine:  # rank 0 answers or refuses every worker's hello before it fails
            answer, no = f"auth/{self.rank}", f"refused/{self.rank}"
            end = min(time.monotonic() + _ANSWER_GRACE_S, self.deadline)
            while not self.store.check([answer]) and not self.store.check([no]) and time.monotonic() < end:
                time.sleep(POLL_S[0])
            if self.store.check([answer]):
                self.verify_answer()
            refused = not self.trusted and self.store.check([no])
        if not self.trusted:
            self._seen()
            if refused:
                raise TransferError(f"authentication failed between the trainer (rank 0) and rank {self.rank}: the "
                                    "store says the trainer refused this rank's proof (a wrong or missing token on "
                                    "either side)")  # fmt: skip
            raise TransferError(
                f"the side group failed before the trainer answered rank {self.rank}: the store holds an error, "
                "which a rank with a token does not read before the trainer proved it knows the token (a process "
                "posing as the trainer could make it allocate without bound); the trainer's error names the cause")
        raw = self.store.get("error")
        self._seen()
        record = self._parse(raw, "error")
        message = record.get("message") if record else None
        rank = record.get("rank") if record else None
        if isinstance(message, str) and isinstance(rank, int) and self.token is not None and _same(
            _mac(self.token, "error", self.nonce, rank, message), record.get("mac", "")
        ):
            raise TransferError(message)
        text = message if isinstance(message, str) else raw.decode(errors="replace")
        raise TransferError(f"the side group could not form; the store holds this error, "
                            f"unauthenticated (any process can write it): {_quote(text)}")  # fmt: skip

    # -- reading ---------------------------------------------------------------

    def _poll(self, keys: list[str], what: str, give_up: bool = False, keys_first: bool = False) -> list[str]:
        """Wait until every key of ``keys`` is set, raising an error another rank published
        meanwhile (``keys_first``: unless the keys are set); at the deadline fail, or
        (``give_up``) return the keys still missing. Returns [] once all are set."""
        delay = POLL_S[0]
        while True:
            try:
                if keys_first and self.store.check(keys):
                    return []
                if self.store.check(["error"]):
                    self._raise_published()
                if self.store.check(keys):
                    return []
            except TransferError:
                raise
            except Exception as e:  # the store's host (rank 0) went away
                raise TransferError(f"rank {self.rank} lost the trainer's store while waiting for {what}: {e}") from None
            if time.monotonic() > self.deadline:
                missing = [k for k in keys if not self.store.check([k])]
                if give_up:
                    return missing
                self.fail(self._timed_out(what, missing))
            time.sleep(delay)
            delay = min(delay * 2, POLL_S[1])

    def _timed_out(self, what: str, missing: list[str]) -> str:
        """The message of a wait for ``what`` that ended at the deadline with ``missing`` keys unset."""
        return f"timed out after {self.timeout_s:g} s waiting for {what}: missing {missing}"

    def _parse(self, raw: bytes, key: str) -> dict | None:
        if len(raw) > _MAX_VALUE_BYTES:
            return None
        try:
            value = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None

    def read(self, key: str, what: str) -> dict:
        """Wait for ``key`` and return its JSON object; fail on anything torchxfer would not write."""
        self._poll([key], what)
        raw = self.store.get(key)
        value = self._parse(raw, key)
        if value is None:
            self.fail(f"the store's value under {key!r} ({len(raw)} bytes) is not what torchxfer writes: "
                      "another process wrote into the trainer's store")  # fmt: skip
        return value

    def write(self, key: str, value: dict) -> None:
        self.store.set(key, json.dumps(value))

    # -- the steps -------------------------------------------------------------

    def claim(self) -> None:
        if self.rank:
            self.store.add("claimants", 1)
        if self.store.add(f"claim/{self.rank}", 1) > 1:
            self.fail(f"two processes claim rank {self.rank} of the side group (the second is pid {os.getpid()} on "
                      f"{socket.gethostname()}); check rank_offset and the DP x TP x PP layout of every server")

    def version_problem(self, info: dict, who: str) -> str | None:
        protocol, signature = info.get("protocol"), info.get("wire")
        if protocol != wire.PROTOCOL_VERSION or signature != wire.WIRE_SIGNATURE:
            return (f"wire protocol mismatch: {who} speaks protocol {_quote(str(protocol), 40)} "
                    f"(wire {_quote(str(signature), 80)}), rank {self.rank} speaks protocol "
                    f"{wire.PROTOCOL_VERSION} (wire {wire.WIRE_SIGNATURE}); install the same torchxfer on both sides")
        return None

    def world_size_problem(self, trainer_world: object) -> str | None:
        if trainer_world == self.world_size:
            return None
        shown = trainer_world if isinstance(trainer_world, int) else _quote(str(trainer_world), 20)
        return f"rank {self.rank} was given world_size={self.world_size} but the trainer has world_size={shown}"

    # -- the trainer's record and proof, as a worker reads them ------------------------

    def read_trainer(self) -> None:
        """A worker: rank 0's nonce, checked against this rank's protocol and world size. With a
        token, read from store counters (replies of fixed size): the host is not authenticated yet."""
        if self.token is None:
            trainer = self.read("trainer", "the trainer (rank 0)")
            nonce = trainer.get("nonce")
            self.nonce = nonce if isinstance(nonce, str) and len(nonce) <= 64 else ""
            problem = self.version_problem(trainer, "the trainer (rank 0)")
            problem = problem or self.world_size_problem(trainer.get("world_size"))
        else:
            # Rank 0 sets its counters before this record. Once it is there, an error goes unread
            # until this rank's hello is written: rank 0 may then still answer this rank.
            self._poll(["trainer"], "the trainer (rank 0)", keys_first=True)
            words = [self.store.add(f"trainer/{key}", 0) for key in _TRAINER_WORDS]
            protocol, signature, trainer_world = words[:3]
            nonce = _from_words(words[3:])
            self.nonce = nonce or ""
            if protocol == 0 or nonce is None:
                problem = (f"authentication failed between the trainer (rank 0) and rank {self.rank}: the trainer did "
                           "not prove it knows the token (its store holds no record of this protocol: a torchxfer "
                           "older than this rank's, or a process posing as the trainer)")  # fmt: skip
            else:
                signature = wire.WIRE_SIGNATURE if signature == _WIRE_WORD else f"word {signature:#x}"
                problem = self.version_problem({"protocol": protocol, "wire": signature}, "the trainer (rank 0)")
                problem = problem or self.world_size_problem(trainer_world)
        if problem:
            self.fail(problem)

    def check_answer(self, mine: str) -> None:
        """A worker, once its hello is written: wait for rank 0's proof that it knows the token,
        over its nonce and ``mine``. At the deadline, the ranks that have not joined are named
        (what keeps rank 0 from answering), else the answer."""
        self.mine = mine
        missing = self._poll([f"auth/{self.rank}"], "the trainer's proof", give_up=True)
        if missing:
            absent = [f"hello/{r}" for r in range(self.world_size) if not self.store.check([f"hello/{r}"])]
            self.fail(self._timed_out("every rank to join", absent) if absent else
                      self._timed_out("the trainer's proof", missing))  # fmt: skip
        if self.token is None:
            if not _same("", str(self.read(f"auth/{self.rank}", "the trainer's proof").get("proof", ""))[:128]):
                self._refused()
        elif not self.trusted:
            self.verify_answer()

    def verify_answer(self) -> None:
        """A worker with a token whose answer key is set: read the answer from store counters (set
        before that key) and check it; from then on this rank reads values of any length."""
        got = _from_words([self.store.add(f"auth/{self.rank}/{i}", 0) for i in range(_PROOF_WORDS)])
        expected = _mac(self.token, "trainer", self.nonce, self.mine, self.rank, self.world_size)
        if got is None or not _same(expected, got):
            self._refused()
        self.trusted = True

    def _refused(self) -> None:
        self.fail(f"authentication failed between the trainer (rank 0) and rank {self.rank}: the trainer did not "
                  "prove it knows the token (wrong or missing token, or a process posing as the trainer)")

    # -- the workers' hellos, as rank 0 reads and answers them ---------------------------

    def answer_workers(self, mine: str) -> dict[int, dict]:
        """Rank 0: wait for every rank's hello (until all came, another rank published an error,
        or the deadline), answer each worker whose proof holds (counters, then the key
        ``auth/<rank>`` that says they are set), and only then report any failure, so that
        those workers read it. Returns the hellos by rank."""
        keys = [f"hello/{r}" for r in range(self.world_size)]
        delay, grace_end = POLL_S[0], None
        while not self.store.check(keys) and time.monotonic() < self.deadline:
            if self.store.check(["error"]):
                # Another rank failed: wait a little for the hellos of workers that claimed a rank.
                grace_end = grace_end or min(time.monotonic() + _ANSWER_GRACE_S / 2, self.deadline)
                arrived = sum(self.store.check([k]) for k in keys[1:])
                if arrived >= self._claimants() or time.monotonic() >= grace_end:
                    break
            time.sleep(delay)
            delay = min(delay * 2, POLL_S[1])
        missing = [k for k in keys if not self.store.check([k])]
        if [self.store.add(f"trainer/{key}", 0) for key in _TRAINER_WORDS] != self.words:
            self.fail("the side group was tampered with: another process changed the trainer's record counters "
                      "in the store, so no rank's proof can be checked")  # fmt: skip
        peers: dict[int, dict] = {}
        problems: list[str] = []
        for r in range(self.world_size):
            if f"hello/{r}" in missing:
                continue
            raw = self.store.get(f"hello/{r}")
            info = self._parse(raw, f"hello/{r}")
            if info is None:
                problems.append(f"the store's value under 'hello/{r}' ({len(raw)} bytes) is not what torchxfer "
                                "writes: another process wrote into the trainer's store")  # fmt: skip
                continue
            peers[r] = info
            if r == 0:
                continue
            who = (f"rank {r} (pid {_quote(str(info.get('pid')), 12)} on {_quote(str(info.get('host')), 64)}, "
                   "as it reported itself)")  # fmt: skip
            problem = self.version_problem(info, who)
            if problem is None and not _same(_mac(self.token, "hello", mine, info.get("nonce"), r, self.world_size),
                                             str(info.get("proof", ""))[:128]):  # fmt: skip
                trainer = self._parse(self.store.get("trainer"), "trainer") or {}  # its own record: set, never polled
                if trainer.get("nonce") != mine:
                    problem = ("the side group was tampered with: another process rewrote the trainer's nonce "
                               "in the store, so no rank's proof can be checked")  # fmt: skip
                else:
                    problem = f"authentication failed between the trainer (rank 0) and {who}: wrong or missing token"
            if problem is not None:
                problems.append(problem)
                self.store.set(f"refused/{r}", "1")  # the worker reports a failed authentication, not its cause
                continue
            proof = _mac(self.token, "trainer", mine, info.get("nonce"), r, self.world_size)
            if self.token is not None:
                for i, word in enumerate(_to_words(proof)):
                    self.add_word(f"auth/{r}/{i}", word)
            self.write(f"auth/{r}", {"proof": proof})  # with a token, the key that says the counters are set
        if self.store.check(["error"]):
            self._raise_published()
        if problems:
            self.fail(problems[0])
        if missing:
            self.fail(self._timed_out("every rank to join", missing))
        return peers

    def add_word(self, key: str, word: int) -> None:
        """Rank 0: publish ``word`` as the counter ``key``, which must not exist yet."""
        if self.store.add(key, word) != word:
            self.fail(f"the side group was tampered with: another process wrote the store's counter {key!r} "
                      "before the trainer")  # fmt: skip


def rendezvous(
    store: dist.Store, rank: int, world_size: int, timeout_s: float, deadline: float, token: str | None,
    uuid: str | None,
) -> str:
    """The store phase of :func:`create_side_group`; returns rank 0's nonce.

    Workers prove to rank 0 that they know the token with an HMAC over rank
    0's nonce (which rank 0 generated and never reads back) and their own;
    rank 0 answers each worker with an HMAC over the same pair. Neither proof
    can be replayed into another session: each side checks one over a nonce
    it generated itself.

    A worker with a token reads nothing of unbounded length from the store
    before rank 0's proof holds: rank 0's protocol, world size and nonce, and
    its proof, come as store counters (``trainer/<field>``, ``auth/<rank>/<i>``),
    each set before the key a worker waits for. Rank 0 answers every worker
    whose proof holds before it reports any failure, so those workers read its
    error; a worker not answered reports a failed authentication.
    """
    rdv = Rendezvous(store, rank, world_size, timeout_s, deadline, token)
    mine = secrets.token_hex(16)
    if rank == 0:
        rdv.nonce = mine
        rdv.words = [wire.PROTOCOL_VERSION, _WIRE_WORD, world_size, *_to_words(mine)]
        for key, word in zip(_TRAINER_WORDS, rdv.words):
            rdv.add_word(f"trainer/{key}", word)
        rdv.write("trainer", {"nonce": mine, "world_size": world_size,
                              "protocol": wire.PROTOCOL_VERSION, "wire": wire.WIRE_SIGNATURE})  # fmt: skip
    rdv.claim()
    if rank != 0:
        rdv.read_trainer()
    rdv.write(f"hello/{rank}", {
        "pid": os.getpid(), "host": socket.gethostname(), "uuid": uuid, "nonce": mine,
        "protocol": wire.PROTOCOL_VERSION, "wire": wire.WIRE_SIGNATURE,
        "proof": "" if rank == 0 else _mac(token, "hello", rdv.nonce, mine, rank, world_size),
    })  # fmt: skip
    if rank == 0:
        peers = rdv.answer_workers(mine)
    else:
        rdv.check_answer(mine)
        peers = {r: rdv.read(f"hello/{r}", "every rank to join") for r in range(world_size)}
    if uuid is not None:
        owners: dict[str, list[int]] = {}
        for r, info in peers.items():
            if isinstance(info.get("uuid"), str):
                owners.setdefault(info["uuid"], []).append(r)
        for gpu, ranks in owners.items():
            if len(ranks) > 1:
                rdv.fail(f"ranks {ranks} of the side group use the same GPU ({_quote(gpu, 80)}); "
                         "NCCL needs one GPU per rank")  # fmt: skip
    store.set(f"ok/{rank}", "1")
    rdv._poll([f"ok/{r}" for r in range(world_size)], "every rank to pass the checks")
    return rdv.nonce


# -- bounded calls and the binding proof --------------------------------------------------


_ABANDONED: list[threading.Thread] = []
_EXIT_WAIT_S = 2.0
"""At interpreter exit, how long in all to wait for init threads given up on to return: one
still inside torch's store or backend constructor when the interpreter finalizes is torn down
there, and C++ aborts the process (SIGABRT) instead of letting it exit."""


def _join_abandoned() -> None:
    until = time.monotonic() + _EXIT_WAIT_S
    for thread in _ABANDONED:
        thread.join(max(0.0, until - time.monotonic()))


atexit.register(_join_abandoned)


def _abandon(thread: threading.Thread) -> None:
    _ABANDONED[:] = [t for t in _ABANDONED if t.is_alive()] + [thread]


_CANCEL_POLL_S = 0.05


class Cancel(threading.Event):
    """An engine's stop signal for the inits under way: set by its ``shutdown()``.

    The waits of an init poll it (every 50 ms at most), and a group the init has formed
    but not yet handed to the engine is registered with :meth:`hold`, so that ``set``
    closes it at once: the collectives of the bind step and of the colocated handshake
    then end with TransferError within 50 ms instead of at the init's deadline."""

    def __init__(self) -> None:
        super().__init__()
        self._held_lock = threading.Lock()
        self._held: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._held_lock:
            super().set()
            held, self._held = self._held, []
        for close in held:
            close()

    def hold(self, close: Callable[[], None]) -> None:
        """Call ``close`` when this is set (at once if it already is), until :meth:`release`."""
        with self._held_lock:
            if not self.is_set():
                self._held.append(close)
                return
        close()

    def release(self) -> None:
        """Forget what :meth:`hold` registered: the init handed its group over."""
        with self._held_lock:
            self._held = []

    @staticmethod
    def error() -> TransferError:
        return TransferError("shutdown() was called while init_transfer_engine formed the side group; the engine "
                             "is not initialized", broken=True)  # fmt: skip


def bounded(fn: Callable[[], Any], deadline: float, on_late: Callable[[Any], None],
            what: Callable[[], str], cancel: threading.Event | None = None) -> Any:  # fmt: skip
    """Run ``fn`` in a daemon thread; return its result or raise its error, or
    raise TransferError if it is still running at ``deadline`` or once ``cancel``
    is set (noticed within 50 ms). A result that arrives after that is handed to
    ``on_late`` (to release it)."""
    box: dict[str, Any] = {}
    lock = threading.Lock()
    done = threading.Event()

    def body() -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            with lock:
                box["error"] = e
        else:
            with lock:
                late = "abandoned" in box
                if not late:
                    box["value"] = value
            if late:
                on_late(value)
        finally:
            done.set()

    thread = threading.Thread(target=body, daemon=True, name="torchxfer-init")
    thread.start()
    while not done.wait(max(0.0, min(_CANCEL_POLL_S, deadline - time.monotonic()))):
        if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
            break
    with lock:
        if "error" not in box and "value" not in box:
            box["abandoned"] = True
            _abandon(thread)
            if cancel is not None and cancel.is_set() and time.monotonic() < deadline:
                raise Cancel.error()
            raise TransferError(what())
    if "error" in box:
        error = box.pop("error")
        # The init thread's frames hold the store; a caller keeping the exception
        # must not keep the port (torch's store closes when its last reference goes).
        traceback.clear_frames(error.__traceback__)
        raise error
    return box.pop("value")


def _all_gather_bytes(group: "SideGroup", which: dist.ProcessGroup, payload: bytes, device: torch.device,
                      data: bool, deadline: float, what: str, cancel: Cancel | None) -> list[bytes]:  # fmt: skip
    # Memory torch owns (not torch.frombuffer): a Gloo thread freeing a Python-owned
    # buffer needs the GIL, which deadlocks against a thread enqueueing the next collective.
    mine = torch.tensor(list(payload), dtype=torch.uint8).to(device)
    outs = [torch.zeros_like(mine) for _ in range(group.size())]

    def issue() -> Any:
        # Bounded by the deadline itself, not by the backend's timeout, fixed when it was built.
        return group.all_gather_within(which, outs, mine, left(deadline))

    if data and group.backend_name == "nccl":
        # The first NCCL collective creates the communicator, which blocks until
        # every member's bootstrap answers.
        work = bounded(issue, deadline, lambda w: None, lambda: f"{what}: the NCCL communicator did not form", cancel)
    else:
        work = issue()
    group.wait(work, what, data=data, timeout_s=left(deadline))
    return [bytes(o.cpu().tolist()) for o in outs]


def bind(group: "SideGroup", token: str | None, nonce: str, deadline: float, cancel: Cancel | None = None) -> None:
    """Prove over each group's own connections that every member knows the token.

    Called by every rank together after the backends are built; blocks until
    ``deadline``. Each rank all_gathers a fresh nonce, then an HMAC of the
    transcript (every nonce, the group's name, rank 0's rendezvous nonce)
    and its rank, and checks every member's. Without a token the same
    exchange only checks that every member saw the same transcript. Once
    ``cancel`` is set (its holder closes the group), it raises ``Cancel.error()``.
    """
    rank, world = group.rank(), group.size()
    cpu = torch.device("cpu")
    for name, which, device, data in (("control", group.control, cpu, False),
                                      ("payload", group.pg, group.data_device or cpu, True)):  # fmt: skip
        mine = secrets.token_bytes(_NONCE_BYTES)
        try:
            nonces = _all_gather_bytes(group, which, mine, device, data, deadline, f"the {name} group's nonce exchange",
                                       cancel)  # fmt: skip
            transcript = hashlib.sha256(b"|".join([f"bind|{name}|{world}|{nonce}".encode(), *nonces])).hexdigest()
            key = (token or "").encode()
            mac = hmac.new(key, f"{transcript}|{rank}".encode(), hashlib.sha256).digest()
            macs = _all_gather_bytes(group, which, mac, device, data, deadline, f"the {name} group's proof exchange",
                                     cancel)  # fmt: skip
        except Exception as e:
            group.mark_broken(f"the {name} group could not be verified")
            if cancel is not None and cancel.is_set():
                raise Cancel.error() from None
            raise TransferError(f"rank {rank} could not verify the {name} group's connections ({e}); a peer died or "
                                "stopped, or the side group was tampered with", broken=True) from None  # fmt: skip
        bad = [r for r in range(world)
               if not hmac.compare_digest(macs[r], hmac.new(key, f"{transcript}|{r}".encode(), hashlib.sha256).digest())]
        if nonces[rank] != mine or bad:
            group.mark_broken(f"the {name} group failed its check")
            raise TransferError(
                f"the side group was tampered with: on the {name} group's connections, rank(s) {bad or [rank]} did "
                "not prove they know the token (a process outside the group took part in the connection setup); "
                "nothing was sent", broken=True)  # fmt: skip


# -- sealed listeners ------------------------------------------------------------


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_SO_ATTACH_FILTER = 26  # Linux
_DROP_ALL = (_SockFilter * 1)(_SockFilter(0x06, 0, 0, 0))  # BPF "ret #0": drop every packet
_DROP_ALL_PROG = _SockFprog(1, _DROP_ALL)


def _listening_fds() -> list[int]:
    """This process's listening TCP sockets (Linux: /proc); [] elsewhere."""
    try:
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                        listening.add(f"socket:[{fields[9]}]")
        fds = []
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}") in listening:
                    fds.append(int(name))
        return fds
    except OSError:
        return []


def _published(sock: socket.socket, written: list[bytes]) -> bool:
    """Whether this rank published ``sock``'s address in the store (a sockaddr_in
    or sockaddr_in6 within a value it set: family, port in network order, address)."""
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET:
        needle = (2).to_bytes(2, "little") + port.to_bytes(2, "big") + socket.inet_pton(socket.AF_INET, host)
        return any(needle in value for value in written)
    if sock.family == socket.AF_INET6:
        head, addr = (10).to_bytes(2, "little") + port.to_bytes(2, "big"), socket.inet_pton(socket.AF_INET6, host)
        for value in written:
            at = value.find(head)
            while at >= 0:
                if value[at + 8 : at + 24] == addr:
                    return True
                at = value.find(head, at + 1)
    return False


def seal_listeners(written: list[bytes]) -> None:
    """Make this rank's Gloo listeners drop every new connection; local, never blocks.

    Each Gloo backend keeps a listening socket for its whole life and keeps
    every connection it accepts (one file descriptor each, even once the
    peer has gone), although it needs no connection after the group formed.
    The listener is the backend's, so it stays open; a socket filter that
    drops every packet (Linux) makes it ignore a stranger's SYN, so no new
    connection ever reaches it. Only sockets whose address this rank itself
    published in the store while forming are touched. Elsewhere: nothing.
    """
    prog = ctypes.string_at(ctypes.addressof(_DROP_ALL_PROG), ctypes.sizeof(_DROP_ALL_PROG))
    for fd in _listening_fds():
        try:
            dup = os.dup(fd)  # a duplicate: fd stays the backend's
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=dup)  # of the socket's own family: IPv4 or IPv6
        except OSError:
            os.close(dup)
            continue
        with sock:
            with contextlib.suppress(OSError, ValueError):
                if _published(sock, written):
                    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)
