"""Fast tier: the control-frame codec. Round trips, and fuzzing that every input either
decodes to a valid message or raises TransferError (never another exception, never a
hang, never an allocation sized by a hostile length)."""

from __future__ import annotations

import dataclasses
import json
import struct
import tracemalloc
from itertools import groupby

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from torchxfer import TransferError
from torchxfer.packing import MAX_NDIM, MAX_SLOTS_PER_BUCKET, Slot, TensorSpec, check_bucket, plan_slots
from torchxfer.wire import (
    MAGIC,
    MAX_FRAME_BYTES,
    MAX_NAME_CHARS,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    ROW_MAGIC,
    ROW_WORDS,
    WIRE_SIGNATURE,
    BucketHeader,
    Kind,
    Row,
    check_arg,
    decode,
    encode,
    frame_length,
    make_row,
    parse_row,
)

pytestmark = pytest.mark.timeout(60)

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

PREFIX = struct.Struct("<4sHBBI")
BUCKET = 2
MAX_INT = 1 << 62


def frame(kind: int, body: bytes, *, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION,
          reserved: int = 0, declared: int | None = None) -> bytes:  # fmt: skip
    n = len(body) if declared is None else declared
    return PREFIX.pack(magic, version, kind, reserved, n) + body


def jframe(kind: int, obj: object) -> bytes:
    return frame(kind, json.dumps(obj).encode())


def test_constants():
    assert PREFIX_BYTES == 12 == PREFIX.size
    assert MAGIC == b"TXFR"
    assert PROTOCOL_VERSION == 11
    assert MAX_FRAME_BYTES == 64 << 20
    assert ROW_WORDS == 10
    assert ROW_MAGIC == int.from_bytes(b"TXFR", "little") << 16 | PROTOCOL_VERSION
    assert 0 < ROW_MAGIC < 1 << 63  # fits an int64 word
    assert WIRE_SIGNATURE == f"v{PROTOCOL_VERSION}:row{ROW_WORDS}:frame{MAX_FRAME_BYTES}:slots{MAX_SLOTS_PER_BUCKET}:align16"


# ----------------------------------------------------------------------------------------------
# validity of a decoded message


def _is_int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def assert_valid(msg: object) -> None:
    """A decoded message is well-typed, in range, and survives encode/decode unchanged."""
    if not isinstance(msg, BucketHeader):
        raise AssertionError(f"decode returned {type(msg).__name__}")
    assert _is_int(msg.index, 0, MAX_INT)
    assert isinstance(msg.slots, tuple) and 1 <= len(msg.slots) <= MAX_SLOTS_PER_BUCKET
    for s in msg.slots:
        assert isinstance(s, Slot) and isinstance(s.spec, TensorSpec)
        assert s.bucket == msg.index
        assert isinstance(s.spec.name, str) and len(s.spec.name) <= MAX_NAME_CHARS
        assert isinstance(s.spec.dtype, torch.dtype)
        assert isinstance(s.spec.shape, tuple) and len(s.spec.shape) <= MAX_NDIM
        assert all(_is_int(d, 0, MAX_INT) for d in s.spec.shape)
        assert s.spec.nbytes <= MAX_INT
        for v in (s.index, s.start, s.length, s.offset):
            assert _is_int(v, 0, MAX_INT)
    assert decode(encode(msg)) == msg


def decode_or_error(data: bytes) -> object | None:
    """decode(data): a valid message, or None when it raised TransferError. Anything else propagates."""
    try:
        msg = decode(data)
    except TransferError as e:
        assert str(e)
        return None
    assert_valid(msg)
    return msg


# ----------------------------------------------------------------------------------------------
# round trips

NAMES = ["w", "layer.0.weight", "ünïcødé.权重", 'quote"back\\slash\nnewline\ttab', "", "x" * MAX_NAME_CHARS, "\ud800lone"]


def sample_specs() -> list[TensorSpec]:
    dtypes = [torch.float32, torch.bfloat16, torch.bool, torch.int64, torch.float8_e4m3fn, torch.complex64,
              torch.uint8, torch.float16]  # fmt: skip
    shapes = [(), (0,), (3, 5), (7,), (2, 0, 4), (130,), (1,) * MAX_NDIM, (11, 13)]
    names = [(NAMES[i % len(NAMES)] + str(i))[:MAX_NAME_CHARS] for i in range(16)]
    return [TensorSpec(names[i], dtypes[i % len(dtypes)], shapes[i % len(shapes)]) for i in range(16)]


def headers_from_plan(specs: list[TensorSpec], buffer_size: int | None) -> list[BucketHeader]:
    out = []
    for b, group in groupby(plan_slots(specs, buffer_size), key=lambda s: s.bucket):
        out.append(BucketHeader(b, tuple(group)))
    return out


@pytest.mark.parametrize(
    "msg",
    [
        BucketHeader(0, (Slot(0, 0, TensorSpec("w", torch.float32, (2, 3)), 0, 24, 0),)),
        BucketHeader(2, (Slot(2, 9, TensorSpec("e", torch.float32, (0,)), 0, 0, 0),)),
        BucketHeader(MAX_INT, (Slot(MAX_INT, MAX_INT, TensorSpec("x", torch.bool, ()), 0, 1, MAX_INT),)),
        BucketHeader(7, (Slot(7, 1, TensorSpec("ünïcødé", torch.bfloat16, (1 << 20, 3)), 1 << 20, 4096, 16),
                         Slot(7, 2, TensorSpec("b", torch.int64, ()), 0, 8, 4112))),
    ],
    ids=repr,
)
def test_roundtrip_explicit(msg):
    data = encode(msg)
    assert isinstance(data, bytes)
    assert data[:4] == MAGIC
    assert frame_length(data[:PREFIX_BYTES]) == len(data)
    assert decode(data) == msg
    assert_valid(decode(data))


@pytest.mark.parametrize("buffer_size", [None, 16, 64, 100, 4096, 1 << 20])
def test_roundtrip_bucket_headers_from_plan(buffer_size):
    specs = sample_specs()
    headers = headers_from_plan(specs, buffer_size)
    assert headers
    for h in headers:
        data = encode(h)
        got = decode(data)
        assert got == h
        assert type(got.slots) is tuple
        assert [s.spec for s in got.slots] == [s.spec for s in h.slots]
        assert check_bucket(got.slots, buffer_size) == check_bucket(h.slots, buffer_size)
        assert_valid(got)


def test_roundtrip_full_bucket():
    specs = [TensorSpec(f"p{i}", torch.float16, (i % 3,)) for i in range(MAX_SLOTS_PER_BUCKET)]
    (h,) = headers_from_plan(specs, 1 << 20)
    assert len(h.slots) == MAX_SLOTS_PER_BUCKET
    assert decode(encode(h)) == h


def test_empty_bucket_does_not_decode():
    # encode does not validate; a receiver refuses a bucket without slots.
    with pytest.raises(TransferError, match="slots"):
        decode(encode(BucketHeader(0, ())))


def test_encode_rejects_non_messages():
    for bad in (object(), {"index": 0, "slots": []}, None, b"TXFR", Row(Kind.END, (0,) * 6)):
        with pytest.raises(TypeError):
            encode(bad)


def test_frame_layout():
    data = encode(BucketHeader(3, (Slot(3, 4, TensorSpec("w", torch.float16, (2, 5)), 0, 20, 0),)))
    magic, version, kind, reserved, n = PREFIX.unpack_from(data)
    assert (magic, version, kind, reserved) == (MAGIC, PROTOCOL_VERSION, BUCKET, 0)
    assert n == len(data) - PREFIX_BYTES
    assert json.loads(data[PREFIX_BYTES:]) == {"index": 3, "slots": [[4, "w", "float16", [2, 5], 0, 20, 0]]}
    assert b"pickle" not in data and data[PREFIX_BYTES:PREFIX_BYTES + 1] == b"{"


spec_rows = st.lists(
    st.tuples(
        st.sampled_from([torch.float32, torch.bool, torch.int8, torch.bfloat16, torch.float64]),
        st.lists(st.integers(0, 40), max_size=3),
        st.text(min_size=1, max_size=12),
    ),
    max_size=20,
)


@settings(max_examples=100, **SETTINGS)
@given(rows=spec_rows, buffer_size=st.one_of(st.none(), st.integers(16, 2000)))
def test_roundtrip_random_plans(rows, buffer_size):
    specs = [TensorSpec(name, d, tuple(s)) for d, s, name in rows]
    for h in headers_from_plan(specs, buffer_size):
        assert decode(encode(h)) == h


# ----------------------------------------------------------------------------------------------
# sample valid frames for the fuzzers


VALID_FRAMES = [
    *[encode(h) for h in headers_from_plan(sample_specs()[:6], 256)[:3]],
    *[encode(h) for h in headers_from_plan(sample_specs()[:4], None)[:1]],
    encode(BucketHeader(0, (Slot(0, 0, TensorSpec("e", torch.float32, (0,)), 0, 0, 0),))),
]


def test_valid_frames_decode():
    for data in VALID_FRAMES:
        assert decode_or_error(data) is not None


def test_every_truncation_is_rejected():
    for data in VALID_FRAMES:
        for n in range(len(data)):
            with pytest.raises(TransferError, match="truncated"):
                decode(data[:n])
        for n in range(PREFIX_BYTES):
            with pytest.raises(TransferError, match="truncated"):
                frame_length(data[:n])


# ----------------------------------------------------------------------------------------------
# prefix checks


@pytest.mark.parametrize("magic", [b"TXFQ", b"\0\0\0\0", b"txfr", b"RFXT", b"\xff\xff\xff\xff"])
def test_wrong_magic(magic):
    data = jframe(BUCKET, GOOD_BUCKET)
    data = data[:PREFIX_BYTES].replace(MAGIC, magic, 1) + data[PREFIX_BYTES:]
    with pytest.raises(TransferError, match="magic"):
        frame_length(data[:PREFIX_BYTES])
    with pytest.raises(TransferError, match="magic"):
        decode(data)


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 256, 65535])
def test_wrong_protocol_version(version):
    data = frame(BUCKET, json.dumps(GOOD_BUCKET).encode(), version=version)
    with pytest.raises(TransferError, match="version") as info:
        decode(data)
    assert str(version) in str(info.value)


@pytest.mark.parametrize("kind", [0, 1, 3, 4, 5, 6, 127, 255])
def test_unknown_kind(kind):
    # Only bucket tables travel as frames: the old BEGIN (1), END (3) and ABORT (4) frames are refused.
    with pytest.raises(TransferError, match="unknown header kind"):
        decode(jframe(kind, GOOD_BUCKET))
    with pytest.raises(TransferError, match="unknown header kind"):
        frame_length(PREFIX.pack(MAGIC, PROTOCOL_VERSION, kind, 0, 2))


def test_declared_size_cap():
    at_cap = MAX_FRAME_BYTES - PREFIX_BYTES
    assert frame_length(PREFIX.pack(MAGIC, PROTOCOL_VERSION, BUCKET, 0, at_cap)) == MAX_FRAME_BYTES
    for declared in (at_cap + 1, MAX_FRAME_BYTES, 1 << 31, (1 << 32) - 1):
        prefix = PREFIX.pack(MAGIC, PROTOCOL_VERSION, BUCKET, 0, declared)
        with pytest.raises(TransferError, match="cap"):
            frame_length(prefix)
        # decode checks the cap before the length: a short frame with a hostile length is
        # reported as over the cap, not as "truncated, waiting for more".
        with pytest.raises(TransferError, match="cap"):
            decode(prefix + b"{}")


def test_hostile_length_allocates_nothing():
    prefixes = [PREFIX.pack(MAGIC, PROTOCOL_VERSION, k, 0, (1 << 32) - 1) for k in (1, BUCKET, 3, 4)]
    prefixes.append(PREFIX.pack(MAGIC, PROTOCOL_VERSION, BUCKET, 0, MAX_FRAME_BYTES - PREFIX_BYTES))  # at the cap
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for p in prefixes:
            for data in (p, p + b"{", p + b'{"index":0}'):
                with pytest.raises(TransferError):
                    decode(data)
                try:
                    frame_length(data)
                except TransferError:
                    pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - base < 256 * 1024, f"decoding hostile prefixes peaked at {peak - base} bytes"


def test_huge_declared_tensor_allocates_nothing():
    row = [0, "w", "float32", [1 << 20, 1 << 20, 1 << 10], 0, 1 << 40, 0]  # a 4 PiB tensor, described only
    data = jframe(BUCKET, {"index": 0, "slots": [row]})
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        msg = decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg.slots[0].spec.nbytes == 4 << 50
    assert peak - base < 256 * 1024


# ----------------------------------------------------------------------------------------------
# bodies: explicit bad cases


GOOD_ROW = [0, "w", "float32", [2, 3], 0, 24, 0]
GOOD_BUCKET = {"index": 0, "slots": [GOOD_ROW]}


def test_good_bodies_decode():
    assert decode(jframe(BUCKET, GOOD_BUCKET)) == BucketHeader(
        0, (Slot(0, 0, TensorSpec("w", torch.float32, (2, 3)), 0, 24, 0),)
    )
    # Aliases on the wire are read as their canonical dtype.
    row = [0, "w", "torch.half", [2], 0, 4, 0]
    assert decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": [row]})).slots[0].spec.dtype == torch.float16


BAD_INTS = [-1, True, False, 1.0, 2.5, "3", None, [1], {"a": 1}, MAX_INT + 1, 1 << 64, -(1 << 64), 10**300]


def test_bucket_bad_top_level_fields():
    for bad in BAD_INTS:
        with pytest.raises(TransferError, match="index"):
            decode(jframe(BUCKET, {**GOOD_BUCKET, "index": bad}))
    with pytest.raises(TransferError, match="index"):
        decode(jframe(BUCKET, {"slots": [GOOD_ROW]}))
    for bad in [None, {}, "[]", 0, [], [{}], [[0]]]:
        with pytest.raises(TransferError, match="slot"):
            decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": bad} if bad is not None else
                          {k: v for k, v in GOOD_BUCKET.items() if k != "slots"}))  # fmt: skip


def test_old_bucket_fields_are_ignored():
    # Version 1 carried "checksum" and "direct"; version 2 reads neither (a v1 peer is refused by its version).
    old = {**GOOD_BUCKET, "checksum": 5, "direct": [0]}
    assert decode(jframe(BUCKET, old)) == decode(jframe(BUCKET, GOOD_BUCKET))
    assert not hasattr(decode(jframe(BUCKET, old)), "direct")
    assert [f.name for f in dataclasses.fields(BucketHeader)] == ["index", "slots"]


def _bad_row(pos: int, value: object) -> list:
    row = list(GOOD_ROW)
    row[pos] = value
    return row


@pytest.mark.parametrize(
    "row",
    [
        [], [0], GOOD_ROW[:6], GOOD_ROW + [0], {"index": 0}, "row", 7, None, True,
        *[_bad_row(p, v) for p in (0, 4, 5, 6) for v in BAD_INTS],
        _bad_row(1, None), _bad_row(1, 5), _bad_row(1, ["w"]), _bad_row(1, "n" * (MAX_NAME_CHARS + 1)),
        *[_bad_row(2, d) for d in ("nn", "Tensor", "qint8", "", "torch.nn", "float32 ", None, 32, ["float32"])],
        _bad_row(3, None), _bad_row(3, 6), _bad_row(3, "2,3"), _bad_row(3, {"0": 2}),
        _bad_row(3, [-1]), _bad_row(3, [1.5]), _bad_row(3, ["3"]), _bad_row(3, [True]), _bad_row(3, [None]),
        _bad_row(3, [[2]]), _bad_row(3, [1 << 64]), _bad_row(3, [MAX_INT + 1]),
        _bad_row(3, [1] * (MAX_NDIM + 1)), _bad_row(3, [0] * 100_000),
        _bad_row(3, [MAX_INT] * MAX_NDIM), _bad_row(3, [1 << 31, 1 << 31, 1 << 31]),
        # No byte, and still a product past int64: torch cannot view it.
        _bad_row(3, [1 << 40, 1 << 40, 0]), _bad_row(3, [0, 1 << 40, 1 << 40]), _bad_row(3, [1 << 61, 0]),
    ],
    ids=lambda r: repr(r)[:60],
)  # fmt: skip
def test_bucket_bad_slot_rows(row):
    with pytest.raises(TransferError):
        decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": [row]}))


@pytest.mark.parametrize("body", [b"[" + b"[]," * (1 << 20) + b"[]]", b"[" + b"0," * (1 << 20) + b"0]",
                                  b'{"index": 0, "slots": [' + b"{}," * 9000 + b"{}]}"])  # fmt: skip
def test_a_body_of_more_values_than_any_table_is_refused_before_parsing(body, monkeypatch):
    def parse(*args, **kwargs):
        raise AssertionError("parsed")

    monkeypatch.setattr(json, "loads", parse)
    with pytest.raises(TransferError, match="more values than a table"):
        decode(frame(BUCKET, body))


@pytest.mark.parametrize("body", [b'"' * (4 << 20), b'"\\' * (2 << 20), b'["' + b"\\" * (4 << 20)])
def test_a_body_of_unbalanced_quotes_is_refused_in_linear_time(body):
    """The pre-parse count strips strings with a pattern that cannot fail to match once started:
    one that could fail took seconds per 32 KiB of quotes (hours for a frame within the cap)."""
    with pytest.raises(TransferError):
        decode(frame(BUCKET, body))


_LONG = 8 << 20


@pytest.mark.parametrize("body", [
    b'{"index":0,"slots":[[0,"' + b"a" * _LONG,  # one long unterminated string
    b'{"index":0,"slots":[[0,"' + b"a[," * (_LONG // 3) + b'"]]}',  # one long string full of brackets
    b'{"index":0,"slots":[[0,"' + b'\\"' * (_LONG // 2) + b'"]]}',  # a long run of escaped quotes
    b'{"index":0,"slots":[[0,"' + b"\\\\[" * (_LONG // 3) + b'"]]}',  # escaped backslashes and brackets
], ids=["unterminated", "brackets", "escaped-quotes", "escaped-backslashes"])  # fmt: skip
def test_a_long_string_costs_memory_of_the_order_of_its_bytes(body):
    """Within the frame cap, any body is refused with memory of the order of its own size: the
    pre-parse count once kept about 120 bytes of matching state per byte of one long string
    (8 GB for a 63 MiB frame)."""
    import tracemalloc

    data = frame(BUCKET, body)
    tracemalloc.start()
    try:
        with pytest.raises(TransferError):
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * len(body), (peak, len(body))


def test_names_full_of_escapes_and_brackets_still_decode():
    """Brackets, commas and escaped quotes and backslashes inside names are not values: a table
    whose names hold more of them than any table holds outside strings still decodes, names intact."""
    names = [f"{i}" + '\\"' * 3 + "[{," * 300 + "\\" * (i % 3) + '"' * (i % 2) for i in range(MAX_SLOTS_PER_BUCKET)]
    rows = []
    for i, name in enumerate(names):
        row = list(GOOD_ROW)
        row[0], row[1], row[6] = i, name, 64 * i
        rows.append(row)
    header = decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": rows}))
    assert [s.spec.name for s in header.slots] == names


def test_a_table_of_the_largest_shapes_and_names_still_decodes():
    row = [0, "[" * MAX_NAME_CHARS, "float32", [1] * MAX_NDIM, 0, 4, 0]
    rows = [[i, f"{i}" + "{" * (MAX_NAME_CHARS - 8)] + row[2:] for i in range(MAX_SLOTS_PER_BUCKET)]
    for i, r in enumerate(rows):
        r[6] = 64 * i
    header = decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": rows}))
    assert len(header.slots) == MAX_SLOTS_PER_BUCKET and header.slots[-1].spec.shape == (1,) * MAX_NDIM


def test_bucket_limits():
    assert len(decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": [GOOD_ROW] * MAX_SLOTS_PER_BUCKET})).slots) == 4096
    with pytest.raises(TransferError, match="slots"):
        decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": [GOOD_ROW] * (MAX_SLOTS_PER_BUCKET + 1)}))
    ok = _bad_row(3, [1] * MAX_NDIM)
    ok[5] = 4
    assert decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": [ok]})).slots[0].spec.shape == (1,) * MAX_NDIM
    assert decode(jframe(BUCKET, {**GOOD_BUCKET, "slots": [_bad_row(1, "n" * MAX_NAME_CHARS)]}))


@pytest.mark.parametrize(
    "body",
    [
        b"", b" ", b"{", b"}", b"[]", b"null", b"0", b'"str"', b"true", b"[{}]", b"{}garbage",
        b"\xff\xfe\xfd", b"{\"reason\": \"\xff\"}", b"\xef\xbb\xbf{}", b"\x00" * 16, b"{'reason': 'x'}",
        b"{\"reason\": NaN}", b"{\"num_tensors\": Infinity, \"num_bytes\": -Infinity}",
        b"{\"update_id\": 1e400}", b"{\"num_tensors\": " + b"9" * 5000 + b", \"num_bytes\": 0}",
        b"{\"num_tensors\": " + b"9" * 4000 + b", \"num_bytes\": 0}",
        b"[" * 100_000, b"{\"a\":" * 100_000, b"[" * 5000 + b"]" * 5000,
    ],
    ids=lambda b: repr(b)[:40],
)  # fmt: skip
def test_malformed_bodies(body):
    for kind in (1, BUCKET, 3, 4):
        with pytest.raises(TransferError):
            decode(frame(kind, body))


@pytest.mark.parametrize("depth", [10, 100, 500, 900, 950, 980, 990, 1000, 2000])
def test_deeply_nested_field_values(depth):
    nested = "[" * depth + "]" * depth
    bodies = [
        (BUCKET, '{"index":%s,"slots":[[0,"w","float32",[],0,4,0]]}' % nested),
        (BUCKET, '{"index":0,"slots":[%s]}' % nested),
        (BUCKET, '{"index":0,"slots":[[0,"w","float32",%s,0,0,0]]}' % nested),
        (BUCKET, '{"index":0,"slots":[[0,%s,"float32",[],0,0,0]]}' % nested),
        (BUCKET, '{"index":0,"slots":[[0,"w",%s,[],0,0,0]]}' % nested),
        (BUCKET, '{"index":0,"slots":%s}' % nested),
    ]
    for kind, body in bodies:
        with pytest.raises(TransferError):
            decode(frame(kind, body.encode()))


def test_old_message_bodies_are_refused():
    # The version-1 BEGIN / END / ABORT bodies, under any kind byte, are not bucket tables.
    old = [{"update_id": 1, "packed": True, "buffer_size": 1024, "num_buffers": 2, "num_tensors": 3, "checksum": False},
           {"num_tensors": 1, "num_bytes": 24}, {"reason": "x"}]  # fmt: skip
    for kind in (1, BUCKET, 3, 4):
        for body in old:
            with pytest.raises(TransferError):
                decode(jframe(kind, body))


def test_extra_keys_are_ignored():
    assert decode(jframe(BUCKET, {**GOOD_BUCKET, "extra": [1, 2]})) == decode(jframe(BUCKET, GOOD_BUCKET))


# ----------------------------------------------------------------------------------------------
# fuzzing


@settings(max_examples=400, **SETTINGS)
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    decode_or_error(data)
    try:
        n = frame_length(data)
    except TransferError:
        return
    assert PREFIX_BYTES <= n <= MAX_FRAME_BYTES


@settings(max_examples=300, **SETTINGS)
@given(
    magic=st.one_of(st.just(MAGIC), st.binary(min_size=4, max_size=4)),
    version=st.one_of(st.just(PROTOCOL_VERSION), st.integers(0, 65535)),
    kind=st.integers(0, 255),
    reserved=st.integers(0, 255),
    declared=st.one_of(st.integers(0, 64), st.integers(0, (1 << 32) - 1),
                       st.sampled_from([MAX_FRAME_BYTES - PREFIX_BYTES, MAX_FRAME_BYTES - PREFIX_BYTES + 1])),
)  # fmt: skip
def test_fuzz_frame_length(magic, version, kind, reserved, declared):
    prefix = PREFIX.pack(magic, version, kind, reserved, declared)
    ok = magic == MAGIC and version == PROTOCOL_VERSION and kind == BUCKET
    ok = ok and PREFIX_BYTES + declared <= MAX_FRAME_BYTES
    if ok:
        assert frame_length(prefix) == PREFIX_BYTES + declared
        assert frame_length(prefix + b"trailing") == PREFIX_BYTES + declared
    else:
        with pytest.raises(TransferError):
            frame_length(prefix)
    decode_or_error(prefix + b"{}")


@settings(max_examples=300, **SETTINGS)
@given(kind=st.sampled_from([0, 1, 2, 3, 4, 5]), body=st.binary(max_size=120), slack=st.integers(-3, 3))
def test_fuzz_valid_prefix_random_body(kind, body, slack):
    declared = max(0, len(body) + slack)
    decode_or_error(frame(kind, body, declared=declared))


@settings(max_examples=300, **SETTINGS)
@given(
    idx=st.integers(0, len(VALID_FRAMES) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["set", "ins", "del"])),
                   min_size=1, max_size=4),
)  # fmt: skip
def test_fuzz_mutated_valid_frames(idx, edits):
    data = bytearray(VALID_FRAMES[idx])
    for pos, byte, op in edits:
        pos %= len(data) + 1
        if op == "set" and pos < len(data):
            data[pos] = byte
        elif op == "ins":
            data.insert(pos, byte)
        elif op == "del" and pos < len(data):
            del data[pos]
    decode_or_error(bytes(data))
    # The same edits inside the body, with the declared length fixed up to match.
    body = bytearray(VALID_FRAMES[idx][PREFIX_BYTES:])
    for pos, byte, op in edits:
        pos %= len(body) + 1
        if op == "set" and pos < len(body):
            body[pos] = byte
        elif op == "ins":
            body.insert(pos, byte)
        elif op == "del" and pos < len(body):
            del body[pos]
    decode_or_error(frame(VALID_FRAMES[idx][6], bytes(body)))


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([-1, 0, 1, MAX_INT, MAX_INT + 1, 1 << 63, 1 << 64, -MAX_INT, -MAX_INT - 1, 10**100, 4096, 4097]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["float32", "bool", "nn", "Tensor", "qint8", "torch.half", ""]),
)
junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10,
)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, junk)


nonneg = st.one_of(st.integers(0, 100), st.integers(0, MAX_INT))
shape_st = st.one_of(
    st.lists(st.integers(0, 6), max_size=4),
    st.lists(st.integers(0, 3), min_size=MAX_NDIM - 2, max_size=MAX_NDIM + 2),
    st.lists(st.sampled_from([0, 1, 1 << 31, MAX_INT, MAX_INT + 1, -1]), max_size=6),
    st.lists(st.integers(0, 2), min_size=200, max_size=300),
)
row_st = st.one_of(
    st.tuples(
        field(st.integers(0, 20)),
        field(st.text(max_size=10)),
        field(st.sampled_from(["float32", "bfloat16", "bool", "int64", "float8_e5m2", "half", "torch.float64"])),
        field(shape_st),
        field(nonneg),
        field(nonneg),
        field(st.integers(0, 64).map(lambda k: 16 * k)),
    ).map(list),
    st.lists(junk, max_size=9),
)


def body_st(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    return st.one_of(st.fixed_dictionaries(fields), st.fixed_dictionaries({}, optional=fields))


BUCKET_BODIES = body_st({"index": field(nonneg), "slots": field(st.lists(row_st, max_size=6))})


@settings(max_examples=300, **SETTINGS)
@given(body=BUCKET_BODIES, wire_kind=st.one_of(st.none(), st.integers(1, 4)))
def test_fuzz_json_bodies_wrong_types_and_ranges(body, wire_kind):
    text = json.dumps(body)  # NaN/Infinity/huge ints all survive into the body
    msg = decode_or_error(frame(wire_kind or BUCKET, text.encode()))
    event("decoded" if msg is not None else "rejected")
    if wire_kind not in (None, BUCKET):
        assert msg is None


@settings(max_examples=200, **SETTINGS)
@given(body=junk)
def test_fuzz_any_json_value(body):
    text = json.dumps(body).encode()
    for kind in (1, BUCKET, 3, 4):
        decode_or_error(frame(kind, text))


# ----------------------------------------------------------------------------------------------
# known gap


def test_encode_rejects_what_decode_rejects():
    # A name the receivers would refuse cannot even be described on the sender.
    with pytest.raises(ValueError, match="characters"):
        TensorSpec("n" * (MAX_NAME_CHARS + 1), torch.float32, (1,))
    spec = TensorSpec("n" * MAX_NAME_CHARS, torch.float32, (1,))
    msg = BucketHeader(0, (Slot(0, 0, spec, 0, 4, 0),))
    assert decode(encode(msg)) == msg


# ----------------------------------------------------------------------------------------------
# rows: the fixed int64 control steps


TRAINER_KINDS = [k for k in Kind if k != Kind.WORKER]


def test_kind_values():
    assert {k.name: int(k) for k in Kind} == {
        "BEGIN": 1, "BUCKET": 2, "TABLE": 3, "ABORT": 4, "END": 5, "WORKER": 6, "SYNC": 7,
    }  # fmt: skip


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_row_roundtrip(kind):
    rank = 1 if kind == Kind.WORKER else 0
    args = (7, -1, MAX_INT, 0, 1 << 40, -(1 << 62), 3, 5)[: ROW_WORDS - 2]
    for n in range(ROW_WORDS - 1):
        words = make_row(kind, *args[:n])
        assert len(words) == ROW_WORDS and all(type(w) is int for w in words)
        assert words[0] == ROW_MAGIC and words[1] == int(kind)
        assert words[2:] == list(args[:n]) + [0] * (ROW_WORDS - 2 - n)
        row = parse_row(words, rank)
        assert row == Row(kind, tuple(words[2:]))
        assert type(row.kind) is Kind and len(row.args) == ROW_WORDS - 2
        # Through an int64 tensor, as the all_gather carries it.
        assert parse_row(torch.tensor(words, dtype=torch.int64).tolist(), rank) == row


def test_row_worker_from_any_worker_rank():
    for rank in (1, 2, 63, 1 << 20):
        assert parse_row(make_row(Kind.WORKER, 12, 34, 1, 0), rank) == Row(Kind.WORKER, (12, 34, 1, 0) + (0,) * (ROW_WORDS - 6))


@pytest.mark.parametrize(
    "magic",
    [0, ROW_MAGIC ^ 1, ROW_MAGIC + 1, int.from_bytes(MAGIC, "little") << 16 | 1, -ROW_MAGIC, 1 << 62],
)
def test_row_wrong_magic(magic):
    words = make_row(Kind.END, 1, 2)
    words[0] = magic
    with pytest.raises(TransferError, match="another torchxfer protocol") as info:
        parse_row(words, 0)
    assert "rank 0" in str(info.value)


@pytest.mark.parametrize("n", [1, ROW_WORDS - 1, ROW_WORDS + 1, 2 * ROW_WORDS])
def test_row_wrong_length(n):
    words = (make_row(Kind.SYNC) * 2)[:n]
    with pytest.raises(TransferError, match="protocol"):
        parse_row(words, 0)


@pytest.mark.parametrize("kind", [0, 8, 9, 255, -1, 1 << 40])
def test_row_unknown_kind(kind):
    words = make_row(Kind.SYNC)
    words[1] = kind
    for rank in (0, 1):
        with pytest.raises(TransferError, match=f"unknown kind {kind}") as info:
            parse_row(words, rank)
        assert f"rank {rank}" in str(info.value)


def test_row_kind_must_match_role():
    # Only workers send WORKER rows; only the trainer (rank 0) sends every other kind.
    with pytest.raises(TransferError, match="WORKER") as info:
        parse_row(make_row(Kind.WORKER, 0, 0, 1, 0), 0)
    assert "rank 0" in str(info.value) and "workers" in str(info.value)
    for kind in TRAINER_KINDS:
        assert parse_row(make_row(kind), 0).kind == kind
        for rank in (1, 5):
            with pytest.raises(TransferError, match=kind.name) as info:
                parse_row(make_row(kind), rank)
            assert f"rank {rank}" in str(info.value) and "trainer" in str(info.value)


def test_check_arg():
    row = parse_row(make_row(Kind.BEGIN, 3, 1, 4096, 2, 99, -1), 0)
    assert check_arg(row, 0, "update_id", 0, MAX_INT) == 3
    assert check_arg(row, 2, "buffer_size", 16, 4096) == 4096  # bounds are inclusive
    assert check_arg(row, 3, "num_buffers", 2, 2) == 2
    assert check_arg(row, 5, "num_tensors", -1, MAX_INT) == -1
    for pos, what, lo, hi in [(0, "update_id", 4, 10), (2, "buffer_size", 16, 4095), (3, "num_buffers", 3, 64),
                              (5, "num_tensors", 0, MAX_INT), (4, "fingerprint", 100, 50)]:  # fmt: skip
        with pytest.raises(TransferError, match=what) as info:
            check_arg(row, pos, what, lo, hi)
        assert "BEGIN" in str(info.value) and f"[{lo}, {hi}]" in str(info.value)
        assert str(row.args[pos]) in str(info.value)


@settings(max_examples=300, **SETTINGS)
@given(
    words=st.lists(st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.sampled_from([ROW_MAGIC, 0, 1, 6, 7])),
                   min_size=0, max_size=ROW_WORDS + 2),
    rank=st.integers(0, 3),
    keep_magic=st.booleans(),
)  # fmt: skip
def test_fuzz_rows(words, rank, keep_magic):
    if keep_magic and words:
        words[0] = ROW_MAGIC
    if not words:
        return  # a row is always ROW_WORDS words from the all_gather; an empty list is not tested
    try:
        row = parse_row(words, rank)
    except TransferError as e:
        assert str(e)
        return
    assert len(words) == ROW_WORDS and words[0] == ROW_MAGIC
    assert isinstance(row.kind, Kind) and (row.kind == Kind.WORKER) == (rank != 0)
    assert row.args == tuple(words[2:])
