"""Soak: 100 updates over one group with random layouts and configurations, each bit-exact."""

from __future__ import annotations

import random

import torch

from tests.harness import ADDR, digest, free_port, run_threads
from torchxfer import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
    ParallelConfig,
    WeightTransferConfig,
    destroy_side_group,
)

UPDATES = 100
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool,
          torch.float8_e4m3fn, torch.int32]  # fmt: skip


def _plan(step: int) -> tuple[dict, list[tuple[str, torch.Tensor]], bool, bool]:
    rng = random.Random(step)
    gen = torch.Generator().manual_seed(step)
    tensors = []
    for i in range(rng.randint(1, 24)):
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.choice([0, 1, 2, 3, 7, 16, 33, 130]) for _ in range(rng.randint(0, 3)))
        base = torch.randn(shape, generator=gen) * 50
        if dtype == torch.bool:
            t = base > 0
        elif dtype in (torch.int64, torch.int32, torch.uint8):
            t = base.abs().to(dtype)
        else:
            t = base.to(dtype)
        if t.dim() == 2 and rng.random() < 0.3:
            t = t.t()  # non-contiguous
        tensors.append((f"s{step}.t{i}", t))
    packed = rng.random() < 0.8
    mode = {"packed": packed}
    if packed:
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        # Small buffers split tensors; the floor keeps each update to a few dozen buckets.
        size = max(rng.choice([16, 48, 256, 4096, 1 << 20]), total // 32)
        mode.update(packed_buffer_size_bytes=size, packed_num_buffers=rng.randint(1, 3))
    return mode, tensors, rng.random() < 0.5, rng.random() < 0.2


def test_100_random_updates_bit_exact():
    port = free_port()
    world = 3

    def body(rank: int) -> object:
        if rank == 0:
            group = NCCLWeightTransferEngine.trainer_init(
                dict(master_address=ADDR, master_port=port, world_size=world), backend="gloo", timeout_s=10
            )
            for step in range(UPDATES):
                mode, tensors, _, _ = _plan(step)
                source = iter(tensors) if step % 2 else list(tensors)
                NCCLWeightTransferEngine.trainer_send_weights(source, group, checksum=step % 3 == 0, **mode)
            destroy_side_group(group)
            return None
        engine = NCCLWeightTransferEngine(
            WeightTransferConfig(backend="gloo", timeout_s=10), ParallelConfig(rank=rank - 1, tensor_parallel_size=2)
        )
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, world))
        mismatches = []
        for step in range(UPDATES):
            mode, tensors, out_of_band, atomic = _plan(step)
            info = NCCLWeightTransferUpdateInfo.from_named_tensors(tensors, **mode) if out_of_band else None
            got: list = []
            engine.receive_weights(info, lambda b: got.extend((n, digest(t), t.dtype, tuple(t.shape)) for n, t in b),
                                   atomic=atomic)  # fmt: skip
            want = [(n, digest(t), t.dtype, tuple(t.shape)) for n, t in tensors]
            if got != want:
                mismatches.append(step)
        version = engine.weights_version
        engine.shutdown()
        return mismatches, version

    outcomes = run_threads(body, world, deadline_s=120)
    for out in outcomes[1:]:
        assert out.value == ([], UPDATES - 1)


def test_direct_sends_of_large_tensors_interleaved_with_packed_ones():
    """Large contiguous tensors go straight from their memory, small ones through
    the buffer, non-contiguous large ones are packed; all land bit-exact."""
    port = free_port()
    gen = torch.Generator().manual_seed(99)
    tensors = [
        ("small0", torch.randn(10, generator=gen)),
        ("big0", torch.randn(300_000, generator=gen)),  # 1.2 MB: direct
        ("small1", torch.randn(3, 3, generator=gen).bfloat16()),
        ("big_t", torch.randn(700, 600, generator=gen).t()),  # non-contiguous: packed
        ("big1", torch.randn(400_000, generator=gen).double()),  # 3.2 MB: direct
        ("huge", torch.randn(3_000_000, generator=gen)),  # 12 MB > buffer: split
        ("small2", torch.randint(0, 9, (5,), generator=gen)),
    ]
    want = [(n, digest(t), t.dtype, tuple(t.shape)) for n, t in tensors]

    def body(rank: int) -> object:
        if rank == 0:
            group = NCCLWeightTransferEngine.trainer_init(
                dict(master_address=ADDR, master_port=port, world_size=3), backend="gloo", timeout_s=10
            )
            for nb in (1, 2, 3):
                NCCLWeightTransferEngine.trainer_send_weights(
                    iter(tensors), group, packed=True, packed_buffer_size_bytes=8 << 20, packed_num_buffers=nb
                )
            destroy_side_group(group)
            return None
        engine = NCCLWeightTransferEngine(
            WeightTransferConfig(backend="gloo", timeout_s=10), ParallelConfig(rank=rank - 1, tensor_parallel_size=2)
        )
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 3))
        results = []
        for nb in (1, 2, 3):
            info = NCCLWeightTransferUpdateInfo.from_named_tensors(
                tensors, packed=True, packed_buffer_size_bytes=8 << 20, packed_num_buffers=nb
            ) if nb == 2 else None  # fmt: skip
            got: list = []
            engine.receive_weights(info, lambda b: got.extend((n, digest(t), t.dtype, tuple(t.shape)) for n, t in b))
            results.append(got)
        engine.shutdown()
        return results

    outcomes = run_threads(body, 3, deadline_s=60)
    for out in outcomes[1:]:
        assert out.value == [want, want, want]


def test_trainer_chosen_versions_reach_weights_version():
    port = free_port()
    gen = torch.Generator().manual_seed(5)
    tensors = [("w", torch.randn(8, generator=gen))]

    def body(rank: int) -> object:
        if rank == 0:
            group = NCCLWeightTransferEngine.trainer_init(
                dict(master_address=ADDR, master_port=port, world_size=2), backend="gloo", timeout_s=10
            )
            import pytest

            with pytest.raises(ValueError, match="version"):
                NCCLWeightTransferEngine.trainer_send_weights(iter(tensors), group, version=-1)
            ids = [NCCLWeightTransferEngine.trainer_send_weights(iter(tensors), group, packed=True, version=v).update_id
                   for v in (100, 250)]  # fmt: skip
            ids.append(NCCLWeightTransferEngine.trainer_send_weights(iter(tensors), group, packed=True).update_id)
            destroy_side_group(group)
            return ids
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=10), ParallelConfig())
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))
        versions = []
        for _ in range(3):
            engine.receive_weights(None, lambda b: None)
            versions.append(engine.weights_version)
        engine.shutdown()
        return versions

    outcomes = run_threads(body, 2, deadline_s=60)
    assert outcomes[0].value == [100, 250, 251]
    assert outcomes[1].value == [100, 250, 251]
