"""Multi-rank transfer tests, thread tier: the trainer and its workers are threads of this process.

Covers issue 2, items 4, 7 and 8:

* bit-exact round trips, packed and unpacked, with out-of-band (``update_info``)
  and in-band (``None``) metadata, from a list or a generator, for every dtype
  the issue names, 0-d, empty, non-contiguous, strided and expanded views,
  tensors larger than a buffer, and the zero-copy direct path;
* any disagreement between trainer and workers raises TransferError on every
  rank (trainer included) naming both values; the group stays usable;
* the trainer's bad input raises ValueError / the original error on the
  trainer and TransferError on every worker; the next update works;
* a failing ``load_weights`` on one worker fails the update on every rank;
* a generator source is pulled lazily; receive buffers are reused.

Every world runs under :func:`tests.harness.run_threads` (deadline ``DEADLINE``),
with the library's ``timeout_s`` (``TIMEOUT``) well below it.
"""

from __future__ import annotations

import gc
import math
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests import harness
from tests.harness import bytes_equal, gloo_trainer, gloo_worker
from torchxfer import (
    ModuleLoader,
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
    TransferError,
    destroy_side_group,
    side_group,
)

TIMEOUT = 10.0
"""These tests check what arrives, not how fast failures are noticed (test_reliability does):
a generous bound keeps a worker that waits for an update to begin from timing out while the
ranks, threads of one process, share two loaded cores."""
DEADLINE = 45.0
BUF = 512

DTYPES = [
    torch.bool, torch.uint8, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip

Send = Callable[..., Any]


# -- helpers ---------------------------------------------------------------------------------


def rand_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bits of ``dtype`` (NaN payloads, infinities and all), never all zeros."""
    numel = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen, dtype=torch.uint8).bool().reshape(shape)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def zoo(seed: int, big_bytes: int = 2 * BUF + 40) -> list[tuple[str, torch.Tensor]]:
    """Every layout the issue names, for every dtype it names."""
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[str, torch.Tensor]] = []
    for dtype in DTYPES:
        n = str(dtype).removeprefix("torch.")
        size = dtype.itemsize
        out += [
            (f"{n}.matrix", rand_tensor((7, 13), dtype, gen)),
            (f"{n}.scalar", rand_tensor((), dtype, gen)),
            (f"{n}.empty", rand_tensor((3, 0, 2), dtype, gen)),
            (f"{n}.transposed", rand_tensor((9, 5), dtype, gen).t()),
            (f"{n}.strided", rand_tensor((6, 20), dtype, gen)[1::2, 3::4]),
            (f"{n}.expanded", rand_tensor((1, 5), dtype, gen).expand(4, 5)),
            (f"{n}.big", rand_tensor((big_bytes // size + 3,), dtype, gen)),
            (f"{n}.big_strided", rand_tensor((2 * (big_bytes // size) + 5,), dtype, gen)[::2]),
        ]
    out.append(("float32.permuted", rand_tensor((3, 4, 5), torch.float32, gen).permute(2, 0, 1)))
    out.append(("param", torch.nn.Parameter(rand_tensor((33,), torch.float32, gen).nan_to_num())))
    return out


def simple(seed: int, n: int = 5) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 6), (33,), (2, 3, 5), (17,), (8, 8), (5,), (3, 3)]
    return [(f"w{i}", torch.randn(shapes[i % len(shapes)], generator=gen) * 10 + 1) for i in range(n)]


def generate(pairs: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    yield from pairs


def trainer(port: int, world: int, timeout: float = TIMEOUT) -> Any:
    return gloo_trainer(port, world, timeout=timeout)


def worker(rank: int, port: int, world: int, *, dp: bool = False, timeout: float = TIMEOUT) -> NCCLWeightTransferEngine:
    """A worker of side rank ``rank``: one replica of TP=world-1, or (dp) world-1 replicas of TP=1."""
    engine = gloo_worker(rank, port, world, timeout=timeout, dp=dp)
    assert engine.model_update_group.rank() == rank
    assert engine.model_update_group.size() == world
    return engine


def collector() -> tuple[list, Callable[[list], None]]:
    got: list[tuple[str, torch.Tensor]] = []

    def load(batch: list) -> None:
        got.extend((name, t.clone()) for name, t in batch)  # views into a reused buffer

    return got, load


def run_world(body: Callable[[int, int], Any], world: int, *, deadline_s: float = DEADLINE) -> list[Any]:
    return harness.run_world(body, world, deadline_s=deadline_s)


def assert_same(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]], what: str = "") -> None:
    assert [n for n, _ in got] == [n for n, _ in want], what
    for (name, g), (_, w) in zip(got, want):
        assert g.device.type == "cpu", (what, name)
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), (what, name, g.dtype, w.dtype, g.shape, w.shape)
        assert bytes_equal(g, w), f"{what}: {name} differs"


def nbytes(pairs: list[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in pairs)


# -- round trips -----------------------------------------------------------------------------

DIRECT_BUF = 4 << 20


def direct_model(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Large contiguous tensors (sent zero-copy) between small and non-contiguous ones."""
    gen = torch.Generator().manual_seed(seed)
    return [
        ("head", rand_tensor((100,), torch.float32, gen)),
        ("direct0", rand_tensor((3 << 18,), torch.float16, gen)),  # 1.5 MiB, contiguous
        ("mid", rand_tensor((5, 7), torch.bfloat16, gen).t()),
        ("strided_big", rand_tensor((2, 3 << 17), torch.float32, gen)[:, ::2]),  # 1.5 MiB, not contiguous
        ("direct1", rand_tensor((5 << 17,), torch.int64, gen)),  # 5 MiB: larger than the buffer, split
        ("direct2", rand_tensor((1 << 18,), torch.float32, gen)),  # 1 MiB, contiguous
        ("direct_offset", rand_tensor((3 << 18,), torch.uint8, gen)[1000:]),  # contiguous view at an offset
        ("tail", rand_tensor((), torch.float64, gen)),
    ]


# (packed, out_of_band, source, buffer_size, num_buffers, atomic, model)
ROUND_TRIPS = [
    (True, True, "list", BUF, 2, False, "zoo"),
    (True, False, "gen", BUF, 2, False, "zoo"),
    (True, True, "gen", 1000, 1, False, "zoo"),
    (True, False, "list", 1000, 3, True, "zoo"),
    (False, True, "list", BUF, 2, False, "zoo"),
    (False, False, "gen", BUF, 2, False, "zoo"),
    (False, True, "gen", BUF, 1, True, "zoo"),
    (False, False, "list", BUF, 3, False, "zoo"),
    (True, True, "gen", DIRECT_BUF, 2, False, "direct"),
    (True, False, "list", DIRECT_BUF, 2, True, "direct"),
    (False, False, "gen", DIRECT_BUF, 2, False, "direct"),
]


def round_trip_model(step: int) -> list[tuple[str, torch.Tensor]]:
    return zoo(100 + step) if ROUND_TRIPS[step][6] == "zoo" else direct_model(100 + step)


def test_round_trips_bit_exact_every_mode_dtype_and_layout():
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            stats = []
            try:
                for step, (packed, _, source, buf, nb, _, _) in enumerate(ROUND_TRIPS):
                    pairs = round_trip_model(step)
                    src = generate(pairs) if source == "gen" else pairs
                    stats.append(NCCLWeightTransferEngine.trainer_send_weights(
                        src, group, packed=packed, packed_buffer_size_bytes=buf, packed_num_buffers=nb))  # fmt: skip
            finally:
                destroy_side_group(group)
            return stats
        engine = worker(rank, port, world, dp=True)
        results = []
        try:
            for step, (packed, oob, _, buf, nb, atomic, _) in enumerate(ROUND_TRIPS):
                info = None
                if oob:
                    info = NCCLWeightTransferUpdateInfo.from_named_tensors(
                        round_trip_model(step), packed=packed, packed_buffer_size_bytes=buf, packed_num_buffers=nb
                    )
                got, load = collector()
                stats = engine.receive_weights(info, load, atomic=atomic)
                results.append((got, stats, engine.weights_version, engine.torn))
        finally:
            engine.shutdown()
        return results

    values = run_world(body, world, deadline_s=60)
    for step, mode in enumerate(ROUND_TRIPS):
        want = round_trip_model(step)
        sent = values[0][step]
        assert (sent.update_id, sent.num_tensors, sent.num_bytes) == (step, len(want), nbytes(want)), (mode, sent)
        for rank in (1, 2):
            got, stats, version, torn = values[rank][step]
            assert_same(got, want, f"rank {rank} step {step} {mode}")
            assert (stats.update_id, stats.num_tensors, stats.num_bytes) == (step, len(want), nbytes(want))
            assert (version, torn) == (step, False)


# -- disagreements -----------------------------------------------------------------------------


def _renamed(pairs: list, index: int, name: str) -> list:
    return [(name if i == index else n, t) for i, (n, t) in enumerate(pairs)]


def _retyped(pairs: list, index: int, dtype: torch.dtype) -> list:
    return [(n, t.to(dtype) if i == index else t) for i, (n, t) in enumerate(pairs)]


def _reshaped(pairs: list, index: int, shape: tuple[int, ...]) -> list:
    return [(n, t.reshape(shape) if i == index else t) for i, (n, t) in enumerate(pairs)]


# Each case: what the trainer sends (pairs from simple(seed), and how) and what each
# worker's update_info says; ``expect`` must all appear in the message on every rank.
MISMATCHES: list[dict[str, Any]] = [
    dict(id="packed-flag", send=dict(packed=False), info=dict(packed=True), expect=["packed=False", "packed=True"]),
    dict(id="packed-flag-reverse", send=dict(packed=True), info=dict(packed=False), expect=["packed=True", "packed=False"]),
    dict(id="buffer-size", send=dict(packed=True, packed_buffer_size_bytes=256),
         info=dict(packed=True, packed_buffer_size_bytes=512), expect=["packed_buffer_size_bytes", "256", "512"]),
    dict(id="num-buffers", send=dict(packed=True, packed_num_buffers=2), info=dict(packed=True, packed_num_buffers=3),
         expect=["packed_num_buffers", "uses 2", "says 3"]),
    dict(id="name", send=dict(packed=False), edit=lambda p: _renamed(p, 2, "w2.renamed"), info=dict(packed=False),
         expect=["'w2.renamed'", "'w2'"]),
    dict(id="name-packed-gen", send=dict(packed=True), source="gen", edit=lambda p: _renamed(p, 3, "other"),
         info=dict(packed=True), expect=["'other'", "'w3'"]),
    dict(id="dtype", send=dict(packed=True), source="gen", edit=lambda p: _retyped(p, 1, torch.float64),
         info=dict(packed=True), expect=["'w1'", "float64", "float32"]),
    dict(id="dtype-bf16", send=dict(packed=False), edit=lambda p: _retyped(p, 4, torch.bfloat16),
         info=dict(packed=False), expect=["'w4'", "bfloat16", "float32"]),
    dict(id="shape", send=dict(packed=True), edit=lambda p: _reshaped(p, 0, (6, 4)), info=dict(packed=True),
         expect=["'w0'", "[6, 4]", "[4, 6]"]),
    dict(id="count-list", send=dict(packed=True), edit=lambda p: p[:4], info=dict(packed=True),
         expect=["4 tensors", "lists 5"]),
    dict(id="count-gen-fewer-sent", send=dict(packed=True), source="gen", edit=lambda p: p[:4], info=dict(packed=True),
         expect=["sent 4", "lists 5"]),
    dict(id="count-gen-more-sent", send=dict(packed=False), source="gen", edit=lambda p: p + simple(9, 7)[5:6],
         info=dict(packed=False), expect=["'w5'", "lists only 5"]),
    dict(id="one-worker-only", send=dict(packed=True), edit=lambda p: _retyped(p, 2, torch.float16),
         info=dict(packed=True), only_rank=2, expect=["[rank 2]", "float16", "float32"]),
]  # fmt: skip


def _case_send(case: dict, seed: int) -> tuple[list, list]:
    """(what the trainer sends, what update_info describes)."""
    good = simple(seed)
    return case.get("edit", lambda p: p)(good), good


def _info(pairs: list, mode: dict) -> NCCLWeightTransferUpdateInfo:
    mode = dict(mode)
    if mode.get("packed"):
        mode.setdefault("packed_buffer_size_bytes", 256)
    return NCCLWeightTransferUpdateInfo.from_named_tensors(pairs, **mode)


def test_every_disagreement_fails_every_rank_naming_both_values_and_group_stays_usable():
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            errors, stats = [], []
            try:
                for i, case in enumerate(MISMATCHES):
                    sent, _ = _case_send(case, i)
                    mode = {"packed_buffer_size_bytes": 256, **case["send"]}
                    src = generate(sent) if case.get("source") == "gen" else sent
                    with pytest.raises(TransferError) as err:
                        NCCLWeightTransferEngine.trainer_send_weights(src, group, **mode)
                    errors.append(err.value)
                    # The next, correct update succeeds.
                    stats.append(NCCLWeightTransferEngine.trainer_send_weights(
                        generate(simple(1000 + i)), group, packed=i % 2 == 0, packed_buffer_size_bytes=256))  # fmt: skip
            finally:
                destroy_side_group(group)
            return errors, stats
        engine = worker(rank, port, world)
        errors, goods = [], []
        try:
            for i, case in enumerate(MISMATCHES):
                _, described = _case_send(case, i)
                info = _info(described, case["info"])
                if case.get("only_rank") not in (None, rank):
                    info = None  # this worker takes the trainer's header as it is
                version = engine.weights_version
                seen: list = []
                with pytest.raises(TransferError) as err:
                    engine.receive_weights(info, lambda batch: seen.extend((n, t.dtype, tuple(t.shape)) for n, t in batch))
                errors.append((err.value, engine.weights_version == version, seen, engine.torn))
                got, load = collector()
                good_info = _info(simple(1000 + i), dict(packed=i % 2 == 0)) if i % 3 else None
                stats = engine.receive_weights(good_info, load)
                goods.append((got, stats.update_id, engine.weights_version, engine.torn))
        finally:
            engine.shutdown()
        return errors, goods

    values = run_world(body, world)
    trainer_errors, trainer_stats = values[0]
    for i, case in enumerate(MISMATCHES):
        message = str(trainer_errors[i])
        for needle in case["expect"]:
            assert needle in message, (case["id"], needle, message)
        assert trainer_errors[i].broken is False, (case["id"], message)
        assert trainer_stats[i].update_id == 2 * i + 1
        for rank in (1, 2):
            errors, goods = values[rank]
            err, version_kept, seen, torn = errors[i]
            assert str(err) == message, (case["id"], rank)  # the same agreed message everywhere
            assert err.broken is False
            assert version_kept, (case["id"], rank)
            # load_weights never saw a tensor update_info does not describe (what it saw before the
            # failure leaves the weights torn); a count known at BEGIN is refused before any load.
            _, described = _case_send(case, i)
            listed = {n: (t.dtype, tuple(t.shape)) for n, t in described}
            assert all(listed.get(n) == (d, sh) for n, d, sh in seen), (case["id"], rank, seen)
            assert torn == bool(seen), (case["id"], rank, seen, torn)
            if case["id"] in ("count-list", "packed-flag", "buffer-size", "num-buffers"):
                assert not seen, (case["id"], rank, seen)
            got, update_id, version, torn = goods[i]
            assert_same(got, simple(1000 + i), f"{case['id']} rank {rank}")
            assert (update_id, version, torn) == (2 * i + 1, 2 * i + 1, False)


# -- the trainer's bad input ---------------------------------------------------------------------


def _raising(pairs: list, after: int, exc: BaseException) -> Iterator:
    for i, item in enumerate(pairs):
        if i == after:
            raise exc
        yield item


def _sparse() -> torch.Tensor:
    return torch.eye(4).to_sparse()


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized dtypes are deprecated, still constructible
        return torch.quantize_per_tensor(torch.linspace(-1, 1, 8), 0.1, 0, torch.quint8)


def _replace(pairs: list, index: int, item: Any) -> list:
    """The same number of items, so an update_info of the good pairs agrees on the count."""
    return pairs[:index] + [item] + pairs[index + 1 :]


class SourceFailed(Exception):
    pass


# Each case: (id, build the source from simple(seed), send kwargs, exception on trainer, text on workers)
BAD_INPUT: list[tuple[str, Callable[[list], Any], dict, type, str]] = [
    ("non-tensor", lambda p: generate(_replace(p, 2, ("bad.list", [1.0, 2.0]))), dict(packed=True),
     ValueError, "bad.list"),
    ("sparse", lambda p: _replace(p, 3, ("bad.sparse", _sparse())), dict(packed=False), ValueError, "bad.sparse"),
    ("sparse-first", lambda p: _replace(p, 0, ("bad.sparse0", _sparse())), dict(packed=True), ValueError, "bad.sparse0"),
    ("quantized", lambda p: generate(_replace(p, 4, ("bad.q", _quantized()))), dict(packed=True), ValueError, "bad.q"),
    ("not-a-pair", lambda p: generate(_replace(p, 1, p[0][1])), dict(packed=False), ValueError, "pairs"),
    ("iterator-raises", lambda p: _raising(p, 3, SourceFailed("source broke at 3")), dict(packed=True),
     SourceFailed, "source broke at 3"),
    ("iterator-raises-first", lambda p: _raising(p, 0, KeyError("no weights yet")), dict(packed=False),
     KeyError, "no weights yet"),
    ("iterator-raises-after-last", lambda p: _raising(p + [None], len(p), SourceFailed("late failure")),
     dict(packed=True), SourceFailed, "late failure"),
    ("name-not-a-string", lambda p: _replace(p, 2, (12345, p[2][1])), dict(packed=True), ValueError, "12345"),
    ("post-iter-raises", lambda p: p, dict(packed=True, post_iter_func=lambda item: 1 / 0 if item[0] == "w3" else item[1]),
     ZeroDivisionError, "division by zero"),
]  # fmt: skip


def test_trainer_bad_input_raises_there_and_transfer_error_on_every_worker():
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            errors = []
            try:
                # Bad arguments are refused before anything is sent: workers see only the next update.
                for bad in (dict(packed="yes"), dict(packed_num_buffers=0), dict(packed_buffer_size_bytes=8),
                            dict(src=1), dict(src=0.0), dict(src="0"), dict(post_iter_func=3)):  # fmt: skip
                    with pytest.raises(ValueError):
                        NCCLWeightTransferEngine.trainer_send_weights(simple(0), group, **bad)
                with pytest.raises(ValueError):
                    NCCLWeightTransferEngine.trainer_send_weights(simple(0), object())
                NCCLWeightTransferEngine.trainer_send_weights(simple(1), group, packed=True, packed_buffer_size_bytes=256)
                for i, (_, make, kwargs, exc_type, _) in enumerate(BAD_INPUT):
                    with pytest.raises(exc_type) as err:
                        NCCLWeightTransferEngine.trainer_send_weights(
                            make(simple(10 + i)), group, packed_buffer_size_bytes=256, **kwargs)  # fmt: skip
                    errors.append(err.value)
                    NCCLWeightTransferEngine.trainer_send_weights(
                        generate(simple(2000 + i)), group, packed=bool(i % 2), packed_buffer_size_bytes=256)  # fmt: skip
            finally:
                destroy_side_group(group)
            return errors
        engine = worker(rank, port, world)
        errors, goods = [], []
        try:
            got, load = collector()
            engine.receive_weights(None, load)
            goods.append(got)
            for i, case in enumerate(BAD_INPUT):
                # Out of band on one worker: it expects the good tensors the trainer meant to send.
                info = _info(simple(10 + i), dict(packed=case[2]["packed"])) if rank == 1 else None
                with pytest.raises(TransferError) as err:
                    engine.receive_weights(info, lambda batch: None)
                errors.append(err.value)
                got, load = collector()
                engine.receive_weights(None, load)
                goods.append(got)
        finally:
            engine.shutdown()
        return errors, goods

    values = run_world(body, world)
    for i, (case_id, _, _, exc_type, text) in enumerate(BAD_INPUT):
        assert isinstance(values[0][i], exc_type), case_id
        assert text in str(values[0][i]), (case_id, values[0][i])
        for rank in (1, 2):
            errors, goods = values[rank]
            assert text in str(errors[i]), (case_id, rank, str(errors[i]))
            assert "aborted" in str(errors[i]), (case_id, rank, str(errors[i]))
            assert errors[i].broken is False, (case_id, rank)
    for rank in (1, 2):
        goods = values[rank][1]
        assert_same(goods[0], simple(1), f"rank {rank} first")
        for i, got in enumerate(goods[1:]):
            assert_same(got, simple(2000 + i), f"rank {rank} after {BAD_INPUT[i][0]}")


# -- a failing load_weights -------------------------------------------------------------------------


class DiskFull(OSError):
    pass


def test_load_weights_raising_on_one_worker_fails_every_rank_then_next_update_works():
    world = 4
    # (packed, atomic, failing rank, which call fails)
    # 7 tensors: 4 buckets of 256 bytes packed (so call 4 is the last one), one bucket unpacked.
    plan = [(True, False, 2, 2), (False, False, 3, 1), (True, True, 1, 1), (False, True, 3, 1), (True, False, 1, 1),
            (False, False, 2, 1), (True, False, 3, 4)]

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            errors = []
            try:
                for step, (packed, _, _, _) in enumerate(plan):
                    with pytest.raises(TransferError) as err:
                        NCCLWeightTransferEngine.trainer_send_weights(
                            generate(simple(step, 7)), group, packed=packed, packed_buffer_size_bytes=256)  # fmt: skip
                    errors.append(err.value)
                    NCCLWeightTransferEngine.trainer_send_weights(simple(500 + step, 7), group, packed=packed)
            finally:
                destroy_side_group(group)
            return errors
        engine = worker(rank, port, world)
        errors, goods = [], []
        try:
            for step, (_, atomic, bad_rank, bad_call) in enumerate(plan):
                calls = [0]

                def load(batch: list) -> None:
                    calls[0] += 1
                    if rank == bad_rank and calls[0] == bad_call:
                        raise DiskFull(f"disk full on step {step}")

                with pytest.raises(TransferError) as err:
                    engine.receive_weights(None, load, atomic=atomic)
                errors.append(err.value)
                got, load = collector()
                engine.receive_weights(None, load)
                goods.append((got, engine.weights_version, engine.torn))
        finally:
            engine.shutdown()
        return errors, goods

    values = run_world(body, world)
    for step, (_, atomic, bad_rank, _) in enumerate(plan):
        message = str(values[0][step])
        assert f"load_weights raised on rank {bad_rank}" in message, (step, message)
        assert f"disk full on step {step}" in message, (step, message)
        assert values[0][step].broken is False
        for rank in (1, 2, 3):
            errors, goods = values[rank]
            assert str(errors[step]) == message, (step, rank)
            got, version, torn = goods[step]
            assert_same(got, simple(500 + step, 7), f"rank {rank} step {step}")
            assert (version, torn) == (2 * step + 1, False)


@pytest.mark.parametrize("tensors,calls,bad_call", [(7, 4, 1), (7, 4, 2), (7, 4, 4), *((18, 10, c) for c in (1, 2, 3, 6, 8, 9, 10))])
def test_load_failure_in_a_cached_layout_fails_every_rank_and_loads_nothing_more(tensors, calls, bad_call):
    """Steady state (the layout cached, each worker's rows of the next steps posted before it
    waits for a bucket): a failure in load call ``bad_call`` of ``calls`` (one per bucket)
    reaches every rank, the failing worker is handed nothing more, and the next update is
    whole. With 10 buckets the rows run two steps ahead (protocol 9) until the last two."""
    world, steps = 3, 4
    model = simple(7, tensors)
    send = dict(packed=True, packed_buffer_size_bytes=256)  # some tensors split across buckets
    expected_calls = calls

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                for step in range(steps):
                    if step == 2:
                        with pytest.raises(TransferError) as err:
                            NCCLWeightTransferEngine.trainer_send_weights(iter(model), group, **send)
                        message = str(err.value)
                    else:
                        NCCLWeightTransferEngine.trainer_send_weights(iter(model), group, **send)
            finally:
                destroy_side_group(group)
            return message
        engine = worker(rank, port, world)
        try:
            for step in range(steps):
                calls: list[int] = []

                def load(batch: list, calls: list = calls) -> None:
                    calls.append(len(batch))
                    if step == 2 and rank == 1 and len(calls) == bad_call:
                        raise DiskFull(f"disk full in call {bad_call}")

                got, keep = collector()
                if step == 2:
                    with pytest.raises(TransferError) as err:
                        engine.receive_weights(None, lambda b: (load(b), keep(b)))
                    failed = (str(err.value), len(calls))
                else:
                    engine.receive_weights(None, lambda b: (load(b), keep(b)))
                    assert len(calls) == expected_calls, calls
                    assert_same(got, model, f"rank {rank} step {step}")
        finally:
            engine.shutdown()
        return failed

    values = run_world(body, world)
    message = values[0]
    assert "load_weights raised on rank 1 in bucket" in message and f"disk full in call {bad_call}" in message, message
    for rank in (1, 2):
        assert values[rank][0] == message, (rank, values[rank][0])
    assert values[1][1] == bad_call  # nothing handed to load_weights after the failure


@pytest.mark.parametrize("gap", [3, 4, 6])
def test_a_load_failure_reaches_every_rank_in_an_abort_that_follows_it(gap):
    """Worker 1's load_weights raises in bucket 2 of a cached 10-bucket layout, and the trainer's
    source fails ``gap`` buckets later, possibly before the trainer has read the row that reports
    the load failure: the ABORT that follows names the load failure on every worker. The workers
    posted their rows of the ABORT step two steps ahead; the SYNC step after it carries the rows
    that declare the failure, and every rank settles on those."""
    from torchxfer.packing import TensorSpec, plan_slots

    model = simple(6, n=18)
    starts: dict[int, int] = {}
    for slot in plan_slots([TensorSpec.of(n, t) for n, t in model], 256):
        starts.setdefault(slot.bucket, slot.index)
    assert len(starts) == 10
    bad_name, stop_at = model[starts[2]][0], starts[2 + gap]
    failing, world = 3, 3  # updates_that_may_fail: the trainer and two workers
    kw: dict[str, Any] = dict(packed=True, packed_buffer_size_bytes=256)

    def source(k: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield from model[: stop_at if k == failing else len(model)]
        if k == failing:
            raise RuntimeError("the source broke")

    def check(rank: int, k: int, batch: list) -> None:
        if rank == 1 and k == failing and any(n == bad_name for n, _ in batch):
            raise DiskFull("disk full")

    values = updates_that_may_fail([((lambda k=k: source(k)), kw) for k in range(failing + 2)], check=check)
    for rank in range(world):
        assert [isinstance(v, str) for v in values[rank]] == [False] * failing + [True, False], values[rank]
        got = values[rank][failing]
        # The trainer raises its source's own error when that came first; when it read the
        # workers' row first, the agreed error, as every worker does.
        if rank or got != "the source broke":
            assert "load_weights raised on rank 1" in got and "disk full" in got, (rank, got)


# -- lazy generator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed,num_buffers", [(True, 1), (True, 2), (True, 3), (False, 2)])
def test_generator_source_is_pulled_lazily(packed, num_buffers):
    """Each tensor fills exactly one buffer, so bucket k is tensor k.

    The receiver loads bucket k once it has agreed on the header of bucket
    k + num_buffers - 1; the trainer then can have packed bucket k + num_buffers
    and pulled one tensor more before it waits for the receiver. So while
    ``load_weights`` handles tensor k the source has yielded at most
    k + num_buffers + 2 tensors (packed mode; unpacked mode groups up to 256
    small tensors per bucket). A source drained ahead would have yielded all.
    On the trainer side, at most one earlier tensor is still alive (referenced)
    whenever the source is asked for the next one.
    """
    world = 3
    count = 16
    numel = 256  # 1 KiB of float32: exactly one buffer
    pulled = [0]
    alive_when_pulled: list[int] = []

    def source(seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        refs: list[weakref.ref] = []
        for i in range(count):
            alive_when_pulled.append(sum(r() is not None for r in refs))
            pulled[0] = i + 1
            t = torch.randn(numel, generator=gen) + i
            refs.append(weakref.ref(t))
            yield f"w{i}", t
            del t

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                stats = NCCLWeightTransferEngine.trainer_send_weights(
                    source(7), group, packed=packed, packed_buffer_size_bytes=numel * 4, packed_num_buffers=num_buffers
                )  # fmt: skip
            finally:
                destroy_side_group(group)
            return stats.num_tensors
        engine = worker(rank, port, world)
        seen: list[tuple[int, int]] = []
        got: list = []

        def load(batch: list) -> None:
            for name, t in batch:
                seen.append((int(name[1:]), pulled[0]))
                got.append((name, t.clone()))

        try:
            engine.receive_weights(None, load)
        finally:
            engine.shutdown()
        return seen, got

    values = run_world(body, world)
    assert values[0] == count
    want = list(source(7))
    for rank in (1, 2):
        seen, got = values[rank]
        assert_same(got, want, f"rank {rank}")
        assert [k for k, _ in seen] == list(range(count))
        if packed:  # unpacked mode pulls a whole group (packing.UNPACKED_GROUP_TENSORS) per bucket
            for k, n in seen:
                assert n <= k + num_buffers + 2, (rank, seen)
            assert seen[0][1] < count, seen
    if packed:
        trainer_side = alive_when_pulled[:count]
        assert max(trainer_side) <= 2, trainer_side


# -- memory: receive buffers are reused ------------------------------------------------------------------


@pytest.mark.parametrize("buf,model", [(4096, "small"), (DIRECT_BUF, "direct")])
def test_receive_buffers_are_reused_across_updates(buf, model):
    world = 3
    updates = 5

    def pairs(step: int) -> list[tuple[str, torch.Tensor]]:
        if model == "direct":
            return [(n, t) for n, t in direct_model(step) if n != "direct1"]  # no tensor larger than the buffer
        gen = torch.Generator().manual_seed(step)
        return [(f"p{i}", rand_tensor((64 + 40 * i,), DTYPES[i % len(DTYPES)], gen)) for i in range(12)]

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                for step in range(updates):
                    src = generate(pairs(step)) if step % 2 else pairs(step)
                    NCCLWeightTransferEngine.trainer_send_weights(src, group, packed=True, packed_buffer_size_bytes=buf)
            finally:
                destroy_side_group(group)
            return None
        engine = worker(rank, port, world)
        ptrs, storages, ok = [], [], []
        try:
            for step in range(updates):
                info = NCCLWeightTransferUpdateInfo.from_named_tensors(pairs(step), packed=True, packed_buffer_size_bytes=buf)
                step_ptrs, step_storages, got = {}, set(), []

                def load(batch: list) -> None:
                    for name, t in batch:
                        step_ptrs[name] = t.data_ptr()
                        step_storages.add(t.untyped_storage().data_ptr())
                        got.append((name, t.clone()))

                engine.receive_weights(info if step % 2 == 0 else None, load)
                ptrs.append(step_ptrs)
                storages.append(step_storages)
                ok.append(got)
        finally:
            engine.shutdown()
        return ptrs, storages, ok

    values = run_world(body, world)
    for rank in (1, 2):
        ptrs, storages, got = values[rank]
        for step in range(updates):
            assert_same(got[step], pairs(step), f"rank {rank} step {step}")
            assert ptrs[step] == ptrs[0], (rank, step)
            assert storages[step] == storages[0], (rank, step)
        assert 1 <= len(storages[0]) <= 2  # num_buffers (2) buffers at most


def _send_updates(port: int, world: int, updates: list[list[tuple[str, torch.Tensor]]]) -> None:
    """The trainer of a world: each update's pairs, packed into BUF-byte buffers, then the group torn down."""
    group = trainer(port, world)
    try:
        for pairs in updates:
            NCCLWeightTransferEngine.trainer_send_weights(pairs, group, packed=True, packed_buffer_size_bytes=BUF)
    finally:
        destroy_side_group(group)


def _round_trips(pairs: Callable[[int], list], updates: int, receive: Callable[[Any, int], Any]) -> list:
    """A trainer sends ``pairs(step)`` for each update to one worker, which calls
    ``receive(engine, step)`` for each; the worker's results, by update."""
    world = 2

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            return _send_updates(port, world, [pairs(step) for step in range(updates)])
        engine = worker(rank, port, world)
        try:
            return [receive(engine, step) for step in range(updates)]
        finally:
            engine.shutdown()

    return run_world(body, world)[1]


def _mangle(name: str, t: torch.Tensor) -> None:
    """Change a tensor handed to load_weights in place, metadata and all (one way per name)."""
    if name == "w0":
        t.t_()
    elif name == "w1":
        t.set_(torch.zeros(t.shape, dtype=t.dtype))
    elif name == "w2":
        t.requires_grad_(True)
    elif name == "w3":
        t.as_strided_(t.shape, t.stride(), t.storage_offset() + 1)
    elif name == "w4":
        t.unsqueeze_(0)
    elif name == "w5":
        t.resize_(1)
    elif name == "w6":
        t.data = torch.ones(2, 2)


@pytest.mark.parametrize("mangle_every", [False, True])
def test_tensors_a_load_weights_changed_in_place_arrive_as_sent_next_update(mangle_every):
    """Receive views are made once per layout and handed out as the same objects: one that a
    load_weights changed in place (transposed, re-pointed, resized...) is not handed out again."""
    updates = 4

    def pairs(step: int) -> list[tuple[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(step)
        shapes = [(4, 3), (5, 5), (6,), (3, 7), (2, 4), (9,), (3, 3), (2, 2)]
        return [(f"w{i}", torch.randn(shape, generator=gen)) for i, shape in enumerate(shapes)]

    def receive(engine: Any, step: int) -> list:
        batch_got: list = []

        def load(batch: list) -> None:
            for name, t in batch:
                batch_got.append((name, t.clone()))
                if mangle_every or step == 0:
                    _mangle(name, t)

        engine.receive_weights(None, load)
        return batch_got

    got = _round_trips(pairs, updates, receive)
    for step in range(updates):
        assert_same(got[step], pairs(step), f"step {step}")
        assert all(not t.requires_grad for _, t in got[step])


def test_kept_views_check_only_after_a_consumer_not_vouched_for():
    """``KeptViews.pairs``: after an untrusted consumer the next call checks (and renews what was
    changed); after a trusted one (ModuleLoader, atomic staging) it hands out the same objects."""
    from torchxfer.loading import KeptViews

    base = torch.arange(24, dtype=torch.float32)
    kept = KeptViews((("a", base[:12].view(3, 4)), ("b", base[12:].view(2, 6))))
    first = kept.pairs()
    first[0][1].t_()  # an untrusted consumer transposes "a"
    second = kept.pairs(trusted=True)
    assert second is not first and second[0][1].shape == (3, 4) and second[1][1].shape == (2, 6)
    assert bytes_equal(second[0][1], base[:12].view(3, 4)) and second[0][1].data_ptr() == base.data_ptr()
    assert kept.pairs() is second  # the trusted consumer's call: no check, the same objects
    kept.pairs()[1][1].resize_(1)  # handed out untrusted: the next call checks again
    third = kept.pairs()
    assert third is not second and third[1][1].shape == (2, 6) and bytes_equal(third[1][1], base[12:].view(2, 6))
    assert third[0][1] is not second[0][1]  # renewed as a whole, from the private originals
    assert kept.pairs() is third  # unchanged: kept


def test_module_loader_updates_stay_bit_exact_with_kept_views():
    """A ModuleLoader consumer skips the kept views' check; many updates still land bit for bit."""
    updates = 4
    shapes = [(4, 3), (5, 5), (6,), (3, 7)]

    def pairs(step: int) -> list[tuple[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(100 + step)
        return [(f"w{i}", torch.randn(shape, generator=gen)) for i, shape in enumerate(shapes)]

    module = torch.nn.Module()
    for i, shape in enumerate(shapes):
        module.register_buffer(f"w{i}", torch.zeros(shape))
    loader = ModuleLoader(module)

    def receive(engine: Any, step: int) -> list:
        with loader.update():
            engine.receive_weights(None, loader)
        return [(k, v.clone()) for k, v in module.state_dict().items()]

    got = _round_trips(pairs, updates, receive)
    for step in range(updates):
        assert_same(got[step], pairs(step), f"step {step}")


# -- regressions: a TransferError from the source, long names in agreed errors --------------------------------------------


def test_source_raising_transfer_error_aborts_like_any_other_source_error():
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                with pytest.raises(TransferError, match="upstream relay failed"):
                    NCCLWeightTransferEngine.trainer_send_weights(
                        _raising(simple(0), 2, TransferError("upstream relay failed")), group,
                        packed=True, packed_buffer_size_bytes=256,
                    )  # fmt: skip
                NCCLWeightTransferEngine.trainer_send_weights(simple(1), group, packed=True)
            finally:
                destroy_side_group(group)
            return None
        engine = worker(rank, port, world)
        try:
            with pytest.raises(TransferError, match="upstream relay failed"):
                engine.receive_weights(None, lambda batch: None)
            got, load = collector()
            engine.receive_weights(None, load)
        finally:
            engine.shutdown()
        return got

    values = run_world(body, world)
    for rank in (1, 2):
        assert_same(values[rank], simple(1), f"rank {rank}")


def test_mismatch_of_long_names_still_names_both_values():
    world = 2
    sent_name, expected_name = "model.layers." + "a" * 600, "model.layers." + "b" * 600
    tensor = torch.arange(6, dtype=torch.float32)

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                with pytest.raises(TransferError) as err:
                    NCCLWeightTransferEngine.trainer_send_weights([(sent_name, tensor)], group, packed=True)
            finally:
                destroy_side_group(group)
            return str(err.value)
        engine = worker(rank, port, world)
        info = NCCLWeightTransferUpdateInfo.from_named_tensors([(expected_name, tensor)], packed=True)
        try:
            with pytest.raises(TransferError) as err:
                engine.receive_weights(info, lambda batch: None)
        finally:
            engine.shutdown()
        return str(err.value)

    for message in run_world(body, world):
        assert repr(sent_name) in message and repr(expected_name) in message, message[-200:]



def test_each_update_logs_one_debug_line_per_rank_and_a_failure_one_warning(caplog):
    """Logging through ``torchxfer``: one DEBUG line per update and rank naming the update, its
    tensors, bytes, seconds and GB/s; an agreed failure one WARNING per rank naming the update."""
    import logging
    import re

    caplog.set_level(logging.DEBUG, logger="torchxfer")
    world = 2
    sent = [("a", torch.arange(6, dtype=torch.float32)), ("b", torch.ones(3, 5, dtype=torch.bfloat16))]
    nbytes = 6 * 4 + 15 * 2

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                for _ in range(2):
                    NCCLWeightTransferEngine.trainer_send_weights(sent, group, packed=True, packed_buffer_size_bytes=BUF)
                with pytest.raises(TransferError):
                    NCCLWeightTransferEngine.trainer_send_weights(sent, group, packed=True, packed_buffer_size_bytes=BUF)
            finally:
                destroy_side_group(group)
            return None
        engine = worker(rank, port, world)
        wrong = NCCLWeightTransferUpdateInfo.from_named_tensors([("a", sent[0][1]), ("c", sent[1][1])], packed=True)
        try:
            for _ in range(2):
                engine.receive_weights(None, lambda batch: None)
            with pytest.raises(TransferError):
                engine.receive_weights(wrong, lambda batch: None)
        finally:
            engine.shutdown()
        return None

    run_world(body, world)
    records = [r for r in caplog.records if r.name == "torchxfer"]
    line = r"update (\d+): 2 tensors, %d bytes in [0-9.]+ s \([0-9.]+ GB/s\)" % nbytes
    for verb in ("sent", "received"):
        debug = [m.group(1) for r in records if r.levelno == logging.DEBUG
                 for m in [re.match(verb + " " + line, r.getMessage())] if m]  # fmt: skip
        assert debug == ["0", "1"], (verb, [r.getMessage() for r in records])
    warnings_ = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(m.startswith("update 2 failed: ") for m in warnings_), warnings_  # the trainer
    assert any(m.startswith("update 2 failed on rank 1: ") for m in warnings_), warnings_  # the worker
    assert len(warnings_) == 2, warnings_


# -- tensors larger than a buffer --------------------------------------------------------------------


def split_model(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Tensors of several buffers each, back to back and between small ones, so that slices
    travel alone (received straight into the assembly tensor) and one tensor's tail shares a
    bucket with the next one's head (received through the buffer)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        ("small0", rand_tensor((33,), torch.float32, gen)),
        ("big0", rand_tensor((7 << 19,), torch.int32, gen)),  # 14 MiB: 3.5 buffers
        ("big1", rand_tensor((9 << 20,), torch.uint8, gen)),  # 9 MiB, right after big0's tail
        ("small1", rand_tensor((5, 3), torch.bfloat16, gen).t()),
        ("big2", rand_tensor((3 << 20,), torch.float16, gen)),  # 6 MiB, its own head bucket
        ("tail", rand_tensor((), torch.float64, gen)),
    ]


def updates_over_three_ranks(updates: int, source: Callable[[int], Any], **send: Any) -> list[Any]:
    """Send ``source(step)`` for each update from rank 0 (its value: the TransferStats); ranks 1 and
    2 collect what arrives."""
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                return [NCCLWeightTransferEngine.trainer_send_weights(source(step), group, **send)
                        for step in range(updates)]  # fmt: skip
            finally:
                destroy_side_group(group)
        engine = worker(rank, port, world)
        runs = []
        try:
            for _ in range(updates):
                got, load = collector()
                engine.receive_weights(None, load)
                runs.append(got)
        finally:
            engine.shutdown()
        return runs

    return run_world(body, world)



def updates_that_may_fail(sends: list[tuple[Callable[[], Any], dict]],
                          before: Callable[[int], None] | None = None,
                          check: Callable[[int, int, list], None] | None = None) -> list[Any]:  # fmt: skip
    """Send each ``(source(), kwargs)`` from rank 0 (its value per update: None, or the message of
    the RuntimeError it raised); ranks 1 and 2 collect what arrives, or the message of the
    TransferError the update raised there, which must leave the group usable. ``check(rank,
    update, batch)`` runs in each worker's load_weights before the batch is collected (it may raise)."""
    world = 3

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            out = []
            try:
                for k, (source, kw) in enumerate(sends):
                    if before is not None:
                        before(k)
                    try:
                        NCCLWeightTransferEngine.trainer_send_weights(source(), group, **kw)
                        out.append(None)
                    except RuntimeError as e:
                        out.append(str(e))
            finally:
                destroy_side_group(group)
            return out
        engine = worker(rank, port, world)
        runs = []
        try:
            for k in range(len(sends)):
                got, load = collector()
                if check is not None:
                    load = (lambda collect, k: lambda batch: (check(rank, k, batch), collect(batch)))(load, k)
                try:
                    engine.receive_weights(None, load)
                    runs.append(got)
                except TransferError as e:
                    assert not e.broken, e
                    runs.append(str(e))
        finally:
            engine.shutdown()
        return runs

    return run_world(body, world)

@pytest.mark.parametrize("packed_source", ["list", "gen"])
def test_tensors_larger_than_a_buffer_round_trip_over_cached_updates(packed_source):
    updates = 4  # the first describes the layout, the rest run from the cache

    def source(step: int) -> Any:
        pairs = split_model(step)
        return generate(pairs) if packed_source == "gen" else pairs

    values = updates_over_three_ranks(updates, source, packed=True, packed_buffer_size_bytes=DIRECT_BUF)
    for rank in (1, 2):
        for step, got in enumerate(values[rank]):
            assert_same(got, split_model(step), f"rank {rank} update {step}")


# -- a source that refills one staging tensor ---------------------------------------------------------


def staged(pairs: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor through one staging tensor per (dtype, size), refilled for each."""
    staging: dict[tuple, torch.Tensor] = {}
    for name, t in pairs:
        key = (t.dtype, t.numel())
        buf = staging.get(key)
        if buf is None:
            buf = staging[key] = torch.empty(t.numel(), dtype=t.dtype)
        buf.copy_(t.reshape(-1))
        yield name, buf.view(t.shape)


def staging_model(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Several tensors of each size, so that the staging tensor is refilled while earlier values
    may still be in flight: small (packed), large (sent alone), larger than a buffer (split)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        out.append((f"small{i}", rand_tensor((7, 5), torch.float32, gen)))
        out.append((f"large{i}", rand_tensor((3 << 18,), torch.float16, gen)))  # 1.5 MiB
        out.append((f"split{i}", rand_tensor((5 << 18,), torch.int32, gen)))  # 5 MiB
    return out


@pytest.mark.parametrize("packed,zero_copy", [(True, True), (True, False), (False, True)])
def test_a_generator_may_refill_one_staging_tensor(packed, zero_copy):
    """What arrives is each value as it was yielded, over updates that describe the layout
    and updates that run from the cached layout."""
    values = updates_over_three_ranks(4, lambda step: staged(staging_model(step)), packed=packed,
                                      packed_buffer_size_bytes=4 << 20, zero_copy=zero_copy)  # fmt: skip
    for rank in (1, 2):
        for step, got in enumerate(values[rank]):
            assert_same(got, staging_model(step), f"rank {rank} update {step}")


_ALTERNATING = [torch.empty(3 << 18, dtype=torch.float16) for _ in range(2)]  # kept across updates


def alternating(pairs: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Two staging tensors kept across updates, in turn: each is refilled two pulls after it was
    yielded, so in the steady state every bucket holds last update's very objects."""
    for k, (name, t) in enumerate(pairs):
        _ALTERNATING[k % 2].copy_(t)
        yield name, _ALTERNATING[k % 2]


def alternating_model(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"big{i}", rand_tensor((3 << 18,), torch.float16, gen)) for i in range(8)]  # 1.5 MiB, sent alone


def test_a_generator_alternating_two_staging_tensors_kept_across_updates_arrives_intact():
    """A generator's tensors that are last update's very objects (not Parameters) are not taken
    as unchanged until their zero-copy sends complete: each value arrives as it was yielded."""
    values = updates_over_three_ranks(4, lambda step: alternating(alternating_model(step)), packed=True,
                                      packed_buffer_size_bytes=4 << 20)  # fmt: skip
    for rank in (1, 2):
        for step, got in enumerate(values[rank]):
            assert_same(got, alternating_model(step), f"rank {rank} update {step}")


def test_a_worker_that_calls_the_trainers_send_gets_a_value_error_and_the_group_goes_on():
    """Only rank 0 of the side group sends: a worker that calls trainer_send_weights on its own
    group gets ValueError at once, before any collective, and the next update arrives bit-exact."""

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, 2)
            try:
                return NCCLWeightTransferEngine.trainer_send_weights(simple(4), group, packed=True).update_id
            finally:
                destroy_side_group(group)
        engine = worker(rank, port, 2)
        try:
            with pytest.raises(ValueError, match="sends as rank 0 of the side group"):
                NCCLWeightTransferEngine.trainer_send_weights(simple(5), engine.model_update_group, packed=True)
            got, load = collector()
            stats = engine.receive_weights(None, load)
            return got, stats.update_id
        finally:
            engine.shutdown()

    sent_id, (got, update_id) = run_world(body, 2)
    assert sent_id == update_id == 0
    assert_same(got, simple(4))


# -- shutdown from another thread --------------------------------------------------------------------


def test_shutdown_from_another_thread_stops_a_blocked_receive_and_changes_nothing():
    world = 2

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                NCCLWeightTransferEngine.trainer_send_weights(simple(1), group, packed=True)
                # Then no second update: the worker below waits for one until it is shut down.
                deadline = time.monotonic() + DEADLINE / 2
                while not group_closed.is_set() and time.monotonic() < deadline:
                    group_closed.wait(0.05)
            finally:
                destroy_side_group(group)
            return None
        engine = worker(rank, port, world)
        got, load = collector()
        engine.receive_weights(None, load)
        version = engine.weights_version
        loads: list = []
        side = engine.model_update_group
        waiting = threading.Event()
        observed: list = []

        def stopper() -> None:
            # Shut down once the receive is blocked inside a wait on the group.
            deadline = time.monotonic() + DEADLINE / 2
            while side_group(side)._waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            observed.append(side_group(side)._waiting > 0)
            waiting.set()
            engine.shutdown()

        thread = threading.Thread(target=stopper)
        thread.start()
        start = time.monotonic()
        with pytest.raises(TransferError) as err:
            engine.receive_weights(None, lambda batch: loads.append(batch))
        elapsed = time.monotonic() - start
        thread.join()
        broken = err.value.broken
        # The trainer is still alive, its side of the interrupted collective never posted: dropping
        # the error (whose frames hold the group) must not wait for that collective's timeout.
        start = time.monotonic()
        del err
        gc.collect()
        dropped = time.monotonic() - start
        group_closed.set()
        return {"elapsed": elapsed, "dropped": dropped, "waiting": waiting.is_set() and observed == [True], "loads": loads,
                "version": (version, engine.weights_version), "broken": broken, "first": got}

    group_closed = threading.Event()
    values = run_world(body, world)
    v = values[1]
    assert v["waiting"]
    assert v["elapsed"] < 2.0, v  # promptly, not after the group's timeout
    assert v["dropped"] < 2.0, v  # and nothing after it waits for that timeout either
    assert v["loads"] == [] and v["version"][0] == v["version"][1] == 0 and v["broken"] is True
    assert_same(v["first"], simple(1))


def test_a_receive_waiting_for_the_engine_when_it_shuts_down_raises_transfer_error():
    """Two threads call receive_weights; the second waits for the first. When another thread
    shuts the engine down, both raise TransferError (the second used to raise the ValueError
    of a destroyed group, which the docs keep for bad arguments)."""
    world = 2

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            try:
                done.wait(DEADLINE / 2)
            finally:
                destroy_side_group(group)
            return None
        engine = worker(rank, port, world)
        side = side_group(engine.model_update_group)
        errors: dict = {}
        arrived = threading.Semaphore(0)

        class Lock:  # the engine's lock, telling when a caller reaches it
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __enter__(self) -> None:
                arrived.release()
                self.inner.acquire()

            def __exit__(self, *exc: Any) -> None:
                self.inner.release()

        engine._lock = Lock(engine._lock)

        def receive(which: str) -> None:
            try:
                engine.receive_weights(None, lambda batch: None)
            except Exception as e:  # noqa: BLE001 - inspected below
                errors[which] = e

        first = threading.Thread(target=receive, args=("first",))
        first.start()
        deadline = time.monotonic() + DEADLINE / 2
        while side._waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert side._waiting > 0, "the first receive never waited on the group"
        assert arrived.acquire(timeout=DEADLINE / 2)  # the first call's
        second = threading.Thread(target=receive, args=("second",))
        second.start()
        assert arrived.acquire(timeout=DEADLINE / 2)  # the second call is at the lock
        engine.shutdown()
        first.join(DEADLINE / 2)
        second.join(DEADLINE / 2)
        done.set()
        return {k: (type(e).__name__, str(e)) for k, e in errors.items()}

    done = threading.Event()
    got = run_world(body, world)[1]
    assert got["first"][0] == "TransferError" and got["second"][0] == "TransferError", got
    assert "shut down" in got["second"][1], got


# -- the second update of a layout runs from the cache ------------------------------------------------


def test_the_second_update_of_the_same_parameters_packs_them_in_bulk(monkeypatch):
    """A module's parameters sent again (the very objects, new values): from the second update
    on, no tensor is packed one by one; every value arrives bit for bit."""
    from torchxfer import sender

    model = simple(3, n=40)
    calls: list[int] = []
    pack = sender.Sender.pack

    def counting_pack(self, slot):
        calls[-1] += 1
        return pack(self, slot)

    monkeypatch.setattr(sender.Sender, "pack", counting_pack)
    sent = []

    def source(step: int) -> Any:
        for _, t in model:
            t.add_(step)  # in place: the same objects, new values
        sent.append([(n, t.clone()) for n, t in model])
        calls.append(0)
        return iter(model)

    values = updates_over_three_ranks(4, source, packed=True, packed_buffer_size_bytes=1024)
    assert calls[0] == len(model) and calls[1:] == [0, 0, 0], calls
    for rank in (1, 2):
        for step, got in enumerate(values[rank]):
            assert_same(got, sent[step], f"rank {rank} update {step}")


@pytest.mark.parametrize("num_buffers", [2, 3])
@pytest.mark.parametrize("between", [False, True], ids=["back-to-back", "small-between"])
def test_consecutive_tensors_larger_than_a_buffer_arrive_bit_for_bit_over_updates(num_buffers, between):
    """Tensors of 2.5 and 1.3 buffers each, one after the other (each split over buckets of its
    own), sent three times with new values: each split tensor's parts arrive straight into the
    receiver's assembly tensor or, while an earlier split tensor is still in flight, through the
    buffers; either way every value arrives bit for bit."""
    buf = 4096
    gen = torch.Generator().manual_seed(5)
    model = []
    for i, numel in enumerate([buf * 5 // 8, buf * 13 // 40, buf * 5 // 8, buf // 2 + 4, buf * 3 // 4]):
        model.append((f"big{i}", rand_tensor((numel,), torch.float32, gen)))
        if between and i % 2:
            model.append((f"small{i}", rand_tensor((3, 5), torch.float16, gen)))
    sent = []

    def source(step: int) -> Any:
        for _, t in model:
            t.mul_(-1).add_(step)
        sent.append([(n, t.clone()) for n, t in model])
        return iter(model)

    values = updates_over_three_ranks(3, source, packed=True, packed_buffer_size_bytes=buf,
                                      packed_num_buffers=num_buffers)  # fmt: skip
    for rank in (1, 2):
        for step, got in enumerate(values[rank]):
            assert_same(got, sent[step], f"rank {rank} update {step}")


def test_gc_paused_pauses_the_collector_and_restores_the_callers_setting():
    """Paused inside, restored after (also when the body raises); left off if it was off."""
    import gc

    from torchxfer.pulling import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"):
        with gc_paused():
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_is_paused_while_the_trainer_pulls_its_tensors():
    """The update pulls the source with the cyclic GC paused, in the first and later updates."""
    import gc

    model = simple(4, n=6)
    seen: list[bool] = []

    def source(step: int) -> Any:
        for name, t in model:
            seen.append(gc.isenabled())
            yield name, t

    updates_over_three_ranks(2, source, packed=True, packed_buffer_size_bytes=1024)
    assert seen == [False] * 12, seen


# -- bucket 0 posted ahead ----------------------------------------------------------------------------


def test_every_way_an_update_can_start_after_a_confirmed_layout_keeps_the_group_in_step(monkeypatch):
    """After an update every worker completed, each worker posts that layout's bucket 0 before
    the next update's first step. The trainer answers with the real bucket (same layout again)
    or with void broadcasts of the same sizes (new buffer size, new first tensor, unpacked,
    empty, a source that fails at once); either way every value arrives bit for bit and the
    group stays usable."""
    a, b = simple(1, n=12), [(f"b.{n}", t) for n, t in simple(2, n=9)]
    a2 = [(n, t * 3) for n, t in a]
    steps: list[tuple[str, list, dict]] = [
        ("a", a, dict(packed=True, packed_buffer_size_bytes=512)),
        ("a cached", a2, dict(packed=True, packed_buffer_size_bytes=512)),
        ("new buffer size", a, dict(packed=True, packed_buffer_size_bytes=1024)),
        ("cached", a2, dict(packed=True, packed_buffer_size_bytes=1024)),
        ("new first tensor", b, dict(packed=True, packed_buffer_size_bytes=1024)),
        ("fails at once", [], dict(packed=True, packed_buffer_size_bytes=1024)),
        ("cached after a failure", b, dict(packed=True, packed_buffer_size_bytes=1024)),
        ("unpacked", a, dict(packed=False)),
        ("unpacked cached", a2, dict(packed=False)),
        ("empty", [], dict(packed=True, packed_buffer_size_bytes=1024)),
        ("after empty", b, dict(packed=True, packed_buffer_size_bytes=1024)),
        ("cached again", b, dict(packed=True, packed_buffer_size_bytes=1024)),
        ("departs at its second tensor", b[:1] + [("other", b[1][1])] + b[2:], dict(packed=True, packed_buffer_size_bytes=1024)),
    ]

    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        raise RuntimeError("no weights today")
        yield  # pragma: no cover

    from torchxfer import sender

    voids: list[str] = []
    void_bucket = sender.Sender.void_bucket
    monkeypatch.setattr(sender.Sender, "void_bucket", lambda self, plan: (voids.append(now[0]), void_bucket(self, plan)))
    now = [""]

    def source(what: str, pairs: list) -> Callable[[], Any]:
        return failing if what == "fails at once" else lambda: iter(pairs)

    values = updates_that_may_fail([(source(what, pairs), kw) for what, pairs, kw in steps],
                                   before=lambda k: now.__setitem__(0, steps[k][0]))  # fmt: skip
    assert values[0] == [None] * 5 + ["no weights today"] + [None] * 7
    # Void where the update did not start with the confirmed layout's bucket 0; nothing is
    # posted ahead after an update that sent nothing.
    # An unpacked layout's bucket 0 is posted ahead too, into fresh tensors: "unpacked cached"
    # receives it for real, "empty" after it voids it.
    assert voids == ["new buffer size", "new first tensor", "fails at once", "unpacked", "empty",
                     "departs at its second tensor"], voids
    for rank in (1, 2):
        for (what, pairs, _), got in zip(steps, values[rank]):
            if what == "fails at once":
                assert isinstance(got, str) and "no weights today" in got, got
            else:
                assert_same(got, pairs, f"rank {rank}: {what}")


@pytest.mark.parametrize("where", ["renamed first", "renamed second", "inserted in bucket 1", "dropped last"])
def test_a_steady_layout_that_changes_inside_a_bulk_bucket_sends_every_tensor(where):
    """The same parameter objects sent until their buckets go in bulk, then a layout that departs
    inside a bucket: the tensors pulled ahead for the bulk bucket are all sent, none lost."""
    model = simple(4, n=16)  # several buckets at 256-byte buffers
    if where == "renamed first":
        changed = [("renamed", model[0][1])] + model[1:]
    elif where == "renamed second":
        changed = model[:1] + [("renamed", model[1][1])] + model[2:]
    elif where == "inserted in bucket 1":
        changed = model[:5] + [("new", torch.arange(7.0))] + model[5:]
    else:
        changed = model[:-1]
    sources = [model, model, model, changed, changed]
    values = updates_over_three_ranks(len(sources), lambda step: iter(sources[step]), packed=True,
                                      packed_buffer_size_bytes=256)  # fmt: skip
    assert [stats.num_tensors for stats in values[0]] == [len(s) for s in sources]
    for rank in (1, 2):
        for step, (got, want) in enumerate(zip(values[rank], sources)):
            assert_same(got, want, f"rank {rank} update {step}")


@pytest.mark.parametrize("where", ["first of bucket 1", "first of the last bucket", "after the last tensor"])
def test_a_source_failing_between_buckets_of_a_steady_layout_aborts_on_every_rank(where):
    """In the steady state a bucket is posted before the next tensor is pulled, so a source that
    fails there fails after a bucket every worker already has: every rank still raises, the
    update loads nothing more, and the next update of the layout arrives bit for bit."""
    from torchxfer.packing import plan_slots, TensorSpec

    model = simple(4, n=16)  # several buckets at 256-byte buffers
    starts = {}
    for slot in plan_slots([TensorSpec.of(n, t) for n, t in model], 256):
        starts.setdefault(slot.bucket, slot.index)
    assert len(starts) >= 3
    fail_at = {"first of bucket 1": starts[1], "first of the last bucket": starts[max(starts)],
               "after the last tensor": len(model)}[where]  # fmt: skip

    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        yield from model[:fail_at]
        raise RuntimeError(f"source failed at {fail_at}")

    kw = dict(packed=True, packed_buffer_size_bytes=256)
    # Three updates to reach the steady state, the failing one, then the layout again.
    values = updates_that_may_fail([(lambda: iter(model), kw)] * 3 + [(failing, kw), (lambda: iter(model), kw)])
    assert values[0] == [None] * 3 + [f"source failed at {fail_at}", None]
    for rank in (1, 2):
        runs = values[rank]
        assert isinstance(runs[3], str) and f"source failed at {fail_at}" in runs[3], runs[3]
        for step in (0, 1, 2, 4):
            assert_same(runs[step], model, f"rank {rank} update {step}")


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_every_way_an_update_can_leave_a_steady_layout_after_a_bucket_keeps_the_group_in_step(monkeypatch, packed):
    """After each BUCKET row that is not the last, every worker posts the next bucket of the layout
    before that bucket's row arrives (plan.next_bucket). The trainer sends it next: for real when the
    layout goes on, or as void broadcasts of the same sizes before any other row when it does not (a
    renamed, resized or dropped tensor there, a source that fails or ends there). Every value arrives
    bit for bit, every failure reaches every rank, and the group stays usable. Unpacked layouts
    (buckets of 3 whole tensors here) are posted ahead into fresh tensors the same way."""
    from torchxfer import packing, sender
    from torchxfer.packing import TensorSpec, plan_slots

    model = simple(6, n=18)
    if packed:
        kw: dict[str, Any] = dict(packed=True, packed_buffer_size_bytes=256)
        size = 256
    else:
        monkeypatch.setattr(packing, "UNPACKED_GROUP_TENSORS", 3)
        kw, size = dict(packed=False), None
    starts: dict[int, int] = {}
    for slot in plan_slots([TensorSpec.of(n, t) for n, t in model], size):
        starts.setdefault(slot.bucket, slot.index)
    assert len(starts) >= 4
    at = starts[2]  # the first tensor of bucket 2
    renamed = model[:at] + [("other", model[at][1])] + model[at + 1 :]
    resized = model[:at + 1] + [(model[at + 1][0], model[at + 1][1][:1])] + model[at + 2 :]
    ended = model[:at]
    again = [(n, t * 2) for n, t in model]

    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        yield from model[:at]
        raise RuntimeError("the source stopped in bucket 2")

    steps = [("a", model), ("steady", again), ("steady again", model), ("renamed", renamed), ("a", model),
             ("resized", resized), ("a", model), ("fails", None), ("a", model), ("ends", ended), ("a", model),
             ("steady", again)]  # fmt: skip
    voids: list[tuple[str, int]] = []
    void_bucket = sender.Sender.void_bucket
    now = [""]
    monkeypatch.setattr(sender.Sender, "void_bucket",
                        lambda self, plan: (voids.append((now[0], plan.index)), void_bucket(self, plan)))  # fmt: skip

    def source(pairs: list | None) -> Callable[[], Any]:
        return failing if pairs is None else lambda: iter(pairs)

    values = updates_that_may_fail([(source(pairs), kw) for _, pairs in steps],
                                   before=lambda k: now.__setitem__(0, steps[k][0]))  # fmt: skip
    assert values[0] == [None] * 7 + ["the source stopped in bucket 2"] + [None] * 4
    # Void where an update left the cached layout at a bucket posted ahead: the bucket of the first
    # tensor that differs (the layout sent next is the changed one, so "a" after it leaves it there
    # too); a failed update changes no layout, and past a cached layout's end nothing was posted ahead.
    second = next(s.bucket for s in plan_slots([TensorSpec.of(n, t) for n, t in model], size) if s.index == at + 1)
    assert voids == [("renamed", 2), ("a", 2), ("resized", second), ("a", second), ("fails", 2), ("ends", 2)], voids
    for rank in (1, 2):
        for (what, pairs), got in zip(steps, values[rank]):
            if pairs is None:
                assert isinstance(got, str) and "the source stopped in bucket 2" in got, got
            else:
                assert_same(got, pairs, f"rank {rank}: {what}")


@pytest.mark.parametrize("how,mode", [("renamed", "packed"), ("fails", "packed"), ("ends", "packed"),
                                      ("renamed", "checksum, 3 buffers"), ("fails", "checksum, 3 buffers"),
                                      ("renamed", "unpacked"), ("fails", "unpacked"), ("ends", "unpacked")])
def test_leaving_a_steady_layout_at_any_bucket_matches_the_rows_posted_two_steps_ahead(monkeypatch, how, mode):
    """Workers post their rows two steps ahead in a cached layout (until two buckets from its end),
    before they know the trainer's next row; when that row is a TABLE, an ABORT or an END instead of
    another bucket, the trainer posts a SYNC row to match. Leaving a layout of 9 or 10 buckets at
    every bucket, each way (packed; packed with checksums and 3 buffers; unpacked, 2 tensors a
    bucket): every value arrives bit for bit, every failure reaches every rank, the group stays in
    step (a missing or extra SYNC row would break it), and the SYNC rows are posted exactly where a
    worker posted a row ahead."""
    from torchxfer import packing, sender
    from torchxfer.packing import TensorSpec, plan_slots

    model = simple(6, n=18)
    kw: dict[str, Any] = dict(packed=True, packed_buffer_size_bytes=256)
    size: int | None = 256
    if mode == "unpacked":
        monkeypatch.setattr(packing, "UNPACKED_GROUP_TENSORS", 2)
        kw, size = dict(packed=False), None
    elif mode != "packed":
        kw.update(checksum=True, packed_num_buffers=3)
    starts: dict[int, int] = {}
    for slot in plan_slots([TensorSpec.of(n, t) for n, t in model], size):
        starts.setdefault(slot.bucket, slot.index)
    n = len(starts)
    assert n == (9 if mode == "unpacked" else 10)

    def leave(b: int) -> list | Callable[[], Any]:
        at = starts[b]
        if how == "renamed":
            return model[:at] + [("other", model[at][1])] + model[at + 1 :]
        if how == "ends":
            return model[:at]

        def failing() -> Iterator[tuple[str, torch.Tensor]]:
            yield from model[:at]
            raise RuntimeError(f"the source stopped in bucket {b}")

        return failing

    buckets = range(1, n)
    steps: list[tuple[str, Any]] = [("a", model), ("a", model)]
    for b in buckets:
        steps += [(f"leave at {b}", leave(b)), ("a", model), ("a", model)]
    fillers: list[str] = []
    after_row = sender.Sender.after_row
    now = [""]

    def recording(self: Any, plain: bool, bucket: int) -> Any:
        filler = after_row(self, plain, bucket)
        if filler is not None:
            fillers.append(now[0])
        return filler

    monkeypatch.setattr(sender.Sender, "after_row", recording)

    def source(pairs: Any) -> Callable[[], Any]:
        return pairs if callable(pairs) else lambda: iter(pairs)

    values = updates_that_may_fail([(source(pairs), kw) for _, pairs in steps],
                                   before=lambda k: now.__setitem__(0, steps[k][0]))  # fmt: skip
    failed = {k for k, (what, pairs) in enumerate(steps) if callable(pairs)}
    assert values[0] == [f"the source stopped in bucket {steps[k][0].split()[-1]}" if k in failed else None
                         for k in range(len(steps))]  # fmt: skip
    for rank in (1, 2):
        for k, ((what, pairs), got) in enumerate(zip(steps, values[rank])):
            if k in failed:
                assert isinstance(got, str) and f"the source stopped in bucket {what.split()[-1]}" in got, got
            else:
                assert_same(got, pairs, f"rank {rank}: {what}")
    # Rows were posted two ahead after every bucket b with b + 2 < n: leaving at bucket b >= 1
    # owes a SYNC row when b + 1 < n. The update after a renamed layout leaves that layout at the
    # same bucket, so it owes one too; after a layout that ended early, it goes on past its end.
    owed = [f"leave at {b}" for b in buckets if b + 1 < n]
    if how == "renamed":
        owed = [w for b in buckets if b + 1 < n for w in (f"leave at {b}", "a")]
    assert fillers == owed, fillers


@pytest.mark.parametrize("after_last", ["nothing", "new storage", "another size", "cast"])
def test_a_bulk_buckets_tensors_sent_alone_are_viewed_as_their_group_is_posted(monkeypatch, after_last):
    """In the steady state a bucket of the very same parameters is taken in bulk, and its tensors
    that travel alone are sent from their own memory, their bytes viewed only as their group is
    posted. What arrives is bit for bit what the source yielded at each update, after writes in
    place and after a parameter's storage is replaced (``param.data = ...``) between updates.
    The last bucket of the layout is posted only after the source is pulled once more, which
    runs the caller's code (here the rest of a generator that, after its last pair, replaces a
    parameter's storage, resizes it, or casts the model): that bucket is packed and viewed
    before, so what was yielded goes out, not what the code left."""
    from torchxfer import sender

    gen = torch.Generator().manual_seed(11)
    params = [(f"p{i}", torch.nn.Parameter(torch.randn(n, generator=gen), requires_grad=False))
              for i, n in enumerate([300_000, 7, 400_000, 5, 280_000, 9])]  # fmt: skip
    lazy: list[tuple[int, int]] = []
    post_runs = sender.Sender.post_runs

    def recording(self: Any, plan: Any, unpacked: Any = None) -> Any:
        lazy.append((plan.index, len(self.lazy)))
        return post_runs(self, plan, unpacked)

    monkeypatch.setattr(sender.Sender, "post_runs", recording)
    sent: list[list[tuple[str, torch.Tensor]]] = []

    def source(step: int) -> Any:
        with torch.no_grad():
            if step >= 3:
                for _, p in params:
                    p.mul_(-1.5).add_(step)
            if step == 5:
                params[2][1].data = torch.arange(400_000.0)
        sent.append([(n, p.detach().clone()) for n, p in params])

        def pairs() -> Iterator[tuple[str, torch.Tensor]]:
            yield from params
            if step == 6 and after_last != "nothing":  # runs when the last bucket's row is decided
                last, small = params[4][1], params[5][1]
                if after_last == "new storage":
                    last.data, small.data = torch.zeros_like(last), torch.zeros_like(small)
                elif after_last == "another size":
                    last.data = torch.zeros(1000)
                else:
                    last.data, small.data = last.half(), small.half()

        return pairs()

    updates = 7
    values = updates_over_three_ranks(updates, source, packed=True, packed_buffer_size_bytes=2 << 20)
    assert [stats.num_tensors for stats in values[0]] == [len(params)] * updates
    for rank in (1, 2):
        for step in range(updates):
            assert_same(values[rank][step], sent[step], f"rank {rank} update {step}")
    final = max(index for index, _ in lazy)
    assert final >= 1 and any(n for index, n in lazy if index < final), lazy  # viewed as posted
    assert not any(n for index, n in lazy if index == final), lazy  # the last bucket: bound before the pull


@pytest.mark.parametrize("num_buffers", [2, 3])
def test_tensors_sent_alone_are_let_go_num_buffers_buckets_later(monkeypatch, num_buffers):
    """A payload work holds its tensor until it is waited. The trainer waits (orders, on CUDA) the
    sends of tensors sent alone once they are ``num_buffers`` buckets old, so an unpacked update of
    fresh tensors (each privately copied) never holds more than ``num_buffers`` buckets of copies,
    in its first update and in later ones. Values arrive bit for bit."""
    from torchxfer import packing, sender

    monkeypatch.setattr(packing, "UNPACKED_GROUP_TENSORS", 2)
    held: list[int] = []
    kept: list[int] = []
    post = sender.Sender.post

    def counting(self, srcs, bucket, from_buffer):
        post(self, srcs, bucket, from_buffer)
        held.append(len(self.sent_alone))
        kept.append(len(self.works))  # the works the update would drain (each holds its tensor)

    monkeypatch.setattr(sender.Sender, "post", counting)
    model = simple(11, n=14)  # 7 buckets of 2
    kw = dict(packed=False, packed_num_buffers=num_buffers)
    values = updates_that_may_fail([(lambda: generate(model), kw)] * 3)
    assert values[0] == [None] * 3
    assert held and max(held) == 2 * num_buffers, held
    assert max(kept) <= 2 * num_buffers + 1, kept
    for rank in (1, 2):
        for got in values[rank]:
            assert_same(got, model, f"rank {rank}")


def steady_then_failing(model: list, failing: list, kw: dict, steady: int, arm: Callable[[], None],
                        timeout: float = 2.0, world: int = 3) -> list[Any]:  # fmt: skip
    """``steady`` updates of ``model`` bit-exact on every rank, then ``arm()`` and one update of
    ``failing`` that must raise TransferError everywhere. Rank 0 gives (broken, message, seconds);
    each worker (broken, names handed to load_weights in that update, seconds)."""

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world, timeout=timeout)
            try:
                for _ in range(steady):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(model), group, **kw)
                arm()
                start = time.monotonic()
                with pytest.raises(TransferError) as info:
                    NCCLWeightTransferEngine.trainer_send_weights(iter(failing), group, **kw)
                return info.value.broken, str(info.value), time.monotonic() - start
            finally:
                destroy_side_group(group)
        engine = worker(rank, port, world, timeout=timeout)
        try:
            for _ in range(steady):
                got, load = collector()
                engine.receive_weights(None, load)
                assert_same(got, model)
            got, load = collector()
            start = time.monotonic()
            with pytest.raises(TransferError) as info:
                engine.receive_weights(None, load)
            return info.value.broken, [name for name, _ in got], time.monotonic() - start
        finally:
            engine.shutdown()

    return run_world(body, world)


@pytest.mark.parametrize("where", ["bucket 0 posted ahead", "a middle bucket", "the last bucket", "a new layout's bucket"])
def test_a_trainer_failing_while_posting_a_bucket_breaks_the_group_on_every_rank_within_the_timeout(monkeypatch, where):
    """Once a bucket is announced (or, bucket 0 of a confirmed layout, posted ahead by every
    worker), its payload must follow in full: a failure part way breaks the group. The trainer
    raises at once, every worker within its timeout, all with TransferError(broken=True) naming
    the cause on the trainer, and no worker loads a tensor of that update."""
    from torchxfer import sender
    from torchxfer.packing import TensorSpec, plan_slots

    model = simple(9, n=16)
    buckets = 1 + max(s.bucket for s in plan_slots([TensorSpec.of(n, t) for n, t in model], 256))
    assert buckets >= 4
    target = {"bucket 0 posted ahead": 0, "a middle bucket": 2, "the last bucket": buckets - 1,
              "a new layout's bucket": 1}[where]  # fmt: skip
    armed = [False]
    post_runs = sender.Sender.post_runs

    def failing(self, plan, *args):
        if armed[0] and plan.index == target:
            raise RuntimeError("the device went away")
        return post_runs(self, plan, *args)

    monkeypatch.setattr(sender.Sender, "post_runs", failing)
    kw = dict(packed=True, packed_buffer_size_bytes=256)
    steady = 0 if where == "a new layout's bucket" else 2  # updates before the failing one
    timeout = 2.0
    values = steady_then_failing(model, model, kw, steady, lambda: armed.__setitem__(0, True), timeout)
    broken, message, seconds = values[0]
    assert broken and f"posting bucket {target}" in message and "the device went away" in message, message
    assert seconds < timeout, seconds
    for rank in (1, 2):
        broken, loaded, seconds = values[rank]
        assert broken, values[rank]
        # Nothing of the failed bucket or after it was handed to load_weights.
        starts = {s.index: s.bucket for s in plan_slots([TensorSpec.of(n, t) for n, t in model], 256)}
        assert all(starts[int(name[1:])] < target for name in loaded), (rank, loaded)
        assert seconds < 3 * timeout + 2, (rank, seconds)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_a_trainer_failing_to_send_void_broadcasts_breaks_the_group_at_once_naming_the_cause(monkeypatch, packed):
    """Workers posted the layout's next bucket ahead; the update departs from the layout there, so
    the trainer owes them void broadcasts. If it cannot send them (no memory for the scratch, say),
    the ranks' collective sequences are apart: the trainer breaks the group at once, with its own
    error in the message, and the workers raise TransferError(broken) within their timeout, having
    loaded nothing of that bucket or after it."""
    from torchxfer import packing, sender
    from torchxfer.packing import TensorSpec, plan_slots

    monkeypatch.setattr(packing, "UNPACKED_GROUP_TENSORS", 3)
    model = simple(12, n=12)
    kw: dict[str, Any] = dict(packed=True, packed_buffer_size_bytes=256) if packed else dict(packed=False)
    size = 256 if packed else None
    starts: dict[int, int] = {}
    for slot in plan_slots([TensorSpec.of(n, t) for n, t in model], size):
        starts.setdefault(slot.bucket, slot.index)
    assert len(starts) >= 4
    at = starts[2]
    renamed = model[:at] + [("other", model[at][1])] + model[at + 1 :]
    armed = [False]
    void_scratch = sender.Sender.void_scratch

    def failing(self, plan):
        if armed[0]:
            raise RuntimeError("out of memory for the void scratch")
        return void_scratch(self, plan)

    monkeypatch.setattr(sender.Sender, "void_scratch", failing)
    timeout = 2.0
    values = steady_then_failing(model, renamed, kw, 2, lambda: armed.__setitem__(0, True), timeout)
    broken, message, seconds = values[0]
    assert broken and "posting bucket 2" in message and "out of memory for the void scratch" in message, message
    assert seconds < timeout, seconds
    for rank in (1, 2):
        broken, loaded, seconds = values[rank]
        assert broken, values[rank]
        assert len(loaded) <= at and loaded == [n for n, _ in model[: len(loaded)]], (rank, loaded)
        assert seconds < 3 * timeout + 2, (rank, seconds)


class _WritesBack:
    """A root's broadcast as Gloo runs it on CUDA tensors: once the collective is done, what it
    carried is copied back into the root's own tensor, on Gloo's stream, at a time of Gloo's
    choosing; waiting for the work orders that copy. Emulated at the latest moment allowed:
    just before the root's next broadcast, unless the work was waited for first."""

    pending: list[_WritesBack] = []

    def __init__(self, work: Any, tensor: torch.Tensor) -> None:
        self.work, self.tensor, self.sent = work, tensor, tensor.clone()
        _WritesBack.pending.append(self)

    def land(self) -> None:
        if self in _WritesBack.pending:
            _WritesBack.pending.remove(self)
            self.work.wait()
            self.tensor.copy_(self.sent)

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self, timeout: Any = None) -> bool:
        done = self.work.wait(timeout) if timeout is not None else self.work.wait()
        self.land()
        return done


@pytest.mark.parametrize("checksum", [False, True])
def test_void_broadcasts_from_a_send_buffer_are_done_before_it_is_packed_again(monkeypatch, checksum):
    """Void broadcasts (a bucket every worker posted ahead that the update does not send) go out
    from a send buffer when one is large enough. Gloo writes a CUDA broadcast's bytes back into
    the root's tensor too, later, on its own stream, so that buffer must not be packed again
    before they complete: else the stale bytes land over the new bucket, which then travels
    wrong (checked, a checksum mismatch; unchecked, wrong weights loaded silently). Seen on an
    H200 in 2 of 5 runs of tests/test_cuda.py; emulated here on the CPU at the latest moment
    Gloo may write back. A change of buffer count voids bucket 0 of the confirmed layout, and
    every update still arrives bit for bit."""
    from torchxfer import group as group_module

    real = group_module._broadcast
    _WritesBack.pending.clear()

    def writing_back(pg: Any, tensor: torch.Tensor, opts: Any) -> Any:
        if pg.rank() != 0:
            return real(pg, tensor, opts)
        for earlier in list(_WritesBack.pending):
            earlier.land()
        return _WritesBack(real(pg, tensor, opts), tensor)

    monkeypatch.setattr(group_module, "_broadcast", writing_back)
    models = [simple(30 + u, n=12) for u in range(5)]
    kws = [dict(packed=True, packed_buffer_size_bytes=256, packed_num_buffers=n, checksum=checksum)
           for n in (2, 2, 3, 3, 2)]  # fmt: skip
    values = updates_that_may_fail([(lambda m=m: iter(m), kw) for m, kw in zip(models, kws)])
    assert values[0] == [None] * 5, values[0]
    for rank in (1, 2):
        for u, got in enumerate(values[rank]):
            assert_same(got, models[u], f"rank {rank} update {u}")


def _count_bulk_pulls(monkeypatch: Any, name: str) -> list[bool]:
    """Wrap the sender's ``name`` (``pull_bucket`` or ``pull_same``): the list it returns gets, per
    call, whether the bucket was taken whole."""
    import torchxfer.sender

    taken: list[bool] = []
    pull = getattr(torchxfer.sender, name)

    def counting(*args: Any) -> Any:
        out = pull(*args)
        taken.append(out[1] is not None)
        return out

    monkeypatch.setattr(torchxfer.sender, name, counting)
    return taken


def test_a_cached_bucket_pulled_straight_from_the_callers_iterator_keeps_every_check(monkeypatch):
    """From the second update of a layout on, a bucket of the very objects sent there last time is
    pulled straight from the caller's iterator, its tensors checked by one C++ call where torch
    allows (``sender.pull_bucket``): a tensor given new metadata, a new object, a malformed pair
    and an iterator that raises part way through a bucket are each seen as they were before,
    every rank hears of a failure, and every value arrives bit-exact."""
    world = 2
    # Parameters: a generator's tensors count as last update's (raising, malformed) only then.
    model = [(f"w{i}", torch.nn.Parameter(torch.randn(50 + i), requires_grad=False)) for i in range(40)]
    objects = [t for _, t in model]

    def fresh(u: int) -> Iterator:
        for _, t in model:
            t.add_(1)
        return iter(model)

    def changed_shape(u: int) -> Iterator:  # the same object, new metadata
        with torch.no_grad():
            objects[7].data = torch.randn(3, 11)
        return iter(model)

    def new_object(u: int) -> Iterator:  # a staging tensor refilled: a new object
        model[20] = ("w20", torch.nn.Parameter(torch.randn(70), requires_grad=False))
        return iter(model)

    def raising(u: int) -> Iterator:
        yield from model[:25]
        raise RuntimeError("source broke")

    def malformed(u: int) -> Iterator:
        yield from model[:25]
        yield list(model[25])

    plan = [fresh, fresh, changed_shape, fresh, new_object, fresh, raising, fresh, malformed, fresh, fresh]
    sent: list = []
    taken = _count_bulk_pulls(monkeypatch, "pull_bucket")

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = trainer(port, world)
            out = []
            try:
                for u, source in enumerate(plan):
                    items = source(u)
                    fails = source in (raising, malformed)
                    sent.append(None if fails else [(n, t.clone()) for n, t in model])
                    try:
                        NCCLWeightTransferEngine.trainer_send_weights(items, group, packed=True,
                                                                      packed_buffer_size_bytes=4096,
                                                                      packed_num_buffers=2)  # fmt: skip
                        out.append(None)
                    except Exception as e:  # noqa: BLE001
                        out.append(f"{type(e).__name__}: {e}")
            finally:
                destroy_side_group(group)
            return out
        engine = worker(rank, port, world)
        got = []
        try:
            for _ in plan:
                pairs, load = collector()
                try:
                    engine.receive_weights(None, load)
                    got.append(pairs)
                except TransferError as e:
                    got.append(str(e))
        finally:
            engine.shutdown()
        return got

    trainer_out, worker_out = run_world(body, world, deadline_s=90)
    assert trainer_out[6] == "RuntimeError: source broke" and "source broke" in worker_out[6], worker_out[6]
    assert trainer_out[8].startswith("ValueError: expected (name, tensor) pairs, got list"), trainer_out[8]
    assert "expected (name, tensor) pairs" in worker_out[8], worker_out[8]
    for u, want in enumerate(sent):
        if want is not None:
            assert trainer_out[u] is None, (u, trainer_out[u])
            assert_same(worker_out[u], want, f"update {u}")
    assert tuple(worker_out[2][7][1].shape) == (3, 11)
    assert taken.count(True) >= 10 and taken.count(False) >= 3, taken  # both ways taken


def test_the_nccl_runs_cut_bucket_0_in_three_and_large_later_ranges_in_two_bit_exact(monkeypatch):
    """The runs NCCL uses (``packing.payload_runs``: bucket 0's first slot alone and its first
    packed range cut in three, a later bucket's large packed range cut in two), with the sizes
    scaled down and carried over Gloo: both sides cut alike, and every update, new layout and
    cached, arrives bit-exact."""
    import torchxfer.packing
    import torchxfer.plan

    kib = 1 << 10
    monkeypatch.setattr(torchxfer.packing, "DIRECT_MIN_BYTES", 8 * kib)
    monkeypatch.setattr(torchxfer.packing, "FIRST_CUT_MIN_BYTES", 16 * kib)
    monkeypatch.setattr(torchxfer.packing, "HALF_CUT_MIN_BYTES", 24 * kib)
    runs, cuts = torchxfer.packing.payload_runs, []

    def as_on_nccl(slots: Any, buffer_size: Any, backend: str = "nccl") -> Any:
        out = runs(slots, buffer_size, "nccl")
        packed = [r for r in out if r[2] is None]
        cuts.extend((slots[0].bucket, a[1]) for a, b in zip(packed, packed[1:]) if a[1] == b[0])
        return out

    monkeypatch.setattr(torchxfer.plan, "payload_runs", as_on_nccl)
    buf = 64 * kib

    def model(seed: int) -> list[tuple[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        sizes = [9, 3, 5, 2, 6, 4, 3, 7, 2, 5, 4, 6, 3, 2, 5, 4, 3, 6, 2, 4]  # KiB: a few buckets of 64 KiB
        return [(f"t{i}", rand_tensor((n * 256,), torch.float32, gen)) for i, n in enumerate(sizes)]

    kw = dict(packed=True, packed_buffer_size_bytes=buf, packed_num_buffers=2)
    values = updates_that_may_fail([(lambda u=u: model(u), kw) for u in range(3)])
    assert values[0] == [None] * 3, values[0]
    for rank in (1, 2):
        for u in range(3):
            assert_same(values[rank][u], model(u), f"rank {rank} update {u}")
    assert {b for b, _ in cuts} >= {0, 1}, cuts  # bucket 0 cut, and a later bucket cut in two


class _AllOf:
    """What a NCCL group call returns, on Gloo: one work that completes when all of its broadcasts did."""

    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self, timeout: Any = None) -> bool:
        return all((w.wait(timeout) if timeout is not None else w.wait()) for w in self.works)


@pytest.mark.parametrize("packed", [True, False])
def test_payload_groups_as_on_nccl_carried_over_gloo_bit_exact(monkeypatch, packed):
    """On NCCL a bucket's broadcasts go in groups (``packing.payload_groups``), one work per group,
    and every whole tensor from ``NCCL_DIRECT_MIN_BYTES`` travels alone, straight from its memory.
    Scaled down and carried over Gloo with a group call that returns one work for all its
    broadcasts: both sides post the same sizes in the same groups, the sender frees buffers and
    lets go of tensors by the groups' works, and every update arrives bit for bit: a new
    layout, the same tensors again (sent from their own memory), fresh tensors, and a layout
    that departs in its third bucket (voiding what the workers posted ahead)."""
    import torchxfer.group
    import torchxfer.packing
    import torchxfer.plan

    kib = 1 << 10
    monkeypatch.setattr(torchxfer.packing, "NCCL_DIRECT_MIN_BYTES", 4 * kib)
    monkeypatch.setattr(torchxfer.packing, "DIRECT_MIN_BYTES", 4 * kib)
    monkeypatch.setattr(torchxfer.packing, "GROUP_BYTES", 12 * kib)
    monkeypatch.setattr(torchxfer.packing, "GROUP_PACKED_ALONE_BYTES", 3 * kib)
    monkeypatch.setattr(torchxfer.packing, "FIRST_CUT_MIN_BYTES", 1 << 40)
    monkeypatch.setattr(torchxfer.packing, "UNPACKED_GROUP_BYTES", 20 * kib)
    runs, groups = torchxfer.packing.payload_runs, torchxfer.packing.payload_groups
    monkeypatch.setattr(torchxfer.plan, "payload_runs", lambda slots, size, backend="nccl": runs(slots, size, "nccl"))
    monkeypatch.setattr(torchxfer.plan, "payload_groups", lambda r, backend="nccl": groups(r, "nccl"))
    monkeypatch.setattr(torchxfer.group.SideGroup, "coalesces", property(lambda self: True))
    posted: dict[int, list[list[int]]] = {}
    lock = threading.Lock()

    def fake(pg: Any, tensors: Any, opts: Any) -> _AllOf:
        with lock:
            posted.setdefault(pg.rank(), []).append([t.numel() for t in tensors])
        return _AllOf([torch.distributed.broadcast(t, group=pg, group_src=0, async_op=True) for t in tensors])

    monkeypatch.setattr(torchxfer.group, "_coalesced_broadcasts", fake)
    buf = 32 * kib

    def model(seed: int, change: bool = False) -> list[tuple[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        sizes = [5, 1, 2, 6, 1, 4, 3, 1, 8, 2, 1, 5, 1, 1, 7, 2, 4, 1, 3, 6]  # KiB
        if change:
            sizes[9] = 3
        return [(f"t{i}", rand_tensor((n * 256,), torch.float32, gen)) for i, n in enumerate(sizes)]

    same = model(1)
    updates = [model(0), same, same, model(2), model(3, change=True), model(4, change=True)]
    kw = dict(packed=packed, packed_buffer_size_bytes=buf, packed_num_buffers=2)

    values = updates_that_may_fail([(lambda pairs=pairs: iter(pairs), kw) for pairs in updates])
    assert values[0] == [None] * len(updates), values[0]
    for rank in (1, 2):
        for u, want in enumerate(updates):
            assert_same(values[rank][u], want, f"rank {rank} update {u}")
    assert posted[0] == posted[1] == posted[2], "the ranks grouped their broadcasts differently"
    assert any(len(g) > 1 for g in posted[0]), posted[0]


def test_a_list_source_is_pulled_a_bucket_at_a_time_and_a_changed_object_is_still_seen(monkeypatch):
    """The engine peeks at the first pair (to refuse DTensors) and chains it back: a cached bucket
    is then pulled from the caller's own list iterator, a bucket at a time. A tensor replaced in
    the list, or a list cut short, is still seen, and every value arrives bit for bit."""
    from torchxfer import sender

    kinds: list[str] = []
    real = sender.pull_bucket
    monkeypatch.setattr(sender, "pull_bucket", lambda plan, memo, refs, item, raw, device: (
        kinds.append(type(raw).__name__), real(plan, memo, refs, item, raw, device))[1])  # fmt: skip
    model = simple(4, n=40)
    swapped = list(model)
    swapped[17] = (swapped[17][0], swapped[17][1].clone() + 1)
    steps = [model, model, swapped, swapped, model[:25], model]
    kw = dict(packed=True, packed_buffer_size_bytes=256)
    values = updates_that_may_fail([((lambda p=p: iter(p)), kw) for p in steps])
    assert values[0] == [None] * len(steps)
    assert "list_iterator" in kinds and "chain" not in kinds, kinds
    for rank in (1, 2):
        for k, (pairs, got) in enumerate(zip(steps, values[rank])):
            assert_same(got, pairs, f"rank {rank}, update {k}")


def test_transformed_pairs_of_a_cached_layout_keep_every_metadata_check(monkeypatch):
    """With a ``post_iter_func``, a bucket of the very tensors of the last update is pulled at once
    (``pulling.pull_same``) and its metadata checked by the bucket's C++ guard while they pass it:
    a tensor given another shape, other strides (the same shape: the guard refuses, the plain
    comparison accepts) or another dtype is seen each time, and every value arrives bit-exact."""
    import torchxfer.pulling

    gen = torch.Generator().manual_seed(5)
    params = [(f"w{i}", torch.randn(12, 12, generator=gen)) for i in range(30)]
    taken = _count_bulk_pulls(monkeypatch, "pull_same")
    verdicts: list[bool] = []  # every call of a bucket's guard: whether the tensors passed it
    make_guard = torchxfer.pulling.metadata_guard

    def counting_guard(tensors: Any) -> Any:
        guard = make_guard(tensors)
        if guard is None:
            return None

        def counted(*others: Any) -> bool:
            verdicts.append(guard(*others))
            return verdicts[-1]

        return counted

    monkeypatch.setattr(torchxfer.pulling, "metadata_guard", counting_guard)
    sent: list = []

    def source(step: int) -> Any:
        with torch.no_grad():
            for _, t in params:
                t.add_(step)
            if step == 3:  # the same object, another shape
                params[4][1].data = torch.randn(144, generator=gen)
            if step == 5:  # the same shape, other strides
                params[11][1].data = torch.randn(12, 12, generator=gen).t()
            if step == 7:  # another dtype
                params[20][1].data = params[20][1].data.double()
        sent.append([(n, t.clone()) for n, t in params])
        return iter(params)

    updates = 9
    values = updates_over_three_ranks(updates, source, packed=True, packed_buffer_size_bytes=4096,
                                      post_iter_func=lambda item: item[1])  # fmt: skip
    for rank in (1, 2):
        for step in range(updates):
            assert_same(values[rank][step], sent[step], f"rank {rank} update {step}")
    assert taken.count(True) >= 10 and taken.count(False) >= 2, taken  # both ways taken
    if verdicts:  # (None where this torch has no usable guards)
        assert verdicts.count(True) >= 5 and False in verdicts, verdicts  # passed, and refused the changes
