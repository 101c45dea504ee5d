"""The trainer-rank protocol of :func:`send_model`: every trainer rank, one sender.

Every trainer rank calls :func:`send_model` over the same model, together, in
the same order; only the sending rank (the one holding the side group, global
rank 0 under torchrun) passes a group, the others pass None::

    group = NCCLWeightTransferEngine.trainer_init(...) if dist.get_rank() == 0 else None
    send_model(model, group, dtype=torch.bfloat16, name_map={"embed.weight": "tok.weight"})

What is sent is planned up front (:mod:`torchxfer.sources`). Sharded tensors
are gathered per bucket, to the sender only, on the trainer's own groups
(:mod:`torchxfer.gather`): when the sender's pipeline pulls the first tensor
of bucket i, bucket i's gathers (posted one bucket earlier) are waited for and
bucket i+1's are posted, so bucket i+1 moves between trainer ranks while
bucket i is packed and broadcast to the workers.

**Peer reads.** When every trainer rank runs on one host and every gathered
tensor is a CUDA shard (FSDP2 on one node), the ranks agree once per update,
in one all_gather after the plan check (skipped when every rank's row is the
one rank 0 last agreed on and mapped: the plan check carries their digests),
that rank 0 reads the others' shards itself (:mod:`torchxfer.peer_reads`): it maps their memory and copies each
piece into place with copy engines, so the other ranks run no kernel during
the send (a worker sharing a GPU with one of them has it to itself) and take
no lockstep step; they wait in one status all_reduce for rank 0's outcome,
which rank 0 posts without waiting for it to complete (its next call waits
for it first). If rank 0 cannot map their memory, it says so in that
all_reduce and every rank gathers with collectives as below. On the cached
layout (the steady state) rank 0 copies straight into its send buffers, on
a copy stream, one broadcast's worth (a run) ahead: each broadcast waits for
the copies of its own run only, and while a bucket is broadcast the next
one is filled. A batch of copies seen before is one CUDA graph launch.
While the plan check travels, the sender already prepares the first group
of such an update from the rows it mapped last time and copies its own
shards into place; the other ranks' pieces are copied only once the check
has said their rows are unchanged (each of them waited for its own writes
before the check), and the first broadcast waits for the check. When the
rows changed, that preparation is dropped and made again. The copy streams
start behind the trainer's own work on its current stream (the optimizer
step that wrote the shards).

**Memory.** Rank 0's extra memory is the transfer buffers
(``packed_num_buffers x packed_buffer_size_bytes``) plus about two buckets of
gathered tensors: the bucket being sent, and the next one in flight (its
packed part once more while it is cut into tensors, and this rank's own
shards of it). A tensor larger than a buffer is a bucket of its own here,
and the sender keeps one private copy of it while it splits it.
Over Gloo, a gather holds its output twice for a moment (Gloo's flat
temporary), so count one bucket more there. Other trainer ranks hold their
shards of two buckets. Unpacked mode
(``packed=False``) groups tensors as the sender does (about 256 MiB).

Why this cannot deadlock, and what happens on failure:

* **Same plan everywhere.** Before anything moves, one all_gather on the
  trainer group compares a digest of every rank's plan (names, shapes,
  dtypes, placements, order) and checks that exactly one rank sends. A rank
  that iterates another model, order, ``dtype`` or ``name_map`` gets a
  ValueError on every rank at once. Unchecked, its gathers would pair with the
  wrong tensors.
* **One lockstep per bucket** (collective gathers). Each post of a bucket's gathers is preceded by
  a one-int all_reduce of a status code on the trainer group (the first one
  posts two buckets). The sender runs it when its pipeline pulls the bucket
  before; the others run it as they reach it, so they wait there, never
  inside a gather that the sender will not join. Everything local (casts,
  copies of shards, allocations) is done before that point. Rank 0 never
  waits for another trainer rank while it holds the side group's
  collectives, and the others wait only for rank 0, so there is no cycle.
* **Failure.** If rank 0's send fails (a worker rejects the update, a peer
  dies, a side-group timeout), rank 0 posts a failure status. The rank
  waiting at its next lockstep point learns it at once, with rank 0's message,
  and raises TransferError: it does not gather the rest of the model. A
  non-sender that fails on its own (not inside a collective) posts its failure
  the same way; rank 0 then raises TransferError inside the pipeline's source,
  which aborts the update for every worker. One final status all_reduce tells
  every trainer rank the outcome of a successful update too (under peer reads
  the sender posts it and returns; its next call waits for it first). Every wait on
  the trainer group is bounded by ``timeout_s`` (default: the trainer group's
  own timeout); the sender on CUDA orders its gathers on the stream (the side
  group's own timeout then bounds the send). A gather that fails as a
  collective leaves the trainer group unusable, as any failed collective
  does: ``send_model`` then raises without further trainer-group traffic.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from .config import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
    TransferStats,
    check_send,
    check_timeout,
)
from .colocated import is_colocated
from .engine import IPCWeightTransferEngine, send_pairs
from .errors import TransferError
from .gather import GatherFailed, Gatherer, Posted, local_tensor, peer_row
from . import lockstep, peer_reads
from .group import side_group
from .sender import SenderState
from .sources import Entry, NameMap, Source, groups_of, is_dtensor, mesh_device, plan

__all__ = ["send_model"]

log = logging.getLogger("torchxfer")

def send_model(
    source: Source,
    group: dist.ProcessGroup | None,
    *,
    dtype: torch.dtype | str | None = None,
    name_map: NameMap = None,
    include_buffers: bool = True,
    trainer_group: dist.ProcessGroup | None = None,
    timeout_s: float | None = None,
    packed: bool = True,
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
    checksum: bool = False,
    version: int | None = None,
) -> TransferStats | None:
    """Send one update of ``source``; every trainer rank calls this together.

    Blocks until every worker has loaded the update and every trainer rank
    knows the outcome (under peer reads the sender returns once it has posted
    the outcome to the others, who wait for it). See the module docstring for the memory bound and why
    it cannot deadlock.

    Args:
        source: the model or state dict (plain, DTensor-sharded, ``fully_shard``-ed,
            HSDP, CPU-offloaded). It must be the same on every trainer rank, in
            the same order (checked); see :data:`torchxfer.sources.Source`.
        group: the side group (from ``trainer_init``) on the one sending rank,
            None on every other trainer rank.
        dtype, name_map, include_buffers: as in :func:`torchxfer.iter_named_tensors`.
            They change what the in-band header describes, so receivers see
            exactly what arrives. :func:`torchxfer.update_info_for` describes it too.
        trainer_group: the group of all trainer ranks that call this (default:
            the default group, when torch.distributed is initialized). It
            carries the plan check and the status lockstep (one small tensor
            per bucket, on the CPU for Gloo, on the current CUDA device
            otherwise). When it is the default group and that group is not
            Gloo, the first call makes a Gloo group of the same ranks (every
            rank of the default group calls this, so every rank makes it
            together) for the plan check and, under peer reads, the wait for
            rank 0's outcome: a status wait on NCCL is a kernel on the rank's
            GPU for the length of the send, which a worker on that GPU would
            have to take turns with. Pass a Gloo group of the same ranks for
            any other group. Gathers run on the DTensors' own mesh groups.
            With no trainer group (a single-process trainer), the caller must
            be the sender.
        timeout_s: bound on each wait on the trainer group; None: the group's
            own timeout. Rank 0 may spend several of the side group's
            ``timeout_s`` between two pulls, so make this larger.
        packed, packed_buffer_size_bytes, packed_num_buffers, checksum: as in
            ``trainer_send_weights``. ``packed`` and ``packed_buffer_size_bytes``
            decide which tensors are gathered together, so they must be the
            same on every trainer rank (checked with the plan). Tensors made by a gather or a cast are
            always packed, never sent zero-copy, so each is freed as soon as
            it is packed.
        version: the update id workers report as ``weights_version`` (e.g.
            the training step), as in ``trainer_send_weights``; read on the
            sender only.

    Returns:
        The TransferStats on the sender, None on the other ranks.

    Raises:
        ValueError: on every trainer rank, before anything moves, for bad
            arguments or a bad tensor on any rank, plans that differ between
            ranks, or not exactly one sender. The rank whose input was bad
            raises its own exception.
        TransferError: on the other trainer ranks when the sender failed
            (with its message), and on the sender when another trainer rank
            failed. The sender raises whatever ``trainer_send_weights`` raised.
    """
    try:
        side = side_group(group) if group is not None else None
    except ValueError:  # not a side group: the plan check tells every trainer rank
        side = None
    # The sender holds its side group from the plan check on (it may fill send buffers while the
    # check travels), so another thread's update on that group waits, as trainer_send_weights'.
    with side.one_update(check=False) if side is not None else contextlib.nullcontext():
        return _send_model(source, group, dtype, name_map, include_buffers, trainer_group, timeout_s, packed,
                           packed_buffer_size_bytes, packed_num_buffers, checksum, version)  # fmt: skip


def _send_model(source: Source, group: dist.ProcessGroup | None, dtype: Any, name_map: NameMap,
                include_buffers: bool, trainer_group: dist.ProcessGroup | None, timeout_s: float | None,
                packed: bool, packed_buffer_size_bytes: int, packed_num_buffers: int, checksum: bool,
                version: int | None) -> TransferStats | None:  # fmt: skip
    """:func:`send_model`'s body, on the sender with its side group held."""
    if timeout_s is not None:
        check_timeout("send_model", timeout_s)
    if trainer_group is not None and not isinstance(trainer_group, dist.ProcessGroup):
        raise ValueError(f"send_model: trainer_group must be a torch.distributed ProcessGroup or None, got "
                         f"{type(trainer_group).__name__}: {trainer_group!r:.80}")  # fmt: skip
    if trainer_group is None and dist.is_initialized():
        trainer_group = dist.group.WORLD
    lock = None
    early: _Schedule | None = None  # the sender's schedule under peer reads, made during the plan check
    prefill: bool | None = None  # this update is the cached layout (see _prefill); None: not known yet
    if trainer_group is not None and trainer_group.size() > 1:
        status = lockstep.status_group(trainer_group, timeout_s)
        lock = lockstep.Lockstep(status, timeout_s, None if status is trainer_group else trainer_group)
    entries: list[Entry] = []
    groups: list[list[int]] = []
    local_error: Exception | None = None
    row: torch.Tensor | None = None  # this rank's peer-read row, made before the plan check
    try:
        check_send("send_model", packed, packed_buffer_size_bytes, packed_num_buffers, version, checksum=checksum,
                   include_buffers=include_buffers)  # fmt: skip
        if group is None and lock is None:
            raise ValueError("group is None, but there is no trainer group of several ranks to send for: "
                             "the one trainer process must pass its side group")  # fmt: skip
        if group is not None:
            side_group(group)  # ValueError unless it is a side group
        entries = plan(source, dtype, name_map, include_buffers)
        groups = groups_of(entries, packed_buffer_size_bytes if packed else None)
    except Exception as e:  # bad input here: every other rank must hear of it before it could wait in a gather
        local_error = e
    if lock is None:
        if local_error is not None:
            raise local_error
        sender = dist.get_rank() if dist.is_initialized() else 0
    else:
        # Buckets decide which tensors are gathered together: the bucket rule's inputs are part of the plan.
        bucketing = f"packed={packed}|buffer={packed_buffer_size_bytes}"
        role = 0 if group is None else 2 if is_colocated(group) else 1
        if local_error is None and role != 2 and peer_reads.candidate(entries):
            row = peer_row(entries, role == 1)  # before the plan check: overlaps the others' planning
        lock.post_begin(entries, bucketing, role, local_error, row)
        if role == 1 and row is not None:
            # While the plan check travels: the sender's local work for the first group, if it
            # reads the other ranks' shards as last time (its row digests say so once it is back).
            prefill = _cached_layout(entries, groups, group, packed, packed_buffer_size_bytes, packed_num_buffers)
            early = _Schedule(entries, groups, dist.get_rank(), lock, timeout_s, _stream_ordered(group))
            if prefill:
                early.prewarm(group, packed_buffer_size_bytes, packed_num_buffers)
        try:
            sender = lock.finish_begin()
        except BaseException:
            if early is not None:
                early.discard_warm()
            raise
    if group is not None and is_colocated(group):
        if lock is not None:
            lock.collective_gathers()
        return _send_colocated(entries, group, lock, packed_buffer_size_bytes, packed_num_buffers, version)
    stream_ordered = group is not None and _stream_ordered(group)
    schedule = early if early is not None else _Schedule(entries, groups, sender, lock, timeout_s, stream_ordered)
    if row is not None:  # a peer-read candidate (the plan decides it, so on every rank alike)
        schedule.exchange_peers(row)
    if schedule.warm_peers is not None and not (schedule.peer and schedule.gatherer.peers == schedule.warm_peers):
        schedule.discard_warm()  # the rows changed, or no peer reads after all: prepared again as usual
    if lock is not None and not schedule.peer:
        lock.collective_gathers()

    if group is None:
        assert lock is not None
        done = False
        try:
            # Peer reads: nothing to do but wait for the sender's outcome (or its fallback).
            done = schedule.peer and lock.await_sender() == lockstep.DONE
            if not done:
                if schedule.peer:  # the sender fell back
                    schedule.peer = False
                    lock.collective_gathers()
                schedule.run_peer()
        except Exception as e:
            if not lock.done and not isinstance(e, GatherFailed):
                lock.fail(e)
            raise
        if not done:
            lock.finish()
        return None

    items = _Pulled(entries, groups, schedule)
    fresh = any(e.collective or e.dtype != e.tensor.dtype or is_dtensor(e.tensor) for e in entries)
    if prefill is None:
        prefill = _cached_layout(entries, groups, group, packed, packed_buffer_size_bytes, packed_num_buffers)

    def started(sender: Any) -> None:
        if prefill:
            sender.prefill, schedule.sender = True, sender
            if schedule.peer:  # each run's broadcast waits for its own slots' copies only
                schedule.gatherer.defer, sender.ready = True, schedule.ready
                schedule.launching, sender.posted = True, schedule.posted  # a run ahead

    try:
        stats = send_pairs(
            items, group, packed=packed, packed_buffer_size_bytes=packed_buffer_size_bytes,
            packed_num_buffers=packed_num_buffers, checksum=checksum, version=version,
            # A zero-copy send keeps its tensor until the broadcast completes:
            # fine for the model's own memory, not for fresh gathers and casts.
            zero_copy=not fresh,
            # Gathers, casts and the model's own tensors, which nothing writes while this runs.
            owned=True,
            started=started,
        )  # fmt: skip
    except Exception as e:
        schedule.settle()
        if lock is not None and not lock.done and not isinstance(e, GatherFailed):
            lock.fail(e)
        raise
    finally:
        items.close()
    schedule.settle()
    if lock is not None and schedule.peer:
        late = schedule.peer_overrun(margin=False)
        if late is not None:  # the others may have stopped waiting while their shards were read
            error = TransferError(f"{late}: the workers loaded this update, but the shards it read may have "
                                  "changed meanwhile; send it again, with a timeout_s that covers the whole update")
            lock.fail(error)
            raise error
        lock.tell()  # the others only wait for this; nothing of theirs can fail the update now
    elif lock is not None:
        lock.finish()
    return stats


def _stream_ordered(group: Any) -> bool:
    """Whether the side group's sends are ordered on CUDA streams (NCCL), not waited for."""
    return side_group(group).backend_name == "nccl"


def _cached_layout(entries: list[Entry], groups: list[list[int]], group: Any, packed: bool, buffer_size: int,
                   num_buffers: int) -> bool:  # fmt: skip
    """Whether the sender packs this update's gathers straight into its buffers (:func:`_prefill`)."""
    return packed and any(e.collective for e in entries) and _prefill(entries, groups, group, buffer_size, num_buffers)


def _prefill(entries: list[Entry], groups: list[list[int]], group: Any, buffer_size: int, num_buffers: int) -> bool:
    """Whether this update is exactly the layout the side group sent last, bucket for bucket,
    every tensor whole in one bucket: then the sender packs each tensor where the gathers can
    put it first (``Sender.bucket_views``), and no tensor can land where another one of the
    same bucket is still to be read. Two buffers at least: with one, a first update of the
    layout (workers that do not hold it yet) would gather a bucket into the buffer whose
    bucket before it is not sent yet."""
    if num_buffers < 2:
        return False
    layout = SenderState.of(side_group(group)).layout
    if layout is None or layout.config != (True, buffer_size, num_buffers) or len(layout.buckets) != len(groups):
        return False
    if len(layout.specs) != len(entries) or any(
        s.name != e.name or s.dtype != e.dtype or s.shape != e.shape for s, e in zip(layout.specs, entries)
    ):  # fmt: skip
        return False
    return all(len(b.slots) == len(idx) and all(s.is_whole for s in b.slots) for b, idx in zip(layout.buckets, groups))


class _Schedule:
    """When each group's gathers are posted, on every trainer rank alike.

    Groups without a collective need nothing. Of the others (``j`` counts
    them), ``advance(j)`` prepares group ``j``, passes a lockstep point, and
    posts its gathers; on the sender it then returns the group's full tensors
    (ordered behind the gathers on its stream on CUDA, waited for otherwise).
    The sender calls it when its pipeline pulls the group's first tensor, which
    on a cached layout is after the bucket before it was posted: group ``j``
    moves while bucket ``j - 1`` is broadcast. The other ranks wait for a group
    one step later, after posting the next, so the sender's lockstep point never
    waits for a group to arrive. One lockstep exchange per group.
    """

    def __init__(self, entries: list[Entry], groups: list[list[int]], sender: int, lock: lockstep.Lockstep | None,
                 timeout_s: float | None, stream_ordered: bool) -> None:  # fmt: skip
        self.groups = groups
        self.cgroups = [g for g, idx in enumerate(groups) if any(entries[i].collective for i in idx)]
        self.slot = {g: j for j, g in enumerate(self.cgroups)}
        self.gatherer = Gatherer(entries, groups, sender, timeout_s) if self.cgroups else None
        self.lock = lock
        self.stream_ordered = stream_ordered
        self.behind: Posted | None = None  # not the sender: the group posted last, not yet waited for
        self.peer = False  # the sender reads every other rank's shards itself: no steps, no messages
        self.settle_s = 60.0 if timeout_s is None else timeout_s
        self.timeout_s = timeout_s
        # Peer reads, the sender: when the other ranks' one wait for its outcome began (they start
        # it as the peer-read agreement completes, as this rank does), on this rank's clock.
        self.peer_start: float | None = None
        self.sender: Any = None  # the Sender, when this update is the cached layout (see _prefill)
        # Peer reads on the cached layout: the copies run a run ahead of the broadcasts (a run: what
        # one group of broadcasts reads, ``SenderState.posting_runs``; on CUDA on the gatherer's
        # copy streams; on the CPU they are done when launched). ``queue``: the runs (entry
        # indices, in posting order) of the groups prepared, not yet launched; the one in hand is
        # launched before its broadcasts (``ready``), the next one right after they are posted
        # (``posted``), and when a bucket is all posted the next group is
        # prepared ahead (``ahead``) and its first run launched, so the copy engines fill the next
        # bucket while this one is broadcast.
        self.launching = False
        self.queue: collections.deque[list[int]] = collections.deque()
        self.ahead: dict[int, Posted] = {}
        self.current = -1  # the collective group the sender's pipeline pulled last
        self.warm_peers: dict | None = None  # prewarm: the mapping the first group was prepared with

    def prewarm(self, group: Any, buffer_size: int, num_buffers: int) -> bool:
        """The sender, between posting the plan check and waiting for it, on an update of the
        cached layout (see ``_prefill``; the caller checked it): when it reads the other ranks'
        shards as mapped at the last agreed exchange, prepare the first collective group into its
        send buffer and launch the copies of this rank's own shards. Their copies from the other ranks wait (those ranks'
        shards are theirs until the check says their rows are unchanged, and they have waited
        for their own writes); the first broadcast waits for the check. Local only: nothing
        another rank can see. Returns whether it prepared anything; False (nothing changed)
        whenever a condition does not hold or anything fails. Undo with :meth:`discard_warm`."""
        known = lockstep.mapped.get(self.lock.pg) if self.lock is not None else None
        if known is None or self.gatherer is None or not self.cgroups:
            return False
        g = self.cgroups[0]
        if g >= num_buffers:
            return False  # a later bucket's buffer is still to carry the buckets before it
        state = SenderState.of(side_group(group))
        device = side_group(group).data_device or state.device
        # The buffer is free: the last update's sends completed before its END step was read.
        views = state.prefilled_views(g, device, buffer_size, num_buffers) if device is not None else None
        runs = state.posting_runs(g)
        if views is None or runs is None or any(v is None for v in views):
            return False
        gatherer = self.gatherer
        try:
            gatherer.use_peers(known[1], self.lock.ranks)
            gatherer.defer = True
            shard = gatherer.entries[gatherer.shards[0]]
            stream = gatherer.stream_for(mesh_device(shard.tensor.device_mesh))
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                posted = gatherer.prepare(g, views)
            indices = self.groups[g]
            batches = [[indices[p] for p in run] for run in runs]
            gatherer.launch(batches, own_only=True)
        except Exception as e:  # then prepared as usual, after the check
            log.debug("send_model: no preparation during the plan check: %s: %s", type(e).__name__, e)
            self.warm_peers = gatherer.peers
            self.discard_warm()
            return False
        self.ahead[0] = posted
        self.queue.extend(batches)
        self.warm_peers = gatherer.peers
        gatherer.early = True
        return True

    def discard_warm(self) -> None:
        """Undo :meth:`prewarm`: its copies complete (bounded), nothing of it kept."""
        if self.warm_peers is None:
            return
        if not self.gatherer.forget(self.settle_s, keep_peers=self.peer):  # after the exchange, a new mapping stays
            log.warning("send_model: copies still queued after %.0f s", self.settle_s)
        self.ahead.clear()
        self.queue.clear()
        self.warm_peers = None

    def exchange_peers(self, row: torch.Tensor) -> None:
        """Every trainer rank, together: agree whether the sender reads the other ranks' shards
        itself (:mod:`torchxfer.peer_reads`); sets ``peer``. If the sender then cannot map
        them, it tells the others (``FALLBACK``, met by their :meth:`torchxfer.lockstep.Lockstep.await_sender`)
        and every rank gathers as usual."""
        assert self.lock is not None and self.gatherer is not None
        g, key = self.gatherer, self.lock.pg
        if self.lock.same_rows() is not None:  # the rows of the last agreed exchange: not sent again
            decoded = lockstep.mapped[key][1] if g.is_sender else []
        else:
            lockstep.mapped.pop(key, None)
            decoded = [peer_reads.decode_row(r, len(g.shards)) for r in self.lock.exchange(row)]
            if not peer_reads.agreed(decoded):
                return
        self.peer = True
        if not g.is_sender:
            return
        self.peer_start = time.monotonic()
        try:
            g.use_peers(decoded, self.lock.ranks)
            lockstep.mapped[key] = (self.lock.table_digest(), decoded)
            return
        except Exception as e:
            log.warning("send_model: the sender cannot read the other trainer ranks' shards (%s: %s); "
                        "gathering them with collectives instead", type(e).__name__, e)  # fmt: skip
            g.peers = None
            lockstep.mapped.pop(key, None)
        self.peer = False
        self.lock.fallback()
        self.lock.collective_gathers()

    def settle(self) -> None:
        """The sender, before it tells the others the outcome: its peer copies are done, so
        they may change their shards. Bounded; a copy still queued then is logged."""
        if self.peer and self.gatherer is not None and not self.gatherer.settle(self.settle_s):
            log.warning("send_model: peer copies still queued after %.0f s; the other trainer ranks "
                        "are released anyway", self.settle_s)  # fmt: skip

    def peer_overrun(self, margin: bool) -> str | None:
        """The sender under peer reads: past what it may still read the other ranks' shards, how
        far (a phrase for an error), else None.

        Those ranks wait for its outcome once, bounded by ``timeout_s``, from the peer-read
        agreement on; a rank whose wait ran out returns, and its caller may change its shards
        (an optimizer step) while they are read. So the sender stops short of that deadline:
        with ``margin`` before it reads another group (a quarter of ``timeout_s``, at most a
        second, for the copies already issued to complete), and without it (but for 50 ms of
        clock skew between the ranks' starts) once its copies completed, before it reports
        success."""
        if self.peer_start is None or self.timeout_s is None:
            return None
        left = self.timeout_s - (min(1.0, self.timeout_s / 4) if margin else 0.05)
        spent = time.monotonic() - self.peer_start
        if spent <= left:
            return None
        return (f"send_model under peer reads ran {spent:.1f} s, past the {self.timeout_s:g} s timeout_s for which the "
                "other trainer ranks wait for its outcome (after that they may change the shards it reads)")  # fmt: skip

    def stop_if_overrun(self) -> None:
        """The sender under peer reads, before it reads the shards of another group: past
        :meth:`peer_overrun`'s margin, tell the other ranks (they are still waiting), then raise
        TransferError in the pipeline's source, which aborts the update for every worker."""
        late = self.peer_overrun(margin=True)
        if late is None:
            return
        error = TransferError(f"{late}: the update is aborted. Pass a timeout_s that covers the whole update, "
                              "the workers' loads included")  # fmt: skip
        self.settle()  # the copies already issued complete before the others are released
        self.lock.fail(error)
        raise error

    def ready(self, bucket: int | None, positions: list[int] | None) -> None:
        """The sender's pipeline, under peer reads with its buffers prefilled (one group per
        bucket, one entry per slot): the slots at ``positions`` of ``bucket`` are about to be
        broadcast, so the current stream waits for their copies (launched now if not yet;
        issued on it if they belong to no run). ``bucket`` None: every copy, now."""
        if bucket is None or positions is None:
            while self.queue:
                self.gatherer.launch([self.queue.popleft()])
            self.gatherer.issue(None)
            return
        group = self.groups[bucket]
        indices = [group[p] for p in positions]
        while self.queue and any(i in self.gatherer.deferred for i in indices):
            self.gatherer.launch([self.queue.popleft()])
        self.gatherer.issue(indices)

    def posted(self, bucket_done: bool) -> None:
        """The sender's pipeline just posted a run's broadcasts: launch the next run's copies. When the
        bucket is all posted (``bucket_done``, after the row that tells the workers what
        follows: the next group's preparation would delay it), prepare the next group ahead
        and launch its first run."""
        # Past the margin of peer_overrun nothing more is read ahead: the next group's advance() stops.
        if bucket_done and not self.queue and self.launching and self.gatherer.defer \
                and self.peer_overrun(margin=True) is None:  # fmt: skip
            j = self.current + 1
            if j < len(self.cgroups) and j not in self.ahead:
                ahead = self._prepare(j, ahead=True)
                if ahead is not None:
                    self.ahead[j] = ahead
        if self.queue:
            self.gatherer.launch([self.queue.popleft()])

    def advance(self, j: int) -> dict[int, torch.Tensor]:
        if self.peer and self.gatherer.is_sender:
            self.stop_if_overrun()
        self.current = j
        posted = self.ahead.pop(j, None)
        left = posted is None and (self.gatherer.deferred or self.queue)  # copies of a group before
        if left or (posted is not None and not self.gatherer.defer):  # or the pipeline stopped deferring
            self.ready(None, None)
        if posted is None:
            posted = self._prepare(j)
        if self.lock is not None and not self.peer:
            self.lock.step()
        self.gatherer.post(posted)
        if self.gatherer.is_sender:
            return self.gatherer.collect(posted, self.stream_ordered)
        if self.behind is not None:
            self.gatherer.collect(self.behind, False)
        self.behind = posted
        return {}

    def _prepare(self, j: int, ahead: bool = False) -> Posted | None:
        """Group ``j``'s local work (:meth:`torchxfer.gather.Gatherer.prepare`). Launching, with every
        tensor gathered into the send buffer: on the copy stream, and its runs queued (see
        ``queue``). ``ahead``: only then (else None)."""
        g = self.cgroups[j]
        if self.sender is None:
            return self.gatherer.prepare(g, None)
        launching = self.launching and self.gatherer.defer
        stream = None  # on the CPU copies are done when launched, and waits are waits
        if launching:
            shard = self.gatherer.entries[self.gatherer.shards[0]]
            stream = self.gatherer.stream_for(mesh_device(shard.tensor.device_mesh))
        # The buffer's earlier broadcasts are waited for on both streams: the copy stream fills it,
        # the current one packs the group's plain tensors into it. (An event of the copy stream
        # would make the current one wait for the copies launched before it, too.)
        into = self.sender.bucket_views(g, also=stream)
        runs = self.sender.posting_runs(g) if into is not None and launching else None
        if runs is None or any(v is None for v in into):  # tensors of its own to allocate: as usual
            return None if ahead else self.gatherer.prepare(g, into)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            posted = self.gatherer.prepare(g, into)
        group = self.groups[g]
        self.queue.extend([group[p] for p in run] for run in runs)
        return posted

    def run_peer(self) -> None:
        """A trainer rank that does not send: every group's gathers, in the sender's order."""
        for j in range(len(self.cgroups)):
            self.advance(j)
        if self.behind is not None:
            self.gatherer.collect(self.behind, False)
            self.behind = None


class _Pulled:
    """The sender's ``(name, full tensor)`` pairs, in plan order, as the pipeline pulls them.

    Has a length (the number of tensors) so the sender announces the count in
    its header and a receiver with an update_info can check it before payload moves.
    """

    def __init__(self, entries: list[Entry], groups: list[list[int]], schedule: _Schedule) -> None:
        self._entries, self._groups, self._schedule = entries, groups, schedule
        self._gen = self._run()

    def _run(self) -> Iterator[tuple[str, torch.Tensor]]:
        for g, indices in enumerate(self._groups):
            j = self._schedule.slot.get(g)
            fulls = self._schedule.advance(j) if j is not None else {}
            for i in indices:  # the frame keeps no reference to a tensor once yielded
                entry = self._entries[i]
                yield entry.name, (fulls.pop(i) if entry.collective else local_tensor(entry))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> _Pulled:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


def _send_colocated(entries: list[Entry], group: Any, lock: lockstep.Lockstep | None, buffer_size: int,
                    num_buffers: int, version: int | None) -> Any:  # fmt: skip
    """Colocated: every trainer rank serves the workers on its own GPU through its own group.

    Every rank needs every full tensor, so each DTensor is materialized with
    ``full_tensor()`` on every rank, one tensor at a time, in plan order;
    a lockstep before each gather lets a rank whose send failed stop the
    others before they wait in a gather it will not join.
    """

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for entry in entries:
            if entry.collective:
                if lock is not None:
                    lock.step()
                with torch.no_grad():
                    tensor = entry.tensor.full_tensor().detach().to(entry.dtype)
            else:
                tensor = local_tensor(entry)
            yield entry.name, tensor

    try:
        stats = IPCWeightTransferEngine.trainer_send_weights(
            items(), group, packed_buffer_size_bytes=buffer_size, packed_num_buffers=num_buffers, version=version,
        )  # fmt: skip
    except Exception as e:
        if lock is not None and not lock.done:
            lock.fail(e)
        raise
    if lock is not None:
        lock.finish()
    return stats
