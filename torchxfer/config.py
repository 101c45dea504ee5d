"""Configuration dataclasses, validated in ``__post_init__`` (ValueError names the value).

The rank formula for inference workers lives here, in :func:`worker_rank`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from .packing import ALIGNMENT, TensorSpec, dtype_name, parse_dtype
from .wire import MAX_COUNT

__all__ = [
    "DEFAULT_PACKED_BUFFER_SIZE_BYTES",
    "DEFAULT_PACKED_NUM_BUFFERS",
    "DEFAULT_TIMEOUT_S",
    "WeightTransferConfig",
    "ParallelConfig",
    "NCCLWeightTransferInitInfo",
    "IPCWeightTransferInitInfo",
    "NCCLWeightTransferUpdateInfo",
    "TransferStats",
    "worker_rank",
]

DEFAULT_PACKED_BUFFER_SIZE_BYTES = 1 << 30
DEFAULT_PACKED_NUM_BUFFERS = 2
DEFAULT_TIMEOUT_S = 300.0
BACKENDS = ("nccl", "gloo")
ENGINE_BACKENDS = BACKENDS + ("ipc",)
"""What ``WeightTransferConfig.backend`` names: a side-group backend, or "ipc" (colocated)."""
MAX_NUM_BUFFERS = 64


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(owner: str, field: str, value: Any, lo: int, hi: int | None = None) -> None:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{owner}.{field} must be an int {bound}, got {value!r}")


MAX_WORLD_SIZE = 1 << 16
"""The most ranks one side group may hold (the trainer and every worker); its rendezvous
reads a key per rank from the trainer's store."""

MAX_TIMEOUT_S = 1e8
"""The largest ``timeout_s`` (about three years): beyond about 9e9 s Python's own waits and
torch's millisecond timeouts overflow."""


def check_timeout(owner: str, value: Any) -> float:
    try:
        seconds = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"{owner}.timeout_s must be a positive number of seconds up to {MAX_TIMEOUT_S:g}, "
                         f"got {value!r:.40}")  # fmt: skip
    return seconds


def check_address(owner: str, address: object, field: str = "master_address") -> None:
    """ValueError unless ``address`` can name a host: a non-empty string without surrounding
    spaces or NUL that the resolver can encode (IDNA: no empty label, none over 63 characters).
    ``field``: the argument's name, as the message gives it."""
    ok = isinstance(address, str) and address == address.strip() and address and "\0" not in address
    if ok:
        try:
            address.encode("idna")
        except UnicodeError:
            ok = False
    if not ok and field == "master_address":
        raise ValueError(f"{owner}.master_address must be a host name or address, got {address!r:.80}")
    if not ok:
        raise ValueError(f"{owner}: {field} must be a non-empty string, got {address!r:.80} (a host name or address "
                         "the resolver can encode, without surrounding spaces)")  # fmt: skip


def check_token(owner: str, token: Any) -> None:
    """A token is None or a non-empty string that UTF-8 can carry (the HMACs are over its bytes)."""
    if token is None:
        return
    if not isinstance(token, str) or not token:
        raise ValueError(f"{owner}: token must be a non-empty string or None")
    try:
        token.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{owner}: token holds a character UTF-8 cannot encode (a lone surrogate)") from None


def env_flag(name: str, default: bool) -> bool:
    """An on/off switch from the environment: 1/true/yes/on or 0/false/no/off (any case);
    unset or anything else: ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def wait_timeout(seconds: float) -> datetime.timedelta:
    """``seconds`` as a bound for ``Work.wait``: at least 1 ms, since a wait
    of 0 ms (a shorter timedelta truncates to it) means "no timeout" to
    torch's ``Work.wait`` (torch 2.6-2.13) and would never return."""
    return datetime.timedelta(seconds=max(float(seconds), 1e-3))


def parse_device(owner: str, value: Any) -> torch.device:
    """``value`` as a torch.device, or a ValueError naming it. An index torch would store
    wrapped ("cuda:256" is parsed as cuda:0: an index is one signed byte) is refused too."""
    given = None
    if isinstance(value, int) and not isinstance(value, bool):
        given = value
    elif isinstance(value, str) and ":" in value and value.rsplit(":", 1)[1].strip().isdigit():
        given = int(value.rsplit(":", 1)[1])
    if given is not None and not 0 <= given < 128:
        raise ValueError(f"{owner}: device {value!r:.80} has an index torch cannot hold (at most 127)")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{owner}: device {value!r:.80} is not a device: {e}") from None
    if dev.type == "cpu" and dev.index is not None:
        # CPU tensors report device "cpu" whatever index made them: "cpu:1" would never match one
        if dev.index != 0:
            raise ValueError(f"{owner}: device {value!r:.80} names a CPU index; the CPU is one device: use 'cpu'")
        dev = torch.device("cpu")
    return dev


def resolved_device(device: Any) -> torch.device:
    """``device`` as a torch.device, a CUDA device without an index made the current one
    ("cuda" -> "cuda:N"), so that tensors' devices compare equal to it."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_visible(owner: str, device: torch.device) -> torch.device:
    """``device`` if this process can use it: the CPU, or a CUDA device it sees; else a
    ValueError naming it, before any socket is opened (it would fail at the first tensor)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is None or not 0 <= device.index < count:
            raise ValueError(f"{owner}: device {str(device)!r} is not a CUDA device this process sees "
                             f"({count} visible)")  # fmt: skip
    return device


def check_backend(owner: str, value: Any) -> str:
    if value not in BACKENDS:
        raise ValueError(f"{owner}.backend must be one of {BACKENDS}, got {value!r}")
    return value


MAX_BUFFER_BYTES = 1 << 62
"""The largest ``packed_buffer_size_bytes``: rows carry it as an int64."""


def check_buffers(owner: str, buffer_size: Any, num_buffers: Any) -> None:
    _check_int(owner, "packed_buffer_size_bytes", buffer_size, ALIGNMENT, MAX_BUFFER_BYTES)
    _check_int(owner, "packed_num_buffers", num_buffers, 1, MAX_NUM_BUFFERS)


def check_send(owner: str, packed: Any, buffer_size: Any, num_buffers: Any, version: Any, **flags: Any) -> None:
    """The arguments every send takes (``trainer_send_weights`` of both engines, ``send_model``),
    checked in one place; ``flags``: more arguments that must be bools (``checksum=...``)."""
    for name, value in (("packed", packed), *flags.items()):
        if not isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be a bool, got {value!r:.80}")
    check_buffers(owner, buffer_size, num_buffers)
    if version is not None and (not _is_int(version) or not 0 <= version < 1 << 62):
        raise ValueError(f"{owner}: version must be an int in [0, 2**62), got {version!r}")


def check_source(owner: str, iterator: Any, post_iter_func: Any) -> None:
    """A source of ``(name, tensor)`` pairs: anything ``iter()`` accepts (not called here: a
    source's ``__iter__`` may do work), and ``post_iter_func`` None or callable."""
    if not (hasattr(type(iterator), "__iter__") or hasattr(type(iterator), "__getitem__")):
        raise ValueError(f"{owner}: the source must be an iterable of (name, tensor) pairs, "
                         f"got {type(iterator).__name__}: {iterator!r:.80}")  # fmt: skip
    if post_iter_func is not None and not callable(post_iter_func):
        raise ValueError(f"{owner}: post_iter_func must be callable, got {post_iter_func!r:.80}")


def source_length(owner: str, iterator: Any) -> int | None:
    """How many pairs a source says it holds (``len()``, when it has one), announced to the
    workers: ValueError when that fails or names more tensors than an update may hold."""
    if not hasattr(iterator, "__len__"):
        return None
    try:
        count = len(iterator)
    except (OverflowError, TypeError, ValueError) as e:
        raise ValueError(f"{owner}: the source's len() failed: {type(e).__name__}: {e}") from None
    if count > MAX_COUNT:
        raise ValueError(f"{owner}: the source's len() is {count}, more tensors than an update may hold")
    return count


@dataclasses.dataclass
class WeightTransferConfig:
    """How an inference worker's engine talks to the trainer."""

    backend: str = "nccl"
    """"nccl" (CUDA tensors, one GPU per rank), "gloo" (CPU tensors, or CUDA
    tensors staged through host memory) or "ipc" (colocated: the trainer on the
    same GPU or host shares its buffers; see ``IPCWeightTransferEngine``).
    Must match the trainer's engine and backend."""
    timeout_s: float = 300.0
    """Bound on every wait: store rendezvous, each collective, and the wait for
    an update to begin once ``receive_weights`` is called."""
    device: str | torch.device | None = None
    """Where received weights land. None: the current CUDA device for "nccl",
    the CPU for "gloo"."""

    def __post_init__(self) -> None:
        if self.backend not in ENGINE_BACKENDS:
            raise ValueError(f"WeightTransferConfig.backend must be one of {ENGINE_BACKENDS}, got {self.backend!r}")
        self.timeout_s = check_timeout("WeightTransferConfig", self.timeout_s)
        if self.device is not None:
            self.device = parse_device("WeightTransferConfig.device", self.device)
            if self.backend == "nccl" and self.device.type != "cuda":
                raise ValueError(f"backend 'nccl' needs a CUDA device, got device {self.device}")
            if self.device.type not in ("cpu", "cuda"):  # what a side group's backends and shared buffers serve
                raise ValueError(f"WeightTransferConfig.device must be a CUDA device or the CPU, got {self.device}")


@dataclasses.dataclass
class ParallelConfig:
    """Where this worker sits in its inference server: DP x TP x PP."""

    data_parallel_rank: int = 0
    """Index of this worker's data-parallel replica, in [0, data_parallel_size)."""
    rank: int = 0
    """Rank within the replica (TP x PP), in [0, world_size)."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        for field in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            _check_int("ParallelConfig", field, getattr(self, field), 1, MAX_WORLD_SIZE)
        if self.world_size * self.data_parallel_size >= MAX_WORLD_SIZE:
            raise ValueError(f"ParallelConfig: DP x TP x PP = {self.world_size * self.data_parallel_size} workers, "
                             f"a side group holds at most {MAX_WORLD_SIZE} ranks")  # fmt: skip
        _check_int("ParallelConfig", "rank", self.rank, 0, self.world_size - 1)
        _check_int("ParallelConfig", "data_parallel_rank", self.data_parallel_rank, 0, self.data_parallel_size - 1)

    @property
    def world_size(self) -> int:
        """Ranks in one data-parallel replica: TP x PP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def worker_rank(parallel_config: ParallelConfig, rank_offset: int) -> int:
    """This worker's rank in the side group.

    ``data_parallel_rank x (TP x PP) + rank + rank_offset``; the trainer is rank
    0, so ``rank_offset`` is at least 1. ValueError for anything else.
    """
    if not isinstance(parallel_config, ParallelConfig):
        raise ValueError(f"worker_rank: parallel_config must be a ParallelConfig, got {parallel_config!r:.80}")
    _check_int("worker_rank", "rank_offset", rank_offset, 1, MAX_WORLD_SIZE - 1)
    return parallel_config.data_parallel_rank * parallel_config.world_size + parallel_config.rank + rank_offset


@dataclasses.dataclass
class NCCLWeightTransferInitInfo:
    """Where the side group's store listens and how large the group is.

    The trainer (rank 0) binds ``master_address:master_port``; workers connect
    to it. Every rank of the side group must be given the same values.
    """

    master_address: str
    master_port: int
    rank_offset: int
    """Side-group rank of the first worker of this server (>= 1)."""
    world_size: int
    """Total ranks in the side group: the trainer plus every worker."""
    token: str | None = None
    """Shared secret. When set on any rank it must be set, equal, on every rank:
    each rank proves it knows it (an HMAC over a per-group nonce) before any
    weight moves. The token itself never travels."""

    def __post_init__(self) -> None:
        check_address(type(self).__name__, self.master_address)
        _check_int(type(self).__name__, "master_port", self.master_port, 1, 65535)
        _check_int(type(self).__name__, "rank_offset", self.rank_offset, 1)
        _check_int(type(self).__name__, "world_size", self.world_size, 1, MAX_WORLD_SIZE)
        check_token(type(self).__name__, self.token)

    def __repr__(self) -> str:  # never print the secret
        token = None if self.token is None else "***"
        return (
            f"NCCLWeightTransferInitInfo(master_address={self.master_address!r}, master_port={self.master_port}, "
            f"rank_offset={self.rank_offset}, world_size={self.world_size}, token={token})"
        )


@dataclasses.dataclass(repr=False)
class IPCWeightTransferInitInfo(NCCLWeightTransferInitInfo):
    """Where a colocated side group's store listens and how large the group is.

    The same fields and checks as :class:`NCCLWeightTransferInitInfo`: the
    trainer (rank 0) binds ``master_address:master_port`` (a local address:
    the ranks share a host) and only control rows travel through it.
    """

    def __repr__(self) -> str:  # never print the secret
        return super().__repr__().replace("NCCLWeightTransferInitInfo", "IPCWeightTransferInitInfo", 1)


@dataclasses.dataclass
class NCCLWeightTransferUpdateInfo:
    """Out-of-band description of one update, checked against the in-band header.

    Both producer and consumer must use the same ``packed`` flag and, when they
    pack, the same ``packed_buffer_size_bytes`` and ``packed_num_buffers``; any
    disagreement raises TransferError on every rank before payload moves. Unpacked
    (``packed=False`` on both sides), no buffer is used: the two sizes are not
    compared.
    """

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    packed: bool = False
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS

    def __post_init__(self) -> None:
        for field in ("names", "dtype_names", "shapes"):
            if not isinstance(getattr(self, field), (list, tuple)):
                raise ValueError(f"{field} must be a list, got {type(getattr(self, field)).__name__}")
        n = len(self.names)
        if len(self.dtype_names) != n:
            raise ValueError(f"dtype_names has {len(self.dtype_names)} entries but names has {n}")
        if len(self.shapes) != n:
            raise ValueError(f"shapes has {len(self.shapes)} entries but names has {n}")
        if not isinstance(self.packed, bool):
            raise ValueError(f"packed must be a bool, got {self.packed!r}")
        check_buffers("NCCLWeightTransferUpdateInfo", self.packed_buffer_size_bytes, self.packed_num_buffers)
        specs = []
        for name, dtype, shape in zip(self.names, self.dtype_names, self.shapes):
            try:
                specs.append(TensorSpec(name, parse_dtype(dtype), shape))
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from None
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"names lists {spec.name!r} twice")
            seen.add(spec.name)
        object.__setattr__(self, "_specs", tuple(specs))
        if "_revision" not in self.__dict__:
            object.__setattr__(self, "_revision", 0)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _UPDATE_FIELDS and "_specs" in self.__dict__:
            # A field assigned after construction: checked again, its specs made again, when next read.
            object.__setattr__(self, "_specs", None)
            object.__setattr__(self, "_revision", self._revision + 1)

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        """The tensors it lists; ValueError if a field assigned since it was built is not valid.
        (Fields are read when built and when assigned: change a list by assigning a new one.)"""
        if self._specs is None:
            self.__post_init__()
        return self._specs

    @property
    def revision(self) -> int:
        """How many times a field was assigned since construction (a receiver that checked a
        layout against this object checks it again when this moved)."""
        return self._revision

    def refresh(self) -> None:
        """Check fields assigned since construction (ValueError), as :attr:`specs` does."""
        self.specs

    @classmethod
    def from_named_tensors(
        cls,
        named_tensors: Any,
        *,
        packed: bool = False,
        packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
    ) -> NCCLWeightTransferUpdateInfo:
        """Describe ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``."""
        if isinstance(named_tensors, (str, bytes, Mapping)) or not hasattr(type(named_tensors), "__iter__"):
            raise ValueError(f"from_named_tensors takes an iterable of (name, tensor) pairs, got "
                             f"{type(named_tensors).__name__}: {named_tensors!r:.80}")  # fmt: skip
        names, dtypes, shapes = [], [], []
        for pair in named_tensors:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"from_named_tensors takes (name, tensor) pairs, got {pair!r:.80}")
            name, tensor = pair
            spec = TensorSpec.of(name, tensor)
            names.append(name)
            dtypes.append(dtype_name(spec.dtype))
            shapes.append(list(spec.shape))
        return cls(names, dtypes, shapes, packed, packed_buffer_size_bytes, packed_num_buffers)


_UPDATE_FIELDS = frozenset(f.name for f in dataclasses.fields(NCCLWeightTransferUpdateInfo))


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """What one update moved, as seen by the rank that returns it."""

    update_id: int
    num_tensors: int
    num_bytes: int
    seconds: float

    def __post_init__(self) -> None:
        for field in ("update_id", "num_tensors", "num_bytes"):
            _check_int("TransferStats", field, getattr(self, field), 0, 1 << 63)
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not self.seconds >= 0:
            raise ValueError(f"TransferStats.seconds must be a number >= 0, got {self.seconds!r:.40}")

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def parse_info(cls: type, value: Any, what: str) -> Any:
    """``value`` as a ``cls`` (an info dataclass): itself, or built from a dict with exactly its
    fields (ValueError naming unknown or missing keys, or anything else given)."""
    if isinstance(value, cls):
        # Fields may have been assigned since it was built: checked again (an update info checks
        # only fields assigned since, see NCCLWeightTransferUpdateInfo.refresh).
        refresh = getattr(value, "refresh", None)
        refresh() if refresh is not None else value.__post_init__()
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a {cls.__name__} or a dict, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields), key=repr)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; expected keys from {sorted(fields)}")
    missing = sorted(
        name for name, f in fields.items()
        if name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )  # fmt: skip
    if missing:
        raise ValueError(f"{what} is missing keys {missing}")
    return cls(**value)
