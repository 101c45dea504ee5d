"""The header: what travels in-band before any payload, encoded without pickle.

Every control message is one frame::

    offset  size  field
    0       4     magic b"TXFR"
    4       2     protocol version (little-endian uint16)
    6       1     kind: 1 BEGIN, 2 BUCKET, 3 END, 4 ABORT
    7       1     reserved (0)
    8       4     body length in bytes (little-endian uint32)
    12      n     body: UTF-8 JSON object

A receiver never unpickles bytes from the network: :func:`decode` parses the
frame, checks the magic, version, kind and size cap, parses the JSON and
validates every field's type and range. Anything else is a TransferError.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

from .errors import TransferError
from .config import MAX_NUM_BUFFERS
from .packing import (
    ALIGNMENT,
    MAX_NAME_CHARS,
    MAX_NDIM,
    MAX_SLOTS_PER_BUCKET,
    Slot,
    TensorSpec,
    dtype_name,
    parse_dtype,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_FRAME_BYTES",
    "Begin",
    "BucketHeader",
    "End",
    "Abort",
    "encode",
    "decode",
    "frame_length",
]

PROTOCOL_VERSION = 1
MAGIC = b"TXFR"
_PREFIX = struct.Struct("<4sHBBI")
PREFIX_BYTES = _PREFIX.size
MAX_FRAME_BYTES = 64 << 20
"""Cap on one control frame; a larger declared size is rejected before allocating."""
_MAX_INT = 1 << 62

_BEGIN, _BUCKET, _END, _ABORT = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Begin:
    """Opens an update: its sequence number and the transfer configuration."""

    update_id: int
    packed: bool
    buffer_size: int
    num_buffers: int
    num_tensors: int | None
    """Total tensors in the update when the sender knows it up front, else None."""
    checksum: bool


@dataclasses.dataclass(frozen=True)
class BucketHeader:
    """Describes the next payload: the slots of one bucket."""

    index: int
    slots: tuple[Slot, ...]
    checksum: int | None
    direct: tuple[int, ...] = ()
    """Positions (in ``slots``) of whole tensors the sender broadcasts straight
    from their own memory, each as a collective of its own; see
    :func:`torchxfer.packing.payload_runs`."""


@dataclasses.dataclass(frozen=True)
class End:
    """Closes an update."""

    num_tensors: int
    num_bytes: int


@dataclasses.dataclass(frozen=True)
class Abort:
    """The sender gave up on this update; ``reason`` says why."""

    reason: str


Message = Begin | BucketHeader | End | Abort


def _slot_row(slot: Slot) -> list[Any]:
    spec = slot.spec
    return [slot.index, spec.name, dtype_name(spec.dtype), list(spec.shape), slot.start, slot.length, slot.offset]


def encode(msg: Message) -> bytes:
    """One frame for ``msg``. Raises ValueError if it exceeds :data:`MAX_FRAME_BYTES`."""
    if isinstance(msg, Begin):
        kind, body = _BEGIN, dataclasses.asdict(msg)
    elif isinstance(msg, BucketHeader):
        kind, body = _BUCKET, {
            "index": msg.index,
            "checksum": msg.checksum,
            "direct": list(msg.direct),
            "slots": [_slot_row(s) for s in msg.slots],
        }
    elif isinstance(msg, End):
        kind, body = _END, dataclasses.asdict(msg)
    elif isinstance(msg, Abort):
        kind, body = _ABORT, {"reason": msg.reason[:MAX_NAME_CHARS]}
    else:
        raise TypeError(f"cannot encode {type(msg).__name__}")
    payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    frame = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, kind, 0, len(payload)) + payload
    if len(frame) > MAX_FRAME_BYTES:
        raise ValueError(f"header of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte cap")
    return frame


def frame_length(prefix: bytes) -> int:
    """Total frame length declared by the first :data:`PREFIX_BYTES` bytes.

    Raises TransferError for a bad magic, another protocol version, or a
    declared size over the cap, so no receiver allocates for a hostile length.
    """
    if len(prefix) < PREFIX_BYTES:
        raise TransferError(f"truncated header: {len(prefix)} bytes")
    magic, version, kind, _, body_len = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise TransferError(f"not a torchxfer header (magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise TransferError(
            f"protocol version mismatch: sender speaks {version}, this receiver speaks {PROTOCOL_VERSION}"
        )
    if kind not in (_BEGIN, _BUCKET, _END, _ABORT):
        raise TransferError(f"unknown header kind {kind}")
    if PREFIX_BYTES + body_len > MAX_FRAME_BYTES:
        raise TransferError(f"header declares {body_len} bytes, over the {MAX_FRAME_BYTES}-byte cap")
    return PREFIX_BYTES + body_len


def _int(body: dict, key: str, lo: int = 0, hi: int = _MAX_INT, none_ok: bool = False) -> Any:
    value = body.get(key)
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TransferError(f"header field {key!r} is {value!r}, expected an int in [{lo}, {hi}]")
    return value


def _bool(body: dict, key: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise TransferError(f"header field {key!r} is {value!r}, expected a bool")
    return value


def _decode_slot(bucket: int, row: Any) -> Slot:
    if not isinstance(row, list) or len(row) != 7:
        raise TransferError(f"bad slot record {row!r:.200}")
    index, name, dtype, shape, start, length, offset = row
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise TransferError(f"bad tensor name {name!r:.200}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise TransferError(f"bad shape {shape!r:.200} for {name!r}")
    fields = {"index": index, "start": start, "length": length, "offset": offset}
    for i, dim in enumerate(shape):
        fields[f"shape[{i}]"] = dim
    for key in fields:
        _int(fields, key)
    try:
        spec = TensorSpec(name, parse_dtype(dtype), tuple(shape))
    except ValueError as e:
        raise TransferError(f"bad slot for {name!r}: {e}") from None
    if spec.nbytes > _MAX_INT:
        raise TransferError(f"tensor {name!r} of shape {shape} is too large")
    return Slot(bucket, index, spec, start, length, offset)


def decode(frame: bytes) -> Message:
    """Parse one frame. Any malformed input raises TransferError, never anything else."""
    total = frame_length(frame[:PREFIX_BYTES])
    if len(frame) < total:
        raise TransferError(f"truncated header: {len(frame)} of {total} bytes")
    kind = frame[6]
    try:
        body = json.loads(frame[PREFIX_BYTES:total].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TransferError(f"header body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise TransferError("header body is not a JSON object")
    if kind == _BEGIN:
        return Begin(
            update_id=_int(body, "update_id"),
            packed=_bool(body, "packed"),
            buffer_size=_int(body, "buffer_size", lo=ALIGNMENT),
            num_buffers=_int(body, "num_buffers", lo=1, hi=MAX_NUM_BUFFERS),
            num_tensors=_int(body, "num_tensors", none_ok=True),
            checksum=_bool(body, "checksum"),
        )
    if kind == _BUCKET:
        index = _int(body, "index")
        rows = body.get("slots")
        if not isinstance(rows, list) or len(rows) > MAX_SLOTS_PER_BUCKET:
            raise TransferError("header field 'slots' is not a list of at most "
                                f"{MAX_SLOTS_PER_BUCKET} slot records")
        slots = tuple(_decode_slot(index, row) for row in rows)
        direct = body.get("direct", [])
        if not isinstance(direct, list) or len(direct) > len(slots):
            raise TransferError(f"header field 'direct' is {direct!r:.200}, expected a list of slot positions")
        for i, pos in enumerate(direct):
            _int({"direct": pos}, "direct", hi=len(slots) - 1)
            if (i and pos <= direct[i - 1]) or not slots[pos].is_whole:
                raise TransferError(f"header field 'direct' names slot {pos} out of order or not whole")
        checksum = _int(body, "checksum", lo=-_MAX_INT, none_ok=True)
        return BucketHeader(index, slots, checksum, tuple(direct))
    if kind == _END:
        return End(num_tensors=_int(body, "num_tensors"), num_bytes=_int(body, "num_bytes"))
    reason = body.get("reason")
    if not isinstance(reason, str):
        raise TransferError(f"header field 'reason' is {reason!r:.200}, expected a string")
    return Abort(reason[:MAX_NAME_CHARS])
WIRE_SIGNATURE = f"v{PROTOCOL_VERSION}"
