"""Misuse and hostile input at the edges of the engines: checks made before anything moves.

Thread tier: ranks are threads of this process (``tests.harness.run_world``); every wait is
bounded by the library's ``timeout_s`` (a few seconds) < the harness deadline.
"""

from __future__ import annotations

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

    def body(rank: int, port: int):
        if rank == 0:
            group = _ipc_trainer(port, 2)
            try:
                with pytest.raises(ValueError, match="IPCWeightTransferEngine.trainer_send_weights"):
                    NCCLWeightTransferEngine.trainer_send_weights(iter(weights), group, packed=True,
                                                                  packed_buffer_size_bytes=1 << 16)  # fmt: skip
                IPCWeightTransferEngine.trainer_send_weights(iter(weights), group, packed_buffer_size_bytes=1 << 16)
            finally:
                destroy_side_group(group)
            return None
        engine = _ipc_worker(rank, port, 2)
        got: dict = {}
        try:
            engine.receive_weights(None, lambda batch: got.update((n, t.clone()) for n, t in batch))
        finally:
            engine.shutdown()
        return got

    got = run_world(body, 2, deadline_s=60)[1]
    assert list(got) == ["w", "b"] and all(bytes_equal(got[n], t) for n, t in weights), got


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


@pytest.mark.parametrize("bad", [None, "group", 3])
def test_destroying_what_is_not_a_process_group_is_a_value_error(bad):
    """A trainer rank that holds no side group (None) used to get the weak-reference
    TypeError of the group registry."""
    from torchxfer import side_group

    with pytest.raises(ValueError, match=f"expects a side group made by torchxfer .* got {type(bad).__name__}"):
        destroy_side_group(bad)
    with pytest.raises(ValueError, match="expected a side group made by torchxfer"):
        side_group(bad)
