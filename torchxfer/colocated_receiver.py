"""A worker's half of a colocated update: views of the trainer's buffers go straight to load_weights.

Steps and rows: see :mod:`torchxfer.colocated`. A worker maps the trainer's
buffers once per group (at the first update, or when their size changes),
checks every new layout's table before any of it is loaded
(:class:`torchxfer.plan.TableChecker`), and releases each bucket in its next
row once ``load_weights`` returned (on CUDA: after recording its release
event behind the loads). A worker that failed keeps posting every row the
trainer's rows call for, and loads nothing more. Every wait is bounded by
``timeout_s``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .colocated import FLAG_SHARE, MAX_IPC_FRAME, decode_frame, gather_blobs
from .config import MAX_NUM_BUFFERS, NCCLWeightTransferUpdateInfo, TransferStats
from .control import ControlChannel
from .errors import TransferError
from .group import SideGroup
from .ipc_transport import _is_int, new_events, open_buffers, open_memory, open_shared
from .loading import KeptViews, SlicedBatch
from .packing import ALIGNMENT, concat_plan, slot_view, typed_view
from .plan import BucketPlan, Layout, TableChecker
from .colocated import BACKEND, DIRECT_ENV, DIRECT_OK_KEY, TRAINER_PID_KEY
from .receiver import LoadWeights, ReceiveProgress, WorkerSide
from .wire import FLAG_CACHED, FLAG_PACKED, MAX_COUNT, MAX_FRAME_BYTES, PREFIX_BYTES, BucketHeader, Kind, Row, decode, make_row

__all__ = ["ColocatedReceiver"]

log = logging.getLogger("torchxfer")


class _State:
    """What a worker keeps per colocated group: the mapped buffers, events, last layout."""

    def __init__(self, group: SideGroup) -> None:
        self.control = ControlChannel(group)
        self.buffers: list[torch.Tensor] = []
        self.buffers_id = 0
        self.trainer_events: list[Any] = []
        self.release_events: list[Any] = []
        self.layout: Layout | None = None
        self.validated: Any = None
        self.assembly = torch.empty(0, dtype=torch.uint8)
        # The trainer's allocations mapped for direct reads, by IPC handle: (tensor, size, allocation id).
        self.direct_maps: dict[bytes, tuple[torch.Tensor, int, int]] = {}

    @staticmethod
    def of(group: SideGroup) -> _State:
        state = group.cache.get("colocated_receiver")
        if state is None:
            state = group.cache["colocated_receiver"] = _State(group)
        return state

    def plan_ok(self, info: NCCLWeightTransferUpdateInfo | None) -> bool:
        """Whether the cached layout is known to satisfy ``info`` (checked once per info)."""
        if self.layout is None:
            return False
        if info is None or (self.validated is not None and self.validated[0] is info
                             and self.validated[1] == info.revision):  # fmt: skip
            return True
        _, size, count = self.layout.config
        ok = (not info.packed or (info.packed_buffer_size_bytes, info.packed_num_buffers) == (size, count)) \
            and list(info.specs) == self.layout.specs  # fmt: skip
        if ok:
            self.validated = (info, info.revision)
        return ok


class ColocatedReceiver(WorkerSide):
    """Receives one update on a worker of a colocated group. One instance per update."""

    def __init__(self, group: SideGroup, update_info: NCCLWeightTransferUpdateInfo | None,
                 load_weights: LoadWeights, device: torch.device, *, atomic: bool,
                 progress: ReceiveProgress) -> None:  # fmt: skip
        self.group = group
        self.state = _State.of(group)
        self.control = self.state.control
        self.info = update_info
        self.load_weights = load_weights
        self.device = device
        self.atomic = atomic
        self.progress = progress
        self.error = b""
        self.released = 0
        self.staged: list[tuple[str, torch.Tensor]] = []
        self.heads: list[tuple[Any, torch.Tensor]] = []
        self.num_tensors = self.num_bytes = 0
        self.what = "update"
        self.in_table_mode = False
        self.finished = False
        self.direct_failed = False

    def row(self) -> list[int]:
        return make_row(Kind.WORKER, len(self.error), self.holds, int(self.plan_ok), int(self.atomic),
                        self.released, self.state.buffers_id, int(self.direct_failed))  # fmt: skip

    # -- the update ------------------------------------------------------------------------------

    def run(self) -> TransferStats:
        self.plan_ok = self.state.plan_ok(self.info)
        self.holds = self.state.layout.fingerprint if self.state.layout is not None else 0
        rows = self.control.post(self.row(), "update (begin)").rows()
        start = time.perf_counter()
        self.begin(rows)
        self.follow()
        seconds = time.perf_counter() - start
        log.debug("received %s (colocated): %d tensors, %d bytes in %.4f s (%.2f GB/s)", self.what, self.num_tensors,
                  self.num_bytes, seconds, self.num_bytes / max(seconds, 1e-9) / 1e9)  # fmt: skip
        return TransferStats(self.update_id, self.num_tensors, self.num_bytes, seconds)

    def begin(self, rows: list[Row]) -> None:
        row = self.trainer_row(rows, (Kind.BEGIN,))
        self.update_id = self.arg(row, 0, "update_id", 0, MAX_COUNT)
        self.what = f"update {self.update_id}"
        self.progress.update_id, self.progress.loads_started, self.progress.applied = self.update_id, False, False
        flags = self.arg(row, 1, "flags", FLAG_PACKED, FLAG_PACKED | FLAG_SHARE | FLAG_CACHED)
        if flags & FLAG_SHARE and flags & FLAG_CACHED:
            raise self.broken("the trainer's BEGIN row both shares new buffers and announces a cached layout")
        self.buffer_size = self.arg(row, 2, "buffer_size", ALIGNMENT, MAX_COUNT)
        self.num_buffers = self.arg(row, 3, "num_buffers", 1, MAX_NUM_BUFFERS)
        fingerprint, hint = row.args[4], self.arg(row, 5, "num_tensors", -1, MAX_COUNT)
        frame_len = self.arg(row, 6, "frame_bytes", 1 if flags & FLAG_SHARE else 0,
                              MAX_IPC_FRAME if flags & FLAG_SHARE else 0)  # fmt: skip
        buffers_id = row.args[7]
        self.any_atomic = any(r.args[3] for r in rows[1:])
        if flags & FLAG_CACHED:
            # The trainer goes on without waiting: every worker said at the last END that it holds
            # this layout (so no worker's BEGIN row carries an error: there is nothing to settle).
            if not fingerprint or fingerprint != self.holds:
                raise self.broken(f"the trainer sends a cached layout ({fingerprint:#x}) this rank does not hold")
        else:
            self.control.settle(rows, b"", f"{self.what} (begin)")
        if flags & FLAG_SHARE:
            self.share(frame_len, buffers_id)
        elif buffers_id != self.state.buffers_id or len(self.state.buffers) != self.num_buffers \
                or any(b.numel() != self.buffer_size for b in self.state.buffers):  # fmt: skip
            raise self.broken("the trainer uses buffers this worker has not mapped")
        cached = self.state.layout
        if flags & FLAG_CACHED:
            self.cached = cached
        else:
            self.cached = cached if fingerprint and all(r.args[1] == fingerprint and r.args[2] for r in rows[1:]) else None
        self.layout = Layout(True, self.buffer_size, self.num_buffers, BACKEND)
        if self.cached is not None and not self.layout.same_config(self.cached):
            raise self.broken(f"the trainer sends the cached layout {fingerprint:#x} with another configuration "
                              f"({self.layout.config}, not {self.cached.config})")  # fmt: skip
        self.check_cached = self.cached is not None and not self.plan_ok
        self.checker = TableChecker(self.info.specs if self.info is not None else None, self.buffer_size)
        if self.info is not None:  # O(1); on a checked cached layout it still meets a count the trainer changed
            self.check_config(hint, None)  # always packed

    def share(self, frame_len: int, buffers_id: int) -> None:
        """Map the trainer's new buffers (and, on CUDA, hand it this worker's release events)."""
        self.state.buffers, self.state.trainer_events, self.state.buffers_id = [], [], 0
        frame = self.control.recv_frame(frame_len, f"{self.what} (share buffers)")
        buffers, events = [], []
        try:
            desc = decode_frame(frame, "buffer description")
            if desc.get("id") != buffers_id:
                raise TransferError("the trainer's buffer description disagrees with its row")
            buffers, events = open_buffers(desc, self.device, self.num_buffers, self.buffer_size,
                                           self.group.cache.get(TRAINER_PID_KEY))  # fmt: skip
        except TransferError as e:
            self.fail(f"rank {self.group.rank()} could not map the trainer's buffers: {e}")
        if self.device.type == "cuda":
            if len(self.state.release_events) != self.num_buffers:
                self.state.release_events, blob = new_events(self.device, self.num_buffers)
            else:
                blob = b"".join(bytes(e.ipc_handle()) for e in self.state.release_events)
            gather_blobs(self.group, blob, 64 * self.num_buffers, f"{self.what} (release events)")
        rows = self.control.post(self.row(), f"{self.what} (share buffers)").rows()
        self.trainer_row(rows, (Kind.SYNC,))
        self.control.settle(rows, self.error, f"{self.what} (share buffers)")
        self.state.buffers, self.state.trainer_events, self.state.buffers_id = buffers, events, buffers_id

    def follow(self) -> None:
        """Every step after BEGIN, as the trainer's rows say."""
        bucket = 0
        syncs_since = None  # a trainer that only ever asks for SYNC steps is bounded too
        while True:
            rows = self.control.post(self.row(), f"{self.what} bucket {bucket}").rows()
            row = self.trainer_row(rows, (Kind.BUCKET, Kind.TABLE, Kind.ABORT, Kind.END, Kind.SYNC))
            if row.kind == Kind.SYNC:
                now = time.monotonic()
                syncs_since = now if syncs_since is None else syncs_since
                if now - syncs_since > 2 * self.group.timeout_s:
                    raise self.broken(f"the trainer sent SYNC rows for {now - syncs_since:.1f} s and nothing else")
                continue
            syncs_since = None
            if row.kind == Kind.END:
                return self.end(row, rows)
            self.arg(row, 0, "bucket", bucket, bucket)
            if row.kind == Kind.ABORT:
                self.control.settle(rows, self.error, self.what)
                raise TransferError(f"{self.what}: the trainer aborted it")
            last = bool(self.arg(row, 1, "last", 0, 1))
            if self.finished:
                raise self.broken(f"the trainer sent bucket {bucket} after the last one")
            direct = None
            if row.kind == Kind.BUCKET:
                if (self.cached is None or self.in_table_mode or bucket >= len(self.cached.buckets)):
                    raise self.broken(f"the trainer announced bucket {bucket} of a layout this rank does not hold")
                plan = self.cached.buckets[bucket]
                gen = self.arg(row, 2, "direct map", 0, MAX_COUNT)
                frame_len = self.arg(row, 3, "frame_bytes", 0, MAX_IPC_FRAME if gen else 0)
                if self.check_cached and not self.error:
                    try:
                        self.checker.check(BucketHeader(plan.index, plan.slots), bucket)
                    except TransferError as e:
                        self.fail(str(e))
                if gen:
                    direct = self.direct(plan, gen, frame_len)
                else:  # packed whole this time: its mappings are unmapped at the end unless another bucket reads them
                    plan.cache.pop("direct_recv", None)
            else:
                plan = self.table(bucket, row)
            self.load(plan, direct)
            self.layout.append(plan)
            bucket += 1
            if last:
                self.finish()

    def table(self, bucket: int, row: Row) -> BucketPlan:
        """A TABLE step: the frame, its checks, then the SYNC step every rank settles."""
        length = self.arg(row, 3, "frame_bytes", PREFIX_BYTES + 2, MAX_FRAME_BYTES)
        if not self.in_table_mode and self.layout.buckets:
            self.checker.resume_after(self.layout)  # after buckets of the cached layout
        self.in_table_mode = True
        frame = self.control.recv_frame(length, f"{self.what} table {bucket}")
        plan = None
        if not self.error:
            try:
                header = decode(frame)
                self.checker.check(header, bucket)
                plan = BucketPlan.make(bucket, header.slots, self.buffer_size, frame, BACKEND)
            except TransferError as e:
                self.fail(str(e))
        rows = self.control.post(self.row(), f"{self.what} bucket {bucket} (check)").rows()
        self.trainer_row(rows, (Kind.SYNC,))
        self.control.settle(rows, self.error, f"{self.what} bucket {bucket}")
        assert plan is not None  # a rank without a plan has failed, and settle raised on every rank
        return plan

    def direct(self, plan: BucketPlan, gen: int, frame_len: int) -> dict[int, torch.Tensor] | None:
        """The bucket's tensors the trainer lets this worker read where they lie (direct reads):
        the map of generation ``gen``, sent now (``frame_len`` bytes) or held from an earlier
        update. A map that cannot be used fails this worker (and the row tells the trainer, which
        packs every tensor from then on)."""
        frame = self.control.recv_frame(frame_len, f"{self.what} bucket {plan.index} (direct reads)") if frame_len else None
        if self.error:
            return None
        held = plan.cache.get("direct_recv")
        try:
            if not self.group.cache.get(DIRECT_OK_KEY, False):
                raise TransferError(f"this worker did not consent to direct reads ({DIRECT_ENV}=1 at its init)")
            if frame is None:
                if held is None or held[0] != gen:
                    raise TransferError(f"the trainer announced direct-read map {gen}, which this rank does not hold")
                return dict(held[1].pairs(self.leaves_views))  # the same views unless load_weights changed one
            views, handles = self.map_direct(plan, gen, frame)
        except TransferError as e:
            self.direct_failed = True
            self.fail(f"rank {self.group.rank()} cannot read the trainer's tensors of bucket {plan.index} in place: {e}")
            return None
        plan.cache["direct_recv"] = (gen, KeptViews(tuple(views.items())), handles)
        return views

    def map_direct(self, plan: BucketPlan, gen: int, frame: bytes) -> tuple[dict[int, torch.Tensor], frozenset[bytes]]:
        """Check a direct-read map and map the allocations it names (once each, checked against
        the driver's own size of the mapped allocation): per slot position, a typed view."""
        body = decode_frame(frame, "direct-read map")
        entries, segments = body.get("slots"), body.get("segments")
        if body.get("gen") != gen or not isinstance(entries, list) or not isinstance(segments, list) \
                or not 1 <= len(segments) <= len(entries) <= len(plan.slots):  # fmt: skip
            raise TransferError("the direct-read map is malformed or disagrees with the trainer's row")
        bases, handles = [], []
        for seg in segments:
            if not (isinstance(seg, list) and len(seg) == 3 and isinstance(seg[0], str) and len(seg[0]) == 128
                    and _is_int(seg[1]) and seg[1] > 0 and _is_int(seg[2])):  # fmt: skip
                raise TransferError("the direct-read map names a malformed allocation")
            try:
                handle = bytes.fromhex(seg[0])
            except ValueError:
                handle = b""
            if len(handle) != 64:  # fromhex skips whitespace: 128 characters may hold fewer bytes
                raise TransferError("the direct-read map names a malformed allocation")
            bases.append(self.direct_segment(handle, seg[1], seg[2]))
            handles.append(handle)
        views: dict[int, torch.Tensor] = {}
        last = -1
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3 and all(map(_is_int, entry))):
                raise TransferError("the direct-read map has a malformed entry")
            p, s, offset = entry
            if not last < p < len(plan.slots) or s >= len(bases):
                raise TransferError(f"the direct-read map names slot {p} or allocation {s}, out of range")
            slot = plan.slots[p]
            base = bases[s]
            if not slot.is_whole or not slot.length or offset + slot.length > base.numel() \
                    or offset % slot.spec.dtype.itemsize:  # fmt: skip
                raise TransferError(f"the direct-read map puts {slot.spec.name!r} ({slot.length} bytes) at offset "
                                    f"{offset} of an allocation of {base.numel()} bytes")  # fmt: skip
            views[p] = typed_view(base[offset : offset + slot.length], slot.spec)
            last = p
        return views, frozenset(handles)

    def direct_segment(self, handle: bytes, size: int, buffer_id: int) -> torch.Tensor:
        """The trainer's allocation behind ``handle``, mapped once (a new allocation behind the same
        handle bytes, by its allocation id, is mapped afresh after every view of the old one goes)."""
        maps = self.state.direct_maps
        known = maps.get(handle)
        if known is not None and known[1:] == (size, buffer_id):
            return known[0]
        if known is not None:
            self.drop_direct()
        if self.device.type == "cuda":
            tensor = open_memory(self.device, handle, size, "the trainer's tensor memory")  # its size checked
        else:  # the trainer's shared memory, through the descriptor it holds (its file checked)
            tensor = open_shared(handle, size, buffer_id, self.group.cache.get(TRAINER_PID_KEY))
        maps[handle] = (tensor, size, buffer_id)
        return tensor

    def drop_direct(self) -> None:
        """Forget every direct-read mapping and every map that views one (they are unmapped as the
        last view goes)."""
        for layout in (self.state.layout, self.cached, self.layout):
            for plan in layout.buckets if layout is not None else ():
                plan.cache.pop("direct_recv", None)
        self.state.direct_maps.clear()

    def finish(self) -> None:
        """After the last bucket: the update is whole, and as update_info lists (local)."""
        self.finished = True
        if not self.error:
            try:
                if not self.in_table_mode and self.layout.buckets:  # buckets of the cached layout alone
                    self.checker.resume_after(self.layout)
                self.checker.finish()
            except TransferError as e:
                self.fail(str(e))
        if not self.error:
            self.holds = self.layout.fingerprint

    def end(self, row: Row, rows: list[Row]) -> None:
        """END: counts, the agreement that every rank loaded everything, then (atomic) apply."""
        num_tensors = self.arg(row, 0, "num_tensors", 0, MAX_COUNT)
        if not self.finished:  # an empty update
            self.layout_empty_end(rows)
            return
        if not self.error and num_tensors != len(self.layout.specs):
            raise self.broken(f"the trainer says it sent {num_tensors} tensors but {len(self.layout.specs)} arrived")
        self.control.settle(rows, self.error, f"{self.what} (end)")
        self.apply()

    def layout_empty_end(self, rows: list[Row]) -> None:
        """An update of no tensors: END rows were posted before the count was checked, so a SYNC step follows."""
        self.finish()
        rows = self.control.post(self.row(), f"{self.what} (end)").rows()
        self.trainer_row(rows, (Kind.SYNC,))
        self.control.settle(rows, self.error, f"{self.what} (end)")
        self.apply()

    def apply(self) -> None:
        if self.any_atomic:
            if self.atomic and not self.error:
                staged, self.staged = self.staged, []
                self.call_load(staged, f"while applying {self.what}")
            if not self.error:  # this worker holds the whole update, whatever another's apply does
                self.progress.applied = True
            rows = self.control.post(self.row(), f"{self.what} (apply)").rows()
            self.trainer_row(rows, (Kind.SYNC,))
            self.control.settle(rows, self.error, f"{self.what} (apply)")
        self.progress.applied = True
        self.state.layout = self.layout
        self.state.validated = None if self.info is None else (self.info, self.info.revision)
        if self.state.direct_maps:  # unmap what this layout's maps no longer name
            used = set().union(*(p.cache["direct_recv"][2] for p in self.layout.buckets if "direct_recv" in p.cache))
            stale = [h for h in self.state.direct_maps if h not in used]
            if stale and self.device.type == "cuda":  # no read of them may still be queued when they are unmapped
                torch.cuda.current_stream(self.device).synchronize()
            for handle in stale:
                del self.state.direct_maps[handle]

    # -- payload ----------------------------------------------------------------------------------

    def load(self, plan: BucketPlan, direct: dict[int, torch.Tensor] | None = None) -> None:
        """Hand the bucket's tensors (views of the shared buffer, and ``direct``: of the trainer's
        own memory, by slot position) to load_weights, then release it."""
        b = plan.index % self.num_buffers
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.current_stream(self.device).wait_event(self.state.trainer_events[b])
        if not self.error:
            try:
                batch = self.tensors(plan, self.state.buffers[b], direct)
            except (RuntimeError, ValueError) as e:  # a table that passed the checks and still cannot be viewed
                self.fail(f"rank {self.group.rank()} cannot view bucket {plan.index}: {type(e).__name__}: {e}")
                batch = []
            if batch and self.atomic:
                self.stage(batch, f"in bucket {plan.index}")
            elif batch:
                self.call_load(batch, f"in bucket {plan.index}")
            for slot, raw in self.heads:  # a split tensor's head, after the batch that may read the assembly
                self.state.assembly[: slot.length].copy_(raw)
            self.heads = []
        if cuda:
            self.state.release_events[b].record(torch.cuda.current_stream(self.device))
        self.released += 1

    def tensors(self, plan: BucketPlan, buf: torch.Tensor,
                direct: dict[int, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:  # fmt: skip
        """The bucket's complete tensors: views of the buffer (made once per layout), of the
        assembly tensor for a tensor split across buckets, or (``direct``) of the trainer's memory."""
        memo = plan.cache.get("ipc_recv")
        if memo is None or memo[0] != buf.data_ptr():
            out = self.views(plan, buf)
            memo = plan.cache.get("ipc_recv")
            if memo is None or memo[0] != buf.data_ptr():
                return out
        else:
            self.num_tensors += memo[2]
            self.num_bytes += memo[3]
        pairs = memo[1].pairs(self.leaves_views)  # the same views unless load_weights changed one
        if direct:
            out = list(pairs)
            for p, view in direct.items():
                out[p] = (out[p][0], view)
            return out
        return SlicedBatch(pairs, memo[4], memo[5])

    def views(self, plan: BucketPlan, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """:meth:`tensors` the first time a plan is seen on ``buf``."""
        out, count, nbytes = [], 0, 0
        for slot in plan.slots:
            if slot.is_last:
                count, nbytes = count + 1, nbytes + slot.spec.nbytes
            raw = slot_view(buf, slot)
            if slot.is_whole:
                out.append((slot.spec.name, typed_view(raw, slot.spec)))
            elif slot.start == 0:
                if self.state.assembly.numel() < slot.spec.nbytes or self.state.assembly.device != self.device:
                    self.state.assembly = torch.empty(0, dtype=torch.uint8)
                    self.state.assembly = torch.empty(slot.spec.nbytes, dtype=torch.uint8, device=self.device)
                self.heads.append((slot, raw))
            else:
                assembly = self.state.assembly
                assembly[slot.start : slot.start + slot.length].copy_(raw)
                if slot.is_last:
                    out.append((slot.spec.name, typed_view(assembly[: slot.spec.nbytes], slot.spec)))
        self.num_tensors += count
        self.num_bytes += nbytes
        if all(s.is_whole for s in plan.slots):
            # Runs of slices back to back in the buffer (as the trainer packs them): a loader may
            # copy each run out at once (``loading.SlicedBatch``).
            slots = plan.slots
            cat = concat_plan(buf, slots, range(len(slots)), [t for _, t in out])
            runs = tuple((first, end, base, [s.spec.shape[0] for s in slots[first:end]]) for first, end, base in cat.segments)
            plan.cache["ipc_recv"] = (buf.data_ptr(), KeptViews(tuple(out)), count, nbytes, runs, tuple(cat.rest))
        return out
