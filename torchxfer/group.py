"""The side process group: built from a TCPStore, next to any default group.

This is the only module that touches private torch APIs. Each use names the
torch versions it was checked on. (Two of them are not about groups: a DTensor's
stored local tensor, :func:`local_shard`, and torch's C++ tensor guards,
:func:`metadata_guard`.) The group is a plain ``torch.distributed
.ProcessGroup`` assembled from a store, so ``dist.broadcast(t, group=g,
group_src=0)`` and ``dist.all_reduce(t, group=g)`` work on it; torchxfer's own
state for it lives in a :class:`SideGroup` beside it. It never enters the
default world's maps, so it cannot disturb (or be disturbed by) the
trainer's own ``init_process_group``.

Life of a group, on every rank together, all of it within one ``timeout_s``:

1. rank 0 binds ``address:port`` and hosts a TCPStore; the others connect;
2. rendezvous through the store, before any backend exists: each rank claims
   its rank number once, agrees on the world size and the wire protocol,
   proves it knows the token (HMAC over rank 0's fresh nonce and its own)
   and, for NCCL, publishes its GPU's UUID; rank 0 proves it knows the token
   to each worker the same way. Any problem is written to the store so that
   every rank raises a TransferError instead of waiting for the one that
   will never come;
3. the payload backend (Gloo or NCCL) and the control group (Gloo) are built;
4. binding: on each of the two groups, every rank all_gathers a fresh
   nonce, then an HMAC of the whole transcript, and checks every member's.
   The store is unauthenticated, so a stranger can put its own address where
   a rank's should be; this step proves, over the very connections that will
   carry the weights, that every member knows the token;
5. the store is dropped: rank 0 stops listening and every rank closes its
   store connection, so strangers cannot hold resources of a formed group.

The store phase and the backend construction run in a daemon thread that the
caller waits for at most until the deadline: a TCPStore client blocks without
bound on a peer that accepts and never answers (a stopped trainer, a silent
listener), and no store call can be interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import wire
from .config import check_timeout, check_token, wait_timeout
from .errors import TransferError

__all__ = ["SideGroup", "create_side_group", "side_group", "destroy_side_group", "local_shard"]

log = logging.getLogger("torchxfer")

_GROUPS: "weakref.WeakKeyDictionary[dist.ProcessGroup, SideGroup]" = weakref.WeakKeyDictionary()

_PREFIX = "torchxfer/v1/"
_POLL_S = (0.002, 0.05)
# A wait on a collective checks the closed flag this often.
_SLICE_S = 0.05
CONTROL_POLL_US = 3000
"""NCCL side groups: a wait on a control step (a Gloo row) first polls for this many
microseconds, yielding the CPU between polls, before it blocks (see ``SideGroup.wait``).
On 2x H200, 256 MiB x 2 buffers: 0.91x, 0.91x against 0.89x, 0.90x without, alternated
(each bucket's step waits for the one before it). Not on Gloo side groups, which share
their CPUs with the payload."""
# Rendezvous values are a few hundred bytes; anything larger was not written by torchxfer.
_MAX_VALUE_BYTES = 4096
# How long the caller waits past the deadline for the init thread to report its own, precise error.
_GRACE_S = 0.5
# Rank 0 lingers at most this long after a failure for arrived ranks to read it,
_LINGER_S = 1.0
# and at most this long (never past the deadline) for ranks that have not arrived yet.
_NEWCOMER_S = 3.0
_NONCE_BYTES = 32


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _left(deadline: float) -> float:
    return max(0.01, deadline - time.monotonic())


class SideGroup:
    """State that torchxfer keeps beside one side ``ProcessGroup``.

    The group itself is a plain ``torch.distributed.ProcessGroup`` (what
    ``trainer_init`` returns and ``model_update_group`` holds), so
    ``dist.broadcast(t, group=g, group_src=0)`` works on it; it carries the
    payload. Beside it, every side group has a small Gloo group of its own
    for headers and status (``control``, CPU tensors): control messages then
    never queue behind a payload on the same connection or stream, so the
    next bucket is agreed while the current one is still on the wire. This
    object holds what torch's does not: the control group, device, timeout,
    health, and the pipeline's buffers and CUDA streams (``cache``), created
    once per group. Find it with :func:`side_group`; it lives as long as the
    ProcessGroup.

    Attributes:
        backend_name: "gloo" or "nccl", the payload backend.
        data_device: the rank's CUDA device for nccl, None for gloo (payload
            stays on the device of the tensors).
        control: the Gloo ProcessGroup for headers and status.
        timeout_s: bound on every wait on this group.
        address, port: where rank 0's store listened while the group formed.
        cache: transfer state (buffers, streams, counters) owned by the pipeline.
    """

    def __init__(
        self,
        pg: dist.ProcessGroup,
        control: dist.ProcessGroup,
        *,
        backend_name: str,
        data_device: torch.device | None,
        timeout_s: float,
        address: str,
        port: int,
        store: _Store | None = None,
    ) -> None:
        # Not a ProcessGroup subclass on purpose: a Python subclass routes every
        # collective through a trampoline that holds the GIL while Gloo takes its
        # queue lock, which deadlocks against Gloo threads freeing Python-owned
        # tensors (seen on torch 2.13).
        self._pg = weakref.ref(pg)
        self._rank = pg.rank()
        self._size = pg.size()
        self.control = control
        self.backend_name = backend_name
        self.data_device = data_device
        self.timeout_s = timeout_s
        self.address = address
        self.port = port
        self.cache: dict[str, Any] = {}
        self._store = store
        self._backends: list[Any] = []
        self._broken: str | None = None
        self._closed = False
        self._waiting = 0
        self._lock = threading.Lock()

    @property
    def pg(self) -> dist.ProcessGroup:
        pg = self._pg()
        if pg is None:
            raise TransferError("the side group's ProcessGroup was garbage collected", broken=True)
        return pg

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"SideGroup(rank={self.rank()}, world_size={self.size()}, backend={self.backend_name!r}, "
            f"address={self.address!r}, port={self.port})"
        )

    # -- state -----------------------------------------------------------------

    @property
    def broken(self) -> str | None:
        """Why the group can no longer be used, or None while it is healthy."""
        return self._broken

    @property
    def closed(self) -> bool:
        return self._closed

    def check_usable(self) -> None:
        """Raise TransferError if the group is closed or broken."""
        if self._closed:
            raise TransferError("the side group is closed", broken=True)
        if self._broken is not None:
            raise TransferError(
                f"the side group is broken ({self._broken}); shut down and build a new one", broken=True
            )

    def mark_broken(self, reason: str) -> None:
        """Record a failure that leaves the group unusable, and abort the backend.

        Aborting unblocks any collective still queued on this group (NCCL
        kernels waiting for a dead peer) without touching other groups.
        """
        with self._lock:
            first = self._broken is None
            if first:
                self._broken = reason
        if first and not self._closed:
            log.warning("torchxfer side group (rank %d of %d) is broken: %s", self._rank, self._size, reason)
        self._abort()

    # -- payload ---------------------------------------------------------------

    @property
    def coalesces(self) -> bool:
        """Whether :meth:`broadcast_group` posts a group of broadcasts as one NCCL group call."""
        return self.backend_name == "nccl"

    def broadcast_group(self, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """Post the broadcasts of ``tensors`` from group rank 0, in order; returns the works to
        wait for. Does not block. Every rank of the group calls it with tensors of the same
        sizes, grouped alike (``packing.payload_groups``).

        On NCCL, two or more tensors go as one NCCL group call: one kernel launch for all of
        them, and one work, which completes once every one of them did and holds all of
        them until it is waited. Each broadcast still waits, on the GPU, for what the
        current stream issued before this call. Otherwise one work per tensor. Raises what
        torch raises for a collective that cannot be posted (the caller breaks the group).
        """
        if len(tensors) > 1 and self.coalesces:
            return [_coalesced_broadcasts(self.pg, tensors)]
        return [_broadcast(self.pg, t) for t in tensors]

    # -- waiting ---------------------------------------------------------------

    def wait(self, work: Any, what: str, *, data: bool = False, timeout_s: float | None = None) -> None:
        """Block until ``work`` completes, at most ``timeout_s`` (default: the group's).

        ``data`` says the work is a payload collective on the main group (NCCL
        or Gloo); otherwise it is a control collective (always Gloo).

        Raises TransferError (and marks the group broken) if the collective
        fails, times out, or the group is closed from another thread (noticed
        within 50 ms). On CUDA with NCCL this polls the work from the CPU so
        that a dead peer is noticed within the timeout; the side communicator
        alone is then aborted, never the process.
        """
        if work is None:
            return
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        with self._lock:
            self._waiting += 1
        try:
            if not data or self.backend_name == "gloo":
                # Work.wait(timeout) bounds the wait on the CPU even for an op still
                # queued behind a stuck one, whose own Gloo timeout would never
                # start. On a timeout it raises "Operation timed out!" and leaves
                # the work running (torch 2.6-2.13), so waiting in slices lets
                # close() interrupt it.
                if not data and CONTROL_POLL_US and self.backend_name == "nccl":
                    # A row that completes while this thread is blocked costs it a wake-up after
                    # Gloo's own threads; during an update each step waits for the one before.
                    until = time.monotonic() + min(CONTROL_POLL_US * 1e-6, limit)
                    while not work.is_completed() and time.monotonic() < until:
                        time.sleep(0)
                while True:
                    try:
                        if work.wait(wait_timeout(min(_SLICE_S, _left(deadline)))):
                            break
                    except Exception:
                        if work.is_completed():
                            # The slice may have expired just before the work
                            # succeeded: only the work's own outcome counts.
                            # On a completed work wait() returns at once, or
                            # raises the work's own error.
                            work.wait()
                            break
                    self._check_wait(deadline, limit)
            else:
                # NCCL's wait() only orders streams; poll completion from the CPU
                # so a dead peer is noticed within the timeout.
                delay = 0.0
                while not work.is_completed():
                    self._check_wait(deadline, limit)
                    time.sleep(delay)
                    delay = min(max(delay * 2, 1e-5), 5e-5)
                work.wait()
        except Exception as e:  # any backend failure: peer death, timeout, abort, close
            if self._closed:
                reason = f"{what} was interrupted on rank {self.rank()}: the side group was closed"
                self.mark_broken(reason)
                raise TransferError(reason, broken=True) from None
            reason = f"{what} failed on rank {self.rank()}: {type(e).__name__}: {e}".strip()
            self.mark_broken(reason)
            raise TransferError(
                f"{reason}. A peer may have died or stopped responding within {limit:g} s.", broken=True
            ) from e
        finally:
            with self._lock:
                self._waiting -= 1

    def wait_all(self, works: list[Any], what: str, *, data: bool = False) -> None:
        """Block until every work of ``works`` completes, at most ``timeout_s`` for each (see :meth:`wait`).

        Payload collectives on NCCL run on one stream, so the last completes after
        every earlier one: only the last is polled. The others are then waited too,
        which costs microseconds (they are complete) and matters for memory: a
        NCCL work holds the tensors it was posted with, for the caching
        allocator's safety, until it is waited, and one never waited holds them
        until the NCCL watchdog drops it (torch 2.6-2.13). Fresh tensors received
        in an update would otherwise pile up during it.
        """
        if not works:
            return
        if not (data and self.backend_name == "nccl"):
            for work in works:
                self.wait(work, what, data=data)
            return
        self.wait(works[-1], what, data=True)
        try:
            for work in works[:-1]:
                work.wait()
        except Exception as e:
            reason = f"{what} failed on rank {self.rank()}: {type(e).__name__}: {e}".strip()
            self.mark_broken(reason)
            raise TransferError(
                f"{reason}. A peer may have died or stopped responding within {self.timeout_s:g} s.", broken=True
            ) from e

    def _check_wait(self, deadline: float, limit: float) -> None:
        if self._closed:
            raise RuntimeError("closed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no completion after {limit:g} s")

    # -- teardown --------------------------------------------------------------

    def _abort(self) -> None:
        # Backend.abort exists for NCCL (torch 2.6-2.13); Gloo has none and its
        # pending work fails on its own once peers close their sockets.
        for backend in self._backends:
            with contextlib.suppress(Exception):
                if hasattr(backend, "abort"):
                    backend.abort()

    def release_store(self) -> None:
        """Drop this rank's use of the store: rank 0 stops listening and closes
        every connection to it (its port is free again); a worker closes its
        connection. Local; called once the group has formed, as nothing after
        that needs the store."""
        store, self._store = self._store, None
        if store is not None:
            store.detach()

    def close(self) -> None:
        """Release the group's buffers and streams and shut its backend down.

        Local and idempotent: it does not wait for peers. A ``wait`` blocked in
        another thread raises TransferError within 50 ms.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = self._waiting
        log.info("torchxfer side group closed (rank %d of %d, %s:%d)", self._rank, self._size, self.address, self.port)
        self.cache.clear()
        if self._broken is not None or waiting:
            self._abort()
        for backend in self._backends:
            with contextlib.suppress(Exception):
                if hasattr(backend, "shutdown"):
                    # Backend.shutdown: torch 2.6-2.13; absent on some older Gloo builds.
                    backend.shutdown()
        self.release_store()


# -- store -------------------------------------------------------------------------


class _Store(dist.Store):
    """The store handed to the backends: forwards to the TCPStore until detached.

    Backends keep a reference to their store for as long as they live; this
    indirection lets a formed group drop the TCPStore (and so rank 0's
    listener) while its backends stay up. Calls after ``detach`` raise.
    """

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self._inner: dist.Store | None = inner
        self.written: list[bytes] = []
        """Every value this rank set (a few KiB in all): where its backends published their listeners."""

    def detach(self) -> None:
        self._inner = None

    def _s(self) -> dist.Store:
        inner = self._inner
        if inner is None:
            raise RuntimeError("torchxfer: the side group's store was closed after the group formed")
        return inner

    def set(self, key: str, value: Any) -> None:
        self._s().set(key, value)
        self.written.append(value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        return self._s().get(key)

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
    except socket.gaierror as e:
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


def _make_store(address: str, port: int, rank: int, deadline: float) -> tuple[_Store, int]:
    """Rank 0 hosts the store on ``address:port``; the others connect to it.

    Blocks (a worker's connection can block without bound on a silent peer;
    the caller runs this in the bounded init thread). The TCPStore is held by
    the returned wrapper alone, so detaching it releases the port.
    """
    if rank == 0:
        sock = _listen(address, port)
        real_port = sock.getsockname()[1]
        try:
            # master_listen_fd hands the bound socket to the store, so the store
            # listens exactly where asked (the store alone would bind every
            # interface). The store owns the fd from here on (torch 2.6-2.13).
            store = _Store(dist.TCPStore(
                address, real_port, None, True, wait_timeout(_left(deadline)),
                wait_for_workers=False, master_listen_fd=sock.fileno(),
            ))  # fmt: skip
        except Exception as e:
            sock.close()
            raise TransferError(f"cannot start the store on {address}:{real_port}: {e}") from None
        sock.detach()
        return store, real_port
    try:
        return _Store(dist.TCPStore(address, port, None, False, wait_timeout(_left(deadline)))), port
    except Exception as e:
        raise TransferError(
            f"rank {rank} could not reach the trainer's store at {address}:{port}: {e}"
        ) from None


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


class _Rendezvous:
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

    # -- errors ----------------------------------------------------------------

    def fail(self, message: str) -> None:
        """Publish ``message`` so every rank raises it, then raise it here."""
        record = json.dumps({"rank": self.rank, "message": message,
                             "mac": _mac(self.token, "error", self.nonce, self.rank, message)})  # fmt: skip
        with contextlib.suppress(Exception):
            self.store.compare_set("error", "", record[:_MAX_VALUE_BYTES])
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
            claimed_by = now + min(_LINGER_S, self.timeout_s)
            newcomers_by = min(now + _NEWCOMER_S, self.deadline)
            while True:
                seen, t = self.store.add("error_seen", 0), time.monotonic()
                if seen >= self.world_size - 1:
                    break  # every worker read it
                if t >= newcomers_by and (t >= claimed_by or seen >= self._claimants()):
                    break  # no more waiting for newcomers, and the arrived ones read it (or their time is up)
                time.sleep(_POLL_S[0])

    def _claimants(self) -> int:
        """Workers that have claimed a rank so far (two processes may claim one rank)."""
        return sum(self.store.add(f"claim/{r}", 0) for r in range(1, self.world_size)
                   if self.store.check([f"claim/{r}"]))  # fmt: skip

    def _raise_published(self) -> None:
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

    def _poll(self, keys: list[str], what: str) -> None:
        delay = _POLL_S[0]
        while True:
            try:
                if self.store.check(["error"]):
                    self._raise_published()
                if self.store.check(keys):
                    return
            except TransferError:
                raise
            except Exception as e:  # the store's host (rank 0) went away
                raise TransferError(f"rank {self.rank} lost the trainer's store while waiting for {what}: {e}") from None
            if time.monotonic() > self.deadline:
                missing = [k for k in keys if not self.store.check([k])]
                self.fail(f"timed out after {self.timeout_s:g} s waiting for {what}: missing {missing}")
            time.sleep(delay)
            delay = min(delay * 2, _POLL_S[1])

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
        if self.store.add(f"claim/{self.rank}", 1) > 1:
            self.fail(f"two processes claim rank {self.rank} of the side group (the second is pid {os.getpid()} on "
                      f"{socket.gethostname()}); check rank_offset and the DP x TP x PP layout of every server")

    def check_versions(self, info: dict, who: str) -> None:
        protocol, signature = info.get("protocol"), info.get("wire")
        if protocol != wire.PROTOCOL_VERSION or signature != wire.WIRE_SIGNATURE:
            self.fail(f"wire protocol mismatch: {who} speaks protocol {_quote(str(protocol), 40)} "
                      f"(wire {_quote(str(signature), 80)}), rank {self.rank} speaks protocol "
                      f"{wire.PROTOCOL_VERSION} (wire {wire.WIRE_SIGNATURE}); install the same torchxfer on both sides")


def gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return str(getattr(props, "uuid", f"{socket.gethostname()}:{device.index}"))


def _rendezvous(
    store: dist.Store, rank: int, world_size: int, timeout_s: float, deadline: float, token: str | None,
    uuid: str | None,
) -> str:
    """The store phase of :func:`create_side_group`; returns rank 0's nonce.

    Workers prove to rank 0 that they know the token with an HMAC over rank
    0's nonce (which rank 0 generated and never reads back) and their own;
    rank 0 answers each worker with an HMAC over the same pair. Neither proof
    can be replayed into another session: each side checks one over a nonce
    it generated itself.
    """
    rdv = _Rendezvous(store, rank, world_size, timeout_s, deadline, token)
    mine = secrets.token_hex(16)
    if rank == 0:
        rdv.nonce = mine
        rdv.write("trainer", {"nonce": mine, "world_size": world_size,
                              "protocol": wire.PROTOCOL_VERSION, "wire": wire.WIRE_SIGNATURE})  # fmt: skip
    rdv.claim()
    if rank != 0:
        trainer = rdv.read("trainer", "the trainer (rank 0)")
        nonce = trainer.get("nonce")
        rdv.nonce = nonce if isinstance(nonce, str) and len(nonce) <= 64 else ""
        rdv.check_versions(trainer, "the trainer (rank 0)")
        trainer_world = trainer.get("world_size")
        if trainer_world != world_size:
            shown = trainer_world if isinstance(trainer_world, int) else _quote(str(trainer_world), 20)
            rdv.fail(f"rank {rank} was given world_size={world_size} but the trainer has world_size={shown}")
    rdv.write(f"hello/{rank}", {
        "pid": os.getpid(), "host": socket.gethostname(), "uuid": uuid, "nonce": mine,
        "protocol": wire.PROTOCOL_VERSION, "wire": wire.WIRE_SIGNATURE,
        "proof": "" if rank == 0 else _mac(token, "hello", rdv.nonce, mine, rank, world_size),
    })  # fmt: skip
    peers = {r: rdv.read(f"hello/{r}", "every rank to join") for r in range(world_size)}

    if rank == 0:
        for r in range(1, world_size):
            info = peers[r]
            who = (f"rank {r} (pid {_quote(str(info.get('pid')), 12)} on {_quote(str(info.get('host')), 64)}, "
                   "as it reported itself)")  # fmt: skip
            rdv.check_versions(info, who)
            expected = _mac(token, "hello", mine, info.get("nonce"), r, world_size)
            if not _same(expected, str(info.get("proof", ""))[:128]):
                trainer = rdv.read("trainer", "the trainer's own record")
                if trainer.get("nonce") != mine:
                    rdv.fail("the side group was tampered with: another process rewrote the trainer's nonce "
                             "in the store, so no rank's proof can be checked")  # fmt: skip
                rdv.fail(f"authentication failed between the trainer (rank 0) and {who}: wrong or missing token")
        for r in range(1, world_size):
            rdv.write(f"auth/{r}", {"proof": _mac(token, "trainer", mine, peers[r].get("nonce"), r, world_size)})
    else:
        answer = rdv.read(f"auth/{rank}", "the trainer's proof")
        expected = _mac(token, "trainer", rdv.nonce, mine, rank, world_size)
        if not _same(expected, str(answer.get("proof", ""))[:128]):
            rdv.fail(f"authentication failed between the trainer (rank 0) and rank {rank}: the trainer did not "
                     "prove it knows the token (wrong or missing token, or a process posing as the trainer)")
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


# -- backends ------------------------------------------------------------------------


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


NCCL_MIN_CTAS = 0
"""The side group's NCCL communicator's ``minCTAs`` (0: NCCL's own choice)."""
NCCL_MAX_CTAS = 0
"""Its ``maxCTAs`` (0: NCCL's own choice)."""


def _build_backend(pg: dist.ProcessGroup, backend_name: str, store: dist.Store, timeout_s: float) -> Any:
    """Make a Gloo or NCCL backend from the store and install it as ``pg``'s."""
    rank, world, timeout = pg.rank(), pg.size(), wait_timeout(timeout_s)
    types = dist.ProcessGroup.BackendType
    if backend_name == "gloo":
        # The 4-argument constructor honours GLOO_SOCKET_IFNAME (torch 2.6-2.13).
        backend = dist.ProcessGroupGloo(store, rank, world, timeout)
        backend_type, device_types = types.GLOO, ["cpu", "cuda"]
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        # The payload's kernels are scheduled before other work's pending blocks. A pack copy
        # into a buffer is released by the end of the broadcast that read it, the very moment
        # the next broadcast may start; at default priority the copy took every SM first and
        # that broadcast waited for it (about 0.09 ms per bucket on an H200).
        opts.is_high_priority_stream = True
        if NCCL_MIN_CTAS or NCCL_MAX_CTAS:  # (a measurement knob; NCCL chooses when both are 0)
            if NCCL_MIN_CTAS:
                opts.config.min_ctas = NCCL_MIN_CTAS
            if NCCL_MAX_CTAS:
                opts.config.max_ctas = NCCL_MAX_CTAS
        # The watchdog reads these when the backend is built (torch 2.6-2.13):
        # with error handling off it no longer tears the process down when a
        # collective times out; SideGroup.wait notices the timeout and aborts
        # this communicator alone, so an inference server outlives its trainer.
        # The heartbeat monitor and the dump-on-timeout would poll or write the
        # store, which is gone once the group has formed: the log gets our one
        # WARNING (SideGroup.mark_broken) instead of their stack traces.
        with _env(TORCH_NCCL_ASYNC_ERROR_HANDLING="0", TORCH_NCCL_ENABLE_MONITORING="0",
                  TORCH_NCCL_DUMP_ON_TIMEOUT="0"):  # fmt: skip
            backend = dist.ProcessGroupNCCL(store, rank, world, opts)
        backend_type, device_types = types.NCCL, ["cuda"]
    # Private: _set_sequence_number_for_group, _set_default_backend and
    # _register_backend are how init_process_group itself assembles a group
    # (torch 2.6-2.13); there is no public way to build one from a store.
    with contextlib.suppress(Exception):
        backend._set_sequence_number_for_group()
    pg._set_default_backend(backend_type)
    for device_type in device_types:
        pg._register_backend(torch.device(device_type), backend_type, backend)
    return backend


# -- bounded init ----------------------------------------------------------------------


def _bounded(fn: Callable[[], Any], deadline: float, on_late: Callable[[Any], None],
             what: Callable[[], str]) -> Any:  # fmt: skip
    """Run ``fn`` in a daemon thread; return its result or raise its error, or
    raise TransferError if it is still running at ``deadline``. A result that
    arrives after that is handed to ``on_late`` (to release it)."""
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

    threading.Thread(target=body, daemon=True, name="torchxfer-init").start()
    done.wait(max(0.0, deadline - time.monotonic()))
    with lock:
        if "error" not in box and "value" not in box:
            box["abandoned"] = True
            raise TransferError(what())
    if "error" in box:
        error = box.pop("error")
        # The init thread's frames hold the store; a caller keeping the exception
        # must not keep the port (torch's store closes when its last reference goes).
        traceback.clear_frames(error.__traceback__)
        raise error
    return box.pop("value")


def _form(address: str, port: int, rank: int, world_size: int, backend: str, data_device: torch.device | None,
          timeout_s: float, deadline: float, token: str | None, phase: list[str],
          ) -> tuple[dist.ProcessGroup, SideGroup, str]:  # fmt: skip
    """Store, rendezvous and backends; runs in the bounded init thread."""
    phase[0] = f"connecting to the trainer's store at {address}:{port}" if rank else f"starting the store on {address}:{port}"
    store, real_port = _make_store(address, port, rank, deadline)
    group = None
    try:
        phase[0] = "the rendezvous through the trainer's store"
        uuid = gpu_uuid(data_device) if data_device is not None else None
        try:
            nonce = _rendezvous(dist.PrefixStore(_PREFIX, store), rank, world_size, timeout_s, deadline, token, uuid)
        except TransferError:
            raise
        except Exception as e:  # the store's connection failed under a store call (rank 0 went away)
            raise TransferError(f"rank {rank} lost the trainer's store at {address}:{port} during the rendezvous "
                                f"({type(e).__name__}: {e}); the trainer stopped, failed, or gave up") from None
        pg = dist.ProcessGroup(store, rank, world_size)
        control = dist.ProcessGroup(store, rank, world_size)
        group = SideGroup(
            pg, control, backend_name=backend, data_device=data_device,
            timeout_s=timeout_s, address=address, port=real_port, store=store,
        )  # fmt: skip
        with contextlib.suppress(Exception):
            pg._set_group_name(f"torchxfer-{nonce[:12]}")  # private, torch 2.6-2.13
            control._set_group_name(f"torchxfer-{nonce[:12]}-control")
        for name, which, kind in (("payload", pg, backend), ("control", control, "gloo")):
            phase[0] = f"connecting the {name} group ({kind})"
            try:
                sub = dist.PrefixStore(f"{_PREFIX}{name}/", store)
                group._backends.append(_build_backend(which, kind, sub, _left(deadline)))
            except Exception as e:
                raise TransferError(f"rank {rank}: the {name} group ({kind}) could not connect: {e}") from None
        return pg, group, nonce  # the caller must hold pg: the SideGroup refers to it weakly
    except BaseException:
        if group is not None:
            group.close()
        store.detach()
        raise


def _all_gather_bytes(group: SideGroup, which: dist.ProcessGroup, payload: bytes, device: torch.device,
                      data: bool, deadline: float, what: str) -> list[bytes]:  # fmt: skip
    # Memory torch owns (not torch.frombuffer): a Gloo thread freeing a Python-owned
    # buffer needs the GIL, which deadlocks against a thread enqueueing the next collective.
    mine = torch.tensor(list(payload), dtype=torch.uint8).to(device)
    outs = [torch.zeros_like(mine) for _ in range(group.size())]

    def issue() -> Any:
        return dist.all_gather(outs, mine, group=which, async_op=True)

    if data and group.backend_name == "nccl":
        # The first NCCL collective creates the communicator, which blocks until
        # every member's bootstrap answers.
        work = _bounded(issue, deadline, lambda w: None, lambda: f"{what}: the NCCL communicator did not form")
    else:
        work = issue()
    group.wait(work, what, data=data, timeout_s=_left(deadline))
    return [bytes(o.cpu().tolist()) for o in outs]


def _bind(group: SideGroup, token: str | None, nonce: str, deadline: float) -> None:
    """Prove over each group's own connections that every member knows the token.

    Called by every rank together after the backends are built; blocks until
    ``deadline``. Each rank all_gathers a fresh nonce, then an HMAC of the
    transcript (every nonce, the group's name, rank 0's rendezvous nonce)
    and its rank, and checks every member's. Without a token the same
    exchange only checks that every member saw the same transcript.
    """
    rank, world = group.rank(), group.size()
    cpu = torch.device("cpu")
    for name, which, device, data in (("control", group.control, cpu, False),
                                      ("payload", group.pg, group.data_device or cpu, True)):  # fmt: skip
        mine = secrets.token_bytes(_NONCE_BYTES)
        try:
            nonces = _all_gather_bytes(group, which, mine, device, data, deadline, f"the {name} group's nonce exchange")
            transcript = hashlib.sha256(b"|".join([f"bind|{name}|{world}|{nonce}".encode(), *nonces])).hexdigest()
            key = (token or "").encode()
            mac = hmac.new(key, f"{transcript}|{rank}".encode(), hashlib.sha256).digest()
            macs = _all_gather_bytes(group, which, mac, device, data, deadline, f"the {name} group's proof exchange")
        except Exception as e:
            group.mark_broken(f"the {name} group could not be verified")
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


def create_side_group(
    address: str,
    port: int,
    rank: int,
    world_size: int,
    *,
    backend: str,
    device: torch.device | None = None,
    timeout_s: float,
    token: str | None = None,
) -> dist.ProcessGroup:
    """Build the side group and return its ProcessGroup. Called by every rank of it together; blocks.

    Rank 0 must be the trainer: it binds ``address:port``. The whole call
    (store connection, rendezvous, backend connection, the binding check) is
    bounded by ``timeout_s`` plus half a second, whether a peer is absent,
    stopped or silent; any failure raises TransferError on every rank that
    reached the store. A failed call releases the port at once. Once formed,
    the store is closed: the port is free and nothing listens on it.

    Raises:
        ValueError: an empty address, a world_size under 1, a rank outside
            ``[0, world_size)``, a port outside ``[0, 65535]`` (0: rank 0 only), a
            timeout_s that is not a positive number up to ``MAX_TIMEOUT_S``, a token
            that is not None or a non-empty string, an unknown backend, or a
            non-CUDA device for NCCL; raised before any socket is opened.
        TransferError: port in use, store unreachable or silent, a rank claimed
            twice, world sizes or wire protocols that disagree, a failed token
            check (in the store or over the connections: "tampered with"), two
            NCCL ranks on one GPU, a missing rank, or a backend that cannot
            connect.
    """
    start = time.monotonic()
    if not isinstance(address, str) or not address or "\0" in address:
        raise ValueError(f"create_side_group: address must be a non-empty string, got {address!r:.80}")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"create_side_group: world_size must be an int >= 1, got {world_size!r:.40}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r:.40} is outside the side group's world of size {world_size}")
    lowest = 0 if rank == 0 else 1  # rank 0 may ask for any free port; a worker connects to a real one
    if not _is_int(port) or not lowest <= port <= 65535:
        raise ValueError(f"create_side_group: port must be an int in [{lowest}, 65535], got {port!r:.40}")
    timeout_s = check_timeout("create_side_group", timeout_s)
    check_token("create_side_group", token)
    deadline = start + timeout_s
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, which is not available here; use backend='gloo'")
        device = device or torch.device("cuda", torch.cuda.current_device())
        if device.type != "cuda":
            raise ValueError(f"backend 'nccl' needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        data_device = device
    else:
        data_device = None

    phase = ["starting"]

    def late(result: tuple[dist.ProcessGroup, SideGroup, str]) -> None:
        result[1].close()

    def too_long() -> str:
        return (f"rank {rank}: {phase[0]} did not finish within {timeout_s:g} s; a peer is absent, stopped, or "
                f"something that does not answer holds {address}:{port}")  # fmt: skip

    pg, group, nonce = _bounded(
        lambda: _form(address, port, rank, world_size, backend, data_device, timeout_s, deadline, token, phase),
        deadline + _GRACE_S, late, too_long,
    )  # fmt: skip
    try:
        _bind(group, token, nonce, deadline + _GRACE_S)
    except BaseException:
        group.close()
        raise
    if group._store is not None:
        _seal_listeners(group._store.written)
        group._store.written = []
    group.release_store()
    _GROUPS[pg] = group
    log.info("torchxfer side group formed: rank %d of %d, %s, %s:%d, %.2f s",
             rank, world_size, backend, address, group.port, time.monotonic() - start)  # fmt: skip
    return pg


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_SO_ATTACH_FILTER = 26  # Linux
_DROP_ALL = (_SockFilter * 1)(_SockFilter(0x06, 0, 0, 0))  # BPF "ret #0": drop every packet
_DROP_ALL_PROG = _SockFprog(1, _DROP_ALL)


_ROOT_0 = dist.BroadcastOptions()
_ROOT_0.rootRank, _ROOT_0.rootTensor = 0, 0
if hasattr(_ROOT_0, "asyncOp"):  # torch 2.7+; earlier NCCL broadcasts are always asynchronous
    _ROOT_0.asyncOp = True


def _broadcast(pg: dist.ProcessGroup, tensor: torch.Tensor) -> Any:
    """``dist.broadcast(tensor, group=pg, group_src=0, async_op=True)`` for a payload tensor, which
    is always bytes (uint8: buffers, byte views, scratch; nothing for the wrapper to convert):
    the ProcessGroup's own method with options made once. The wrapper's checks, logging
    decorator and device-capability query cost tens of microseconds per call, as much as the
    call itself, and a bucket makes one call per tensor sent alone."""
    assert tensor.dtype == torch.uint8, tensor.dtype
    return pg.broadcast([tensor], _ROOT_0)


_GATHER_ASYNC = dist.distributed_c10d.AllgatherOptions()
if hasattr(_GATHER_ASYNC, "asyncOp"):
    _GATHER_ASYNC.asyncOp = True


def all_gather_row(pg: dist.ProcessGroup, out: torch.Tensor, row: torch.Tensor) -> Any:
    """``dist.all_gather_single(out, row, group=pg, async_op=True)`` for a control row (int64,
    never complex): the ProcessGroup's own method (``all_gather_single`` from torch 2.13 on,
    ``_allgather_base`` before), with options made once. Every rank posts one per step, on the
    trainer's critical path, and the wrapper's checks and decorators cost about as much as
    the call. Returns the work; raises what torch raises for a collective it cannot post."""
    call = getattr(pg, "all_gather_single", None) or pg._allgather_base
    return call(out, row, _GATHER_ASYNC)


def _coalesced_broadcasts(pg: dist.ProcessGroup, tensors: Sequence[torch.Tensor]) -> Any:
    """Broadcasts of ``tensors`` from group rank 0 as one NCCL group call; returns its one work.

    Private API: ``ProcessGroup._start_coalescing`` / ``_end_coalescing`` (torch 2.6-2.13), what
    ``dist._coalescing_manager`` calls for collectives without a ``*_coalesced`` form, without
    its Python bookkeeping. ProcessGroupNCCL makes its stream wait for the current stream at
    each broadcast's call, issues them between ``ncclGroupStart`` and ``ncclGroupEnd``, and
    returns from the end one work that stashes every tensor; the works the single calls
    return mean nothing and are dropped.
    """
    device = tensors[0].device
    pg._start_coalescing(device)
    try:
        for tensor in tensors:
            _broadcast(pg, tensor)
    finally:
        work = pg._end_coalescing(device)
    if work is None:
        raise RuntimeError("the NCCL group call returned no work")
    return work


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


def _seal_listeners(written: list[bytes]) -> None:
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
            sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a duplicate: fd stays the backend's
        except OSError:
            continue
        with sock:
            with contextlib.suppress(OSError, ValueError):
                if _published(sock, written):
                    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)


def local_shard(dtensor: Any) -> torch.Tensor:
    """A DTensor's local tensor as it is stored (``DTensor._local_tensor``, torch 2.6-2.13).

    ``to_local()`` makes a new view on every call (about 2.5 us); a send reads
    each shard's metadata and memory a few times per update, for every
    parameter of the model. Only for reading: nothing here writes through it or
    keeps it for autograd. Falls back to ``to_local()`` where the attribute is
    gone.
    """
    local = getattr(dtensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else dtensor.to_local()


def side_group(pg: Any) -> SideGroup:
    """torchxfer's state for a side group; ValueError if ``pg`` is not one."""
    try:
        return _GROUPS[pg]
    except (KeyError, TypeError):
        raise ValueError(f"expected a side group made by torchxfer (trainer_init / init_transfer_engine), "
                         f"got {type(pg).__name__}") from None


def destroy_side_group(pg: dist.ProcessGroup) -> None:
    """Shut a side group down on this rank: local, idempotent, never blocks on peers.
    ValueError if ``pg`` is not a ProcessGroup at all (None, say)."""
    try:
        group = _GROUPS.pop(pg, None)
    except TypeError:  # not weakly referable: no ProcessGroup
        raise ValueError(f"destroy_side_group expects a side group made by torchxfer (trainer_init / "
                         f"init_transfer_engine), got {type(pg).__name__}") from None
    if group is not None:
        group.close()


_GUARDS: Any = None  # torch's C++ tensor check, once it passed its self-test; False: not usable here


def _tensor_guards() -> Any:
    """``torch._C._dynamo.guards.TensorGuards`` (private, torch 2.11-2.13) if it behaves here as
    :func:`metadata_guard` needs (checked once per process against tensors that must fail it),
    else False."""
    global _GUARDS
    if _GUARDS is None:
        _GUARDS = False
        try:
            from torch._C._dynamo.guards import TensorGuards

            probe = torch.zeros(2)
            guard = TensorGuards(probe, dynamic_dims_sizes=[[2]], dynamic_dims_strides=[[1]])
            others = (torch.zeros(3), torch.zeros(2, dtype=torch.float64), torch.zeros(1, 2), torch.zeros(4)[::2],
                      torch.zeros(2, device="meta"), torch.nn.Parameter(torch.zeros(2)))  # fmt: skip
            if guard.check(probe) is True and guard.check(torch.ones(2)) is True \
                    and not any(guard.check(t) for t in others):  # fmt: skip
                _GUARDS = TensorGuards
        except Exception:  # not in this build of torch, or not as expected: the plain checks
            pass
    return _GUARDS


def metadata_guard(tensors: Sequence[torch.Tensor]) -> Callable[..., bool] | None:
    """One C++ call, ``guard(*others)``, that is True only if ``others`` has as many tensors as
    ``tensors``, each of the same type, dtype, device, shape, strides and requires_grad as the
    tensor at its position now (torch's dynamo tensor guards: about 75 ns a tensor, where reading
    ``shape`` alone costs 120 to 300 ns from Python). False means "not known to match": compare
    the plain way. None where this torch has no usable guards."""
    cls = _tensor_guards()
    if not cls:
        return None
    try:
        sizes = [list(t.shape) for t in tensors]
        strides = [list(t.stride()) for t in tensors]
        check = cls(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides).check
        if check(*tensors) is not True:
            return None
    except Exception:  # a tensor it cannot describe (sparse, a subclass...): the plain checks
        return None

    def guard(*others: Any) -> bool:
        try:
            return check(*others) is True
        except Exception:  # another count of tensors, or not tensors
            return False

    return guard
