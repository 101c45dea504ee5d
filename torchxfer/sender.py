"""The trainer's half of an update: rank 0 sends, one method per protocol step.

One update, as rank 0 drives it (every worker runs :mod:`torchxfer.receiver`
in lockstep; :mod:`torchxfer.wire` defines the rows)::

    (bucket 0)        after a packed update every worker completed, every
                      worker has already posted that layout's bucket 0
                      (``plan.first_bucket``): the update sends it first,
                      for real (before the BEGIN row that announces it)
                      or as void broadcasts of the same sizes
    BEGIN step        blocking unless every worker confirmed the cached
                      layout at the last END: config and its fingerprint;
                      every worker says whether it holds that layout
    per bucket:       pull its tensors: large ones are posted at once from
                      their own memory, small ones packed (fused copies)
      BUCKET step     not waited for: "the next bucket of the cached layout";
                      unless it is the last, every worker then posts the
                      layout's next bucket ahead (``plan.next_bucket``),
                      which the trainer sends next, for real or void, and
                      its rows of the next two steps (see ``after_row``)
      or TABLE step   a new layout: the bucket's table frame follows, then a
                      blocking SYNC step where every worker accepts it or not
      payload         the packed runs, posted behind the pack copies
    END step          blocking: every worker received and loaded everything;
                      after a bucket announced as the last, on the payload
                      group behind the payload (on NCCL a row there costs
                      tens of microseconds, a Gloo round trip hundreds)
    (SYNC step)       atomic workers applied their staged update

Workers' failures come back in their rows of the steps the trainer does not
wait for; it reads them STATUS_LAG steps late, so it never waits on the
newest step, and turns its next step into an ABORT. Payload shapes come from
the trainer's rows and tables alone, so a worker that rejects an update
still posts every collective: nothing deadlocks, and the group stays usable.

Sources: every tensor is consumed (its pack copy enqueued, or its broadcast
ordered before anything that follows) before the next one is pulled, so a
generator may refill one staging tensor. The exception, which makes the
steady state fast: a tensor that is the very object sent at the same place
last update, in a bucket whose tensors were all distinct objects, and that
comes from a list, tuple or dict or is an ``nn.Parameter`` (a module's
parameters; a generator may alternate staging tensors it refills), is packed
in fused batches and its zero-copy send is not waited for; so is every tensor of a source the package made itself
(``owned``: send_model's gathers and casts, which nothing else writes). In
the steady state a bucket is posted before the first tensor of the next one
is pulled, so work the source does when pulled (send_model's gathers) runs
while the bucket before it travels; the layout's last bucket is the
exception (its row says whether the source ends there), so a caller's
tensors of that bucket are packed and their bytes viewed before that pull. On CUDA, buffer reuse is ordered on the current stream
behind the sends that read the buffer (no CPU wait); every CPU wait is
bounded by ``timeout_s``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .config import TransferStats
from .control import ControlChannel, Step, encode_message
from .errors import TransferError
from .group import SideGroup
from .outbox import Outbox
from .packing import Planner, Slot, TensorSpec, whole_views
from .plan import BucketPlan, Layout, NewNames, first_bucket, next_bucket, rows_ahead
from .pulling import PLAIN_ITERATORS, Item, SourceFailed, pairs, pull_bucket, pull_same, then_raise
from .wire import FLAG_BUCKET0, FLAG_CACHED, FLAG_CHECKSUM, FLAG_PACKED, MAX_FRAME_BYTES, Kind, make_row

__all__ = ["SenderState", "Sender", "SendSide"]

log = logging.getLogger("torchxfer")

STATUS_LAG = 2
"""The trainer reads workers' rows this many steps late, so it never waits on the newest step."""
PACK_BATCH = 1024
"""Most pack copies fused into one multi-tensor copy."""
_MIN_BUFFER_BYTES = 1 << 20

_LATER: Any = object()
"""In place of the next item of a cached layout's bucket: not pulled yet. The sender pulls it
once the bucket is posted, so a source that works when pulled (send_model's gathers) does
not hold the bucket's broadcasts behind that work."""


class SenderState:
    """What rank 0 keeps per group: the last layout sent, buffers, the next update id."""

    def __init__(self, group: SideGroup) -> None:
        self.group = group
        self.control = ControlChannel(group)
        self.layout: Layout | None = None
        self.confirmed = 0  # the fingerprint every worker said it holds after the last update
        self.device: torch.device | None = None
        self.next_update_id = 0
        self.buffers: list[torch.Tensor] = []
        self.buffer_key: tuple | None = None

    @staticmethod
    def of(group: SideGroup) -> SenderState:
        state = group.cache.get("sender")
        if state is None:
            state = group.cache["sender"] = SenderState(group)
        return state

    def buffer(self, device: torch.device, buffer_size: int, num_buffers: int, b: int, nbytes: int,
               keep: int) -> torch.Tensor:  # fmt: skip
        """Buffer ``b`` with room for ``nbytes``, keeping its first ``keep`` bytes.

        Buffers are made once per (device, buffer size) and grow geometrically
        up to the buffer size in the first updates; a steady layout then
        reuses the same memory forever.
        """
        if self.buffer_key != (device, buffer_size):
            self.buffers, self.buffer_key = [], (device, buffer_size)
        while len(self.buffers) < num_buffers:
            self.buffers.append(torch.empty(0, dtype=torch.uint8, device=device))
        buf = self.buffers[b]
        if buf.numel() < nbytes:
            size = min(buffer_size, max(nbytes, 2 * buf.numel(), _MIN_BUFFER_BYTES))
            new = torch.empty(size, dtype=torch.uint8, device=device)
            if keep:
                new[:keep].copy_(buf[:keep])
            self.buffers[b] = buf = new
        return buf

    def prefilled_views(self, index: int, device: torch.device, buffer_size: int | None,
                        num_buffers: int) -> list[Any] | None:  # fmt: skip
        """Per slot of bucket ``index`` of the cached layout, the typed view of its buffer that
        the slot's tensor is packed into (None for a slot that is not packed), while that
        buffer is the one those views were made of; else None. Local; it orders nothing: the
        buffer may still be read by a send of this update (see ``Sender.bucket_views``)."""
        layout = self.layout
        if layout is None or not 0 <= index < len(layout.buckets) or self.buffer_key != (device, buffer_size):
            return None
        b = index % num_buffers
        memo = layout.buckets[index].cache.get("sender", {})
        if b >= len(self.buffers) or memo.get("views_of") != self.buffers[b].data_ptr():
            return None
        return memo.get("views")

    def posting_runs(self, index: int) -> list[list[int]] | None:
        """The slot positions each group of broadcasts of bucket ``index`` of the cached layout reads
        (``plan.groups``), in the order they are posted (``Sender.post_runs``); None when there is
        no such bucket."""
        layout = self.layout
        if layout is None or not 0 <= index < len(layout.buckets):
            return None
        plan = layout.buckets[index]
        memo = plan.cache.setdefault("sender", {})
        if "posting_runs" not in memo:
            per_run = [[pos] for _, _, pos in plan.runs if pos is not None] + Outbox.run_groups(plan)  # as plan.runs
            memo["posting_runs"] = [[p for run in per_run[first:last] for p in run] for first, last in plan.groups]
        return memo["posting_runs"]


def _spec(item: tuple[str, torch.Tensor]) -> TensorSpec:
    try:
        return TensorSpec.of(*item)
    except ValueError as e:
        raise SourceFailed(e) from e


def _matches(item: tuple[str, Any], spec: TensorSpec) -> bool:
    """Whether a pulled pair is the cached layout's tensor (cheap: no spec is built)."""
    name, tensor = item
    return (name == spec.name and isinstance(tensor, torch.Tensor) and tensor.dtype == spec.dtype
            and tensor.shape == spec.shape and tensor.layout == torch.strided and not tensor.is_meta)  # fmt: skip


class SendSide:
    """What both senders (broadcast and colocated) do alike on rank 0. Needs
    ``what`` and ``abort_step(reason)``, which posts the ABORT step and raises
    the agreed TransferError."""

    what: str

    def abort_step(self, reason: bytes) -> None:
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        """The source failed: an ABORT step tells every worker why (they raise it);
        returns so the caller re-raises the source's own error. A group left
        broken raises its TransferError instead."""
        log.warning("%s aborted by its source: %s", self.what, reason)
        try:
            self.abort_step(encode_message(reason) or b"?")
        except TransferError as e:
            if e.broken:
                raise


class Sender(SendSide, Outbox):
    """Sends one update from rank 0 (see the module docstring). One instance per update.

    The protocol steps and the pulling of each bucket are here; the payload (pack copies,
    buffers, broadcasts and their works) is :class:`torchxfer.outbox.Outbox`'s."""

    def __init__(self, group: SideGroup, *, packed: bool, buffer_size: int, num_buffers: int, checksum: bool,
                 zero_copy: bool, version: int | None, num_tensors: int | None, owned: bool = False) -> None:  # fmt: skip
        Outbox.__init__(self, num_buffers)
        self.group = group
        self.state = SenderState.of(group)
        self.control: ControlChannel = self.state.control
        self.packed = packed
        self.buffer_size = buffer_size if packed else None
        self.num_buffers = num_buffers
        self.checksum = checksum
        self.zero_copy = zero_copy and not checksum
        self.owned = owned  # tensors made for this update that nothing else writes (send_model's gathers)
        # Whether a tensor that is last update's very object may be taken as unchanged until its
        # send completes: the package's own tensors, and those of a list, tuple or dict (set in run)
        self.plain = owned
        self.num_tensors_hint = num_tensors
        self.update_id = self.state.next_update_id if version is None else version
        self.state.next_update_id = self.update_id + 1
        self.what = f"update {self.update_id}"
        self.layout = Layout(packed, self.buffer_size, num_buffers, group.backend_name)
        self.device: torch.device | None = group.data_device
        self.steps: collections.deque[Step] = collections.deque()
        self.failed_ranks: list[int] = []
        self.num_tensors = 0
        # Where the update stands, for an ABORT row: the bucket, and how many
        # of its leading slots (of the cached layout) were already posted.
        self.bucket, self.kept = 0, 0
        # A bucket went out announced as the last: the step after it (END, or an ABORT) is
        # posted on the payload group, where every worker expects it.
        self.last_announced = False
        # The cached layout's bucket every worker posted ahead after the last BUCKET row
        # (plan.next_bucket): sent next, for real or void, before anything else.
        self.promised: BucketPlan | None = None
        # Every worker posted its row of the step after the next one without knowing this
        # rank's next row (see after_row): unless that row is another BUCKET row that is not
        # the last, a SYNC row follows it to match.
        self.filler_owed = False
        self.cached: Layout | None = None
        self.new_names = NewNames()

    # -- the update ------------------------------------------------------------------------------

    def run(self, items: Iterable[Any], post_iter_func: Callable | None,
            check: Callable[[Any, Any], None] | None = None, *, rest: Iterator[Any] | None = None) -> TransferStats:  # fmt: skip
        """The update; ``check(name, tensor)`` runs on every pair as it is pulled
        (its ValueError aborts the update for every rank, then is raised here).
        ``rest``: the caller's iterator that ``items`` goes on with after its first pair
        (``items`` chains a pair pulled ahead to it), pulled from directly once that pair is in
        hand. ``engine.send_pairs`` runs it with the cyclic garbage collector paused."""
        start = time.perf_counter()
        cached = self.begin()
        try:
            # Untransformed pairs of a caller (not send_model's own): a bucket of the cached layout
            # is pulled straight from the caller's iterator (``pull_bucket``), the rest through
            # ``pairs``, which checks each pair as it is pulled.
            self.raw, self.check = None, check
            if not self.owned:  # (a post_iter_func's results count as the caller's iterator's)
                self.plain = type(items) in PLAIN_ITERATORS or (rest is not None and type(rest) in PLAIN_ITERATORS)
            if post_iter_func is None and not self.owned:
                try:
                    items = self.raw = iter(items)
                except Exception as e:
                    raise SourceFailed(e) from e
                if rest is not None and type(rest) in PLAIN_ITERATORS:
                    # pull_bucket always has the first pair in hand: the chain then pulls from ``rest``
                    # itself, so a bucket may be pulled from it at once (see pull_bucket)
                    self.raw = rest
            source = pairs(items, post_iter_func, check)
            self.send_buckets(source, cached)
        except SourceFailed as e:
            self.abort(f"the trainer aborted {self.what}: {type(e.original).__name__}: {e.original}")
            raise e.original from None
        except TransferError:
            self.drain(quiet=True)
            raise
        except Exception as e:  # a fault of this rank's own: tell the workers, then raise it
            self.abort(f"the trainer failed during {self.what}: {type(e).__name__}: {e}")
            raise
        # With no bucket at all no row announced the end: the workers check the (empty) update in a SYNC step.
        self.end(self.last_announced)
        seconds = time.perf_counter() - start
        log.debug("sent %s: %d tensors, %d bytes in %.4f s (%.2f GB/s)%s", self.what, self.num_tensors,
                  self.layout.num_bytes, seconds, self.layout.num_bytes / max(seconds, 1e-9) / 1e9,
                  "" if cached is not None else ", layout described in full")  # fmt: skip
        return TransferStats(self.update_id, self.num_tensors, self.layout.num_bytes, seconds)

    def begin(self) -> Layout | None:
        """BEGIN step: returns the cached layout if every worker holds it, else None.

        When every worker confirmed, at the end of the last update, that it
        holds the layout the trainer is about to send (the steady state), the
        trainer announces it with FLAG_CACHED and does not wait for the step;
        otherwise it waits for every worker's answer.
        """
        old = self.state.layout
        if self.device is None and old is not None:
            self.device = self.state.device
        fingerprint = old.fingerprint if old is not None and old.config == self.layout.config else 0
        confirmed = fingerprint != 0 and self.state.confirmed == fingerprint
        flags = ((FLAG_PACKED if self.packed else 0) | (FLAG_CHECKSUM if self.checksum else 0)
                 | (FLAG_CACHED if confirmed else 0))  # fmt: skip
        hint = -1 if self.num_tensors_hint is None else self.num_tensors_hint
        self.begin_args = [self.update_id, flags, self.buffer_size or 0, self.num_buffers, fingerprint, hint]
        self.begin_step = None
        if confirmed:
            return old  # posted with bucket 0 (post_begin), once that bucket is pulled
        self.post_begin()
        rows = self.begin_step.rows()
        self.control.settle(rows, b"", f"{self.what} (begin)")
        if fingerprint and all(row.args[1] == fingerprint and row.args[2] for row in rows[1:]):
            return old
        return None

    def post_begin(self, *bucket0: int) -> None:
        """Post the BEGIN step (once); with ``bucket0`` (last, checksum) it also announces bucket 0."""
        if self.begin_step is not None:
            return
        args = list(self.begin_args)
        if bucket0:
            args[1] |= FLAG_BUCKET0
            self.last_announced = bool(bucket0[0])
        self.begin_step = self.control.post(make_row(Kind.BEGIN, *args, *bucket0), f"{self.what} (begin)")
        if args[1] & FLAG_CACHED:
            self.steps.append(self.begin_step)  # its workers' status is read late, like a bucket's
        self.after_row(bool(bucket0) and not bucket0[0], 0)
        if bucket0 and not bucket0[0]:  # bucket 0 announced and not the last: bucket 1 is posted ahead
            self.promised = next_bucket(self.state.layout, 0)
        posted = first_bucket(self.state.layout, self.state.confirmed != 0)
        if posted is not None and not bucket0:
            self.void_bucket(posted)

    @contextlib.contextmanager
    def posting(self, plan: BucketPlan) -> Iterator[None]:
        """Around the posting of a bucket's payload (after its row, or for bucket 0 of a
        confirmed layout before it): every worker has posted or will post all of that
        bucket's broadcasts, so a failure part way (a pack copy raising, say) leaves the
        ranks' collective sequences apart; no ABORT can follow it on the payload group. It
        breaks the group instead: this rank raises TransferError at once, the workers when
        their bounded wait for the missing payload ends."""
        try:
            yield
        except TransferError:
            raise
        except Exception as e:
            reason = f"posting bucket {plan.index} of {self.what} failed: {type(e).__name__}: {e}"
            self.group.mark_broken(reason)
            raise TransferError(reason, broken=True) from e

    def void_bucket(self, plan: BucketPlan) -> None:
        """Broadcasts of the sizes of ``plan``'s runs, of no meaning: every worker posted
        that bucket of the confirmed layout ahead (``plan.first_bucket``,
        ``plan.next_bucket``), and this update does not send it. Sent from one of the
        send buffers when one is large enough (what it holds does not matter, and no
        memory is added), else from a scratch tensor of the longest run; every worker
        waits for them and drops what arrived."""
        with self.posting(plan):  # every worker posted these receives: a failure here breaks the group at once
            scratch, b = self.void_scratch(plan)
            # Gloo writes what a CUDA broadcast carried back into the root's tensor too, later, on
            # its own stream: a send buffer used here is not packed again before these complete.
            mine = b is not None and b < self.num_buffers
            for first, last in plan.groups:
                runs = plan.runs[first:last]
                self.post([scratch[: end - start] for start, end, _ in runs], plan.index, [mine] * len(runs), buffer=b)

    def void_scratch(self, plan: BucketPlan) -> tuple[torch.Tensor, int | None]:
        """What void broadcasts of ``plan`` are sent from, and which send buffer that is: a send
        buffer at least as long as its longest run, else a new tensor of that length (None; at
        most a buffer, or unpacked one tensor: ``plan.postable``)."""
        device = self.state.device
        longest = max(end - start for start, end, _ in plan.runs)
        held = self.state.buffers if self.state.buffer_key is not None and self.state.buffer_key[0] == device else []
        b = next((i for i, buf in enumerate(held) if buf.numel() >= longest), None)
        if b is not None:
            return held[b], b
        return torch.empty(longest, dtype=torch.uint8, device=device), None

    def keep_promise(self) -> None:
        """Before any row other than the promised bucket's: its broadcasts, void."""
        if self.promised is not None:
            plan, self.promised = self.promised, None
            self.void_bucket(plan)

    def send_buckets(self, source: Iterator[Item], cached: Layout | None) -> None:
        """Every bucket, the last one announced as last when the source ends with it."""
        self.cached = cached
        item = next(source, None)
        if cached is None:
            self.table_buckets(source, item, 0, 0, None)
            return
        for plan in cached.buckets:
            if item is _LATER:  # pulled after the bucket before was posted: a failure now aborts this one
                self.bucket, self.kept = plan.index, 0
                item = self.pull(source)
            item, kept, source = self.cached_bucket(plan, item, source)
            if kept is not None:
                self.unready()
                self.post_begin()
                self.table_buckets(source, item, plan.index, kept, cached)
                return
            final = plan.index == len(cached.buckets) - 1
            if final and item is _LATER:  # whether the source ends here goes in this bucket's row
                item = self.pull(source)
            last = final and item is None
            checksum = self.bucket_checksum(plan, 0, {})
            ahead = self.begin_step is None  # every worker posted bucket 0: its payload goes before its row
            if not ahead:
                self.tick(Kind.BUCKET, plan.index, int(last), checksum)
            with self.posting(plan):
                self.post_runs(plan)
            if ahead:
                self.post_begin(int(last), checksum)
            if self.posted is not None:
                self.posted(True)
            self.layout.append(plan)
        self.post_begin()
        if item is _LATER:
            self.bucket, self.kept = len(cached.buckets), 0
            item = self.pull(source)
        if item is not None:
            self.unready()
            self.table_buckets(source, item, len(cached.buckets), 0, cached)

    def end(self, last: bool) -> None:
        """END step (and a SYNC when the end was not announced), then the apply step for atomic workers."""
        self.post_begin()
        self.keep_promise()
        self.catch_up()
        step = self.control.post(make_row(Kind.END, self.num_tensors, self.layout.num_bytes), f"{self.what} (end)",
                                 payload=self.last_announced)  # fmt: skip
        filler = self.after_row(False, 0)
        # The payload's own waits run while the workers load the last bucket and post their END rows
        # (on NCCL the END step queues behind the payload anyway, so nothing waits longer).
        self.drain()
        rows = step.rows()
        try:
            if filler is not None:
                filler.rows()
            if not last:
                rows = self.control.post(make_row(Kind.SYNC), f"{self.what} (end)").rows()
            self.control.settle(rows, b"", f"{self.what} (end)")
            # Every worker now holds this layout (its final row says so) unless one did not finish it.
            held = all(row.args[1] == self.layout.fingerprint for row in rows[1:])
            if any(row.args[3] for row in self.begin_step.rows()[1:]):
                rows = self.control.post(make_row(Kind.SYNC), f"{self.what} (apply)").rows()
                self.control.settle(rows, b"", f"{self.what} (apply)")
        except TransferError as e:
            if not e.broken:
                log.warning("%s failed: %s", self.what, e)
            self.drain(quiet=True)
            raise
        self.state.layout = self.layout
        self.state.device = self.device
        self.state.confirmed = self.layout.fingerprint if held else 0

    def abort_step(self, reason: bytes) -> None:
        """ABORT step, then every rank raises the agreed TransferError."""
        self.flush()
        self.post_begin()
        self.keep_promise()
        self.catch_up()
        step = self.control.post(make_row(Kind.ABORT, self.bucket, 0, len(reason)), f"{self.what} (abort)",
                                 payload=self.last_announced)  # fmt: skip
        filler = self.after_row(False, 0)
        self.drain(quiet=True)
        rows = step.rows()
        if filler is not None:  # read before the error broadcasts that settle may post on the control group
            # The workers posted their rows of the ABORT step two steps ahead, their filler rows a
            # step later: those declare every failure recorded by then (an error is never cleared).
            rows = rows[:1] + filler.rows()[1:]
        self.control.settle(rows, reason, self.what)
        raise TransferError(f"{self.what} was aborted")  # settle raised already unless the rows were clean

    def catch_up(self) -> None:
        """Wait (bounded) for every step posted and not yet read, noting workers that failed.

        Called before a step that is followed by a broadcast on the control
        group (a table's frame, END, ABORT): every worker failure reported so
        far is then known, and no row step is still running beside the
        broadcast.
        """
        while self.steps:
            rows = self.steps.popleft().rows()
            self.failed_ranks += [r for r, row in enumerate(rows) if r and row.args[0]]

    def tick(self, kind: Kind, *args: int) -> None:
        """Post the next bucket's row, or an ABORT step if a worker reported a failure."""
        while self.steps and (len(self.steps) >= STATUS_LAG or self.steps[0].done()):
            rows = self.steps.popleft().rows()
            self.failed_ranks += [r for r, row in enumerate(rows) if r and row.args[0]]
        if self.failed_ranks:
            self.abort_step(b"")
        if kind != Kind.BUCKET:
            self.keep_promise()
        self.last_announced = bool(args[1])
        self.steps.append(self.control.post(make_row(kind, *args), f"{self.what} bucket {args[0]}"))
        filler = self.after_row(kind == Kind.BUCKET and not args[1], args[0])
        if filler is not None:
            self.steps.append(filler)
        if kind == Kind.BUCKET:
            assert self.promised is None or self.promised.index == args[0]
            self.promised = None if args[1] else next_bucket(self.cached, args[0])

    def after_row(self, plain: bool, bucket: int) -> Step | None:
        """After each row this rank posts: the SYNC row it owes, if any (returned, not waited for).

        After a BUCKET row that is not the last (``plain``), every worker posts its rows of the
        next step and, when the cached layout has at least two buckets after ``bucket``, of the
        step after that too, before it reads this rank's next row. So a row's round trip runs
        while the one before it is still under way, and the control chain costs half a round
        trip per bucket. Every rank derives the same rule from the same rows and the layout
        they all hold. When this rank's next row then is anything but another BUCKET row that
        is not the last (a TABLE, ABORT, END, or a last bucket), a SYNC row follows it at
        once, matching the row every worker posted ahead; whatever comes after (a frame, error
        broadcasts, END on the payload group) then finds every rank at the same step.
        """
        filler = None
        if self.filler_owed and not plain:
            filler = self.control.post(make_row(Kind.SYNC), f"{self.what} (step after bucket {self.bucket})")
        self.filler_owed = plain and rows_ahead(self.cached, bucket) == 2
        return filler

    # -- a bucket of the cached layout ------------------------------------------------------------

    def cached_bucket(self, plan: BucketPlan, item: Item | None,
                      source: Iterator[Item]) -> tuple[Item | None, int | None, Iterator[Item]]:  # fmt: skip
        """Pull and pack one bucket of the cached layout; nothing is posted before its row.

        Returns ``_LATER`` (or None within a split tensor), None and the source; or, when the source
        departs from the layout at slot ``kept``, the item in hand, ``kept``
        (the slots before it are packed, or held for a zero-copy send) and the
        source. The source returned is the one to go on with: items pulled
        ahead for a bulk bucket that did not hold are replayed from it.
        """
        self.bucket, self.kept = plan.index, 0
        self.run_sums.clear()
        self.deferred: dict[int, torch.Tensor | None] = {}
        self.lazy: dict[int, torch.Tensor] = {}
        memo = plan.cache.setdefault("sender", {})
        own = memo.get("own")
        if own is None:
            own = memo["own"] = {p for _, _, p in plan.runs if p is not None}
        refs: list = memo.setdefault("refs", [None] * len(plan.slots))
        distinct = memo.get("distinct", False)
        seen: set[int] = set()
        buf = self.packed_buffer(plan, memo)
        views = memo.get("views") if buf is not None and memo.get("views_of") == buf.data_ptr() else None
        whole = memo.get("whole")
        if whole is None:
            whole = memo["whole"] = all(s.is_whole for s in plan.slots)
        stable = memo.get("all_stable") and (self.plain or memo.get("all_params"))
        if (stable or (self.owned and whole)) and (views is not None or buf is None) and item is not None:
            done = self.bulk_bucket(plan, memo, own, views, item, source)
            if done is not None:
                return (*done, source)
            item, source = self.replay
        self.unready()  # the slot-by-slot pass may read the slots' tensors: they must be filled first
        all_stable = all_params = True
        for pos, slot in enumerate(plan.slots):
            if slot.start == 0:
                if item is None or not _matches(item, slot.spec):
                    self.flush()
                    memo["distinct"] = False
                    return item, pos, source
                tensor = item[1]
                ref = refs[pos]
                # A generator's tensor counts as last update's only if it is a Parameter: a generator
                # may hand out staging tensors it refills, two of them alternating (say) in one bucket.
                param = isinstance(tensor, torch.nn.Parameter)
                all_params = all_params and param
                self.stable = self.owned or (distinct and ref is not None and ref() is tensor and (self.plain or param))
                all_stable = all_stable and self.stable
                refs[pos] = weakref.ref(tensor)
                seen.add(id(tensor))
                self.take(tensor, copy=not self.stable and not slot.is_last)
                item = None
            if slot.length:
                if pos in own:
                    self.hold_own(pos, slot)
                elif views is not None and views[pos] is not None and self.in_hand_bytes is None \
                        and self.in_hand.device == buf.device:  # fmt: skip
                    self.pending.append((views[pos], self.in_hand))
                    if not self.stable or len(self.pending) >= PACK_BATCH:
                        self.flush()
                else:
                    self.pack(slot)
            self.kept = pos + 1
            if slot.is_last and pos + 1 < len(plan.slots):
                item = self.pull(source)
        self.flush()
        memo["distinct"] = len(seen) == sum(1 for s in plan.slots if s.start == 0)
        memo["all_stable"] = all_stable and all(s.is_whole for s in plan.slots)
        memo["all_params"] = all_params
        if buf is not None and views is None:
            buf = self.state.buffers[plan.index % self.num_buffers]
            memo["views"] = whole_views(buf, plan.slots)
            memo["views_of"] = buf.data_ptr()
            memo.pop("concat", None)  # its views hold the old buffer
        return (_LATER if plan.slots[-1].is_last else None), None, source

    def bulk_bucket(self, plan: BucketPlan, memo: dict, own: set[int], views: list | None, item: Item,
                    source: Iterator[Item]) -> tuple[Item | None, None] | None:  # fmt: skip
        """One bucket of whole tensors that were all the very objects of the last update:
        pulled, checked and packed in bulk (one fused copy).

        Returns None when the bucket's tensors are not those of the last update;
        ``self.replay`` then holds the pulled items, for the slot-by-slot path.
        """
        if self.raw is not None:
            batch, tensors, error = pull_bucket(plan, memo, memo["refs"], item, self.raw, self.device)
            if tensors is None:  # handed back through ``pairs``, which checks them (then raises the error, if any)
                self.raw = None
                checked = pairs(then_raise(batch[1:], error), None, self.check)
                self.replay = (batch[0], checked if error is not None else itertools.chain(checked, source))
                memo["all_stable"] = False
                return None
        else:
            batch, tensors = pull_same(plan, memo, None if self.owned else memo["refs"], item, source, self.device)
            if tensors is None:
                self.replay = (batch[0], itertools.chain(batch[1:], source))
                memo["all_stable"] = False
                return None
        self.stable = True
        # The last bucket of the layout is posted after one more pull (its row says whether the
        # update ends there), which may run the caller's code (the rest of a generator, say, that
        # casts the model or gives a parameter new storage): a caller's tensors of that bucket are
        # packed, and their bytes viewed, before it.
        bind = not self.owned and plan.index == len(self.cached.buckets) - 1
        if views is not None:
            packed = memo.get("packed")
            if packed is None:
                packed = memo["packed"] = [p for p, s in enumerate(plan.slots) if p not in own and s.length]
            if packed and (self.checksum or bind):  # the row carries the checksum, or bound: pack it all now
                self.pack_bulk(plan, -1, packed, views, tensors)
            elif packed:
                self.bulk_copies = (views, tensors)  # packed run by run, each before its broadcast
        for pos in sorted(own):
            tensor = tensors[pos]
            if not bind and self.in_place(tensor):
                # Sent straight from its memory (see hold_own): its bytes are viewed as its group
                # is posted (post_runs), so the bucket's first group goes before the rest are.
                self.lazy[pos] = tensor
                continue
            self.take(tensor)
            self.hold_own(pos, plan.slots[pos])
            self.num_tensors -= 1
        self.num_tensors += len(tensors)
        self.in_hand = self.in_hand_bytes = None
        self.kept = len(plan.slots)
        return _LATER, None

    # -- a bucket of a new layout ---------------------------------------------------------------

    def table_buckets(self, source: Iterator[Item], item: Item | None, bucket: int, kept: int,
                      cached: Layout | None) -> None:  # fmt: skip
        """Plan, pack and send the rest of the update; each bucket's table is agreed before its payload.

        Starts at ``bucket``, whose first ``kept`` slots (of the cached
        layout) are already packed or posted. The last bucket goes out
        flagged last.
        """
        planner = Planner(self.buffer_size)
        slots: list[Slot] = []
        if not kept:
            self.run_sums.clear()
        if kept:
            self.cached_plan = cached.buckets[bucket]
            slots = list(self.cached_plan.slots[:kept])
            cursor = slots[-1].end if self.buffer_size is not None else sum(s.length for s in slots)
            planner.resume(bucket, cursor, kept)
        else:
            planner.resume(bucket - 1, 0, 0)
            planner.close_bucket()
        self.bucket, self.kept = bucket, kept
        if not kept and self.buffer_size is not None:
            self.free_buffer(bucket, 0)
        unpacked: dict[int, torch.Tensor] = {}
        queue: collections.deque[Slot] = collections.deque()
        index = self.num_tensors
        # What the next update needs to take this bucket in bulk (see remember()): per slot,
        # its tensor where the slot starts one, and the typed view its bytes were packed into.
        refs: list[Any] = [None] * len(slots)
        views: list[Any] = [None] * len(slots)
        while True:
            if not queue and item is not None:
                queue.extend(planner.add(index, _spec(item)))
                self.take(item[1], copy=len(queue) > 1 or self.buffer_size is None)
                index += 1
                item = None
            if queue and queue[0].bucket == bucket:
                slot = queue.popleft()
                slots.append(slot)
                # Weak: a fresh tensor is freed as soon as it is packed, not when its bucket is sent.
                refs.append(weakref.ref(self.in_hand) if slot.start == 0 else None)
                views.append(None)
                if slot.length:
                    if self.buffer_size is None:
                        unpacked[len(slots) - 1] = self.bytes_in_hand()
                    else:
                        views[-1] = self.pack(slot)
                if not queue:
                    self.in_hand = self.in_hand_bytes = None
                    item = self.pull(source)
                continue
            if not slots:
                return
            last = not queue and item is None
            plan = BucketPlan.make(bucket, tuple(slots), self.buffer_size, backend=self.group.backend_name)
            if len(plan.frame) > MAX_FRAME_BYTES:
                raise SourceFailed(ValueError(f"the table of bucket {bucket} has {len(plan.frame)} bytes, over the "
                                              f"{MAX_FRAME_BYTES}-byte cap: tensor names are too long"))  # fmt: skip
            try:
                self.new_names.check(self.layout, plan)
            except ValueError as e:
                raise SourceFailed(e) from e
            self.table_bucket(plan, kept, last, unpacked)
            if not kept:
                self.remember(plan, refs, views)
            if last:
                return
            slots, kept, bucket, refs, views = [], 0, bucket + 1, [], []
            self.bucket, self.kept = bucket, 0
            self.run_sums.clear()
            unpacked.clear()
            if self.buffer_size is not None:
                self.free_buffer(bucket, 0)

    def remember(self, plan: BucketPlan, refs: list[Any], views: list[Any]) -> None:
        """After a new bucket is sent: what the next update's cached_bucket would otherwise learn
        in a slot-by-slot pass of its own, so that the second update of a layout already takes
        a bucket of the very same objects in bulk: a weak reference to each slot's tensor
        (where the slot starts it), whether they were distinct objects, and the typed views of
        the buffer the whole tensors were packed into (made again for those packed before the
        buffer last grew). ``refs``: per slot, a weak reference to its tensor where the slot
        starts one; a tensor already freed cannot be sent again, so its bucket is not distinct."""
        memo = plan.cache.setdefault("sender", {})
        starts = [r() for r in refs if r is not None]
        memo["refs"] = refs
        memo["distinct"] = None not in starts and len({id(t) for t in starts}) == len(starts)
        memo["all_stable"] = memo["distinct"] and all(s.is_whole for s in plan.slots)
        if self.buffer_size is None:
            return
        buf = self.state.buffers[plan.index % self.num_buffers]
        memo["views"] = whole_views(buf, plan.slots, views)
        memo["views_of"] = buf.data_ptr()
        memo.pop("concat", None)
        if memo["all_stable"] and not self.checksum:  # the next update packs in bulk, run by run
            for i, group in enumerate(self.run_groups(plan)):
                if group:
                    self.concat_for(plan, i, group)

    def table_bucket(self, plan: BucketPlan, kept: int, last: bool, unpacked: dict[int, torch.Tensor]) -> None:
        """TABLE step, the frame, a SYNC step every rank waits for, then the payload."""
        self.flush()
        total = self.bucket_checksum(plan, kept, unpacked)
        self.tick(Kind.TABLE, plan.index, int(last), total, len(plan.frame))
        self.catch_up()  # the frame's broadcast must not run beside the TABLE step
        self.control.send_frame(plan.frame, f"{self.what} table {plan.index}")
        rows = self.control.post(make_row(Kind.SYNC), f"{self.what} bucket {plan.index} (check)").rows()
        self.control.settle(rows, b"", f"{self.what} bucket {plan.index}")
        with self.posting(plan):
            self.post_runs(plan, unpacked)  # the first ``kept`` slots' held while the source was the cached layout
        self.layout.append(plan)

    def pull(self, source: Iterator[Item]) -> Item | None:
        return next(source, None)
