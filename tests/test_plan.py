"""Fast tier: layouts, fingerprints and the checks a worker makes on tables from the wire."""

from __future__ import annotations

import pytest
import torch

from torchxfer import TransferError
from torchxfer.packing import Slot, TensorSpec, plan_slots
from torchxfer.plan import BucketPlan, Layout, TableChecker
from torchxfer.wire import BucketHeader

pytestmark = pytest.mark.timeout(60)


def specs(*sizes: int) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", torch.uint8, (n,)) for i, n in enumerate(sizes)]


def buckets(slots: list[Slot]) -> list[BucketHeader]:
    out: dict[int, list[Slot]] = {}
    for s in slots:
        out.setdefault(s.bucket, []).append(s)
    return [BucketHeader(b, tuple(ss)) for b, ss in sorted(out.items())]


def test_a_planned_update_passes_every_check():
    sp = specs(10, 100, 7, 300, 5)
    headers = buckets(list(plan_slots(sp, 64)))
    checker = TableChecker(tuple(sp), 64)
    for i, h in enumerate(headers):
        checker.check(h, i)
    checker.finish()
    assert checker.next_index == len(sp)


def test_a_reused_bucket_index_is_refused():
    headers = buckets(list(plan_slots(specs(40, 40, 40), 64)))
    checker = TableChecker(None, 64)
    checker.check(headers[0], 0)
    with pytest.raises(TransferError, match="table of bucket 0 where bucket 1 was due"):
        checker.check(headers[0], 1)


def test_a_split_tensor_continued_inside_the_same_bucket_is_refused():
    spec = TensorSpec("big", torch.uint8, (100,))
    head = Slot(0, 0, spec, 0, 48, 0)
    rest = Slot(0, 0, spec, 48, 52, 48)  # the continuation must start the next bucket
    with pytest.raises(TransferError, match="split tensor"):
        TableChecker(None, 128).check(BucketHeader(0, (head, rest)), 0)


def test_a_split_tensor_that_skips_bytes_is_refused():
    spec = TensorSpec("big", torch.uint8, (100,))
    checker = TableChecker(None, 64)
    checker.check(BucketHeader(0, (Slot(0, 0, spec, 0, 64, 0),)), 0)
    with pytest.raises(TransferError, match="does not continue"):
        checker.check(BucketHeader(1, (Slot(1, 0, spec, 80, 20, 0),)), 1)


def test_out_of_order_and_unexpected_tensors_are_refused():
    sp = specs(10, 20)
    with pytest.raises(TransferError, match="out of order"):
        TableChecker(None, 64).check(BucketHeader(0, (Slot(0, 1, sp[1], 0, 20, 0),)), 0)
    other = TensorSpec("t0", torch.float32, (10,))
    with pytest.raises(TransferError, match="update_info expects"):
        TableChecker(tuple(sp), 64).check(BucketHeader(0, (Slot(0, 0, other, 0, 40, 0),)), 0)
    with pytest.raises(TransferError, match="lists only 1"):
        TableChecker(tuple(sp[:1]), 64).check(BucketHeader(0, tuple(list(plan_slots(sp, 64)))), 0)


def test_an_update_that_ends_early_is_refused():
    sp = specs(10, 20)
    checker = TableChecker(tuple(sp), 64)
    checker.check(BucketHeader(0, (next(iter(plan_slots(sp, 64))),)), 0)
    with pytest.raises(TransferError, match="update_info lists 2"):
        checker.finish()
    split = TableChecker(None, 64)
    split.check(BucketHeader(0, (Slot(0, 0, TensorSpec("big", torch.uint8, (100,)), 0, 64, 0),)), 0)
    with pytest.raises(TransferError, match="ended inside tensor"):
        split.finish()


def test_resume_after_a_cached_bucket():
    sp = specs(40, 100, 10)
    headers = buckets(list(plan_slots(sp, 64)))  # t0 | t1 head | t1 tail, t2
    plans = [BucketPlan.make(h.index, h.slots, 64) for h in headers]
    so_far = Layout(True, 64, 2)
    so_far.append(plans[0])
    so_far.append(plans[1])
    checker = TableChecker(tuple(sp), 64)
    checker.resume_after(so_far)  # the split tensor t1 continues
    checker.check(headers[2], 2)
    checker.finish()


def test_a_name_sent_twice_in_one_update_is_refused():
    """Within one table, across tables, and after buckets of the cached layout (resume_after)."""
    a, b = TensorSpec("w", torch.float32, (4,)), TensorSpec("w", torch.float32, (4,))
    with pytest.raises(TransferError, match="repeats the name"):
        TableChecker(None, 64).check(BucketHeader(0, (Slot(0, 0, a, 0, 16, 0), Slot(0, 1, b, 0, 16, 16))), 0)
    checker = TableChecker(None, 64)
    checker.check(BucketHeader(0, (Slot(0, 0, a, 0, 16, 0),)), 0)
    with pytest.raises(TransferError, match="repeats the name"):
        checker.check(BucketHeader(1, (Slot(1, 1, b, 0, 16, 0),)), 1)
    so_far = Layout(True, 64, 2)
    so_far.append(BucketPlan.make(0, (Slot(0, 0, a, 0, 16, 0),), 64))
    resumed = TableChecker(None, 64)
    resumed.resume_after(so_far)
    with pytest.raises(TransferError, match="repeats the name"):
        resumed.check(BucketHeader(1, (Slot(1, 1, b, 0, 16, 0),)), 1)
    other = TableChecker(None, 64)
    other.resume_after(so_far)
    other.check(BucketHeader(1, (Slot(1, 1, TensorSpec("v", torch.float32, (4,)), 0, 16, 0),)), 1)
    other.finish()


def test_the_names_of_one_update_are_bounded_on_both_sides(monkeypatch):
    """A worker keeps a layout's names for the group's life: past MAX_UPDATE_NAME_CHARS (made
    small here) a table is refused, counting the names of the cached buckets it follows too; the
    trainer refuses such an update itself with ValueError before it is sent."""
    import torchxfer.plan as plan_mod

    monkeypatch.setattr(plan_mod, "MAX_UPDATE_NAME_CHARS", 40)
    names = ["a" * 16, "b" * 16, "c" * 16]
    sp = [TensorSpec(n, torch.float32, (4,)) for n in names]
    checker = TableChecker(None, 64)
    checker.check(BucketHeader(0, (Slot(0, 0, sp[0], 0, 16, 0), Slot(0, 1, sp[1], 0, 16, 16))), 0)
    with pytest.raises(TransferError, match="names of this update's tensors hold more than 40 characters"):
        checker.check(BucketHeader(1, (Slot(1, 2, sp[2], 0, 16, 0),)), 1)
    so_far = Layout(True, 64, 2)
    so_far.append(BucketPlan.make(0, (Slot(0, 0, sp[0], 0, 16, 0), Slot(0, 1, sp[1], 0, 16, 16)), 64))
    resumed = TableChecker(None, 64)
    resumed.resume_after(so_far)
    with pytest.raises(TransferError, match="more than 40 characters"):
        resumed.check(BucketHeader(1, (Slot(1, 2, sp[2], 0, 16, 0),)), 1)
    fresh = plan_mod.NewNames()
    fresh.check(Layout(True, 64, 2), BucketPlan.make(0, (Slot(0, 0, sp[0], 0, 16, 0), Slot(0, 1, sp[1], 0, 16, 16)), 64))
    with pytest.raises(ValueError, match="more than 40 characters together"):
        fresh.check(so_far, BucketPlan.make(1, (Slot(1, 2, sp[2], 0, 16, 0),), 64))


def test_fingerprints_tell_layouts_and_configurations_apart():
    def layout(sizes: tuple[int, ...], buffer_size: int = 64, num_buffers: int = 2) -> Layout:
        out = Layout(True, buffer_size, num_buffers)
        for h in buckets(list(plan_slots(specs(*sizes), buffer_size))):
            out.append(BucketPlan.make(h.index, h.slots, buffer_size))
        return out

    same = layout((10, 20, 30))
    assert layout((10, 20, 30)).fingerprint == same.fingerprint > 0
    assert layout((10, 20, 31)).fingerprint != same.fingerprint
    assert layout((10, 20, 30), num_buffers=3).fingerprint != same.fingerprint
    assert layout((10, 20, 30), buffer_size=128).fingerprint != same.fingerprint
    assert same.num_bytes == 60 and [s.name for s in same.specs] == ["t0", "t1", "t2"]


def test_checksum_is_positional_and_takes_any_offset():
    from torchxfer.control import checksum

    data = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for start in (0, 1, 2, 3, 1102):  # a part of a split tensor may start at any byte of the assembly tensor
        part = data[start : start + 1234]
        assert checksum(part) == checksum(part.clone())
    swapped = data.clone()
    swapped[0:4], swapped[4:8] = data[4:8].clone(), data[0:4].clone()  # two words swapped
    assert checksum(swapped) != checksum(data)
    shorter = data[:-1]
    assert checksum(shorter) != checksum(data)


@pytest.mark.parametrize("old, new", [(0x00000000, 0x7FFFFFFF), (0xFFFFFFFF, 0x7FFFFFFE), (0x80000000, 0x00000001)])
def test_checksum_sees_a_word_changed_by_the_modulus(old, new):
    """A 32-bit word that changes by exactly 2**31 - 1 (float32 0.0 into NaN, say) changes the sum."""
    from torchxfer.control import checksum

    def raw(words: list[int]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(w.to_bytes(4, "little") for w in words)), dtype=torch.uint8)

    for pos in (0, 1, 513, 999):
        a, b = list(range(1000)), list(range(1000))
        a[pos], b[pos] = old, new
        assert checksum(raw(a)) != checksum(raw(b))


def test_checksum_sees_every_single_half_word_change_and_swap():
    from torchxfer.control import checksum

    gen = torch.Generator().manual_seed(5)
    data = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=gen)
    base = checksum(data)
    for pos in torch.randint(0, 4098, (200,), generator=gen).tolist():
        changed = data.clone()
        changed[pos] ^= int(torch.randint(1, 256, (1,), generator=gen))
        assert checksum(changed) != base
    swapped = data.clone()
    swapped[10:12], swapped[3000:3002] = data[3000:3002].clone(), data[10:12].clone()
    assert torch.equal(swapped, data) or checksum(swapped) != base


def test_checksum_sees_changes_past_its_first_chunk_and_across_chunks():
    """The checksum runs in chunks of 2**20 half-words (2 MiB): a byte changed in a later chunk,
    the last odd byte, and two half-words swapped across a chunk boundary all change it."""
    from torchxfer.control import checksum

    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, 256, ((5 << 20) + 1,), dtype=torch.uint8, generator=gen)
    base = checksum(data)
    for pos in ((2 << 20) + 6, (4 << 20) + 1001, data.numel() - 2, data.numel() - 1):
        changed = data.clone()
        changed[pos] ^= 0x5A
        assert checksum(changed) != base, pos
    edge = 2 << 20  # the first byte of chunk 1
    swapped = data.clone()
    swapped[edge - 2 : edge], swapped[edge : edge + 2] = data[edge : edge + 2].clone(), data[edge - 2 : edge].clone()
    assert not torch.equal(swapped, data) and checksum(swapped) != base


def _layout(specs_: list[TensorSpec], buffer_size: int | None) -> Layout:
    layout = Layout(buffer_size is not None, buffer_size, 2)
    slots = list(plan_slots(specs_, buffer_size))
    for index in range(slots[-1].bucket + 1):
        layout.append(BucketPlan.make(index, tuple(s for s in slots if s.bucket == index), buffer_size))
    return layout


@pytest.mark.parametrize("first_big", [False, True])
def test_an_unpacked_bucket_0_over_256_mib_is_not_posted_before_begin(first_big):
    """Both sides decide which bucket workers post ahead with the same functions. An unpacked
    bucket goes into fresh tensors, and a departing update makes both sides allocate that much
    for void broadcasts. Bucket 0 is posted before every update (an empty one too): one of more
    than 256 MiB (a single large tensor) waits for the BEGIN row. A later bucket, posted once
    a row said the layout goes on, is posted ahead whatever its size, and so are packed
    buckets (they use the buffers)."""
    from torchxfer.packing import UNPACKED_GROUP_BYTES
    from torchxfer.plan import first_bucket, next_bucket

    mib = 1 << 20
    big = TensorSpec("big", torch.uint8, (UNPACKED_GROUP_BYTES + 16,))
    small = [TensorSpec(f"s{i}", torch.uint8, (mib,)) for i in range(3)]
    order = [big, *small] if first_big else [*small, big, TensorSpec("tail", torch.uint8, (mib,))]
    unpacked = _layout(order, None)
    sizes = [sum(e - s for s, e, _ in b.runs) for b in unpacked.buckets]
    if first_big:
        assert sizes == [UNPACKED_GROUP_BYTES + 16, 3 * mib]
        assert first_bucket(unpacked, True) is None
        assert next_bucket(unpacked, 0) is unpacked.buckets[1]
    else:
        assert sizes == [3 * mib, UNPACKED_GROUP_BYTES + 16, mib]
        assert first_bucket(unpacked, True) is unpacked.buckets[0]
        assert next_bucket(unpacked, 0) is unpacked.buckets[1]
        assert next_bucket(unpacked, 1) is unpacked.buckets[2]
    assert first_bucket(unpacked, False) is None
    packed = _layout(order, 64 * mib)
    assert first_bucket(packed, True) is packed.buckets[0]
    assert all(next_bucket(packed, i) is packed.buckets[i + 1] for i in range(len(packed.buckets) - 1))


def test_rows_are_posted_two_steps_ahead_until_two_buckets_from_the_end():
    """Protocol 9's rule, which the trainer's SYNC rows and the workers' rows posted ahead both
    follow: after bucket i of an n-bucket layout, rows 2 ahead while i + 2 < n, else 1."""
    from torchxfer.plan import rows_ahead

    mib = 1 << 20
    layout = _layout([TensorSpec(f"t{i}", torch.uint8, (mib,)) for i in range(5)], mib)
    assert len(layout.buckets) == 5
    assert [rows_ahead(layout, i) for i in range(5)] == [2, 2, 2, 1, 1]
    assert rows_ahead(None, 0) == 1
