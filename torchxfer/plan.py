"""Layouts as both sides hold them: buckets, their tables and a fingerprint (pure).

A layout is the list of buckets one update sent: each bucket's slots, the
table frame that described them, and the broadcasts they travel in. Both
sides keep the last layout that completed, keyed by a fingerprint over the
configuration and every table frame, so an unchanged layout is announced
by its fingerprint alone: no header is encoded or decoded and nothing is
validated again. A layout that changes is described afresh, from the first
tensor that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib

from . import packing
from .errors import TransferError
from .packing import Slot, TensorSpec, check_bucket, dtype_name, payload_groups, payload_runs
from .wire import BucketHeader, encode

__all__ = ["next_bucket", "rows_ahead", "BucketPlan", "Layout", "NewNames", "TableChecker", "describe", "first_bucket",
           "MAX_UPDATE_NAME_CHARS"]

MAX_UPDATE_NAME_CHARS = 1 << 26
"""The most characters the names of one update's tensors may hold together (a million names of
64 characters): a worker keeps a layout's names as long as its group lives, so without a bound
a trainer could make it keep any amount of them."""


def describe(slot: Slot) -> str:
    """A slot as error messages name it."""
    spec = slot.spec
    where = "" if slot.is_whole else f" bytes [{slot.start}, {slot.start + slot.length})"
    return f"#{slot.index} {spec.name!r} {dtype_name(spec.dtype)} {list(spec.shape)}{where}"


@dataclasses.dataclass
class BucketPlan:
    """One bucket: its slots, its table frame and its broadcasts (see ``payload_runs``)."""

    index: int
    slots: tuple[Slot, ...]
    frame: bytes
    """The table frame as the trainer sends it; empty on a worker, which keeps only its digest
    (a trainer may pad a frame up to ``MAX_FRAME_BYTES``, and a layout lives as long as its group)."""
    runs: list[tuple[int, int, int | None]]
    extent: int
    """Bytes of the buffer the bucket uses (0 in unpacked mode)."""
    specs: list[TensorSpec]
    """The tensors that start in this bucket, in order."""
    nbytes: int
    """Their bytes."""
    digest: bytes
    """sha256 of the frame."""
    cache: dict = dataclasses.field(default_factory=dict)
    """Per-side memo (views into a buffer), dropped with the layout."""
    groups: tuple[tuple[int, int], ...] = ()
    """How ``runs`` are posted: ``(first, end)`` index ranges, one group each (see ``payload_groups``)."""

    @classmethod
    def make(cls, index: int, slots: tuple[Slot, ...], buffer_size: int | None, frame: bytes | None = None,
             backend: str = "nccl") -> BucketPlan:
        """The plan of a bucket: from its slots (a sender: its frame is encoded here) or from the
        ``frame`` a worker received and decoded into ``slots`` (only its digest is kept)."""
        received = frame is not None
        if frame is None:
            frame = encode(BucketHeader(index, slots))
        extent = 0 if buffer_size is None else max(s.end for s in slots)
        specs = [s.spec for s in slots if s.start == 0]
        runs = payload_runs(slots, buffer_size, backend)
        return cls(index, slots, b"" if received else frame, runs, extent, specs, sum(s.nbytes for s in specs),
                   hashlib.sha256(frame).digest(), groups=payload_groups(runs, backend))  # fmt: skip


class Layout:
    """The buckets of one update, in order, and their fingerprint."""

    def __init__(self, packed: bool, buffer_size: int | None, num_buffers: int, backend: str = "nccl") -> None:
        self.config = (packed, buffer_size, num_buffers)
        self.backend = backend
        self.buffer_size = buffer_size
        self.buckets: list[BucketPlan] = []
        self.specs: list[TensorSpec] = []
        self.num_bytes = 0
        self._hash = hashlib.sha256(repr((*self.config, backend)).encode())

    def append(self, bucket: BucketPlan) -> None:
        assert bucket.index == len(self.buckets)
        self.buckets.append(bucket)
        self._hash.update(bucket.digest)
        self.specs += bucket.specs
        self.num_bytes += bucket.nbytes

    def same_config(self, other: Layout) -> bool:
        """Whether ``other`` was planned with this layout's configuration and backend: only then may
        its buckets be read under this one's buffers (a worker checks a cached layout so, whatever
        fingerprint the trainer's row names)."""
        return self.config == other.config and self.backend == other.backend

    @property
    def fingerprint(self) -> int:
        """A positive 63-bit digest of the configuration and every table (0 means none)."""
        return int.from_bytes(self._hash.digest()[:8], "little") >> 1 or 1


def first_bucket(layout: Layout | None, confirmed: bool) -> BucketPlan | None:
    """The bucket every worker posts before an update's first step, on both sides the same.

    After an update that ended with every worker holding its layout
    (``confirmed``), each worker posts that layout's bucket 0 as soon as it
    enters the next update, before it learns anything about it; the trainer
    then always sends that bucket's broadcasts first: the real bucket when it
    sends the same layout again (the steady state: no control step precedes
    the first byte), or void ones of the same sizes when it does not. None
    when there is nothing to post (see :func:`postable`).
    """
    if not confirmed or layout is None or not layout.buckets:
        return None
    return postable(layout, layout.buckets[0], before_begin=True)


def rows_ahead(layout: Layout | None, index: int) -> int:
    """How many steps ahead every worker posts its rows once the trainer's BUCKET row announced
    bucket ``index`` of the cached ``layout`` as not the last (protocol 9): the next step's, and
    the one after it too while at least two buckets of the layout follow ``index``. Both sides
    apply this rule to the same rows; the trainer matches a row posted two ahead with a SYNC
    row when its next row is not another BUCKET row that is not the last (``Sender.after_row``)."""
    return 2 if layout is not None and index + 2 < len(layout.buckets) else 1


def next_bucket(layout: Layout | None, index: int) -> BucketPlan | None:
    """The bucket every worker posts ahead once the trainer's BUCKET row announced bucket
    ``index`` of the cached ``layout`` as not the last: the layout's bucket ``index + 1``
    (None past its end, or when there is nothing to post: see :func:`postable`).

    Both sides apply the same rule to the same rows: the trainer then sends that
    bucket's broadcasts next, for real (its BUCKET row) or, before any other row, as
    void broadcasts of the same sizes. A worker so has its next bucket posted before
    the control row announcing it arrives, and the payload never waits for a control
    round trip in the steady state. Packed and unpacked layouts alike: either way a
    worker has at most ``num_buffers`` buckets posted and not yet loaded.
    """
    if layout is None or not 0 <= index + 1 < len(layout.buckets):
        return None
    return postable(layout, layout.buckets[index + 1])


def postable(layout: Layout, plan: BucketPlan, before_begin: bool = False) -> BucketPlan | None:
    """``plan`` if a worker may post it ahead, else None: a bucket with broadcasts to post, and,
    posted before BEGIN (``before_begin``, bucket 0) in an unpacked layout, one of at most
    ``UNPACKED_GROUP_BYTES`` (256 MiB).

    An unpacked bucket is posted ahead into fresh tensors, and when the update departs
    from the layout there both sides allocate that much for void broadcasts. Bucket 0 is
    posted before every update, an empty one included, so a bucket 0 holding one larger
    tensor (an embedding of gigabytes, say) waits for the BEGIN row instead. A later bucket
    is posted ahead only once the trainer's row said the update goes on along the layout,
    so it is voided only when the layout changes right there; that costs one tensor's
    allocation on each side, within the memory the update may use anyway (its buffers and
    one tensor), and waiting for its row instead would cost a control round trip per
    large tensor in every update."""
    if not plan.runs:
        return None
    if before_begin and layout.buffer_size is None \
            and sum(end - start for start, end, _ in plan.runs) > packing.UNPACKED_GROUP_BYTES:  # fmt: skip
        return None
    return plan


class NewNames:
    """Rank 0's check that no tensor name comes twice in one update, made where a bucket is
    planned afresh (a cached layout's names were checked when it was new)."""

    def __init__(self) -> None:
        self.names: set[str] | None = None
        self.chars = 0

    def check(self, layout: Layout, plan: BucketPlan) -> None:
        """ValueError if a tensor that starts in ``plan`` (about to follow ``layout``'s buckets,
        this update's so far) repeats a name of this update, or the update's names grow past
        :data:`MAX_UPDATE_NAME_CHARS` (which workers refuse)."""
        if self.names is None:
            self.names = {spec.name for spec in layout.specs}
            self.chars = sum(len(name) for name in self.names)
        for spec in plan.specs:
            if spec.name in self.names:
                raise ValueError(f"tensor name {spec.name!r} comes twice in one update (bucket {plan.index}): "
                                 "workers could not tell which one to load")  # fmt: skip
            self.names.add(spec.name)
            self.chars += len(spec.name)
            if self.chars > MAX_UPDATE_NAME_CHARS:
                raise ValueError(f"the names of one update's tensors hold more than {MAX_UPDATE_NAME_CHARS} "
                                 f"characters together (at {spec.name[:60]!r}, bucket {plan.index})")  # fmt: skip


class TableChecker:
    """Checks, on a receiver, that tables decoded from the wire continue the update.

    Bucket indices follow each other; tensors arrive in order from byte 0; a
    split tensor continues exactly where it stopped, in the next bucket; no
    name comes twice in one update; and, when the worker passed
    ``update_info``, each tensor is the one it lists.
    """

    def __init__(self, expected: tuple[TensorSpec, ...] | None, buffer_size: int | None) -> None:
        self.expected = expected
        self.buffer_size = buffer_size
        self.next_index = 0
        self.partial: Slot | None = None
        self.names: set[str] = set()
        self.chars = 0  # of the names so far (MAX_UPDATE_NAME_CHARS)

    def resume_after(self, layout: Layout) -> None:
        """Continue after the buckets of ``layout`` (this update's, so far: buckets of the cached layout)."""
        self.names = {spec.name for spec in layout.specs}
        self.chars = sum(len(name) for name in self.names)
        previous = layout.buckets[-1] if layout.buckets else None
        last = previous.slots[-1] if previous is not None else None
        self.partial = last if last is not None and not last.is_last else None
        self.next_index = 0 if last is None else last.index + (1 if last.is_last else 0)

    def check(self, header: BucketHeader, bucket: int) -> None:
        """Raise TransferError if ``header`` cannot be bucket ``bucket`` of this update."""
        if header.index != bucket:
            raise TransferError(f"the trainer sent the table of bucket {header.index} where bucket {bucket} was due")
        try:
            check_bucket(header.slots, self.buffer_size)
        except ValueError as e:
            raise TransferError(f"bucket {bucket} is malformed: {e}") from None
        for pos, slot in enumerate(header.slots):
            if self.partial is not None:
                prev = self.partial
                if (pos != 0 or slot.index != prev.index or slot.spec != prev.spec
                        or slot.start != prev.start + prev.length):  # fmt: skip
                    raise TransferError(f"bucket {bucket}: {describe(slot)} does not continue {describe(prev)}")
            elif slot.index != self.next_index or slot.start != 0:
                raise TransferError(f"bucket {bucket}: {describe(slot)} is out of order "
                                    f"(expected tensor #{self.next_index} from byte 0)")  # fmt: skip
            if slot.start == 0:
                if slot.spec.name in self.names:
                    raise TransferError(f"bucket {bucket}: {describe(slot)} repeats the name of an earlier tensor "
                                        "of this update")  # fmt: skip
                self.names.add(slot.spec.name)
                self.chars += len(slot.spec.name)
                if self.chars > MAX_UPDATE_NAME_CHARS:
                    raise TransferError(f"bucket {bucket}: the names of this update's tensors hold more than "
                                        f"{MAX_UPDATE_NAME_CHARS} characters together")  # fmt: skip
            if slot.start == 0 and self.expected is not None:
                if slot.index >= len(self.expected):
                    raise TransferError(f"trainer sends tensor {describe(slot)} but update_info lists only "
                                        f"{len(self.expected)} tensors")  # fmt: skip
                want = self.expected[slot.index]
                if want != slot.spec:
                    raise TransferError(f"trainer sends {describe(slot)}, update_info expects "
                                        f"#{slot.index} {want.name!r} {dtype_name(want.dtype)} {list(want.shape)}")
            if not slot.is_last and pos != len(header.slots) - 1:
                raise TransferError(f"bucket {bucket}: split tensor {describe(slot)} is not the bucket's last slot")
            self.partial = None if slot.is_last else slot
            if slot.is_last:
                self.next_index = slot.index + 1

    def finish(self) -> None:
        """After the last bucket: every tensor complete, and as many as update_info lists."""
        if self.partial is not None:
            raise TransferError(f"update ended inside tensor {describe(self.partial)}")
        if self.expected is not None and self.next_index != len(self.expected):
            raise TransferError(f"trainer sent {self.next_index} tensors, update_info lists {len(self.expected)}")
