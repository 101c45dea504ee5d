"""Gathers of a plan's sharded tensors, one bucket group at a time, to the sending rank.

Every trainer rank makes the same calls, in the same order, for the same
groups (:func:`torchxfer.sources.gather_groups`): :meth:`Gatherer.prepare`
(local only: casts and copies of this rank's shards, allocations; any failure
here happens before this rank posts a collective), :meth:`Gatherer.post` (the
collectives, asynchronous) and :meth:`Gatherer.collect` (wait; on the sender,
the full tensors). :mod:`torchxfer.trainer` interleaves them with its
lockstep so that a group is posted by every rank or by none.

What moves, per group and per mesh-dimension group that holds ``shard``
entries (on the trainer's own groups; ranks of other replicas of an HSDP mesh
take no part), all as point-to-point messages to the sender:

* NCCL: each rank packs its shards of the group into one flat section (one
  fused copy; a lone contiguous shard is sent from its own memory) and sends
  it in one message; one batch per group, one NCCL launch, whatever the
  number of tensors. The sender copies its own shards straight into the full
  tensors it allocates, receives every other rank's section, and copies the
  pieces into place (one fused copy: ``Shard(0)`` pieces are runs of rows,
  other dims strided slices).
* Gloo (every message a transfer of its own, and a copy costs the CPU the
  transfer needs): a ``Shard(0)`` shard is sent from its own memory straight
  into its rows of the full tensor; only column shards share a section.

Per-tensor work is a few views, never a collective of its own.

**Peer reads** (every trainer rank on one host, every gathered entry a CUDA
``shard``; agreed once per update, :mod:`torchxfer.peer_reads`): the other
ranks post nothing. Each describes where its shards lie (:meth:`Gatherer.peer_row`);
the sender maps them (:meth:`Gatherer.use_peers`) and, in ``prepare``, copies
its own shards and every other rank's pieces into place on its stream (an
update that casts a shard gathers with collectives); ``post`` and
``collect`` then have nothing to wait for. A tensor gathered straight into
the send buffer (``prepare``'s ``into``) may have its copies deferred
(``defer``): :meth:`Gatherer.launch` runs them, on the copy stream on CUDA,
and :meth:`Gatherer.issue` orders a broadcast of them after them.

``full`` entries are gathered with ``full_tensor()`` on every rank when the
group is posted. Memory on the sender per group: the group's full tensors,
plus the other ranks' sections while they are copied into place.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist

from . import peer_reads
from .config import wait_timeout
from .errors import TransferError
from .group import local_shard
from .packing import align_up
from .sources import Entry, finish_full, gather_full, is_dtensor, mesh_device, stage_full

__all__ = ["GatherFailed", "Gatherer", "Posted", "local_tensor", "peer_row"]

_TAG_SPACE = 1 << 30
log = logging.getLogger("torchxfer")


class GatherFailed(TransferError):
    """A collective on the trainer's own groups failed: those groups are no longer usable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, broken=True)


@dataclasses.dataclass
class _Op:
    """The gathers of one group's entries of one mesh-dimension group ``pg``, to the sender:
    a section per rank, laid out alike on every rank (``offsets[k][q]``: where rank q's piece
    of the k-th entry starts in its section), and on Gloo a message per Shard(0) shard."""

    pg: Any
    dst: int  # the sender's rank in pg
    world: int
    me: int
    entries: list[int]
    p2p: bool = False  # Gloo: its sends and receives are posted one by one, tagged
    tag: int = 0
    direct: list[bool] = dataclasses.field(default_factory=list)  # per entry: its own messages (Gloo, Shard(0))
    offsets: list[list[int] | None] = dataclasses.field(default_factory=list)  # per entry: None if direct
    sections: list[int] = dataclasses.field(default_factory=list)  # bytes per rank (0: no section)
    sends: list[tuple[torch.Tensor, int]] = dataclasses.field(default_factory=list)  # (bytes, tag) to the sender
    recvs: list[tuple[torch.Tensor, int, int]] = dataclasses.field(default_factory=list)  # (into, rank, tag)
    recv: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # on the sender: sections, by rank


@dataclasses.dataclass
class Posted:
    """One group, prepared, then posted: its ops and works, and its full tensors (on the sender)."""

    index: int
    ops: list[_Op]
    full: list[int]
    works: list[Any] = dataclasses.field(default_factory=list)
    fulls: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    staged: dict[int, Any] = dataclasses.field(default_factory=dict)  # ``full`` entries, ready to gather


_Copy = tuple[int, int, int, int, int]
"""(dst, src, width, rows, pitch): see :func:`torchxfer.peer_reads.copy_bytes`."""


def one_by_one(pg: Any) -> bool:
    """Whether ``pg``'s point-to-point messages are posted one by one, tagged (Gloo), rather
    than as one batch (NCCL)."""
    return "gloo" in str(dist.get_backend(pg)).lower()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Gatherer:
    """Gathers of one send_model call on one trainer rank (see the module docstring).

    Args:
        entries: the plan, the same on every rank (checked by the lockstep).
        groups: :func:`torchxfer.sources.gather_groups` of it.
        sender: global rank of the sending trainer rank.
        timeout_s: bound on each wait for a gather (None: the group's own).
    """

    def __init__(self, entries: list[Entry], groups: list[list[int]], sender: int, timeout_s: float | None) -> None:
        self.entries = entries
        self.groups = groups
        self.sender = sender
        self.is_sender = dist.get_rank() == sender
        self.timeout = None if timeout_s is None else wait_timeout(timeout_s)
        self._members: dict[tuple[int, int], tuple[Any, ...]] = {}
        self._tags: dict[int, int] = {}
        self.posted_groups = 0  # how many groups this rank posted (tests count them)
        self.prefilled = 0  # entries the sender gathered straight into its send buffer
        self.shards = [i for i, e in enumerate(entries) if e.how == "shard"]
        # Peer reads (the sender, once agreed): (entry, rank in its mesh group) -> device pointer.
        self.peers: dict[tuple[int, int], int] | None = None
        self.peer_reads = 0  # pieces the sender copied from other ranks' memory (tests count them)
        self.peer_event: Any = None  # recorded after the sender's last peer copies
        # The sender, when its send buffer's views are filled run by run (``launch``, ``issue``):
        # the copies of each prefilled entry (its own shard's, the other ranks' pieces), deferred.
        self.defer = False
        self.deferred: dict[int, tuple[list[_Copy], list[_Copy]]] = {}
        self.issued_late = 0  # entries whose deferred copies were issued (tests count them)
        self.launched = 0  # ... of them, by launch (tests count them)
        self.launched_own = 0  # entries whose own copies were launched alone, ahead (tests count them)
        self.early = False  # its first group was prepared during the plan check, and kept (tests read it)
        # CUDA, deferred copies launched ahead (``launch``): on two streams, the pulls from other
        # GPUs and the copies of this rank's own shards (then on another copy engine, beside the
        # pulls rather than after them); per entry the events recorded after its run's copies,
        # which the broadcast of that run waits for (``issue``).
        self.copy_stream: Any = None
        self.local_stream: Any = None
        self.run_events: dict[int, tuple[Any, Any]] = {}

    def _member(self, entry: Entry) -> tuple[Any, int | None, int]:
        """(pg, the sender's rank in it or None, this rank's) for a ``shard`` entry's mesh dimension."""
        mesh = entry.tensor.device_mesh
        key = (id(mesh), entry.shard.mesh_dim)  # get_group() costs tens of microseconds
        if key not in self._members:
            pg = mesh.get_group(entry.shard.mesh_dim)
            ranks = dist.get_process_group_ranks(pg)
            dst = ranks.index(self.sender) if self.sender in ranks else None
            self._members[key] = (pg, dst, ranks.index(dist.get_rank()), mesh, ranks)  # the mesh kept: ids stay unique
        return self._members[key][:3]

    # -- peer reads (one host, CUDA): see torchxfer.peer_reads ----------------------------------------

    def use_peers(self, rows: list[peer_reads.Row], trainer_ranks: list[int]) -> None:
        """The sender: map every other rank's pieces (rows in ``trainer_ranks`` order, global
        ranks). PeerReadsUnavailable (or TransferError from CUDA) if a piece is missing, out of
        its allocation's bounds, or cannot be mapped; nothing is read then."""
        key = (tuple(trainer_ranks), tuple(r.raw for r in rows))
        planned = getattr(self.entries, "planned", None)  # a module's plan, reused while it holds
        last = getattr(planned, "peer_reads", None)
        if last is not None and last[0] == key and peer_reads.Mappings.holds(last[2]):
            self.peers = last[1]
            return
        where = {g: t for t, g in enumerate(trainer_ranks)}
        used: set[bytes] = set()
        peers: dict[tuple[int, int], int] = {}
        for k, i in enumerate(self.shards):
            entry = self.entries[i]
            _, dst, me = self._member(entry)
            ranks = self._members[(id(entry.tensor.device_mesh), entry.shard.mesh_dim)][4]
            if entry.tensor.dtype != entry.dtype:
                raise peer_reads.PeerReadsUnavailable(f"{entry.source_name!r} is cast on the way")
            itemsize = entry.tensor.dtype.itemsize
            for q, g in enumerate(ranks):
                want = _numel(entry.shard.local_shape(entry.shape, q)) * itemsize
                if q == me or not want:
                    continue
                row = rows[where[g]] if g in where else None
                seg, offset, nbytes = row.pieces[k] if row is not None else (-1, 0, 0)
                if nbytes != want or not 0 <= seg < len(row.segments):
                    raise peer_reads.PeerReadsUnavailable(f"trainer rank {g} did not describe its shard of "
                                                          f"{entry.source_name!r} ({want} bytes)")  # fmt: skip
                handle, size, buffer_id = row.segments[seg]
                if offset < 0 or offset + nbytes > size:
                    raise peer_reads.PeerReadsUnavailable(f"trainer rank {g}'s shard of {entry.source_name!r} lies "
                                                          f"outside its allocation ({offset}+{nbytes} > {size})")
                device = mesh_device(entry.tensor.device_mesh)
                peers[(i, q)] = peer_reads.Mappings.base(handle, size, buffer_id, device) + offset
                used.add(handle)
        peer_reads.Mappings.keep_only(used)
        self.peers = peers
        if planned is not None:
            planned.peer_reads = (key, peers, used, {})  # the last: _copies_memo

    def _read_peers(self, op: _Op, fulls: dict[int, torch.Tensor]) -> None:
        """The sender, with peer reads: its own shards and every other rank's pieces copied into
        the full tensors (or the send buffer's views) by the copy engines, on its stream;
        nothing to post. A shard of its own that is not a plain contiguous tensor of the sent
        dtype goes through the fused copy (other ranks vote no to a cast: see :func:`peer_row`)."""
        device = mesh_device(self.entries[op.entries[0]].tensor.device_mesh)
        op.direct = [True] * len(op.entries)  # nothing for collect() to place
        cuda = device.type == "cuda"
        dst, src, now = [], [], []
        memo = self._copies_memo()
        for i in op.entries:
            entry = self.entries[i]
            full = fulls.get(i)
            prefilled = full is not None and full.device == device and full.is_contiguous()
            if prefilled:
                self.prefilled += 1
            else:
                full = fulls[i] = torch.empty(entry.shape, dtype=entry.dtype, device=device)
            at = full.data_ptr()
            local = local_shard(entry.tensor)
            plain = local.is_contiguous() and not local.is_conj() and not local.is_neg()  # its bytes are its values
            known = memo.get(i) if memo is not None else None
            if known is not None and known[0] == at and known[1] == local.data_ptr() and plain:
                # The same buffer, shard and mapping as an earlier update of this plan (whose check
                # says the shard's dtype, shape and device are unchanged): the same copies.
                own, copies = known[2], known[3]
                self.peer_reads += len(copies)
            else:
                starts, widths, rows, pitch = _geometry(entry)
                own, copies = [], []
                if cuda and local.dtype == entry.dtype and local.device == device and plain \
                        and local.numel() * local.element_size() == widths[op.me] * rows:  # fmt: skip
                    own.append((at + starts[op.me], local.data_ptr(), widths[op.me], rows, pitch))
                else:
                    dst.append(self._place(full, entry, op.me))
                    src.append(self._local(entry, op.me, device))  # ValueError for a shard of another shape
                for q, width in enumerate(widths):
                    ptr = self.peers.get((i, q)) if q != op.me and width else None
                    if ptr is not None:
                        copies.append((at + starts[q], ptr, width, rows, pitch))
                        self.peer_reads += 1
                if memo is not None and own:
                    memo[i] = (at, own[0][1], own, copies)
            if prefilled and self.defer:  # a view of the send buffer: filled just before its broadcast
                self.deferred[i] = (own, copies)
            else:
                now += own + copies
        peer_reads.copy_batch(now, device)
        self._copy(dst, src)
        if cuda and (now or dst):
            self._record(device)

    def _copies_memo(self) -> dict[int, tuple] | None:
        """Per entry, the copies :meth:`_read_peers` made for it last, with the buffer and shard
        addresses they were made for: kept with a module's cached plan while its peer-read
        mapping holds (see :meth:`use_peers`), so an unchanged layout costs an address
        comparison per entry, not its geometry and checks. None without a cached plan."""
        planned = getattr(self.entries, "planned", None)
        last = getattr(planned, "peer_reads", None)
        return last[3] if last is not None and last[1] is self.peers else None

    def _record(self, device: torch.device) -> None:
        if self.peer_event is None:
            self.peer_event = torch.cuda.Event()
        self.peer_event.record(torch.cuda.current_stream(device))

    def stream_for(self, device: torch.device) -> Any:
        """The stream the sender's launched copies run on (CUDA; None on the CPU). Made (once per
        device) and, on this Gatherer's first call, ordered after the current stream's work so
        far, as are the copies of this rank's own shards: the trainer's last writes to its
        shards (the optimizer step) come before they are read."""
        if device.type != "cuda":
            return None
        if self.copy_stream is None:
            self.copy_stream, self.local_stream = copy_stream(device, 0), copy_stream(device, 1)
            written = torch.cuda.Event()
            written.record(torch.cuda.current_stream(device))
            self.copy_stream.wait_event(written)
            self.local_stream.wait_event(written)
        return self.copy_stream

    def launch(self, runs: list[list[int]], own_only: bool = False) -> None:
        """The sender: the deferred copies of the entries of ``runs`` (entry indices, in the order
        their broadcasts will be posted), all now, run by run: on CUDA on the copy stream (an
        event after each run), so the copy engines fill the next runs while earlier ones are
        broadcast; on the CPU here and now. :meth:`issue` then orders each broadcast after its run.
        ``own_only``: only the copies of this rank's own shards; the other ranks' pieces stay
        deferred (launched by a later call, or issued)."""
        for run in runs:
            own, pulls, done, touched = [], [], [], []
            for i in run:
                copies = self.deferred.pop(i, None)
                if copies is not None:
                    touched.append(i)
                    own += copies[0]
                    if own_only and copies[1]:
                        self.deferred[i] = ([], copies[1])
                    else:
                        pulls += copies[1]
                        done.append(i)
                    if own_only and copies[0]:
                        self.launched_own += 1
            if not own and not pulls:
                continue
            device = mesh_device(self.entries[touched[0]].tensor.device_mesh)
            stream = self.stream_for(device)
            if stream is None:
                peer_reads.copy_batch(own + pulls, device)
            else:
                # The local stream starts where the copy stream stands (the buffer's waits, the
                # runs before), then both run this run's copies side by side.
                start = torch.cuda.Event()
                start.record(stream)
                self.local_stream.wait_event(start)
                with torch.cuda.stream(stream):
                    peer_reads.copy_batch(pulls, device)
                with torch.cuda.stream(self.local_stream):
                    peer_reads.copy_batch(own, device)
                events = (torch.cuda.Event(), torch.cuda.Event())
                events[0].record(stream)
                events[1].record(self.local_stream)
                for i in touched:
                    self.run_events[i] = events
            self.issued_late += len(done)
            self.launched += len(done)

    def issue(self, indices: list[int] | None) -> None:
        """The sender: entries ``indices`` (None: all of them, and none deferred from here on) are
        about to be read on the current stream: it waits for their launched copies, and their
        deferred copies are issued on it."""
        if indices is None:
            self.defer = False
            indices = list(self.deferred)
            self.run_events.clear()
            if self.copy_stream is not None:  # everything launched so far, whatever reads it next
                current = torch.cuda.current_stream(self.copy_stream.device)
                current.wait_stream(self.copy_stream)
                current.wait_stream(self.local_stream)
        waited = set()
        for i in indices:
            events = self.run_events.pop(i, None)
            if events is not None and id(events) not in waited:
                waited.add(id(events))
                current = torch.cuda.current_stream(self.copy_stream.device)
                current.wait_event(events[0])
                current.wait_event(events[1])
        device, batch = None, []
        for i in indices:
            copies = self.deferred.pop(i, None)
            if copies is None:
                continue
            if device is None:
                device = mesh_device(self.entries[i].tensor.device_mesh)
            batch += copies[0] + copies[1]
            self.issued_late += 1
        if device is not None:
            peer_reads.copy_batch(batch, device)
            if device.type == "cuda":
                self._record(device)

    def settle(self, timeout_s: float) -> bool:
        """The sender: wait (up to ``timeout_s``) until its peer copies are done, so the other
        ranks may change their shards. True when done (or there were none)."""
        self.deferred.clear()  # never issued (a failure part way): nothing of theirs to wait for
        self.run_events.clear()
        for stream in (self.copy_stream, self.local_stream):
            if stream is not None:
                launched = torch.cuda.Event()
                launched.record(stream)
                if not peer_reads.wait_event(launched, timeout_s):
                    return False
        return self.peer_event is None or peer_reads.wait_event(self.peer_event, timeout_s)

    def forget(self, timeout_s: float, keep_peers: bool) -> bool:
        """The sender: drop what was prepared before anything was posted (a group prepared during
        the plan check, see ``trainer._Schedule.prewarm``): its copies complete (:meth:`settle`,
        bounded: False if they did not), and this Gatherer is as new, its mapping kept if
        ``keep_peers``, so the same group can be prepared again with every rank numbering its
        gathers from the start."""
        done = self.settle(timeout_s)
        self.defer, self.early = False, False
        self.prefilled = self.launched_own = self.peer_reads = 0
        self._tags.clear()
        if not keep_peers:
            self.peers = None
        return done

    def prepare(self, g: int, into: list[Any] | None = None) -> Posted:
        """Local work of group ``g``: this rank's shards cast and packed (or, on the sender, copied
        into the full tensors it allocates), the sender's sections allocated.

        ``into`` (the sender only): per entry of the group, a tensor to gather that entry
        into instead of a new one (the send buffer's own view of it), or None.
        """
        ops: dict[int, _Op] = {}
        full: list[int] = []
        for i in self.groups[g]:
            entry = self.entries[i]
            if entry.how == "full":
                full.append(i)
            if entry.how != "shard":
                continue
            pg, dst, me = self._member(entry)
            if dst is None:  # another replica's shard group: the sender is not in it
                continue
            op = ops.get(id(pg))
            if op is None:
                op = ops[id(pg)] = _Op(pg, dst, len(entry.shard.sizes), me, [], p2p=one_by_one(pg))
            op.entries.append(i)
        posted = Posted(g, list(ops.values()), full)
        for i in full:  # casts and moves, which can fail: before this rank tells the others it is ready
            posted.staged[i] = stage_full(self.entries[i])
        with torch.no_grad():
            if into is not None and self.is_sender:
                for i, view in zip(self.groups[g], into):
                    entry = self.entries[i]
                    if entry.how == "shard" and view is not None and view.dtype == entry.dtype \
                            and tuple(view.shape) == entry.shape:  # fmt: skip
                        posted.fulls[i] = view
            for op in posted.ops:
                tag = self._tags.get(id(op.pg), 0)  # every member of pg numbers its ops alike
                op.tag, self._tags[id(op.pg)] = tag, (tag + 1 + len(op.entries) * op.world) % _TAG_SPACE
                self._prepare_op(op, posted.fulls)
        return posted

    def _local(self, entry: Entry, me: int, device: torch.device) -> torch.Tensor:
        """This rank's shard, cast; a shard off ``device`` (CPU-offloaded) is returned as it is:
        the copy that places it moves and casts it, one tensor at a time, with no device
        temporary per group. ValueError if its shape no longer fits the plan."""
        local = entry.tensor.to_local()  # under no_grad (prepare): no graph to detach from
        if local.is_conj() or local.is_neg():  # a lazy view: its memory is not its values
            local = local.resolve_conj().resolve_neg()
        want = entry.shard.local_shape(entry.shape, me)
        if tuple(local.shape) != want:
            raise ValueError(f"{entry.source_name!r}: local shard of shape {list(local.shape)}, expected {list(want)} "
                             "(it changed since the plan was made)")  # fmt: skip
        return local.to(dtype=entry.dtype) if local.device == device else local

    def _prepare_op(self, op: _Op, fulls: dict[int, torch.Tensor]) -> None:
        """The op's messages. On NCCL one section per rank (one launch, whatever the number of
        tensors); on Gloo, where every message is a transfer of its own and a copy costs the
        same CPU the transfer needs, a Shard(0) shard goes from its own memory straight into
        its rows of the full tensor, and only column shards share a section."""
        device = mesh_device(self.entries[op.entries[0]].tensor.device_mesh)
        if self.peers is not None:
            self._read_peers(op, fulls)
            return
        op.direct = [op.p2p and self.entries[i].shard.dim == 0 for i in op.entries]
        cursors = [0] * op.world
        for i, direct in zip(op.entries, op.direct):
            entry = self.entries[i]
            if direct:
                op.offsets.append(None)
                continue
            op.offsets.append(list(cursors))
            for q in range(op.world):
                cursors[q] = align_up(cursors[q] + _numel(entry.shard.local_shape(entry.shape, q)) * entry.dtype.itemsize)
        # On NCCL at least 16 bytes from every rank: each takes part in every batch (an NCCL batch
        # that is a communicator's first use needs every rank), and a message is never empty.
        op.sections = [c for c in cursors] if op.p2p else [max(c, 16) for c in cursors]
        locals_ = [self._local(self.entries[i], op.me, device) for i in op.entries]
        if op.me != op.dst:
            self._prepare_peer(op, locals_, device)
            return
        dst = []
        for k, (i, local) in enumerate(zip(op.entries, locals_)):
            entry = self.entries[i]
            if i in fulls and fulls[i].device == device:  # the send buffer's own view
                self.prefilled += 1
            else:
                fulls[i] = torch.empty(entry.shape, dtype=entry.dtype, device=device)
            dst.append(self._place(fulls[i], entry, op.me))
            if op.direct[k]:
                for q, n in enumerate(entry.shard.sizes):
                    if q != op.me and n:
                        into = self._place(fulls[i], entry, q).reshape(-1).view(torch.uint8)
                        op.recvs.append((into, q, self._direct_tag(op, k, q)))
        self._copy(dst, locals_)
        for q in range(op.world):
            if q != op.me and op.sections[q]:
                op.recv[q] = torch.empty(op.sections[q], dtype=torch.uint8, device=device)
                op.recvs.append((op.recv[q], q, op.tag))

    def _prepare_peer(self, op: _Op, locals_: list[torch.Tensor], device: torch.device) -> None:
        """A rank other than the sender: its section packed (a lone contiguous shard is sent
        from its own memory), and on Gloo its Shard(0) shards as they are."""
        packed = []
        for k, (i, local) in enumerate(zip(op.entries, locals_)):
            entry = self.entries[i]
            mine = local.device == device and local.dtype == entry.dtype and local.is_contiguous()
            if not op.direct[k]:
                packed.append((k, i, local, mine))
            elif entry.shard.sizes[op.me]:
                raw = local if mine else local.to(device=device, dtype=entry.dtype).contiguous()
                op.sends.append((raw.reshape(-1).view(torch.uint8), self._direct_tag(op, k, op.me)))
        if not op.sections[op.me]:
            return
        if len(packed) == 1 and packed[0][3] and packed[0][2].numel() * packed[0][2].element_size() == op.sections[op.me]:
            op.sends.append((packed[0][2].reshape(-1).view(torch.uint8), op.tag))  # a lone shard: its own memory
            return
        section = torch.empty(op.sections[op.me], dtype=torch.uint8, device=device)
        self._copy([self._piece(section, op.offsets[k][op.me], self.entries[i], op.me) for k, i, _, _ in packed],
                   [local for _, _, local, _ in packed])  # fmt: skip
        op.sends.append((section, op.tag))

    @staticmethod
    def _direct_tag(op: _Op, k: int, q: int) -> int:
        return (op.tag + 1 + k * op.world + q) % _TAG_SPACE

    @staticmethod
    def _piece(section: torch.Tensor, offset: int, entry: Entry, q: int) -> torch.Tensor:
        """Rank q's piece of ``entry`` in its section, typed and shaped."""
        shape = entry.shard.local_shape(entry.shape, q)
        return section[offset : offset + _numel(shape) * entry.dtype.itemsize].view(entry.dtype).view(shape)

    @staticmethod
    def _place(full: torch.Tensor, entry: Entry, q: int) -> torch.Tensor:
        """Where rank q's shard lies in the full tensor (rows for Shard(0), a strided slice otherwise)."""
        sizes = entry.shard.sizes
        return full.narrow(entry.shard.dim, sum(sizes[:q]), sizes[q])

    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """The non-empty pairs copied: one fused copy of those on one device, one by one across devices."""
        fused: tuple[list, list] = ([], [])
        for d, s in zip(dst, src):
            if not d.numel():
                continue
            if d.device == s.device and d.dtype == s.dtype:
                fused[0].append(d)
                fused[1].append(s)
            else:
                d.copy_(s, non_blocking=s.device.type == "cpu" and s.is_pinned())
        if fused[0]:
            torch._foreach_copy_(*fused)

    def post(self, posted: Posted) -> None:
        """Post the group's gathers (asynchronous), then its ``full`` entries' ``full_tensor()`` (blocking).

        A collective that fails raises GatherFailed (the trainer groups are then unusable); the
        local work after a gather (a ``Partial`` tensor's cast) raises as it is, so the caller
        tells the other ranks, which wait for this one at the next lockstep point."""
        self.posted_groups += 1
        try:
            for op in posted.ops:
                posted.works += self._post_messages(op)
        except Exception as e:
            raise self._failed(posted, e) from e
        for i in posted.full:
            try:
                gathered = gather_full(posted.staged.pop(i))
            except Exception as e:
                raise self._failed(posted, e) from e
            full = finish_full(self.entries[i], gathered)
            del gathered
            if self.is_sender:
                posted.fulls[i] = full
            del full

    @staticmethod
    def _failed(posted: Posted, e: Exception) -> GatherFailed:
        return GatherFailed(f"gathering group {posted.index} of send_model failed on trainer rank {dist.get_rank()}: "
                            f"{type(e).__name__}: {e}")  # fmt: skip

    @staticmethod
    def _post_messages(op: _Op) -> list[Any]:
        """The op's messages to the sender: one batch (one NCCL launch), or tagged sends and
        receives posted one by one on Gloo."""
        ops = [dist.P2POp(dist.isend, t, group=op.pg, group_peer=op.dst, tag=tag) for t, tag in op.sends]
        ops += [dist.P2POp(dist.irecv, t, group=op.pg, group_peer=q, tag=tag) for t, q, tag in op.recvs]
        if not ops:
            return []
        if op.p2p:
            return [o.op(o.tensor, group=op.pg, tag=o.tag,
                         **{("group_dst" if o.op is dist.isend else "group_src"): o.group_peer}) for o in ops]  # fmt: skip
        return [w for w in dist.batch_isend_irecv(ops) if w is not None]

    def collect(self, posted: Posted, stream_ordered: bool) -> dict[int, torch.Tensor]:
        """Wait for the group's gathers; on the sender, return its gathered tensors by entry index.

        ``stream_ordered`` (the sender on CUDA): later work on the current stream
        is ordered after the gathers instead of waiting on the CPU.
        """
        try:
            for work in posted.works:
                if stream_ordered:
                    work.wait()
                elif (work.wait() if self.timeout is None else work.wait(self.timeout)) is False:
                    raise TimeoutError(f"no completion after {self.timeout}")
        except Exception as e:
            raise GatherFailed(f"a gather of send_model (group {posted.index}) failed on trainer rank "
                               f"{dist.get_rank()}: {type(e).__name__}: {e}. Another trainer rank died, stopped "
                               "calling send_model, or is stuck; the trainer group is no longer usable.") from e
        posted.works = []
        fulls = posted.fulls
        if self.is_sender:
            with torch.no_grad():
                for op in posted.ops:
                    dst, src = [], []
                    for k, i in enumerate(op.entries):
                        if op.direct[k]:
                            continue
                        entry = self.entries[i]
                        for q, section in op.recv.items():
                            dst.append(self._place(fulls[i], entry, q))
                            src.append(self._piece(section, op.offsets[k][q], entry, q))
                    self._copy(dst, src)
        for op in posted.ops:
            op.sends, op.recvs, op.recv = [], [], {}
        posted.ops, posted.fulls = [], {}
        return fulls if self.is_sender else {}


def peer_row(entries: list[Entry], is_sender: bool) -> torch.Tensor:
    """This rank's row of the peer-read exchange (local, never raises): where each of its
    ``shard`` entries' local tensors lies (:func:`torchxfer.peer_reads.export`), or a no vote.
    The sender sends only its vote. Made before the plan check, so a rank's export overlaps
    the others' planning; the plan check still decides whether the rows are exchanged."""
    shards = [i for i, e in enumerate(entries) if e.how == "shard"]
    vote, pieces, segments = peer_reads.enabled(), {}, []
    if vote and not is_sender:
        try:
            tensors, devices = {}, {}
            with torch.no_grad():
                for k, i in enumerate(shards):
                    entry = entries[i]
                    dtensor = entry.tensor
                    local = local_shard(dtensor)
                    mesh = dtensor.device_mesh
                    device = devices.get(id(mesh))
                    if device is None:
                        device = devices[id(mesh)] = mesh_device(mesh)
                    # A cast would have to be staged on rank 0 in the stored dtype, beyond the memory
                    # bound of two buckets; casting here would run kernels on this GPU.
                    if local.device != device or not local.is_contiguous() or local.dtype != entry.dtype \
                            or local.is_conj() or local.is_neg():  # fmt: skip
                        raise peer_reads.PeerReadsUnavailable(f"{entry.source_name!r}: a shard off its GPU, not "
                                                              "contiguous, a lazy conjugate or negative view, or "
                                                              "cast on the way")  # fmt: skip
                    if local.numel():
                        tensors[k] = local
            pieces, segments = peer_reads.export(tensors)
        except Exception as e:
            log.debug("peer reads: trainer rank %d votes no: %s: %s", dist.get_rank(), type(e).__name__, e)
            vote = False
    global _last_row
    made = (vote, len(shards), pieces, segments)
    if _last_row is None or _last_row[0] != made:  # an unchanged export: the same row, not encoded again
        _last_row = (made, peer_reads.encode_row(vote, len(shards), pieces, segments))
    return _last_row[1]


_last_row: tuple[tuple, torch.Tensor] | None = None


_copy_streams: dict[tuple[torch.device, int], Any] = {}


def copy_stream(device: torch.device, k: int) -> Any:
    """Stream ``k`` of a device for the sender's launched copies, made once: a stream per
    update would be a new CUDA stream each time, never given back."""
    stream = _copy_streams.get((device, k))
    if stream is None:
        stream = _copy_streams[(device, k)] = torch.cuda.Stream(device)
    return stream


_geometries: dict[tuple, tuple[list[int], list[int], int, int]] = {}


def _geometry(entry: Entry) -> tuple[list[int], list[int], int, int]:
    """Where each rank's piece of a ``shard`` entry lies in the full contiguous tensor, in bytes:
    (start per rank, row width per rank, rows, row pitch). A ``Shard(d)`` piece is ``rows`` runs
    (the product of the dims before ``d``) of its width, ``pitch`` apart. Cached by layout."""
    key = (entry.shape, entry.dtype, entry.shard)
    known = _geometries.get(key)
    if known is None:
        dim, sizes = entry.shard.dim, entry.shard.sizes
        inner = _numel(entry.shape[dim + 1 :]) * entry.dtype.itemsize
        rows = _numel(entry.shape[:dim])
        starts = [sum(sizes[:q]) * inner for q in range(len(sizes))]
        known = _geometries[key] = (starts, [n * inner for n in sizes], rows, entry.shape[dim] * inner)
        if len(_geometries) > 4096:
            _geometries.clear()
    return known


def local_tensor(entry: Entry) -> torch.Tensor:
    """A ``local`` entry's tensor, cast (no collective)."""
    with torch.no_grad():
        if is_dtensor(entry.tensor):
            return entry.tensor.to_local().detach().to(entry.dtype)
        return entry.tensor.detach().to(entry.dtype)
