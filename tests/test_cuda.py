"""CUDA tensors through the side group: stream and event logic on a real GPU.

Trainer and workers share one GPU over Gloo (NCCL refuses two ranks on one
GPU), which still runs every CUDA path: per-buffer streams, record_stream on
sources, the receive stream waiting for earlier readers, buffer reuse. Skipped
without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import ADDR, digest, free_port, run_processes

pytestmark = [pytest.mark.process, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WORLD = 3
UPDATES = 20


def _tensors(step: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234 + step)
    base = [
        ("emb", torch.randn(300, 64, generator=gen)),
        ("scalar", torch.randn((), generator=gen)),
        ("empty", torch.randn(0, 7, generator=gen)),
        ("big", torch.randn(70_000, generator=gen)),  # larger than a 64 KiB buffer: split
        ("strided", torch.randn(40, 30, generator=gen)[::3, 1::2]),
        ("t", torch.randn(33, 17, generator=gen).t()),
        ("mask", torch.rand(257, generator=gen) > 0.5),
        ("ids", torch.randint(-(2**40), 2**40, (129,), generator=gen)),
        ("bytes", torch.randint(0, 256, (1000,), generator=gen, dtype=torch.uint8)),
        ("half", torch.randn(99, generator=gen).half()),
        ("bf16", torch.randn(5, 13, generator=gen).bfloat16()),
        ("f64", torch.randn(31, generator=gen).double()),
        ("f8", torch.randn(77, generator=gen).to(torch.float8_e4m3fn)),
    ]
    # Fresh CUDA tensors every step: the caller drops them while copies may still run.
    return [(n, t.cuda()) for n, t in base]


_digest = digest


def _expected() -> list[list[tuple[str, str, str, tuple]]]:
    return [[(n, _digest(t), str(t.dtype), tuple(t.shape)) for n, t in _tensors(s)] for s in range(UPDATES)]


def _rank(rank: int, port: int) -> object:
    from torchxfer import (
        NCCLWeightTransferEngine,
        NCCLWeightTransferInitInfo,
        NCCLWeightTransferUpdateInfo,
        ParallelConfig,
        WeightTransferConfig,
        destroy_side_group,
    )

    torch.cuda.set_device(0)
    modes = [dict(packed=True, packed_buffer_size_bytes=64 << 10, packed_num_buffers=n) for n in (2, 3)]
    modes.append(dict(packed=False))
    if rank == 0:
        group = NCCLWeightTransferEngine.trainer_init(
            dict(master_address=ADDR, master_port=port, world_size=WORLD), backend="gloo", timeout_s=30
        )
        for step in range(UPDATES):
            mode = modes[step % len(modes)]
            NCCLWeightTransferEngine.trainer_send_weights(iter(_tensors(step)), group, checksum=step % 2 == 0, **mode)
        destroy_side_group(group)
        return None
    engine = NCCLWeightTransferEngine(
        WeightTransferConfig(backend="gloo", timeout_s=30, device="cuda"), ParallelConfig(rank=rank - 1, tensor_parallel_size=2)
    )
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, WORLD))
    received, memory, wrong = [], [], []
    for step in range(UPDATES):
        mode = modes[step % len(modes)]
        info = None
        if step % 4 == 1:
            info = NCCLWeightTransferUpdateInfo.from_named_tensors(_tensors(step), **mode)
        got: list = []
        want = {n: t.cpu() for n, t in _tensors(step)}

        def load(batch: list) -> None:
            for name, view in batch:
                assert view.is_cuda
                # Read on the current stream, as a model's copy_ would.
                got.append((name, _digest(view), str(view.dtype), tuple(view.shape)))
                if got[-1][1] != _digest(want[name]):  # where the bytes differ, for the report
                    a = view.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                    b = want[name].contiguous().reshape(-1).view(torch.uint8)
                    bad = (a != b).nonzero().flatten().tolist() if a.numel() == b.numel() else [-1]
                    wrong.append((step, name, len(bad), bad[:1], bad[-1:], a.numel()))

        engine.receive_weights(info, load, atomic=step % 5 == 4)
        received.append(got)
        torch.cuda.synchronize()
        memory.append(torch.cuda.memory_allocated())
    engine.shutdown()
    return received, memory, wrong


def test_cuda_tensors_over_gloo_bit_exact_and_memory_flat():
    port = free_port()
    outcomes = run_processes(_rank, WORLD, port, deadline_s=240)
    expected = _expected()
    for rank, out in enumerate(outcomes[1:], 1):
        received, memory, wrong = out.value
        # (step, name, bytes wrong, first, last, size) for each tensor that arrived wrong
        assert not wrong, f"rank {rank}: {wrong}"
        assert received == expected
        # Steady state: once every mode has run (3 updates), memory never moves.
        assert len(set(memory[3:])) == 1, memory


def _nccl_single(rank: int, port: int) -> object:
    import torch.distributed as dist

    from torchxfer import NCCLWeightTransferEngine, destroy_side_group

    torch.cuda.set_device(0)
    group = NCCLWeightTransferEngine.trainer_init(
        dict(master_address=ADDR, master_port=port, world_size=1), backend="nccl", timeout_s=30
    )
    t = torch.arange(8, device="cuda", dtype=torch.float32)
    dist.broadcast(t, group=group, group_src=0)
    dist.all_reduce(t, group=group)
    stats = [
        NCCLWeightTransferEngine.trainer_send_weights(iter(_tensors(s)), group, packed=s % 2 == 0, checksum=True,
                                                      packed_buffer_size_bytes=64 << 10)  # fmt: skip
        for s in range(4)
    ]
    destroy_side_group(group)
    return t.tolist(), [s.num_tensors for s in stats]


def test_nccl_side_group_of_one_rank_runs_the_whole_sender_path():
    """NCCL backend construction, CUDA control tensors, polled waits, packing streams."""
    outcomes = run_processes(_nccl_single, 1, free_port(), deadline_s=120)
    values, counts = outcomes[0].value
    assert values == [float(i) for i in range(8)]
    assert counts == [len(_tensors(0))] * 4


def _nccl_same_gpu(rank: int, port: int) -> object:
    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig

    torch.cuda.set_device(0)
    if rank == 0:
        return NCCLWeightTransferEngine.trainer_init(
            dict(master_address=ADDR, master_port=port, world_size=2), backend="nccl", timeout_s=20
        )
    engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="nccl", timeout_s=20), ParallelConfig())
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))


def test_two_nccl_ranks_on_one_gpu_fail_before_nccl_starts():
    from torchxfer import TransferError  # noqa: F401

    outcomes = run_processes(_nccl_same_gpu, 2, free_port(), deadline_s=120, expect_ok=False)
    for out in outcomes:
        assert not out.ok
        assert "TransferError" in out.tb and "same GPU" in out.tb, out.tb
