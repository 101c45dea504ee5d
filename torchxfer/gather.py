"""Gathers of a plan's sharded tensors, one bucket group at a time, to the sending rank.

Every trainer rank makes the same calls, in the same order, for the same
groups (:func:`torchxfer.sources.gather_groups`): :meth:`Gatherer.prepare`
(local only: casts and copies of this rank's shards, allocations; any failure
here happens before this rank posts a collective), :meth:`Gatherer.post` (the
collectives, asynchronous) and :meth:`Gatherer.collect` (wait; on the sender,
the full tensors). :mod:`torchxfer.trainer` interleaves them with its
lockstep so that a group is posted by every rank or by none.

What moves, per group and per mesh-dimension group that holds a ``shard``
entry (each a ``torch.distributed.gather`` to the sender on NCCL, or
point-to-point sends to it on Gloo, whose gather copies its whole output
through a temporary; on the trainer's own groups; ranks of other replicas of
an HSDP mesh take no part):

* a ``Shard(0)`` tensor that splits evenly and has at least
  :data:`DIRECT_MIN_BYTES` bytes is gathered straight into its full tensor
  (its rows are its shards, in order): no copy on the sender;
* every other ``shard`` entry of the group (``Shard(d)``, uneven, small) is
  packed with its peers into one flat buffer per rank, gathered in one
  collective, and cut back into full tensors on the sender (one copy).

``full`` entries are gathered with ``full_tensor()`` on every rank when the
group is posted. Memory on the sender per group: the group's full tensors,
plus the packed part once more while it is cut out.
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

__all__ = ["DIRECT_MIN_BYTES", "GatherFailed", "Gatherer", "Posted", "local_tensor"]

DIRECT_MIN_BYTES = 1 << 20
"""An evenly split Shard(0) tensor of at least this many bytes is gathered by a
collective of its own, straight into its full tensor; smaller ones share their
group's packed gather (one collective costs about as much as a few hundred
kilobytes of copying)."""


class GatherFailed(TransferError):
    """A collective on the trainer's own groups failed: those groups are no longer usable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, broken=True)


@dataclasses.dataclass
class _Op:
    """One gather to the sender: entries of one mesh-dimension group."""

    pg: Any
    dst: int  # the sender's rank in pg
    world: int
    me: int
    entries: list[int]
    direct: bool  # one tensor, gathered straight into its full tensor
    p2p: bool = False  # Gloo: point-to-point sends to the sender (its gather copies through a flat temporary)
    tag: int = 0
    own: dict[int, torch.Tensor] | None = None  # p2p, on the sender: its own pieces, by entry
    send: torch.Tensor | None = None  # this rank's bytes (the shard, or the packed shards)
    recv: list[torch.Tensor] | None = None  # on the sender: one tensor per rank of pg
    full: torch.Tensor | None = None  # direct, on the sender
    layout: list[tuple[int, list[int]]] | None = None  # packed: (entry, offset per rank)
    section: int = 0  # packed: bytes per rank


@dataclasses.dataclass
class Posted:
    """One group, prepared, then posted: its ops and works, and its ``full`` tensors."""

    index: int
    ops: list[_Op]
    full: list[int]
    works: list[Any] = dataclasses.field(default_factory=list)
    fulls: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    posted: bool = False


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
        """Local work of group ``g``: this rank's shards cast and copied, the sender's outputs allocated."""
        ops: list[_Op] = []
        packed: dict[int, _Op] = {}
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
            world = len(entry.shard.sizes)
            nbytes = entry.spec.nbytes
            if entry.shard.dim == 0 and entry.shard.even and nbytes >= DIRECT_MIN_BYTES:
                ops.append(self._op(pg, dst, world, me, [i], direct=True))
                continue
            op = packed.get(id(pg))
            if op is None:
                op = packed[id(pg)] = self._op(pg, dst, world, me, [], direct=False)
                ops.append(op)
            op.entries.append(i)
        with torch.no_grad():
            for op in ops:
                self._prepare_op(op)
        return Posted(g, ops, full)

    def _op(self, pg: Any, dst: int, world: int, me: int, entries: list[int], direct: bool) -> _Op:
        """A new op; every member of ``pg`` numbers its ops alike (the tags of point-to-point sends)."""
        tag = self._tags.get(id(pg), 0)
        self._tags[id(pg)] = tag + 1
        p2p = "gloo" in str(dist.get_backend(pg)).lower()
        return _Op(pg, dst, world, me, entries, direct, p2p=p2p, tag=tag % (1 << 30))

    def _local(self, entry: Entry, device: torch.device) -> torch.Tensor:
        local = entry.tensor.to_local().detach()
        return local.to(device=device, dtype=entry.dtype)

    def _prepare_op(self, op: _Op) -> None:
        first = self.entries[op.entries[0]]
        device = mesh_device(first.tensor.device_mesh)
        mine = op.me == op.dst
        if op.direct:
            if mine:
                op.full = torch.empty(first.shape, dtype=first.dtype, device=device)
                op.recv = list(op.full.chunk(op.world, dim=0))
            if mine and op.p2p:
                op.recv[op.me].copy_(first.tensor.to_local().detach())
            else:
                op.send = self._local(first, device).contiguous()
            return
        op.layout, cursors = [], [0] * op.world
        for i in op.entries:
            entry = self.entries[i]
            itemsize = entry.dtype.itemsize
            offsets = []
            for q in range(op.world):
                offsets.append(cursors[q])
                n = 1
                for d in entry.shard.local_shape(entry.shape, q):
                    n *= d
                cursors[q] = align_up(cursors[q] + n * itemsize)
            op.layout.append((i, offsets))
        op.section = max(max(cursors), 16)
        if mine:
            op.recv = list(torch.empty(op.world * op.section, dtype=torch.uint8, device=device).split(op.section))
        if mine and op.p2p:  # its own pieces are read from its shards: nothing to stage
            op.own = {i: self._local(self.entries[i], device) for i, _ in op.layout}
            return
        op.send = torch.empty(op.section, dtype=torch.uint8, device=device)
        for i, offsets in op.layout:
            entry = self.entries[i]
            local = entry.tensor.to_local().detach()
            if local.numel():
                nbytes = local.numel() * entry.dtype.itemsize
                dst = op.send[offsets[op.me] : offsets[op.me] + nbytes].view(entry.dtype).view(local.shape)
                dst.copy_(local, non_blocking=True)

    def post(self, posted: Posted) -> None:
        """Post group's gathers (asynchronous), then its ``full`` entries' ``full_tensor()`` (blocking)."""
        posted.posted = True
        self.posted_groups += 1
        try:
            for op in posted.ops:
                if not op.p2p:
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
                    if op.direct:
                        fulls[op.entries[0]] = op.full
                    else:
                        self._cut(op, fulls)
        posted.ops, posted.fulls = [], {}
        return fulls

    def _cut(self, op: _Op, fulls: dict[int, torch.Tensor]) -> None:
        """The packed op's full tensors, out of every rank's section."""
        for i, offsets in op.layout:
            entry = self.entries[i]
            pieces = []
            for q in range(op.world):
                shape = entry.shard.local_shape(entry.shape, q)
                n = 1
                for d in shape:
                    n *= d
                if op.own is not None and q == op.me:
                    pieces.append(op.own[i])
                    continue
                raw = op.recv[q][offsets[q] : offsets[q] + n * entry.dtype.itemsize]
                pieces.append(raw.view(entry.dtype).view(shape))
            fulls[i] = torch.cat(pieces, dim=entry.shard.dim)
        op.recv = op.own = None


def local_tensor(entry: Entry) -> torch.Tensor:
    """A ``local`` entry's tensor, cast (no collective)."""
    with torch.no_grad():
        if is_dtensor(entry.tensor):
            return entry.tensor.to_local().detach().to(entry.dtype)
        return entry.tensor.detach().to(entry.dtype)

