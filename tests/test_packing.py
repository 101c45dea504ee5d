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
    MAX_SLOTS_PER_BUCKET,
    Slot,
    TensorSpec,
    align_up,
    check_bucket,
    dtype_name,
    pack_slot,
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
            assert chunks == [Slot(i, i, sp, 0, sp.nbytes, 0)]
            continue
        if sp.nbytes <= buffer_size:
            assert len(chunks) == 1, f"tensor {i} of {sp.nbytes} bytes fits a {buffer_size}-byte buffer but was split"
            assert chunks[0].is_whole
        else:
            assert len(chunks) >= 2
            assert all(c.length > 0 for c in chunks)
            assert [c.bucket for c in chunks] == list(range(chunks[0].bucket, chunks[0].bucket + len(chunks)))
            assert all(c.offset == 0 for c in chunks[1:])
            assert all(c.end == buffer_size for c in chunks[:-1])  # fill the buffer, then the next

    if buffer_size is None:
        return
    # Per bucket: aligned, non-overlapping, inside the buffer, bounded slot count; check_bucket agrees.
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
        # Greedy: a bucket is only closed when its next tensor could not go on in it.
        first = group[0]
        if b > 0 and first.start == 0:
            cursor = align_up(prev_end)
            n = first.spec.nbytes
            assert prev_count >= MAX_SLOTS_PER_BUCKET or (
                cursor + n > buffer_size and (n <= buffer_size or cursor >= buffer_size)
            ), f"bucket {b} opened for tensor {first.index} that fit in bucket {b - 1}"
        prev_end, prev_count = end, len(group)


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


def test_plan_split_fills_rest_of_bucket_then_whole_buffers_then_tail():
    a, big, c = u8("a", 10), u8("big", 200), u8("c", 5)
    slots = list(plan_slots([a, big, c], 64))
    assert slots == [
        Slot(0, 0, a, 0, 10, 0),
        Slot(0, 1, big, 0, 48, 16),
        Slot(1, 1, big, 48, 64, 0),
        Slot(2, 1, big, 112, 64, 0),
        Slot(3, 1, big, 176, 24, 0),
        Slot(3, 2, c, 0, 5, 32),  # the tail's bucket goes on
    ]
    check_plan([a, big, c], 64, slots)


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
    assert unpacked == [Slot(i, i, sp, 0, sp.nbytes, 0) for i, sp in enumerate(specs)]


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
    assert counts == [MAX_SLOTS_PER_BUCKET, 1, 1]  # the first chunk is the 4096th slot of bucket 0
    check_plan(specs, 16, slots)


def test_plan_unpacked_one_bucket_per_tensor():
    specs = [spec("a", torch.float32, 1000, 1000), u8("b", 3), spec("c", torch.bfloat16, 0)]
    slots = list(plan_slots(specs, None))
    assert slots == [Slot(i, i, sp, 0, sp.nbytes, 0) for i, sp in enumerate(specs)]
    assert all(check_bucket([s], None) == s.length for s in slots)


def test_plan_lazy_explicit():
    pulled = []

    def source():
        for i, n in enumerate([10, 10, 100, 30]):
            pulled.append(i)
            yield u8(f"t{i}", n)

    it = plan_slots(source(), 64)
    assert pulled == []  # a generator: nothing pulled before the first next()
    first = next(it)
    assert (first.bucket, first.index, pulled) == (0, 0, [0])
    assert next(it).index == 1 and pulled == [0, 1]
    s = next(it)
    assert (s.bucket, s.index, s.length, pulled) == (0, 2, 32, [0, 1, 2])
    s = next(it)
    assert (s.bucket, s.index, s.length, pulled) == (1, 2, 64, [0, 1, 2])  # bucket 1 opens with tensor 2 in hand
    s = next(it)
    assert (s.bucket, s.index, s.length, pulled) == (2, 2, 4, [0, 1, 2])
    s = next(it)
    assert (s.bucket, s.index, s.offset, pulled) == (2, 3, 16, [0, 1, 2, 3])
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
# pack_slot / slot_view / typed_view round trip


def roundtrip(tensors: list[torch.Tensor], buffer_size: int | None) -> list[torch.Tensor]:
    """Plan, pack into poisoned buffers, check that only slot bytes were written, then unpack."""
    specs = [TensorSpec.of(f"t{i}", t) for i, t in enumerate(tensors)]
    slots = list(plan_slots(specs, buffer_size))
    check_plan(specs, buffer_size, slots)
    received: dict[int, torch.Tensor] = {}
    chunks: dict[int, list[torch.Tensor]] = defaultdict(list)
    for _, group in groupby(slots, key=lambda s: s.bucket):
        group = list(group)
        size = buffer_size if buffer_size is not None else group[0].length
        buf = torch.full((size,), POISON, dtype=torch.uint8)
        for s in group:
            pack_slot(buf, s, tensors[s.index])
        untouched = torch.ones(size, dtype=torch.bool)
        for s in group:
            untouched[s.offset : s.end] = False
        assert bool((buf[untouched] == POISON).all()), "pack_slot wrote outside its slot"
        for s in group:
            raw = slot_view(buf, s)
            assert raw.dtype == torch.uint8 and raw.numel() == s.length
            if s.is_whole:
                received[s.index] = typed_view(raw, s.spec).clone()
            else:
                chunks[s.index].append(raw.clone())
                if s.is_last:
                    received[s.index] = typed_view(torch.cat(chunks.pop(s.index)), s.spec)
        buf.fill_(POISON)  # a reused buffer: later buckets must not depend on earlier contents
    assert not chunks
    assert sorted(received) == list(range(len(tensors)))
    return [received[i] for i in range(len(tensors))]


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


def test_split_tensor_reassembled_from_chunks_explicit():
    gen = torch.Generator().manual_seed(7)
    big = random_tensor(torch.float64, (33, 5), gen).t()  # 1320 bytes, non-contiguous
    small = random_tensor(torch.int16, (3,), gen)
    specs = [TensorSpec.of("small", small), TensorSpec.of("big", big)]
    slots = list(plan_slots(specs, 256))
    big_chunks = [s for s in slots if s.index == 1]
    assert len(big_chunks) == 6 and big_chunks[0].offset == 16 and big_chunks[0].length == 240
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


def test_payload_runs_explicit():
    a, b, c, d, e = u8("a", 10), u8("b", 20), u8("c", 5), spec("e", torch.float32, 0), u8("d", 3)
    slots = [Slot(0, 0, a, 0, 10, 0), Slot(0, 1, b, 0, 20, 16), Slot(0, 2, c, 0, 5, 48), Slot(0, 3, d, 0, 0, 64),
             Slot(0, 4, e, 0, 3, 64)]  # fmt: skip
    assert payload_runs(slots) == [(0, 67, None)]  # one range, alignment padding included
    assert payload_runs(slots, [1]) == [(0, 10, None), (16, 36, 1), (48, 67, None)]
    assert payload_runs(slots, (0, 2)) == [(0, 10, 0), (16, 36, None), (48, 53, 2), (64, 67, None)]
    assert payload_runs(slots, [3]) == [(0, 53, None), (64, 67, None)]  # an empty direct slot sends nothing
    assert payload_runs(slots, range(5)) == [(0, 10, 0), (16, 36, 1), (48, 53, 2), (64, 67, 4)]
    assert payload_runs([]) == []
    assert payload_runs([Slot(0, 0, d, 0, 0, 0)]) == []  # empty ranges are left out
    assert payload_runs([Slot(0, 0, d, 0, 0, 0)], [0]) == []


@settings(max_examples=80, **SETTINGS)
@given(
    rows=st.lists(st.tuples(st.sampled_from(DTYPES), st.sampled_from(LAYOUTS), st.integers(1, 6), st.integers(1, 6)),
                  min_size=1, max_size=10),
    buffer_size=st.integers(16, 400),
    pick=st.randoms(use_true_random=False),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_payload_runs_deliver_every_slot(rows, buffer_size, pick, seed):
    """Simulate the broadcasts: packed ranges from the sender's buffer, direct slots from the tensor's own
    bytes, each landing at [start, end) of a poisoned receive buffer; every tensor arrives bit-exact."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [make_any_tensor(layout, dtype, gen, a, b) for dtype, layout, a, b in rows]
    specs = [TensorSpec.of(f"t{i}", t) for i, t in enumerate(tensors)]
    received: dict[int, torch.Tensor] = {}
    chunks: dict[int, list[torch.Tensor]] = defaultdict(list)
    for _, group in groupby(plan_slots(specs, buffer_size), key=lambda s: s.bucket):
        slots = list(group)
        direct = sorted(i for i, s in enumerate(slots) if s.is_whole and pick.random() < 0.5)
        runs = payload_runs(slots, direct)
        # Shape of the runs: ordered, disjoint, non-empty, inside the buffer; direct slots travel alone.
        assert all(start < end <= buffer_size for start, end, _ in runs)
        assert all(r1[1] <= r2[0] for r1, r2 in zip(runs, runs[1:]))
        assert [(r[0], r[1], r[2]) for r in runs if r[2] is not None] == [
            (slots[p].offset, slots[p].end, p) for p in direct if slots[p].length
        ]
        for pos, s in enumerate(slots):
            if s.length and pos not in direct:
                assert any(start <= s.offset and s.end <= end for start, end, p in runs if p is None)
        for start, end, p in runs:
            if p is None:
                assert not any(slots[q].offset < end and start < slots[q].end for q in direct if slots[q].length)
        send = torch.full((buffer_size,), POISON, dtype=torch.uint8)
        for pos, s in enumerate(slots):
            if pos not in direct:
                pack_slot(send, s, tensors[s.index])
        recv = torch.full((buffer_size,), POISON, dtype=torch.uint8)
        for start, end, p in runs:
            src = tensor_bytes(tensors[slots[p].index]) if p is not None else send[start:end]
            assert src.numel() == end - start
            recv[start:end].copy_(src)
        for s in slots:
            raw = slot_view(recv, s)
            if s.is_whole:
                received[s.index] = typed_view(raw, s.spec).clone()
            else:
                chunks[s.index].append(raw.clone())
                if s.is_last:
                    received[s.index] = typed_view(torch.cat(chunks.pop(s.index)), s.spec)
    for i, t in enumerate(tensors):
        assert_bit_exact(received[i], t)


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
    assert check_bucket([], 64) == 0


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
    a = u8("a", 32)
    assert check_bucket([Slot(3, 0, a, 0, 32, 0)], None) == 32
    for bad in (
        [Slot(0, 0, a, 0, 16, 0)],  # not whole
        [Slot(0, 0, a, 0, 32, 16)],  # not at 0
        [Slot(0, 0, a, 0, 32, 0), Slot(0, 1, a, 0, 32, 0)],  # two tensors
    ):
        with pytest.raises(ValueError, match="unpacked"):
            check_bucket(bad, None)


def test_check_bucket_rejects_too_many_slots():
    e = spec("e", torch.float32, 0)
    ok = [Slot(0, i, e, 0, 0, 0) for i in range(MAX_SLOTS_PER_BUCKET)]
    assert check_bucket(ok, 16) == 0
    with pytest.raises(ValueError, match=str(MAX_SLOTS_PER_BUCKET)):
        check_bucket(ok + [Slot(0, MAX_SLOTS_PER_BUCKET, e, 0, 0, 0)], 16)
