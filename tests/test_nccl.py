"""NCCL across two GPUs: the trainer on cuda:0 (side-group rank 0), one worker on cuda:1.

Real processes (each sets its own CUDA device), ports from ``free_port``,
``timeout_s`` of a few seconds under the harness deadline, every rank's
traceback on failure. Checks:

* many updates bit-exact (mixed dtypes, 0-d, empty and non-contiguous
  sources; packed with a small buffer so tensors split, and unpacked);
* unpacked updates free each bucket's fresh tensors during the update;
* a rejected ``update_info`` fails on both ranks without breaking the group,
  and the next update succeeds;
* the trainer SIGKILLed mid-update: the worker raises within ``timeout_s``,
  stays alive, rejoins a new trainer, and its stderr holds no C++ stack trace
  from torch's NCCL heartbeat monitor or watchdog;
* a worker SIGKILLed mid-update: the trainer raises, and its own default group
  (created before the side group) still all_reduces.

Skipped unless two GPUs and NCCL are present. Every test needs both GPUs, so a
file lock (and an xdist group, for ``--dist loadgroup``) keeps them one at a
time under pytest-xdist. Run with ``pytest -n 0 tests/test_nccl.py``.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import re
import signal
import tempfile
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.harness import ADDR, free_port, run_processes

pytestmark = [
    pytest.mark.process,
    pytest.mark.xdist_group("nccl-2gpu"),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
        reason="needs NCCL and 2 GPUs",
    ),
]

TIMEOUT = float(os.environ.get("TORCHXFER_NCCL_TEST_TIMEOUT", "5"))
"""The library's timeout_s in these tests (raise it if NCCL start-up is slow on a machine)."""
SLACK = 5.0
BARRIER_S = 90.0
"""Children start together (CUDA start-up skews them by seconds)."""
DEADLINE_S = 150.0
BUF = 64 << 10
"""Packed buffer: smaller than the largest tensor, so it is split."""
UPDATES = 20


@pytest.fixture(autouse=True)
def _one_at_a_time() -> Any:
    """Both GPUs per test: serialize against other xdist workers running this module."""
    with open(os.path.join(tempfile.gettempdir(), "torchxfer-test-nccl.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- helpers shared by the children ------------------------------------------------------------


def _zoo(step: int, device: str) -> list[tuple[str, torch.Tensor]]:
    """The same tensors on either side, from the step's seed; never all zeros."""
    gen = torch.Generator().manual_seed(9000 + step)
    base = [
        ("emb", torch.randn(300, 64, generator=gen).bfloat16()),
        ("scalar", torch.randn((), generator=gen)),
        ("empty", torch.randn(0, 7, generator=gen).half()),
        ("big", torch.randn(70_000, generator=gen)),  # 273 KiB > BUF: split across buffers
        ("mask", torch.rand(257, generator=gen) > 0.5),
        ("i8", torch.randint(-128, 128, (1000,), generator=gen, dtype=torch.int8)),
        ("half", torch.randn(99, 3, generator=gen).half()),
        ("bf16", torch.randn(5, 13, generator=gen).bfloat16()),
        ("f32", torch.randn(31, generator=gen)),
        ("ids", torch.randint(-(2**40), 2**40, (129,), generator=gen)),
    ]
    out = [(n, t.to(device)) for n, t in base]
    # Non-contiguous sources, made on the device (a strided copy to the device would be contiguous).
    grid = torch.randn(40, 30, generator=gen).to(device)
    out.append(("strided", grid[::3, 1::2]))
    out.append(("transposed", torch.randn(33, 17, generator=gen).bfloat16().to(device).t()))
    return out


def _model(seed: int, device: str, n: int = 12) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(300 + 17 * i, generator=gen).to(device)) for i in range(n)]


def _mode(step: int) -> dict[str, Any]:
    if step % 3 == 2:
        return dict(packed=False)
    return dict(packed=True, packed_buffer_size_bytes=BUF, packed_num_buffers=2 + step % 3)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class _Receiver:
    """Destinations on the worker's GPU, poisoned before each update; ``load``
    copies each view into them and records any dtype, shape or name surprise."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        self.dest = {n: torch.empty(t.shape, dtype=t.dtype, device=t.device) for n, t in pairs}
        self.problems: list[str] = []
        self.seen: list[str] = []

    def poison(self) -> None:
        for t in self.dest.values():
            _bytes(t).fill_(0xA5)
        self.seen.clear()

    def load(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        for name, view in batch:
            self.seen.append(name)
            d = self.dest.get(name)
            if d is None or d.dtype != view.dtype or d.shape != view.shape or view.device != d.device:
                self.problems.append(f"{name}: got {view.dtype} {tuple(view.shape)} on {view.device}")
                continue
            d.copy_(view)

    def mismatches(self, want: list[tuple[str, torch.Tensor]]) -> list[str]:
        bad = list(self.problems)
        if self.seen != [n for n, _ in want]:
            bad.append(f"loaded {self.seen} != sent {[n for n, _ in want]}")
        for name, t in want:
            if not torch.equal(_bytes(self.dest[name]), _bytes(t)):
                bad.append(f"{name}: bytes differ")
        return bad


def _trainer_group(port: int, timeout: float = TIMEOUT) -> dist.ProcessGroup:
    from torchxfer import NCCLWeightTransferEngine

    return NCCLWeightTransferEngine.trainer_init(
        dict(master_address=ADDR, master_port=port, world_size=2), backend="nccl", timeout_s=timeout
    )


def _worker_engine(port: int) -> Any:
    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig

    engine = NCCLWeightTransferEngine(
        WeightTransferConfig(backend="nccl", timeout_s=TIMEOUT, device="cuda:1"), ParallelConfig()
    )
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))
    return engine


def _info(pairs: list[tuple[str, torch.Tensor]], mode: dict[str, Any]) -> Any:
    from torchxfer import NCCLWeightTransferUpdateInfo

    return NCCLWeightTransferUpdateInfo.from_named_tensors(pairs, **mode)


# -- many updates, bit-exact --------------------------------------------------------------------


def _round_trip(rank: int, port: int, barrier: Any) -> Any:
    from torchxfer import NCCLWeightTransferEngine, destroy_side_group

    torch.cuda.set_device(rank)
    barrier.wait(BARRIER_S)
    if rank == 0:
        group = _trainer_group(port)
        ids = []
        for step in range(UPDATES):
            stats = NCCLWeightTransferEngine.trainer_send_weights(iter(_zoo(step, "cuda:0")), group, **_mode(step))
            ids.append(stats.update_id)
        destroy_side_group(group)
        return ids
    engine = _worker_engine(port)
    receiver = _Receiver(_zoo(0, "cuda:1"))
    out: dict[str, Any] = {"bad": {}, "versions": []}
    for step in range(UPDATES):
        want = _zoo(step, "cuda:1")
        receiver.poison()
        info = _info(want, _mode(step)) if step % 4 == 1 else None  # out of band now and then
        engine.receive_weights(info, receiver.load)
        torch.cuda.synchronize()
        bad = receiver.mismatches(want)
        if bad:
            out["bad"][step] = bad
        out["versions"].append((engine.weights_version, engine.torn))
    engine.shutdown()
    return out


def test_many_updates_bit_exact_across_two_gpus():
    ctx = mp.get_context("spawn")
    outcomes = run_processes(_round_trip, 2, free_port(), ctx.Barrier(2), deadline_s=DEADLINE_S)
    assert outcomes[0].value == list(range(UPDATES))
    worker = outcomes[1].value
    assert worker["bad"] == {}
    assert worker["versions"] == [(step, False) for step in range(UPDATES)]


# -- bucket 0 cut in three (payload_runs) ----------------------------------------------------------


def _large(step: int, device: str) -> list[tuple[str, torch.Tensor]]:
    """Twenty-four 6 MiB tensors, a small one, then eight of 24 MiB: at 256 MiB buffers bucket 0's
    first tensor travels alone, the next ones are one packed range of about 140 MiB that travels in
    three pieces, and the 24 MiB tensors travel straight from their memory, in NCCL groups."""
    gen = torch.Generator().manual_seed(500 + step)
    out = [(f"mid{i}", torch.randn(3 << 19, generator=gen).to(device)) for i in range(24)]  # 6 MiB fp32 each
    out.insert(3, ("norm", torch.randn(4096, generator=gen).bfloat16().to(device)))
    out += [(f"big{i}", torch.randn(6 << 20, generator=gen).to(device)) for i in range(8)]  # 24 MiB fp32 each
    return out


def _large_round_trip(rank: int, port: int, barrier: Any) -> Any:
    from torchxfer import NCCLWeightTransferEngine, destroy_side_group

    torch.cuda.set_device(rank)
    barrier.wait(BARRIER_S)
    mode = dict(packed=True, packed_buffer_size_bytes=256 << 20, packed_num_buffers=2)
    if rank == 0:
        group = _trainer_group(port)
        model = _large(0, "cuda:0")
        for step in range(4):
            if step:  # in place from the second update: the same objects (the bulk, pipelined path)
                for (_, t), (_, new) in zip(model, _large(step, "cuda:0")):
                    t.copy_(new)
            NCCLWeightTransferEngine.trainer_send_weights(iter(model), group, **mode)
        destroy_side_group(group)
        return None
    engine = _worker_engine(port)
    receiver = _Receiver(_large(0, "cuda:1"))
    bad = {}
    for step in range(4):
        want = _large(step, "cuda:1")
        receiver.poison()
        engine.receive_weights(None, receiver.load)
        torch.cuda.synchronize()
        problems = receiver.mismatches(want)
        if problems:
            bad[step] = problems
    engine.shutdown()
    return bad


def test_a_first_bucket_sent_in_three_pieces_and_groups_is_bit_exact():
    from torchxfer.packing import TensorSpec, payload_groups, payload_runs, plan_slots

    specs = [TensorSpec.of(n, t) for n, t in _large(0, "cpu")]
    first = [s for s in plan_slots(specs, 256 << 20) if s.bucket == 0]
    runs = payload_runs(first, 256 << 20)
    assert len([r for r in runs if r[2] is None and r[1] - r[0] > 1 << 20]) == 3  # the cut applies here
    assert any(last - first > 1 for first, last in payload_groups(runs))  # and a NCCL group of several
    ctx = mp.get_context("spawn")
    outcomes = run_processes(_large_round_trip, 2, free_port(), ctx.Barrier(2), deadline_s=DEADLINE_S)
    assert outcomes[1].value == {}


# -- unpacked: fresh tensors do not pile up in an update ------------------------------------------


def _unpacked_memory(rank: int, port: int, barrier: Any) -> Any:
    from torchxfer import NCCLWeightTransferEngine, destroy_side_group

    torch.cuda.set_device(rank)
    barrier.wait(BARRIER_S)
    gen = torch.Generator().manual_seed(77)
    base = [torch.randn(4 << 20, generator=gen).to(f"cuda:{rank}") for _ in range(96)]  # 96 x 16 MiB: 6 buckets
    if rank == 0:
        group = _trainer_group(port)
        sent = [(f"w{i}", torch.empty_like(t)) for i, t in enumerate(base)]
        peaks = []
        for step in range(4):
            for (_, t), b in zip(sent, base):
                torch.add(b, step, out=t)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            # The first update copies each tensor (it must outlive the next pull); later ones send in place.
            NCCLWeightTransferEngine.trainer_send_weights(iter(sent), group, packed=False)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - start)
        destroy_side_group(group)
        return {"peaks": peaks}
    engine = _worker_engine(port)
    peaks, bad = [], []
    for step in range(4):
        want = [b + step for b in base]  # the trainer's very operation, on this GPU: bit-exact
        names: list[str] = []

        def load(batch: list[tuple[str, torch.Tensor]]) -> None:
            for name, t in batch:
                names.append(name)
                if not torch.equal(_bytes(t), _bytes(want[int(name[1:])])):
                    bad.append((step, name))

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        engine.receive_weights(None, load)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
        if names != [f"w{i}" for i in range(96)]:
            bad.append((step, "names"))
        del want
    engine.shutdown()
    return {"peaks": peaks, "bad": bad}


def test_unpacked_updates_free_each_bucket_of_fresh_tensors_during_the_update():
    """Unpacked mode receives into fresh tensors, one NCCL work each. Every work is waited once its
    bucket arrived, so NCCL lets go of its tensor then, not when its watchdog drops the work: a
    1.5 GiB layout of six 256 MiB buckets peaks at about two buckets posted plus one loading, not
    at the whole layout. On the trainer, the first update's private copies go the same way."""
    ctx = mp.get_context("spawn")
    outcomes = run_processes(_unpacked_memory, 2, free_port(), ctx.Barrier(2), deadline_s=DEADLINE_S)
    worker = outcomes[1].value
    assert worker["bad"] == []
    assert max(worker["peaks"][1:]) <= 4 * (256 << 20), worker["peaks"]
    # The trainer's private copies of the first update go as their buckets' sends complete.
    assert max(outcomes[0].value["peaks"]) <= 4 * (256 << 20), outcomes[0].value["peaks"]


# -- a rejected update, then recovery --------------------------------------------------------------


def _mismatch(rank: int, port: int, barrier: Any) -> Any:
    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferUpdateInfo, TransferError, destroy_side_group

    torch.cuda.set_device(rank)
    barrier.wait(BARRIER_S)
    mode = _mode(0)
    if rank == 0:
        group = _trainer_group(port)
        with pytest.raises(TransferError) as err:
            NCCLWeightTransferEngine.trainer_send_weights(iter(_zoo(1, "cuda:0")), group, **mode)
        NCCLWeightTransferEngine.trainer_send_weights(iter(_zoo(2, "cuda:0")), group, **mode)
        destroy_side_group(group)
        return {"error": str(err.value), "broken": err.value.broken}
    engine = _worker_engine(port)
    want = _zoo(1, "cuda:1")
    right = _info(want, mode)
    shapes = [list(s) for s in right.shapes]
    shapes[0] = [301, 64]  # "emb" is 300 x 64
    wrong = NCCLWeightTransferUpdateInfo(right.names, right.dtype_names, shapes, **mode)
    receiver = _Receiver(want)
    receiver.poison()
    with pytest.raises(TransferError) as err:
        engine.receive_weights(wrong, receiver.load)
    rejected = {"error": str(err.value), "broken": err.value.broken, "loaded": list(receiver.seen),
                "version": engine.weights_version, "torn": engine.torn}  # fmt: skip
    want = _zoo(2, "cuda:1")
    receiver.poison()
    engine.receive_weights(_info(want, mode), receiver.load)
    torch.cuda.synchronize()
    bad = receiver.mismatches(want)
    after = (engine.weights_version, engine.torn)
    engine.shutdown()
    return {**rejected, "bad": bad, "after": after}


def test_rejected_update_info_fails_both_ranks_then_next_update_is_bit_exact():
    ctx = mp.get_context("spawn")
    outcomes = run_processes(_mismatch, 2, free_port(), ctx.Barrier(2), deadline_s=DEADLINE_S)
    trainer, worker = outcomes[0].value, outcomes[1].value
    assert trainer["broken"] is False and worker["broken"] is False
    for text in (trainer["error"], worker["error"]):
        assert "'emb'" in text and "301" in text, text
    assert worker["loaded"] == []  # rejected before any payload
    assert worker["version"] is None and worker["torn"] is False
    assert worker["bad"] == []
    assert worker["after"] == (1, False)


# -- the trainer dies mid-update ----------------------------------------------------------------------

# C++ stack traces (heartbeat monitor, watchdog, a failed store poll) look like these.
_TRACE = re.compile(r"Exception raised from|^frame #\d+|terminate called|ProcessGroupNCCL.*(?:heartbeat|watchdog)",
                    re.MULTILINE | re.IGNORECASE)  # fmt: skip


def _stderr_to(path: str) -> None:
    """Send this process's fd 2 (Python and C++ alike) to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def _trainer_dies(rank: int, port: int, port2: int, stderr_path: str, barrier: Any) -> Any:
    # rank 0: trainer A on cuda:0, killed in its second update; rank 1: the worker
    # on cuda:1; rank 2: trainer B on cuda:0, the replacement on a new port.
    from torchxfer import NCCLWeightTransferEngine, TransferError, destroy_side_group

    torch.cuda.set_device(1 if rank == 1 else 0)
    if rank == 1:
        _stderr_to(stderr_path)
    barrier.wait(BARRIER_S)
    mode = dict(packed=True, packed_buffer_size_bytes=4096)
    if rank == 0:
        group = _trainer_group(port)
        NCCLWeightTransferEngine.trainer_send_weights(iter(_model(1, "cuda:0")), group, **mode)

        def dying() -> Any:
            for i, item in enumerate(_model(2, "cuda:0")):
                if i == 6:
                    torch.cuda.synchronize()  # the buckets before are on the wire
                    os.kill(os.getpid(), signal.SIGKILL)
                yield item

        NCCLWeightTransferEngine.trainer_send_weights(dying(), group, **mode)
        return None
    if rank == 2:
        group = _trainer_group(port2, timeout=60)
        NCCLWeightTransferEngine.trainer_send_weights(iter(_model(3, "cuda:0")), group, **mode)
        destroy_side_group(group)
        return None
    engine = _worker_engine(port)
    receiver = _Receiver(_model(1, "cuda:1"))
    receiver.poison()
    engine.receive_weights(None, receiver.load)
    first = receiver.mismatches(_model(1, "cuda:1"))
    version = engine.weights_version
    start = time.monotonic()
    with pytest.raises(TransferError) as err:
        engine.receive_weights(None, lambda batch: None)
    elapsed = time.monotonic() - start
    state = (engine.weights_version == version, engine.torn)
    time.sleep(3.0)  # alive with the dead trainer's group: time for any monitor to print
    engine.shutdown()
    from torchxfer import NCCLWeightTransferInitInfo

    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port2, 1, 2))
    want = _model(3, "cuda:1")
    receiver.poison()
    engine.receive_weights(None, receiver.load)
    torch.cuda.synchronize()
    third = receiver.mismatches(want)
    after = (engine.weights_version, engine.torn)
    engine.shutdown()
    time.sleep(2.0)  # and after shutdown
    return {"first": first, "third": third, "elapsed": elapsed, "error": str(err.value),
            "broken": err.value.broken, "state": state, "after": after}  # fmt: skip


def test_trainer_killed_mid_update_worker_survives_rejoins_and_logs_no_cpp_traces(tmp_path):
    stderr_path = str(tmp_path / "worker.stderr")
    ctx = mp.get_context("spawn")
    outcomes = run_processes(_trainer_dies, 3, free_port(), free_port(), stderr_path, ctx.Barrier(3),
                             deadline_s=DEADLINE_S, expect_ok=False)  # fmt: skip
    with open(stderr_path, errors="replace") as f:
        log = f.read()
    assert outcomes[0].error is not None  # killed: no report
    assert outcomes[2].ok, outcomes[2].tb
    assert outcomes[1].ok, f"{outcomes[1].tb}\n--- worker stderr ---\n{log[-4000:]}"
    v = outcomes[1].value
    assert v["first"] == [] and v["third"] == []
    assert v["elapsed"] < TIMEOUT + SLACK, v
    assert v["broken"] is True, v
    assert v["state"][0] is True  # weights_version unchanged by the dead update
    assert v["after"] == (0, False)  # the new trainer's first update; no longer torn
    traces = [line for line in log.splitlines() if _TRACE.search(line)]
    assert not traces, "worker stderr holds C++ stack traces:\n" + log[-6000:]


# -- a worker dies mid-update --------------------------------------------------------------------------


def _worker_dies(rank: int, port: int, world_port: int, backend: str, barrier: Any, checksum: bool = False) -> Any:
    # ranks 0, 1: the trainer world (its default group; rank 0 also holds the side
    # group) on cuda:0, cuda:1; rank 2: the worker on cuda:1, killed in load_weights.
    from torchxfer import NCCLWeightTransferEngine, TransferError, destroy_side_group

    torch.cuda.set_device(1 if rank == 2 else rank)
    barrier.wait(BARRIER_S)
    mode = dict(packed=True, packed_buffer_size_bytes=4096, checksum=checksum)
    if rank in (0, 1):
        device = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"tcp://{ADDR}:{world_port}", rank=rank, world_size=2,
                                device_id=device if backend == "nccl" else None)  # fmt: skip
        before = torch.tensor([rank + 1.0], device=device if backend == "nccl" else "cpu")
        dist.all_reduce(before)
        result: dict[str, Any] = {"before": before.item()}
        if rank == 0:
            group = _trainer_group(port)
            NCCLWeightTransferEngine.trainer_send_weights(iter(_model(1, "cuda:0")), group, **mode)
            start = time.monotonic()
            with pytest.raises(TransferError) as err:
                NCCLWeightTransferEngine.trainer_send_weights(iter(_model(2, "cuda:0")), group, **mode)
            result.update(elapsed=time.monotonic() - start, error=str(err.value), broken=err.value.broken)
            destroy_side_group(group)
        t = torch.tensor([rank + 1.0], device=device if backend == "nccl" else "cpu")
        dist.all_reduce(t)  # the trainer's own group is unaffected
        result["all_reduce"] = t.item()
        dist.destroy_process_group()
        return result
    engine = _worker_engine(port)
    engine.receive_weights(None, lambda batch: None)
    calls = [0]

    def load(batch: list) -> None:
        calls[0] += 1
        if calls[0] == 2:
            torch.cuda.synchronize()
            os.kill(os.getpid(), signal.SIGKILL)

    engine.receive_weights(None, load)
    return "not killed"


@pytest.mark.parametrize("backend, checksum", [("gloo", False), ("nccl", False), ("gloo", True)])
def test_worker_killed_mid_update_trainer_raises_and_default_group_lives(backend, checksum):
    """``backend`` is the trainer's default group's. With the checksum on, the trainer reads
    each bucket's checksum on the CPU from its current stream, which waits for the buffer's
    earlier broadcasts: those are polled first, so the dead worker is a TransferError within
    the timeout there too, not a synchronization that never returns."""
    ctx = mp.get_context("spawn")
    outcomes = run_processes(_worker_dies, 3, free_port(), free_port(), backend, ctx.Barrier(3), checksum,
                             deadline_s=DEADLINE_S, expect_ok=False)  # fmt: skip
    assert outcomes[2].error is not None, outcomes[2]  # the killed worker
    for out in outcomes[:2]:
        assert out.ok, out.tb
        assert out.value["before"] == 3.0 and out.value["all_reduce"] == 3.0, out.value
    trainer = outcomes[0].value
    assert trainer["elapsed"] < TIMEOUT + SLACK, trainer
    assert trainer["broken"] is True, trainer
