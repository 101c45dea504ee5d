"""Reads of other trainer ranks' shards over CUDA IPC: send_model's gathers on one host.

When every trainer rank of a ``send_model`` call runs on one host and holds
its shards on its GPU, the sender need not ask the others to send anything.
Each other rank describes where its shards lie (CUDA IPC handles of the
allocations that hold them, offsets, sizes) in one row of fixed length; the
sender maps those allocations (once each, cached for the life of the
process) and copies every piece straight into place, on its own stream, with
``cudaMemcpyAsync`` / ``cudaMemcpy2DAsync``: copy engines, pulling over
NVLink. The other ranks run no kernel while the update is sent. A worker
that shares a GPU with one of them has that GPU to itself (two processes'
kernels on one GPU take turns), and the pulls use the link in the direction
opposite to the broadcasts.

This module holds the CUDA side only: rows, handles, mappings and copies.
:mod:`torchxfer.gather` decides which pieces are read and
:mod:`torchxfer.trainer` agrees on the mode with every trainer rank.

Rows (int64 words; the same length on every rank, from the plan alone)::

    [vote, host id x 4, segments, (segment, offset, bytes) per shard entry,
     (handle x 8, size, allocation id) per segment slot (one slot per shard entry)]

The allocation id (the driver's buffer id, unique for the life of the
exporting process) tells the sender when an allocation behind a handle is a
new one, so a mapping is never reused for memory it no longer shows; the
exporting rank reuses a handle only for the same allocation id.

The handles travel as raw bytes in our own row format: nothing is unpickled,
and torch's own IPC machinery (its reference-count files in ``/dev/shm``)
is not used. Every offset and size is checked against the mapped allocation
before a byte is read. Set ``TORCHXFER_PEER_READS=0`` on every trainer rank
to keep the collective gathers.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import env_flag
from .ipc_transport import NoAllocation, _check, _cudart, _driver, _handle, _IpcHandle, allocation_id, mapped_size
from .ipc_transport import locate as _locate

log = logging.getLogger("torchxfer")

__all__ = ["ENV", "PeerReadsUnavailable", "Row", "candidate", "digest_words", "raw_bytes", "encode_row", "decode_row",
           "agreed", "export", "locate", "ipc_handle", "allocation_id",
           "Mappings", "capture_graph", "copy_bytes", "copy_batch", "wait_event"]  # fmt: skip

ENV = "TORCHXFER_PEER_READS"
_HEAD = 6  # vote, host id (4 words), segment count
_HANDLE_WORDS = 8
_SEGMENT_WORDS = _HANDLE_WORDS + 2  # handle, size, allocation id


class PeerReadsUnavailable(RuntimeError):
    """Peer reads cannot serve this update here (the collective gathers are used instead)."""


def candidate(entries: list[Any]) -> bool:
    """Whether peer reads could serve this plan: every gathered entry a ``shard`` entry on a
    CUDA mesh. From the plan alone, so every trainer rank answers alike."""
    collective = [e for e in entries if e.collective]
    return bool(collective) and all(e.how == "shard" and e.tensor.device_mesh.device_type == "cuda" for e in collective)


def enabled() -> bool:
    """This rank's own view: not switched off, and a CUDA runtime we can drive."""
    if not env_flag(ENV, True):
        return False
    try:
        _driver()
        _cudart()
    except Exception:
        return False
    return True


_HOST: list[int] = []


def host_id() -> list[int]:
    """Four 56-bit words naming this host and boot (equal on every process of one machine)."""
    if _HOST:
        return list(_HOST)
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as fh:
        boot = fh.read().strip()
    _HOST[:] = digest_words(f"{socket.gethostname()}|{boot}".encode())
    return list(_HOST)


def digest_words(data: bytes) -> list[int]:
    """Four 56-bit words of sha256(data): a digest that fits a row of int64."""
    digest = hashlib.sha256(data).digest()
    return [int.from_bytes(digest[i : i + 7], "little") for i in range(0, 28, 7)]


def raw_bytes(row: torch.Tensor) -> bytes:
    """A CPU tensor's bytes, as stored (row-major)."""
    row = row.contiguous()
    return ctypes.string_at(row.data_ptr(), row.numel() * row.element_size())


class Row:
    """One rank's decoded row."""

    def __init__(self, vote: bool, host: list[int], pieces: list[tuple[int, int, int]],
                 segments: list[tuple[bytes, int, int]], raw: bytes = b"") -> None:  # fmt: skip
        self.vote, self.host, self.pieces, self.segments, self.raw = vote, host, pieces, segments, raw


def row_words(num_entries: int) -> int:
    return _HEAD + 3 * num_entries + _SEGMENT_WORDS * num_entries


def encode_row(vote: bool, num_entries: int, pieces: dict[int, tuple[int, int, int]] | None = None,
               segments: list[tuple[bytes, int, int]] | None = None) -> torch.Tensor:  # fmt: skip
    """A rank's row: ``pieces`` by shard-entry index (segment, offset, bytes), ``segments``
    (handle, size, allocation id). A rank that votes no sends only its vote."""
    pieces, segments = pieces or {}, segments or []
    if not vote or len(segments) > num_entries:
        vote, pieces, segments = False, {}, []
    words = [int(vote)] + host_id() + [len(segments)]
    for k in range(num_entries):
        words += list(pieces.get(k, (-1, 0, 0)))
    blob = struct.pack(f"<{len(words)}q", *words)
    for handle, size, buffer_id in segments:
        blob += handle + struct.pack("<qq", size, buffer_id)
    blob += b"\0" * (8 * row_words(num_entries) - len(blob))
    return torch.frombuffer(bytearray(blob), dtype=torch.int64)


def decode_row(row: torch.Tensor, num_entries: int) -> Row:
    """A row as :func:`encode_row` wrote it (CPU tensor). Malformed fields make a no vote."""
    if row.dtype != torch.int64 or row.device.type != "cpu" or row.numel() != row_words(num_entries):
        return Row(False, [], [], [])
    raw = raw_bytes(row)
    words = struct.unpack_from(f"<{_HEAD + 3 * num_entries}q", raw)
    vote, host, nseg = words[0] == 1, list(words[1:5]), words[5]
    if not 0 <= nseg <= num_entries:
        return Row(False, host, [], [])
    pieces = [tuple(words[_HEAD + 3 * k : _HEAD + 3 * k + 3]) for k in range(num_entries)]
    at = 8 * (_HEAD + 3 * num_entries)
    segments = []
    for s in range(nseg):
        start = at + s * 8 * _SEGMENT_WORDS
        segments.append((raw[start : start + 64], *struct.unpack_from("<qq", raw, start + 64)))
    return Row(vote, host, pieces, segments, raw)  # type: ignore[arg-type]


def agreed(rows: list[Row]) -> bool:
    """Whether every rank voted yes from one host: every rank computes this from the same rows."""
    return bool(rows) and all(r.vote for r in rows) and all(r.host == rows[0].host for r in rows)


# -- the exporting side (a trainer rank that does not send) -----------------------------------------


def _runtime() -> Any:
    lib = _cudart()
    if not getattr(lib, "_torchxfer_copies", False):
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]  # fmt: skip
        lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]  # fmt: skip
        lib._torchxfer_copies = True
    return lib


_exported: dict[tuple[int, int], tuple[bytes, int]] = {}
"""This rank's handles, by (allocation base, allocation id): an allocation is exported once
(``cudaIpcGetMemHandle`` costs tens of microseconds). Only the last export's are kept."""

_last_export: tuple[tuple, dict, list, list[int]] | None = None
"""The last export: its tensors' (index, pointer, bytes), its pieces and segments, and each
segment's base. An RL trainer's shards stay where they are between updates: when every tensor
lies where it lay and every segment is still the allocation it was (its allocation id, one
driver call per segment rather than two per tensor), the export is the same."""


def locate(ptr: int) -> tuple[int, int, int]:
    """:func:`ipc_transport.locate`: (base, size, allocation id); PeerReadsUnavailable if none."""
    try:
        return _locate(ptr)
    except (NoAllocation, OSError) as e:
        raise PeerReadsUnavailable(str(e)) from None


def ipc_handle(base: int) -> bytes:
    """The 64-byte CUDA IPC handle of the allocation at ``base`` (on the current device).
    PeerReadsUnavailable if the runtime refuses (e.g. torch's expandable segments)."""
    lib, handle = _cudart(), _IpcHandle()
    if lib.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(base)) != 0:
        lib.cudaGetLastError()  # the runtime keeps the error for torch's next check otherwise
        raise PeerReadsUnavailable("cudaIpcGetMemHandle refused an allocation (expandable segments?)")
    return ctypes.string_at(ctypes.addressof(handle), 64)


def export(tensors: dict[int, torch.Tensor]) -> tuple[dict[int, tuple[int, int, int]], list[tuple[bytes, int, int]]]:
    """Where each tensor (by shard-entry index; CUDA, contiguous, non-empty) lies: (segment,
    offset, bytes), and the segments' IPC handles and sizes; then waits for the tensors'
    current streams, so what the sender reads is what the trainer last wrote there.
    PeerReadsUnavailable when an allocation cannot be exported (e.g. torch's expandable
    segments)."""
    global _exported, _last_export
    where = tuple((k, t.data_ptr(), t.numel() * t.element_size()) for k, t in tensors.items())
    last = _last_export
    if last is not None and last[0] == where and all(
        allocation_id(base) == seg[2] for base, seg in zip(last[3], last[2])
    ):  # fmt: skip
        _synchronize(tensors)
        return last[1], last[2]
    _last_export = None
    bases: list[int] = []
    pieces: dict[int, tuple[int, int, int]] = {}
    segments: list[tuple[bytes, int, int]] = []
    seen: dict[int, int] = {}
    kept: dict[tuple[int, int], tuple[bytes, int]] = {}
    with torch.cuda.device(next(iter(tensors.values())).device) if tensors else contextlib.nullcontext():
        for k, t in tensors.items():
            ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
            base, size, buffer_id = locate(ptr)
            key = (base, buffer_id)
            if key not in seen:
                known = kept.get(key) or _exported.get(key)
                if known is None or known[1] != size:
                    known = (ipc_handle(base), size)
                kept[key] = known
                seen[key] = len(segments)
                segments.append((known[0], known[1], buffer_id))
                bases.append(base)
            pieces[k] = (seen[key], ptr - base, nbytes)
    _exported = kept
    _last_export = (where, pieces, segments, bases)
    _synchronize(tensors)
    return pieces, segments


def _synchronize(tensors: dict[int, torch.Tensor]) -> None:
    """Wait for the tensors' current streams: the shards as the trainer last wrote them."""
    for device in {t.device for t in tensors.values()}:
        torch.cuda.current_stream(device).synchronize()


# -- the reading side (the sender) -------------------------------------------------------------------


class Mappings:
    """The sender's mapped allocations of other ranks, by IPC handle, for the life of the process.

    An allocation is mapped once (``cudaIpcOpenMemHandle``); one that no row
    names any more is unmapped at the next update (:meth:`keep_only`), so a
    rank that frees memory gets it back.
    """

    _open: dict[bytes, tuple[int, int, int]] = {}  # handle -> (mapped base pointer, size, allocation id)

    @classmethod
    def base(cls, handle: bytes, size: int, buffer_id: int, device: torch.device) -> int:
        known = cls._open.get(handle)
        if known is not None and known[1:] == (size, buffer_id):
            return known[0]
        if known is not None:  # another allocation behind the same handle bytes: map it afresh
            cls._close(handle)
        lib, ptr = _cudart(), ctypes.c_void_p()
        with torch.cuda.device(device):
            code = lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), _handle(handle), 1)  # lazy peer access
        if code != 0 or not ptr.value:
            lib.cudaGetLastError()  # the runtime keeps the error for torch's next check otherwise
            raise PeerReadsUnavailable(f"cudaIpcOpenMemHandle failed with CUDA error {code} (another host, "
                                       "container or GPU without peer access?)")  # fmt: skip
        real = mapped_size(ptr.value)
        if real < size:
            with contextlib.suppress(Exception):
                _check(lib.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")
            raise PeerReadsUnavailable(f"a peer's allocation is said to hold {size} bytes, but the driver maps {real}")
        cls._open[handle] = (ptr.value, size, buffer_id)
        return ptr.value

    @classmethod
    def holds(cls, handles: set[bytes]) -> bool:
        """Whether every one of ``handles`` is mapped."""
        return all(h in cls._open for h in handles)

    @classmethod
    def keep_only(cls, handles: set[bytes]) -> None:
        for handle in [h for h in cls._open if h not in handles]:
            cls._close(handle)

    @classmethod
    def _close(cls, handle: bytes) -> None:
        ptr = cls._open.pop(handle)[0]
        with contextlib.suppress(Exception):
            _check(_cudart().cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")


def copy_bytes(dst: int, src: int, width: int, rows: int, pitch: int, stream: int) -> None:
    """Copy ``rows`` runs of ``width`` bytes, contiguous at device pointer ``src``, to ``dst``,
    ``pitch`` bytes apart there (one run, or ``pitch == width``: one contiguous block), on
    ``stream`` (a ``cudaStream_t``). Asynchronous: one ``cudaMemcpyAsync`` or one
    ``cudaMemcpy2DAsync``, both done by the copy engines."""
    if not width or not rows:
        return
    lib = _runtime()
    if rows == 1 or width == pitch:
        _check(lib.cudaMemcpyAsync(dst, src, rows * width, 4, stream), "cudaMemcpyAsync of a shard")
    else:
        _check(lib.cudaMemcpy2DAsync(dst, pitch, src, width, width, rows, 4, stream), "cudaMemcpy2DAsync of a shard")


_graphs: dict[tuple, Any] = {}
"""Captured batches of copies (CUDA graphs), by their exact copies: an RL trainer's copies of
one run of one bucket are the same every update (same buffers, shards and mappings)."""
_GRAPHS_MAX = 256
_graphs_off: list[str] = []  # why graphs are not used in this process (a capture failed)


def copy_batch(copies: list[tuple[int, int, int, int, int]], device: torch.device) -> None:
    """Every ``(dst, src, width, rows, pitch)`` of ``copies`` (see :func:`copy_bytes`), in order,
    on ``device``'s current stream. On CUDA a batch seen before is replayed as one CUDA graph of
    copy nodes: one launch instead of one driver call per copy (about 12 us each on an H200
    host, which kept the broadcasts waiting for their copies to be issued). A batch seen the
    first time is captured (nothing runs then), then replayed; if capturing fails, copies are
    issued one by one from then on."""
    if device.type != "cuda" or len(copies) < 2 or _graphs_off:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
        for args in copies:
            copy_bytes(*args, stream)
        return
    key = (device.index, tuple(copies))
    graph = _graphs.get(key)
    if graph is None:
        graph = _capture(copies, device)
        if graph is None:
            copy_batch(copies, device)
            return
        if len(_graphs) >= _GRAPHS_MAX:
            _graphs.clear()
        _graphs[key] = graph
    graph.replay()


def capture_graph(record: Callable[[], None], device: torch.device) -> tuple[Any, str | None]:
    """A CUDA graph of the work ``record()`` issues on the current stream, captured on a side
    stream of ``device`` (nothing runs): ``(graph, None)``, or ``(None, why)`` if capturing failed
    (the runtime's error is cleared, so torch's next check does not trip on it)."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    capturing = False
    try:
        with torch.cuda.device(device), torch.cuda.stream(side):
            # thread_local: the process groups' own threads keep querying their events meanwhile
            graph.capture_begin(capture_error_mode="thread_local")
            capturing = True
            record()
            capturing = False
            graph.capture_end()
        return graph, None
    except Exception as e:
        if capturing:
            with contextlib.suppress(Exception):
                graph.capture_end()
        _cudart().cudaGetLastError()
        return None, f"{type(e).__name__}: {e}"


def _capture(copies: list[tuple[int, int, int, int, int]], device: torch.device) -> Any:
    """A CUDA graph of ``copies`` (nothing run), or None (and graphs off in this process)."""

    def record() -> None:
        stream = torch.cuda.current_stream(device).cuda_stream
        for args in copies:
            copy_bytes(*args, stream)

    graph, why = capture_graph(record, device)
    if graph is None:
        _graphs_off.append(str(why))
        log.debug("peer reads: copies issued one by one from now on; capturing them as a CUDA graph "
                  "failed: %s", why)
    return graph


def wait_event(event: Any, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``event`` (polling the CPU, never blocking on the GPU)."""
    end = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > end:
            return False
        time.sleep(0.0002)
    return True
