"""Rank 0's payload: the tensor in hand, pack copies into the send buffers, the broadcasts
that read them, and when each buffer may be written again.

:class:`Outbox` is the payload half of :class:`torchxfer.sender.Sender`, which drives the
protocol steps (rows, tables, the order of buckets) and calls these methods as it pulls
and posts each bucket. Nothing here reads or writes a control row; every CPU wait is
bounded by the group's ``timeout_s`` (``SideGroup.wait``). On CUDA, a buffer is reused
behind the sends that read it, ordered on the current stream, not waited for.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

from . import control
from .errors import TransferError
from .group import SideGroup
from .packing import ConcatPlan, Slot, concat_plan, slot_view, tensor_bytes, typed_view
from .plan import BucketPlan

__all__ = ["Outbox"]


class Outbox:
    """The payload state of one update on rank 0 and the methods that move it.

    Expects of the class it is mixed into: ``group``, ``state`` (its ``SenderState``:
    the group's send buffers), ``what``, ``buffer_size`` (None: unpacked),
    ``num_buffers``, ``device``, ``checksum``, ``zero_copy`` and ``num_tensors``.
    """

    group: SideGroup
    what: str
    buffer_size: int | None
    num_buffers: int
    device: torch.device | None
    checksum: bool
    zero_copy: bool
    num_tensors: int

    def __init__(self, num_buffers: int) -> None:
        # send_model, when its plan is exactly the cached layout: its gathers may land in the buffers
        # themselves (bucket_views), and a pack copy of a tensor onto itself is skipped.
        self.prefill = False
        # send_model under peer reads: ``ready(bucket, positions)`` issues the copies that fill those
        # slots of the bucket's buffer, called just before the group of broadcasts that reads them, so
        # each group waits only for its own copies; ``ready(None, None)``: every copy now, none deferred.
        self.ready: Callable[[int | None, list[int] | None], None] | None = None
        # ... and told after each of those groups is posted (False), and once more when the
        # bucket is all posted and announced (True).
        self.posted: Callable[[bool], None] | None = None
        # Payload works not yet let go, by id, in posting order (a work holds its tensor: see release_sent).
        self.works: dict[int, Any] = {}
        self.buffer_works: list[list[Any]] = [[] for _ in range(num_buffers)]
        self.sent_alone: collections.deque[tuple[int, Any]] = collections.deque()  # (bucket, work)
        self.run_sums: dict[int, int] = {}  # checksums of the slots that travel alone, by position
        self.stable = False  # the tensor in hand is the very object sent there last update
        self.in_hand: torch.Tensor | None = None
        self.in_hand_bytes: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # pack copies not yet issued
        self.deferred: dict[int, torch.Tensor | None] = {}  # slots held to travel alone (hold_own)
        self.lazy: dict[int, torch.Tensor] = {}  # slots sent from a bulk bucket's tensors (bulk_bucket)
        self.bulk_copies: tuple[list, list] | None = None

    # -- the tensor in hand -------------------------------------------------------------------

    def take(self, tensor: torch.Tensor, copy: bool = False) -> None:
        """Hold the next tensor (with a private copy of its bytes if it must outlive the next pull)."""
        if self.device is None:
            self.device = tensor.device
        self.num_tensors += 1
        self.in_hand = tensor
        self.in_hand_bytes = None
        if copy:
            self.in_hand_bytes = tensor_bytes(tensor).to(self.device, copy=True)

    def bytes_in_hand(self) -> torch.Tensor:
        if self.in_hand_bytes is None:
            self.in_hand_bytes = tensor_bytes(self.in_hand)
        return self.in_hand_bytes

    def hold_own(self, pos: int, slot: Slot) -> None:
        """A slot that travels alone, posted after the bucket's row: straight from the tensor's
        memory when the tensor is stable, else copied now (packed, or a private copy)."""
        tensor = self.in_hand
        if self.in_hand_bytes is None and self.stable and self.in_place(tensor):
            self.deferred[pos] = self.bytes_in_hand()[slot.start : slot.start + slot.length]
        elif self.buffer_size is None:
            self.deferred[pos] = self.in_hand_bytes if self.in_hand_bytes is not None else \
                tensor_bytes(tensor).to(self.device, copy=True)  # fmt: skip
        else:
            self.pack(slot)
            self.deferred[pos] = None  # from the buffer
        if self.checksum and self.deferred[pos] is not None:
            self.settle_stream()
            self.run_sums[pos] = control.checksum(self.deferred[pos])

    def settle_stream(self) -> None:
        """Before the checksum reads a result on the CPU: on NCCL the current stream may wait
        for this update's broadcasts (``free_buffer``, ``release_sent``), and a CPU read there
        would wait for them without bound if a worker died. Wait for them first, each polled
        against ``timeout_s``: a dead peer is then a TransferError, not a hang."""
        if self.stream_ordered and self.works:
            self.group.wait_all(list(self.works.values()), f"payload broadcast of {self.what}", data=True)

    def in_place(self, tensor: torch.Tensor) -> bool:
        """Whether a stable tensor that travels alone is broadcast straight from its memory."""
        return (self.zero_copy and tensor.device == self.device and tensor.is_contiguous()
                and not tensor.is_conj() and not tensor.is_neg())  # fmt: skip

    # -- buffers and pack copies --------------------------------------------------------------

    def packed_buffer(self, plan: BucketPlan, memo: dict) -> torch.Tensor | None:
        """The bucket's buffer, grown to its packed slots and free of older sends (None: unpacked)."""
        if self.buffer_size is None:
            return None
        extent = memo.get("packed_extent")
        if extent is None:
            own = {p for _, _, p in plan.runs if p is not None}
            extent = memo["packed_extent"] = max((s.end for p, s in enumerate(plan.slots) if p not in own), default=0)
        return self.free_buffer(plan.index, extent) if extent else self.free_buffer(plan.index, 0)

    def free_buffer(self, bucket: int, nbytes: int, also: Any = None) -> torch.Tensor:
        """Buffer ``bucket % num_buffers``, once the sends that read it are done (ordered, not waited
        on CUDA: on the current stream, and on stream ``also`` if given)."""
        b = bucket % self.num_buffers
        for work in self.buffer_works[b]:
            self.after(work)
            if also is not None and self.stream_ordered:
                with torch.cuda.stream(also):
                    work.wait()
        self.buffer_works[b] = []
        return self.state.buffer(self.device, self.buffer_size, self.num_buffers, b, nbytes, keep=0)

    def bucket_views(self, index: int, also: Any = None) -> list[Any] | None:
        """With ``prefill``: :meth:`SenderState.prefilled_views` of bucket ``index``, the buffer
        freed of this update's older sends first (ordered on CUDA, on the current stream and
        on stream ``also`` if given; waited for otherwise): whatever is written there before
        the bucket is packed goes out as it is. None when the buffer is not that bucket's yet."""
        if not self.prefill or self.device is None:
            return None
        views = self.state.prefilled_views(index, self.device, self.buffer_size, self.num_buffers)
        if views is not None:
            self.free_buffer(index, 0, also)
        return views

    def posting_runs(self, index: int) -> list[list[int]] | None:
        """With ``prefill``: :meth:`SenderState.posting_runs`; None otherwise."""
        return self.state.posting_runs(index) if self.prefill else None

    @staticmethod
    def aliased(dst: torch.Tensor, src: torch.Tensor) -> bool:
        """Whether copying ``src`` into ``dst`` would copy a tensor onto itself."""
        return (dst.data_ptr() == src.data_ptr() and dst.dtype == src.dtype and dst.shape == src.shape
                and dst.stride() == src.stride())  # fmt: skip

    def fused_copy(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """One multi-tensor copy; with ``prefill``, without the pairs already in place."""
        if self.prefill:
            pairs = [(d, t) for d, t in zip(dst, src) if not self.aliased(d, t)]
            dst, src = [d for d, _ in pairs], [t for _, t in pairs]
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)

    def pack(self, slot: Slot) -> torch.Tensor | None:
        """Copy one slot of the tensor in hand into its bucket's buffer (growing it if needed);
        returns the typed view of the buffer it copied into, for a whole tensor copied from
        its own memory."""
        self.flush()
        b = slot.bucket % self.num_buffers
        have = self.state.buffers[b].numel() if self.state.buffer_key == (self.device, self.buffer_size) else 0
        buf = self.state.buffer(self.device, self.buffer_size, self.num_buffers, b, slot.end, keep=min(have, slot.offset))
        dst = slot_view(buf, slot)
        with torch.no_grad():
            if slot.is_whole and self.in_hand_bytes is None:
                view = typed_view(dst, slot.spec)
                if not (self.prefill and self.aliased(view, self.in_hand)):
                    view.copy_(self.in_hand, non_blocking=True)
                return view
            dst.copy_(self.bytes_in_hand()[slot.start : slot.start + slot.length], non_blocking=True)
        return None

    def flush(self) -> None:
        """Issue the batched pack copies as one fused multi-tensor copy."""
        if self.pending:
            self.fused_copy([d for d, _ in self.pending], [s for _, s in self.pending])
            self.pending.clear()

    def unready(self) -> None:
        """Every copy that ``ready`` would issue, now, and none deferred from here on."""
        if self.ready is not None:
            ready, self.ready, self.posted = self.ready, None, None
            ready(None, None)

    def pack_bulk(self, plan: BucketPlan, key: int, group: list[int], views: list[Any], tensors: list[torch.Tensor]) -> None:
        """Pack the whole tensors at positions ``group`` of a bulk bucket into their views:
        runs of alike tensors back to back in the buffer by one ``torch.cat`` each, the rest
        by one multi-tensor copy (``packing.concat_plan``, made once per buffer and ``key``).
        With ``prefill`` (some tensors may already be their views) by ``fused_copy`` alone."""
        if self.prefill:
            if group[-1] - group[0] + 1 == len(group):  # consecutive slots: slices, not per-tensor lists
                self.fused_copy(views[group[0] : group[-1] + 1], tensors[group[0] : group[-1] + 1])
            else:
                self.fused_copy([views[p] for p in group], [tensors[p] for p in group])
            return
        self.concat_for(plan, key, group).pack(tensors)

    def concat_for(self, plan: BucketPlan, key: int, group: list[int]) -> ConcatPlan:
        """``packing.concat_plan`` of the whole tensors at positions ``group`` of the bucket,
        made once per buffer and ``key`` (a packed run's index, or -1 for the whole bucket)."""
        memo = plan.cache["sender"].setdefault("concat", {})
        buf = self.state.buffers[plan.index % self.num_buffers]
        made = memo.get(key)
        if made is None or made[0] != buf.data_ptr():
            made = memo[key] = (buf.data_ptr(), concat_plan(buf, plan.slots, group, plan.cache["sender"].get("views")))
        return made[1]

    @staticmethod
    def run_groups(plan: BucketPlan) -> list[list[int]]:
        """For each packed run of the bucket, in order, the positions of the slots it carries."""
        memo = plan.cache.setdefault("sender", {})
        groups = memo.get("run_groups")
        if groups is None:
            own = {p for _, _, p in plan.runs if p is not None}
            groups = memo["run_groups"] = [
                [p for p, s in enumerate(plan.slots) if p not in own and s.length and start <= s.offset < end]
                for start, end, pos in plan.runs if pos is None
            ]  # fmt: skip
        return groups

    def bucket_checksum(self, plan: BucketPlan, kept: int, unpacked: dict[int, torch.Tensor]) -> int:
        """The bucket's checksum (0 when off): each run's, weighted by its place among the runs."""
        if not self.checksum:
            return 0
        self.unready()
        self.flush()
        self.settle_stream()
        buf = self.state.buffers[plan.index % self.num_buffers] if self.buffer_size is not None else None
        total = 0
        for i, (start, end, pos) in enumerate(plan.runs):
            if pos is not None and pos in self.run_sums:
                part = self.run_sums[pos]
            else:
                part = control.checksum(buf[start:end] if buf is not None else unpacked[pos])
            total = (total + part * (i + 1)) % (1 << 61)
        return total

    # -- broadcasts ---------------------------------------------------------------------------

    def post_runs(self, plan: BucketPlan, unpacked: dict[int, torch.Tensor] | None = None) -> None:
        """Post the bucket's runs, group by group (``plan.groups``), each group once the copies
        it reads are issued: a slot held to travel alone (``hold_own``) from where it was held;
        another slot that travels alone from the buffer it was packed into (unpacked: from
        ``unpacked``); a packed run behind its pack copies. A bucket packed in bulk is copied
        run by run here, each just before the group that reads it: a group waits only for the
        copies issued before it, so it travels while the next ones are packed."""
        buf = self.state.buffers[plan.index % self.num_buffers] if self.buffer_size is not None else None
        copies, self.bulk_copies = self.bulk_copies, None
        groups = self.run_groups(plan) if copies is not None or self.ready is not None else None
        packed = 0
        for first, last in plan.groups:
            srcs: list[torch.Tensor] = []
            from_buffer: list[bool] = []
            positions: list[int] = []  # the slots this group reads, for ``ready``
            for start, end, pos in plan.runs[first:last]:
                src = None
                if pos is None:
                    if copies is not None and groups[packed]:
                        self.pack_bulk(plan, packed, groups[packed], *copies)
                    if groups is not None:
                        positions += groups[packed]
                    packed += 1
                elif pos in self.deferred:
                    positions.append(pos)
                    src = self.deferred[pos]
                elif pos in self.lazy:  # a whole tensor of a bulk bucket (bulk_bucket)
                    positions.append(pos)
                    src = self.lazy[pos].detach().reshape(-1).view(torch.uint8)
                elif buf is None:
                    src = unpacked[pos]
                srcs.append(buf[start:end] if src is None else src)
                from_buffer.append(src is None)
            if self.ready is not None:
                self.ready(plan.index, positions)
            self.post(srcs, plan.index, from_buffer)
            if self.posted is not None:
                self.posted(False)
        self.deferred, self.lazy = {}, {}

    def post(self, srcs: list[torch.Tensor], bucket: int, from_buffer: list[bool], buffer: int | None = None) -> None:
        """Post one group of payload broadcasts from rank 0 (``SideGroup.broadcast_group``);
        ``from_buffer[i]``: whether ``srcs[i]`` lies in the bucket's buffer (or in send buffer
        ``buffer``, if given). Its works are kept until the update drains, or, where they read a
        tensor sent alone, until they are let go (``release_sent``); a work that reads a buffer
        also frees it (``free_buffer``)."""
        if not all(from_buffer):
            self.release_sent(bucket)
        try:
            works = self.group.broadcast_group(srcs)
        except Exception as e:
            self.group.mark_broken(f"payload broadcast: {e}")
            raise TransferError(f"payload broadcast of {self.what} failed: {e}", broken=True) from e
        # One work per broadcast, or one for the whole group (NCCL), which then reads both kinds.
        tagged = zip(works, from_buffer) if len(works) == len(srcs) else [(works[0], b) for b in set(from_buffer)]
        b = bucket % self.num_buffers if buffer is None else buffer
        for work, buffered in tagged:
            self.works[id(work)] = work
            if buffered:
                self.buffer_works[b].append(work)
            else:
                self.sent_alone.append((bucket, work))

    def release_sent(self, bucket: int) -> None:
        """Before a send of bucket ``bucket`` from outside the buffers: let go of the tensors sent
        alone in buckets ``num_buffers`` or more before it (ordered after those sends on CUDA,
        waited for, bounded, on the CPU), and drop them from the works the update drains. On
        NCCL a payload work holds its tensor until it is waited (the allocator's stash) and for
        as long as it is referenced (its outputs), so without this an update would hold every
        private copy it made (unpacked tensors, tensors that must outlive the next pull) until
        it drains: as much memory as the model. The last work posted is kept either way: on
        NCCL's one stream, waiting for it at the end waits for every earlier one."""
        while self.sent_alone and self.sent_alone[0][0] <= bucket - self.num_buffers:
            work = self.sent_alone.popleft()[1]
            self.after(work)
            if not self.stream_ordered or next(reversed(self.works), None) != id(work):
                self.works.pop(id(work), None)  # on NCCL the last posted work stays: drain polls it

    @property
    def stream_ordered(self) -> bool:
        """Whether payload work can be ordered on a CUDA stream rather than waited for on the CPU."""
        return self.group.backend_name == "nccl"

    def after(self, work: Any) -> None:
        """Order what follows after ``work``: on CUDA on the current stream; on the CPU by waiting (bounded)."""
        if self.stream_ordered:
            work.wait()
        else:
            self.group.wait(work, f"payload broadcast of {self.what}", data=True)

    def drain(self, quiet: bool = False) -> None:
        """Wait (bounded) until every payload broadcast of this update completed."""
        works, self.works = list(self.works.values()), {}
        alone = [work for _, work in self.sent_alone]
        self.sent_alone.clear()
        if self.stream_ordered and works:
            # One NCCL stream: the last posted completes after every earlier one. Of the others only
            # the sends of tensors held alone are waited as well, which lets NCCL drop those tensors
            # now; the buffers' sends hold nothing that needs freeing.
            works = [*alone, works[-1]]
        try:
            self.group.wait_all(works, f"payload broadcast of {self.what}", data=True)
        except TransferError:
            if not quiet:
                raise
