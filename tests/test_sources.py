"""Sources (cast, rename, lazy iteration) and the module loader, thread tier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.harness import ADDR, bytes_equal, free_port, run_threads
from torchxfer import (
    ModuleLoader,
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    ParallelConfig,
    TransferError,
    WeightTransferConfig,
    destroy_side_group,
    iter_named_tensors,
    send_model,
    update_info_for,
)


class Tiny(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("steps", torch.tensor([seed], dtype=torch.int64))


class Served(nn.Module):
    """The server's copy: bf16 weights under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16, dtype=torch.bfloat16)
        self.proj = nn.Linear(16, 16, dtype=torch.bfloat16)
        self.norm = nn.LayerNorm(16, dtype=torch.bfloat16)
        self.register_buffer("steps", torch.zeros(1, dtype=torch.int64))


RENAME = {"embed.weight": "tok.weight"}


def test_iter_named_tensors_casts_renames_dedups_and_drops():
    model = Tiny(1)
    out = list(iter_named_tensors(model, dtype=torch.bfloat16, name_map=lambda n: None if n.startswith("norm.") else n))
    names = [n for n, _ in out]
    assert names == ["steps", "embed.weight", "proj.weight", "proj.bias"]  # head.weight is embed.weight: sent once
    by = dict(out)
    assert by["proj.weight"].dtype == torch.bfloat16 and by["steps"].dtype == torch.int64
    assert bytes_equal(by["proj.weight"], model.proj.weight.detach().bfloat16())
    info = update_info_for(model, dtype=torch.bfloat16, name_map=lambda n: None if n.startswith("norm.") else n)
    assert info.names == names and info.dtype_names == ["int64"] + ["bfloat16"] * 3
    with pytest.raises(ValueError, match="expected a string or None"):
        list(iter_named_tensors(model, name_map=lambda n: 3))
    with pytest.raises(ValueError, match="nn.Module or a state dict"):
        list(iter_named_tensors([1, 2]))


def test_send_model_into_a_renamed_bf16_module_bit_exact():
    port = free_port()
    model = Tiny(3)

    def body(rank: int) -> object:
        if rank == 0:
            group = NCCLWeightTransferEngine.trainer_init(
                dict(master_address=ADDR, master_port=port, world_size=3), backend="gloo", timeout_s=5
            )
            stats = send_model(model, group, dtype=torch.bfloat16, name_map=RENAME, packed_buffer_size_bytes=1024)
            destroy_side_group(group)
            return stats.num_tensors
        served = Served()
        ptrs = {n: t.data_ptr() for n, t in served.state_dict().items()}
        engine = NCCLWeightTransferEngine(
            WeightTransferConfig(backend="gloo", timeout_s=5), ParallelConfig(rank=rank - 1, tensor_parallel_size=2)
        )
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 3))
        loader = ModuleLoader(served)
        loader.check(update_info_for(model, dtype=torch.bfloat16, name_map=RENAME, packed_buffer_size_bytes=1024))
        engine.receive_weights(update_info_for(model, dtype=torch.bfloat16, name_map=RENAME, packed_buffer_size_bytes=1024), loader)
        loader.finish()
        engine.shutdown()
        assert {n: t.data_ptr() for n, t in served.state_dict().items()} == ptrs  # in place
        return served

    outcomes = run_threads(body, 3, deadline_s=60)
    assert outcomes[0].value == 6
    for out in outcomes[1:]:
        served = out.value
        assert bytes_equal(served.tok.weight, model.embed.weight.detach().bfloat16())
        assert bytes_equal(served.proj.bias, model.proj.bias.detach().bfloat16())
        assert bytes_equal(served.norm.weight, model.norm.weight.detach().bfloat16())
        assert bytes_equal(served.steps, model.steps)


def test_loader_names_every_problem_and_strict_switch():
    served = Served()
    loader = ModuleLoader(served)
    bad = [
        ("tok.weight", torch.zeros(50, 16)),  # float32, module is bf16
        ("proj.weight", torch.zeros(4, 4, dtype=torch.bfloat16)),  # shape
        ("nope", torch.zeros(1)),  # unexpected
        ("proj.bias", torch.ones(16, dtype=torch.bfloat16)),  # fine, but the batch fails whole
    ]
    with pytest.raises(ValueError) as err:
        loader(bad)
    text = str(err.value)
    assert "'tok.weight': dtype float32" in text and "'proj.weight': shape [4, 4]" in text and "unexpected 'nope'" in text
    loader([("proj.bias", torch.ones(16, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="did not arrive") as err:
        loader.finish()
    assert "'tok.weight'" in str(err.value) and "'proj.bias'" not in str(err.value)
    loose = ModuleLoader(served, strict=False)
    loose([("nope", torch.zeros(1)), ("proj.bias", torch.full((16,), 2.0, dtype=torch.bfloat16))])
    loose.finish()
    assert served.proj.bias.float().tolist() == [2.0] * 16


def test_loader_error_reaches_every_rank_as_transfer_error():
    port = free_port()
    model = Tiny(4)

    def body(rank: int) -> object:
        if rank == 0:
            group = NCCLWeightTransferEngine.trainer_init(
                dict(master_address=ADDR, master_port=port, world_size=2), backend="gloo", timeout_s=5
            )
            try:
                with pytest.raises(TransferError, match="cannot load"):
                    send_model(model, group)  # float32 into a bf16 module
                return send_model(model, group, dtype=torch.bfloat16, name_map=RENAME).num_tensors
            finally:
                destroy_side_group(group)
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=5), ParallelConfig())
        engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, 2))
        loader = ModuleLoader(Served(), strict=False)
        with pytest.raises(TransferError, match="cannot load"):
            engine.receive_weights(None, loader)
        loader.finish()
        engine.receive_weights(None, loader)
        engine.shutdown()
        return engine.weights_version

    outcomes = run_threads(body, 2, deadline_s=60)
    assert outcomes[0].value == 6 and outcomes[1].value == 1
