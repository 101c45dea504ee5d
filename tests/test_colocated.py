"""Colocated mode on the CPU: shared-memory buffers, the same guarantees as a broadcast.

Thread tier (ranks as threads of one process, which share a host by
construction) for round trips and agreed failures; process tier (real
processes, "processes" xdist group) for SIGKILL of either side, leftovers in
/dev/shm, and memory over 50 updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
import signal
import sys
import threading
import time
import weakref

import pytest
import torch

import torchxfer
from tests.harness import ADDR, bytes_equal, digest, free_port, run_processes, run_threads, run_world
from torchxfer import (
    IPCWeightTransferEngine,
    IPCWeightTransferInitInfo,
    ModuleLoader,
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
    ParallelConfig,
    TransferError,
    WeightTransferConfig,
    create_engine,
    destroy_side_group,
)
from torchxfer.packing import _DTYPE_BY_NAME

TIMEOUT = 5.0
PROCESS_TIMEOUT = 30.0
"""Process tier: spawned ranks import torch while the machine is busy; a dead peer is seen at once anyway."""
SLACK = 6.0
processes = pytest.mark.xdist_group("processes")


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (every bit pattern, NaNs included: checked as bytes)."""
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _model(seed: int, big: int = 40_000) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = [(f"d.{name}", _random(dtype, (3, 5 + i), gen)) for i, (name, dtype) in enumerate(sorted(_DTYPE_BY_NAME.items()))]
    out.append(("empty", torch.empty(0, 4)))
    out.append(("big", _random(torch.float32, (big,), gen)))  # larger than a buffer: split
    out.append(("noncontig", _random(torch.float64, (8, 6), gen).t()))
    out += [(f"w{i}", _random(torch.bfloat16, (50 + 13 * i,), gen)) for i in range(20)]
    return out


# The shared-memory path unless a test asks for CUDA: the default device is the current GPU
# where there is one, and these tests must run the same path on every machine.
def _trainer(port: int, world: int, timeout: float = TIMEOUT, token: str | None = None, device: str = "cpu"):
    return IPCWeightTransferEngine.trainer_init(
        dict(master_address=ADDR, master_port=port, world_size=world, token=token), timeout_s=timeout, device=device
    )


def _worker(rank: int, port: int, world: int, timeout: float = TIMEOUT, token: str | None = None,
            device: str = "cpu"):  # fmt: skip
    engine = create_engine(WeightTransferConfig(backend="ipc", timeout_s=timeout, device=device),
                           ParallelConfig(data_parallel_rank=rank - 1, data_parallel_size=world - 1))  # fmt: skip
    engine.init_transfer_engine(IPCWeightTransferInitInfo(ADDR, port, 1, world, token=token))
    return engine


def _either_trainer(backend: str, port: int, world: int, timeout: float = TIMEOUT) -> torch.distributed.ProcessGroup:
    """Rank 0 of a colocated ("ipc", CPU) or broadcast ("gloo") side group."""
    info = dict(master_address=ADDR, master_port=port, world_size=world)
    if backend == "ipc":
        return IPCWeightTransferEngine.trainer_init(info, timeout_s=timeout, device="cpu")
    return NCCLWeightTransferEngine.trainer_init(info, timeout_s=timeout, backend="gloo")


def _either_worker(backend: str, rank: int, port: int, world: int, timeout: float = TIMEOUT):
    """A worker engine of :func:`_either_trainer`'s group, at side-group rank ``rank``."""
    if backend == "ipc":
        return _worker(rank, port, world, timeout)
    engine = create_engine(WeightTransferConfig(backend="gloo", timeout_s=timeout),
                           ParallelConfig(data_parallel_rank=rank - 1, data_parallel_size=world - 1))  # fmt: skip
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, world))
    return engine


def _either_send(backend: str, pairs, group, **kw):
    """trainer_send_weights of the group's engine (packed: colocated transfers always are)."""
    if backend == "ipc":
        return IPCWeightTransferEngine.trainer_send_weights(pairs, group, **kw)
    return NCCLWeightTransferEngine.trainer_send_weights(pairs, group, packed=True, **kw)


def _send_each(backend: str, port: int, world: int, sources: list) -> list[str | None]:
    """Rank 0 of a new group sends each source (``BUF``-byte buffers), then leaves the group:
    per update None, or the TransferError's message."""
    group = _either_trainer(backend, port, world)
    errors: list[str | None] = []
    for source in sources:
        try:
            _either_send(backend, source, group, packed_buffer_size_bytes=BUF)
            errors.append(None)
        except TransferError as e:
            errors.append(str(e))
    destroy_side_group(group)
    return errors


def _collect(store: dict):
    def load(batch):
        for name, tensor in batch:
            store[name] = tensor.clone()

    return load


def _same(got: dict, model: list) -> bool:
    return list(got) == [n for n, _ in model] and all(bytes_equal(got[n], t) for n, t in model)


BUF = 64 << 10


def test_round_trips_every_dtype_bit_exact_cached_and_changed_layouts():
    port = free_port()
    models = [_model(1), None, None, _model(2), _model(3, big=10)]  # None: the same tensors again, new values

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 3)
            model = models[0]
            stats = []
            for u, m in enumerate(models):
                if m is None:
                    for _, t in model:  # in place: the very objects of the last update
                        if t.numel() and t.dtype != torch.bool:
                            t.add_(1) if not t.is_contiguous() else t.view(-1).view(torch.uint8)[:1].add_(1)
                else:
                    model = m
                stats.append(IPCWeightTransferEngine.trainer_send_weights(
                    iter(model), group, packed_buffer_size_bytes=BUF, packed_num_buffers=2, version=10 + u))
                sent.append([(n, t.clone()) for n, t in model])
            destroy_side_group(group)
            return [s.num_tensors for s in stats]
        engine = _worker(rank, port, 3)
        results = []
        for u in range(len(models)):
            got: dict = {}
            engine.receive_weights(None, _collect(got), atomic=rank == 2)
            results.append(got)
            assert engine.weights_version == 10 + u and not engine.torn
        engine.shutdown()
        return results

    sent: list = []
    outcomes = run_threads(body, 3, deadline_s=120)
    for rank in (1, 2):
        for u, got in enumerate(outcomes[rank].value):
            assert _same(got, sent[u]), (rank, u)


def test_update_info_mismatch_is_agreed_before_any_wrong_tensor_loads_and_the_group_recovers():
    port = free_port()
    model = _model(4)
    good = NCCLWeightTransferUpdateInfo.from_named_tensors(model, packed=True, packed_buffer_size_bytes=BUF,
                                                          packed_num_buffers=2)  # fmt: skip
    shapes = [list(s) for s in good.shapes]
    shapes[-1] = [shapes[-1][0] + 1]
    bad_shape = NCCLWeightTransferUpdateInfo(good.names, good.dtype_names, shapes, True, BUF, 2)
    bad_size = NCCLWeightTransferUpdateInfo(good.names, good.dtype_names, good.shapes, True, 2 * BUF, 2)
    infos = [bad_shape, bad_size, good]

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 3)
            errors = []
            for _ in infos:
                try:
                    IPCWeightTransferEngine.trainer_send_weights(model, group, packed_buffer_size_bytes=BUF,
                                                                 packed_num_buffers=2)  # fmt: skip
                    errors.append(None)
                except TransferError as e:
                    errors.append(str(e))
            destroy_side_group(group)
            return errors
        engine = _worker(rank, port, 3)
        errors, loaded = [], []
        for info in infos:
            got: dict = {}
            try:
                engine.receive_weights(info if rank == 1 else None, _collect(got))
                errors.append(None)
            except TransferError as e:
                assert not e.broken
                errors.append(str(e))
            loaded.append(got)
        engine.shutdown()
        return errors, loaded

    outcomes = run_threads(body, 3, deadline_s=90)
    trainer_errors = outcomes[0].value
    assert "update_info expects" in trainer_errors[0] and "packed_buffer_size_bytes" in trainer_errors[1]
    assert trainer_errors[2] is None
    for rank in (1, 2):
        errors, loaded = outcomes[rank].value
        assert errors[:2] == trainer_errors[:2]
        wrong = model[-1][0]
        assert wrong not in loaded[0] and not loaded[1]  # the shape mismatch stops before its tensor loads
        assert _same(loaded[2], model)


@pytest.mark.parametrize("backend", ["ipc", "gloo"])
def test_a_matching_update_info_passes_every_cached_update_and_a_layout_that_departs(backend):
    """A worker passing a correct update_info (a dict, then the dataclass) succeeds on every update:
    the first (tables), the cached ones (the layout's buckets checked once, then a fingerprint),
    and one whose last tensor changes shape (cached buckets, then tables), with its info changed
    to match. Every tensor arrives bit for bit, the version moves, nothing is torn."""
    port = free_port()
    base = _model(5)
    grown = base[:-1] + [(base[-1][0], _random(torch.bfloat16, (base[-1][1].numel() + 3,), torch.Generator()))]
    steps = [base, base, base, grown, grown]
    kw = dict(packed_buffer_size_bytes=BUF, packed_num_buffers=2)
    info_of = {id(m): NCCLWeightTransferUpdateInfo.from_named_tensors(m, packed=True, **kw) for m in (base, grown)}

    def body(rank: int):
        if rank == 0:
            group = _either_trainer(backend, port, 3)
            for u, m in enumerate(steps):
                _either_send(backend, iter(m), group, version=u, **kw)
            destroy_side_group(group)
            return None
        engine = _either_worker(backend, rank, port, 3)
        results = []
        for u, m in enumerate(steps):
            info = info_of[id(m)]
            got: dict = {}
            engine.receive_weights(dataclasses.asdict(info) if u % 2 == 0 else info, _collect(got),
                                   atomic=rank == 2)  # fmt: skip
            assert engine.weights_version == u and not engine.torn, (rank, u)
            results.append(got)
        engine.shutdown()
        return results

    outcomes = run_threads(body, 3, deadline_s=90)
    for rank in (1, 2):
        for u, got in enumerate(outcomes[rank].value):
            assert _same(got, steps[u]), (rank, u)


def test_failures_agreed_atomic_never_torn_source_error_reaches_workers():
    port = free_port()
    model = _model(5)

    def failing():
        yield from model[:-3]
        raise RuntimeError("source broke")

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 3)
            out = []
            for source in (failing(), model, model, [], model):
                try:
                    IPCWeightTransferEngine.trainer_send_weights(source, group, packed_buffer_size_bytes=BUF,
                                                                 packed_num_buffers=1)  # fmt: skip
                    out.append(None)
                except Exception as e:  # noqa: BLE001
                    out.append(f"{type(e).__name__}: {e}")
            destroy_side_group(group)
            return out
        engine = _worker(rank, port, 3)
        out = []
        calls = [0]

        def load(batch):
            calls[0] += 1
            if rank == 1 and len(out) == 1 and calls[0] == 2:
                raise KeyError("no such parameter")

        for _ in range(5):
            try:
                engine.receive_weights(None, load, atomic=rank == 2)
                out.append((None, engine.torn, engine.weights_version))
            except TransferError as e:
                out.append((str(e), engine.torn, engine.weights_version))
        engine.shutdown()
        return out

    outcomes = run_threads(body, 3, deadline_s=90)
    trainer = outcomes[0].value
    assert trainer[0] == "RuntimeError: source broke"
    assert "load_weights raised on rank 1" in trainer[1] and "KeyError" in trainer[1]
    assert trainer[2:] == [None, None, None]
    for rank in (1, 2):
        res = outcomes[rank].value
        assert "source broke" in res[0][0] and "load_weights raised on rank 1" in res[1][0]
        assert res[0][1] is (rank == 1)  # streaming workers are torn, atomic ones never
        assert res[2] == (None, False, 2) and res[3] == (None, False, 3) and res[4] == (None, False, 4)


def test_token_and_host_checks_fail_at_init_on_every_rank(monkeypatch):
    port = free_port()

    def body(rank: int, tokens: tuple):
        try:
            if rank == 0:
                destroy_side_group(_trainer(port, 3, token=tokens[0]))
            else:
                _worker(rank, port, 3, token=tokens[rank]).shutdown()
        except TransferError as e:
            return str(e)
        return None

    outcomes = run_threads(body, 3, ("secret", "secret", "wrong"), deadline_s=60)
    assert all(o.value and "authentication failed" in o.value for o in outcomes)

    # A trainer in another PID namespace or on another host: its /proc/<pid>/fd/<fd> is not its probe here.
    from torchxfer import ipc_transport

    real = ipc_transport.HostProbe.describe
    monkeypatch.setattr(ipc_transport.HostProbe, "describe", lambda self: {**real(self), "pid": os.getppid()})
    port = free_port()
    errors = [o.value for o in run_threads(body, 3, ("s", "s", "s"), deadline_s=60)]
    assert all(e and "colocated handshake failed" in e for e in errors), errors
    # Which of the checks catches it depends on what /proc/<that pid>/fd holds on this machine.
    assert any(text in errors[0] for text in ("not on this host", "cannot open the trainer's shared memory",
                                              "is not the trainer's buffer", "not sealed")), errors[0]  # fmt: skip


def test_config_and_create_engine():
    pc = ParallelConfig()
    assert isinstance(create_engine(WeightTransferConfig(backend="ipc"), pc), IPCWeightTransferEngine)
    assert isinstance(create_engine(WeightTransferConfig(backend="gloo"), pc), NCCLWeightTransferEngine)
    with pytest.raises(ValueError, match="'shm'"):
        WeightTransferConfig(backend="shm")
    with pytest.raises(ValueError, match="backend 'nccl' or 'gloo'"):
        NCCLWeightTransferEngine(WeightTransferConfig(backend="ipc"), pc)
    with pytest.raises(ValueError, match="backend='ipc'"):
        IPCWeightTransferEngine(WeightTransferConfig(backend="gloo"), pc)
    with pytest.raises(ValueError, match="master_port"):
        IPCWeightTransferInitInfo("127.0.0.1", 0, 1, 2)
    assert "***" in repr(IPCWeightTransferInitInfo("127.0.0.1", 1, 1, 2, token="s"))
    assert torchxfer.IPCWeightTransferEngine is IPCWeightTransferEngine
    with pytest.raises(RuntimeError, match="init_transfer_engine"):
        IPCWeightTransferEngine(WeightTransferConfig(backend="ipc"), pc).receive_weights(None, print)


@pytest.mark.parametrize("device", ["meta", "cuda:63"])
def test_trainer_init_refuses_a_device_it_cannot_serve_before_any_socket(device):
    """A device that is not the CPU or a CUDA device this process sees is a ValueError naming
    it, raised before the store is started (no port is bound, so the same port works next)."""
    info = dict(master_address="127.0.0.1", master_port=free_port(), world_size=2)
    with pytest.raises(ValueError, match=re.escape(device)):
        IPCWeightTransferEngine.trainer_init(info, device=device, timeout_s=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"'cuda' is not a CUDA device this process sees \(0 visible\)"):
            IPCWeightTransferEngine.trainer_init(info, device="cuda", timeout_s=2)


@pytest.mark.parametrize("backend", ["gloo", "nccl", "ipc"])
def test_a_worker_on_a_cuda_device_it_does_not_see_is_a_value_error_before_any_socket(backend):
    """A worker engine whose config names a CUDA device this process does not see raises a
    ValueError naming it from init_transfer_engine, before it connects to anything (no trainer
    listens here: a connection attempt would end in a TransferError after the timeout)."""
    device = f"cuda:{torch.cuda.device_count() + 7}"
    engine = create_engine(WeightTransferConfig(backend=backend, device=device, timeout_s=2), ParallelConfig())
    init = IPCWeightTransferInitInfo if backend == "ipc" else NCCLWeightTransferInitInfo
    with pytest.raises(ValueError, match=re.escape(repr(device))):
        engine.init_transfer_engine(init("127.0.0.1", free_port(), 1, 2))
    assert engine.model_update_group is None


def test_module_loader_round_trip_many_buckets_one_buffer():
    port = free_port()
    torch.manual_seed(0)
    src = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])
    dst = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 2)
            for _ in range(3):
                with torch.no_grad():
                    for p in src.parameters():
                        p.add_(torch.randn_like(p))
                IPCWeightTransferEngine.trainer_send_weights(src.named_parameters(), group,
                                                             packed_buffer_size_bytes=20_000, packed_num_buffers=1)
                expect.append({n: p.detach().clone() for n, p in src.named_parameters()})
            destroy_side_group(group)
            return None
        engine = _worker(rank, port, 2)
        loader = ModuleLoader(dst)
        for _ in range(3):
            with loader.update():
                engine.receive_weights(None, loader)
            got.append({n: p.detach().clone() for n, p in dst.named_parameters()})
        engine.shutdown()

    expect: list = []
    got: list = []
    run_threads(body, 2, deadline_s=90)
    assert len(got) == 3 and all(all(bytes_equal(g[n], e[n]) for n in e) for g, e in zip(got, expect))


# -- process tier -----------------------------------------------------------------------------


def _shm() -> set[str]:
    """Names in /dev/shm, less Python multiprocessing's semaphores (``sem.mp-*``): torchxfer never
    makes those, and other test runs on a shared machine do."""
    names = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    return {n for n in names if not n.startswith("sem.mp-")}


def _shm_mappings() -> int:
    """How many of this process's mappings are files in /dev/shm (colocated buffers are memfds: none)."""
    with open("/proc/self/maps") as f:
        return sum("/dev/shm/" in line for line in f)


def _kill_body(rank: int, port: int, victim: int):
    """Update 0 succeeds; in update 1 the victim SIGKILLs itself after the first bucket."""
    model = _model(6)
    if rank == 0:
        group = _trainer(port, 3, PROCESS_TIMEOUT)
        IPCWeightTransferEngine.trainer_send_weights(model, group, packed_buffer_size_bytes=BUF, packed_num_buffers=2)
        assert _shm_mappings() == 0

        def dying():
            for i, item in enumerate(model):
                if victim == 0 and i == len(model) - 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield item

        start = time.monotonic()
        try:
            IPCWeightTransferEngine.trainer_send_weights(dying(), group, packed_buffer_size_bytes=BUF,
                                                         packed_num_buffers=2)  # fmt: skip
        except TransferError as e:
            return ("error", e.broken, time.monotonic() - start)
        return ("ok",)
    engine = _worker(rank, port, 3, PROCESS_TIMEOUT)
    engine.receive_weights(None, lambda batch: None)
    assert _shm_mappings() == 0
    calls = [0]

    def load(batch):
        calls[0] += 1
        if rank == victim and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    start = time.monotonic()
    try:
        engine.receive_weights(None, load)
    except TransferError as e:
        result = ("error", e.broken, time.monotonic() - start, engine.torn, engine.weights_version)
    else:
        result = ("ok",)
    engine.shutdown()
    return result


@processes
@pytest.mark.parametrize("victim", [0, 1], ids=["trainer", "worker"])
def test_sigkill_of_either_side_raises_on_the_others_and_leaves_nothing_in_dev_shm(victim):
    before = _shm()
    outcomes = run_processes(_kill_body, 3, free_port(), victim, deadline_s=120, expect_ok=False)
    assert not outcomes[victim].ok and "exited with code" in str(outcomes[victim].error)
    for rank in range(3):
        if rank == victim:
            continue
        assert outcomes[rank].ok, outcomes[rank].tb
        value = outcomes[rank].value
        assert value[0] == "error" and value[1] is True and value[2] < SLACK, value  # not a timeout: at once
        if rank:  # a worker survives, knows its weights are torn, keeps its version
            assert value[3] is True and value[4] == 0, value
    assert _shm() - before == set()


def _memory_body(rank: int, port: int):
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum("torchxfer" in line or "/dev/shm/" in line for line in f)

    gen = torch.Generator().manual_seed(7)
    model = [(f"w{i}", torch.randn(40_000 + i, generator=gen)) for i in range(40)]  # ~6 MiB
    samples = []
    if rank == 0:
        group = _trainer(port, 2, PROCESS_TIMEOUT)
        for u in range(50):
            IPCWeightTransferEngine.trainer_send_weights(model, group, packed_buffer_size_bytes=1 << 20,
                                                         packed_num_buffers=2)  # fmt: skip
            if u in (4, 49):
                samples.append((rss(), maps(), len(os.listdir("/proc/self/fd"))))
        destroy_side_group(group)
        return samples
    engine = _worker(rank, port, 2, PROCESS_TIMEOUT)
    params = {n: torch.empty_like(t) for n, t in model}

    def load(batch):
        for n, t in batch:
            params[n].copy_(t)

    for u in range(50):
        engine.receive_weights(None, load, atomic=u % 2 == 1)
        if u in (4, 49):
            samples.append((rss(), maps(), len(os.listdir("/proc/self/fd"))))
    assert all(bytes_equal(params[n], t) for n, t in model)
    engine.shutdown()
    return samples


@processes
def test_memory_flat_over_50_updates_on_both_sides():
    before = _shm()
    outcomes = run_processes(_memory_body, 2, free_port(), deadline_s=150)
    for out in outcomes:
        (rss5, maps5, fds5), (rss50, maps50, fds50) = out.value
        # A leak of one staged model (6 MiB) per atomic update would add over 100 MiB; malloc's own
        # drift between the two samples has reached 4.8 MiB on this machine.
        assert rss50 - rss5 < 16 << 20, (out.rank, rss5, rss50)
        assert maps50 == maps5 and fds50 == fds5, out.value
    assert _shm() - before == set()


def _sharded_body(rank: int, trainer_port: int, ports: tuple, device_type: str):
    """Ranks 0-1: a 2-rank trainer (DTensor / fully_shard), each serving its own colocated worker
    (ranks 2-3) through send_model with its own group; every rank sends after the same gathers."""
    import datetime

    import torch.distributed as dist

    from torchxfer import send_model

    cuda = device_type == "cuda"
    me = rank % 2
    if cuda:
        torch.cuda.set_device(me)
    if rank >= 2:
        engine = create_engine(WeightTransferConfig(backend="ipc", timeout_s=PROCESS_TIMEOUT,
                                                    device=f"cuda:{me}" if cuda else "cpu"), ParallelConfig())  # fmt: skip
        engine.init_transfer_engine(IPCWeightTransferInitInfo(ADDR, ports[me], 1, 2))
        got = []
        for _ in range(2):
            store: dict = {}
            engine.receive_weights(None, _collect(store))
            got.append({n: digest(t) for n, t in store.items()})
        engine.shutdown()
        return got
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    mesh = init_device_mesh(device_type, (2,))
    group = IPCWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=ports[me], world_size=2),
                                                 timeout_s=PROCESS_TIMEOUT, device=f"cuda:{me}" if cuda else "cpu")  # fmt: skip
    torch.manual_seed(0)
    dev = torch.device(device_type, me) if cuda else torch.device("cpu")
    full = {f"w{i}": torch.randn(64 + 8 * i, 12, device=dev) for i in range(6)}
    sd = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)).to(dev)
    fully_shard(net, mesh=mesh)
    refs, sent = [], []
    for source in (sd, net):
        stats = send_model(source, group, packed_buffer_size_bytes=4096, packed_num_buffers=2,
                           timeout_s=PROCESS_TIMEOUT)  # fmt: skip
        sent.append(stats.num_tensors)
        items = source.items() if isinstance(source, dict) else source.state_dict().items()
        refs.append({n: digest(t.full_tensor() if isinstance(t, DTensor) else t) for n, t in items})
    destroy_side_group(group)
    dist.destroy_process_group()
    return refs, sent


@processes
def test_sharded_trainer_each_rank_serves_its_own_colocated_worker():
    ports = (free_port(), free_port())
    outcomes = run_processes(_sharded_body, 4, free_port(), ports, "cpu", deadline_s=150)
    for trainer in (0, 1):
        refs, sent = outcomes[trainer].value
        assert sent == [len(refs[0]), len(refs[1])]
        assert outcomes[trainer + 2].value == refs


# -- CUDA (nvidia-h200: one GPU; nvidia-h200-x2: two) ----------------------------------------------


def _cuda_body(rank: int, port: int):
    """Trainer and two workers on GPU 0: three updates (in place, then a new layout), bit-exact."""
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(11)
    model = [(n, t.cuda()) for n, t in _model(12, big=3_000_000)]
    if rank == 0:
        group = _trainer(port, 3, PROCESS_TIMEOUT, device="cuda")
        sent = []
        for u in range(3):
            if u == 2:
                model = [(n, t.cuda()) for n, t in _model(13)]
            IPCWeightTransferEngine.trainer_send_weights(model, group, packed_buffer_size_bytes=1 << 22,
                                                         packed_num_buffers=2)  # fmt: skip
            sent.append({n: digest(t) for n, t in model})
            with torch.no_grad():
                for _, t in model:
                    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and t.numel():
                        t.add_(torch.randn(t.shape, generator=gen).to(t.device, t.dtype))
        destroy_side_group(group)
        return sent
    return _cuda_receive(rank, port, 3, 3)


def _cuda_receive(rank: int, port: int, world: int, updates: int) -> list[dict]:
    """A worker on GPU 0: the digests of every tensor of each of ``updates`` updates."""
    engine = _worker(rank, port, world, PROCESS_TIMEOUT, device="cuda:0")
    assert engine.device == torch.device("cuda", 0)
    got = []
    for _ in range(updates):
        store: dict = {}
        engine.receive_weights(None, _collect(store))
        got.append({n: digest(t) for n, t in store.items()})
    engine.shutdown()
    return got


@processes
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trainer_and_workers_on_one_gpu_bit_exact():
    outcomes = run_processes(_cuda_body, 3, free_port(), deadline_s=240)
    assert outcomes[1].value == outcomes[0].value and outcomes[2].value == outcomes[0].value


def test_a_pack_is_replayed_only_for_guarded_tensors_at_the_addresses_it_was_captured_for(monkeypatch):
    """pack_replayed's decisions, without a GPU: the graph is captured the second time a bucket's
    tensors are seen at the same addresses into the same buffer, replayed while that holds, and
    never for tensors that did not pass the guard; a failed capture turns graphs off."""
    from torchxfer import colocated_sender as cs

    calls: list[str] = []

    class Concat:
        def pack(self, tensors):
            calls.append("pack")

    class Graph:
        def replay(self):
            calls.append("replay")

    captured: list = []

    def capture(concat, tensors, device):
        captured.append([t.data_ptr() for t in tensors])
        return Graph()

    monkeypatch.setattr(cs, "_capture_pack", capture)
    cuda = torch.device("cuda", 0)
    tensors = [torch.zeros(2) for _ in range(cs.GRAPH_MIN_TENSORS)]
    memo: dict = {}
    concat = Concat()

    def step(ts=tensors, guarded=True, plan=concat, device=cuda):
        calls.clear()
        cs.pack_replayed(plan, ts, memo, device, guarded)
        return calls[:]

    assert step() == ["pack"]  # first seen at these addresses
    assert step() == ["replay"] and len(captured) == 1  # seen again: captured, then replayed
    assert step() == ["replay"] and len(captured) == 1
    assert step(guarded=False) == ["pack"]  # not known to have the captured strides
    moved = list(tensors)
    moved[3] = torch.zeros(2)
    assert step(moved) == ["pack"] and step(moved) == ["replay"] and len(captured) == 2
    assert step(plan=Concat()) == ["pack"]  # another buffer: another pack plan
    assert step(tensors[:-1]) == ["pack"]  # too few tensors to be worth a graph
    assert step(device=torch.device("cpu")) == ["pack"]
    monkeypatch.setattr(cs, "_capture_pack", lambda *a: None)
    memo.clear()
    assert step() == ["pack"] and step() == ["pack"] and memo.get("graph_off") and step() == ["pack"]


def _cuda_graph_body(rank: int, port: int):
    """Trainer and one worker on GPU 0, 600 small parameters: the cached bucket's pack is captured
    as a CUDA graph and replayed; a parameter whose storage or strides change is packed as usual."""
    from torchxfer import colocated_sender
    from torchxfer.group import side_group

    torch.cuda.set_device(0)
    torch.manual_seed(5)
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(4, 4, device="cuda")) for _ in range(600)])
    if rank == 0:
        group = _trainer(port, 2, PROCESS_TIMEOUT, device="cuda")
        sent, graphs = [], []
        for u in range(7):
            with torch.no_grad():
                for p in params:
                    p.add_(1.0)
                if u == 4:  # new storage behind the same parameter: the graph's addresses are stale
                    params[7].data = torch.randn(4, 4, device="cuda")
                if u == 5:  # same shape and dtype, other strides: the guard says no
                    params[9].data = torch.randn(4, 4, device="cuda").t()
            IPCWeightTransferEngine.trainer_send_weights(params.named_parameters(), group,
                                                         packed_buffer_size_bytes=1 << 20, packed_num_buffers=2)  # fmt: skip
            sent.append({n: digest(t) for n, t in params.named_parameters()})
            memo = colocated_sender._State.of(side_group(group)).layout.buckets[0].cache
            graphs.append(memo.get("graph") is not None)
        destroy_side_group(group)
        return sent, graphs
    return _cuda_receive(rank, port, 2, 7)


@processes
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_a_cached_bucket_of_many_tensors_is_packed_by_a_replayed_graph_bit_exact():
    outcomes = run_processes(_cuda_graph_body, 2, free_port(), deadline_s=240)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    sent, graphs = outcomes[0].value
    assert outcomes[1].value == sent and len(sent) == 7
    # Update 0 sends a new layout (and notes where its tensors lie), 1 makes pull_bucket's guard,
    # finds them there again, and is captured and replayed, as are 2 and 3; 4 moved a tensor (packed
    # as usual), 5 changed strides (the guard is dropped for good, so graphs too).
    assert graphs == [False, True, True, True, False, False, False]


def _direct_body(rank: int, port: int, device: str, consenting: tuple[int, ...] = (1, 2)):
    """Trainer and two workers on GPU 0 (or the CPU, the parameters in shared memory), 8 updates of a
    model whose large tensors (over a lowered DIRECT_BYTES) are read in place by the workers from
    the second update on, when every worker consents (``consenting``: the workers that set the
    switch at init): see the tests."""
    from torchxfer import colocated, colocated_sender
    from torchxfer.colocated import decode_frame, encode_frame
    from torchxfer.control import ControlChannel
    from torchxfer.group import side_group

    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    torch.manual_seed(3)
    if rank != 0:
        if rank in consenting:
            os.environ[colocated.DIRECT_ENV] = "1"
        engine = _worker(rank, port, 3, PROCESS_TIMEOUT, device="cuda:0" if cuda else "cpu")
        got = []
        for u in range(8):
            store: dict = {}

            def load(batch, u=u):
                if u in (1, 2, 5) and cuda:  # a slow load: the trainer's next in-place step must wait for it
                    torch.cuda._sleep(200_000_000)
                if u == 4 and rank == 1:
                    raise ValueError("worker 1 refuses update 4")
                for name, tensor in batch:
                    store[name] = tensor.clone()

            try:
                engine.receive_weights(None, load)
                got.append({n: digest(t) for n, t in store.items()})
            except TransferError:
                got.append(None)
        engine.shutdown()
        return got
    colocated_sender.DIRECT_BYTES = colocated_sender.DIRECT_BYTES_CPU = 64 << 10
    os.environ[colocated_sender.DIRECT_ENV] = "1"  # this spawned trainer keeps its parameters' memory
    params = torch.nn.ParameterDict({
        **{f"big{i}": torch.nn.Parameter(torch.randn(128, 160 + 8 * i, device=device)) for i in range(6)},
        **{f"small{i}": torch.nn.Parameter(torch.randn(7 + i, device=device)) for i in range(9)},
        "big_bf16": torch.nn.Parameter(torch.randn(256, 256, device=device).bfloat16()),
        "big_private": torch.nn.Parameter(torch.randn(128, 200, device=device)),  # CPU: not shared, so packed
    })  # fmt: skip
    if not cuda:
        for name, p in params.items():
            if name != "big_private":
                p.share_memory_()
    frames: list[str] = []
    real_send = ControlChannel.send_frame
    ControlChannel.send_frame = lambda self, frame, what: (frames.append(what), real_send(self, frame, what))[1]
    real_map = colocated_sender.ColocatedSender.direct_map

    def hostile_map(self, plan, picked, ptrs, buf, tensors):
        made = real_map(self, plan, picked, ptrs, buf, tensors)
        body = decode_frame(made["frame"], "test")
        body["slots"][0][2] += 1 << 40  # far past the allocation
        made["frame"] = encode_frame(body)
        return made

    group = _trainer(port, 3, PROCESS_TIMEOUT, device=device)
    state = colocated_sender._State.of(side_group(group))
    sent, direct_frames, errors = [], [], []
    for u in range(8):
        with torch.no_grad():
            for p in params.values():
                p.mul_(1.5).add_(1.0)  # right after the last send, on the current stream
            if u == 3:  # new storage behind one parameter: its bucket's map is made again
                params["big2"].data = torch.randn(128, 176, device=device)
                if not cuda:
                    params["big2"].share_memory_()
        if u == 6 and len(consenting) == 2:
            colocated_sender.ColocatedSender.direct_map = hostile_map
            for plan in state.layout.buckets:
                plan.cache.pop("direct", None)
        elif u == 6:  # a trainer that sends maps all the same, to a worker that did not consent
            side_group(group).cache[colocated.DIRECT_OK_KEY] = True
            state.direct_off = None
        frames.clear()
        try:
            IPCWeightTransferEngine.trainer_send_weights(params.named_parameters(), group,
                                                         packed_buffer_size_bytes=192 << 10, packed_num_buffers=2)  # fmt: skip
            sent.append({n: digest(t) for n, t in params.named_parameters()})
            errors.append(None)
        except TransferError as e:
            sent.append(None)
            errors.append(str(e))
        direct_frames.append(sum("direct reads" in w for w in frames))
    destroy_side_group(group)
    return sent, direct_frames, errors, state.direct_off


@processes
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_large_tensors_are_read_in_place_bit_exact_and_every_failure_is_agreed(device):
    """Update 0 packs everything (a new layout); 1 sends each direct bucket's map; 2 reuses them
    (no frame); 3 moved one parameter (one new map); 4 fails on a worker (agreed), so 5 sends every
    map again; 6's maps point past the trainer's allocation: every worker refuses them (agreed
    TransferError, no crash), the trainer packs everything from then on, and 7 arrives packed.
    Slow loads (1, 2, 5, CUDA) check that the trainer's next in-place step waits for the workers'
    reads. On the CPU the parameters are in shared memory (``share_memory_()``), but one, which is
    packed every time."""
    outcomes = run_processes(_direct_body, 3, free_port(), device, deadline_s=240)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    sent, frames, errors, off = outcomes[0].value
    assert [e is None for e in errors] == [True, True, True, True, False, True, False, True], errors
    assert outcomes[1].value == sent and outcomes[2].value == sent
    n = frames[1]  # buckets read in place (on the CPU not the one whose only large tensor is not shared)
    assert n >= 2
    assert frames[:4] == [0, n, 0, 1] and frames[5] == n and frames[7] == 0, frames
    assert off is not None and "in place" in errors[6], errors[6]


@processes
def test_direct_reads_need_every_workers_consent():
    """The switch on the trainer and on worker 1 only: every update is packed, bit-exact (worker
    1's refusal at update 4 aside), and the trainer says why once. A trainer that sends maps all
    the same (update 6) is refused by the worker that did not consent, before it maps anything:
    an agreed TransferError, then packing again."""
    outcomes = run_processes(_direct_body, 3, free_port(), "cpu", (1,), deadline_s=240)
    for o in outcomes:
        assert o.error is None, f"rank {o.rank}: {o.error}\n{o.tb}"
    sent, frames, errors, off = outcomes[0].value
    assert [e is None for e in errors] == [True, True, True, True, False, True, False, True], errors
    assert outcomes[1].value == sent and outcomes[2].value == sent
    assert frames[:6] == [0] * 6 and frames[7] == 0 and frames[6] > 0, frames
    assert "did not consent to direct reads" in errors[6] and "[rank 2]" in errors[6], errors[6]
    assert "[rank 1]" not in errors[6], errors[6]
    assert off == "a worker could not map the trainer's memory", off


@processes
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_fsdp2_trainer_of_two_ranks_each_with_a_colocated_worker():
    ports = (free_port(), free_port())
    outcomes = run_processes(_sharded_body, 4, free_port(), ports, "cuda", deadline_s=240)
    for trainer in (0, 1):
        refs, sent = outcomes[trainer].value
        assert sent == [len(refs[0]), len(refs[1])]
        assert outcomes[trainer + 2].value == refs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trainer_and_worker_in_one_process_is_a_clear_error_at_init():
    """CUDA IPC handles cannot be opened by the process that made them: say so at init, on every rank."""
    port = free_port()

    def body(rank: int):
        try:
            if rank == 0:
                destroy_side_group(_trainer(port, 2, device="cuda"))
            else:
                _worker(rank, port, 2, device="cuda:0").shutdown()
        except TransferError as e:
            return str(e)
        return None

    outcomes = run_threads(body, 2, deadline_s=60)
    for out in outcomes:
        assert out.value is not None and "this very process" in out.value, out.value


def _send_and_collect(updates: int, source, buffer_size: int, collect=None) -> list[dict]:
    """A trainer sends ``source(u)`` for each update to one worker (threads, CPU); the worker's
    copies of what each update loaded (by ``collect(store)``, a load_weights filling ``store``;
    default :func:`_collect`)."""
    port = free_port()

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 2)
            for u in range(updates):
                IPCWeightTransferEngine.trainer_send_weights(source(u), group, packed_buffer_size_bytes=buffer_size,
                                                             packed_num_buffers=2)  # fmt: skip
            destroy_side_group(group)
            return None
        engine = _worker(rank, port, 2)
        got = []
        for _ in range(updates):
            store: dict = {}
            engine.receive_weights(None, (collect or _collect)(store))
            got.append(store)
        engine.shutdown()
        return got

    return run_threads(body, 2, deadline_s=60)[1].value


def _staged_views(pairs):
    """One staging tensor per size, refilled for each tensor and yielded as a fresh view."""
    staging: dict = {}
    for name, t in pairs:
        buf = staging.setdefault((t.dtype, t.numel()), torch.empty(t.numel(), dtype=t.dtype))
        buf.copy_(t.reshape(-1))
        yield name, buf.view(t.shape)


def _staged_same(pairs):
    """One staging tensor per shape, refilled for each tensor and yielded itself, every time."""
    staging: dict = {}
    for name, t in pairs:
        buf = staging.setdefault((t.dtype, tuple(t.shape)), torch.empty_like(t))
        buf.copy_(t)
        yield name, buf


@pytest.mark.parametrize("staging", [_staged_views, _staged_same], ids=["fresh-views", "same-object"])
def test_a_source_refilling_one_staging_tensor_arrives_value_by_value(staging):
    """Every value as it was yielded, in the first update and in the cached ones after it."""

    def model(step: int):
        gen = torch.Generator().manual_seed(step)
        return [(f"w{i}", torch.randn(8, generator=gen)) for i in range(6)]

    for u, store in enumerate(_send_and_collect(4, lambda u: staging(model(u)), 1 << 16)):
        for name, t in model(u):
            assert bytes_equal(store[name], t), (u, name)


def test_the_second_update_of_the_same_parameters_copies_in_bulk(monkeypatch):
    """The update that describes a layout leaves what the next needs: from the second update on,
    every bucket of a module's parameters (the same objects, new values) goes in one fused copy."""
    from torchxfer import colocated_sender, packing

    model = [(f"w{i}", torch.randn(50 + i)) for i in range(40)]
    outcomes_of_bulk: list[list[bool]] = []
    bulk = colocated_sender.ColocatedSender.bulk

    def recording_bulk(self, plan, item, source):
        done, item, source = bulk(self, plan, item, source)
        outcomes_of_bulk[-1].append(done)
        return done, item, source

    monkeypatch.setattr(colocated_sender.ColocatedSender, "bulk", recording_bulk)
    views_made: list[int] = []
    typed_view = colocated_sender.typed_view

    def counting_typed_view(raw, spec):
        views_made[-1] += 1
        return typed_view(raw, spec)

    monkeypatch.setattr(colocated_sender, "typed_view", counting_typed_view)
    monkeypatch.setattr(packing, "typed_view", counting_typed_view)  # where whole_views makes them
    sent = []

    def source(u: int):
        for _, t in model:
            t.add_(1)  # in place: the same objects, new values
        sent.append({n: t.clone() for n, t in model})
        outcomes_of_bulk.append([])
        views_made.append(0)
        return iter(model)

    received = _send_and_collect(3, source, 4096)
    assert outcomes_of_bulk[0] == [] and len(outcomes_of_bulk[1]) > 1, outcomes_of_bulk
    assert all(outcomes_of_bulk[1]) and all(outcomes_of_bulk[2]), outcomes_of_bulk
    assert views_made == [len(model), 0, 0], views_made  # the views made while describing are reused
    for u, store in enumerate(received):
        assert all(bytes_equal(store[n], t) for n, t in sent[u].items()), u


def test_a_cached_update_is_announced_without_waiting_and_its_failures_still_reach_every_rank(monkeypatch):
    """Once every worker said at END that it holds the layout, the next BEGIN announces it by
    fingerprint and the trainer packs bucket 0 at once (FLAG_CACHED); a worker's load failure in
    such an update still reaches every rank, atomic workers stay whole, and the next update arrives."""
    from torchxfer import colocated_sender, wire

    flags: list[int] = []
    post = colocated_sender.ColocatedSender.post

    def spy(self, words, what):
        if words[1] == int(wire.Kind.BEGIN):
            flags.append(words[3])
        return post(self, words, what)

    monkeypatch.setattr(colocated_sender.ColocatedSender, "post", spy)
    port = free_port()
    model = _model(8)
    fail_at = 2  # the third update: rank 1's load raises in its second bucket

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 3)
            out = []
            for _ in range(5):
                try:
                    IPCWeightTransferEngine.trainer_send_weights(iter(model), group, packed_buffer_size_bytes=BUF,
                                                                 packed_num_buffers=2)  # fmt: skip
                    out.append(None)
                except TransferError as e:
                    out.append(str(e))
            destroy_side_group(group)
            return out
        engine = _worker(rank, port, 3)
        out = []
        for u in range(5):
            got: dict = {}
            calls = [0]
            keep = _collect(got)

            def load(batch, u=u, calls=calls, keep=keep):
                calls[0] += 1
                if rank == 1 and u == fail_at and calls[0] == 2:
                    raise KeyError("no such parameter")
                keep(batch)

            try:
                engine.receive_weights(None, load, atomic=rank == 2)
                out.append((_same(got, model), engine.torn))
            except TransferError as e:
                out.append((str(e), engine.torn))
        engine.shutdown()
        return out

    outcomes = run_threads(body, 3, deadline_s=90)
    trainer = outcomes[0].value
    assert [t is None for t in trainer] == [True, True, False, True, True], trainer
    assert "load_weights raised on rank 1" in trainer[fail_at]
    # The first update describes the layout (its BEGIN step is waited for, not posted as a late-read
    # step); every later one is announced as cached: the failed one changes no layout.
    assert [bool(f & wire.FLAG_CACHED) for f in flags] == [True] * 4, flags
    for rank in (1, 2):
        res = outcomes[rank].value
        assert res[0] == (True, False) and res[1] == (True, False) and res[3] == (True, False) and res[4] == (True, False)
        assert "load_weights raised on rank 1" in res[fail_at][0]
        assert res[fail_at][1] is (rank == 1)  # the streaming worker is torn, the atomic one never


def test_a_cached_bucket_pulled_straight_from_the_iterator_keeps_every_check():
    """From the second update on, a cached bucket of the same objects is pulled straight from the
    caller's iterator, its tensors checked by one C++ call where torch allows: a parameter given new
    metadata, a new object, a malformed pair or an iterator that raises mid-bucket are each seen as
    they were before, and every value arrives bit-exact."""
    model = [(f"w{i}", torch.randn(50 + i)) for i in range(40)]
    objects = [t for _, t in model]

    def changed_shape(u):  # same object, new metadata
        with torch.no_grad():
            objects[7].data = torch.randn(3, 11)
        return iter(model)

    def new_object(u):
        model[20] = ("w20", torch.randn(70))
        return iter(model)

    def raising(u):
        yield from model[:25]
        raise RuntimeError("source broke")

    def malformed(u):
        yield from model[:25]
        yield list(model[25])

    def fresh(u):
        for _, t in model:
            t.add_(1)
        return iter(model)

    def malformed_list(u):  # a list is pulled a bucket at a time: the pair is still refused
        return iter(model[:25] + [list(model[25])] + model[26:])

    def items(u):  # a dict's items, pulled a bucket at a time too
        fresh(u)
        return iter(dict(model).items())

    def moved_in_list(u):  # another object at the same name, in a list
        model[30] = ("w30", model[30][1].clone())
        return fresh(u)

    plan = [fresh, fresh, changed_shape, fresh, new_object, fresh, raising, fresh, malformed, fresh,
            malformed_list, fresh, items, items, moved_in_list, fresh]  # fmt: skip
    sent: list[dict | None] = []
    port = free_port()

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 2)
            out = []
            for u, source in enumerate(plan):
                items = source(u)
                fails = source in (raising, malformed, malformed_list)
                sent.append(None if fails else {n: t.clone() for n, t in model})
                try:
                    IPCWeightTransferEngine.trainer_send_weights(items, group, packed_buffer_size_bytes=4096,
                                                                 packed_num_buffers=2)  # fmt: skip
                    out.append(None)
                except Exception as e:  # noqa: BLE001
                    out.append(f"{type(e).__name__}: {e}")
            destroy_side_group(group)
            return out
        engine = _worker(rank, port, 2)
        got = []
        for _ in plan:
            store: dict = {}
            try:
                engine.receive_weights(None, _collect(store))
                got.append(store)
            except TransferError as e:
                got.append(str(e))
        engine.shutdown()
        return got

    outcomes = run_threads(body, 2, deadline_s=90)
    trainer, worker = outcomes[0].value, outcomes[1].value
    assert trainer[6] == "RuntimeError: source broke" and "source broke" in worker[6]
    assert trainer[8].startswith("ValueError: expected (name, tensor) pairs, got list"), trainer[8]
    assert trainer[10].startswith("ValueError: expected (name, tensor) pairs, got list"), trainer[10]
    for u, expected in enumerate(sent):
        if expected is None:
            continue
        assert trainer[u] is None, (u, trainer[u])
        assert list(worker[u]) == list(expected), u
        assert all(worker[u][n].shape == t.shape and bytes_equal(worker[u][n], t) for n, t in expected.items()), u
    assert worker[2]["w7"].shape == (3, 11)


@pytest.mark.parametrize("sliced", [False, True], ids=["fused", "sliced"])
def test_module_loader_copies_runs_of_slices_at_once_bit_exact(monkeypatch, sliced):
    """From the second update on, the receiver hands ModuleLoader a SlicedBatch: runs of tensors
    back to back in the buffer, which it copies one run at a time (split_with_sizes_copy; on the CPU
    only when told to), the others fused; a batch changed by a wrapping load_weights is loaded as any
    other. Every value bit-exact, whatever the dtype, shape or run."""
    from torchxfer import loading

    monkeypatch.setattr(loading, "SLICED_COPIES_ON_CPU", sliced)
    calls: list[bool] = []
    real = loading._sliced
    monkeypatch.setattr(loading, "_sliced", lambda batch, plan: calls.append(real(batch, plan)) or calls[-1])
    gen = torch.Generator().manual_seed(3)
    shapes = ([((8,), torch.float32)] * 30 + [((4, 6), torch.bfloat16)] * 10 + [((0,), torch.float32), ((), torch.int64)]
              + [((2, 3, 5), torch.float16)] * 4 + [((3, 7), torch.float16), ((7,), torch.uint8)])  # fmt: skip
    src = [(f"p{i}", _random(dtype, shape, gen)) for i, (shape, dtype) in enumerate(shapes)]
    dst = torch.nn.Module()
    for name, t in src:
        dst.register_buffer(name, torch.zeros_like(t))
    port = free_port()
    expect: list = []
    got: list = []

    def body(rank: int):
        if rank == 0:
            group = _trainer(port, 2)
            for _ in range(4):
                for _, t in src:
                    t.copy_(_random(t.dtype, tuple(t.shape), gen))
                expect.append({n: t.clone() for n, t in src})
                IPCWeightTransferEngine.trainer_send_weights(iter(src), group, packed_buffer_size_bytes=1024,
                                                             packed_num_buffers=2)  # fmt: skip
            destroy_side_group(group)
            return None
        engine = _worker(rank, port, 2)
        loader = ModuleLoader(dst)
        for u in range(4):
            # Update 3: load_weights hands the loader a copy of the list, with one pair replaced.
            load = loader if u != 3 else lambda batch: loader([batch[0]] + [(n, t.clone()) for n, t in batch[1:]])
            with loader.update():
                engine.receive_weights(None, load)
            got.append({n: t.clone() for n, t in dst.named_buffers()})
        engine.shutdown()

    run_threads(body, 2, deadline_s=90)
    assert len(got) == 4 and all(all(bytes_equal(g[n], e[n]) for n in e) for g, e in zip(got, expect))
    assert any(calls) is sliced and not all(calls), calls


def test_a_sliced_batch_is_never_copied_into_a_target_whose_shape_changed(monkeypatch):
    """split_with_sizes_copy would resize such a target: ModuleLoader sees the target changed and
    checks the batch in full, which names it (ValueError); nothing is resized."""
    from torchxfer import loading

    monkeypatch.setattr(loading, "SLICED_COPIES_ON_CPU", True)
    base = torch.arange(12, dtype=torch.float32)
    module = torch.nn.Module()
    for i in range(3):
        module.register_buffer(f"b{i}", torch.zeros(4))
    pairs = tuple((f"b{i}", v) for i, v in enumerate(base.split(4)))

    def batch():
        return loading.SlicedBatch(pairs, ((0, 3, base, [4, 4, 4]),), ())

    loader = ModuleLoader(module)
    for _ in range(2):  # the plan, then a sliced copy
        with loader.update():
            loader(batch())
    assert torch.equal(module.b1, base[4:8])
    with torch.no_grad():
        module.b1.data = torch.zeros(2, 2)  # new metadata behind the target the plan holds
    ptr = module.b1.data_ptr()
    loader.reset()
    with pytest.raises(ValueError, match=r"'b1': shape \[4\], the module has \[2, 2\]"):
        loader(batch())  # the targets are checked again in full; nothing is resized
    assert module.b1.shape == (2, 2) and module.b1.data_ptr() == ptr


def _direct_frame(gen: int, slots: list, segments: list) -> bytes:
    from torchxfer.colocated import encode_frame

    return encode_frame({"gen": gen, "slots": slots, "segments": segments})


_SEGMENT = ["ab" * 64, 4096, 7]


@pytest.mark.parametrize(
    "frame, why",
    [
        (b"TXIPnot json", "not JSON"),
        (b"XXXX{}", "not a torchxfer colocated frame"),
        (_direct_frame(2, [[0, 0, 0]], [_SEGMENT]), "disagrees"),  # another generation than the row's
        (_direct_frame(1, [], [_SEGMENT]), "malformed"),  # no entry
        (_direct_frame(1, [[0, 0, 0]] * 4, [_SEGMENT]), "malformed"),  # more entries than slots
        (_direct_frame(1, [[0, 0, 0]], [["zz" * 64, 4096, 7]]), "malformed allocation"),
        (_direct_frame(1, [[0, 0, 0]], [["ab" * 63, 4096, 7]]), "malformed allocation"),
        (_direct_frame(1, [[0, 0, 0]], [["ab" * 63 + "  ", 4096, 7]]), "malformed allocation"),  # 63 bytes
        (_direct_frame(1, [[0, 0, 0]], [["ab" * 64, 0, 7]]), "malformed allocation"),
        (_direct_frame(1, [[0, 0, 0]], [["ab" * 64, -5, 7]]), "malformed allocation"),
        (_direct_frame(1, [[0, 0, 0]], [["ab" * 64, True, 7]]), "malformed allocation"),
        (_direct_frame(1, [[0, 0, 0]], [["ab" * 64, 4096, 1.5]]), "malformed allocation"),
        (_direct_frame(1, [[0, 0, -1]], [_SEGMENT]), "malformed entry"),
        (_direct_frame(1, [[0, 0]], [_SEGMENT]), "malformed entry"),
        (_direct_frame(1, [[0, 0, "0"]], [_SEGMENT]), "malformed entry"),
        (_direct_frame(1, [[3, 0, 0]], [_SEGMENT]), "out of range"),  # no slot 3
        (_direct_frame(1, [[0, 1, 0]], [_SEGMENT]), "out of range"),  # no allocation 1
        (_direct_frame(1, [[1, 0, 0], [0, 0, 1024]], [_SEGMENT]), "out of range"),  # not increasing
        (_direct_frame(1, [[0, 0, 0], [0, 0, 1024]], [_SEGMENT]), "out of range"),  # twice
        (_direct_frame(1, [[2, 0, 0]], [_SEGMENT]), "at offset"),  # a part of a split tensor
        (_direct_frame(1, [[0, 0, 4096 - 1000]], [_SEGMENT]), "at offset"),  # past the allocation's end
        (_direct_frame(1, [[0, 0, 1 << 61]], [_SEGMENT]), "at offset"),
        (_direct_frame(1, [[0, 0, 2]], [_SEGMENT]), "at offset"),  # not aligned to a float32
    ],
)
def test_a_hostile_direct_read_map_is_refused_before_anything_is_read(frame, why):
    """A worker checks every field of the trainer's direct-read map (CUDA only in use; the checks
    run here with the mapping itself replaced by a CPU tensor)."""
    from types import SimpleNamespace

    from torchxfer.colocated_receiver import ColocatedReceiver
    from torchxfer.packing import Slot, TensorSpec

    spec = TensorSpec.of("w", torch.zeros(256, dtype=torch.float32))  # 1024 bytes
    split = TensorSpec.of("s", torch.zeros(600, dtype=torch.float32))
    plan = SimpleNamespace(slots=(Slot(0, 0, spec, 0, 1024, 0), Slot(0, 1, spec, 0, 1024, 1024),
                                  Slot(0, 2, split, 0, 1024, 2048)))  # fmt: skip
    memory = torch.arange(4096, dtype=torch.int32).to(torch.uint8)
    worker = ColocatedReceiver.__new__(ColocatedReceiver)
    worker.direct_segment = lambda handle, size, buffer_id: memory[:size]
    with pytest.raises(TransferError, match=why):
        worker.map_direct(plan, 1, frame)


def test_a_direct_read_map_gives_views_of_the_named_bytes():
    from types import SimpleNamespace

    from torchxfer.colocated_receiver import ColocatedReceiver
    from torchxfer.packing import Slot, TensorSpec

    a, b = torch.randn(16, 16), torch.randn(8).double()
    plan = SimpleNamespace(slots=(Slot(0, 0, TensorSpec.of("a", a), 0, 1024, 0),
                                  Slot(0, 1, TensorSpec.of("b", b), 0, 64, 1024)))  # fmt: skip
    memory = torch.zeros(4096, dtype=torch.uint8)
    memory[512:1536] = a.view(-1).view(torch.uint8)
    memory[2048:2112] = b.view(torch.uint8)
    worker = ColocatedReceiver.__new__(ColocatedReceiver)
    worker.direct_segment = lambda handle, size, buffer_id: memory[:size]
    views, handles = worker.map_direct(plan, 5, _direct_frame(5, [[0, 0, 512], [1, 0, 2048]], [_SEGMENT]))
    assert bytes_equal(views[0], a) and bytes_equal(views[1], b) and handles == {bytes.fromhex("ab" * 64)}
    assert views[0].data_ptr() == memory.data_ptr() + 512  # a view, not a copy


def _hostile_colocated_trainer(port: int, what: str) -> str:
    """A colocated trainer that sends one honest update, then rows or tables out of protocol."""
    from torchxfer.colocated_sender import _State
    from torchxfer.control import ControlChannel
    from torchxfer.group import side_group

    pg = _trainer(port, 2, timeout=2.0)
    try:
        IPCWeightTransferEngine.trainer_send_weights([("w", torch.arange(4.0))], pg, packed_buffer_size_bytes=1024,
                                                     packed_num_buffers=2)  # fmt: skip
        group = side_group(pg)
        channel, buffers_id = ControlChannel(group), _State.of(group).buffers_id
        with contextlib.suppress(TransferError):  # the worker stops answering once it sees the fault
            _hostile_steps(channel, buffers_id, what)
        return what
    finally:
        destroy_side_group(pg)


def _hostile_steps(channel, buffers_id: int, what: str) -> None:
    from tests.test_hostile import frame_of, one, slot
    from torchxfer.wire import FLAG_PACKED, Kind, make_row

    if what == "too many buffers":
        channel.post(make_row(Kind.BEGIN, 7, FLAG_PACKED, 1024, 1000, 0, -1, 0, buffers_id), what).rows()
        return
    size = 1 << 20 if what == "larger buffers, not shared" else 1024
    rows = channel.post(make_row(Kind.BEGIN, 7, FLAG_PACKED, size, 2, 0, -1, 0, buffers_id), what).rows()
    channel.settle(rows, b"", what)
    if what == "only SYNC rows":  # a worker breaks the group after 2 x timeout_s of them
        while True:
            channel.post(make_row(Kind.SYNC), what).rows()
    if what == "bucket out of order":
        channel.post(make_row(Kind.BUCKET, 5, 1, 0, 0), what).rows()
    else:  # a slot past the end of the buffers the worker mapped
        frame = frame_of(one(slot(0, "w", "float32", [4], 0, 16, 4096)))
        channel.post(make_row(Kind.TABLE, 0, 1, 0, len(frame)), what)
        channel.send_frame(frame, what)
        channel.post(make_row(Kind.SYNC), what).rows()


@pytest.mark.parametrize("what", ["too many buffers", "bucket out of order", "larger buffers, not shared",
                                  "only SYNC rows"])  # fmt: skip
def test_a_colocated_trainer_row_out_of_protocol_breaks_the_group_and_reads_nothing(what):
    from torchxfer.group import side_group

    took: list[float] = []

    def body(rank: int, port: int):
        if rank == 0:
            return _hostile_colocated_trainer(port, what)
        engine = _worker(rank, port, 2, timeout=2.0)
        try:
            store: dict = {}
            engine.receive_weights(None, _collect(store))
            store.clear()
            start = time.monotonic()
            with pytest.raises(TransferError) as info:
                engine.receive_weights(None, _collect(store))
            took.append(time.monotonic() - start)
            return info.value.broken, side_group(engine.model_update_group).broken is not None, store
        finally:
            engine.shutdown()

    assert run_world(body, 2, deadline_s=60)[1] == (True, True, {})
    assert took and took[0] < 2 * 2.0 + SLACK, took  # the SYNC-only case is bounded by 2 x timeout_s


def test_a_worker_that_answers_and_never_releases_a_buffer_fails_the_update_within_the_timeout(monkeypatch):
    """Rank 2 keeps answering every row but says it released nothing: the trainer's wait for the
    buffer is bounded by timeout_s, and every rank raises TransferError naming it."""
    from torchxfer import colocated_receiver

    real = colocated_receiver.ColocatedReceiver.row

    def stuck(self):
        words = real(self)
        if self.group.rank() == 2:
            words[6] = 0  # args[4]: buckets released
        return words

    monkeypatch.setattr(colocated_receiver.ColocatedReceiver, "row", stuck)
    model = [(f"w{i}", torch.full((250,), float(i))) for i in range(6)]  # one 1000-byte tensor per 1 KiB bucket

    def body(rank: int, port: int):
        start = time.monotonic()
        if rank == 0:
            pg = _trainer(port, 3, timeout=1.0)
            try:
                with pytest.raises(TransferError) as info:
                    IPCWeightTransferEngine.trainer_send_weights(model, pg, packed_buffer_size_bytes=1024,
                                                                 packed_num_buffers=2)  # fmt: skip
                return str(info.value), time.monotonic() - start
            finally:
                destroy_side_group(pg)
        engine = _worker(rank, port, 3, timeout=1.0)
        try:
            with pytest.raises(TransferError) as info:
                engine.receive_weights(None, _collect({}))
            return str(info.value), time.monotonic() - start
        finally:
            engine.shutdown()

    for message, seconds in run_world(body, 3, deadline_s=30):
        assert "did not release bucket" in message and seconds < 1.0 + SLACK, (message, seconds)


def test_cpu_buffers_are_opened_only_as_memory_of_the_proven_trainer():
    """A buffer description naming another process than the one whose probe read back at init
    (or none known) is refused before anything is opened; the trainer's own opens bit for bit."""
    from torchxfer import ipc_transport

    fd, tensor = ipc_transport._memfd(4096, "torchxfer-test")
    try:
        tensor.copy_(torch.arange(4096) % 251)
        desc = {"nbytes": 4096, "device": "cpu", "uuid": ipc_transport.device_uuid(torch.device("cpu")),
                "pid": os.getpid(), "fds": [fd]}  # fmt: skip
        buffers, _ = ipc_transport.open_buffers(desc, torch.device("cpu"), 1, 4096, os.getpid())
        assert bytes_equal(buffers[0], tensor)
        for pid in (os.getppid(), None):
            with pytest.raises(TransferError, match="not of the trainer"):
                ipc_transport.open_buffers(desc, torch.device("cpu"), 1, 4096, pid)
    finally:
        os.close(fd)


def test_shared_memory_is_sealed_at_its_size_and_an_unsealed_one_is_refused():
    """A trainer cannot shrink a buffer under its workers (a read past the end is SIGBUS), and a
    worker refuses shared memory that is not sealed so."""
    from torchxfer import ipc_transport

    fd, tensor = ipc_transport._memfd(4096, "torchxfer-test")
    try:
        tensor.fill_(7)
        mapped = ipc_transport._open_memfd(os.getpid(), fd, 4096, "a buffer")
        assert mapped.numel() == 4096 and int(mapped[4095]) == 7
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    plain = os.memfd_create("torchxfer-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(plain, 4096)
        with pytest.raises(TransferError, match="not sealed"):
            ipc_transport._open_memfd(os.getpid(), plain, 4096, "a buffer")
    finally:
        os.close(plain)


def _bounded(call, limit_s: float = 5.0):
    """``call()`` in a daemon thread: its exception (or None), failing the test if it is still
    running after ``limit_s`` (a blocking open would leave it there)."""
    box: list = []

    def run() -> None:
        try:
            call()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(limit_s)
    assert box, f"still blocked after {limit_s} s"
    return box[0], time.monotonic() - start


def test_a_file_the_trainer_names_is_opened_without_waiting(tmp_path):
    """A worker opens what the trainer names without ever blocking: a FIFO with no writer named
    by a direct-read map, and a file held under a lease by another process named as the host
    probe (whose opening would wait for the lease to break: 45 s by default) are refused at once."""
    import struct
    import subprocess

    from torchxfer import ipc_transport

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    held = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(held)
        handle = (b"TXFD" + struct.pack("<qqqq", os.getpid(), held, st.st_dev, st.st_ino)).ljust(64, b"\0")
        error, elapsed = _bounded(lambda: ipc_transport.open_shared(handle, 4096, st.st_ino, os.getpid()))
        assert isinstance(error, TransferError) and "is not the file its map names" in str(error), error
        assert elapsed < 2.0
    finally:
        os.close(held)
    leased = tmp_path / "leased"
    leased.write_bytes(bytes(4096))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal, sys\n"
        "signal.signal(signal.SIGIO, signal.SIG_IGN)\n"
        f"fd = os.open({str(leased)!r}, os.O_RDONLY)\n"
        "fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)\n"
        "print(fd, flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        fd = int(holder.stdout.readline())
        error, elapsed = _bounded(lambda: ipc_transport._open_memfd(holder.pid, fd, 4096, "the host check"))
        assert isinstance(error, TransferError) and "cannot open the trainer's shared memory" in str(error), error
        assert elapsed < 2.0
    finally:
        holder.kill()
        holder.wait(10)


def test_module_loader_checks_a_sliced_batch_again_only_when_its_pairs_are_new(monkeypatch):
    """The colocated receiver hands the same views every update of a layout: the loader checks
    their shapes once, and checks any other batch (new pairs, or a list made from them) in full."""
    from torchxfer import loading
    from torchxfer.loading import SlicedBatch

    monkeypatch.setattr(loading, "SLICED_COPIES_ON_CPU", True)
    base = torch.arange(24, dtype=torch.float32)
    pairs = tuple((f"p{i}", t) for i, t in enumerate(base.split([8, 8, 8])))
    module = torch.nn.Module()
    for name, _ in pairs:
        module.register_buffer(name, torch.zeros(8))
    loader = ModuleLoader(module)
    checks: list[int] = []

    def load(batch):
        with loader.update():
            loader(batch)
        plan = next(iter(loader._plans.values()))
        if plan.guard is not None and not hasattr(plan.guard, "counted"):
            real = plan.guard

            def counted(*tensors):
                checks.append(len(tensors))
                return real(*tensors)

            counted.counted = True
            plan.guard = counted

    runs = ((0, 3, base.view(-1, 1).view(-1), [8, 8, 8]),)
    for _ in range(3):
        load(SlicedBatch(pairs, runs, ()))
        assert torch.equal(torch.cat([module.p0, module.p1, module.p2]), base)
    assert checks == []  # the first call made the plan; the later ones are the very pairs
    load(SlicedBatch(tuple((n, t.clone()) for n, t in pairs), runs, ()))
    load(list(pairs))
    assert checks == [3, 3]
    changed = SlicedBatch(pairs, runs, ())
    changed[1] = ("p1", torch.zeros(5))  # a wrapper changed the batch in place: checked, and refused
    with pytest.raises(ValueError, match="shape"):
        load(changed)


def test_module_loader_checks_the_names_of_a_sliced_batch_changed_in_place(monkeypatch):
    """A load_weights wrapper that renames or reorders the pairs of a SlicedBatch it was handed (the
    receiver's pairs object still behind it) gets them loaded by name, and an unknown name refused
    (strict), however often the batch came unchanged before."""
    from torchxfer import loading
    from torchxfer.loading import SlicedBatch

    monkeypatch.setattr(loading, "SLICED_COPIES_ON_CPU", True)
    base = torch.arange(24, dtype=torch.float32)
    pairs = tuple((f"p{i}", t) for i, t in enumerate(base.split([8, 8, 8])))
    runs = ((0, 3, base, [8, 8, 8]),)
    module = torch.nn.Module()
    for name, _ in pairs:
        module.register_buffer(name, torch.zeros(8))
    loader = ModuleLoader(module)
    for _ in range(2):
        with loader.update():
            loader(SlicedBatch(pairs, runs, ()))
    swapped = SlicedBatch(pairs, runs, ())
    swapped[0], swapped[1] = ("p1", pairs[0][1]), ("p0", pairs[1][1])
    with loader.update():
        loader(swapped)
    assert torch.equal(module.p0, pairs[1][1]) and torch.equal(module.p1, pairs[0][1])
    assert torch.equal(module.p2, pairs[2][1])
    unknown = SlicedBatch(pairs, runs, ())
    unknown[2] = ("nope", pairs[2][1])
    loader.reset()
    with pytest.raises(ValueError, match="unexpected 'nope'"):
        loader(unknown)


def test_module_loader_lets_go_of_a_replaced_plans_buffer(monkeypatch):
    """When a layout of the same names comes again with other shapes (a new plan), the old plan's
    pairs, views of the receiver's old buffer, are no longer held by the loader."""
    from torchxfer import loading
    from torchxfer.loading import SlicedBatch

    monkeypatch.setattr(loading, "SLICED_COPIES_ON_CPU", True)
    module = torch.nn.Module()
    for i in range(3):
        module.register_buffer(f"p{i}", torch.zeros(8))
    loader = ModuleLoader(module)

    def batch_of(base: torch.Tensor, sizes: list[int]) -> SlicedBatch:
        return SlicedBatch(tuple((f"p{i}", t) for i, t in enumerate(base.split(sizes))), ((0, 3, base, sizes),), ())

    old = torch.arange(24, dtype=torch.float32)
    with loader.update():
        loader(batch_of(old, [8, 8, 8]))
    gone = weakref.ref(old)
    for i in range(3):
        getattr(module, f"p{i}").data = torch.zeros(4)
    new = torch.arange(12, dtype=torch.float32)
    with loader.update():
        loader(batch_of(new, [4, 4, 4]))
    del old
    gc.collect()
    assert gone() is None
    assert torch.equal(torch.cat([module.p0, module.p1, module.p2]), new)


@pytest.mark.parametrize("raw", [b"", b"x" * 63, b"x" * 65])
def test_a_cuda_ipc_handle_of_other_than_64_bytes_is_refused_before_any_driver_call(raw):
    from torchxfer import ipc_transport

    with pytest.raises(TransferError, match="64 bytes"):
        ipc_transport._handle(raw)


@pytest.mark.parametrize("backend", ["ipc", "gloo"])
def test_an_apply_that_fails_on_one_atomic_worker_leaves_the_others_whole_and_says_so(backend):
    """Three atomic workers; the third's load_weights raises while it applies update 1. Every rank
    raises the agreed TransferError. Workers 1 and 2 applied the whole update before they heard:
    their weights_version moves to it and they are not torn. Worker 3 is torn, its version stays.
    The next update succeeds everywhere, bit for bit."""
    port = free_port()
    models = [_model(20, big=10), _model(21, big=10), _model(22, big=10)]

    def body(rank: int):
        if rank == 0:
            return _send_each(backend, port, 4, [iter(m) for m in models])
        engine = _either_worker(backend, rank, port, 4)
        seen = []
        for u in range(len(models)):
            got: dict = {}

            def failing(batch, got=got):  # the third worker's loader for update 1
                for name, tensor in batch[:5]:
                    got[name] = tensor.clone()
                raise RuntimeError("boom while applying")

            load = failing if rank == 3 and u == 1 else _collect(got)
            try:
                engine.receive_weights(None, load, atomic=True)
                error = None
            except TransferError as e:
                assert not e.broken
                error = str(e)
            seen.append((error, got, engine.weights_version, engine.torn))
        engine.shutdown()
        return seen

    outcomes = run_threads(body, 4, deadline_s=90)
    errors = outcomes[0].value
    assert errors[0] is None and errors[2] is None and "boom while applying" in errors[1]
    for rank in (1, 2, 3):
        first, second, third = outcomes[rank].value
        assert first[0] is None and _same(first[1], models[0]) and first[2:] == (0, False)
        assert "boom while applying" in second[0]
        if rank == 3:
            assert second[2:] == (0, True) and len(second[1]) == 5
        else:
            assert _same(second[1], models[1]) and second[2:] == (1, False), rank
        assert third[0] is None and _same(third[1], models[2]) and third[2:] == (2, False)


def test_a_shared_memory_handle_is_opened_only_as_the_trainers_own_file():
    """CPU direct reads: ``open_shared`` maps a handle from ``shared_segment`` (bit for bit), and
    refuses, before reading anything, a handle of another process, another file behind the same
    descriptor, a size past the file, a descriptor that is not open, or malformed bytes."""
    import struct

    from torchxfer.ipc_transport import open_shared, same_shared, shared_segment

    t = torch.arange(1000, dtype=torch.float32).share_memory_()
    base, size, handle, inode = shared_segment(t)
    assert base == t.data_ptr() and size == 4000 and same_shared(handle, inode)
    mapped = open_shared(handle, size, inode, os.getpid())
    assert bytes_equal(mapped.view(torch.float32), t)
    assert shared_segment(torch.arange(10.0)) is None  # not in shared memory: packed, never read in place
    pid, fd, dev, ino = struct.unpack_from("<qqqq", handle, 4)
    other = torch.zeros(10).share_memory_()
    bad = {
        "another process": (handle, size, inode, pid + 1),
        "another file's inode": (handle, size, inode + 1, pid),
        "a size past the file": (handle, size + 4096, inode, pid),
        "a descriptor not open": (b"TXFD" + struct.pack("<qqqq", pid, 1 << 20, dev, ino) + bytes(28), size, inode, pid),
        "another file behind the descriptor": (shared_segment(other)[2][:20] + struct.pack("<qq", dev, ino) + bytes(28),
                                               size, inode, pid),
        "bad magic": (b"XXXX" + handle[4:], size, inode, pid),
        "bytes in the padding": (handle[:63] + b"\x01", size, inode, pid),
        "no trainer pid known": (handle, size, inode, None),
    }  # fmt: skip
    for why, args in bad.items():
        try:
            open_shared(*args)
        except TransferError:
            continue
        pytest.fail(f"open_shared accepted {why}")


@pytest.mark.parametrize("backend", ["ipc", "gloo"])
def test_a_count_mismatch_on_a_cached_layout_names_the_tensors(backend):
    """The second update of a layout, with an update_info that leaves one tensor out and lists
    one the trainer does not send: the agreed error names both, not only the counts."""
    port = free_port()
    model = _model(30, big=10)
    kw = dict(packed=True, packed_buffer_size_bytes=BUF, packed_num_buffers=2)
    good = NCCLWeightTransferUpdateInfo.from_named_tensors(model, **kw)
    bad = NCCLWeightTransferUpdateInfo.from_named_tensors(model[:-1] + [("ghost", torch.zeros(2)), ("ghost2", torch.zeros(1))], **kw)

    def body(rank: int):
        if rank == 0:
            return _send_each(backend, port, 2, [model, model])  # a list: its count goes first
        engine = _either_worker(backend, rank, port, 2)
        engine.receive_weights(good, _collect({}))
        loaded: dict = {}
        with pytest.raises(TransferError) as failed:
            engine.receive_weights(bad, _collect(loaded))
        torn = engine.torn
        engine.shutdown()
        return str(failed.value), loaded, torn

    outcomes = run_threads(body, 2, deadline_s=60)
    assert outcomes[0].value[0] is None
    message, loaded, torn = outcomes[1].value
    assert not loaded and not torn, (sorted(loaded), torn)  # the count differs at BEGIN: refused before any load
    for message in (outcomes[0].value[1], message):
        assert f"not sent: ['ghost', 'ghost2']; not listed: ['{model[-1][0]}']" in message, message


def test_the_trainers_shared_memory_is_mapped_read_only_and_never_moved():
    """CPU direct reads: a worker maps the trainer's tensor memory read-only, so a write into a
    view (a load_weights that changes its input in place) faults in the worker and never reaches
    the trainer's parameters; and a storage shared with the "file_system" strategy is left where
    it is (not read in place; asking torch for its descriptor would have moved it)."""
    import subprocess
    import sys

    import torch.multiprocessing as tmp

    from torchxfer.ipc_transport import shared_segment

    t = torch.arange(64, dtype=torch.float32).share_memory_()
    _, size, handle, inode = shared_segment(t)
    child = (f"import os, torch\nfrom torchxfer.ipc_transport import open_shared\n"
             f"m = open_shared(bytes.fromhex('{handle.hex()}'), {size}, {inode}, {os.getpid()})\n"
             f"print(m.view(torch.float32)[:4].tolist(), flush=True)\nm[0] = 1\nprint('wrote', flush=True)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[:1] == ["[0.0, 1.0, 2.0, 3.0]"], done.stderr
    assert done.returncode != 0 and "wrote" not in done.stdout  # the write faulted
    assert bytes_equal(t, torch.arange(64, dtype=torch.float32))

    old = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        u = torch.zeros(16).share_memory_()
        where = u.data_ptr()
        assert shared_segment(u) is None and u.data_ptr() == where
    finally:
        tmp.set_sharing_strategy(old)


@pytest.mark.parametrize("backend", ["ipc", "gloo"])
def test_two_threads_sending_on_one_group_take_turns(backend):
    """Two sender threads on one group: the second waits for the first update however long it takes in all
    (here about 2.4 s on a group whose timeout_s is 1.5 s, every wait of its own within it), then
    sends; the worker receives both, bit for bit."""
    import threading

    port = free_port()
    gen = torch.Generator().manual_seed(40)
    # Tensors of 40 KB in 64 KiB buffers: a bucket each, so no wait of the update spans two pulls.
    models = [[(f"w{i}", _random(torch.float32, (10_000,), gen)) for i in range(24)] for _ in range(2)]
    started = threading.Event()

    def slow(model):
        for item in model:
            started.set()
            time.sleep(0.1)  # pacing the source, not synchronizing: 24 pulls take about 2.4 s
            yield item

    def body(rank: int):
        if rank == 0:
            group = _either_trainer(backend, port, 2, timeout=1.5)
            outcomes: list = [None, None]

            def send(i: int, source) -> None:
                try:
                    outcomes[i] = _either_send(backend, source, group, packed_buffer_size_bytes=BUF).num_tensors
                except Exception as e:  # noqa: BLE001 - reported to the test
                    outcomes[i] = repr(e)

            first = threading.Thread(target=send, args=(0, slow(models[0])))
            first.start()
            assert started.wait(TIMEOUT)
            send(1, iter(models[1]))
            first.join(TIMEOUT)
            destroy_side_group(group)
            return outcomes
        engine = _either_worker(backend, rank, port, 2, timeout=1.5)
        got = []
        for _ in models:
            store: dict = {}
            engine.receive_weights(None, _collect(store))
            got.append(store)
        engine.shutdown()
        return got

    outcomes = run_threads(body, 2, deadline_s=60)
    assert outcomes[0].value == [len(models[0]), len(models[1])]
    first, second = outcomes[1].value
    assert _same(first, models[0]) and _same(second, models[1])


@pytest.mark.parametrize("backend", ["ipc", "gloo"])
def test_a_sender_waiting_for_its_turn_when_the_group_is_destroyed_raises_at_once(backend):
    """A sender thread waiting on the group's update lock when another thread destroys the group
    gets TransferError ("closed") at once, and builds nothing in the group's state."""
    import threading

    from torchxfer.group import side_group

    port = free_port()

    class Signalling:  # the group's update lock, telling the test when a sender waits on it
        def __init__(self, inner) -> None:
            self.inner, self.waiting = inner, threading.Event()

        def acquire(self, timeout: float = -1) -> bool:
            if not self.inner.acquire(blocking=False):
                self.waiting.set()
                return self.inner.acquire(timeout=timeout)
            return True

        def release(self) -> None:
            self.inner.release()

    def body(rank: int):
        if rank == 0:
            group = _either_trainer(backend, port, 2)
            side = side_group(group)
            side._updating = lock = Signalling(side._updating)
            outcome: list = []

            def send() -> None:
                try:
                    outcome.append(_either_send(backend, iter(_model(42, big=10)), group))
                except Exception as e:  # noqa: BLE001 - reported to the test
                    outcome.append(e)

            with side.one_update():  # another update in progress
                waiting = threading.Thread(target=send)
                waiting.start()
                assert lock.waiting.wait(TIMEOUT)
                destroy_side_group(group)
            waiting.join(TIMEOUT)
            return outcome, dict(side.cache)
        engine = _either_worker(backend, rank, port, 2)
        engine.shutdown()
        return None

    outcomes = run_threads(body, 2, deadline_s=60)
    (outcome, cache) = outcomes[0].value
    assert len(outcome) == 1 and isinstance(outcome[0], TransferError) and "closed" in str(outcome[0]), outcome
    assert not cache, cache


def _mangle(name: str, t: torch.Tensor) -> None:
    """Change a tensor handed to load_weights in place, metadata and all (one way per name)."""
    how = int(name[-1]) % 4
    if how == 0:
        t.t_() if t.dim() == 2 else t.unsqueeze_(0)
    elif how == 1:
        t.set_(torch.zeros(t.shape, dtype=t.dtype))
    elif how == 2 and t.storage_offset():
        t.as_strided_(t.shape, t.stride(), t.storage_offset() - 1)
    elif how == 2:
        t.data = torch.ones(t.shape, dtype=t.dtype)
    else:
        t.requires_grad_(True)


@pytest.mark.parametrize("direct", [False, True], ids=["packed", "direct-reads"])
def test_tensors_a_load_weights_changed_in_place_arrive_as_sent_next_update(monkeypatch, direct):
    """Views of the shared buffer (and, with direct reads, of the trainer's memory) are made once
    per layout and handed out as the same objects: one that a load_weights changed in place
    (transposed, re-pointed...) is not handed out again."""
    from torchxfer import colocated, colocated_receiver, colocated_sender

    read_in_place: list[int] = []
    if direct:
        monkeypatch.setenv(colocated.DIRECT_ENV, "1")
        monkeypatch.setattr(colocated_sender, "DIRECT_BYTES_CPU", 4096)
        real = colocated_receiver.ColocatedReceiver.direct

        def counted(self, *args):
            views = real(self, *args)
            read_in_place.append(len(views or ()))
            return views

        monkeypatch.setattr(colocated_receiver.ColocatedReceiver, "direct", counted)
    updates = 4
    params = torch.nn.ParameterDict({
        **{f"big{i}": torch.nn.Parameter(torch.randn(32, 40 + 8 * i)) for i in range(4)},  # 5 KiB and more
        **{f"small{i}": torch.nn.Parameter(torch.randn(3, 5 + i)) for i in range(4)},
    })  # fmt: skip
    for p in params.values():
        p.share_memory_()
    sent: list[dict] = []

    def source(u: int):
        with torch.no_grad():
            for p in params.values():
                p.mul_(1.5).add_(1.0)
        sent.append({n: p.detach().clone() for n, p in params.items()})
        return params.named_parameters()

    def mangling(store: dict):
        def load(batch):
            for name, t in batch:
                assert not t.requires_grad, name
                store[name] = t.clone()
                _mangle(name, t)

        return load

    got = _send_and_collect(updates, source, BUF, mangling)
    assert sum(read_in_place) >= (8 if direct else 0), read_in_place  # updates 1-3 read big0..3 in place
    for u in range(updates):
        assert list(got[u]) == list(sent[u]), u
        for name, want in sent[u].items():
            assert got[u][name].shape == want.shape and bytes_equal(got[u][name], want), (u, name)


def test_each_colocated_update_logs_one_debug_line_per_rank(caplog):
    """Colocated updates log as broadcast ones do: one DEBUG line per update and rank naming the
    update, its tensors, bytes, seconds and GB/s, marked colocated."""
    import logging

    caplog.set_level(logging.DEBUG, logger="torchxfer")
    sent = [("a", torch.arange(6, dtype=torch.float32)), ("b", torch.ones(3, 5, dtype=torch.bfloat16))]
    got = _send_and_collect(2, lambda u: sent, BUF)
    assert all(_same(store, sent) for store in got)
    line = r"update (\d+) \(colocated\): 2 tensors, %d bytes in [0-9.]+ s \([0-9.]+ GB/s\)" % (6 * 4 + 15 * 2)
    for verb in ("sent", "received"):
        ids = [m.group(1) for r in caplog.records if r.name == "torchxfer" and r.levelno == logging.DEBUG
               for m in [re.match(verb + " " + line, r.getMessage())] if m]  # fmt: skip
        assert ids == ["0", "1"], (verb, [r.getMessage() for r in caplog.records])


def test_a_worker_that_answers_slowly_and_never_releases_is_bounded_by_one_timeout(monkeypatch):
    """Rank 2 answers every row (fast at first) but, once the trainer waits for a buffer, only
    just inside timeout_s each time, and never releases one: the trainer's wait for that buffer
    still ends within timeout_s (each row's wait bounded by what is left of it; it took about
    2.5 x timeout_s), with TransferError naming the bucket."""
    from torchxfer import colocated_receiver, colocated_sender

    timeout = 1.5
    real_row, real_acquire = colocated_receiver.ColocatedReceiver.row, colocated_sender.ColocatedSender.acquire
    acquired: list[float] = []

    def slow(self):
        words = real_row(self)
        if self.group.rank() == 2:
            words[6] = 0  # args[4]: buckets released
            if len(getattr(getattr(self, "layout", None), "buckets", [])) >= 2:  # the scenario: a slow worker
                time.sleep(0.8 * timeout)
        return words

    def timed(self, k):
        start = time.monotonic()
        try:
            return real_acquire(self, k)
        finally:
            acquired.append(time.monotonic() - start)

    monkeypatch.setattr(colocated_receiver.ColocatedReceiver, "row", slow)
    monkeypatch.setattr(colocated_sender.ColocatedSender, "acquire", timed)
    model = [(f"w{i}", torch.full((250,), float(i))) for i in range(6)]  # one 1000-byte tensor per 1 KiB bucket

    def body(rank: int, port: int):
        if rank == 0:
            pg = _trainer(port, 3, timeout=timeout)
            try:
                with pytest.raises(TransferError) as info:
                    IPCWeightTransferEngine.trainer_send_weights(model, pg, packed_buffer_size_bytes=1024,
                                                                 packed_num_buffers=2)  # fmt: skip
                return str(info.value)
            finally:
                destroy_side_group(pg)
        engine = _worker(rank, port, 3, timeout=timeout)
        try:
            with pytest.raises(TransferError):
                engine.receive_weights(None, _collect({}))
            return None
        finally:
            engine.shutdown()

    message = run_world(body, 3, deadline_s=60)[0]
    assert "did not release bucket 0" in message, message
    assert acquired and max(acquired) < timeout + 0.5, acquired
