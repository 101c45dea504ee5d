"""DTensor-sharded trainers: two trainer ranks gather lazily, one sends, workers load bit-exact."""

from __future__ import annotations

import datetime
import weakref

import pytest
import torch

from tests.harness import ADDR, digest, free_port, run_processes

pytestmark = pytest.mark.process

SHAPES = {"embed.weight": (64, 32), "layers.0.w": (48, 32), "layers.0.b": (48,), "layers.1.w": (32, 48), "norm.weight": (32,)}
BUF = 4096


def _full(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def _expected(seed: int) -> dict[str, str]:
    return {_rename(n): digest(t.bfloat16()) for n, t in _full(seed).items()}


def _rename(name: str) -> str:
    """The server's own (flat) parameter names."""
    return "served_" + name.replace(".", "_")


def _body(rank: int, side_port: int, trainer_port: int, misordered: bool) -> object:
    import torch.distributed as dist
    from torch import nn

    from torchxfer import (
        ModuleLoader,
        NCCLWeightTransferEngine,
        NCCLWeightTransferInitInfo,
        ParallelConfig,
        TransferError,
        WeightTransferConfig,
        destroy_side_group,
        send_model,
        side_group,
    )

    if rank >= 2:  # workers 1, 2 of the side group: a plain bf16 module under the server's names
        served = nn.Module()
        for name, shape in SHAPES.items():
            served.register_parameter(_rename(name), nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16)))
        engine = NCCLWeightTransferEngine(
            WeightTransferConfig(backend="gloo", timeout_s=8), ParallelConfig(rank=rank - 2, tensor_parallel_size=2)
        )
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, side_port, 1, 3))
        loader = ModuleLoader(served)
        results = []
        for _ in range(2):
            try:
                engine.receive_weights(None, loader)
                loader.finish()
                results.append({n: digest(t) for n, t in served.named_parameters()})
            except TransferError as e:
                results.append(str(e))
                break
        engine.shutdown()
        return results

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR}:{trainer_port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=8))  # fmt: skip
    mesh = init_device_mesh("cpu", (2,))
    outcome: dict = {}
    try:
        group = None
        if rank == 0:
            group = NCCLWeightTransferEngine.trainer_init(
                dict(master_address=ADDR, master_port=side_port, world_size=3), backend="gloo", timeout_s=8
            )
        for step in range(2):
            sharded = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in _full(step).items()}
            if misordered and rank == 1:
                sharded = dict(reversed(list(sharded.items())))
            # Track every full tensor the gathers make: how many bytes are alive at once.
            live, peak = [0], [0]
            real = type(next(iter(sharded.values()))).full_tensor

            def tracked(self, *a, **k):
                out = real(self, *a, **k)
                live[0] += out.numel() * out.element_size()
                peak[0] = max(peak[0], live[0])
                weakref.finalize(out, lambda n=out.numel() * out.element_size(): live.__setitem__(0, live[0] - n))
                return out

            type(next(iter(sharded.values()))).full_tensor = tracked
            try:
                stats = send_model(sharded, group, dtype=torch.bfloat16, name_map=_rename, packed_buffer_size_bytes=BUF)
            finally:
                type(next(iter(sharded.values()))).full_tensor = real
            outcome[step] = {"peak": peak[0], "tensors": None if stats is None else stats.num_tensors}
        if rank == 0:
            buffers = side_group(group).cache["pipeline"].buffers
            outcome["buffer_bytes"] = [b.numel() for b in buffers]
            destroy_side_group(group)
    except Exception as e:  # noqa: BLE001 - the misordered case reports it
        outcome["error"] = f"{type(e).__name__}: {e}"
    t = torch.tensor([1.0])
    if "error" not in outcome:
        dist.all_reduce(t)
    dist.destroy_process_group()
    return outcome


def test_dtensor_trainer_sends_bit_exact_with_bounded_memory():
    outcomes = run_processes(_body, 4, free_port(), free_port(), False, deadline_s=120)
    largest = max(torch.Size(s).numel() * 4 for s in SHAPES.values())
    for rank in (0, 1):
        out = outcomes[rank].value
        assert "error" not in out, out
        for step in (0, 1):
            # The tensor in hand plus the next gather, never the whole model.
            assert out[step]["peak"] <= 2 * largest, out
    assert outcomes[0].value[0]["tensors"] == len(SHAPES)
    assert all(b <= BUF for b in outcomes[0].value["buffer_bytes"])
    for rank in (2, 3):
        assert outcomes[rank].value == [_expected(0), _expected(1)]


def test_misordered_gathers_fail_within_the_timeout_instead_of_hanging():
    """Rank 1 iterates in another order: its gathers pair with the wrong tensors
    (different shapes), and every rank must come back with an error in bounded
    time rather than hang."""
    outcomes = run_processes(_body, 4, free_port(), free_port(), True, deadline_s=90, expect_ok=False)
    assert "error" in outcomes[0].value or "error" in outcomes[1].value, outcomes
    for rank in (2, 3):
        assert outcomes[rank].ok and isinstance(outcomes[rank].value[-1], str), outcomes[rank]
