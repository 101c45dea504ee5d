"""Colocated mode: what both sides share (the init handshake, frames, flags, per-group state).

The trainer and its workers share one host (CPU) or one GPU (CUDA). The
weights never travel through a socket: the trainer packs each bucket into a
buffer that every worker has mapped (:mod:`torchxfer.ipc_transport`), and
only control rows travel, on the side group's Gloo control group
(:class:`torchxfer.control.ControlChannel`). One update, every rank in
lockstep (:mod:`torchxfer.colocated_sender`, :mod:`torchxfer.colocated_receiver`)::

    BEGIN step      config, cached layout's fingerprint, buffers id; workers: the layout
                    they hold (and whether it matches their update_info); blocking, unless
                    every worker said at the last END that it holds the layout (FLAG_CACHED:
                    the trainer packs bucket 0 at once and reads the rows late)
    (SHARE)         new buffers: a description frame, CUDA workers' event handles, a SYNC step
    per bucket      the trainer waits until every worker released the buffer (their rows
                    say how many buckets each released), packs it, then posts
      BUCKET step   the next bucket of the cached layout (not waited for); on CUDA, with the
                    generation of its direct-read map (below) and, when that map is new
                    to the workers, the map's frame; or
      TABLE step    a new layout: its table frame, then a SYNC step every rank waits for
    END step        blocking: every worker loaded everything; (SYNC: atomic workers applied)

A worker's row: ``[status, layout it holds, layout ok, atomic, buckets released, buffers id,
direct reads failed]``. At the handshake a worker's row also says whether it consents to
direct reads.

Direct reads (opt-in with ``TORCHXFER_DIRECT_READS=1`` on the trainer and on every worker,
from the second update of a layout): a cached bucket's large whole tensors
(``colocated_sender.DIRECT_BYTES``) are not packed. The workers read them where
they lie in the trainer's memory: on CUDA through IPC handles of their allocations, on
the CPU (tensors whose storage ``share_memory_()`` put in shared memory) through the
descriptor torch holds, opened from ``/proc/<trainer pid>/fd``. The map
of handles, offsets and slots is sent with the BUCKET row only when it changed. A worker
maps each allocation once and checks every offset against the driver's own size of the
mapped allocation (on the CPU, the file's). It waits for the bucket's event before reading. At the end of the
update, the trainer's current stream waits for every worker's release events, so the
next optimizer step cannot overwrite a tensor a worker is still reading. A worker that
cannot use a map fails the update (agreed, as any failure). Its row says why, and the
trainer then packs everything for the rest of the group's life.
Frames here are a 4-byte magic and UTF-8 JSON, capped and validated; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .config import env_flag
from .control import ControlChannel, encode_message
from .errors import TransferError
from .group import SideGroup, side_group
from .ipc_transport import HostProbe, check_host_probe, device_uuid
from .wire import Kind, check_arg, make_row

__all__ = ["FLAG_SHARE", "BACKEND", "is_colocated", "trainer_handshake", "worker_handshake", "encode_frame",
           "decode_frame", "gather_blobs"]  # fmt: skip

BACKEND = "ipc"
"""Part of every colocated layout's fingerprint (a layout's buckets depend on nothing else)."""
FLAG_SHARE = 16
"""BEGIN: new buffers; their description frame follows the step."""
_MAGIC = b"TXIP"
MAX_IPC_FRAME = 64 << 10
_CACHE_KEY = "colocated"
TRAINER_PID_KEY = "colocated_trainer_pid"
DIRECT_OK_KEY = "colocated_direct_ok"
"""Group cache: on a worker, whether it consented to direct reads at the handshake; on the
trainer, whether every worker did."""
DIRECT_ENV = "TORCHXFER_DIRECT_READS"
"""Set to 1 on the trainer and on every worker to let workers read large tensors where they lie
(off by default; see ``colocated_sender.DIRECT_BYTES``). A worker reads it at
``init_transfer_engine`` and says at the handshake whether it consents: a worker that maps
the trainer's memory trusts it to keep that memory whole (on the CPU, a trainer that shrinks a
file a worker has mapped kills that worker with SIGBUS), so the choice is the worker's too."""


def encode_frame(body: dict[str, Any], limit: int | None = MAX_IPC_FRAME) -> bytes:
    """A frame of ``body`` (``limit``: asserted; None: the caller checks the length)."""
    frame = _MAGIC + json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    assert limit is None or len(frame) <= limit
    return frame


def decode_frame(frame: bytes, what: str) -> dict[str, Any]:
    """A colocated frame's JSON object; TransferError for anything else."""
    if not frame.startswith(_MAGIC):
        raise TransferError(f"{what}: not a torchxfer colocated frame")
    try:
        body = json.loads(frame[len(_MAGIC) :].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TransferError(f"{what}: frame is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise TransferError(f"{what}: frame is not a JSON object")
    return body


def is_colocated(pg: Any) -> bool:
    """Whether ``pg`` is a side group that finished the colocated handshake."""
    try:
        return _CACHE_KEY in side_group(pg).cache
    except ValueError:
        return False


def colocated_device(group: SideGroup) -> torch.device:
    """The device of the trainer's buffers, as agreed at the handshake; ValueError if not colocated."""
    device = group.cache.get(_CACHE_KEY)
    if device is None:
        raise ValueError("expected a colocated side group (IPCWeightTransferEngine.trainer_init / "
                         "init_transfer_engine), got a side group of another engine")  # fmt: skip
    return device


def gather_blobs(group: SideGroup, blob: bytes, length: int, what: str) -> list[bytes]:
    """Every rank's ``length``-byte blob (rank 0 sends zeros); all ranks call this together, bounded."""
    mine = torch.zeros(length, dtype=torch.uint8)
    if blob:
        mine[: len(blob)] = torch.tensor(list(blob[:length]), dtype=torch.uint8)
    out = torch.empty(group.size() * length, dtype=torch.uint8)
    try:
        work = group.gather_row(group.control, out, mine)
    except Exception as e:
        group.mark_broken(f"{what}: {e}")
        raise TransferError(f"{what} failed on rank {group.rank()}: {e}", broken=True) from e
    group.wait(work, what)
    flat = bytes(out.tolist())
    return [flat[r * length : (r + 1) * length] for r in range(group.size())]


def trainer_handshake(group: SideGroup, device: torch.device) -> None:
    """Rank 0, with every worker's :func:`worker_handshake`: prove the workers share this host and
    device. Blocks at most a few ``timeout_s``; TransferError on every rank if any worker does not."""
    channel = ControlChannel(group)
    probe = HostProbe()
    try:
        frame = encode_frame({"probe": probe.describe(), "device": device.type, "uuid": device_uuid(device)})
        rows = channel.post(make_row(Kind.TABLE, 0, 0, 0, len(frame)), "colocated handshake").rows()
        channel.settle(rows, b"", "colocated handshake")
        group.cache[DIRECT_OK_KEY] = all(row.args[1] == 1 for row in rows[1:])
        channel.send_frame(frame, "colocated handshake")
        rows = channel.post(make_row(Kind.SYNC), "colocated handshake (check)").rows()
        channel.settle(rows, b"", "colocated handshake")
    finally:
        probe.close()
    group.cache[_CACHE_KEY] = device


def worker_handshake(group: SideGroup, device: torch.device) -> None:
    """A worker's half of :func:`trainer_handshake`."""
    channel = ControlChannel(group)
    consent = env_flag(DIRECT_ENV, False)
    group.cache[DIRECT_OK_KEY] = consent
    rows = channel.post(make_row(Kind.WORKER, 0, int(consent), 0, 0), "colocated handshake").rows()
    if rows[0].kind != Kind.TABLE:
        group.mark_broken("colocated handshake")
        raise TransferError(f"the trainer is not a colocated trainer (it sent a {rows[0].kind.name} row); "
                            "use the same engine on both sides", broken=True)  # fmt: skip
    channel.settle(rows, b"", "colocated handshake")
    length = check_arg(rows[0], 3, "frame_bytes", 1, MAX_IPC_FRAME)
    error = b""
    try:
        body = decode_frame(channel.recv_frame(length, "colocated handshake"), "colocated handshake")
        check_host_probe(body.get("probe"))
        group.cache[TRAINER_PID_KEY] = body["probe"]["pid"]  # proved: its probe read back here (CPU direct reads)
        if device.type == "cuda" and body["probe"].get("pid") == os.getpid():
            raise TransferError("the trainer runs in this very process: CUDA IPC handles cannot be opened by the "
                                "process that made them; colocated mode on a GPU needs the trainer and each "
                                "worker in processes of their own (in one process, use device='cpu')")  # fmt: skip
        if body.get("device") != device.type:
            raise TransferError(f"the trainer's buffers are on {str(body.get('device'))[:20]}, this worker (rank "
                                f"{group.rank()}) receives on {device}: colocated workers use the trainer's device")
        if body.get("uuid") != device_uuid(device):
            raise TransferError(f"the trainer is on GPU {str(body.get('uuid'))[:80]}, worker rank {group.rank()} is on "
                                f"{device} ({device_uuid(device)}): colocated mode needs the same GPU")  # fmt: skip
    except TransferError as e:
        error = encode_message(f"rank {group.rank()}: {e}")
    rows = channel.post(make_row(Kind.WORKER, len(error), 0, 0, 0), "colocated handshake (check)").rows()
    channel.settle(rows, error, "colocated handshake")
    group.cache[_CACHE_KEY] = device
