"""The worker's half of an update: one method per protocol step.

Every worker runs :class:`Receiver` while rank 0 runs
:class:`torchxfer.sender.Sender`; the module docstring there gives the steps.
Before the BEGIN step a worker posts bucket 0 of the layout every worker
confirmed at the last END (``plan.first_bucket``); the BEGIN row says whether
it is this update's bucket 0 or void broadcasts to drop. A worker posts its
row in every step (its status: 0, or the byte length of its first error) and
follows the trainer's row:

* ``BUCKET``: the next bucket of the cached layout: post its broadcasts
  into buffer ``bucket % num_buffers`` (views of it are made once per
  layout and handed out again), unless they were posted ahead; unless it
  is the last, post the layout's next bucket ahead (``plan.next_bucket``):
  the trainer sends it next, or, before any other row, void broadcasts of
  its sizes, which are dropped; and post this rank's rows of the next two
  steps (see :meth:`Receiver.follow`; a row posted ahead of a step that is
  not another bucket is matched by the trainer's SYNC row);
* ``TABLE``: a new layout from this bucket on: receive, decode and check the
  table; the SYNC step that follows tells every rank whether all accepted it
  before any of its payload moves;
* ``ABORT``: the trainer stopped: post what it already posted, then raise the
  agreed error;
* ``END``: check the counts; the last step tells every rank whether all
  received and loaded everything (and, for atomic workers, a SYNC step
  whether all applied it).

A worker that failed keeps posting every collective the trainer's rows call
for, and loads nothing more. Every wait is bounded by ``timeout_s``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import MAX_NUM_BUFFERS, NCCLWeightTransferUpdateInfo, TransferStats
from . import control
from .control import ControlChannel, Step, encode_message
from .errors import TransferError
from .group import SideGroup
from .loading import KeptViews, ModuleLoader
from .packing import ALIGNMENT, Slot, slot_view, typed_view
from .plan import BucketPlan, Layout, TableChecker, first_bucket, next_bucket, rows_ahead
from .wire import (FLAG_BUCKET0, FLAG_CACHED, FLAG_CHECKSUM, FLAG_PACKED, MAX_COUNT, MAX_FRAME_BYTES, PREFIX_BYTES, BucketHeader, Kind,
                   Row, check_arg, decode, make_row)  # fmt: skip

__all__ = ["LoadWeights", "ReceiveProgress", "ReceiverState", "Receiver"]

log = logging.getLogger("torchxfer")

LoadWeights = Callable[[list[tuple[str, torch.Tensor]]], None]


@dataclasses.dataclass
class ReceiveProgress:
    """What a receiver has done to its weights; read by the engine after a failure."""

    update_id: int | None = None
    loads_started: bool = False
    applied: bool = False


class ReceiverState:
    """What a worker keeps per group: the last layout, buffers, the assembly buffer."""

    def __init__(self, group: SideGroup) -> None:
        self.group = group
        self.control = ControlChannel(group)
        self.layout: Layout | None = None
        self.confirmed = False  # every worker held ``layout`` at the end of the last update that completed
        self.validated: Any = None  # (the update_info the layout was checked against, its revision then)
        self.buffers: list[torch.Tensor] = []
        self.device: torch.device | None = None
        self.assembly = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def of(group: SideGroup) -> ReceiverState:
        state = group.cache.get("receiver")
        if state is None:
            state = group.cache["receiver"] = ReceiverState(group)
        return state

    def prepare(self, device: torch.device, num_buffers: int) -> None:
        if self.device != device:
            self.buffers, self.device = [], device
        while len(self.buffers) < num_buffers:
            self.buffers.append(torch.empty(0, dtype=torch.uint8, device=device))

    def grown_size(self, b: int, nbytes: int, limit: int, device: torch.device) -> int:
        """The bytes :meth:`buffer` allocates to give buffer ``b`` room for ``nbytes`` on
        ``device`` (0: it has the room): it grows geometrically up to ``limit``."""
        buf = self.buffers[b] if self.device == device and b < len(self.buffers) else None
        if buf is not None and buf.numel() >= nbytes:
            return 0
        return min(limit, max(nbytes, 2 * buf.numel() if buf is not None else 0, 1 << 20))

    def buffer(self, b: int, nbytes: int, limit: int) -> torch.Tensor:
        """Buffer ``b`` with room for ``nbytes`` (its old bytes are not kept), growing
        geometrically up to ``limit`` (see :meth:`grown_size`)."""
        buf = self.buffers[b]
        if buf.numel() < nbytes:
            size = self.grown_size(b, nbytes, limit, self.device)
            self.buffers[b] = buf = torch.empty(0, dtype=torch.uint8, device=buf.device)  # free the old one first
            self.buffers[b] = buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        return buf

    def assembly_for(self, nbytes: int, device: torch.device) -> None:
        """Make the assembly tensor hold ``nbytes`` on ``device`` (its contents are not kept)."""
        if self.assembly.numel() < nbytes or self.assembly.device != device:
            self.assembly = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.assembly = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def plan_ok(self, info: NCCLWeightTransferUpdateInfo | None) -> bool:
        """Whether the cached layout is known to satisfy ``info`` (checked once per info)."""
        layout = self.layout
        if layout is None:
            return False
        if info is None or (self.validated is not None and self.validated[0] is info
                             and self.validated[1] == info.revision):  # fmt: skip
            return True
        packed, buffer_size, num_buffers = layout.config
        ok = info.packed == packed and (not packed or (info.packed_buffer_size_bytes, info.packed_num_buffers)
                                        == (buffer_size, num_buffers)) and list(info.specs) == layout.specs  # fmt: skip
        if ok:
            self.validated = (info, info.revision)
        return ok


@dataclasses.dataclass
class _Posted:
    """A bucket whose broadcasts are posted and not yet loaded."""

    plan: BucketPlan
    works: list[Any]
    dests: dict[int, torch.Tensor]
    expected_checksum: int | None


class WorkerSide:
    """What both receivers (broadcast and colocated) do alike on a worker: remember the
    first failure, check the trainer's row kind, hand batches to ``load_weights``.

    Needs ``group``, ``what``, ``error``, ``load_weights`` and ``progress``
    (and, for ``check_config``, ``info``, ``buffer_size`` and ``num_buffers``).
    """

    group: SideGroup
    what: str
    error: bytes
    load_weights: LoadWeights
    progress: ReceiveProgress

    def fail(self, message: str) -> None:
        """Remember this rank's first failure; it goes out in this rank's next row."""
        if not self.error:
            self.error = encode_message(message) or b"?"

    def broken(self, message: str) -> TransferError:
        self.group.mark_broken(message)
        return TransferError(f"{self.what} on rank {self.group.rank()}: {message}", broken=True)

    def arg(self, row: Row, position: int, what: str, lo: int, hi: int) -> int:
        """A word of the trainer's row, in ``[lo, hi]``; a value outside it breaks the group, since
        the ranks can no longer agree on the collectives that follow."""
        try:
            return check_arg(row, position, what, lo, hi)
        except TransferError as e:
            raise self.broken(f"the trainer's {e}") from None

    def trainer_row(self, rows: list[Row], kinds: tuple[Kind, ...]) -> Row:
        row = rows[0]
        if row.kind not in kinds:
            raise self.broken(f"the trainer sent a {row.kind.name} row where {'/'.join(k.name for k in kinds)} was due")
        return row

    def check_config(self, hint: int, packed: bool | None) -> None:
        """Fail this rank if the trainer's configuration (``packed``: its packed
        flag, None where it has no unpacked mode; ``buffer_size``,
        ``num_buffers``; ``hint``: its tensor count, -1 if unknown) differs from
        this worker's ``update_info``. Local; never blocks."""
        info, problems = self.info, []
        if packed is not None and packed != info.packed:
            problems.append(f"packed: trainer sends packed={packed}, update_info says packed={info.packed}")
        elif info.packed:
            if self.buffer_size != info.packed_buffer_size_bytes:
                problems.append(f"packed_buffer_size_bytes: trainer uses {self.buffer_size}, "
                                f"update_info says {info.packed_buffer_size_bytes}")  # fmt: skip
            if self.num_buffers != info.packed_num_buffers:
                problems.append(f"packed_num_buffers: trainer uses {self.num_buffers}, "
                                f"update_info says {info.packed_num_buffers}")  # fmt: skip
        if hint >= 0 and hint != len(info.names):
            problem = f"count: trainer sends {hint} tensors, update_info lists {len(info.names)}"
            cached = getattr(self, "cached", None)
            if cached is not None:  # the trainer announced a layout this rank holds: its names are known
                sent = [spec.name for spec in cached.specs]
                sent_set, listed = set(sent), set(info.names)
                missing = [n for n in info.names if n not in sent_set][:5]
                extra = [n for n in sent if n not in listed][:5]
                problem += f" (not sent: {missing}; not listed: {extra})"
            problems.append(problem)
        if problems:
            self.fail("; ".join(problems))

    def check_open(self) -> None:
        if self.group.closed:
            raise TransferError(f"{self.what}: the engine was shut down", broken=True)

    @property
    def leaves_views(self) -> bool:
        """Whatever is handed out goes to a consumer that never changes it in place: this
        package's :class:`ModuleLoader`, or (atomic) the staging copy."""
        return self.atomic or type(self.load_weights) is ModuleLoader

    def call_load(self, batch: list[tuple[str, torch.Tensor]], where: str) -> None:
        """Hand ``batch`` to load_weights (unless the engine was shut down); its failure becomes this rank's."""
        self.check_open()
        self.progress.loads_started = True
        try:
            self.load_weights(batch)
        except Exception as e:
            self.fail(f"load_weights raised on rank {self.group.rank()} {where}: {type(e).__name__}: {e}")

    def stage(self, batch: list[tuple[str, torch.Tensor]], where: str) -> None:
        """Atomic workers: keep a copy of ``batch`` until the apply step. A copy that cannot be
        made (the update outgrew this rank's memory) becomes this rank's failure."""
        try:
            self.staged.extend((name, t.clone()) for name, t in batch)
        except (RuntimeError, MemoryError) as e:
            self.staged = []
            self.fail(f"rank {self.group.rank()} cannot stage the update {where} for an atomic apply: "
                      f"{type(e).__name__}: {str(e)[:200]}")  # fmt: skip


class Receiver(WorkerSide):
    """Receives one update on a worker (see the module docstring). One instance per update."""

    def __init__(self, group: SideGroup, update_info: NCCLWeightTransferUpdateInfo | None,
                 load_weights: LoadWeights, device: torch.device, *, atomic: bool,
                 progress: ReceiveProgress) -> None:  # fmt: skip
        self.group = group
        self.state = ReceiverState.of(group)
        self.control = self.state.control
        self.info = update_info
        self.load_weights = load_weights
        self.device = device
        self.atomic = atomic
        self.progress = progress
        self.error: bytes = b""
        self.pending: collections.deque[_Posted] = collections.deque()
        self.staged: list[tuple[str, torch.Tensor]] = []
        self.head: tuple[Slot, torch.Tensor] | None = None
        self.num_tensors = 0
        self.num_bytes = 0
        self.what = "update"
        self.in_table_mode = False
        self.direct_split: tuple[int, bool] | None = None
        self.empty = torch.empty(0, dtype=torch.uint8, device=device)
        self.checked = 0  # buckets the table checker has followed
        self.speculated: _Posted | None = None  # bucket 0 of the confirmed layout, posted ahead
        self.prepared = False

    def row(self) -> list[int]:
        return make_row(Kind.WORKER, len(self.error), self.holds, int(self.plan_ok), int(self.atomic))

    # -- the update ------------------------------------------------------------------------------

    def run(self) -> TransferStats:
        self.plan_ok = self.state.plan_ok(self.info)
        self.holds = self.state.layout.fingerprint if self.state.layout is not None else 0
        start = time.perf_counter()
        self.speculate()
        try:
            rows = self.control.post(self.row(), "update (begin)").rows()
            self.begin(rows)
            self.follow()
        except Exception:
            self.drain()
            raise
        seconds = time.perf_counter() - start
        log.debug("received %s: %d tensors, %d bytes in %.4f s (%.2f GB/s)", self.what, self.num_tensors,
                  self.num_bytes, seconds, self.num_bytes / max(seconds, 1e-9) / 1e9)  # fmt: skip
        return TransferStats(self.update_id, self.num_tensors, self.num_bytes, seconds)

    def speculate(self) -> None:
        """Post bucket 0 of the confirmed layout before the BEGIN step (see ``first_bucket``):
        in the steady state its payload moves as soon as the trainer posts it."""
        plan = first_bucket(self.state.layout, self.state.confirmed)
        if plan is None:
            return
        self.packed, self.buffer_size, self.num_buffers = self.state.layout.config
        self.speculated = self.post_bucket(plan)

    def drop_speculated(self) -> None:
        """The trainer did not send the bucket posted ahead: wait for its void broadcasts and drop them."""
        void, self.speculated = self.speculated, None
        self.wait(void)
        self.direct_split = None

    def begin(self, rows: list[Row]) -> None:
        """BEGIN step: take the trainer's configuration; use the cached layout if every worker holds it."""
        row = self.trainer_row(rows, (Kind.BEGIN,))
        self.update_id = self.arg(row, 0, "update_id", 0, MAX_COUNT)
        self.what = f"update {self.update_id}"
        self.progress.update_id, self.progress.loads_started, self.progress.applied = self.update_id, False, False
        flags = self.arg(row, 1, "flags", 0, FLAG_PACKED | FLAG_CHECKSUM | FLAG_CACHED | FLAG_BUCKET0)
        self.packed, self.checksum = bool(flags & FLAG_PACKED), bool(flags & FLAG_CHECKSUM)
        size = self.arg(row, 2, "buffer_size", ALIGNMENT if self.packed else 0, MAX_COUNT if self.packed else 0)
        self.buffer_size = size if self.packed else None
        self.num_buffers = self.arg(row, 3, "num_buffers", 1, MAX_NUM_BUFFERS)
        fingerprint = row.args[4]
        hint = self.arg(row, 5, "num_tensors", -1, MAX_COUNT)
        self.any_atomic = any(r.args[3] for r in rows[1:])
        cached = self.state.layout
        if self.speculated is not None and not (flags & FLAG_CACHED and flags & FLAG_BUCKET0):
            self.drop_speculated()
        # With FLAG_BUCKET0 this row is also bucket 0's BUCKET row.
        self.first = Row(Kind.BUCKET, (0, *row.args[6:])) if flags & FLAG_BUCKET0 and flags & FLAG_CACHED else None
        if flags & FLAG_CACHED:
            # The trainer goes on without waiting: every worker confirmed holding this layout.
            if not fingerprint or fingerprint != self.holds:
                raise self.broken(f"the trainer sends a cached layout ({fingerprint:#x}) this rank does not hold")
            self.cached = cached
        else:
            self.control.settle(rows, b"", f"{self.what} (begin)")
            self.cached = cached if fingerprint and all(r.args[1] == fingerprint and r.args[2] for r in rows[1:]) \
                else None  # fmt: skip
        self.layout = Layout(self.packed, self.buffer_size, self.num_buffers, self.group.backend_name)
        if self.cached is not None and not self.layout.same_config(self.cached):
            raise self.broken(f"the trainer sends the cached layout {fingerprint:#x} with another configuration "
                              f"({self.layout.config}, not {self.cached.config})")  # fmt: skip
        # A cached layout this worker has not checked against its update_info is checked bucket by bucket.
        self.check_cached = self.cached is not None and not self.plan_ok
        self.checker = TableChecker(self.info.specs if self.info is not None else None, self.buffer_size)
        self.prepared = False
        if self.info is not None:  # O(1); on a checked cached layout it still meets a count the trainer changed
            self.check_config(hint, self.packed)

    def follow(self) -> None:
        """Every step after BEGIN, as the trainer's rows say.

        After a BUCKET row that is not the last, the trainer's next control
        operation is always another row, so this rank posts its own row of
        that step before it receives and loads the bucket: the step is under
        way while this rank waits for payload, and its row is ready the moment
        the bucket is loaded. Two buckets or more from the cached layout's
        end it posts its row of the step after that one too, which the
        trainer matches with a SYNC row when its next row turns out to be
        anything but another BUCKET row that is not the last
        (``Sender.after_row``): two round trips are then under way at once.
        A row declares this rank's status as of posting; a failure while
        receiving or loading the bucket goes out in a row one or two buckets
        later. After the bucket announced as
        the last, no row is posted early: the END row must carry every
        failure, including the last bucket's. That step (END, or an ABORT)
        goes over the payload group, behind the last bucket's payload: on
        NCCL the update then ends without a round trip on the slower
        control group.
        """
        bucket, last = 0, True
        ahead: collections.deque[Step] = collections.deque()  # rows of the next steps, posted ahead
        while True:
            if self.first is not None:
                row, self.first = self.first, None
            elif bucket and last:  # after the last bucket: END (or ABORT), queued behind the payload
                rows = self.control.post(self.row(), f"{self.what} (end)", payload=True).rows()
                row = self.trainer_row(rows, (Kind.ABORT, Kind.END))
            else:
                step = ahead.popleft() if ahead else self.control.post(self.row(), f"{self.what} bucket {bucket}")
                rows = step.rows()
                row = self.trainer_row(rows, (Kind.BUCKET, Kind.TABLE, Kind.ABORT, Kind.END))
            if ahead and not (row.kind == Kind.BUCKET and row.args[1] == 0):
                # This rank posted its row of the step after this one before it knew this row:
                # the trainer matches it with a SYNC row (Sender.after_row) before anything else.
                later = ahead.popleft().rows()
                self.trainer_row(later, (Kind.SYNC,))
                if row.kind == Kind.ABORT:  # as the trainer settles it (Sender.abort_step)
                    rows = rows[:1] + later[1:]
            if self.speculated is not None and row.kind in (Kind.TABLE, Kind.END):
                self.drop_speculated()
            if row.kind == Kind.END:  # with no bucket at all, the update's checks still run (an END step's SYNC)
                return self.end(row, rows, last and bucket > 0)
            self.arg(row, 0, "bucket", bucket, bucket)
            if row.kind == Kind.ABORT:
                self.drain()
                self.control.settle(rows, self.error, self.what)
                raise TransferError(f"{self.what}: the trainer aborted it")
            last = bool(self.arg(row, 1, "last", 0, 1))
            if row.kind == Kind.BUCKET:
                if (self.cached is None or self.in_table_mode or bucket >= len(self.cached.buckets)
                        or len(self.layout.buckets) != bucket):  # fmt: skip
                    raise self.broken(f"the trainer announced bucket {bucket} of a layout this rank does not hold")
                plan = self.cached.buckets[bucket]
                if self.check_cached and not self.error:
                    try:
                        self.checker.check(BucketHeader(plan.index, plan.slots), bucket)
                    except TransferError as e:
                        self.fail(str(e))
                    self.checked = bucket + 1
                if not last:  # the next step's row and, two buckets or more from the end, the one after
                    while len(ahead) < rows_ahead(self.cached, bucket):
                        ahead.append(self.control.post(self.row(), f"{self.what} bucket {bucket + 1 + len(ahead)}"))
                self.receive(plan, row.args[2])
                if not last:  # the next bucket of the layout, before its row arrives (plan.next_bucket)
                    ahead_plan = next_bucket(self.cached, bucket)
                    if ahead_plan is not None:
                        self.speculated = self.post_bucket(ahead_plan)
            else:
                self.table(bucket, row)
            bucket += 1
            if last:
                self.finish()

    def table(self, bucket: int, row: Row) -> None:
        """A TABLE step: the frame, its checks, the SYNC step, then the bucket's payload."""
        length = self.arg(row, 3, "frame_bytes", PREFIX_BYTES + 2, MAX_FRAME_BYTES)
        self.in_table_mode = True
        frame = self.control.recv_frame(length, f"{self.what} table {bucket}")
        plan = None
        if not self.error:
            try:
                self.resume_checker()
                header = decode(frame)
                self.checker.check(header, bucket)
                plan = BucketPlan.make(bucket, header.slots, self.buffer_size, frame, self.group.backend_name)
                self.reserve(plan)
            except TransferError as e:
                self.fail(str(e))
        self.checked = bucket + 1
        rows = self.control.post(self.row(), f"{self.what} bucket {bucket} (check)").rows()
        self.control.settle(rows, self.error, f"{self.what} bucket {bucket}")
        assert plan is not None  # a rank without a plan has failed, and settle raised on every rank
        self.receive(plan, row.args[2])

    def reserve(self, plan: BucketPlan) -> None:
        """Check that this rank can allocate what a new bucket's table asks for, before the
        SYNC step agrees on it: the sizes come from the trainer (a buffer up to its size,
        a split tensor's assembly, unpacked tensors), so a failed allocation becomes this
        rank's error, reported to every rank, and never an exception after the agreement."""
        if self.buffer_size is None:
            sizes = [s.length for s in plan.slots if s.length]
        else:
            grown = self.state.grown_size(plan.index % self.num_buffers, plan.extent, self.buffer_size, self.device)
            sizes = [grown] if grown else []
            head = next((s for s in plan.slots if not s.is_whole and s.start == 0), None)
            if head is not None and (self.state.assembly.numel() < head.spec.nbytes
                                     or self.state.assembly.device != self.device):  # fmt: skip
                sizes.append(head.spec.nbytes)
        if not sizes:
            return
        try:
            probe = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        except (RuntimeError, MemoryError) as e:
            raise TransferError(f"bucket {plan.index} needs {sum(sizes)} bytes on {self.device}, which rank "
                                f"{self.group.rank()} cannot allocate ({type(e).__name__}: {str(e)[:200]})") from None
        del probe

    def resume_checker(self) -> None:
        """Bring the table checker up to the buckets received so far (those of the cached layout)."""
        if self.checked != len(self.layout.buckets):
            self.checker.resume_after(self.layout)
            self.checked = len(self.layout.buckets)

    def end(self, row: Row, rows: list[Row], last: bool) -> None:
        """END step: counts, then the agreement that every rank loaded everything, then apply."""
        num_tensors = self.arg(row, 0, "num_tensors", 0, MAX_COUNT)
        if not last:
            self.finish()
        if not self.error and num_tensors != self.checker.next_index:
            raise self.broken(f"the trainer says it sent {num_tensors} tensors but {self.checker.next_index} arrived")
        if not last:
            rows = self.control.post(self.row(), f"{self.what} (end)").rows()
            self.trainer_row(rows, (Kind.SYNC,))
        self.control.settle(rows, self.error, f"{self.what} (end)")
        # As the trainer reads the same rows: every worker now holds this layout, or not.
        held = all(r.args[1] == self.layout.fingerprint for r in rows[1:])
        if self.any_atomic:
            if self.atomic:
                self.apply()
            if not self.error:
                # This worker holds the whole update now (every rank received everything, and its own
                # loads all succeeded), whatever another worker's apply does: not torn, and the new
                # version, even when the update fails below for every rank.
                self.progress.applied = True
            rows = self.control.post(self.row(), f"{self.what} (apply)").rows()
            self.trainer_row(rows, (Kind.SYNC,))
            self.control.settle(rows, self.error, f"{self.what} (apply)")
        self.progress.applied = True
        self.state.layout = self.layout
        self.state.confirmed = held
        self.state.validated = None if self.info is None else (self.info, self.info.revision)

    def finish(self) -> None:
        """After the last bucket: load everything, then check the update is whole (before the final row)."""
        self.load_all()
        if not self.error:
            try:
                self.resume_checker()
                self.checker.finish()
            except TransferError as e:
                self.fail(str(e))
        if not self.error:
            self.holds = self.layout.fingerprint  # the final row says this worker holds it

    def apply(self) -> None:
        staged, self.staged = self.staged, []
        self.call_load(staged, f"while applying {self.what}")

    # -- payload ----------------------------------------------------------------------------------

    def ensure_prepared(self) -> None:
        if not self.prepared:
            self.state.prepare(self.device, self.num_buffers)
            self.prepared = True

    def make_room(self, bucket: int) -> None:
        """Load older buckets until buffer ``bucket % num_buffers`` is free."""
        self.ensure_prepared()
        while len(self.pending) >= self.num_buffers:
            self.load(self.pending.popleft())

    def receive(self, plan: BucketPlan, expected_checksum: int) -> None:
        """Post the bucket's broadcasts (unless posted ahead), then load what is due."""
        posted, self.speculated = self.speculated or self.post_bucket(plan), None
        assert plan is posted.plan
        posted.expected_checksum = expected_checksum if self.checksum else None
        self.pending.append(posted)
        self.layout.append(plan)
        while len(self.pending) > self.num_buffers - 1:
            self.load(self.pending.popleft())

    def post_bucket(self, plan: BucketPlan) -> _Posted:
        """Post the bucket's broadcasts once its buffer is free (its checksum is set later)."""
        self.make_room(plan.index)
        direct = self.split_direct(plan)
        head = next((plan.slots[pos] for pos in direct if plan.slots[pos].start == 0), None)
        try:
            if head is not None:
                # The assembly tensor gets a new owner; no bucket in flight reads it (split_direct),
                # and on CUDA the loads of the previous owner are ordered before this bucket's receives.
                self.state.assembly_for(head.spec.nbytes, self.device)
            dests, works = self.post_runs(plan, direct)
        except TransferError:
            raise
        except (RuntimeError, MemoryError) as e:
            # What ``reserve`` probed before the agreement was taken since (by another process on
            # the device, say): this rank cannot post the bucket's receives.
            raise self.cannot_allocate(plan, "post", e) from None
        return _Posted(plan, works, dests, None)

    def cannot_allocate(self, plan: BucketPlan, step: str, e: BaseException) -> TransferError:
        """An allocation failed after the agreement (``reserve`` probes each bucket's own needs
        only, and memory can be taken since): the group is broken, as for a failed receive,
        since this rank cannot post or load what the trainer's rows say."""
        return self.broken(f"rank {self.group.rank()} cannot allocate memory to {step} bucket {plan.index} of "
                           f"{self.what} on {self.device}: {type(e).__name__}: {str(e)[:200]}")  # fmt: skip

    def split_direct(self, plan: BucketPlan) -> set[int]:
        """Positions of the bucket's slots of split tensors that are received straight into
        the assembly tensor rather than into the buffer and copied.

        A split tensor's head goes straight there when it travels alone, no other
        split tensor's tail shares its bucket, and no bucket posted and not yet
        loaded holds a part of a split tensor (each would still be read from the
        assembly tensor); the rest of the tensor follows its head's way. Otherwise
        its parts arrive in the buffers and are copied into the assembly tensor as
        they are loaded, so the receives never wait for the previous owner's load.
        """
        if "whole" not in plan.cache:
            plan.cache["whole"] = all(s.is_whole for s in plan.slots)
        if plan.cache["whole"]:
            return set()
        own = {p for _, _, p in plan.runs if p is not None}
        out = set()
        for pos, slot in enumerate(plan.slots):
            if slot.is_whole or self.buffer_size is None:
                continue
            if slot.start == 0:
                direct = (pos in own and not any(s.start > 0 for s in plan.slots)
                          and all(p.plan.cache.get("whole", True) for p in self.pending))  # fmt: skip
                self.direct_split = (slot.index, direct)
            else:
                direct = self.direct_split == (slot.index, True)
            if direct and pos in own:
                out.add(pos)
        return out

    def post_runs(self, plan: BucketPlan, direct: set[int] = frozenset()) -> tuple[dict[int, torch.Tensor], list[Any]]:
        """Post broadcasts into the bucket's buffer (packed), the assembly tensor (``direct``
        split slots) or fresh tensors (unpacked), grouped as the sender groups them
        (``plan.groups``)."""
        dests: dict[int, torch.Tensor] = {}
        works: list[Any] = []
        if not plan.runs:
            return dests, works
        if self.buffer_size is not None:
            buf = self.state.buffer(plan.index % self.num_buffers, plan.extent, self.buffer_size)
        # Posted on the current stream: on CUDA the receives then wait for every load already
        # issued there, among them those of the bucket that last used this buffer.
        for first, last in plan.groups:
            group = []
            for start, end, pos in plan.runs[first:last]:
                if pos in direct:
                    slot = plan.slots[pos]
                    dest = dests[pos] = self.state.assembly[slot.start : slot.start + slot.length]
                elif self.buffer_size is not None:
                    dest = buf[start:end]
                else:
                    dest = dests[pos] = torch.empty(end - start, dtype=torch.uint8, device=self.device)
                group.append(dest)
            try:
                works += self.group.broadcast_group(group)
            except Exception as e:
                raise self.broken(f"payload broadcast failed: {e}") from e
        return dests, works

    def wait(self, posted: _Posted) -> None:
        self.group.wait_all(posted.works, f"payload broadcast of {self.what}", data=True)
        posted.works = []

    def drain(self) -> None:
        """Wait for every posted broadcast (failures included: the group may be gone)."""
        if self.speculated is not None:
            self.pending.appendleft(self.speculated)
            self.speculated = None
        with contextlib.suppress(TransferError):
            while self.pending:
                self.wait(self.pending.popleft())

    def load_all(self) -> None:
        while self.pending:
            self.load(self.pending.popleft())

    def load(self, posted: _Posted) -> None:
        """Wait for a bucket's broadcasts (bounded), check it, and hand its tensors to load_weights."""
        self.wait(posted)
        if self.error:
            return
        plan = posted.plan
        buf = self.state.buffers[plan.index % self.num_buffers] if self.buffer_size is not None else None
        if posted.expected_checksum is not None:
            total = 0
            try:
                for i, (start, end, pos) in enumerate(plan.runs):
                    part = control.checksum(posted.dests[pos] if pos in posted.dests else buf[start:end])
                    total = (total + part * (i + 1)) % (1 << 61)
            except (RuntimeError, MemoryError) as e:  # its scratch memory
                raise self.cannot_allocate(plan, "check", e) from None
            if total != posted.expected_checksum:
                names = ", ".join(repr(s.spec.name) for s in plan.slots)
                self.fail(f"checksum mismatch in bucket {plan.index} on rank {self.group.rank()} (tensors {names})")
                return
        try:
            tensors = self.tensors(plan, buf, posted.dests)
        except (RuntimeError, ValueError) as e:  # a table that passed the checks and still cannot be viewed
            self.fail(f"rank {self.group.rank()} cannot view bucket {plan.index}: {type(e).__name__}: {e}")
            return
        if tensors and self.atomic:
            self.stage(tensors, f"in bucket {plan.index}")
        elif tensors:
            self.call_load(tensors, f"in bucket {plan.index}")
        try:
            self.after_load()
        except (RuntimeError, MemoryError) as e:  # the assembly of a split tensor, sized after the agreement
            raise self.cannot_allocate(plan, "load", e) from None

    def tensors(self, plan: BucketPlan, buf: torch.Tensor | None, dests: dict) -> list[tuple[str, torch.Tensor]]:
        """The bucket's complete tensors, in order: views into the buffer (made once per layout
        and buffer), or into the assembly buffer for a tensor split across buckets."""
        memo = plan.cache.get("recv")
        key = (buf.data_ptr(), buf.numel()) if buf is not None else None
        if memo is not None and memo[0] == key:
            self.num_tensors += memo[2]
            self.num_bytes += memo[3]
            return list(memo[1].pairs(self.leaves_views))  # the same views unless load_weights changed one
        out, count, nbytes = [], 0, 0
        for pos, slot in enumerate(plan.slots):
            if slot.is_last:
                count += 1
                nbytes += slot.spec.nbytes
            if slot.is_whole:
                raw = slot_view(buf, slot) if buf is not None else dests.get(pos, self.empty)
                out.append((slot.spec.name, typed_view(raw, slot.spec)))
                continue
            if pos in dests:  # received straight into the assembly tensor
                if slot.is_last:
                    out.append((slot.spec.name, typed_view(self.state.assembly[: slot.spec.nbytes], slot.spec)))
                continue
            raw = slot_view(buf, slot)
            if slot.start == 0:
                # A split tensor's head is its bucket's last slot, and the tail of the
                # previous split tensor may sit at the start of the same bucket, still
                # being read by load_weights: copy the head only after that call.
                self.head = (slot, raw)
            else:
                assembly = self.state.assembly
                assembly[slot.start : slot.start + slot.length].copy_(raw)
                if slot.is_last:
                    out.append((slot.spec.name, typed_view(assembly[: slot.spec.nbytes], slot.spec)))
        self.num_tensors += count
        self.num_bytes += nbytes
        if key is not None and all(s.is_whole for s in plan.slots):  # split tensors: built each time
            plan.cache["recv"] = (key, KeptViews(tuple(out)), count, nbytes)
        return out

    def after_load(self) -> None:
        """Start the split tensor whose head arrived in the bucket just loaded."""
        if self.head is None:
            return
        slot, raw = self.head
        self.head = None
        self.state.assembly_for(slot.spec.nbytes, raw.device)
        self.state.assembly[: slot.length].copy_(raw)

