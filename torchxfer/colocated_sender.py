"""The trainer's half of a colocated update: pack each bucket into a shared buffer, post its row.

Steps and rows: see :mod:`torchxfer.colocated`. Buffer ``b`` is packed again
only once every worker's row says it released the bucket that last used it
(the trainer reads the rows of the steps it posted, oldest first, and posts
a SYNC step only when none is pending). On CUDA the pack then waits for each
worker's release event on the current stream (no CPU wait) and records the
buffer's event, which workers wait for before reading.

Sources: each tensor is packed before the next one is pulled, so a generator
may refill one staging tensor; a bucket whose tensors are all the very
objects sent there last update (a module's parameters) is pulled and packed
in one fused copy (on CUDA, for a bucket of many tensors, a replayed CUDA
graph of that copy: :func:`pack_replayed`). Every wait is bounded by the
group's ``timeout_s``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .colocated import BACKEND, DIRECT_ENV, DIRECT_OK_KEY, FLAG_SHARE, MAX_IPC_FRAME, colocated_device, encode_frame, gather_blobs
from .config import TransferStats, env_flag
from .control import ControlChannel, Step, encode_message
from .errors import TransferError
from .group import SideGroup
from .ipc_transport import SharedBuffers, open_events, same_shared, shared_segment
from .loading import ALONE_BYTES
from .packing import ConcatPlan, Planner, Slot, TensorSpec, concat_plan, slot_view, tensor_bytes, typed_view
from .peer_reads import PeerReadsUnavailable, allocation_id, capture_graph, ipc_handle, locate
from .plan import BucketPlan, Layout, NewNames
from .pulling import SourceFailed, gc_paused, pairs, pull_bucket, pull_same, then_raise
from .sender import SendSide
from .wire import FLAG_CACHED, FLAG_PACKED, MAX_FRAME_BYTES, Kind, Row, make_row

__all__ = ["ColocatedSender"]

log = logging.getLogger("torchxfer")

Item = tuple[str, torch.Tensor]


class _State:
    """What rank 0 keeps per colocated group: buffers, workers' events, last layout, next update id."""

    def __init__(self, group: SideGroup) -> None:
        self.control = ControlChannel(group)
        self.device = colocated_device(group)
        self.buffers: SharedBuffers | None = None
        self.buffers_id = 0
        self.worker_events: list[list[Any]] = []
        self.layout: Layout | None = None
        self.confirmed = 0  # the fingerprint every worker said it holds at the last END
        self.next_update_id = 0
        self.direct_gen = 0  # the last direct-read map made (see ColocatedSender.direct_for)
        self.direct_epoch = 0  # bumped by every failed update: maps are sent again after one
        self.direct_off: str | None = None  # why direct reads are off for this group

    @staticmethod
    def of(group: SideGroup) -> _State:
        state = group.cache.get("colocated_sender")
        if state is None:
            state = group.cache["colocated_sender"] = _State(group)
        return state


class ColocatedSender(SendSide):
    """Sends one update from rank 0 of a colocated group. One instance per update."""

    def __init__(self, group: SideGroup, *, buffer_size: int, num_buffers: int, version: int | None,
                 num_tensors: int | None) -> None:  # fmt: skip
        self.group = group
        self.state = _State.of(group)
        self.control = self.state.control
        self.device = self.state.device
        self.buffer_size, self.num_buffers = buffer_size, num_buffers
        self.hint = -1 if num_tensors is None else num_tensors
        self.update_id = self.state.next_update_id if version is None else version
        self.state.next_update_id = self.update_id + 1
        self.what = f"update {self.update_id}"
        self.layout = Layout(True, buffer_size, num_buffers, BACKEND)
        self.steps: collections.deque[Step] = collections.deque()
        self.released = 0  # buckets of this update every worker released
        self.failed = False
        self.num_tensors = 0
        self.bucket = 0
        # Direct reads this update (see direct_for): decided once, from the switch and the group's state.
        self.direct_on = self.state.direct_off is None and env_flag(DIRECT_ENV, False)
        if self.direct_on and not group.cache.get(DIRECT_OK_KEY, False):
            self.direct_on = False
            self.state.direct_off = "a worker did not consent at the handshake"
            log.info("colocated: %s=1 on the trainer, but not on every worker at its init: "
                     "every tensor is packed for this group", DIRECT_ENV)  # fmt: skip
        self.direct_row: tuple[int, bytes] = (0, b"")  # the next BUCKET row's direct-read map: (generation, frame)
        self.direct_held: list[torch.Tensor] = []  # tensors workers read in place this update

    # -- the update ------------------------------------------------------------------------------

    def run(self, items: Iterable[Any], post_iter_func: Callable | None) -> TransferStats:
        """The update, with the cyclic garbage collector paused (``sender.gc_paused``)."""
        ok = False
        try:
            with gc_paused():
                stats = self._run(items, post_iter_func)
            ok = True
            return stats
        finally:
            if not ok:
                self.state.direct_epoch += 1  # a worker may have missed a map: send them all again
            if self.direct_held:
                self.release_direct()

    def _run(self, items: Iterable[Any], post_iter_func: Callable | None) -> TransferStats:
        start = time.perf_counter()
        cached = self.begin()
        try:
            # Untransformed pairs: a cached bucket is pulled straight from the caller's iterator
            # (``pull_bucket``), the others through ``pairs``, which checks each pair as pulled.
            self.raw = None
            if post_iter_func is None:
                try:
                    items = self.raw = iter(items)
                except Exception as e:
                    raise SourceFailed(e) from e
            self.send(pairs(items, post_iter_func), cached)
        except SourceFailed as e:
            self.abort(f"the trainer aborted {self.what}: {type(e.original).__name__}: {e.original}")
            raise e.original from None
        except TransferError:
            raise
        except Exception as e:
            self.abort(f"the trainer failed during {self.what}: {type(e).__name__}: {e}")
            raise
        self.end()
        seconds = time.perf_counter() - start
        log.debug("sent %s (colocated): %d tensors, %d bytes in %.4f s (%.2f GB/s)", self.what, self.num_tensors,
                  self.layout.num_bytes, seconds, self.layout.num_bytes / max(seconds, 1e-9) / 1e9)  # fmt: skip
        return TransferStats(self.update_id, self.num_tensors, self.layout.num_bytes, seconds)

    def begin(self) -> Layout | None:
        """BEGIN step (and SHARE when the buffers are new); returns the cached layout if every worker holds it."""
        state = self.state
        buffers = state.buffers
        share = buffers is None or (buffers.nbytes, len(buffers.tensors)) != (self.buffer_size, self.num_buffers)
        frame = b""
        if share:
            state.buffers = buffers = None  # the old ones go first
            state.worker_events = []
            buffers = SharedBuffers(self.device, self.buffer_size, self.num_buffers)
            state.buffers_id = random.getrandbits(62) or 1
            frame = encode_frame({**buffers.describe(), "id": state.buffers_id})
        old = state.layout
        fingerprint = old.fingerprint if old is not None and old.config == self.layout.config else 0
        # Every worker said at the last END that it holds this layout, on these buffers: the
        # trainer announces it and packs bucket 0 at once; the BEGIN rows are read late.
        confirmed = not share and fingerprint != 0 and state.confirmed == fingerprint
        flags = FLAG_PACKED | (FLAG_SHARE if share else 0) | (FLAG_CACHED if confirmed else 0)
        row = make_row(Kind.BEGIN, self.update_id, flags, self.buffer_size, self.num_buffers, fingerprint, self.hint,
                       len(frame), state.buffers_id)  # fmt: skip
        if confirmed:
            self.begin_step = self.post(row, f"{self.what} (begin)")
            self.any_atomic = None  # from the BEGIN rows, at END
            return old
        try:
            rows = self.control.post(row, f"{self.what} (begin)").rows()
            self.control.settle(rows, b"", f"{self.what} (begin)")
            self.any_atomic = any(r.args[3] for r in rows[1:])
            if share:
                self.share(buffers, frame)
        finally:
            if buffers is not None:
                buffers.seal()
        if fingerprint and all(r.args[1] == fingerprint and r.args[2] for r in rows[1:]):
            return old
        return None

    def share(self, buffers: SharedBuffers, frame: bytes) -> None:
        """The buffers' description, the workers' release events (CUDA), then a SYNC step: all mapped them."""
        self.control.send_frame(frame, f"{self.what} (share buffers)")
        if self.device.type == "cuda":
            blobs = gather_blobs(self.group, b"", 64 * self.num_buffers, f"{self.what} (release events)")
            try:
                self.state.worker_events = [open_events(self.device, blob, self.num_buffers) for blob in blobs[1:]]
            except TransferError as e:  # the workers wait in the step below: they learn of it by its timeout
                self.group.mark_broken(str(e))
                raise TransferError(str(e), broken=True) from None
        rows = self.control.post(make_row(Kind.SYNC), f"{self.what} (share buffers)").rows()
        self.control.settle(rows, b"", f"{self.what} (share buffers)")
        self.state.buffers = buffers

    def send(self, source: Iterator[Item], cached: Layout | None) -> None:
        """Every bucket: the cached layout's while the tensors match it, then tables."""
        self.cached = cached
        self.diverged = cached is None
        self.new_names = NewNames()
        planner = Planner(self.buffer_size)
        queue: collections.deque[Slot] = collections.deque()
        slots: list[Slot] = []
        refs: list[Any] = []
        views: list[Any] = []  # per slot, the typed view of the buffer it was packed into (whole tensors)
        in_hand: torch.Tensor | None = None
        raw: torch.Tensor | None = None
        item = next(source, None)
        index = 0
        tried = -1  # the bucket whose bulk pull failed (its items are replayed one by one)
        while True:
            if (not queue and not slots and item is not None and not self.diverged
                    and tried != self.bucket and self.bucket < len(cached.buckets)):  # fmt: skip
                tried = self.bucket
                done, item, source = self.bulk(cached.buckets[self.bucket], item, source)
                if done:
                    plan = cached.buckets[self.bucket]
                    planner.resume(self.bucket, plan.slots[-1].end, len(plan.slots))
                    index += len(plan.slots)
                    self.close(list(plan.slots), item is None, None, None)
                    continue
            if not queue:
                if item is None:
                    if slots:
                        self.close(slots, True, refs, views)
                    return
                try:
                    spec = TensorSpec.of(*item)
                except ValueError as e:
                    raise SourceFailed(e) from e
                queue.extend(planner.add(index, spec))
                in_hand, raw = item[1], None
                index += 1
                self.num_tensors += 1
                item = None
            slot = queue[0]
            if slot.bucket != self.bucket:
                self.close(slots, False, refs, views)
                slots, refs, views = [], [], []
            if not slots:
                self.acquire(self.bucket)
            queue.popleft()
            slots.append(slot)
            refs.append(weakref.ref(in_hand) if slot.is_whole else None)
            views.append(None)
            if slot.length:
                dst = slot_view(self.state.buffers.tensors[self.bucket % self.num_buffers], slot)
                with torch.no_grad():
                    if slot.is_whole:
                        views[-1] = typed_view(dst, slot.spec)
                        views[-1].copy_(in_hand)
                    else:
                        raw = tensor_bytes(in_hand) if raw is None else raw
                        dst.copy_(raw[slot.start : slot.start + slot.length])
            if not queue:
                in_hand = raw = None
                item = next(source, None)

    def bulk(self, plan: BucketPlan, item: Item, source: Iterator[Item]) -> tuple[bool, Item | None, Iterator[Item]]:
        """A bucket of the cached layout whose tensors are the very objects sent there last time:
        pulled at once and packed as its ``concat_for`` plan says. Otherwise the pulled items are handed back."""
        memo = plan.cache
        refs = memo.get("refs")
        if refs is None or len(refs) != len(plan.slots) or not memo.get("distinct"):
            return False, item, source
        guarded = False  # pull_bucket's guard passed on these very tensors (see pack_replayed)
        if self.raw is not None:
            batch, tensors, error = pull_bucket(plan, memo, refs, item, self.raw, self.device)
            if tensors is None:  # handed back through ``pairs``, which checks them (then raises the error, if any)
                self.raw = None
                checked = pairs(then_raise(batch[1:], error), None)
                return False, batch[0], checked if error is not None else itertools.chain(checked, source)
            guarded = memo.get("guarded") is True
        else:
            batch, tensors = pull_same(plan, memo, refs, item, source, self.device)
        if tensors is None:
            return False, batch[0], itertools.chain(batch[1:], source)
        buf = self.state.buffers.tensors[plan.index % self.num_buffers]
        concat = self.direct_for(plan, tensors, buf)
        self.acquire(plan.index)
        pack_replayed(concat or self.concat_for(plan, buf), tensors, memo, self.device, guarded)
        self.num_tensors += len(tensors)
        return True, next(source, None), source

    def direct_for(self, plan: BucketPlan, tensors: list[torch.Tensor], buf: torch.Tensor) -> ConcatPlan | None:
        """Direct reads: the bucket's whole tensors of at least :data:`DIRECT_BYTES`, contiguous
        on the group's GPU (or, on the CPU, in shared memory: ``share_memory_()``), are not
        packed; workers read them where they lie, through a map of CUDA IPC handles of their
        allocations (on the CPU, of the descriptors torch holds of them), sent with the BUCKET row
        when it changed (``self.direct_row``). Returns how the other tensors are packed, or None:
        pack them all.

        The map is remade when a tensor moved or an allocation behind one is a new one (the
        driver's allocation id; on the CPU, the file behind the descriptor), and sent again after
        a failed update. The tensors are held until the update ends, when (CUDA) later work on
        the current stream is made to wait for the workers' reads (:meth:`release_direct`)."""
        state, memo = self.state, plan.cache
        if not self.direct_on or state.direct_off is not None:  # (a worker may have failed one this update)
            return None
        candidates = memo.get("direct_candidates")
        if candidates is None:
            least = DIRECT_BYTES if self.device.type == "cuda" else DIRECT_BYTES_CPU
            candidates = memo["direct_candidates"] = tuple(
                p for p, s in enumerate(plan.slots) if s.is_whole and s.length >= least)  # fmt: skip
        if not candidates:
            return None
        device = self.device
        picked = tuple(p for p in candidates if tensors[p].device == device and tensors[p].is_contiguous()
                       and not tensors[p].is_conj() and not tensors[p].is_neg()  # the bytes are the values
                       and (device.type == "cuda" or tensors[p].is_shared()))  # fmt: skip
        if not picked:
            return None
        ptrs = tuple(tensors[p].data_ptr() for p in picked)
        known = memo.get("direct")
        if known is not None and known["want"] == (picked, ptrs) and known["buf"] == buf.data_ptr() and all(
            self.same_allocation(*allocation) for allocation in known["allocations"]
        ):  # fmt: skip
            frame = b"" if known["epoch"] == state.direct_epoch else known["frame"]
        else:
            try:
                known = self.direct_map(plan, picked, ptrs, buf, tensors)
            except PeerReadsUnavailable as e:
                state.direct_off = str(e)
                log.info("colocated: workers will not read tensors in place on this group: %s", e)
                return None
            memo["direct"] = known
            frame = known["frame"]
        known["epoch"] = state.direct_epoch
        self.direct_row = (known["gen"], frame)
        self.direct_held.extend(tensors[p] for p in known["key"][0])
        return known["concat"]

    def direct_map(self, plan: BucketPlan, picked: tuple[int, ...], ptrs: tuple[int, ...],
                   buf: torch.Tensor, tensors: list[torch.Tensor]) -> dict[str, Any]:  # fmt: skip
        """A new direct-read map of ``picked`` (slot positions) at ``ptrs``: its frame and the
        plan packing the rest. Only as many tensors as fit one frame are read in place."""
        state = self.state
        slots, segments, index, allocations = [], [], {}, []
        for p, ptr in zip(picked, ptrs):
            base, size, buffer_id, handle = self.allocation_of(plan.slots[p].spec.name, tensors[p], ptr)
            if (base, buffer_id) not in index:
                if handle is None:  # CUDA: exported once per allocation
                    with torch.cuda.device(self.device):
                        handle = ipc_handle(base)
                index[(base, buffer_id)] = len(segments)
                segments.append([handle.hex(), size, buffer_id])
                allocations.append((base, buffer_id, handle))
            slots.append([p, index[(base, buffer_id)], ptr - base])
        state.direct_gen += 1
        n = len(slots)
        while True:
            used = sorted({seg for _, seg, _ in slots[:n]})
            renumber = {seg: i for i, seg in enumerate(used)}
            frame = encode_frame({"gen": state.direct_gen, "slots": [[p, renumber[seg], off] for p, seg, off in slots[:n]],
                                  "segments": [segments[seg] for seg in used]}, limit=None)  # fmt: skip
            if len(frame) <= MAX_IPC_FRAME:
                break
            n //= 2
            if not n:
                raise PeerReadsUnavailable("no direct-read map fits a frame")
        skip = set(picked[:n])
        live = [p for p, s in enumerate(plan.slots) if s.length and p not in skip]
        concat = concat_plan(buf, plan.slots, live, None, ALONE_BYTES)
        return {"want": (picked, ptrs), "key": (picked[:n], ptrs[:n]), "buf": buf.data_ptr(), "gen": state.direct_gen, "frame": frame,
                "allocations": [allocations[seg] for seg in used], "concat": concat, "epoch": -1}  # fmt: skip

    def allocation_of(self, name: str, tensor: torch.Tensor, ptr: int) -> tuple[int, int, int, bytes | None]:
        """The allocation holding ``tensor`` at ``ptr``: (base, size, id, 64-byte handle; on CUDA
        None: the caller exports each allocation once). PeerReadsUnavailable if workers cannot
        be given it."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                return (*locate(ptr), None)
        found = shared_segment(tensor)
        if found is None or not found[0] <= ptr < found[0] + max(found[1], 1):
            raise PeerReadsUnavailable(f"{name!r} is not in shared memory torch holds a "
                                       "descriptor of (share_memory_() with the file_descriptor strategy)")  # fmt: skip
        base, size, handle, inode = found
        return base, size, inode, handle

    def same_allocation(self, base: int, buffer_id: int, handle: bytes) -> bool:
        """Whether the allocation a map names is still the one behind ``base``."""
        if self.device.type == "cuda":
            return allocation_id(base) == buffer_id
        return same_shared(handle, buffer_id)

    def release_direct(self) -> None:
        """The update is over (or failed): later work on the current stream waits for every
        worker's reads of the tensors read in place (their release events, recorded after their
        last loads), and each of those tensors' memory is reused only after that work
        (``record_stream``). Skipped when the group broke: a dead worker reads nothing more."""
        held, self.direct_held = self.direct_held, []
        if self.group.broken is not None or self.device.type != "cuda":  # (CPU: every load was a finished copy)
            return
        stream = torch.cuda.current_stream(self.device)
        for events in self.state.worker_events:
            for event in events:
                stream.wait_event(event)
        for t in held:
            t.record_stream(stream)

    @staticmethod
    def concat_for(plan: BucketPlan, buf: torch.Tensor, views: list[Any] | None = None) -> ConcatPlan:
        """How a bucket of whole tensors is packed into ``buf`` (``packing.concat_plan``: alike
        neighbours by one ``torch.cat`` each), made once per buffer; ``views``: those made while
        packing it, reused."""
        made = plan.cache.get("concat")
        if made is None or made[0] != buf.data_ptr():
            live = [p for p, s in enumerate(plan.slots) if s.length]
            # On a GPU the copies are the update's cost here: large tensors by a device memcpy each.
            alone = ALONE_BYTES if buf.is_cuda else None
            made = plan.cache["concat"] = (buf.data_ptr(), concat_plan(buf, plan.slots, live, views, alone))
        return made[1]

    def close(self, slots: list[Slot], last: bool, refs: list[Any] | None, views: list[Any] | None) -> None:
        """Announce the packed bucket: BUCKET (the cached layout's) or TABLE (a new one, agreed first)."""
        k = self.bucket
        cached = self.cached
        plan = None
        if not self.diverged and k < len(cached.buckets) and tuple(slots) == cached.buckets[k].slots:
            plan = cached.buckets[k]
        if plan is None:
            self.diverged = True
            plan = BucketPlan.make(k, tuple(slots), self.buffer_size, backend=BACKEND)
            if len(plan.frame) > MAX_FRAME_BYTES:
                raise SourceFailed(ValueError(f"the table of bucket {k} has {len(plan.frame)} bytes, over the "
                                               f"{MAX_FRAME_BYTES}-byte cap: tensor names are too long"))  # fmt: skip
            try:
                self.new_names.check(self.layout, plan)
            except ValueError as e:
                raise SourceFailed(e) from e
        if refs is not None:
            whole = all(s.is_whole for s in slots)
            plan.cache["refs"] = refs if whole else None
            # Distinct live objects (a module's parameters), not one staging tensor yielded again.
            alive = [r() for r in refs] if whole else []
            plan.cache["distinct"] = whole and not any(t is None for t in alive) and len({id(t) for t in alive}) == len(alive)
            if whole:  # how the next update's bulk copy packs this bucket
                concat = self.concat_for(plan, self.state.buffers.tensors[k % self.num_buffers], views)
                if plan.cache["distinct"] and self.device.type == "cuda" and len(alive) >= GRAPH_MIN_TENSORS:
                    # Where these tensors lie: met there again next update, that pack is captured at once.
                    try:
                        plan.cache["graph_ptrs"] = (concat, list(map(_DATA_PTR, alive)))
                    except RuntimeError:  # a tensor with no storage to point at: packed as usual
                        plan.cache.pop("graph_ptrs", None)
        if self.device.type == "cuda":
            self.state.buffers.events[k % self.num_buffers].record()
        if plan is cached_bucket(cached, k):
            (gen, frame), self.direct_row = self.direct_row, (0, b"")
            self.post(make_row(Kind.BUCKET, k, int(last), gen, len(frame)), f"{self.what} bucket {k}")
            if frame:
                self.control.send_frame(frame, f"{self.what} bucket {k} (direct reads)")
        else:
            self.post(make_row(Kind.TABLE, k, int(last), 0, len(plan.frame)), f"{self.what} bucket {k}")
            self.control.send_frame(plan.frame, f"{self.what} table {k}")
            step = self.post(make_row(Kind.SYNC), f"{self.what} bucket {k} (check)")
            self.read_until(step)
            self.control.settle(step.rows(), b"", f"{self.what} bucket {k}")
        self.layout.append(plan)
        self.bucket = k + 1

    def end(self) -> None:
        """END step, then (atomic workers) the apply step."""
        self.check_failures()
        step = self.post(make_row(Kind.END, self.num_tensors, self.layout.num_bytes), f"{self.what} (end)")
        self.read_until(step)
        rows = step.rows()
        if not self.layout.buckets:  # no bucket said "last": workers check the empty update now
            rows = self.control.post(make_row(Kind.SYNC), f"{self.what} (end)").rows()
        self.control.settle(rows, b"", f"{self.what} (end)")
        held = all(r.args[1] == self.layout.fingerprint for r in rows[1:])
        if self.any_atomic is None:
            self.any_atomic = any(r.args[3] for r in self.begin_step.rows()[1:])
        if self.any_atomic:
            rows = self.control.post(make_row(Kind.SYNC), f"{self.what} (apply)").rows()
            self.control.settle(rows, b"", f"{self.what} (apply)")
        self.state.layout = self.layout
        self.state.confirmed = self.layout.fingerprint if held and self.layout.buckets else 0

    # -- rows and buffers ------------------------------------------------------------------------

    def post(self, words: list[int], what: str) -> Step:
        step = self.control.post(words, what)
        self.steps.append(step)
        return step

    def read(self, step: Step, timeout_s: float | None = None) -> list[Row]:
        rows = step.rows(timeout_s)
        self.released = min(r.args[4] for r in rows[1:]) if len(rows) > 1 else 1 << 62
        self.failed = self.failed or any(r.args[0] for r in rows[1:])
        if any(r.args[6] for r in rows[1:]) and self.state.direct_off is None:
            self.state.direct_off = "a worker could not map the trainer's memory"
            log.warning("colocated: a worker could not read the trainer's tensors in place; they are packed "
                        "into the shared buffers from now on for this group")  # fmt: skip
        return rows

    def read_until(self, step: Step) -> None:
        while self.steps:
            oldest = self.steps.popleft()
            self.read(oldest)
            if oldest is step:
                return

    def check_failures(self) -> None:
        """Read the completed steps; a worker's failure turns the next step into an ABORT."""
        while self.steps and self.steps[0].done():
            self.read(self.steps.popleft())
        if self.failed:
            self.abort_step(b"")

    def acquire(self, k: int) -> None:
        """Before packing bucket ``k``: every worker released the bucket that last used its buffer."""
        need = k - self.num_buffers + 1
        self.check_failures()
        deadline = time.monotonic() + self.group.timeout_s
        while self.released < need:
            # One timeout_s in all, however the worker answers its rows: a worker that answers and
            # never releases gets the agreed abort, one that stops answering breaks the group.
            left = deadline - time.monotonic()
            if left <= 0:
                self.abort_step(encode_message(
                    f"a worker did not release bucket {need - 1} within {self.group.timeout_s:g} s"))  # fmt: skip
            if not self.steps:
                self.post(make_row(Kind.SYNC), f"{self.what} (buffer {k % self.num_buffers})")
            try:
                self.read(self.steps.popleft(), left)
            except TransferError as e:
                if time.monotonic() < deadline:
                    raise
                raise TransferError(f"{self.what}: a worker did not release bucket {need - 1} within "
                                    f"{self.group.timeout_s:g} s, nor answer its row ({e})", broken=True) from None
            if self.failed:
                self.abort_step(b"")
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for events in self.state.worker_events:
                stream.wait_event(events[k % self.num_buffers])

    def abort_step(self, reason: bytes) -> None:
        step = self.post(make_row(Kind.ABORT, self.bucket, 0, len(reason)), f"{self.what} (abort)")
        self.read_until(step)
        self.control.settle(step.rows(), reason, self.what)
        raise TransferError(f"{self.what} was aborted")


DIRECT_BYTES = ALONE_BYTES
DIRECT_BYTES_CPU = 256 << 10
"""A cached bucket's whole, contiguous tensors of at least this many bytes (on the CPU, in shared
memory and of at least ``DIRECT_BYTES_CPU``: a mapping per storage, made once) are read by the
workers where they lie (:meth:`ColocatedSender.direct_for`): one copy (the worker's load) instead of
two (the pack, then the load)."""

# Direct reads (the switch: :data:`torchxfer.colocated.DIRECT_ENV`, on the trainer and on every worker).
#
# A worker keeps each allocation it read from mapped until an update no longer names it, and CUDA
# leaves undefined what happens when the exporting process frees memory another process still has
# mapped. So turn this on only for a trainer that keeps the sent tensors' memory between updates:
# no offloading of parameters to the CPU, no ``torch.cuda.empty_cache()`` that could free their
# segments. On the CPU only tensors in shared memory (``model.share_memory()``) are read in place;
# memory the trainer frees stays mapped by the workers until an update no longer names it. See the
# README's "Colocated" section.


GRAPH_MIN_TENSORS = 256
"""A cached bucket of at least this many tensors is packed by replaying a CUDA graph of its pack."""

_DATA_PTR = torch.Tensor.data_ptr  # half the cost of operator.methodcaller("data_ptr") in a map


def pack_replayed(concat: ConcatPlan, tensors: list[torch.Tensor], memo: dict, device: torch.device,
                  guarded: bool) -> None:  # fmt: skip
    """``concat.pack(tensors)``, on CUDA by one replay of a CUDA graph of that very pack when it
    is worth it and known to be the same work: a bucket of many tensors (each copy costs CPU
    to launch: 8192 tensors of 4 KiB took about 4 ms of ``torch.cat`` per update on an H200
    host), whose tensors passed ``pull_bucket``'s guard this update (``guarded``: dtype, shape,
    strides as when the graph was made) and lie where they lay when it was captured, into the same buffer
    (``concat`` is made once per buffer). A pack at new addresses runs as usual, and is captured
    the next time it is seen at the same ones (the addresses of an update that sent the bucket's
    table count: :meth:`ColocatedSender.close`, so the first cached update captures); a capture
    that fails turns graphs off for the bucket. The graph holds no tensor: only the addresses it copies between."""
    if device.type != "cuda" or len(tensors) < GRAPH_MIN_TENSORS or not guarded or memo.get("graph_off"):
        concat.pack(tensors)
        return
    ptrs = list(map(_DATA_PTR, tensors))
    known = memo.get("graph")
    if known is not None and known[0] is concat and known[1] == ptrs:
        known[2].replay()
        return
    seen = memo.get("graph_ptrs")
    memo["graph"], memo["graph_ptrs"] = None, (concat, ptrs)
    if seen is None or seen[0] is not concat or seen[1] != ptrs:
        concat.pack(tensors)
        return
    graph = _capture_pack(concat, tensors, device)
    if graph is None:
        memo["graph_off"] = True
        concat.pack(tensors)
        return
    memo["graph"] = (concat, ptrs, graph)
    graph.replay()


def _capture_pack(concat: ConcatPlan, tensors: list[torch.Tensor], device: torch.device) -> Any:
    """A CUDA graph of ``concat.pack(tensors)`` (nothing run), or None."""
    graph, why = capture_graph(lambda: concat.pack(tensors), device)
    if graph is None:
        log.debug("colocated: packs are not replayed as CUDA graphs for this bucket: %s", why)
    return graph


def cached_bucket(cached: Layout | None, k: int) -> BucketPlan | None:
    return cached.buckets[k] if cached is not None and k < len(cached.buckets) else None
