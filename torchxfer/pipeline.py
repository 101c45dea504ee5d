"""The N-buffer sender and receiver loops over a side group.

One update on the wire, every rank in lockstep (``agree`` is one small
all_reduce of a status per rank on the control group; on failure each failing
rank then broadcasts its message, so every rank raises the same
TransferError; see :mod:`torchxfer.control`)::

    BEGIN header  -> agree            config checked before anything moves
    BUCKET header -> agree -> payload   repeated; payload overlaps the next pack/load
    ...
    END header    -> agree            every rank received and loaded (or staged) all
                  -> agree            atomic receivers applied their staged update
    (ABORT header instead of any of the above: the trainer gave up; no agree)

Buffers and CUDA streams are created once per group (in ``group.cache``) and
reused, so memory after many updates equals memory after one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from . import control
from .config import NCCLWeightTransferUpdateInfo, TransferStats
from .errors import TransferError
from .group import SideGroup, side_group
from .packing import (
    Slot,
    TensorSpec,
    check_bucket,
    dtype_name,
    pack_slot,
    payload_runs,
    plan_slots,
    slot_view,
    tensor_bytes,
    typed_view,
)
from .wire import Abort, Begin, BucketHeader, End, encode

__all__ = ["send_update", "receive_update", "ReceiveProgress"]

_MIN_BUFFER_BYTES = 1 << 20
DIRECT_MIN_BYTES = 1 << 20
DIRECT_BUFFER_FRACTION = 8
"""A whole, contiguous tensor of at least max(DIRECT_MIN_BYTES, buffer_size /
DIRECT_BUFFER_FRACTION) bytes is broadcast straight from its own memory
instead of being copied into the buffer first: no pack copy, at the cost of
one more collective (which is why small tensors are still packed)."""

LoadWeights = Callable[[list[tuple[str, torch.Tensor]]], None]


# -- per-group state, made once ---------------------------------------------------


class _GroupState:
    """Buffers, streams and control tensors of one group, reused across updates."""

    def __init__(self, group: SideGroup) -> None:
        self.group = group
        self.next_update_id = 0
        self.control = control.ControlChannel(group)
        self.buffers: list[torch.Tensor] = []
        self.buffer_key: tuple | None = None
        self.assembly = torch.empty(0, dtype=torch.uint8)  # a receiver's split tensor in hand
        self.streams: list[Any] = []

    def prepare(self, device: torch.device, buffer_size: int, num_buffers: int) -> None:
        """Make sure ``num_buffers`` buffers (and streams) exist for this config.

        Buffers are kept across updates; they are dropped only when the device
        or the buffer size changes. A smaller count leaves the extra buffers
        idle rather than freeing and reallocating them on every switch.
        """
        key = (device, buffer_size)
        if self.buffer_key != key:
            # Drop the old set first so peak memory never holds both.
            if self.buffer_key is not None and self.buffer_key[0] != device:
                self.streams = []
            self.buffers = []
            self.buffer_key = key
        self.buffers += [torch.empty(0, dtype=torch.uint8, device=device)
                         for _ in range(num_buffers - len(self.buffers))]  # fmt: skip
        if device.type == "cuda" and len(self.streams) < num_buffers:
            with torch.cuda.device(device):
                self.streams += [torch.cuda.Stream() for _ in range(num_buffers - len(self.streams))]

    def buffer(self, b: int, nbytes: int, keep: int = 0) -> torch.Tensor:
        """Buffer ``b`` with room for ``nbytes``; grows (keeping ``keep`` bytes) at most to buffer_size.

        Growth is geometric and happens in the first updates only; a steady
        layout then reuses the same memory forever.
        """
        buf = self.buffers[b]
        if buf.numel() < nbytes:
            _, limit = self.buffer_key
            size = min(limit, max(nbytes, 2 * buf.numel(), _MIN_BUFFER_BYTES))
            new = torch.empty(size, dtype=torch.uint8, device=buf.device)
            keep = min(keep, buf.numel())  # past it lie only direct slots, never written here
            if keep:
                with self.side_stream(b):
                    new[:keep].copy_(buf[:keep])
                    if buf.is_cuda:
                        buf.record_stream(torch.cuda.current_stream())  # freed below, read on this stream
            self.buffers[b] = buf = new
        return buf

    @contextlib.contextmanager
    def side_stream(self, b: int) -> Iterator[None]:
        """Run on buffer ``b``'s own CUDA stream, after all work already queued
        on the caller's stream (the source tensors, or earlier readers of the
        buffer). A no-op on CPU."""
        if not self.streams or not self.buffers or self.buffers[b].device.type != "cuda":
            yield
            return
        stream = self.streams[b]
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            yield


def _state(group: SideGroup) -> _GroupState:
    state = group.cache.get("pipeline")
    if state is None:
        state = group.cache["pipeline"] = _GroupState(group)
    return state


def _describe(slot: Slot) -> str:
    spec = slot.spec
    where = "" if slot.is_whole else f" bytes [{slot.start}, {slot.start + slot.length})"
    return f"#{slot.index} {spec.name!r} {dtype_name(spec.dtype)} {list(spec.shape)}{where}"


# -- sender -------------------------------------------------------------------------------


def send_update(
    pg: dist.ProcessGroup,
    items: Iterable[tuple[str, Any]],
    *,
    post_iter_func: Callable[[tuple[str, Any]], torch.Tensor] | None,
    packed: bool,
    buffer_size: int,
    num_buffers: int,
    checksum: bool = False,
    stream: Any = None,
    zero_copy: bool = True,
    version: int | None = None,
) -> TransferStats:
    """Send one update from rank 0. Called on rank 0 while every other rank runs :func:`receive_update`.

    Pulls ``items`` lazily: packing bucket ``i+1`` overlaps the broadcast of
    bucket ``i``; at most one source tensor beyond the bucket being packed is
    held. Returns once every receiver has loaded (or staged and applied) the
    update. Raises the original exception for bad input or a failing source
    (after telling the receivers with an ABORT), TransferError otherwise.
    """
    group = side_group(pg)
    group.check_usable()
    state = _state(group)
    update_id = state.next_update_id if version is None else version
    state.next_update_id = update_id + 1
    start_time = time.perf_counter()
    num_tensors = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    state.control.send_frame(encode(Begin(update_id, packed, buffer_size, num_buffers, num_tensors, checksum)))
    state.control.agree(None, f"update {update_id} (begin)")

    stash: dict[int, torch.Tensor] = {}
    pending: list[tuple[list, Any] | None] = [None] * num_buffers
    direct_min = max(DIRECT_MIN_BYTES, buffer_size // DIRECT_BUFFER_FRACTION)
    totals = {"tensors": 0, "bytes": 0}

    def specs() -> Iterator[TensorSpec]:
        for item in _source(items, post_iter_func):
            tensor = item[1]
            spec = TensorSpec.of(item[0], tensor)
            stash[totals["tensors"]] = tensor
            totals["tensors"] += 1
            totals["bytes"] += spec.nbytes
            yield spec

    def drain(b: int) -> None:
        if pending[b] is not None:
            works, _keepalive = pending[b]
            pending[b] = None
            for work in works:
                group.wait(work, f"payload broadcast of update {update_id}", data=True)

    def flush(bucket: int, slots: list[Slot], payload: torch.Tensor | None, direct: dict[int, torch.Tensor]) -> None:
        b = bucket % num_buffers
        total = check_bucket(slots, buffer_size if packed else None)
        digest = None
        if checksum and payload is not None:
            with state.side_stream(b):
                digest = control.checksum(payload[:total])
        state.control.send_frame(encode(BucketHeader(bucket, tuple(slots), digest, tuple(sorted(direct)))))
        state.control.agree(None, f"update {update_id} bucket {bucket}")
        works = []
        ctx = torch.cuda.stream(stream) if stream is not None and not packed else state.side_stream(b)
        with ctx:
            for start, end, pos in payload_runs(slots, direct):
                src = direct[pos] if pos is not None else payload[start:end]
                works.append(dist.broadcast(src, group=pg, group_src=0, async_op=True))
        # Sources sent directly stay referenced until their broadcast completes.
        pending[b] = (works, (payload, direct))

    try:
        bucket, slots, payload, direct = -1, [], None, {}
        for slot in plan_slots(specs(), buffer_size if packed else None):
            if slot.bucket != bucket:
                if slots:
                    flush(bucket, slots, payload, direct)
                bucket, slots, direct = slot.bucket, [], {}
                b = bucket % num_buffers
                drain(b)
                if packed:
                    device = group.data_device or stash[slot.index].device
                    state.prepare(device, buffer_size, num_buffers)
            tensor = stash[slot.index]
            if not slot.is_whole and slot.start == 0:
                stash[slot.index] = tensor = tensor_bytes(tensor)  # contiguous once, chunks are views
            if packed:
                if (zero_copy and not checksum and slot.is_whole and slot.length >= direct_min
                        and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()
                        and tensor.device == state.buffers[b].device):  # fmt: skip
                    direct[len(slots)] = tensor_bytes(tensor)
                    slots.append(slot)
                    del stash[slot.index]
                    continue
                # Only packed slots need the sender's buffer to reach this far.
                payload = state.buffer(b, slot.end, keep=slots[-1].end if slots else 0)
                with state.side_stream(b):
                    if tensor.device.type == "cuda" and payload.device.type == "cuda":
                        # The source may be freed by the caller before this copy runs.
                        tensor.record_stream(torch.cuda.current_stream())
                    pack_slot(payload, slot, tensor)
            else:
                payload = tensor_bytes(tensor)
                if group.data_device is not None and payload.device != group.data_device:
                    payload = payload.to(group.data_device)
            slots.append(slot)
            if slot.is_last:
                del stash[slot.index]
        if slots:
            flush(bucket, slots, payload, direct)
        for b in range(num_buffers):
            drain(b)
    except BaseException as e:
        if isinstance(e, TransferError) and not getattr(e, "from_source", False):
            raise  # a protocol failure: every rank already knows, or the group is gone
        with contextlib.suppress(Exception):
            for b in range(num_buffers):
                drain(b)
            reason = f"the trainer aborted update {update_id}: {type(e).__name__}: {e}"
            state.control.send_frame(encode(Abort(reason)))
        raise
    state.control.send_frame(encode(End(totals["tensors"], totals["bytes"])))
    state.control.agree(None, f"update {update_id} (end)")
    state.control.agree(None, f"update {update_id} (apply)")
    return TransferStats(update_id, totals["tensors"], totals["bytes"], time.perf_counter() - start_time)


def _source(items: Iterable[Any], post_iter_func: Callable | None) -> Iterator[tuple[str, Any]]:
    """The caller's pairs, transformed; an exception raised by the caller's code
    (even a TransferError from a relayed group) is tagged so that send_update
    aborts the update for everyone instead of mistaking it for its own."""
    try:
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ValueError(f"expected (name, tensor) pairs, got {type(item).__name__}: {item!r:.100}")
            yield (item[0], post_iter_func(item) if post_iter_func is not None else item[1])
    except TransferError as e:
        e.from_source = True
        raise


# -- receiver ---------------------------------------------------------------------------


@dataclasses.dataclass
class ReceiveProgress:
    """What a receiver has done to its weights; read by the engine after a failure."""

    update_id: int | None = None
    loads_started: bool = False
    applied: bool = False


class _Assembler:
    """Turns received slots into (name, tensor) pairs, validating in-band metadata.

    Whole tensors are views into the receive buffer; a split tensor is
    reassembled in the group's assembly buffer (the one tensor in hand), kept
    across updates and grown to the largest split tensor, so it is also only
    valid during the ``load_weights`` call.
    """

    def __init__(
        self, update_info: NCCLWeightTransferUpdateInfo | None, buffer_size: int | None, state: _GroupState
    ) -> None:
        self.state = state
        self.buffer_size = buffer_size
        self.expected = iter(plan_slots(update_info.specs, buffer_size)) if update_info is not None else None
        self.expected_count = len(update_info.names) if update_info is not None else None
        self.next_index = 0
        self.partial: tuple[Slot, torch.Tensor | None] | None = None
        self.head: tuple[Slot, torch.Tensor] | None = None
        self.num_bytes = 0

    def check(self, header: BucketHeader) -> None:
        """Raise TransferError if the header disagrees with update_info or is malformed."""
        try:
            check_bucket(header.slots, self.buffer_size)
        except ValueError as e:
            raise TransferError(f"bucket {header.index} is malformed: {e}") from None
        for slot in header.slots:
            if slot.bucket != header.index:
                raise TransferError(f"bucket {header.index} holds a slot of bucket {slot.bucket}")
            if self.expected is not None:
                want = next(self.expected, None)
                if want is None:
                    raise TransferError(
                        f"trainer sends tensor {_describe(slot)} but update_info lists only "
                        f"{self.expected_count} tensors"
                    )
                if want != slot:
                    raise TransferError(f"trainer sends {_describe(slot)}, update_info expects {_describe(want)}")
            if self.partial is not None:
                prev = self.partial[0]
                if slot.index != prev.index or slot.spec != prev.spec or slot.start != prev.start + prev.length:
                    raise TransferError(f"bucket {header.index}: {_describe(slot)} does not continue {_describe(prev)}")
            elif slot.index != self.next_index or slot.start != 0:
                raise TransferError(f"bucket {header.index}: {_describe(slot)} is out of order "
                                    f"(expected tensor #{self.next_index} from byte 0)")  # fmt: skip
            self.partial = None if slot.is_last else (slot, None)
            if slot.is_last:
                self.next_index = slot.index + 1

    def finish(self, end: End) -> None:
        if self.partial is not None:
            raise TransferError(f"update ended inside tensor {_describe(self.partial[0])}")
        if end.num_tensors != self.next_index:
            raise TransferError(f"trainer says it sent {end.num_tensors} tensors but {self.next_index} arrived")
        if self.expected_count is not None and self.next_index != self.expected_count:
            raise TransferError(
                f"trainer sent {self.next_index} tensors, update_info lists {self.expected_count}"
            )

    def after_load(self) -> None:
        """Start the split tensor whose head arrived in the bucket just loaded."""
        if self.head is None:
            return
        slot, raw = self.head
        self.head = None
        assembly = self.state.assembly
        if assembly.numel() < slot.spec.nbytes or assembly.device != raw.device:
            self.state.assembly = torch.empty(0, dtype=torch.uint8)  # free the old one first
            assembly = self.state.assembly = torch.empty(slot.spec.nbytes, dtype=torch.uint8, device=raw.device)
        assembly[: slot.length].copy_(raw)

    def tensors(self, slots: tuple[Slot, ...], payload: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = []
        for slot in slots:
            raw = slot_view(payload, slot) if self.buffer_size is not None else payload
            if slot.is_whole:
                out.append((slot.spec.name, typed_view(raw, slot.spec)))
            else:
                if slot.start == 0:
                    # A split tensor's head is the last slot of its bucket, and the
                    # tail of the previous split tensor may sit at the start of the
                    # same bucket, still being read by load_weights: copy the head
                    # only after that call (after_load).
                    self.head = (slot, raw)
                else:
                    assembly = self.state.assembly
                    assembly[slot.start : slot.start + slot.length].copy_(raw)
                    if slot.is_last:
                        out.append((slot.spec.name, typed_view(assembly[: slot.spec.nbytes], slot.spec)))
            if slot.is_last:
                self.num_bytes += slot.spec.nbytes
        return out


def receive_update(
    pg: dist.ProcessGroup,
    update_info: NCCLWeightTransferUpdateInfo | None,
    load_weights: LoadWeights,
    device: torch.device,
    *,
    atomic: bool = False,
    progress: ReceiveProgress | None = None,
) -> TransferStats:
    """Receive one update. Called on every worker rank while rank 0 runs :func:`send_update`.

    Blocks until the update ends; the wait for it to begin, and every
    collective after, is bounded by the group's ``timeout_s``. With
    ``atomic=False`` ``load_weights`` is called once per bucket with views into
    a reused buffer; with ``atomic=True`` the update is staged whole and
    ``load_weights`` is called once, only after every rank received it all.
    """
    group = side_group(pg)
    group.check_usable()
    progress = progress if progress is not None else ReceiveProgress()
    state = _state(group)
    begin = state.control.recv_frame()
    start_time = time.perf_counter()
    if isinstance(begin, Abort):
        raise TransferError(begin.reason)
    error = _check_begin(begin, update_info)
    update_id = begin.update_id if isinstance(begin, Begin) else -1
    progress.update_id, progress.loads_started, progress.applied = update_id, False, False
    state.control.agree(error, f"update {update_id} (begin)")
    num_buffers = begin.num_buffers
    buffer_size = begin.buffer_size if begin.packed else None
    if begin.packed:
        state.prepare(device, begin.buffer_size, num_buffers)
    assembler = _Assembler(update_info, buffer_size, state)
    pending: collections.deque = collections.deque()
    staged: list[tuple[str, torch.Tensor]] = []
    failure: list[str] = []
    where = f"rank {group.rank()}"

    def load(entry: tuple[BucketHeader, list, torch.Tensor, int]) -> None:
        header, works, payload, total = entry
        for work in works:
            group.wait(work, f"payload broadcast of update {update_id}", data=True)
        if failure:
            return
        if header.checksum is not None and control.checksum(payload[:total]) != header.checksum:
            names = ", ".join(repr(s.spec.name) for s in header.slots)
            failure.append(f"checksum mismatch in bucket {header.index} on {where} (tensors {names})")
            return
        tensors = assembler.tensors(header.slots, payload)
        if tensors and atomic:
            staged.extend((name, t.clone()) for name, t in tensors)
        elif tensors:
            progress.loads_started = True
            try:
                load_weights(tensors)
            except Exception as e:
                failure.append(f"load_weights raised on {where} in bucket {header.index}: {type(e).__name__}: {e}")
        assembler.after_load()

    try:
        while True:
            msg = state.control.recv_frame()
            if isinstance(msg, Abort):
                raise TransferError(msg.reason)
            if isinstance(msg, End):
                while pending:
                    load(pending.popleft())
                error = failure[0] if failure else None
                if error is None:
                    try:
                        assembler.finish(msg)
                    except TransferError as e:
                        error = str(e)
                state.control.agree(error, f"update {update_id} (end)")
                error = None
                if atomic:
                    progress.loads_started = True
                    try:
                        load_weights(staged)
                    except Exception as e:
                        error = f"load_weights raised on {where} while applying update {update_id}: {e}"
                    staged.clear()
                progress.applied = error is None
                state.control.agree(error, f"update {update_id} (apply)")
                break
            error = failure[0] if failure else None
            if error is None:
                try:
                    if isinstance(msg, TransferError):
                        raise msg
                    if not isinstance(msg, BucketHeader):
                        raise TransferError(f"expected a bucket header, got {type(msg).__name__}")
                    assembler.check(msg)
                except TransferError as e:
                    error = str(e)
            state.control.agree(error, f"update {update_id} bucket {getattr(msg, 'index', '?')}")
            total = max((s.end for s in msg.slots), default=0)
            if buffer_size is not None:
                while len(pending) >= num_buffers:
                    load(pending.popleft())
                b = msg.index % num_buffers
                payload = state.buffer(b, total)
                stream_ctx = state.side_stream(b)
            else:
                spec = msg.slots[0].spec
                payload = torch.empty(spec.nbytes, dtype=torch.uint8, device=device)
                stream_ctx = contextlib.nullcontext()
            works = []
            with stream_ctx:
                for start, end, _ in payload_runs(msg.slots, msg.direct):
                    works.append(dist.broadcast(payload[start:end], group=pg, group_src=0, async_op=True))
            pending.append((msg, works, payload, total))
            while len(pending) > num_buffers - 1:
                load(pending.popleft())
    except BaseException:
        with contextlib.suppress(Exception):
            while pending:
                for work in pending.popleft()[1]:
                    group.wait(work, "payload broadcast", data=True)
        raise
    return TransferStats(update_id, assembler.next_index, assembler.num_bytes, time.perf_counter() - start_time)


def _check_begin(begin: Any, info: NCCLWeightTransferUpdateInfo | None) -> str | None:
    if isinstance(begin, TransferError):
        return str(begin)
    if not isinstance(begin, Begin):
        return f"expected an update to begin, got {type(begin).__name__}"
    if info is None:
        return None
    problems = []
    if begin.packed != info.packed:
        problems.append(f"packed: trainer sends packed={begin.packed}, update_info says packed={info.packed}")
    elif info.packed:
        if begin.buffer_size != info.packed_buffer_size_bytes:
            problems.append(f"packed_buffer_size_bytes: trainer uses {begin.buffer_size}, "
                            f"update_info says {info.packed_buffer_size_bytes}")  # fmt: skip
        if begin.num_buffers != info.packed_num_buffers:
            problems.append(f"packed_num_buffers: trainer uses {begin.num_buffers}, "
                            f"update_info says {info.packed_num_buffers}")  # fmt: skip
    if begin.num_tensors is not None and begin.num_tensors != len(info.names):
        problems.append(f"count: trainer sends {begin.num_tensors} tensors, update_info lists {len(info.names)}")
    return "; ".join(problems) or None
