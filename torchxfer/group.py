"""The side process group: built from a TCPStore, next to any default group.

This is the only module that touches private torch APIs. Each use names the
torch versions it was checked on. The group is a plain ``torch.distributed
.ProcessGroup`` assembled from a store, so ``dist.broadcast(t, group=g,
group_src=0)`` and ``dist.all_reduce(t, group=g)`` work on it; torchxfer's own
state for it lives in a :class:`SideGroup` beside it. It never enters the
default world's maps, so it cannot disturb (or be disturbed by) the
trainer's own ``init_process_group``.

Life of a group, on every rank together:

1. rank 0 binds ``address:port`` and hosts a TCPStore; the others connect;
2. rendezvous through the store, before any backend exists: each rank claims
   its rank number once, agrees on the world size, proves it knows the token
   (HMAC over a fresh nonce) and, for NCCL, publishes its GPU's UUID; any
   problem is written to the store so that every rank raises the same
   TransferError instead of waiting for the one that will never come;
3. the payload backend (Gloo or NCCL) and the control group (Gloo) are
   built and each checked with one all_reduce.
"""

from __future__ import annotations

import contextlib
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
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from .errors import TransferError

__all__ = ["SideGroup", "create_side_group", "side_group", "destroy_side_group"]

_GROUPS: "weakref.WeakKeyDictionary[dist.ProcessGroup, SideGroup]" = weakref.WeakKeyDictionary()

_PREFIX = "torchxfer/v1/"
_POLL_S = (0.002, 0.05)


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


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
        address, port: where rank 0's store listens.
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
        store: dist.Store,
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
        self._store: dist.Store | None = store
        self._backends: list[Any] = []
        self._broken: str | None = None
        self._closed = False
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
            if self._broken is None:
                self._broken = reason
        self._abort()

    # -- waiting ---------------------------------------------------------------

    def wait(self, work: Any, what: str, *, data: bool = False) -> None:
        """Block until ``work`` completes, at most ``timeout_s``.

        ``data`` says the work is a payload collective on the main group (NCCL
        or Gloo); otherwise it is a control collective (always Gloo).

        Raises TransferError (and marks the group broken) if the collective
        fails or times out. On CUDA with NCCL this polls the work from the CPU
        so that a dead peer is noticed within the timeout; the side
        communicator alone is then aborted, never the process.
        """
        if work is None:
            return
        try:
            if not data or self.backend_name == "gloo":
                # Work.wait(timeout) bounds the wait on the CPU even for an op
                # still queued behind a stuck one, whose own Gloo timeout would
                # never start (torch 2.6-2.13).
                if not work.wait(_timedelta(self.timeout_s)):
                    raise TimeoutError(f"no completion after {self.timeout_s:g} s")
            else:
                # NCCL's wait() only orders streams; poll completion from the CPU
                # so a dead peer is noticed within the timeout.
                deadline = time.monotonic() + self.timeout_s
                delay = 0.0
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no completion after {self.timeout_s:g} s")
                    time.sleep(delay)
                    delay = min(max(delay * 2, 1e-5), 5e-5)
                work.wait()
        except Exception as e:  # any backend failure: peer death, timeout, abort
            reason = f"{what} failed on rank {self.rank()}: {type(e).__name__}: {e}".strip()
            self.mark_broken(reason)
            raise TransferError(
                f"{reason}. A peer may have died or stopped responding within {self.timeout_s:g} s.",
                broken=True,
            ) from e

    # -- teardown --------------------------------------------------------------

    def _abort(self) -> None:
        # Backend.abort exists for NCCL (torch 2.6-2.13); Gloo has none and its
        # pending work fails on its own once peers close their sockets.
        for backend in self._backends:
            with contextlib.suppress(Exception):
                if hasattr(backend, "abort"):
                    backend.abort()

    def close(self) -> None:
        """Release the group's buffers and streams and shut its backend down.

        Local and idempotent: it does not wait for peers. The store's port is
        released once the last reference to this group is dropped.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.cache.clear()
        if self._broken is not None:
            self._abort()
        for backend in self._backends:
            with contextlib.suppress(Exception):
                if hasattr(backend, "shutdown"):
                    # Backend.shutdown: torch 2.6-2.13; absent on some older Gloo builds.
                    backend.shutdown()
        self._store = None


# -- store and rendezvous ----------------------------------------------------------


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


def _make_store(address: str, port: int, rank: int, timeout_s: float) -> tuple[dist.Store, int]:
    if rank == 0:
        sock = _listen(address, port)
        real_port = sock.getsockname()[1]
        try:
            # master_listen_fd hands the bound socket to the store, so the store
            # listens exactly where asked (the store alone would bind every
            # interface). The store owns the fd from here on (torch 2.6-2.13).
            store = dist.TCPStore(
                address, real_port, None, True, _timedelta(timeout_s),
                wait_for_workers=False, master_listen_fd=sock.fileno(),
            )  # fmt: skip
        except Exception as e:
            sock.close()
            raise TransferError(f"cannot start the store on {address}:{real_port}: {e}") from e
        sock.detach()
        return store, real_port
    try:
        store = dist.TCPStore(address, port, None, False, _timedelta(timeout_s))
    except Exception as e:
        raise TransferError(
            f"rank {rank} could not reach the trainer's store at {address}:{port} within {timeout_s:g} s: {e}"
        ) from e
    return store, port


class _Rendezvous:
    """Store-based checks made by every rank before a backend is built."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def fail(self, message: str) -> None:
        """Publish ``message`` so every rank raises it, then raise it here.

        Rank 0 hosts the store, so it lingers (at most a couple of seconds)
        until the ranks that have arrived have read the message, before its
        store goes away; ranks that never came are not waited for.
        """
        with contextlib.suppress(Exception):
            self.store.compare_set("error", "", message)
            if self.rank != 0:
                self.store.add("error_seen", 1)
            else:
                arrived = sum(self.store.check([f"claim/{r}"]) for r in range(1, self.world_size))
                linger = time.monotonic() + min(2.0, self.timeout_s)
                while self.store.add("error_seen", 0) < arrived and time.monotonic() < linger:
                    time.sleep(_POLL_S[0])
        raise TransferError(message)

    def _poll(self, keys: list[str], what: str) -> None:
        delay = _POLL_S[0]
        while True:
            try:
                if self.store.check(["error"]):
                    message = self.store.get("error").decode(errors="replace")
                    self.store.add("error_seen", 1)
                    raise TransferError(message)
                if self.store.check(keys):
                    return
            except TransferError:
                raise
            except Exception as e:  # the store's host (rank 0) went away
                raise TransferError(f"rank {self.rank} lost the trainer's store while waiting for {what}: {e}") from e
            if time.monotonic() > self.deadline:
                missing = [k for k in keys if not self.store.check([k])]
                self.fail(f"timed out after {self.timeout_s:g} s waiting for {what}: missing {missing}")
            time.sleep(delay)
            delay = min(delay * 2, _POLL_S[1])

    def wait_all(self, stem: str, what: str) -> dict[int, str]:
        keys = [f"{stem}/{r}" for r in range(self.world_size)]
        self._poll(keys, what)
        return {r: self.store.get(k).decode() for r, k in enumerate(keys)}

    def wait_one(self, key: str, what: str) -> str:
        self._poll([key], what)
        return self.store.get(key).decode()


def _proof(token: str | None, nonce: str, rank: int, world_size: int) -> str:
    if token is None:
        return ""
    message = f"torchxfer|{nonce}|{rank}|{world_size}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def _gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return str(getattr(props, "uuid", f"{socket.gethostname()}:{device.index}"))


def _rendezvous(
    store: dist.Store, rank: int, world_size: int, timeout_s: float, token: str | None, uuid: str | None
) -> str:
    rdv = _Rendezvous(store, rank, world_size, timeout_s)
    if rank == 0:
        store.set("world_size", str(world_size))
        store.set("nonce", secrets.token_hex(16))
    nonce = rdv.wait_one("nonce", "the trainer (rank 0)")
    if store.add(f"claim/{rank}", 1) > 1:
        rdv.fail(f"two processes claim rank {rank} of the side group (the second is pid {os.getpid()} on "
                 f"{socket.gethostname()}); check rank_offset and the DP x TP x PP layout of every server")
    trainer_world = int(rdv.wait_one("world_size", "the trainer's world size"))
    if trainer_world != world_size:
        rdv.fail(f"rank {rank} was given world_size={world_size} but the trainer has world_size={trainer_world}")
    hello = {"pid": os.getpid(), "host": socket.gethostname(), "uuid": uuid,
             "proof": _proof(token, nonce, rank, world_size)}  # fmt: skip
    store.set(f"hello/{rank}", json.dumps(hello))
    peers = {r: json.loads(v) for r, v in rdv.wait_all("hello", "every rank to join").items()}

    # Rank 0 checks every worker; workers check rank 0. The token never travels.
    for r in range(world_size) if rank == 0 else [0]:
        if r == rank:
            continue
        expected = _proof(token, nonce, r, world_size)
        if not hmac.compare_digest(expected, str(peers[r].get("proof", ""))):
            worker = max(r, rank)
            info = peers[worker]
            rdv.fail(f"authentication failed between the trainer (rank 0) and rank {worker} (pid {info.get('pid')} "
                     f"on {info.get('host')}): wrong or missing token")
    if uuid is not None:
        owners: dict[str, list[int]] = {}
        for r, info in peers.items():
            if info.get("uuid"):
                owners.setdefault(info["uuid"], []).append(r)
        for gpu, ranks in owners.items():
            if len(ranks) > 1:
                rdv.fail(f"ranks {ranks} of the side group use the same GPU ({gpu}); NCCL needs one GPU per rank")
    store.set(f"ok/{rank}", "1")
    rdv.wait_all("ok", "every rank to pass the checks")
    return nonce


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


def _build_backend(pg: dist.ProcessGroup, backend_name: str, store: dist.Store, timeout_s: float) -> Any:
    """Make a Gloo or NCCL backend from the store and install it as ``pg``'s."""
    rank, world, timeout = pg.rank(), pg.size(), _timedelta(timeout_s)
    types = dist.ProcessGroup.BackendType
    if backend_name == "gloo":
        # The 4-argument constructor honours GLOO_SOCKET_IFNAME (torch 2.6-2.13).
        backend = dist.ProcessGroupGloo(store, rank, world, timeout)
        backend_type, device_types = types.GLOO, ["cpu", "cuda"]
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        # The watchdog reads these when the backend is built (torch 2.6-2.13):
        # with error handling off it no longer tears the process down when a
        # collective times out; SideGroup.wait notices the timeout and aborts
        # this communicator alone, so an inference server outlives its trainer.
        with _env(TORCH_NCCL_ASYNC_ERROR_HANDLING="0", TORCH_NCCL_ENABLE_MONITORING="0"):
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

    Rank 0 must be the trainer: it binds ``address:port``. Every wait (store connection, rendezvous, backend connection, the
    first all_reduce) is bounded by ``timeout_s``; any failure raises
    TransferError on every rank that reached the store.

    Raises:
        ValueError: rank outside ``[0, world_size)``, an unknown backend, or a
            non-CUDA device for NCCL.
        TransferError: port in use, store unreachable, a rank claimed twice,
            world sizes that disagree, a failed token check, two NCCL ranks on
            one GPU, a missing rank, or a backend that cannot connect.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} is outside the side group's world of size {world_size}")
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

    store, real_port = _make_store(address, port, rank, timeout_s)
    group = None
    try:
        prefixed = dist.PrefixStore(_PREFIX, store)
        nonce = _rendezvous(prefixed, rank, world_size, timeout_s, token,
                            _gpu_uuid(data_device) if data_device is not None else None)  # fmt: skip
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
            try:
                group._backends.append(_build_backend(which, kind, dist.PrefixStore(f"{_PREFIX}{name}/", store), timeout_s))
            except Exception as e:
                raise TransferError(f"rank {rank}: the {name} group ({kind}) could not connect: {e}") from e
        for which, device, data in ((control, torch.device("cpu"), False), (pg, data_device or torch.device("cpu"), True)):
            probe = torch.ones(1, dtype=torch.int64, device=device)
            group.wait(dist.all_reduce(probe, group=which, async_op=True), "the side group's first all_reduce", data=data)
            if int(probe.item()) != world_size:
                raise TransferError(f"side group check summed to {int(probe.item())}, expected {world_size}")
        _GROUPS[pg] = group
        return pg
    except BaseException:
        if group is not None:
            group.close()
        raise


def side_group(pg: Any) -> SideGroup:
    """torchxfer's state for a side group; ValueError if ``pg`` is not one."""
    try:
        return _GROUPS[pg]
    except (KeyError, TypeError):
        raise ValueError(f"expected a side group made by torchxfer (trainer_init / init_transfer_engine), "
                         f"got {type(pg).__name__}") from None


def destroy_side_group(pg: dist.ProcessGroup) -> None:
    """Shut a side group down on this rank: local, idempotent, never blocks on peers.

    The store's port (on rank 0) is released once the last reference to
    ``pg`` is dropped.
    """
    group = _GROUPS.pop(pg, None)
    if group is not None:
        group.close()
