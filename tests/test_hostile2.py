"""Misuse and hostile input at the edges of the engines: checks made before anything moves.

Thread tier: ranks are threads of this process (``tests.harness.run_world``); every wait is
bounded by the library's ``timeout_s`` (a few seconds) < the harness deadline.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.harness import ADDR, bytes_equal, run_world
from torchxfer import (
    IPCWeightTransferEngine,
    IPCWeightTransferInitInfo,
    NCCLWeightTransferEngine,
    ParallelConfig,
    WeightTransferConfig,
    create_engine,
    destroy_side_group,
)

TIMEOUT = 3.0


def _ipc_trainer(port: int, world: int):
    return IPCWeightTransferEngine.trainer_init(
        dict(master_address=ADDR, master_port=port, world_size=world), timeout_s=TIMEOUT, device="cpu"
    )


def _ipc_worker(rank: int, port: int, world: int):
    engine = create_engine(WeightTransferConfig(backend="ipc", timeout_s=TIMEOUT, device="cpu"),
                           ParallelConfig(data_parallel_rank=rank - 1, data_parallel_size=world - 1))  # fmt: skip
    engine.init_transfer_engine(IPCWeightTransferInitInfo(ADDR, port, 1, world))
    return engine


def test_a_broadcast_send_on_a_colocated_group_is_a_value_error_and_the_group_stays_usable():
    """The NCCL engine's trainer_send_weights handed a colocated group raises ValueError naming
    the colocated send before any row; the same group then carries the update it should."""
    weights = [("w", torch.arange(12.0).reshape(3, 4)), ("b", torch.arange(5, dtype=torch.int64))]

    def refused(group: object) -> None:
        with pytest.raises(ValueError, match="IPCWeightTransferEngine.trainer_send_weights"):
            NCCLWeightTransferEngine.trainer_send_weights(iter(weights), group, packed=True,
                                                          packed_buffer_size_bytes=1 << 16)  # fmt: skip

    got = _refused_then_sent(weights, refused)
    assert list(got) == ["w", "b"] and all(bytes_equal(got[n], t) for n, t in weights), got


def _refused_then_sent(weights: list, refused, colocated: bool = True) -> dict:
    """A trainer (colocated, or Gloo) and one worker: ``refused(group)`` on the trainer (it checks
    its own refusal), then a good send of ``weights``; what the worker received, by name."""
    from tests.harness import gloo_trainer, gloo_worker

    engine_cls = IPCWeightTransferEngine if colocated else NCCLWeightTransferEngine

    def body(rank: int, port: int):
        if rank == 0:
            group = _ipc_trainer(port, 2) if colocated else gloo_trainer(port, 2, timeout=TIMEOUT)
            try:
                refused(group)
                engine_cls.trainer_send_weights(iter(weights), group, packed_buffer_size_bytes=1 << 16)
            finally:
                destroy_side_group(group)
            return None
        engine = _ipc_worker(rank, port, 2) if colocated else gloo_worker(rank, port, 2, timeout=TIMEOUT)
        got: dict = {}
        try:
            engine.receive_weights(None, lambda batch: got.update((n, t.clone()) for n, t in batch))
        finally:
            engine.shutdown()
        return got

    return run_world(body, 2, deadline_s=60)[1]


@pytest.mark.parametrize("engine_kind", ["gloo", "ipc"])
def test_atomic_that_is_not_a_bool_is_a_value_error_before_any_row(engine_kind):
    """``atomic`` travels in the worker's rows: a non-bool one raised int()'s own ValueError or
    TypeError (after bucket 0 was posted ahead, in a cached layout). It is refused before anything
    is posted, naming the value, and the worker's next receive takes the update."""
    from tests.harness import gloo_trainer, gloo_worker

    weights = [("w", torch.arange(8.0))]

    def body(rank: int, port: int):
        if rank == 0:
            group = _ipc_trainer(port, 2) if engine_kind == "ipc" else gloo_trainer(port, 2, timeout=TIMEOUT)
            engine = IPCWeightTransferEngine if engine_kind == "ipc" else NCCLWeightTransferEngine
            try:
                for _ in range(2):  # the second update is announced as the cached layout
                    engine.trainer_send_weights(iter(weights), group, packed_buffer_size_bytes=1 << 16)
            finally:
                destroy_side_group(group)
            return None
        engine = _ipc_worker(rank, port, 2) if engine_kind == "ipc" else gloo_worker(rank, port, 2, timeout=TIMEOUT)
        refused, got = [], []
        try:
            for _ in range(2):
                for bad in ("yes", None, 1):
                    with pytest.raises(ValueError, match=f"atomic must be a bool, got {bad!r}"):
                        engine.receive_weights(None, lambda batch: None, atomic=bad)
                    refused.append(bad)
                engine.receive_weights(None, lambda batch: got.extend((n, t.clone()) for n, t in batch), atomic=True)
        finally:
            engine.shutdown()
        return refused, got

    refused, got = run_world(body, 2, deadline_s=60)[1]
    assert refused == ["yes", None, 1] * 2
    assert [n for n, _ in got] == ["w", "w"] and all(bytes_equal(t, weights[0][1]) for _, t in got)


@pytest.mark.parametrize("bad", [None, "group", 3, torch.zeros(1), torch.nn.Linear(1, 1), lambda: 0],
                         ids=["None", "str", "int", "tensor", "module", "lambda"])  # fmt: skip
def test_destroying_what_is_not_a_process_group_is_a_value_error(bad):
    """A trainer rank that holds no side group (None) used to get the weak-reference
    TypeError of the group registry."""
    from torchxfer import side_group

    with pytest.raises(ValueError, match=f"expects a side group made by torchxfer .* got {type(bad).__name__}"):
        destroy_side_group(bad)
    with pytest.raises(ValueError, match="expected a side group made by torchxfer"):
        side_group(bad)


# -- bad values at the public API: ValueError naming them, before anything moves ---------------


@pytest.mark.parametrize("config, offset", [("x", 1), (None, 1), (ParallelConfig(), "1"), (ParallelConfig(), -5),
                                            (ParallelConfig(), 0), (ParallelConfig(), 1.5), (ParallelConfig(), True)])
def test_worker_rank_refuses_what_is_not_a_config_and_an_offset(config, offset):
    from torchxfer import worker_rank

    with pytest.raises(ValueError, match="worker_rank"):
        worker_rank(config, offset)
    assert worker_rank(ParallelConfig(data_parallel_rank=1, data_parallel_size=2), 3) == 4


@pytest.mark.parametrize("bad", ["x", 5, object()], ids=["str", "int", "object"])
def test_send_model_refuses_a_trainer_group_that_is_not_a_process_group(bad):
    from torchxfer import send_model

    with pytest.raises(ValueError, match="trainer_group must be a torch.distributed ProcessGroup"):
        send_model(torch.nn.Linear(2, 2), None, trainer_group=bad)


def _nested() -> torch.Tensor:
    return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def test_a_nested_tensor_is_refused_as_not_dense_everywhere_it_is_planned():
    from torchxfer import ModuleLoader, NCCLWeightTransferUpdateInfo, iter_named_tensors, update_info_for

    for call in (lambda: update_info_for([("a", _nested())]), lambda: iter_named_tensors([("a", _nested())]),
                 lambda: NCCLWeightTransferUpdateInfo.from_named_tensors([("a", _nested())])):  # fmt: skip
        with pytest.raises(ValueError, match="'a': only dense tensors can be sent, got a nested tensor"):
            call()
    module = torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match="'weight': only dense tensors with data can be loaded, got a nested"):
        ModuleLoader(module)([("weight", _nested())])


def test_iter_named_tensors_refuses_an_include_buffers_that_is_not_a_bool():
    from torchxfer import iter_named_tensors

    for bad in ("no", None, 1):
        with pytest.raises(ValueError, match=f"include_buffers must be a bool, got {bad!r}"):
            iter_named_tensors(torch.nn.BatchNorm1d(2), include_buffers=bad)


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_module_loader_refuses_a_sparse_or_meta_tensor_and_loads_nothing_of_its_batch(kind):
    """All or nothing: the batch check names the tensor, and the module's other tensors of the
    batch keep their values (they used to be copied before the copy of that one failed)."""
    from torchxfer import ModuleLoader

    module = torch.nn.Linear(2, 3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loader = ModuleLoader(module)
    weight = torch.ones(3, 2).to_sparse() if kind == "sparse" else torch.ones(3, 2, device="meta")
    for _ in range(2):  # and the same again, with a layout of these names seen before
        with pytest.raises(ValueError, match="'weight': only dense tensors with data can be loaded"):
            loader([("bias", torch.ones(3)), ("weight", weight)])
        loader([("bias", torch.full((3,), 2.0)), ("weight", torch.full((3, 2), 2.0))])
        loader.reset()
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in module.parameters())
    assert not torch.equal(before["bias"], module.bias)


def test_module_loader_refuses_a_triple_after_a_batch_of_the_same_names():
    from torchxfer import ModuleLoader

    module = torch.nn.Linear(2, 3)
    loader = ModuleLoader(module)
    good = [("weight", torch.ones(3, 2)), ("bias", torch.ones(3))]
    bad = [("weight", torch.zeros(3, 2), "junk"), ("bias", torch.zeros(3))]
    with pytest.raises(ValueError, match="item 0 is tuple"):
        loader(bad)
    loader(good)
    loader.reset()
    with pytest.raises(ValueError, match="item 0 is tuple"):
        loader(bad)
    assert torch.equal(module.bias, torch.ones(3))


def test_create_side_group_refuses_an_address_the_resolver_cannot_encode():
    from torchxfer import create_side_group

    for bad in (" 127.0.0.1 ", "\ud800", "a" * 300, "a..b", ""):
        with pytest.raises(ValueError, match="address must be a non-empty string, got .* the resolver can encode"):
            create_side_group(bad, 1, 0, 2, backend="gloo", timeout_s=1)


def test_update_info_fields_assigned_after_construction_are_checked_again():
    """receive_weights and ModuleLoader.check take the dataclass as it is now: a field assigned
    since construction is validated again (ValueError naming it) and its tensors listed anew, and
    a receiver that checked a layout against the object checks it again (``revision``)."""
    from torchxfer import ModuleLoader, NCCLWeightTransferUpdateInfo

    info = NCCLWeightTransferUpdateInfo(["w"], ["float32"], [[4]])
    assert info.revision == 0 and [s.name for s in info.specs] == ["w"]
    info.names, info.dtype_names, info.shapes = ["other"], ["int64"], [[99]]
    assert info.revision == 3 and [(s.name, s.dtype, s.shape) for s in info.specs] == [("other", torch.int64, (99,))]
    info.packed = "yes"
    with pytest.raises(ValueError, match="packed must be a bool, got 'yes'"):
        NCCLWeightTransferEngine.parse_update_info(info)
    info.packed = False
    info.shapes = [5]
    with pytest.raises(ValueError, match="shape"):
        ModuleLoader(torch.nn.Linear(2, 2)).check(info)


def test_update_info_checked_against_a_layout_then_changed_is_checked_again():
    """A worker checks its cached layout against an update_info once; the same object with other
    names assigned since must not pass as checked: the update fails on every rank, nothing loads."""
    from tests.harness import gloo_trainer, gloo_worker
    from torchxfer import NCCLWeightTransferUpdateInfo, TransferError

    weights = [("w", torch.arange(4.0))]

    def body(rank: int, port: int):
        if rank == 0:
            group = gloo_trainer(port, 2, timeout=TIMEOUT)
            try:
                NCCLWeightTransferEngine.trainer_send_weights(iter(weights), group)
                with pytest.raises(TransferError):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(weights), group)
            finally:
                destroy_side_group(group)
            return None
        engine = gloo_worker(rank, port, 2, timeout=TIMEOUT)
        info = NCCLWeightTransferUpdateInfo(["w"], ["float32"], [[4]])
        got: list = []
        try:
            engine.receive_weights(info, lambda batch: got.extend(n for n, _ in batch))
            info.names, info.shapes = ["other"], [[99]]
            with pytest.raises(TransferError, match="other"):
                engine.receive_weights(info, lambda batch: got.extend(n for n, _ in batch))
        finally:
            engine.shutdown()
        return got

    assert run_world(body, 2, deadline_s=60)[1] == ["w"]


def test_small_public_types_refuse_bad_values():
    from torchxfer import NCCLWeightTransferUpdateInfo, TransferStats

    for bad in (5, None, "ab", ["ab"], {"w": torch.ones(1)}):
        with pytest.raises(ValueError, match="from_named_tensors"):
            NCCLWeightTransferUpdateInfo.from_named_tensors(bad)
    for args in ((0, 0, 1, "x"), (-1, 0, 1, 1.0), (0, 0, 1, -1.0), (0, 0.5, 1, 1.0), (0, 0, 1, float("nan"))):
        with pytest.raises(ValueError, match="TransferStats"):
            TransferStats(*args)
    assert TransferStats(3, 2, 2_000_000_000, 1.0).gb_per_s == 2.0


def test_a_source_whose_len_overflows_is_a_value_error_before_any_row():
    class Huge:
        def __iter__(self):
            return iter([("w", torch.ones(2))])

        def __len__(self):
            return 1 << 70

    def refused(group: object) -> None:
        with pytest.raises(ValueError, match="len"):
            NCCLWeightTransferEngine.trainer_send_weights(Huge(), group)

    got = _refused_then_sent([("w", torch.ones(2))], refused, colocated=False)
    assert list(got) == ["w"] and bytes_equal(got["w"], torch.ones(2))


def test_colocated_buffers_the_host_cannot_map_are_a_transfer_error_and_the_group_stays_usable():
    from torchxfer import TransferError

    weights = [("w", torch.arange(8.0))]

    def refused(group: object) -> None:
        with pytest.raises(TransferError, match="cannot allocate 2 shared buffers of 4611686018427387904"):
            IPCWeightTransferEngine.trainer_send_weights(iter(weights), group, packed_buffer_size_bytes=1 << 62)

    got = _refused_then_sent(weights, refused)
    assert list(got) == ["w"] and bytes_equal(got["w"], weights[0][1])


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_a_server_switches_engines_by_its_config_alone(backend):
    """The same server code, the same ``NCCLWeightTransferInitInfo`` (with a token) and trainer
    dict (the workers' own, ``rank_offset`` 0 or 1, ignored by the trainer): only
    ``WeightTransferConfig.backend`` differs, and the update arrives bit-exact either way."""
    from torchxfer import NCCLWeightTransferInitInfo

    weights = [("w", torch.arange(12.0).reshape(3, 4)), ("b", torch.arange(5, dtype=torch.int64))]
    colocated = backend == "ipc"
    engine_cls = IPCWeightTransferEngine if colocated else NCCLWeightTransferEngine

    def body(rank: int, port: int) -> Any:
        shared = dict(master_address=ADDR, master_port=port, world_size=2, token="s3cret")
        if rank == 0:
            extra = {"device": "cpu"} if colocated else {"backend": "gloo"}
            group = engine_cls.trainer_init({**shared, "rank_offset": 0}, timeout_s=TIMEOUT, **extra)
            try:
                kwargs = {} if colocated else {"packed": True}
                engine_cls.trainer_send_weights(iter(weights), group, **kwargs)
            finally:
                destroy_side_group(group)
            return None
        engine = create_engine(WeightTransferConfig(backend=backend, timeout_s=TIMEOUT, device="cpu"), ParallelConfig())
        try:
            engine.init_transfer_engine(NCCLWeightTransferInitInfo(rank_offset=1, **shared))
            got: list = []
            engine.receive_weights(None, lambda batch: got.extend((n, t.clone()) for n, t in batch))
            return type(engine).__name__, got
        finally:
            engine.shutdown()

    name, got = run_world(body, 2, deadline_s=60)[1]
    assert name == engine_cls.__name__
    assert [(n, t.dtype, t.tolist()) for n, t in got] == [(n, t.dtype, t.tolist()) for n, t in weights]


def test_a_peers_error_text_reaches_messages_and_logs_on_one_line_without_control_characters(caplog):
    """A worker's load_weights raises with a newline and a terminal escape in its message (or a
    hostile worker sends such text): every rank raises the same TransferError with them escaped,
    and the WARNING lines carry no raw control character."""
    import logging

    from torchxfer import TransferError

    caplog.set_level(logging.WARNING, logger="torchxfer")
    weights = [("w", torch.arange(6.0))]

    def body(rank: int, port: int) -> Any:
        if rank == 0:
            group = NCCLWeightTransferEngine.trainer_init(dict(master_address=ADDR, master_port=port, world_size=2),
                                                          backend="gloo", timeout_s=TIMEOUT)  # fmt: skip
            try:
                with pytest.raises(TransferError) as err:
                    NCCLWeightTransferEngine.trainer_send_weights(iter(weights), group, packed=True)
                return str(err.value)
            finally:
                destroy_side_group(group)
        engine = create_engine(WeightTransferConfig(backend="gloo", timeout_s=TIMEOUT), ParallelConfig())
        from torchxfer import NCCLWeightTransferInitInfo

        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))
        try:
            def load(batch: Any) -> None:
                raise RuntimeError("line one\nforged: update 7 loaded\x1b[2K\x07")

            with pytest.raises(TransferError) as err:
                engine.receive_weights(None, load)
            return str(err.value)
        finally:
            engine.shutdown()

    trainer_msg, worker_msg = run_world(body, 2, deadline_s=60)
    for message in (trainer_msg, worker_msg):
        assert "line one\\nforged: update 7 loaded\\x1b[2K\\x07" in message, message
        assert message.isprintable(), message
    assert trainer_msg == worker_msg
    for record in caplog.records:
        assert record.getMessage().isprintable(), record.getMessage()
