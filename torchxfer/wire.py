"""What travels in-band on the control group, encoded without pickle.

Two forms, both validated field by field before anything is sized from them:

**Rows.** Every control step of an update is one all_gather of a fixed row of
:data:`ROW_WORDS` int64 words per rank (:class:`torchxfer.control.ControlChannel`).
Word 0 is :data:`ROW_MAGIC` (b"TXFR" and the protocol version), word 1 the
kind. The trainer's row says what comes next (``BEGIN``, ``BUCKET``, ``TABLE``,
``ABORT``, ``END``); a worker's row (``WORKER``) carries its status: the byte
length of its error message (0 when fine), which plan it holds, whether it
stages updates. Every rank sees every row, so every rank takes the same
decision from the same values.

**Table frames.** The slots of one bucket, sent when the layout is new::

    offset  size  field
    0       4     magic b"TXFR"
    4       2     protocol version (little-endian uint16)
    6       1     kind: 2 BUCKET
    7       1     reserved (0)
    8       4     body length in bytes (little-endian uint32)
    12      n     body: UTF-8 JSON object {"index": int, "slots": [[index, name,
                  dtype, shape, start, length, offset], ...]}

A receiver never unpickles bytes from the network: :func:`decode` checks the
magic, version, kind and size cap, parses the JSON and validates every field's
type and range. Anything else is a TransferError.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from typing import Any

from .errors import TransferError
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
    "BucketHeader",
    "Kind",
    "Row",
    "ROW_WORDS",
    "ROW_MAGIC",
    "WIRE_SIGNATURE",
    "check_arg",
    "make_row",
    "parse_row",
    "encode",
    "decode",
    "frame_length",
]

PROTOCOL_VERSION = 11  # 4: workers post the confirmed layout's bucket 0 before BEGIN; 5: END on the payload group;
# 6: colocated direct reads (a BUCKET row may carry a map, a worker's row says whether one failed);
# 7: unpacked layouts' buckets are posted ahead like packed ones (plan.first_bucket, plan.next_bucket);
# 8: on NCCL every tensor from 8 MiB travels alone, a bucket's broadcasts go in NCCL groups (payload_groups);
# 9: workers post their rows two steps ahead in a cached layout, the trainer matches them (Sender.after_row)
# 10: the opt-in checksum sums 16-bit halves (control.checksum); a table may not repeat a name of its update
# 11: an update of no bucket at all ends with a SYNC step (workers check it is whole, as after any unannounced end)
MAGIC = b"TXFR"
_PREFIX = struct.Struct("<4sHBBI")
PREFIX_BYTES = _PREFIX.size
MAX_FRAME_BYTES = 64 << 20
"""Cap on one control frame; a larger declared size is rejected before allocating."""
_MAX_INT = 1 << 62

_BUCKET = 2


@dataclasses.dataclass(frozen=True)
class BucketHeader:
    """Describes the next payload: the slots of one bucket."""

    index: int
    slots: tuple[Slot, ...]




def _slot_row(slot: Slot) -> list[Any]:
    spec = slot.spec
    return [slot.index, spec.name, dtype_name(spec.dtype), list(spec.shape), slot.start, slot.length, slot.offset]


def encode(msg: BucketHeader) -> bytes:
    """One frame for ``msg``. Raises ValueError if it exceeds :data:`MAX_FRAME_BYTES`."""
    if not isinstance(msg, BucketHeader):
        raise TypeError(f"cannot encode {type(msg).__name__}")
    body = {"index": msg.index, "slots": [_slot_row(s) for s in msg.slots]}
    payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    frame = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _BUCKET, 0, len(payload)) + payload
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
    if kind != _BUCKET:
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
    # Every product of the sizes must stay within int64 (torch multiplies them all, empty dims
    # or not: [2**40, 2**40, 0] holds no byte and still overflows a view).
    reach = spec.dtype.itemsize
    for dim in shape:
        reach *= max(dim, 1)
    if spec.nbytes > _MAX_INT or reach > _MAX_INT:
        raise TransferError(f"tensor {name!r} of shape {shape} is too large")
    return Slot(bucket, index, spec, start, length, offset)


_MAX_CONTAINERS = 2 + 2 * MAX_SLOTS_PER_BUCKET
"""Lists and objects in a table: the body, its slot list, and per slot its record and its shape."""
_MAX_COMMAS = 8 + MAX_SLOTS_PER_BUCKET * (8 + MAX_NDIM)
"""Commas in a table: a slot record's 7 fields, its shape's sizes, the separator between records."""
_MAX_STRINGS = 2 + 2 * MAX_SLOTS_PER_BUCKET
"""Strings in a table: its two keys, and per slot its name and dtype."""


def _check_skeleton(body: bytes) -> None:
    """Refuse a table body with more strings, lists, objects or values than any table holds before
    it is parsed: within the frame cap, a body of tiny values (``[],[],...``) would cost the JSON
    parser gigabytes and seconds. Brackets and commas inside strings are not counted (names may
    hold any character). Linear in the body, a few copies of it at most: only ``bytes`` methods,
    no pattern whose matching keeps state per byte."""
    too_many = TransferError(f"header body holds more values than a table of {MAX_SLOTS_PER_BUCKET} slots can")
    containers = body.count(b"[") + body.count(b"{")
    commas = body.count(b",")
    if containers <= _MAX_CONTAINERS and commas <= _MAX_COMMAS and body.count(b'"') <= 2 * _MAX_STRINGS:
        return  # strings can only add to these counts: the usual table stops here
    if b"\\" in body:
        # Every backslash begins an escape of the one byte after it, so in a run of them the pairs
        # from its start are escaped backslashes, and a quote after an odd run is escaped: blank
        # them, and every quote left opens or closes a string.
        body = body.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    if body.count(b'"') > 2 * _MAX_STRINGS:
        raise too_many
    end = 0
    while (start := body.find(b'"', end)) >= 0:  # at most _MAX_STRINGS strings
        end = body.find(b'"', start + 1)
        end = len(body) if end < 0 else end + 1  # an unterminated string runs to the end
        containers -= body.count(b"[", start, end) + body.count(b"{", start, end)
        commas -= body.count(b",", start, end)
    if containers > _MAX_CONTAINERS or commas > _MAX_COMMAS:
        raise too_many


def decode(frame: bytes) -> BucketHeader:
    """Parse one table frame. Any malformed input raises TransferError, never anything else."""
    total = frame_length(frame[:PREFIX_BYTES])
    if len(frame) < total:
        raise TransferError(f"truncated header: {len(frame)} of {total} bytes")
    if len(frame) > total:
        raise TransferError(f"header of {len(frame)} bytes declares {total}: its length and the row's disagree")
    _check_skeleton(frame[PREFIX_BYTES:total])
    try:
        body = json.loads(frame[PREFIX_BYTES:total].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TransferError(f"header body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise TransferError("header body is not a JSON object")
    index = _int(body, "index")
    rows = body.get("slots")
    if not isinstance(rows, list) or not rows or len(rows) > MAX_SLOTS_PER_BUCKET:
        raise TransferError(f"header field 'slots' is not a list of 1 to {MAX_SLOTS_PER_BUCKET} slot records")
    return BucketHeader(index, tuple(_decode_slot(index, row) for row in rows))


# -- rows ----------------------------------------------------------------------------------

ROW_WORDS = 10
"""int64 words of one rank's row in a control step."""
ROW_MAGIC = int.from_bytes(MAGIC, "little") << 16 | PROTOCOL_VERSION
"""Word 0 of every row: a peer speaking another protocol is caught at its first row."""


class Kind(enum.IntEnum):
    """Word 1 of a row."""

    BEGIN = 1
    """trainer: [update_id, flags, buffer_size (0: unpacked), num_buffers, fingerprint, num_tensors (-1: unknown),
    last, checksum]; with FLAG_BUCKET0 the row also announces bucket 0 of the cached layout (``last`` and
    ``checksum`` as in a BUCKET row)"""
    BUCKET = 2
    """trainer: [bucket, last, checksum]: the next bucket of the cached plan"""
    TABLE = 3
    """trainer: [bucket, last, checksum, frame_bytes]: a table frame follows (a new layout)"""
    ABORT = 4
    """trainer: [bucket, 0, reason_bytes]: the update stops"""
    END = 5
    """trainer: [num_tensors, num_bytes]: the update is complete"""
    WORKER = 6
    """worker: [status_bytes, plan_fingerprint (the layout it holds, or will hold once the
    update it just finished is agreed), plan_ok, atomic]"""
    SYNC = 7
    """trainer: no arguments; a step where only the workers' status matters"""


FLAG_PACKED = 1
FLAG_CHECKSUM = 2
FLAG_CACHED = 4
"""BEGIN: the update uses the layout of the given fingerprint, which every worker
confirmed holding at the end of the last update; the trainer does not wait for this step."""
FLAG_BUCKET0 = 8
"""BEGIN (with FLAG_CACHED): this step is also bucket 0's BUCKET step, saving a round trip."""
MAX_COUNT = 1 << 62


@dataclasses.dataclass(frozen=True)
class Row:
    """One rank's row, checked: ``kind`` and up to six argument words."""

    kind: Kind
    args: tuple[int, ...]


def make_row(kind: Kind, *args: int) -> list[int]:
    """The words of a row; ``args`` are padded with zeros."""
    assert len(args) <= ROW_WORDS - 2
    return [ROW_MAGIC, int(kind), *args] + [0] * (ROW_WORDS - 2 - len(args))


def parse_row(words: list[int], rank: int) -> Row:
    """Check a row received from ``rank``; TransferError for another protocol or an unknown kind."""
    if len(words) != ROW_WORDS or words[0] != ROW_MAGIC:
        first = f"{words[0]:#x}" if words else "missing"
        raise TransferError(f"rank {rank} speaks another torchxfer protocol or is not a torchxfer peer "
                            f"(row word 0 is {first}, expected {ROW_MAGIC:#x})")
    try:
        kind = Kind(words[1])
    except ValueError:
        raise TransferError(f"rank {rank} sent a control row of unknown kind {words[1]}") from None
    if (kind == Kind.WORKER) != (rank != 0):
        raise TransferError(f"rank {rank} sent a {kind.name} row, which only "
                            f"{'workers' if kind == Kind.WORKER else 'the trainer'} send")
    return Row(kind, tuple(words[2:]))


def check_arg(row: Row, position: int, what: str, lo: int, hi: int) -> int:
    """Argument ``position`` of a row, in ``[lo, hi]``; TransferError naming it otherwise."""
    value = row.args[position]
    if not lo <= value <= hi:
        raise TransferError(f"{row.kind.name} row field {what} is {value}, expected a value in [{lo}, {hi}]")
    return value


WIRE_SIGNATURE = f"v{PROTOCOL_VERSION}:row{ROW_WORDS}:frame{MAX_FRAME_BYTES}:slots{MAX_SLOTS_PER_BUCKET}:align{ALIGNMENT}"
"""The protocol and its constants; ranks compare it at init, before any variable-size collective."""
