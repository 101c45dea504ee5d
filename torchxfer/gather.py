"""Gathers of a plan's sharded tensors, one bucket group at a time, to the sending rank.

Every trainer rank makes the same calls, in the same order, for the same
groups (:func:`torchxfer.sources.gather_groups`): :meth:`Gatherer.prepare`
(local only: casts and copies of this rank's shards, allocations; any failure
here happens before this rank posts a collective), :meth:`Gatherer.post` (the
collectives, asynchronous) and :meth:`Gatherer.collect` (wait; on the sender,
the full tensors). :mod:`torchxfer.trainer` interleaves them with its
lockstep so that a group is posted by every rank or by none.

What moves, per group and per mesh-dimension group that holds a ``shard``
entry (on the trainer's own groups; ranks of other replicas of an HSDP mesh
take no part):

* ``Shard(0)`` entries, even or uneven: every rank's shard is a run of rows
  of the full tensor, so it is sent straight from the shard's memory into its
  place in the full tensor on the sender (point-to-point, all of a group's in
  one batch: one NCCL launch). No cut and no copy on the sender; each full
  tensor is its own allocation, freed as soon as the sender has packed it.
* ``Shard(d)`` entries with ``d > 0`` (TP columns): each rank packs its shards
  of the group into one flat buffer, one collective (a ``gather`` on NCCL;
  point-to-point on Gloo, whose gather copies its whole output through a
  temporary) brings them to the sender, which cuts them back into full
  tensors (one copy).

``full`` entries are gathered with ``full_tensor()`` on every rank when the
group is posted. Memory on the sender per group: the group's full tensors,
plus the column-sharded part once more while it is cut out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from .config import wait_timeout
from .errors import TransferError
from .packing import align_up
from .sources import Entry, is_dtensor, materialize, mesh_device

__all__ = ["GatherFailed", "Gatherer", "Posted", "local_tensor"]

_TAG_SPACE = 1 << 30


class GatherFailed(TransferError):
    """A collective on the trainer's own groups failed: those groups are no longer usable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, broken=True)


@dataclasses.dataclass
class _Op:
    """The gathers of one group's entries of one mesh-dimension group ``pg``, to the sender.

    ``rows``: Shard(0) entries, point-to-point messages (``sends`` on this rank,
    ``recvs`` on the sender, each ``(tensor, peer rank in pg, tag)``).
    Otherwise: column shards packed per rank (``send``, ``recv``, ``layout``).
    """

    pg: Any
    dst: int  # the sender's rank in pg
    world: int
    me: int
    entries: list[int]
    rows: bool
    p2p: bool = False  # Gloo: point-to-point (its gather copies through a flat temporary)
    tag: int = 0
    sends: list[tuple[torch.Tensor, int, int]] = dataclasses.field(default_factory=list)
    recvs: list[tuple[torch.Tensor, int, int]] = dataclasses.field(default_factory=list)
    own: dict[int, torch.Tensor] | None = None  # packed p2p, on the sender: its own pieces, by entry
    send: torch.Tensor | None = None  # packed: this rank's bytes
    recv: list[torch.Tensor] | None = None  # packed, on the sender: one tensor per rank of pg
    layout: list[tuple[int, list[int]]] | None = None  # packed: (entry, offset per rank)
    section: int = 0  # packed: bytes per rank


@dataclasses.dataclass
class Posted:
    """One group, prepared, then posted: its ops and works, and its full tensors (on the sender)."""

    index: int
    ops: list[_Op]
    full: list[int]
    works: list[Any] = dataclasses.field(default_factory=list)
    fulls: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    posted: bool = False


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
        self._members: dict[int, tuple[Any, int | None, int]] = {}
        self._tags: dict[int, int] = {}
        self.posted_groups = 0  # how many groups this rank posted (tests count them)

    def _member(self, entry: Entry) -> tuple[Any, int | None, int]:
        """(pg, the sender's rank in it or None, this rank's) for a ``shard`` entry's mesh dimension."""
        mesh = entry.tensor.device_mesh
        pg = mesh.get_group(entry.shard.mesh_dim)
        key = id(pg)
        if key not in self._members:
            ranks = dist.get_process_group_ranks(pg)
            dst = ranks.index(self.sender) if self.sender in ranks else None
            self._members[key] = (pg, dst, ranks.index(dist.get_rank()))
        return self._members[key]

    def prepare(self, g: int) -> Posted:
        """Local work of group ``g``: this rank's shards cast and placed, the sender's outputs allocated."""
        ops: dict[tuple[int, bool], _Op] = {}
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
            rows = entry.shard.dim == 0
            op = ops.get((id(pg), rows))
            if op is None:
                op = ops[(id(pg), rows)] = _Op(pg, dst, len(entry.shard.sizes), me, [], rows,
                                               p2p="gloo" in str(dist.get_backend(pg)).lower())  # fmt: skip
            op.entries.append(i)
        posted = Posted(g, list(ops.values()), full)
        with torch.no_grad():
            for op in posted.ops:
                op.tag = self._tag(op)
                if op.rows:
                    self._prepare_rows(op, posted.fulls)
                else:
                    self._prepare_packed(op)
        return posted

    def _tag(self, op: _Op) -> int:
        """The op's first tag; every member of its pg numbers its ops alike (one tag per message on Gloo)."""
        tag = self._tags.get(id(op.pg), 0)
        self._tags[id(op.pg)] = (tag + (len(op.entries) * op.world + 1 if op.rows else 1)) % _TAG_SPACE
        return tag

    def _local(self, entry: Entry, device: torch.device, me: int) -> torch.Tensor:
        """This rank's shard on ``device``, cast and contiguous; ValueError if its shape breaks the plan."""
        local = entry.tensor.to_local().detach()
        want = entry.shard.local_shape(entry.shape, me)
        if tuple(local.shape) != want:
            raise ValueError(f"{entry.source_name!r}: local shard of shape {list(local.shape)}, expected {list(want)} "
                             "(it changed since the plan was made)")  # fmt: skip
        return local.to(device=device, dtype=entry.dtype).contiguous()

    def _prepare_rows(self, op: _Op, fulls: dict[int, torch.Tensor]) -> None:
        """Shard(0): messages straight between the shards and their rows of the full tensors."""
        device = mesh_device(self.entries[op.entries[0]].tensor.device_mesh)
        mine = op.me == op.dst
        sent, copies = [False] * op.world, ([], [])
        for k, i in enumerate(op.entries):
            entry = self.entries[i]
            sizes = entry.shard.sizes
            row = entry.spec.nbytes // max(1, entry.shape[0]) if entry.shape[0] else 0
            local = self._local(entry, device, op.me)
            if mine:
                fulls[i] = torch.empty(entry.shape, dtype=entry.dtype, device=device)
                raw = fulls[i].reshape(-1).view(torch.uint8)
                start = 0
                for q, n in enumerate(sizes):
                    piece = raw[start * row : (start + n) * row]
                    start += n
                    if not n:
                        continue
                    if q == op.me:
                        copies[0].append(piece.view(entry.dtype).view(local.shape))
                        copies[1].append(local)
                    else:
                        op.recvs.append((piece, q, (op.tag + k * op.world + q) % _TAG_SPACE))
                        sent[q] = True
            elif sizes[op.me]:
                op.sends.append((local.reshape(-1).view(torch.uint8), op.dst, (op.tag + k * op.world + op.me) % _TAG_SPACE))
                sent[op.me] = True
        if copies[0]:
            torch._foreach_copy_(*copies)
        # Every member takes part in every batch, even with only empty shards in it (an NCCL batch
        # that is a communicator's first use needs every rank): one byte, then.
        last = (op.tag + len(op.entries) * op.world) % _TAG_SPACE
        if mine:
            for q in range(op.world):
                if q != op.me and not sent[q]:
                    op.recvs.append((torch.empty(1, dtype=torch.uint8, device=device), q, last))
        elif not sent[op.me]:
            op.sends.append((torch.zeros(1, dtype=torch.uint8, device=device), op.dst, last))

    def _prepare_packed(self, op: _Op) -> None:
        """Column shards: this rank's packed into one flat buffer, the sender's receive buffers."""
        device = mesh_device(self.entries[op.entries[0]].tensor.device_mesh)
        mine = op.me == op.dst
        op.layout, cursors = [], [0] * op.world
        for i in op.entries:
            entry = self.entries[i]
            offsets = []
            for q in range(op.world):
                offsets.append(cursors[q])
                cursors[q] = align_up(cursors[q] + _numel(entry.shard.local_shape(entry.shape, q)) * entry.dtype.itemsize)
            op.layout.append((i, offsets))
        op.section = max(max(cursors), 16)
        if mine:
            op.recv = list(torch.empty(op.world * op.section, dtype=torch.uint8, device=device).split(op.section))
        if mine and op.p2p:  # its own pieces are read from its shards: nothing to stage
            op.own = {i: self._local(self.entries[i], device, op.me) for i, _ in op.layout}
            return
        op.send = torch.empty(op.section, dtype=torch.uint8, device=device)
        for i, offsets in op.layout:
            entry = self.entries[i]
            local = self._local(entry, device, op.me)
            if local.numel():
                nbytes = local.numel() * entry.dtype.itemsize
                op.send[offsets[op.me] : offsets[op.me] + nbytes].view(entry.dtype).view(local.shape).copy_(local)

    def post(self, posted: Posted) -> None:
        """Post the group's gathers (asynchronous), then its ``full`` entries' ``full_tensor()`` (blocking)."""
        posted.posted = True
        self.posted_groups += 1
        try:
            for op in posted.ops:
                if op.rows:
                    posted.works += self._post_messages(op)
                elif not op.p2p:
                    posted.works.append(dist.gather(op.send, op.recv, group=op.pg, group_dst=op.dst, async_op=True))
                elif op.me != op.dst:
                    posted.works.append(dist.isend(op.send, group=op.pg, group_dst=op.dst, tag=op.tag))
                else:
                    for q in range(op.world):
                        if q != op.me and op.recv[q].numel():
                            posted.works.append(dist.irecv(op.recv[q], group=op.pg, group_src=q, tag=op.tag))
            for i in posted.full:
                full = materialize(self.entries[i])
                if self.is_sender:
                    posted.fulls[i] = full
                del full
        except Exception as e:
            raise GatherFailed(f"gathering group {posted.index} of send_model failed on trainer rank "
                               f"{dist.get_rank()}: {type(e).__name__}: {e}") from e  # fmt: skip

    @staticmethod
    def _post_messages(op: _Op) -> list[Any]:
        """A rows op's messages: one batch (one NCCL launch), or tagged sends and receives on Gloo."""
        p2p = [dist.P2POp(dist.isend, t, group=op.pg, group_peer=peer, tag=tag) for t, peer, tag in op.sends]
        p2p += [dist.P2POp(dist.irecv, t, group=op.pg, group_peer=peer, tag=tag) for t, peer, tag in op.recvs]
        if not p2p:
            return []
        if op.p2p:
            return [w for w in (o.op(o.tensor, group=op.pg, tag=o.tag, **{("group_dst" if o.op is dist.isend else
                                                                            "group_src"): o.group_peer})
                                 for o in p2p) if w is not None]  # fmt: skip
        return [w for w in dist.batch_isend_irecv(p2p) if w is not None]

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
                    if not op.rows:
                        self._cut(op, fulls)
        for op in posted.ops:
            op.sends, op.recvs = [], []
        posted.ops, posted.fulls = [], {}
        return fulls if self.is_sender else {}

    def _cut(self, op: _Op, fulls: dict[int, torch.Tensor]) -> None:
        """The packed op's full tensors, out of every rank's section."""
        for i, offsets in op.layout:
            entry = self.entries[i]
            pieces = []
            for q in range(op.world):
                shape = entry.shard.local_shape(entry.shape, q)
                if op.own is not None and q == op.me:
                    pieces.append(op.own[i])
                    continue
                raw = op.recv[q][offsets[q] : offsets[q] + _numel(shape) * entry.dtype.itemsize]
                pieces.append(raw.view(entry.dtype).view(shape))
            fulls[i] = torch.cat(pieces, dim=entry.shard.dim)
        op.recv = op.own = None


def local_tensor(entry: Entry) -> torch.Tensor:
    """A ``local`` entry's tensor, cast (no collective)."""
    with torch.no_grad():
        if is_dtensor(entry.tensor):
            return entry.tensor.to_local().detach().to(entry.dtype)
        return entry.tensor.detach().to(entry.dtype)
