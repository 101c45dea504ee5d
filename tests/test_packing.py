"""Fast tier: the bucket planner, packing/unpacking and dtype names (pure functions, no group)."""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import groupby

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import bytes_equal
from torchxfer.packing import (
    ALIGNMENT,
    DIRECT_MIN_BYTES,
    GLOO_DIRECT_MIN_BYTES,
    GROUP_BYTES,
    GROUP_PACKED_ALONE_BYTES,
    NCCL_DIRECT_MIN_BYTES,
    MAX_SLOTS_PER_BUCKET,
    UNPACKED_GROUP_BYTES,
    UNPACKED_GROUP_TENSORS,
    Planner,
    Slot,
    TensorSpec,
    align_up,
    check_bucket,
    concat_plan,
    dtype_name,
    own_run_threshold,
    payload_groups,
    parse_dtype,
    payload_runs,
    plan_slots,
    slot_view,
    tensor_bytes,
    typed_view,
)

pytestmark = pytest.mark.timeout(60)

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

POISON = 0xA5

DTYPE_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64",
    "float8_e4m3fn", "float8_e5m2",
]  # fmt: skip
DTYPES = [getattr(torch, n) for n in DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)]


def test_alignment_constants():
    assert ALIGNMENT == 16
    assert ALIGNMENT >= max(d.itemsize for d in DTYPES)
    assert MAX_SLOTS_PER_BUCKET == 4096
    assert [align_up(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 16, 16, 16, 32, 32, 48]
    assert align_up(5, 4) == 8


# ----------------------------------------------------------------------------------------------
# helpers


def spec(name: str, dtype: torch.dtype, *shape: int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def u8(name: str, n: int) -> TensorSpec:
    return spec(name, torch.uint8, n)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs included for floats), never all zeros or ones."""
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen).to(torch.bool).reshape(shape)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


LAYOUTS = ["contiguous", "0d", "empty", "empty2d", "transposed", "strided", "expanded", "permuted", "offset"]


def make_tensor(layout: str, dtype: torch.dtype, gen: torch.Generator, a: int = 6, b: int = 7) -> torch.Tensor:
    if layout == "contiguous":
        return random_tensor(dtype, (a, b), gen)
    if layout == "0d":
        return random_tensor(dtype, (), gen)
    if layout == "empty":
        return random_tensor(dtype, (0,), gen)
    if layout == "empty2d":
        return random_tensor(dtype, (a, 0, b), gen)
    if layout == "transposed":
        t = random_tensor(dtype, (b, a), gen).t()
    elif layout == "strided":
        t = random_tensor(dtype, (2 * a + 1, 3 * b), gen)[1::2, ::3]
    elif layout == "expanded":
        t = random_tensor(dtype, (1, b), gen).expand(a, b)
    elif layout == "permuted":
        t = random_tensor(dtype, (b, 2, a), gen).permute(2, 0, 1)
    elif layout == "offset":
        t = random_tensor(dtype, (a + 1, b + 2), gen)[1:, 2:]
    else:
        raise AssertionError(layout)
    assert not t.is_contiguous()
    return t


def make_any_tensor(layout: str, dtype: torch.dtype, gen: torch.Generator, a: int, b: int) -> torch.Tensor:
    """make_tensor, falling back to contiguous where a size-1 dim would make the view contiguous anyway."""
    if layout in ("contiguous", "0d", "empty", "empty2d") or (a > 1 and b > 1):
        return make_tensor(layout, dtype, gen, a, b)
    return make_tensor("contiguous", dtype, gen, a, b)


def check_plan(specs: list[TensorSpec], buffer_size: int | None, slots: list[Slot]) -> None:
    """Every invariant of plan_slots' output for ``specs``."""
    # Send order: tensors in order, buckets in order, numbered 0, 1, 2, ... with none skipped.
    assert [s.index for s in slots] == sorted(s.index for s in slots)
    buckets = [s.bucket for s in slots]
    assert buckets == sorted(buckets)
    if slots:
        assert buckets[0] == 0
        assert all(b2 - b1 in (0, 1) for b1, b2 in zip(buckets, buckets[1:]))
    for s in slots:
        assert s.spec == specs[s.index]

    # Every tensor's bytes covered exactly once, in order.
    per_tensor: dict[int, list[Slot]] = defaultdict(list)
    for s in slots:
        per_tensor[s.index].append(s)
    assert sorted(per_tensor) == list(range(len(specs)))
    for i, sp in enumerate(specs):
        chunks = per_tensor[i]
        pos = 0
        for c in chunks:
            assert c.start == pos
            assert c.length >= 0
            pos += c.length
        assert pos == sp.nbytes
        assert chunks[-1].is_last
        if buffer_size is None:
            assert chunks == [Slot(chunks[0].bucket, i, sp, 0, sp.nbytes, 0)]
            continue
        if sp.nbytes <= buffer_size:
            assert len(chunks) == 1, f"tensor {i} of {sp.nbytes} bytes fits a {buffer_size}-byte buffer but was split"
            assert chunks[0].is_whole
        else:
            assert len(chunks) >= 2
            assert all(c.length > 0 for c in chunks)
            assert [c.bucket for c in chunks] == list(range(chunks[0].bucket, chunks[0].bucket + len(chunks)))
            assert all(c.offset == 0 for c in chunks)  # the first slice too: a split starts a fresh bucket
            assert all(c.end == buffer_size for c in chunks[:-1])  # fill the buffer, then the next

    if buffer_size is None:
        check_unpacked_groups(slots)
        return
    # Per bucket: aligned, non-overlapping, inside the buffer, bounded slot count; check_bucket agrees.
    split_buckets: dict[int, set[int]] = {}
    prev_end, prev_count = None, None
    for b, group in groupby(slots, key=lambda s: s.bucket):
        group = list(group)
        assert 1 <= len(group) <= MAX_SLOTS_PER_BUCKET
        end = 0
        for s in group:
            assert s.offset % ALIGNMENT == 0
            assert s.offset >= end
            assert s.end <= buffer_size
            end = s.end
        assert check_bucket(group, buffer_size) == end
        # A split tensor's first slice opens its bucket (offset 0, no slot before it), and every
        # slice but the tail is alone in its bucket; only the tail's bucket may go on with later tensors.
        for k, s in enumerate(group):
            if s.spec.nbytes > buffer_size:
                if s.start == 0:
                    assert k == 0, f"split tensor {s.index} does not open bucket {b}"
                if not s.is_last:
                    assert group == [s], f"bucket {b} holds a non-tail slice of tensor {s.index} and more"
                split_buckets.setdefault(s.index, set()).add(b)
        # Greedy: a bucket is only closed when it is full by count, or its next tensor does not fit
        # after the cursor (the closed bucket always holds slots).
        first = group[0]
        if b > 0 and first.start == 0:
            cursor = align_up(prev_end)
            n = first.spec.nbytes
            assert prev_count >= 1
            assert prev_count >= MAX_SLOTS_PER_BUCKET or cursor + n > buffer_size, (
                f"bucket {b} opened for tensor {first.index} that fit in bucket {b - 1}"
            )
        prev_end, prev_count = end, len(group)
    # No two split tensors share a bucket.
    seen: set[int] = set()
    for index in sorted(split_buckets):
        assert not (split_buckets[index] & seen), f"split tensor {index} shares a bucket with another split tensor"
        seen |= split_buckets[index]


def check_unpacked_groups(slots: list[Slot]) -> None:
    """Unpacked grouping: at most UNPACKED_GROUP_TENSORS tensors and about UNPACKED_GROUP_BYTES per bucket,
    a bucket closed only when the next tensor would pass a limit."""
    groups = [list(g) for _, g in groupby(slots, key=lambda s: s.bucket)]
    for k, group in enumerate(groups):
        assert 1 <= len(group) <= UNPACKED_GROUP_TENSORS
        assert check_bucket(group, None) == 0
        total = sum(s.length for s in group)
        assert len(group) == 1 or total <= UNPACKED_GROUP_BYTES  # only a lone tensor may pass the limit
        if k + 1 < len(groups):
            nxt = groups[k + 1][0].length
            assert len(group) >= UNPACKED_GROUP_TENSORS or total + nxt > UNPACKED_GROUP_BYTES


# ----------------------------------------------------------------------------------------------
# plan_slots: hypothesis


dims = st.integers(0, 12)
shapes = st.one_of(
    st.lists(dims, max_size=3),
    st.lists(st.integers(0, 1500), min_size=1, max_size=1),
)
spec_lists = st.lists(st.tuples(st.sampled_from(DTYPES), shapes), max_size=25).map(
    lambda rows: [TensorSpec(f"t{i}", d, tuple(s)) for i, (d, s) in enumerate(rows)]
)
buffer_sizes = st.one_of(
    st.sampled_from([16, 17, 31, 32, 33, 48, 64, 100, 1000, 1024]),
    st.integers(16, 8192),
)


@settings(max_examples=300, **SETTINGS)
@given(specs=spec_lists, buffer_size=buffer_sizes)
def test_plan_invariants_random(specs, buffer_size):
    slots = list(plan_slots(specs, buffer_size))
    check_plan(specs, buffer_size, slots)


@settings(max_examples=100, **SETTINGS)
@given(specs=spec_lists)
def test_plan_unpacked_random(specs):
    slots = list(plan_slots(specs, None))
    check_plan(specs, None, slots)
    assert len(slots) == len(specs)


@settings(max_examples=150, **SETTINGS)
@given(specs=spec_lists, buffer_size=st.one_of(st.none(), buffer_sizes))
def test_plan_is_lazy(specs, buffer_size):
    pulled = 0

    def source():
        nonlocal pulled
        for sp in specs:
            pulled += 1
            yield sp

    last_index_in_bucket: dict[int, int] = {}
    for slot in plan_slots(source(), buffer_size):
        # Never looks ahead: when a slot of tensor i is yielded, exactly i + 1 specs were pulled.
        assert pulled == slot.index + 1
        if slot.bucket not in last_index_in_bucket and slot.bucket > 0:
            # First slot of bucket b+1: at most one spec beyond those of bucket b.
            assert pulled <= last_index_in_bucket[slot.bucket - 1] + 2
        last_index_in_bucket[slot.bucket] = slot.index
    assert pulled == len(specs)


# ----------------------------------------------------------------------------------------------
# plan_slots: explicit cases


def test_plan_exact_layout_with_alignment_padding():
    a, b, c = spec("a", torch.float32, 3), spec("b", torch.float32), spec("c", torch.float64, 2)
    slots = list(plan_slots([a, b, c], 32))
    assert slots == [
        Slot(0, 0, a, 0, 12, 0),
        Slot(0, 1, b, 0, 4, 16),  # 12 rounded up to 16
        Slot(1, 2, c, 0, 16, 0),  # align_up(20) + 16 > 32: new bucket
    ]


def test_plan_split_starts_new_bucket_then_whole_buffers_then_tail():
    a, big, c = u8("a", 10), u8("big", 200), u8("c", 5)
    slots = list(plan_slots([a, big, c], 64))
    assert slots == [
        Slot(0, 0, a, 0, 10, 0),  # bucket 0 keeps its free 48 bytes: big does not fit after the cursor
        Slot(1, 1, big, 0, 64, 0),  # the split starts a fresh bucket at offset 0
        Slot(2, 1, big, 64, 64, 0),
        Slot(3, 1, big, 128, 64, 0),
        Slot(4, 1, big, 192, 8, 0),
        Slot(4, 2, c, 0, 5, 16),  # the tail's bucket goes on
    ]
    check_plan([a, big, c], 64, slots)


def test_plan_consecutive_split_tensors_never_share_a_bucket():
    a, big1, big2, c = u8("a", 10), u8("big1", 100), u8("big2", 70), u8("c", 5)
    slots = list(plan_slots([a, big1, big2, c], 64))
    assert slots == [
        Slot(0, 0, a, 0, 10, 0),
        Slot(1, 1, big1, 0, 64, 0),
        Slot(2, 1, big1, 64, 36, 0),  # big1's tail: 16 bytes left after it, too few for big2
        Slot(3, 2, big2, 0, 64, 0),  # big2 opens a new bucket rather than filling big1's tail bucket
        Slot(4, 2, big2, 64, 6, 0),
        Slot(4, 3, c, 0, 5, 16),
    ]
    check_plan([a, big1, big2, c], 64, slots)
    # Back to back, with no small tensor before them, and an exact multiple of the buffer.
    x, y, z = u8("x", 128), u8("y", 65), u8("z", 80)
    slots = list(plan_slots([x, y, z], 64))
    buckets = {i: {s.bucket for s in slots if s.index == i} for i in range(3)}
    assert buckets == {0: {0, 1}, 1: {2, 3}, 2: {4, 5}}
    for i in range(3):
        first = next(s for s in slots if s.index == i)
        assert first.start == 0 and first.offset == 0
        assert slots[[s.bucket for s in slots].index(first.bucket)] == first  # first slot of its bucket
    check_plan([x, y, z], 64, slots)


def test_plan_split_when_current_bucket_is_full():
    a, big = u8("a", 64), u8("big", 100)
    slots = list(plan_slots([a, big], 64))
    assert slots == [Slot(0, 0, a, 0, 64, 0), Slot(1, 1, big, 0, 64, 0), Slot(2, 1, big, 64, 36, 0)]


def test_plan_tensor_exactly_buffer_size_is_not_split():
    a, b = u8("a", 1), spec("b", torch.float32, 16)
    slots = list(plan_slots([a, b], 64))
    assert slots == [Slot(0, 0, a, 0, 1, 0), Slot(1, 1, b, 0, 64, 0)]


def test_plan_split_across_many_buffers_bounds_memory():
    big = spec("w", torch.float32, 1000, 3)  # 12000 bytes
    slots = list(plan_slots([big], 1024))
    assert len(slots) == math.ceil(12000 / 1024)
    assert max(s.end for s in slots) == 1024
    assert [s.bucket for s in slots] == list(range(len(slots)))
    check_plan([big], 1024, slots)


def test_plan_unaligned_buffer_size():
    a, b, c = u8("a", 20), u8("b", 3), u8("c", 1)
    slots = list(plan_slots([a, b, c], 17))
    assert slots == [Slot(0, 0, a, 0, 17, 0), Slot(1, 0, a, 17, 3, 0), Slot(2, 1, b, 0, 3, 0), Slot(2, 2, c, 0, 1, 16)]
    check_plan([a, b, c], 17, slots)


def test_plan_zero_d_and_empty_tensors():
    s0 = spec("scalar", torch.float64)
    e1 = spec("empty", torch.float32, 0)
    e2 = spec("empty2", torch.int64, 4, 0, 3)
    s1 = spec("scalar_bool", torch.bool)
    specs = [s0, e1, e2, s1]
    assert [sp.nbytes for sp in specs] == [8, 0, 0, 1]
    assert s0.shape == () and e2.shape == (4, 0, 3)
    slots = list(plan_slots(specs, 16))
    assert slots == [
        Slot(0, 0, s0, 0, 8, 0),
        Slot(0, 1, e1, 0, 0, 16),  # an empty tensor at the very end of a full buffer, length 0
        Slot(0, 2, e2, 0, 0, 16),
        Slot(1, 3, s1, 0, 1, 0),
    ]
    assert all(s.is_whole and s.is_last for s in slots)
    check_plan(specs, 16, slots)
    unpacked = list(plan_slots(specs, None))
    assert unpacked == [Slot(0, i, sp, 0, sp.nbytes, 0) for i, sp in enumerate(specs)]


def test_plan_only_empty_tensors():
    specs = [spec(f"e{i}", torch.float32, 0) for i in range(5)]
    slots = list(plan_slots(specs, 16))
    assert [(s.bucket, s.offset, s.length) for s in slots] == [(0, 0, 0)] * 5
    check_plan(specs, 16, slots)


def test_plan_no_tensors():
    assert list(plan_slots([], 1024)) == []
    assert list(plan_slots([], None)) == []
    assert list(plan_slots(iter([]), 16)) == []


def test_plan_max_slots_per_bucket():
    n = 2 * MAX_SLOTS_PER_BUCKET + 5
    specs = [spec(f"s{i}", torch.uint8) for i in range(n)]
    slots = list(plan_slots(specs, 1 << 20))
    counts = [len(list(g)) for _, g in groupby(slots, key=lambda s: s.bucket)]
    assert counts == [MAX_SLOTS_PER_BUCKET, MAX_SLOTS_PER_BUCKET, 5]
    assert slots[MAX_SLOTS_PER_BUCKET] == Slot(1, MAX_SLOTS_PER_BUCKET, specs[MAX_SLOTS_PER_BUCKET], 0, 1, 0)
    check_plan(specs, 1 << 20, slots)


def test_plan_max_slots_then_oversized_tensor():
    specs = [spec(f"e{i}", torch.float32, 0) for i in range(MAX_SLOTS_PER_BUCKET)] + [u8("big", 40)]
    slots = list(plan_slots(specs, 16))
    counts = [len(list(g)) for _, g in groupby(slots, key=lambda s: s.bucket)]
    assert counts == [MAX_SLOTS_PER_BUCKET, 1, 1, 1]
    assert [(s.bucket, s.start, s.length, s.offset) for s in slots[-3:]] == [(1, 0, 16, 0), (2, 16, 16, 0), (3, 32, 8, 0)]
    check_plan(specs, 16, slots)


def test_plan_max_slots_minus_one_then_oversized_tensor():
    specs = [spec(f"e{i}", torch.float32, 0) for i in range(MAX_SLOTS_PER_BUCKET - 1)] + [u8("big", 40)]
    slots = list(plan_slots(specs, 16))
    counts = [len(list(g)) for _, g in groupby(slots, key=lambda s: s.bucket)]
    assert counts == [MAX_SLOTS_PER_BUCKET - 1, 1, 1, 1]  # bucket 0 holds slots: the split starts bucket 1
    assert [(s.bucket, s.start, s.length, s.offset) for s in slots[-3:]] == [(1, 0, 16, 0), (2, 16, 16, 0), (3, 32, 8, 0)]
    check_plan(specs, 16, slots)


def test_plan_unpacked_groups_whole_tensors():
    specs = [spec("a", torch.float32, 1000, 1000), u8("b", 3), spec("c", torch.bfloat16, 0)]
    slots = list(plan_slots(specs, None))
    assert slots == [Slot(0, i, sp, 0, sp.nbytes, 0) for i, sp in enumerate(specs)]
    assert check_bucket(slots, None) == 0


def test_plan_unpacked_tensor_limit():
    assert UNPACKED_GROUP_TENSORS == 256
    specs = [u8(f"s{i}", 1) for i in range(2 * UNPACKED_GROUP_TENSORS + 3)]
    slots = list(plan_slots(specs, None))
    counts = [len(list(g)) for _, g in groupby(slots, key=lambda s: s.bucket)]
    assert counts == [UNPACKED_GROUP_TENSORS, UNPACKED_GROUP_TENSORS, 3]
    check_plan(specs, None, slots)


def test_plan_unpacked_byte_limit():
    assert UNPACKED_GROUP_BYTES == 256 << 20
    mib = UNPACKED_GROUP_BYTES // 64  # the limit is 64 of these units (4 MiB each)
    sizes = [40 * mib, 30 * mib, 20 * mib, 14 * mib, 0, 1, 100 * mib, 1, 64 * mib, 0, 1]
    specs = [u8(f"t{i}", n) for i, n in enumerate(sizes)]
    slots = list(plan_slots(specs, None))
    assert [s.bucket for s in slots] == [
        0,  # 40 MiB
        1,  # 40 + 30 > 64: a new bucket
        1,  # 30 + 20
        1,  # 30 + 20 + 14 == 64: still fits
        1,  # an empty tensor adds nothing
        2,  # one more byte passes the limit
        3,  # 1 + 100 MiB > 64 MiB
        4,  # 100 MiB bucket is over the limit: closed
        5,  # 1 + 64 MiB > 64 MiB
        5,  # 64 MiB + 0
        6,
    ]
    # A tensor over the limit travels in a bucket of its own when the bucket is empty.
    assert list(plan_slots([u8("huge", 100 * mib)], None)) == [Slot(0, 0, u8("huge", 100 * mib), 0, 100 * mib, 0)]
    check_plan(specs, None, slots)


def test_plan_lazy_explicit():
    pulled = []

    def source():
        for i, n in enumerate([10, 10, 100, 10]):
            pulled.append(i)
            yield u8(f"t{i}", n)

    it = plan_slots(source(), 64)
    assert pulled == []  # a generator: nothing pulled before the first next()
    first = next(it)
    assert (first.bucket, first.index, pulled) == (0, 0, [0])
    assert next(it).index == 1 and pulled == [0, 1]
    s = next(it)
    assert (s.bucket, s.index, s.length, s.offset, pulled) == (1, 2, 64, 0, [0, 1, 2])  # bucket 1 opens with tensor 2 in hand
    s = next(it)
    assert (s.bucket, s.index, s.length, s.offset, pulled) == (2, 2, 36, 0, [0, 1, 2])
    s = next(it)
    assert (s.bucket, s.index, s.offset, pulled) == (2, 3, 48, [0, 1, 2, 3])
    assert next(it, None) is None


@pytest.mark.parametrize("bad", [0, 15, -16, 16.0, True, "64", [64]])
def test_plan_rejects_bad_buffer_size(bad):
    with pytest.raises(ValueError, match="buffer_size"):
        list(plan_slots([u8("a", 1)], bad))


def test_tensor_spec_validation():
    assert TensorSpec("a", torch.float32, torch.Size([2, 3])).shape == (2, 3)
    assert TensorSpec("a", torch.float32, [2, 3]).nbytes == 24
    assert TensorSpec.of("a", torch.zeros(2, 3, dtype=torch.bfloat16)) == spec("a", torch.bfloat16, 2, 3)
    for bad_shape in ([-1], [1.5], ["3"], [True], 3, [2] * 65):
        with pytest.raises(ValueError):
            TensorSpec("a", torch.float32, bad_shape)
    with pytest.raises(ValueError):
        TensorSpec(1, torch.float32, [1])
    with pytest.raises(ValueError):
        TensorSpec("q", torch.qint8, [1])
    with pytest.raises(ValueError, match="meta"):
        TensorSpec.of("m", torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="dense"):
        TensorSpec.of("s", torch.eye(3).to_sparse())
    with pytest.raises(ValueError):
        TensorSpec.of("x", [1.0])


# ----------------------------------------------------------------------------------------------
# pack / slot_view / typed_view round trip


def roundtrip(tensors: list[torch.Tensor], buffer_size: int | None) -> list[torch.Tensor]:
    """Plan, pack into poisoned buffers, check that only slot bytes were written, then unpack."""
    specs = [TensorSpec.of(f"t{i}", t) for i, t in enumerate(tensors)]
    slots = list(plan_slots(specs, buffer_size))
    check_plan(specs, buffer_size, slots)
    received: dict[int, torch.Tensor] = {}
    chunks: dict[int, list[torch.Tensor]] = defaultdict(list)
    for _, group in groupby(slots, key=lambda s: s.bucket):
        group = list(group)
        # Unpacked: every slot (a whole tensor at offset 0) travels in a buffer of its own.
        bufs = [group] if buffer_size is not None else [[s] for s in group]
        for members in bufs:
            size = buffer_size if buffer_size is not None else members[0].length
            buf = torch.full((size,), POISON, dtype=torch.uint8)
            for s in members:
                pack(buf, s, tensors[s.index])
            untouched = torch.ones(size, dtype=torch.bool)
            for s in members:
                untouched[s.offset : s.end] = False
            assert bool((buf[untouched] == POISON).all()), "packing wrote outside its slot"
            unpack(buf, members, received, chunks)
            buf.fill_(POISON)  # a reused buffer: later buckets must not depend on earlier contents
    assert not chunks
    assert sorted(received) == list(range(len(tensors)))
    return [received[i] for i in range(len(tensors))]


def pack(buf: torch.Tensor, s: Slot, tensor: torch.Tensor) -> None:
    """What the sender does for one slot: a typed copy for a whole tensor, a byte range copy for a split one."""
    if s.is_whole:
        typed_view(slot_view(buf, s), s.spec).copy_(tensor)
    else:
        slot_view(buf, s).copy_(tensor_bytes(tensor)[s.start : s.start + s.length])


def unpack(buf: torch.Tensor, group: list[Slot], received: dict, chunks: dict) -> None:
    for s in group:
        raw = slot_view(buf, s)
        assert raw.dtype == torch.uint8 and raw.numel() == s.length
        if s.is_whole:
            received[s.index] = typed_view(raw, s.spec).clone()
        else:
            chunks[s.index].append(raw.clone())
            if s.is_last:
                received[s.index] = typed_view(torch.cat(chunks.pop(s.index)), s.spec)


def assert_bit_exact(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype
    assert tuple(out.shape) == tuple(ref.shape)
    assert torch.equal(out.contiguous().reshape(-1).view(torch.uint8), ref.contiguous().reshape(-1).view(torch.uint8))
    assert bytes_equal(out, ref)


MODES = {"packed_whole": 1 << 16, "packed_split": 16, "packed_split_odd": 40, "unpacked": None}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_dtype_and_layouts(dtype, mode):
    gen = torch.Generator().manual_seed(1234 + DTYPES.index(dtype))
    tensors = [make_tensor(layout, dtype, gen) for layout in LAYOUTS]
    ref = [t.clone() for t in tensors]
    out = roundtrip(tensors, MODES[mode])
    for o, r, t in zip(out, ref, tensors):
        assert_bit_exact(o, r)
        assert_bit_exact(t, r)  # the source is not modified
    if MODES[mode] == 16 and dtype.itemsize < 16:
        # 6x7 elements never fit 16 bytes: the split path was exercised.
        specs = [TensorSpec.of(f"t{i}", t) for i, t in enumerate(tensors)]
        assert any(not s.is_whole for s in plan_slots(specs, 16))


def test_random_bits_are_not_trivial():
    gen = torch.Generator().manual_seed(0)
    t = random_tensor(torch.float32, (64,), gen)
    b = tensor_bytes(t)
    assert b.numel() == 256 and 10 < int(b.unique().numel())


@settings(max_examples=60, **SETTINGS)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.sampled_from(LAYOUTS), st.integers(1, 9), st.integers(1, 9)),
        min_size=1,
        max_size=8,
    ),
    buffer_size=st.one_of(st.none(), st.integers(16, 600)),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_random_mixes(rows, buffer_size, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [make_any_tensor(layout, dtype, gen, a, b) for dtype, layout, a, b in rows]
    out = roundtrip(tensors, buffer_size)
    for o, t in zip(out, tensors):
        assert_bit_exact(o, t)


@settings(max_examples=80, **SETTINGS)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(DTYPES[:9]), st.sampled_from(LAYOUTS + ["vector"] * 6 + ["cube"] * 3 + ["conj"] * 2),
                  st.integers(1, 4), st.integers(1, 4)),
        min_size=1,
        max_size=12,
    ),
    buffer_size=st.integers(128, 4096),
    drop=st.sets(st.integers(0, 11), max_size=2),
    one_dtype=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    alone_bytes=st.one_of(st.none(), st.integers(1, 256)),
)
def test_concat_plan_packs_every_whole_slot_bit_for_bit(rows, buffer_size, drop, one_dtype, seed, alone_bytes):
    """Packing a bucket's whole tensors as concat_plan says (one torch.cat per segment, one
    multi-tensor copy for the rest, a copy each for those of ``alone_bytes`` or more) writes
    exactly the bytes of packing slot by slot; every position is packed once, and segments only
    join alike slots that lie back to back."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for dtype, layout, a, b in rows:
        dtype = rows[0][0] if one_dtype else dtype
        if layout == "vector":
            tensors.append(random_tensor(dtype, (4 * a,), gen))
        elif layout == "cube":
            tensors.append(random_tensor(dtype, (a, 2, 2), gen))
        elif layout == "conj":
            tensors.append(random_tensor(torch.complex64, (a, 3), gen).conj())
        else:
            tensors.append(make_any_tensor(layout, dtype, gen, a, b))
    specs = [TensorSpec.of(f"t{i}", t) for i, t in enumerate(tensors)]
    slots = plan_slots(specs, buffer_size)
    for _, group in groupby(slots, key=lambda s: s.bucket):
        group = list(group)
        extent = max(s.end for s in group)
        positions = [p for p, s in enumerate(group) if s.is_whole and s.length and p not in drop]
        expected = torch.full((extent,), POISON, dtype=torch.uint8)
        for p in positions:
            pack(expected, group[p], tensors[group[p].index])
        buf = torch.full((extent,), POISON, dtype=torch.uint8)
        plan = concat_plan(buf, group, positions, alone_bytes=alone_bytes)
        segments, rest = plan.segments, plan.rest
        covered = [p for first, end, _ in segments for p in range(first, end)] + rest + list(plan.alone)
        assert sorted(covered) == positions
        expected_alone = [] if alone_bytes is None else [p for p in positions if group[p].length >= alone_bytes]
        assert list(plan.alone) == expected_alone
        for first, end, out in segments:
            assert end - first >= 2
            assert all(group[p + 1].offset == group[p].end for p in range(first, end - 1))
            assert len({(group[p].spec.dtype, tuple(group[p].spec.shape[1:])) for p in range(first, end)}) == 1
        plan.pack([tensors[s.index] for s in group])
        assert torch.equal(buf, expected)


def test_concat_plan_joins_alike_neighbours_only():
    """Three alike vectors, a matrix, two alike matrices, a 0-d tensor: two segments."""
    shapes = [((8,), torch.float32)] * 3 + [((2, 4), torch.float32)] + [((3, 4), torch.float32)] * 2 + [((), torch.float32)]
    specs = [TensorSpec.of(f"t{i}", torch.zeros(shape, dtype=dtype)) for i, (shape, dtype) in enumerate(shapes)]
    slots = list(plan_slots(specs, 1 << 16))
    buf = torch.zeros(max(s.end for s in slots), dtype=torch.uint8)
    plan = concat_plan(buf, slots, list(range(len(slots))))
    segments, rest = plan.segments, plan.rest
    assert [(first, end, tuple(out.shape)) for first, end, out in segments] == [(0, 3, (24,)), (3, 6, (8, 4))]
    assert rest == [6]
    # A gap in the positions (a slot sent from its own memory) ends a segment.
    plan = concat_plan(buf, slots, [0, 2, 4, 5])
    assert [(first, end) for first, end, _ in plan.segments] == [(4, 6)] and plan.rest == [0, 2]
    # Slots of at least alone_bytes are copied one by one, and split the segments around them.
    plan = concat_plan(buf, slots, list(range(len(slots))), alone_bytes=48)
    assert plan.alone == (4, 5) and [(first, end) for first, end, _ in plan.segments] == [(0, 3)]
    assert plan.rest == [3, 6] and [v.data_ptr() for v in plan.alone_views] == [buf[slots[p].offset :].data_ptr() for p in (4, 5)]


def test_split_tensor_reassembled_from_chunks_explicit():
    gen = torch.Generator().manual_seed(7)
    big = random_tensor(torch.float64, (33, 5), gen).t()  # 1320 bytes, non-contiguous
    small = random_tensor(torch.int16, (3,), gen)
    specs = [TensorSpec.of("small", small), TensorSpec.of("big", big)]
    slots = list(plan_slots(specs, 256))
    big_chunks = [s for s in slots if s.index == 1]
    assert len(big_chunks) == 6 and big_chunks[0].offset == 0 and big_chunks[0].length == 256
    assert [s.bucket for s in big_chunks] == [1, 2, 3, 4, 5, 6] and big_chunks[-1].length == 1320 - 5 * 256
    out = roundtrip([small, big], 256)
    assert_bit_exact(out[0], small)
    assert_bit_exact(out[1], big)


def test_pack_requires_grad_parameter():
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(random_tensor(torch.float32, (5, 9), gen).nan_to_num())
    for buffer_size in (1 << 10, 16):
        (out,) = roundtrip([p], buffer_size)
        assert_bit_exact(out, p.detach())
        assert not out.requires_grad


def test_conj_view_whole_slot():
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(4, 3, dtype=torch.complex64, generator=gen).conj()
    assert t.is_conj()
    (out,) = roundtrip([t], 1 << 10)
    assert_bit_exact(out, t.resolve_conj())


def test_conj_view_split_slot():
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(4, 3, dtype=torch.complex64, generator=gen).conj()
    assert torch.equal(tensor_bytes(t), tensor_bytes(t.resolve_conj()))
    (out,) = roundtrip([t], 16)
    assert_bit_exact(out, t.resolve_conj())


def test_tensor_bytes():
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3).t()
    b = tensor_bytes(t)
    assert b.dtype == torch.uint8 and b.shape == (12,)
    assert b.view(torch.int16).tolist() == [0, 3, 1, 4, 2, 5]
    assert tensor_bytes(torch.tensor(7, dtype=torch.int32)).view(torch.int32).tolist() == [7]
    assert tensor_bytes(torch.empty(0, 4)).numel() == 0


def test_typed_view_is_a_view():
    buf = torch.full((64,), POISON, dtype=torch.uint8)
    sp = spec("w", torch.float32, 2, 2)
    slot = Slot(0, 0, sp, 0, 16, 16)
    v = typed_view(slot_view(buf, slot), sp)
    assert v.dtype == torch.float32 and v.shape == (2, 2)
    v.fill_(1.5)
    assert buf[:16].eq(POISON).all() and buf[32:].eq(POISON).all()
    assert buf[16:32].view(torch.float32).tolist() == [1.5] * 4


# ----------------------------------------------------------------------------------------------
# payload_runs: how a bucket's payload is split into broadcasts


def test_own_run_threshold():
    assert own_run_threshold(None) == own_run_threshold(None, "gloo") == 0
    for size in (16, 1 << 20, 8 << 20, 32 << 20, 256 << 20, 1 << 30):
        assert own_run_threshold(size) == NCCL_DIRECT_MIN_BYTES == 8 << 20
        assert own_run_threshold(size, "gloo") == max(GLOO_DIRECT_MIN_BYTES, size // 8)


def test_payload_runs_explicit_small():
    # Below the threshold everything is packed: consecutive slots merge into one range, padding included.
    a, b, c, d, e = u8("a", 10), u8("b", 20), u8("c", 5), spec("e", torch.float32, 0), u8("d", 3)
    slots = [Slot(0, 0, a, 0, 10, 0), Slot(0, 1, b, 0, 20, 16), Slot(0, 2, c, 0, 5, 48), Slot(0, 3, d, 0, 0, 64),
             Slot(0, 4, e, 0, 3, 64)]  # fmt: skip
    assert payload_runs(slots, 1024) == [(0, 67, None)]
    assert payload_runs([], 1024) == []
    assert payload_runs([Slot(0, 0, d, 0, 0, 0)], 1024) == []  # empty ranges are left out


def test_payload_runs_own_first_then_merged_ranges():
    mib = 1 << 20
    size = 64 * mib  # threshold 8 MiB
    big1, big2, small, tiny, empty = u8("big1", 8 * mib), u8("big2", 20 * mib), u8("s", 100), u8("t", 7), u8("e", 0)
    off = [0, 112, 112 + 8 * mib, 128 + 8 * mib, 128 + 28 * mib, 128 + 28 * mib]
    slots = [Slot(0, 0, small, 0, 100, off[0]), Slot(0, 1, tiny, 0, 7, off[1]), Slot(0, 2, big1, 0, 8 * mib, off[1] + 16),
             Slot(0, 3, tiny, 0, 7, off[3]), Slot(0, 4, big2, 0, 20 * mib, off[4]), Slot(0, 5, empty, 0, 0, off[5] + 20 * mib),
             Slot(0, 6, small, 0, 100, off[5] + 20 * mib)]  # fmt: skip
    assert check_bucket(slots, size)
    runs = payload_runs(slots, size)
    assert runs == [
        (slots[2].offset, slots[2].end, 2),  # own runs first, in slot order
        (slots[4].offset, slots[4].end, 4),
        (0, slots[1].end, None),  # slots 0 and 1 merged
        (slots[3].offset, slots[3].end, None),
        (slots[5].offset, slots[6].end, None),  # the empty slot joins the next range
    ]
    # Just under the threshold a slot is packed like any other.
    under = [Slot(1, 0, u8("u", 8 * mib - 1), 0, 8 * mib - 1, 0), Slot(1, 1, small, 0, 100, 8 * mib)]
    assert payload_runs(under, size) == [(0, 8 * mib + 100, None)]
    # A split slot (part of a tensor) large enough travels alone too.
    part = Slot(3, 9, u8("w", 100 * mib), 64 * mib, 30 * mib, 0)
    assert payload_runs([part], size) == [(0, 30 * mib, 0)]


def test_payload_runs_cut_the_first_range_of_bucket_0_on_nccl_only(monkeypatch):
    """On NCCL, bucket 0's first slot of 4 MiB or more travels alone (from its own memory), and the
    first packed range (64 MiB or more) travels in three pieces cut at the slot starts nearest after
    1/8 and 1/2 of it; any other bucket, a smaller slot or range, or Gloo: one range."""
    import torchxfer.packing as packing

    monkeypatch.setattr(packing, "NCCL_DIRECT_MIN_BYTES", 512 << 20)  # 40 MiB slots packed, as they would be below 8 MiB
    mib = 1 << 20
    size = 1 << 30  # own runs from 512 MiB
    specs = [u8(f"w{i}", 40 * mib) for i in range(20)]  # 800 MiB of 40 MiB slots
    slots = [Slot(0, i, sp, 0, sp.nbytes, i * 40 * mib) for i, sp in enumerate(specs)]
    assert payload_runs(slots, size) == [(0, 40 * mib, 0), (40 * mib, 160 * mib, None), (160 * mib, 440 * mib, None),
                                         (440 * mib, 800 * mib, None)]  # fmt: skip
    check_runs(slots, size, payload_runs(slots, size))
    assert payload_runs(slots, size, "gloo") == [(0, 800 * mib, None)]
    later = [Slot(1, s.index, s.spec, 0, s.length, s.offset) for s in slots]
    assert payload_runs(later, size) == [(0, 400 * mib, None), (400 * mib, 800 * mib, None)]  # see the next test
    assert payload_runs(later[:12], size) == [(0, 480 * mib, None)]  # under 512 MiB: one range
    tiny_first = [Slot(0, 0, u8("t", 4 * mib - 1), 0, 4 * mib - 1, 0), Slot(0, 1, specs[0], 0, 40 * mib, 4 * mib)]
    assert payload_runs(tiny_first, size) == [(0, 44 * mib, None)]  # packed with the rest; under the cut's minimum
    small = slots[:1]  # 40 MiB alone in its bucket: travels alone
    assert payload_runs(small, size) == [(0, 40 * mib, 0)]
    one = [Slot(0, 0, u8("one", 100 * mib), 0, 100 * mib, 0), Slot(0, 1, u8("s", 16), 0, 16, 100 * mib)]
    assert payload_runs(one, size) == [(0, 100 * mib, 0), (100 * mib, 100 * mib + 16, None)]


def test_payload_runs_cut_large_ranges_of_later_buckets_in_two_on_nccl_only(monkeypatch):
    """On NCCL a packed range of 512 MiB or more in a bucket other than 0 travels as two ranges, cut
    at the slot start nearest its middle, unless that leaves a piece under a quarter of the range."""
    import torchxfer.packing as packing

    mib = 1 << 20
    monkeypatch.setattr(packing, "NCCL_DIRECT_MIN_BYTES", 1 << 40)  # every whole slot packed
    size = 1 << 30
    sizes = [92 * mib] * 11  # 1012 MiB: the middle (506) lies inside slot 5 (460-552), nearer its start
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    slots = [Slot(1, i, u8(f"w{i}", n), 0, n, o) for i, (n, o) in enumerate(zip(sizes, offsets))]
    assert payload_runs(slots, size) == [(0, 460 * mib, None), (460 * mib, 1012 * mib, None)]
    check_runs(slots, size, payload_runs(slots, size))
    assert payload_runs(slots, size, "gloo") == [(0, 1012 * mib, None)]
    # A slot boundary only near the ends: not cut.
    lopsided = [Slot(2, 0, u8("a", 900 * mib), 0, 900 * mib, 0), Slot(2, 1, u8("b", 100 * mib), 0, 100 * mib, 900 * mib)]
    assert payload_runs(lopsided, 2 * size) == [(0, 1000 * mib, None)]  # 2 GiB: no own run
    # With a 2 GiB buffer (own runs from 1 GiB): 600 + 300 + 300 MiB packed, cut at 600.
    parts = [Slot(3, i, u8(f"p{i}", n), 0, n, o) for i, (n, o) in enumerate([(600 * mib, 0), (300 * mib, 600 * mib),
                                                                              (300 * mib, 900 * mib)])]  # fmt: skip
    assert payload_runs(parts, 2 * size) == [(0, 600 * mib, None), (600 * mib, 1200 * mib, None)]
    check_runs(parts, 2 * size, payload_runs(parts, 2 * size))


def test_payload_runs_split_parts_travel_alone():
    size = 1 << 30  # threshold 512 MiB
    # A part of a split tensor travels alone, whatever its size; small whole slots after it merge.
    tail = Slot(1, 0, u8("big", size + 100), size, 100, 0)
    slots = [tail, Slot(1, 1, u8("x", 10), 0, 10, 112), Slot(1, 2, u8("y", 10), 0, 10, 128)]
    assert payload_runs(slots, size) == [(0, 100, 0), (112, 138, None)]
    assert payload_runs(slots, size, "gloo") == [(0, 100, 0), (112, 138, None)]


def test_payload_runs_unpacked_all_alone():
    a, b, e, c = u8("a", 10), spec("b", torch.float32, 3), u8("e", 0), u8("c", 1)
    slots = [Slot(0, i, sp, 0, sp.nbytes, 0) for i, sp in enumerate([a, b, e, c])]
    assert payload_runs(slots, None) == [(0, 10, 0), (0, 12, 1), (0, 1, 3)]  # the empty tensor sends nothing
    assert payload_runs([Slot(0, 0, e, 0, 0, 0)], None) == []


def check_groups(runs: list, groups: tuple, backend: str = "nccl") -> None:
    """``groups`` cut ``runs`` in order into non-empty ranges; on Gloo one run each; on NCCL at
    most GROUP_BYTES each (unless one run), a packed range of GROUP_PACKED_ALONE_BYTES or more
    alone, and no two neighbours could have been one group."""
    assert [i for first, last in groups for i in range(first, last)] == list(range(len(runs)))
    assert all(first < last for first, last in groups)
    if backend != "nccl":
        assert all(last == first + 1 for first, last in groups)
        return

    def size(g):
        return sum(end - start for start, end, _ in runs[g[0] : g[1]])

    def alone(i):
        start, end, pos = runs[i]
        return pos is None and end - start >= GROUP_PACKED_ALONE_BYTES

    for g in groups:
        assert g[1] == g[0] + 1 or (size(g) <= GROUP_BYTES and not any(alone(i) for i in range(*g)))
    for a, b in zip(groups, groups[1:]):
        assert alone(a[1] - 1) or alone(b[0]) or size(a) + runs[b[0]][1] - runs[b[0]][0] > GROUP_BYTES


def test_payload_groups_explicit():
    mib = 1 << 20
    runs = [(0, 100 * mib, 0), (0, 100 * mib, 1), (0, 100 * mib, 2), (0, 16, None), (32, 64, None)]
    assert payload_groups(runs) == ((0, 2), (2, 5))  # 200 MiB, then 100 MiB and the small ranges
    assert payload_groups(runs, "gloo") == tuple((i, i + 1) for i in range(5))
    assert payload_groups([]) == ()
    big_packed = [(0, 8 * mib, 0), (0, 4 * mib, None), (4 * mib, 4 * mib + 16, None), (0, 300 * mib, 3)]
    assert payload_groups(big_packed) == ((0, 1), (1, 2), (2, 3), (3, 4))  # a 4 MiB packed range alone
    assert payload_groups([(0, 600 * mib, 0), (0, 16, None)]) == ((0, 1), (1, 2))
    check_groups(runs, payload_groups(runs))
    check_groups(big_packed, payload_groups(big_packed))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.booleans()), max_size=30))
def test_payload_groups_properties(parts):
    mib = 1 << 20
    runs = [(0, n * mib, None if packed else i) for i, (n, packed) in enumerate(parts) if n]
    for backend in ("nccl", "gloo"):
        check_groups(runs, payload_groups(runs, backend), backend)


def check_runs(slots: list[Slot], buffer_size: int | None, runs: list, backend: str = "nccl") -> None:
    thr = own_run_threshold(buffer_size, backend)
    first = backend == "nccl" and buffer_size is not None  # bucket 0's first slot from 4 MiB travels alone

    def alone(p: int, s: Slot) -> bool:
        return s.length >= thr or not s.is_whole or (first and p == 0 and s.bucket == 0 and s.length >= DIRECT_MIN_BYTES)

    own = [(s.offset, s.end, p) for p, s in enumerate(slots) if s.length and alone(p, s)]
    assert runs[: len(own)] == own
    packed = runs[len(own) :]
    assert all(p is None for _, _, p in packed)
    if buffer_size is None:
        assert packed == []
        return
    assert all(start < end <= buffer_size for start, end, _ in packed)
    assert all(r1[1] <= r2[0] for r1, r2 in zip(packed, packed[1:]))
    own_pos = {p for _, _, p in own}
    for pos, s in enumerate(slots):
        if s.length and pos not in own_pos:
            assert any(start <= s.offset and s.end <= end for start, end, _ in packed)
    for start, end, _ in packed:
        assert not any(o < end and start < e for o, e, _ in own)
    # Maximal: two packed ranges are separated by an own slot, except the cuts of large ranges
    # on NCCL (adjacent, at slot starts).
    starts = {s.offset for s in slots}
    for r1, r2 in zip(packed, packed[1:]):
        cut = backend == "nccl" and r1[1] == r2[0] and r2[0] in starts
        assert cut or any(r1[1] <= o and e <= r2[0] for o, e, _ in own)


def deliver(tensors: list[torch.Tensor], buffer_size: int | None) -> None:
    """Simulate the broadcasts: packed ranges from the sender's buffer, own runs from the tensor's own
    bytes, each landing at [start, end) of a poisoned receive buffer; every tensor arrives bit-exact."""
    specs = [TensorSpec.of(f"t{i}", t) for i, t in enumerate(tensors)]
    received: dict[int, torch.Tensor] = {}
    chunks: dict[int, list[torch.Tensor]] = defaultdict(list)
    for _, group in groupby(plan_slots(specs, buffer_size), key=lambda s: s.bucket):
        slots = list(group)
        runs = payload_runs(slots, buffer_size)
        check_runs(slots, buffer_size, runs)
        own = {p for _, _, p in runs if p is not None}
        if buffer_size is None:
            assert own == {p for p, s in enumerate(slots) if s.length}
            for p, s in enumerate(slots):
                recv = torch.full((s.length,), POISON, dtype=torch.uint8)
                for start, end, q in runs:
                    if q == p:
                        recv[start:end].copy_(tensor_bytes(tensors[s.index]))
                unpack(recv, [s], received, chunks)
            continue
        send = torch.full((buffer_size,), POISON, dtype=torch.uint8)
        for pos, s in enumerate(slots):
            if pos not in own:
                pack(send, s, tensors[s.index])
        recv = torch.full((buffer_size,), POISON, dtype=torch.uint8)
        for start, end, p in runs:
            if p is None:
                src = send[start:end]
            else:
                s = slots[p]
                src = tensor_bytes(tensors[s.index])[s.start : s.start + s.length]
            assert src.numel() == end - start
            recv[start:end].copy_(src)
        unpack(recv, slots, received, chunks)
    assert not chunks
    for i, t in enumerate(tensors):
        assert_bit_exact(received[i], t)


@settings(max_examples=80, **SETTINGS)
@given(
    rows=st.lists(st.tuples(st.sampled_from(DTYPES), st.sampled_from(LAYOUTS), st.integers(1, 6), st.integers(1, 6)),
                  min_size=1, max_size=10),
    buffer_size=st.one_of(st.none(), st.integers(16, 400)),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_payload_runs_deliver_every_slot(rows, buffer_size, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [make_any_tensor(layout, dtype, gen, a, b) for dtype, layout, a, b in rows]
    deliver(tensors, buffer_size)


def test_payload_runs_deliver_with_own_runs():
    # 16 MiB buffers: slots of 4 MiB and more travel alone, including the chunks of a split tensor.
    gen = torch.Generator().manual_seed(11)
    mib = 1 << 20
    tensors = [
        random_tensor(torch.uint8, (100,), gen),
        random_tensor(torch.float32, (mib + 1,), gen),  # just over 4 MiB: own
        random_tensor(torch.int16, (3, 5), gen).t(),
        random_tensor(torch.uint8, (4 * mib,), gen),  # exactly the threshold: own
        random_tensor(torch.bfloat16, (0,), gen),
        random_tensor(torch.float64, (5 * mib // 2,), gen),  # 20 MiB: split, chunks own
        random_tensor(torch.uint8, (4 * mib - 1,), gen),  # just under: packed
        random_tensor(torch.int8, (7,), gen),
    ]
    specs = [TensorSpec.of(f"t{i}", t) for i, t in enumerate(tensors)]
    slots = list(plan_slots(specs, 16 * mib))
    assert any(not s.is_whole and s.length >= 4 * mib for s in slots)
    runs = [r for _, g in groupby(slots, key=lambda s: s.bucket) for r in payload_runs(list(g), 16 * mib)]
    assert any(p is not None for _, _, p in runs) and any(p is None for _, _, p in runs)
    deliver(tensors, 16 * mib)


# ----------------------------------------------------------------------------------------------
# dtype names


CANONICAL = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
]  # fmt: skip


@pytest.mark.parametrize("name", [n for n in CANONICAL if isinstance(getattr(torch, n, None), torch.dtype)])
def test_dtype_canonical_names(name):
    dtype = getattr(torch, name)
    assert dtype_name(dtype) == name
    assert parse_dtype(name) is dtype
    assert parse_dtype("torch." + name) is dtype
    assert parse_dtype(str(dtype)) is dtype  # str(torch.float32) == "torch.float32"


@pytest.mark.parametrize(
    ("alias", "dtype"),
    [
        ("float", torch.float32), ("half", torch.float16), ("double", torch.float64),
        ("long", torch.int64), ("int", torch.int32), ("short", torch.int16),
        ("cfloat", torch.complex64), ("cdouble", torch.complex128),
        ("torch.float32", torch.float32), ("torch.float", torch.float32), ("torch.half", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
    ],
)  # fmt: skip
def test_dtype_aliases(alias, dtype):
    assert parse_dtype(alias) is dtype
    assert dtype_name(parse_dtype(alias)) == dtype_name(dtype)  # aliases canonicalize


def test_dtype_name_of_aliases_is_canonical():
    assert dtype_name(torch.float) == "float32"
    assert dtype_name(torch.half) == "float16"
    assert dtype_name(torch.long) == "int64"


@pytest.mark.parametrize(
    "bad",
    ["nn", "Tensor", "qint8", "quint8", "qint32", "", "torch.", "torch.nn", "torch.Tensor", "torch.torch.float32",
     "Float32", "float32 ", " float32", "__class__", "device", "dtype", "float8", "randn", "torch.qint8",
     None, 32, 1.5, torch.float32, ["float32"], b"float32"],
)  # fmt: skip
def test_parse_dtype_rejects(bad):
    with pytest.raises(ValueError):
        parse_dtype(bad)


def test_parse_dtype_error_names_value():
    with pytest.raises(ValueError, match="'nn'"):
        parse_dtype("nn")
    with pytest.raises(ValueError, match="'Tensor'"):
        parse_dtype("Tensor")


@pytest.mark.parametrize("bad", [torch.qint8, torch.quint8, "float32", None, 3, [1]])
def test_dtype_name_rejects(bad):
    with pytest.raises(ValueError):
        dtype_name(bad)


# ----------------------------------------------------------------------------------------------
# check_bucket


def test_check_bucket_accepts_and_returns_payload_bytes():
    a, b = u8("a", 10), u8("b", 20)
    slots = [Slot(0, 0, a, 0, 10, 0), Slot(0, 1, b, 0, 20, 16)]
    assert check_bucket(slots, 64) == 36
    assert check_bucket(slots, 36) == 36
    for size in (64, None):
        with pytest.raises(ValueError, match="at least one slot"):
            check_bucket([], size)


def test_check_bucket_rejects_overlap():
    a, b = u8("a", 32), u8("b", 8)
    with pytest.raises(ValueError, match="overlaps"):
        check_bucket([Slot(0, 0, a, 0, 32, 0), Slot(0, 1, b, 0, 8, 16)], 128)
    with pytest.raises(ValueError, match="overlaps"):
        check_bucket([Slot(0, 0, a, 0, 32, 32), Slot(0, 1, b, 0, 8, 0)], 128)  # out of order
    with pytest.raises(ValueError):
        check_bucket([Slot(0, 0, b, 0, 8, 0), Slot(0, 1, b, 0, 8, 0)], 128)  # same place twice


def test_check_bucket_rejects_misalignment():
    a = u8("a", 8)
    for offset in (1, 8, 15, 24):
        with pytest.raises(ValueError, match="misaligned"):
            check_bucket([Slot(0, 0, a, 0, 8, offset)], 128)


def test_check_bucket_rejects_out_of_buffer():
    a = u8("a", 32)
    with pytest.raises(ValueError, match="past the buffer"):
        check_bucket([Slot(0, 0, a, 0, 32, 16)], 32)
    with pytest.raises(ValueError, match="past the buffer"):
        check_bucket([Slot(0, 0, a, 0, 32, 0)], 31)
    with pytest.raises(ValueError):
        check_bucket([Slot(0, 0, a, 0, 32, -16)], 64)


def test_check_bucket_rejects_bytes_outside_tensor():
    a = u8("a", 32)
    for start, length in ((0, 33), (16, 17), (-1, 8), (0, -1)):
        with pytest.raises(ValueError, match="outside the tensor"):
            check_bucket([Slot(0, 0, a, start, length, 0)], 64)


def test_check_bucket_unpacked_rules():
    a, b, e = u8("a", 32), spec("b", torch.float32, 3), spec("e", torch.int64, 0)
    assert check_bucket([Slot(3, 0, a, 0, 32, 0)], None) == 0  # unpacked buckets use no shared buffer
    # Several whole tensors, each at offset 0, travel in one unpacked bucket.
    assert check_bucket([Slot(0, 0, a, 0, 32, 0), Slot(0, 1, b, 0, 12, 0), Slot(0, 2, e, 0, 0, 0)], None) == 0
    assert check_bucket([Slot(0, i, a, 0, 32, 0) for i in range(UNPACKED_GROUP_TENSORS)], None) == 0
    with pytest.raises(ValueError, match=str(UNPACKED_GROUP_TENSORS)):
        check_bucket([Slot(0, i, a, 0, 32, 0) for i in range(UNPACKED_GROUP_TENSORS + 1)], None)
    for bad in (
        [Slot(0, 0, a, 0, 16, 0)],  # not whole
        [Slot(0, 0, a, 0, 32, 16)],  # not at 0
        [Slot(0, 0, a, 0, 32, 0), Slot(0, 1, b, 0, 12, 16)],  # a second tensor not at 0
        [Slot(0, 0, a, 0, 32, 0), Slot(0, 1, a, 16, 16, 0)],  # a second one not whole
    ):
        with pytest.raises(ValueError, match="unpacked"):
            check_bucket(bad, None)


def test_check_bucket_rejects_too_many_slots():
    e = spec("e", torch.float32, 0)
    ok = [Slot(0, i, e, 0, 0, 0) for i in range(MAX_SLOTS_PER_BUCKET)]
    assert check_bucket(ok, 16) == 0
    with pytest.raises(ValueError, match=str(MAX_SLOTS_PER_BUCKET)):
        check_bucket(ok + [Slot(0, MAX_SLOTS_PER_BUCKET, e, 0, 0, 0)], 16)


# ----------------------------------------------------------------------------------------------
# Planner: the rule one tensor at a time


def plan_incrementally(specs: list[TensorSpec], buffer_size: int | None) -> list[Slot]:
    planner = Planner(buffer_size)
    out = []
    for i, sp in enumerate(specs):
        got = planner.add(i, sp)
        assert isinstance(got, list) and got and all(s.index == i for s in got)
        out.extend(got)
    return out


def planner_state(slots: list[Slot], buffer_size: int | None) -> tuple[int, int, int]:
    """(bucket, cursor, count) after ``slots``, as a sender resuming a bucket passes them."""
    if not slots:
        return -1, 0, 0
    bucket = slots[-1].bucket
    mine = [s for s in slots if s.bucket == bucket]
    cursor = sum(s.length for s in mine) if buffer_size is None else mine[-1].end
    return bucket, cursor, len(mine)


@settings(max_examples=150, **SETTINGS)
@given(specs=spec_lists, buffer_size=st.one_of(st.none(), buffer_sizes), cut=st.integers(0, 30))
def test_planner_matches_plan_slots(specs, buffer_size, cut):
    expected = list(plan_slots(specs, buffer_size))
    assert plan_incrementally(specs, buffer_size) == expected
    # Resuming from the state after the first ``cut`` tensors continues the same plan.
    cut = min(cut, len(specs))
    before = [s for s in expected if s.index < cut]
    planner = Planner(buffer_size)
    planner.resume(*planner_state(before, buffer_size))
    rest = [s for i in range(cut, len(specs)) for s in planner.add(i, specs[i])]
    assert before + rest == expected


def test_planner_unpacked_many_groups_matches_plan_slots():
    mib = 1 << 20
    specs = [u8(f"t{i}", (i % 7) * 5 * mib + (i % 3)) for i in range(600)]
    expected = list(plan_slots(specs, None))
    assert plan_incrementally(specs, None) == expected
    check_plan(specs, None, expected)


@pytest.mark.parametrize("buffer_size", [64, None])
def test_planner_close_bucket(buffer_size):
    planner = Planner(buffer_size)
    a, b, c = u8("a", 10), u8("b", 10), u8("c", 10)
    assert planner.add(0, a) == [Slot(0, 0, a, 0, 10, 0)]
    planner.close_bucket()
    assert planner.add(1, b) == [Slot(1, 1, b, 0, 10, 0)]  # would have fit, but the bucket was closed
    second = planner.add(2, c)
    assert second == [Slot(1, 2, c, 0, 10, 16 if buffer_size else 0)]  # the new bucket goes on


def test_planner_resume_explicit():
    a, b = u8("a", 10), u8("b", 40)
    planner = Planner(64)
    planner.resume(4, 20, 2)  # bucket 4 already holds two slots ending at byte 20
    assert planner.add(7, a) == [Slot(4, 7, a, 0, 10, 32)]
    assert planner.add(8, b) == [Slot(5, 8, b, 0, 40, 0)]  # 48 + 40 > 64
    big = u8("big", 100)
    assert planner.add(9, big) == [Slot(6, 9, big, 0, 64, 0), Slot(7, 9, big, 64, 36, 0)]  # a split opens a bucket
    planner = Planner(None)
    planner.resume(2, UNPACKED_GROUP_BYTES, 1)
    assert planner.add(3, a) == [Slot(3, 3, a, 0, 10, 0)]


@pytest.mark.parametrize("bad", [0, 15, -16, 16.0, True, "64", [64]])
def test_planner_rejects_bad_buffer_size(bad):
    with pytest.raises(ValueError, match="buffer_size"):
        Planner(bad)
