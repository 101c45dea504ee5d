"""Fast tier: configuration validation, the worker-rank formula and the engine's dict parsing."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
import torch

import torchxfer
from torchxfer import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
    ParallelConfig,
    TransferError,
    TransferStats,
    WeightTransferConfig,
    WeightTransferEngine,
    worker_rank,
)
from torchxfer.packing import TensorSpec

pytestmark = pytest.mark.timeout(60)


def test_defaults_and_error_type():
    assert DEFAULT_PACKED_BUFFER_SIZE_BYTES == 1 << 30
    assert DEFAULT_PACKED_NUM_BUFFERS == 2
    assert issubclass(TransferError, RuntimeError)
    e = TransferError("x")
    assert str(e) == "x" and e.broken is False
    assert TransferError("y", broken=True).broken is True
    info = NCCLWeightTransferUpdateInfo(["a"], ["float32"], [[1]])
    assert info.packed is False
    assert info.packed_buffer_size_bytes == 1 << 30
    assert info.packed_num_buffers == 2


# ----------------------------------------------------------------------------------------------
# NCCLWeightTransferUpdateInfo


def update_info(**kw):
    args = dict(names=["a", "b"], dtype_names=["float32", "bfloat16"], shapes=[[2, 3], []])
    args.update(kw)
    return NCCLWeightTransferUpdateInfo(**args)


def test_update_info_valid():
    info = update_info(dtype_names=["float", "torch.bfloat16"], packed=True, packed_buffer_size_bytes=16,
                       packed_num_buffers=64)  # fmt: skip
    assert info.specs == (TensorSpec("a", torch.float32, (2, 3)), TensorSpec("b", torch.bfloat16, ()))
    assert update_info(shapes=[(2, 3), torch.Size([])]).specs == info.specs
    assert update_info(names=(), dtype_names=(), shapes=()).specs == ()
    assert update_info(shapes=[[0, 5], [0]]).specs[0].nbytes == 0


def test_update_info_from_named_tensors():
    tensors = [("w", torch.zeros(3, 4, dtype=torch.float16)), ("s", torch.tensor(1.5)), ("t", torch.ones(4, 2).t())]
    info = NCCLWeightTransferUpdateInfo.from_named_tensors(tensors, packed=True, packed_buffer_size_bytes=1024)
    assert info.names == ["w", "s", "t"]
    assert info.dtype_names == ["float16", "float32", "float32"]
    assert info.shapes == [[3, 4], [], [2, 4]]
    assert (info.packed, info.packed_buffer_size_bytes, info.packed_num_buffers) == (True, 1024, 2)
    with pytest.raises(ValueError, match="meta"):
        NCCLWeightTransferUpdateInfo.from_named_tensors([("m", torch.empty(2, device="meta"))])
    with pytest.raises(ValueError, match="'q'"):
        NCCLWeightTransferUpdateInfo.from_named_tensors([("q", [1.0])])


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        (dict(dtype_names=["float32"]), "dtype_names has 1 entries but names has 2"),
        (dict(dtype_names=["float32"] * 3), "dtype_names has 3 entries but names has 2"),
        (dict(shapes=[[1]]), "shapes has 1 entries but names has 2"),
        (dict(shapes=[[1], [2], [3]]), "shapes has 3 entries but names has 2"),
        (dict(names=["a"]), "entries but names has 1"),
        (dict(names=[], dtype_names=[], shapes=[[1]]), "shapes has 1 entries but names has 0"),
    ],
)
def test_update_info_unequal_lengths(kw, pattern):
    with pytest.raises(ValueError, match=re.escape(pattern)):
        update_info(**kw)


@pytest.mark.parametrize("bad", ["nn", "Tensor", "qint8", "torch.nn", "float33", "", "Float32"])
def test_update_info_bad_dtype_names(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))) as info:
        update_info(dtype_names=["float32", bad])
    assert "'b'" in str(info.value)  # names the tensor too


@pytest.mark.parametrize("bad", [None, 32, torch.float32, ["float32"]])
def test_update_info_non_string_dtype_names(bad):
    with pytest.raises(ValueError, match="'b'"):
        update_info(dtype_names=["float32", bad])


@pytest.mark.parametrize("bad_dim", [-1, -100, 1.5, 2.0, "3", True, False, None, [2]])
def test_update_info_bad_dims(bad_dim):
    with pytest.raises(ValueError, match=r"dimension " + re.escape(repr(bad_dim))) as info:
        update_info(shapes=[[2, bad_dim], []])
    assert "'a'" in str(info.value)


@pytest.mark.parametrize("bad_shape", [3, "2,3", None, {"0": 2}, [1] * 65])
def test_update_info_bad_shapes(bad_shape):
    with pytest.raises(ValueError, match="shape"):
        update_info(shapes=[[2], bad_shape])


@pytest.mark.parametrize("field", ["names", "dtype_names", "shapes"])
@pytest.mark.parametrize("bad", ["ab", None, 3, {"a": 1}])
def test_update_info_fields_must_be_lists(field, bad):
    with pytest.raises(ValueError, match=field):
        update_info(**{field: bad})


def test_update_info_bad_names():
    with pytest.raises(ValueError, match="name"):
        update_info(names=["a", 5])


@pytest.mark.parametrize("bad", [0, 1, "yes", None, 1.0])
def test_update_info_bad_packed(bad):
    with pytest.raises(ValueError, match=r"packed must be a bool, got " + re.escape(repr(bad))):
        update_info(packed=bad)


@pytest.mark.parametrize("bad", [0, 1, 15, -16, True, 1.5, 1024.0, "1024", None, [1024]])
def test_update_info_bad_buffer_size(bad):
    with pytest.raises(ValueError, match=r"packed_buffer_size_bytes must be .*got " + re.escape(repr(bad))):
        update_info(packed_buffer_size_bytes=bad)


@pytest.mark.parametrize("bad", [0, -1, 65, 1000, True, 2.0, "2", None])
def test_update_info_bad_num_buffers(bad):
    with pytest.raises(ValueError, match=r"packed_num_buffers must be .*got " + re.escape(repr(bad))):
        update_info(packed_num_buffers=bad)


def test_update_info_buffer_bounds_accepted():
    for size, n in [(16, 1), (17, 64), (1 << 40, 2)]:
        info = update_info(packed_buffer_size_bytes=size, packed_num_buffers=n)
        assert (info.packed_buffer_size_bytes, info.packed_num_buffers) == (size, n)


# ----------------------------------------------------------------------------------------------
# WeightTransferConfig


def test_weight_transfer_config_defaults():
    cfg = WeightTransferConfig()
    assert (cfg.backend, cfg.timeout_s, cfg.device) == ("nccl", 300.0, None)
    cfg = WeightTransferConfig(backend="gloo", timeout_s=5)
    assert cfg.timeout_s == 5.0 and type(cfg.timeout_s) is float
    assert WeightTransferConfig(backend="gloo", device="cpu").device == torch.device("cpu")
    assert WeightTransferConfig(backend="gloo", device=torch.device("cpu")).device == torch.device("cpu")
    # Gloo can stage CUDA tensors through host memory, and nccl takes a CUDA device (no GPU needed to validate).
    assert WeightTransferConfig(backend="gloo", device="cuda:0").device == torch.device("cuda", 0)
    assert WeightTransferConfig(backend="nccl", device="cuda:1").device == torch.device("cuda", 1)
    assert WeightTransferConfig(timeout_s=1e-3).timeout_s == 1e-3


@pytest.mark.parametrize("bad", ["mpi", "NCCL", "Gloo", "", None, 1, "ucc", ["nccl"]])
def test_weight_transfer_config_bad_backend(bad):
    with pytest.raises(ValueError, match=r"backend must be one of .*got " + re.escape(repr(bad))):
        WeightTransferConfig(backend=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, True, False, "5", None, [5],
                                 1e10, 1e11, 10**9 + 1.5, 2**63])  # fmt: skip
def test_weight_transfer_config_bad_timeout(bad):
    with pytest.raises(ValueError, match=r"timeout_s must be .*got " + re.escape(repr(bad))):
        WeightTransferConfig(backend="gloo", timeout_s=bad)


@pytest.mark.parametrize("value, default, expected", [
    (None, True, True), (None, False, False), ("1", False, True), (" ON ", False, True), ("yes", False, True),
    ("0", True, False), ("False", True, False), ("off", True, False), ("maybe", True, True), ("", False, False),
])  # fmt: skip
def test_env_flag(monkeypatch, value, default, expected):
    from torchxfer.config import env_flag

    if value is None:
        monkeypatch.delenv("TORCHXFER_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("TORCHXFER_TEST_FLAG", value)
    assert env_flag("TORCHXFER_TEST_FLAG", default) is expected


def test_timeouts_up_to_the_cap_are_taken():
    from torchxfer.config import MAX_TIMEOUT_S

    assert WeightTransferConfig(backend="gloo", timeout_s=MAX_TIMEOUT_S).timeout_s == MAX_TIMEOUT_S
    with pytest.raises(ValueError, match="up to"):
        NCCLWeightTransferEngine.trainer_init(dict(master_address="127.0.0.1", master_port=1, world_size=2),
                                              timeout_s=MAX_TIMEOUT_S * 2)  # fmt: skip


def test_weight_transfer_config_huge_int_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        WeightTransferConfig(backend="gloo", timeout_s=10**400)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_weight_transfer_config_nccl_needs_cuda(device):
    with pytest.raises(ValueError, match=r"nccl.*CUDA.*" + torch.device(device).type):
        WeightTransferConfig(backend="nccl", device=device)


@pytest.mark.parametrize("bad", ["bogus", "cuda:x", "", 3.5])
def test_weight_transfer_config_bad_device(bad):
    with pytest.raises(ValueError, match="device"):
        WeightTransferConfig(backend="gloo", device=bad)


@pytest.mark.parametrize("bad", ["cuda:256", "cuda:128", "cuda:4096", 300])
@pytest.mark.parametrize("backend", ["gloo", "nccl", "ipc"])
def test_a_device_index_torch_would_wrap_is_a_value_error(bad, backend):
    """torch keeps a device index in one signed byte: "cuda:256" reads as cuda:0, so a worker
    would have taken another GPU than the one it was given, silently."""
    with pytest.raises(ValueError, match=rf"device {bad!r} has an index torch cannot hold"):
        WeightTransferConfig(backend=backend, device=bad)


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
@pytest.mark.parametrize("bad", ["cpu:1", "cpu:7", torch.device("cpu", 3)])
def test_a_cpu_device_with_an_index_other_than_0_is_a_value_error(bad, backend):
    """CPU tensors report device "cpu" whatever index made them, so a worker on "cpu:1"
    would have compared every tensor it received against a device none of them has."""
    with pytest.raises(ValueError, match="names a CPU index"):
        WeightTransferConfig(backend=backend, device=bad)


@pytest.mark.parametrize("given", ["cpu:0", torch.device("cpu", 0), "cpu"])
def test_cpu_0_is_the_cpu(given):
    assert WeightTransferConfig(backend="gloo", device=given).device == torch.device("cpu")


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "mps"])
def test_weight_transfer_config_device_neither_cuda_nor_cpu(backend, device):
    """A gloo worker on the meta device posted its receives into meta tensors and broke the
    group on the trainer's first broadcast; an ipc one failed the handshake on every rank."""
    with pytest.raises(ValueError, match=rf"device must be a CUDA device or the CPU, got {torch.device(device)}"):
        WeightTransferConfig(backend=backend, device=device)


# ----------------------------------------------------------------------------------------------
# ParallelConfig and worker_rank


def test_parallel_config_defaults():
    pc = ParallelConfig()
    assert (pc.data_parallel_rank, pc.rank, pc.tensor_parallel_size, pc.pipeline_parallel_size,
            pc.data_parallel_size, pc.world_size) == (0, 0, 1, 1, 1, 1)  # fmt: skip


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 3), (4, 2), (3, 5)])
def test_parallel_config_world_size(tp, pp):
    pc = ParallelConfig(rank=tp * pp - 1, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert pc.world_size == tp * pp


@pytest.mark.parametrize("field", ["tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"])
@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2", None])
def test_parallel_config_bad_sizes(field, bad):
    with pytest.raises(ValueError, match=rf"{field} must be .*got " + re.escape(repr(bad))):
        ParallelConfig(**{field: bad})


@pytest.mark.parametrize(
    ("kw", "field", "value"),
    [
        (dict(rank=2, tensor_parallel_size=2), "rank", 2),
        (dict(rank=6, tensor_parallel_size=2, pipeline_parallel_size=3), "rank", 6),
        (dict(rank=1), "rank", 1),
        (dict(rank=-1), "rank", -1),
        (dict(rank=True, tensor_parallel_size=2), "rank", True),
        (dict(rank=0.0), "rank", 0.0),
        (dict(data_parallel_rank=1), "data_parallel_rank", 1),
        (dict(data_parallel_rank=3, data_parallel_size=3), "data_parallel_rank", 3),
        (dict(data_parallel_rank=-1, data_parallel_size=3), "data_parallel_rank", -1),
        (dict(data_parallel_rank=False, data_parallel_size=2), "data_parallel_rank", False),
    ],
)
def test_parallel_config_bad_ranks(kw, field, value):
    with pytest.raises(ValueError, match=rf"\.{field} must be .*got " + re.escape(repr(value))):
        ParallelConfig(**kw)


def test_worker_rank_formula_and_distinct_over_grid():
    for tp, pp, dp, offset in itertools.product((1, 2, 3), (1, 2), (1, 2, 3), (1, 2, 5)):
        ranks = []
        for dp_rank, rank in itertools.product(range(dp), range(tp * pp)):
            pc = ParallelConfig(data_parallel_rank=dp_rank, rank=rank, tensor_parallel_size=tp,
                                pipeline_parallel_size=pp, data_parallel_size=dp)  # fmt: skip
            r = worker_rank(pc, offset)
            assert r == dp_rank * (tp * pp) + rank + offset
            ranks.append(r)
        # Every worker of the server gets its own rank, packed right after the offset.
        assert sorted(ranks) == list(range(offset, offset + dp * tp * pp))


def test_worker_rank_examples():
    pc = ParallelConfig(data_parallel_rank=2, rank=3, tensor_parallel_size=2, pipeline_parallel_size=2,
                        data_parallel_size=4)  # fmt: skip
    assert worker_rank(pc, 1) == 2 * 4 + 3 + 1 == 12
    assert worker_rank(ParallelConfig(), 1) == 1


# ----------------------------------------------------------------------------------------------
# NCCLWeightTransferInitInfo


def init_info(**kw):
    args = dict(master_address="127.0.0.1", master_port=29500, rank_offset=1, world_size=3)
    args.update(kw)
    return NCCLWeightTransferInitInfo(**args)


def test_init_info_valid():
    info = init_info()
    assert (info.master_address, info.master_port, info.rank_offset, info.world_size, info.token) == (
        "127.0.0.1", 29500, 1, 3, None)  # fmt: skip
    assert init_info(master_port=1).master_port == 1
    assert init_info(master_port=65535).master_port == 65535
    assert init_info(master_address="trainer-0.svc", token="s").token == "s"
    assert init_info(world_size=1).world_size == 1


@pytest.mark.parametrize("bad", ["", None, 127, b"127.0.0.1", ["h"], "a..b", "x" * 300, "\ud800", " h", "h ", "h\0"])
def test_init_info_bad_address(bad):
    """Anything the resolver cannot encode (an empty or 64-character label, a lone surrogate) or
    with surrounding spaces is refused here, naming the value, not left for the resolver."""
    with pytest.raises(ValueError, match=r"master_address must be .*got " + re.escape(repr(bad)[:80])):
        init_info(master_address=bad)


@pytest.mark.parametrize("bad", [0, 65536, -1, 1 << 20, True, False, 29500.0, "29500", None])
def test_init_info_bad_port(bad):
    with pytest.raises(ValueError, match=r"master_port must be an int in \[1, 65535\], got " + re.escape(repr(bad))):
        init_info(master_port=bad)


@pytest.mark.parametrize(("field", "bad"), [
    ("rank_offset", 0), ("rank_offset", -1), ("rank_offset", True), ("rank_offset", 1.0), ("rank_offset", "1"),
    ("world_size", 0), ("world_size", -2), ("world_size", True), ("world_size", 2.0), ("world_size", None),
])  # fmt: skip
def test_init_info_bad_ints(field, bad):
    with pytest.raises(ValueError, match=rf"{field} must be .*got " + re.escape(repr(bad))):
        init_info(**{field: bad})


@pytest.mark.parametrize("bad", ["", 123, b"secret", ["s"], True, "s3cret\ud800"])
def test_init_info_bad_token(bad):
    with pytest.raises(ValueError, match="token") as info:
        init_info(token=bad)
    assert "s3cret" not in str(info.value)


_GOOD_GROUP = dict(address="127.0.0.1", port=0, rank=0, world_size=2, backend="gloo", timeout_s=1.0)


@pytest.mark.parametrize("field, bad, pattern", [
    ("address", 5, "address must be a non-empty string, got 5"),
    ("address", "", "address must be a non-empty string"),
    ("address", "127.0.0.1\0", "address must be a non-empty string"),
    ("world_size", "2", r"world_size must be an int in \[1, 65536\], got '2'"),
    ("world_size", 0, r"world_size must be an int in \[1, 65536\], got 0"),
    ("world_size", True, r"world_size must be an int in \[1, 65536\], got True"),
    ("world_size", 1 << 17, r"world_size must be an int in \[1, 65536\], got 131072"),
    ("rank", 2, "rank 2 is outside"),
    ("port", 70000, r"port must be an int in \[0, 65535\], got 70000"),
    ("port", -3, r"port must be an int in \[0, 65535\], got -3"),
    ("port", "29500", "port must be an int"),
    ("timeout_s", -1.0, "timeout_s must be a positive number of seconds .* got -1.0"),
    ("timeout_s", float("nan"), "timeout_s must be .* got nan"),
    ("timeout_s", None, "timeout_s must be .* got None"),
    ("timeout_s", 1e12, "timeout_s must be .* got 1000000000000.0"),
    ("token", 5, "token must be a non-empty string or None"),
    ("token", "", "token must be a non-empty string or None"),
    ("token", "\ud800", "token holds a character UTF-8 cannot encode"),
    ("device", "garbage", "device 'garbage' is not a device"),
    ("device", 12345, "device 12345 has an index torch cannot hold"),
    ("device", "meta", "backend 'gloo' moves CPU or CUDA tensors, got device meta"),
    ("device", "cuda:4096", "device 'cuda:4096' has an index torch cannot hold"),
    ("device", "cuda:99", "device cuda:99 is not a CUDA device this process sees"),
])  # fmt: skip
def test_create_side_group_bad_arguments_raise_value_error(field, bad, pattern):
    """Every argument is checked before any socket: a ValueError naming the value, never a
    TypeError, an OverflowError, a port taken modulo 65536 or a timeout that already passed."""
    from torchxfer import create_side_group

    args = dict(_GOOD_GROUP, **{field: bad})
    with pytest.raises(ValueError, match=pattern):
        create_side_group(args.pop("address"), args.pop("port"), args.pop("rank"), args.pop("world_size"), **args)


def test_create_side_group_worker_port_zero_is_a_value_error():
    from torchxfer import create_side_group

    with pytest.raises(ValueError, match=r"port must be an int in \[1, 65535\], got 0"):
        create_side_group("127.0.0.1", 0, 1, 2, backend="gloo", timeout_s=1.0)


def test_init_info_repr_hides_token():
    secret = "hunter2-Sup3rS3cret"
    info = init_info(token=secret)
    for text in (repr(info), str(info), f"{info}", f"{info!r}", repr([info]), repr({"i": info})):
        assert secret not in text
        assert "***" in text
    assert "token=None" in repr(init_info())
    assert "127.0.0.1" in repr(info) and "29500" in repr(info)
    # Errors about other fields do not echo it either.
    with pytest.raises(ValueError) as e:
        init_info(token=secret, master_port=0)
    assert secret not in str(e.value)
    with pytest.raises(ValueError) as e:
        NCCLWeightTransferEngine.parse_init_info(dict(master_address="h", master_port=1, rank_offset=1,
                                                      world_size=2, token=secret, bogus=1))  # fmt: skip
    assert secret not in str(e.value)


# ----------------------------------------------------------------------------------------------
# TransferStats


def test_transfer_stats():
    assert [f.name for f in dataclasses.fields(TransferStats)] == ["update_id", "num_tensors", "num_bytes", "seconds"]
    s = TransferStats(update_id=4, num_tensors=10, num_bytes=3_000_000_000, seconds=1.5)
    assert (s.update_id, s.num_tensors, s.num_bytes, s.seconds) == (4, 10, 3_000_000_000, 1.5)
    assert s.gb_per_s == pytest.approx(2.0)
    assert TransferStats(0, 0, 5, 0.0).gb_per_s == math.inf
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_bytes = 1  # type: ignore[misc]
    assert s == TransferStats(4, 10, 3_000_000_000, 1.5)


# ----------------------------------------------------------------------------------------------
# engine: parsing dicts, construction, call order

INIT_DICT = dict(master_address="127.0.0.1", master_port=29500, rank_offset=1, world_size=3)
UPDATE_DICT = dict(names=["a", "b"], dtype_names=["float32", "int8"], shapes=[[4], [2, 2]])


def test_parse_init_info_valid():
    info = NCCLWeightTransferEngine.parse_init_info(INIT_DICT)
    assert isinstance(info, NCCLWeightTransferInitInfo)
    assert info == NCCLWeightTransferInitInfo(**INIT_DICT)
    assert NCCLWeightTransferEngine.parse_init_info({**INIT_DICT, "token": "t"}).token == "t"
    assert NCCLWeightTransferEngine.parse_init_info(info) is info


def test_parse_update_info_valid():
    info = NCCLWeightTransferEngine.parse_update_info(UPDATE_DICT)
    assert isinstance(info, NCCLWeightTransferUpdateInfo)
    assert info == NCCLWeightTransferUpdateInfo(**UPDATE_DICT)
    assert info.specs[1] == TensorSpec("b", torch.int8, (2, 2))
    full = {**UPDATE_DICT, "packed": True, "packed_buffer_size_bytes": 4096, "packed_num_buffers": 3}
    info = NCCLWeightTransferEngine.parse_update_info(full)
    assert (info.packed, info.packed_buffer_size_bytes, info.packed_num_buffers) == (True, 4096, 3)
    assert NCCLWeightTransferEngine.parse_update_info(info) is info


@pytest.mark.parametrize("parse,good", [
    (NCCLWeightTransferEngine.parse_init_info, INIT_DICT),
    (NCCLWeightTransferEngine.parse_update_info, UPDATE_DICT),
])  # fmt: skip
def test_parse_unknown_and_missing_keys(parse, good):
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        parse({**good, "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown keys \['_specs'\]"):
        parse({**good, "_specs": ()})
    for key in good:
        with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
            parse({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="missing keys"):
        parse({})
    for bad in (None, [], "x", 3, list(good.items())):
        with pytest.raises(ValueError, match="dict"):
            parse(bad)


def test_parse_bad_values_raise_value_error():
    with pytest.raises(ValueError, match="master_port"):
        NCCLWeightTransferEngine.parse_init_info({**INIT_DICT, "master_port": 0})
    with pytest.raises(ValueError, match="'nn'"):
        NCCLWeightTransferEngine.parse_update_info({**UPDATE_DICT, "dtype_names": ["float32", "nn"]})


def test_parse_mixed_type_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        NCCLWeightTransferEngine.parse_init_info({**INIT_DICT, 1: 0, "bogus": 0})


def test_parse_single_non_string_key():
    with pytest.raises(ValueError, match="unknown keys"):
        NCCLWeightTransferEngine.parse_init_info({**INIT_DICT, 1: 0})


def gloo_engine(**pc):
    return NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=2), ParallelConfig(**pc))


def test_engine_construction():
    engine = gloo_engine()
    assert isinstance(engine, WeightTransferEngine)
    assert engine.model_update_group is None
    assert engine.device == torch.device("cpu")
    assert engine.weights_version is None and engine.torn is False
    assert NCCLWeightTransferEngine.init_info_cls is NCCLWeightTransferInitInfo
    assert NCCLWeightTransferEngine.update_info_cls is NCCLWeightTransferUpdateInfo
    engine.shutdown()  # local and idempotent, also before init
    engine.shutdown()


@pytest.mark.parametrize(
    ("config", "parallel_config", "pattern"),
    [
        (None, ParallelConfig(), "config must be a WeightTransferConfig"),
        ({"backend": "gloo"}, ParallelConfig(), "config must be a WeightTransferConfig, got dict"),
        ("gloo", ParallelConfig(), "config must be a WeightTransferConfig, got str"),
        (WeightTransferConfig(backend="gloo"), None, "parallel_config must be a ParallelConfig"),
        (WeightTransferConfig(backend="gloo"), {"rank": 0}, "parallel_config must be a ParallelConfig, got dict"),
        (ParallelConfig(), WeightTransferConfig(backend="gloo"), "config must be a WeightTransferConfig"),
    ],
)
def test_engine_wrong_types(config, parallel_config, pattern):
    with pytest.raises(ValueError, match=pattern):
        NCCLWeightTransferEngine(config, parallel_config)


def test_receive_before_init_raises_runtime_error():
    engine = gloo_engine()
    with pytest.raises(RuntimeError, match="init_transfer_engine") as info:
        engine.receive_weights(None, lambda named: None)
    assert not isinstance(info.value, TransferError)
    with pytest.raises(RuntimeError, match="init_transfer_engine"):
        engine.receive_weights(UPDATE_DICT, lambda named: None, atomic=True)
    assert engine.weights_version is None and engine.torn is False


def test_init_rejects_rank_outside_world_before_networking():
    # Rank 1*2 + 1 + 1 = 4 >= world_size 4: refused before any store is contacted (port 1 is never dialed).
    engine = gloo_engine(data_parallel_rank=1, rank=1, tensor_parallel_size=2, data_parallel_size=2)
    with pytest.raises(ValueError, match=r"worker rank 4 .*world_size 4"):
        engine.init_transfer_engine(dict(master_address="127.0.0.1", master_port=1, rank_offset=1, world_size=4))
    assert engine.model_update_group is None
    with pytest.raises(ValueError, match="unknown keys"):
        engine.init_transfer_engine({**INIT_DICT, "rank": 1})


def test_public_api_exports():
    for name in ("NCCLWeightTransferEngine", "NCCLWeightTransferInitInfo", "NCCLWeightTransferUpdateInfo",
                 "ParallelConfig", "TransferError", "TransferStats", "WeightTransferConfig", "worker_rank",
                 "DEFAULT_PACKED_BUFFER_SIZE_BYTES", "DEFAULT_PACKED_NUM_BUFFERS", "PROTOCOL_VERSION"):  # fmt: skip
        assert name in torchxfer.__all__
        assert hasattr(torchxfer, name)
    # The whole public surface, no more and no less, every name resolving; and the engines'
    # vLLM-style method names.
    assert set(torchxfer.__all__) == {
        "DEFAULT_PACKED_BUFFER_SIZE_BYTES", "DEFAULT_PACKED_NUM_BUFFERS", "IPCWeightTransferEngine",
        "IPCWeightTransferInitInfo", "ModuleLoader", "NCCLWeightTransferEngine", "NCCLWeightTransferInitInfo",
        "NCCLWeightTransferUpdateInfo", "PROTOCOL_VERSION", "ParallelConfig", "TransferError", "TransferStats",
        "WeightTransferConfig", "WeightTransferEngine", "create_engine", "create_side_group", "destroy_side_group",
        "iter_named_tensors", "send_model", "side_group", "update_info_for", "worker_rank"}  # fmt: skip
    assert all(hasattr(torchxfer, name) for name in torchxfer.__all__)
    for engine in (torchxfer.NCCLWeightTransferEngine, torchxfer.IPCWeightTransferEngine):
        for method in ("init_transfer_engine", "receive_weights", "shutdown", "trainer_init", "trainer_send_weights",
                       "parse_init_info", "parse_update_info"):  # fmt: skip
            assert callable(getattr(engine, method)), (engine, method)


def test_a_cuda_device_without_an_index_resolves_to_the_current_one():
    from torchxfer.config import resolved_device

    assert resolved_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolved_device("cuda") == torch.device("cuda", torch.cuda.current_device())
        assert resolved_device("cuda:0") == torch.device("cuda", 0)


# -- values found wrong by a black-box review: each a ValueError naming the value, at once ------------


@pytest.mark.parametrize("make, pattern", [
    (lambda: torchxfer.ParallelConfig(tensor_parallel_size=2**70), "tensor_parallel_size must be an int"),
    (lambda: torchxfer.ParallelConfig(tensor_parallel_size=256, data_parallel_size=256), "at most 65536 ranks"),
    (lambda: torchxfer.NCCLWeightTransferInitInfo("   ", 29500, 1, 2), "master_address must be a host"),
    (lambda: torchxfer.NCCLWeightTransferInitInfo("127.0.0.1", 29500, 1, 100_000), "world_size must be an int"),
    (lambda: torchxfer.NCCLWeightTransferUpdateInfo(["w"], ["bfloat16"], [[2**40, 2**40]]), "too large"),
    (lambda: torchxfer.NCCLWeightTransferEngine.trainer_init(
        dict(master_address="127.0.0.1", master_port=29500, world_size=2), backend=""), "backend must be one of"),
])  # fmt: skip
def test_out_of_range_configuration_is_a_value_error(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def _alone(engine: type, **kw) -> torch.distributed.ProcessGroup:
    """A side group of the trainer alone (world size 1): the send path's argument checks run."""
    from tests.harness import ADDR, free_port

    return engine.trainer_init(dict(master_address=ADDR, master_port=free_port(), world_size=1), timeout_s=5, **kw)


def test_send_arguments_are_checked_before_anything_moves():
    pairs = [("w", torch.arange(4.0))]
    group = _alone(torchxfer.NCCLWeightTransferEngine, backend="gloo")
    send = torchxfer.NCCLWeightTransferEngine.trainer_send_weights
    try:
        for source in (5, None, 3.5):
            with pytest.raises(ValueError, match="iterable of \\(name, tensor\\) pairs, got"):
                send(source, group, packed=True)
        for field in ("checksum", "zero_copy"):
            for bad in (1, "no", None):
                with pytest.raises(ValueError, match=f"{field} must be a bool, got {bad!r}"):
                    send(pairs, group, packed=True, **{field: bad})
        with pytest.raises(ValueError, match="stream must be None or a CUDA stream"):
            send(pairs, group, stream="x")
        with pytest.raises(ValueError, match="packed_buffer_size_bytes must be an int"):
            send(pairs, group, packed=True, packed_buffer_size_bytes=2**70)
        assert send(pairs, group, packed=True).num_tensors == 1  # the group is still usable
    finally:
        torchxfer.destroy_side_group(group)
    group = _alone(torchxfer.IPCWeightTransferEngine, device="cpu")
    send = torchxfer.IPCWeightTransferEngine.trainer_send_weights
    try:
        with pytest.raises(ValueError, match="iterable of \\(name, tensor\\) pairs, got int"):
            send(5, group)
        with pytest.raises(ValueError, match="packed_buffer_size_bytes must be an int"):
            send(pairs, group, packed_buffer_size_bytes=2**70)
        with pytest.raises(ValueError, match="version must be an int"):
            send(pairs, group, version=True)
        assert send(pairs, group).num_tensors == 1
    finally:
        torchxfer.destroy_side_group(group)


def test_module_loader_refuses_what_is_not_a_batch_and_takes_a_dict_update_info():
    module = torch.nn.Linear(2, 3)
    loader = torchxfer.ModuleLoader(module)
    for batch in (None, 5):
        with pytest.raises(ValueError, match="a batch must be a list of \\(name, tensor\\) pairs"):
            loader(batch)
    for batch in ("x", [("weight", [1, 2])], [("weight",)], [(1, torch.zeros(3, 2))]):
        with pytest.raises(ValueError, match="a batch holds \\(name, tensor\\) pairs; item 0"):
            loader(batch)
    assert not loader.loaded
    loader([["weight", torch.ones(3, 2)], ["bias", torch.ones(3)]])  # a pair may be a list
    assert torch.equal(module.weight, torch.ones(3, 2)) and loader.loaded == {"weight", "bias"}
    loader.reset()
    for info in (None, "x", 5):
        with pytest.raises(ValueError, match="update_info must be a NCCLWeightTransferUpdateInfo or a dict"):
            loader.check(info)
    info = torchxfer.update_info_for(module)
    loader.check(dataclasses.asdict(info))  # as receive_weights takes it
    bad = dict(dataclasses.asdict(info), shapes=[[3, 3], [3]])
    with pytest.raises(ValueError, match="'weight': shape \\[3, 3\\]"):
        loader.check(bad)
    for flag in ("strict", "include_buffers"):
        with pytest.raises(ValueError, match=f"{flag} must be a bool, got None"):
            torchxfer.ModuleLoader(module, **{flag: None})
    with pytest.raises(ValueError, match="include_buffers must be a bool, got None"):
        torchxfer.update_info_for(module, include_buffers=None)


def test_the_library_logs_nothing_unless_the_application_configures_logging():
    """No handler configured: a torchxfer WARNING (an agreed failure, a broken group) must not reach
    stderr through logging's last-resort handler."""
    import subprocess
    import sys

    code = "import logging, torchxfer; logging.getLogger('torchxfer').warning('update 3 failed on rank 1')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # (torch itself may warn on import, e.g. of a missing NumPy: only our line matters)
    assert done.returncode == 0 and "update 3 failed" not in done.stderr + done.stdout, done.stderr


def test_a_destroyed_group_says_so():
    group = _alone(torchxfer.NCCLWeightTransferEngine, backend="gloo")
    torchxfer.destroy_side_group(group)
    with pytest.raises(ValueError, match="this side group was destroyed"):
        torchxfer.NCCLWeightTransferEngine.trainer_send_weights([("w", torch.zeros(2))], group)
