"""Bucket planning, packing and unpacking: pure functions, no process group.

The sender and every receiver call :func:`plan_slots` with the same
``(name, dtype, shape)`` specs and the same buffer size, so both sides agree on
where every byte goes without either re-deriving the other's rule. The rule,
in one place:

* slots start at offsets aligned to :data:`ALIGNMENT` bytes, so every view
  handed to ``load_weights`` is aligned for any dtype;
* a tensor goes into the current bucket if it fits after the cursor; otherwise
  the bucket is closed and the tensor starts a new one;
* a tensor larger than a whole buffer is split: like any tensor that does not
  fit, it starts a new bucket (unless the current one is still empty), so its
  first slice sits at offset 0 of a fresh bucket; its bytes fill whole buffers,
  and its tail starts the last of its buckets at offset 0, where later tensors
  may follow if they fit; so buffer memory stays ``num_buffers x buffer_size``
  whatever the model;
* a bucket holds at most :data:`MAX_SLOTS_PER_BUCKET` slots, which bounds the
  size of its header;
* with ``buffer_size=None`` (unpacked mode) whole tensors are grouped into
  buckets, and each travels in a broadcast of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "whole_views",
    "ALIGNMENT",
    "ConcatPlan",
    "concat_plan",
    "MAX_SLOTS_PER_BUCKET",
    "TensorSpec",
    "Slot",
    "align_up",
    "dtype_name",
    "parse_dtype",
    "Planner",
    "own_run_threshold",
    "plan_slots",
    "payload_runs",
    "payload_groups",
    "check_bucket",
    "slot_view",
    "tensor_bytes",
]

ALIGNMENT = 16
"""Byte alignment of every slot in a packed buffer (>= the largest itemsize)."""

MAX_SLOTS_PER_BUCKET = 4096
"""Most slots one bucket may hold; keeps a bucket header under the size cap."""

MAX_NDIM = 64
"""Most dimensions a tensor on the wire may have."""

MAX_TENSOR_BYTES = 1 << 62
"""The most bytes one tensor may hold: offsets and lengths travel as int64."""

MAX_NAME_CHARS = 4096
"""Longest tensor name the wire carries."""


def _supported_dtypes() -> dict[str, torch.dtype]:
    # Only dtypes whose storage is plain bytes that a uint8 view can carry.
    names = [
        "bool", "uint8", "int8", "int16", "int32", "int64",
        "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64",
        "complex32", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
        "float8_e8m0fnu", "float4_e2m1fn_x2",
    ]  # fmt: skip
    found = {}
    for name in names:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            found[name] = dtype
    return found


_DTYPE_BY_NAME: dict[str, torch.dtype] = _supported_dtypes()
_NAME_BY_DTYPE: dict[torch.dtype, str] = {d: n for n, d in _DTYPE_BY_NAME.items()}
# torch's other names of the same dtypes, resolved once here from this fixed list: a name that
# comes from a peer is only ever looked up in these tables, never with ``getattr(torch, ...)``
# (which runs torch's lazy imports for names such as "_dynamo").
_ALIASES: dict[str, torch.dtype] = {
    alias: getattr(torch, alias)
    for alias in ("float", "double", "half", "long", "int", "short", "cfloat", "cdouble", "chalf")
    if isinstance(getattr(torch, alias, None), torch.dtype) and getattr(torch, alias) in _NAME_BY_DTYPE
}


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical wire name of ``dtype`` ("bfloat16"); ValueError if unsupported."""
    try:
        return _NAME_BY_DTYPE[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype!r} cannot be transferred") from None


def parse_dtype(name: str) -> torch.dtype:
    """The dtype for a name: canonical ("float32"), alias ("float") or "torch."-prefixed.

    Raises ValueError for anything that is not a supported torch dtype
    (``"nn"``, ``"Tensor"``, ``"qint8"``, ...).
    """
    if not isinstance(name, str):
        raise ValueError(f"dtype name must be a string, got {name!r}")
    bare = name[len("torch.") :] if name.startswith("torch.") else name
    dtype = _DTYPE_BY_NAME.get(bare) or _ALIASES.get(bare)
    if dtype is None:
        raise ValueError(f"{name!r} is not a supported torch dtype name")
    return dtype


def _check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple, torch.Size)):
        raise ValueError(f"shape must be a list of ints, got {shape!r}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"shape {list(shape)!r} has more than {MAX_NDIM} dimensions")
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(
                f"shape {list(shape)!r} has dimension {dim!r}: dimensions must be "
                "non-negative integers"
            )
        dims.append(int(dim))
    return tuple(dims)


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the wire knows of one tensor: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        if len(self.name) > MAX_NAME_CHARS:
            raise ValueError(f"tensor name {self.name[:60]!r}... has {len(self.name)} characters, "
                             f"more than {MAX_NAME_CHARS}")
        dtype_name(self.dtype)
        object.__setattr__(self, "shape", _check_shape(self.shape))
        n = 1
        for dim in self.shape:
            n *= dim
        if n * self.dtype.itemsize > MAX_TENSOR_BYTES:
            raise ValueError(f"tensor {self.name[:60]!r} of shape {list(self.shape)} is too large: more than 2**62 bytes")
        object.__setattr__(self, "_numel", n)

    @property
    def numel(self) -> int:
        return self._numel  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        return self._numel * self.dtype.itemsize  # type: ignore[attr-defined]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec of a dense tensor; ValueError for anything the wire cannot carry."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_nested:
            raise ValueError(f"{name!r}: only dense tensors can be sent, got a nested tensor")
        if tensor.is_quantized:
            raise ValueError(f"{name!r}: only dense tensors can be sent, got a quantized tensor ({tensor.dtype})")
        if tensor.layout != torch.strided:
            raise ValueError(f"{name!r}: only dense tensors can be sent, got layout {tensor.layout}")
        if tensor.device.type == "meta":
            raise ValueError(f"{name!r}: a meta tensor has no data to send")
        return cls(name, tensor.dtype, tuple(tensor.shape))


@dataclasses.dataclass(frozen=True)
class Slot:
    """One contiguous run of one tensor's bytes inside one bucket.

    ``start``/``length`` locate the run in the tensor's row-major bytes;
    ``offset`` locates it in the bucket's buffer.
    """

    bucket: int
    index: int
    spec: TensorSpec
    start: int
    length: int
    offset: int

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.length == self.spec.nbytes

    @property
    def is_last(self) -> bool:
        return self.start + self.length == self.spec.nbytes

    @property
    def end(self) -> int:
        return self.offset + self.length


UNPACKED_GROUP_TENSORS = 256
"""Unpacked mode: most tensors one bucket (one control tick) groups."""
UNPACKED_GROUP_BYTES = 256 << 20
"""Unpacked mode: a bucket closes once it holds this many bytes."""
DIRECT_MIN_BYTES = 4 << 20
"""NCCL: bucket 0's first slot travels alone from this many bytes (see payload_runs)."""
NCCL_DIRECT_MIN_BYTES = 8 << 20
"""NCCL: a whole tensor of at least this many bytes travels straight from its memory (see own_run_threshold)."""
GROUP_BYTES = 256 << 20
"""NCCL: a bucket's broadcasts are issued as NCCL groups of at most about this many bytes (payload_groups)."""
GROUP_PACKED_ALONE_BYTES = 4 << 20
"""NCCL: a packed range of at least this many bytes is a group of its own (payload_groups)."""
FIRST_CUT_MIN_BYTES = 64 << 20
"""NCCL: bucket 0's first packed range of at least this many bytes is cut in three (see payload_runs)."""
HALF_CUT_MIN_BYTES = 512 << 20
"""NCCL: a later bucket's packed range of at least this many bytes is cut in two (see payload_runs)."""
GLOO_DIRECT_MIN_BYTES = 1 << 20
GLOO_DIRECT_BUFFER_FRACTION = 8
"""Gloo: from max(GLOO_DIRECT_MIN_BYTES, buffer / GLOO_DIRECT_BUFFER_FRACTION)."""


def own_run_threshold(buffer_size: int | None, backend: str = "nccl") -> int:
    """Slots of at least this many bytes travel as a broadcast of their own.

    Such a slot can go straight from the source tensor's memory (no pack
    copy) at the cost of one more collective. On NCCL a bucket's broadcasts
    are issued as a few NCCL groups (:func:`payload_groups`), so more of them
    cost CPU time (tens of microseconds each) but not link time, while a pack
    copy beside the broadcasts slows the link: on 2x H200 an ideal packed
    pipeline reached 0.92x of one flat broadcast, the same tensors sent from
    their own memory in groups 0.96-0.98x. So every tensor of
    :data:`NCCL_DIRECT_MIN_BYTES` or more (23 us of NVLink) travels alone. On
    Gloo the copy competes with the transfer for the same CPU cores, and each
    broadcast is a round of its own, so slots of an eighth of a buffer do.
    Unpacked mode (``None``): every slot.
    """
    if buffer_size is None:
        return 0
    if backend == "gloo":
        return max(GLOO_DIRECT_MIN_BYTES, buffer_size // GLOO_DIRECT_BUFFER_FRACTION)
    return NCCL_DIRECT_MIN_BYTES


def payload_groups(runs: Sequence[tuple[int, int, int | None]], backend: str = "nccl") -> tuple[tuple[int, int], ...]:
    """How a bucket's runs (:func:`payload_runs`) are posted: ``(first, end)`` index ranges of
    ``runs``, in order, each posted as one group.

    On NCCL a group is one NCCL group call (one kernel launch for all its broadcasts):
    consecutive runs are grouped up to :data:`GROUP_BYTES` (256 MiB; groups of a whole
    1 GiB bucket moved slower on NVLink, 0.96x against 0.98x), and a packed range of
    :data:`GROUP_PACKED_ALONE_BYTES` or more is a group of its own, so that it travels as soon
    as it is packed while the next ones are. On other backends every run is a group of one.
    Both sides call this on the same runs, so they issue the same collectives in the
    same groups.
    """
    if backend != "nccl":
        return tuple((i, i + 1) for i in range(len(runs)))
    groups: list[tuple[int, int]] = []
    first, size, alone = 0, 0, False
    for i, (start, end, pos) in enumerate(runs):
        was_alone, alone = alone, pos is None and end - start >= GROUP_PACKED_ALONE_BYTES
        if i > first and (alone or was_alone or size + end - start > GROUP_BYTES):
            groups.append((first, i))
            first, size = i, 0
        size += end - start
    if runs:
        groups.append((first, len(runs)))
    return tuple(groups)


class Planner:
    """The bucket rule, one tensor at a time; both sides replay the same calls.

    :meth:`add` places the next tensor and returns its slots. It never looks
    ahead, so a lazy source is not drained: a bucket is complete when a slot
    of the next bucket appears (or the source ends). :meth:`resume` and
    :meth:`close_bucket` let a sender continue from a bucket it already sent
    part of (a layout that changed mid-update).

    Packed (``buffer_size`` an int): see the module docstring. Unpacked
    (``None``): whole tensors, grouped into buckets of at most
    :data:`UNPACKED_GROUP_TENSORS` tensors and about
    :data:`UNPACKED_GROUP_BYTES` bytes; each travels in its own broadcast.
    """

    def __init__(self, buffer_size: int | None) -> None:
        if buffer_size is not None and (
            isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < ALIGNMENT
        ):
            raise ValueError(f"buffer_size must be an int >= {ALIGNMENT}, got {buffer_size!r}")
        self.buffer_size = buffer_size
        self.bucket, self.cursor, self.count = -1, 0, 0

    def resume(self, bucket: int, cursor: int, count: int) -> None:
        """Continue bucket ``bucket`` after ``count`` slots ending at ``cursor``."""
        self.bucket, self.cursor, self.count = bucket, cursor, count

    def close_bucket(self) -> None:
        """Start the next tensor in a new bucket."""
        self.cursor, self.count = 0, MAX_SLOTS_PER_BUCKET

    def _new_bucket(self) -> None:
        self.bucket, self.cursor, self.count = self.bucket + 1, 0, 0

    def add(self, index: int, spec: TensorSpec) -> list[Slot]:
        nbytes, size = spec.nbytes, self.buffer_size
        if size is None:
            if self.bucket < 0 or self.count >= UNPACKED_GROUP_TENSORS or (
                self.count and self.cursor + nbytes > UNPACKED_GROUP_BYTES
            ):
                self._new_bucket()
            self.cursor, self.count = self.cursor + nbytes, self.count + 1
            return [Slot(self.bucket, index, spec, 0, nbytes, 0)]
        offset = align_up(self.cursor)
        fits = offset + nbytes <= size and self.count < MAX_SLOTS_PER_BUCKET
        if self.bucket < 0 or self.count >= MAX_SLOTS_PER_BUCKET or (not fits and self.count > 0):
            self._new_bucket()
            offset = 0
        if offset + nbytes <= size:
            self.cursor, self.count = offset + nbytes, self.count + 1
            return [Slot(self.bucket, index, spec, 0, nbytes, offset)]
        # Larger than a whole buffer: split, from the start of a fresh bucket.
        slots, start = [], 0
        while start < nbytes:
            length = min(nbytes - start, size - offset)
            slots.append(Slot(self.bucket, index, spec, start, length, offset))
            start += length
            self.cursor, self.count = offset + length, self.count + 1
            if start < nbytes:
                self._new_bucket()
                offset = 0
        return slots


def plan_slots(specs: Iterable[TensorSpec], buffer_size: int | None) -> Iterator[Slot]:
    """Place tensors into buckets; yields slots in send order, lazily (see :class:`Planner`).

    Args:
        specs: tensors in send order.
        buffer_size: bytes per buffer (packed mode), or None (unpacked mode).
    """
    planner = Planner(buffer_size)
    for index, spec in enumerate(specs):
        yield from planner.add(index, spec)


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The row-major bytes of ``tensor`` as a flat uint8 tensor (copies if not contiguous)."""
    return tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def slot_view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The slot's bytes in ``buffer`` (a flat uint8 tensor)."""
    return buffer[slot.offset : slot.end]


def typed_view(raw: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """View a flat uint8 run of exactly ``spec.nbytes`` bytes as the spec's tensor."""
    return raw.view(spec.dtype).view(spec.shape)


def whole_views(buffer: torch.Tensor, slots: Sequence[Slot], made: Sequence[Any] | None = None) -> list[Any]:
    """Per slot, the typed view of ``buffer`` that holds its whole tensor (None for a part of a
    split tensor); ``made[i]``, a view made while packing, is kept when it still lies in
    ``buffer`` (a buffer that grew since is new memory)."""
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    out: list[Any] = []
    for i, slot in enumerate(slots):
        view = made[i] if made is not None else None
        if not slot.is_whole:
            view = None
        elif view is None or not lo <= view.data_ptr() < hi:
            view = typed_view(slot_view(buffer, slot), slot.spec)
        out.append(view)
    return out


class ConcatPlan(NamedTuple):
    """How :func:`concat_plan` packs a bucket's whole tensors: ``segments`` of slot positions
    ``first..end-1`` packed by one ``torch.cat(out=out)`` each, the ``rest`` positions by
    one multi-tensor copy into ``rest_views``, and the ``alone`` positions by a copy each
    into ``alone_views``."""

    segments: list[tuple[int, int, torch.Tensor]]
    rest: list[int]
    rest_views: list[torch.Tensor]
    alone: tuple[int, ...] = ()
    alone_views: tuple[torch.Tensor, ...] = ()

    def pack(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (indexed by slot position) into the buffer as planned."""
        with torch.no_grad():
            for p, view in zip(self.alone, self.alone_views):
                view.copy_(tensors[p])
            for first, end, out in self.segments:
                torch.cat(tensors[first:end], out=out)
            if self.rest:
                torch._foreach_copy_(self.rest_views, [tensors[p] for p in self.rest])


def concat_plan(buffer: torch.Tensor, slots: Sequence[Slot], positions: Sequence[int],
                made: Sequence[Any] | None = None, alone_bytes: int | None = None) -> ConcatPlan:  # fmt: skip
    """How to pack the whole tensors of ``slots`` at ``positions`` into ``buffer`` with few copies
    (``made``: per slot, typed views already made, reused as in :func:`whole_views`).

    With ``alone_bytes``, whole tensors of at least that many bytes are copied one by
    one (a plain copy of a large tensor is a device memcpy on CUDA, faster than either
    fused kernel when the copy itself is the cost, as in colocated mode).

    A segment joins consecutive slots whose bytes lie back to back in ``buffer``,
    of one dtype, one number of dimensions (1 to 3) and the same sizes after the
    first, so ``torch.cat`` packs them in one copy; the other positions go
    through one multi-tensor copy into their typed views. On CUDA one ``cat``
    moved 1.4x the bytes per second of ``torch._foreach_copy_`` on an H200 and
    costs less CPU per tensor on every device. (Four and five dimensions are
    left to the multi-tensor copy: a memory format is inferred for them.)
    """
    segments: list[tuple[int, int, torch.Tensor]] = []
    rest: list[int] = []
    alone: list[int] = []
    if alone_bytes is not None:
        alone = [p for p in positions if slots[p].is_whole and slots[p].length >= alone_bytes]
        if alone:
            skip = set(alone)
            positions = [p for p in positions if p not in skip]
    i, n = 0, len(positions)
    while i < n:
        first = positions[i]
        head = slots[first]
        shape = head.spec.shape
        j = i + 1
        if head.is_whole and head.length and 1 <= len(shape) <= 3:
            while j < n:
                pos, prev = positions[j], slots[positions[j - 1]]
                slot = slots[pos]
                if (pos != positions[j - 1] + 1 or not slot.is_whole or not slot.length
                        or slot.offset != prev.offset + prev.length or slot.spec.dtype != head.spec.dtype
                        or len(slot.spec.shape) != len(shape) or slot.spec.shape[1:] != shape[1:]):  # fmt: skip
                    break
                j += 1
        if j - i >= 2:
            last = slots[positions[j - 1]]
            raw = buffer[head.offset : last.offset + last.length]
            segments.append((first, positions[j - 1] + 1, raw.view(head.spec.dtype).view(-1, *shape[1:])))
        else:
            rest.extend(positions[i:j])
        i = j
    views = whole_views(buffer, slots, made) if rest or alone else []
    return ConcatPlan(segments, rest, [views[p] for p in rest], tuple(alone), tuple(views[p] for p in alone))


def payload_runs(slots: Sequence[Slot], buffer_size: int | None, backend: str = "nccl") -> list[tuple[int, int, int | None]]:
    """How a bucket's payload is split into broadcasts, in posting order: ``(start, end, position)``.

    First, alone and in slot order (``position`` is the slot's index in
    ``slots``): every slot of at least :func:`own_run_threshold` bytes, and
    every part of a tensor split across buckets, and on NCCL the first slot of
    bucket 0 when it holds at least :data:`DIRECT_MIN_BYTES`. The sender may broadcast
    these straight from the tensor's memory and the receiver straight into
    the tensor it assembles. Then the remaining slots, consecutive ones merged
    into ranges of the buffer (``position`` None), posted once packed. (Ranges
    are not cut small: on NVLink a bucket sent as 128 MiB ranges moved at
    0.9x the rate of one range. On NCCL the first range of bucket 0 is cut in
    three, see ``_cut_first``, and a range of another bucket of at least
    :data:`HALF_CUT_MIN_BYTES` in two, see ``_cut_half``.) Both sides
    call this on the same slots, so they issue the same collectives whatever
    the tensors' memory layout. Empty ranges are left out.
    """
    threshold = own_run_threshold(buffer_size, backend)
    own: list[tuple[int, int, int | None]] = []
    packed: list[tuple[int, int, int | None]] = []
    start = end = None
    # NCCL: bucket 0's first slot, when large, travels alone too, straight from its memory:
    # nothing then waits for a pack copy before the update's first byte.
    first_alone = backend == "nccl" and buffer_size is not None and bool(slots) and slots[0].bucket == 0
    for pos, slot in enumerate(slots):
        alone = first_alone and pos == 0 and slot.length >= DIRECT_MIN_BYTES
        if slot.length and (alone or slot.length >= threshold or not slot.is_whole):
            own.append((slot.offset, slot.end, pos))
            if start is not None and end > start:
                packed.append((start, end, None))
            start = end = None
            continue
        if start is None:
            start = slot.offset
        end = slot.end
    if start is not None and end > start:
        packed.append((start, end, None))
    if backend == "nccl" and packed and slots[0].bucket == 0:
        packed[:1] = _cut_first(packed[0], slots)
    elif backend == "nccl":
        packed = [piece for run in packed for piece in _cut_half(run, slots)]
    return own + packed


def _cut_first(run: tuple[int, int, None], slots: Sequence[Slot]) -> list[tuple[int, int, None]]:
    """Bucket 0's first packed range, cut at the slot boundaries nearest after 1/8 and 1/2 of it.

    Nothing can travel before the first bucket is packed (about 0.7 ms for 1 GiB
    on an H200, measured with the link idle); cut, its first eighth travels while
    the rest is packed. Only bucket 0: later buckets are packed while the one
    before them travels, and a bucket sent as more ranges moves slower.
    """
    start, end, _ = run
    if end - start < FIRST_CUT_MIN_BYTES:
        return [run]
    bounds = sorted(s.offset for s in slots if start < s.offset < end)
    cuts: list[int] = []
    for fraction in (8, 2):
        cut = next((b for b in bounds if b >= start + (end - start) // fraction), None)
        if cut is not None and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    edges = [start, *cuts, end]
    return [(a, b, None) for a, b in zip(edges, edges[1:])]


def _cut_half(run: tuple[int, int, None], slots: Sequence[Slot]) -> list[tuple[int, int, None]]:
    """A later bucket's packed range of at least :data:`HALF_CUT_MIN_BYTES`, cut at the slot start
    nearest its middle (not cut when that leaves a piece under a quarter of it).

    When the bucket's bytes are copied into the buffer slower than the link
    carries them (an FSDP2 sender copying the other ranks' shards over the
    same NVLink, about 490 GB/s per copy stream), one range would wait for the
    whole bucket's copies while the link sits idle; cut, its first half
    travels while the second is still copied.
    """
    start, end, _ = run
    size = end - start
    if size < HALF_CUT_MIN_BYTES:
        return [run]
    middle = start + size // 2
    bounds = [s.offset for s in slots if start + size // 4 <= s.offset <= end - size // 4]
    if not bounds:
        return [run]
    cut = min(bounds, key=lambda b: (abs(b - middle), b))
    return [(start, cut, None), (cut, end, None)]


def check_bucket(slots: Sequence[Slot], buffer_size: int | None) -> int:
    """Validate slots decoded from the wire; returns the bucket's extent in the buffer.

    Raises ValueError when slots overlap, are misaligned, leave the buffer or
    the tensor, or exceed the per-bucket limits.
    """
    end = 0
    if buffer_size is None and len(slots) > UNPACKED_GROUP_TENSORS:
        raise ValueError(f"unpacked bucket has {len(slots)} tensors, more than {UNPACKED_GROUP_TENSORS}")
    if buffer_size is not None and len(slots) > MAX_SLOTS_PER_BUCKET:
        raise ValueError(f"bucket has {len(slots)} slots, more than {MAX_SLOTS_PER_BUCKET}")
    if not slots:
        raise ValueError("a bucket holds at least one slot")
    if buffer_size is None and len(slots) > 1 and sum(s.length for s in slots) > UNPACKED_GROUP_BYTES:
        raise ValueError(f"unpacked bucket of {len(slots)} tensors holds more than {UNPACKED_GROUP_BYTES} bytes")
    for slot in slots:
        if slot.start < 0 or slot.length < 0 or slot.start + slot.length > slot.spec.nbytes:
            raise ValueError(f"slot of {slot.spec.name!r} covers bytes outside the tensor")
        if buffer_size is None:
            if not slot.is_whole or slot.offset != 0:
                raise ValueError(f"an unpacked slot holds one whole tensor at offset 0, got {slot.spec.name!r}")
            continue
        if slot.offset % ALIGNMENT or slot.offset < end:
            raise ValueError(f"slot of {slot.spec.name!r} at offset {slot.offset} is misaligned or overlaps")
        if slot.end > buffer_size:
            raise ValueError(f"slot of {slot.spec.name!r} ends at {slot.end}, past the buffer ({buffer_size})")
        end = slot.end
    return end
