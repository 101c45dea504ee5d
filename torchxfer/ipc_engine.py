"""The colocated engine: the trainer and its workers on one GPU (CUDA IPC) or one host (shared memory).

Trainer (rank 0 of the side group, on the workers' GPU or host)::

    group = IPCWeightTransferEngine.trainer_init(dict(master_address="127.0.0.1", master_port=..., world_size=...))
    IPCWeightTransferEngine.trainer_send_weights(model.named_parameters(), group)

Inference worker (every worker, all together)::

    engine = IPCWeightTransferEngine(WeightTransferConfig(backend="ipc"), ParallelConfig(...))
    engine.init_transfer_engine(IPCWeightTransferInitInfo(...))
    engine.receive_weights(None, load_weights)   # once per update, while the trainer sends

Same surface, errors and guarantees as :class:`torchxfer.NCCLWeightTransferEngine`;
only control rows travel between the processes (see :mod:`torchxfer.colocated`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .colocated import colocated_device, trainer_handshake, worker_handshake
from .colocated_receiver import ColocatedReceiver
from .colocated_sender import ColocatedSender
from .config import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
    DEFAULT_TIMEOUT_S,
    IPCWeightTransferInitInfo,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
    ParallelConfig,
    TransferStats,
    WeightTransferConfig,
    check_send,
    check_source,
    check_timeout,
    check_visible,
    parse_device,
    parse_info,
    source_length,
    resolved_device,
)
from .engine import _WorkerEngine
from .group import destroy_side_group, form_side_group, side_group
from .receiver import LoadWeights
from .rendezvous import Cancel

__all__ = ["IPCWeightTransferEngine"]


def _ipc_info(init_info: Any) -> IPCWeightTransferInitInfo:
    """``init_info`` as an :class:`IPCWeightTransferInitInfo`: a dict, one, or the broadcast
    engine's :class:`NCCLWeightTransferInitInfo` (the same fields), so that a server switches
    engines by its config alone; ValueError for anything else."""
    if isinstance(init_info, NCCLWeightTransferInitInfo) and not isinstance(init_info, IPCWeightTransferInitInfo):
        init_info = {f.name: getattr(init_info, f.name) for f in dataclasses.fields(init_info) if f.init}
    return parse_info(IPCWeightTransferInitInfo, init_info, "init info")


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _form(info: IPCWeightTransferInitInfo, rank: int, device: torch.device, timeout_s: float,
          cancel: Cancel | None = None) -> dist.ProcessGroup:  # fmt: skip
    """The side group (Gloo: it carries control rows only), then the colocated handshake;
    ``cancel`` (an engine's) stops either within 50 ms (see ``form_side_group``)."""
    pg = form_side_group(info.master_address, info.master_port, rank, info.world_size, backend="gloo",
                         timeout_s=timeout_s, token=info.token, cancel=cancel)  # fmt: skip
    try:
        (trainer_handshake if rank == 0 else worker_handshake)(side_group(pg), device)
    except BaseException:
        destroy_side_group(pg)
        if cancel is not None and cancel.is_set():
            raise Cancel.error() from None
        raise
    return pg


class IPCWeightTransferEngine(_WorkerEngine[IPCWeightTransferInitInfo, NCCLWeightTransferUpdateInfo]):
    """Receives weights from a trainer on the same GPU (CUDA IPC) or host (shared memory).

    One engine per inference worker process, with ``WeightTransferConfig(backend="ipc")``.
    Its side-group rank is ``data_parallel_rank x (TP x PP) + rank + rank_offset``.
    Weights land on ``config.device`` (default: the current CUDA device, else the
    CPU), which must be the trainer's GPU (same UUID) or, on the CPU, its host;
    otherwise :meth:`init_transfer_engine` raises TransferError.

    Attributes:
        model_update_group: the side group, or None before :meth:`init_transfer_engine`
            and after :meth:`shutdown`.
    """

    init_info_cls = IPCWeightTransferInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo
    _receiver = ColocatedReceiver

    @classmethod
    def parse_init_info(cls, init_dict: Any) -> IPCWeightTransferInitInfo:
        """Build the init info from a dict, or take an :class:`IPCWeightTransferInitInfo` or an
        :class:`NCCLWeightTransferInitInfo` (a server switched by its config alone); ValueError
        on unknown, missing or bad values."""
        return _ipc_info(init_dict)

    def __init__(self, config: WeightTransferConfig, parallel_config: ParallelConfig) -> None:
        super().__init__(config, parallel_config)
        if config.backend != "ipc":
            raise ValueError(f"IPCWeightTransferEngine needs WeightTransferConfig(backend='ipc'), got {config.backend!r}")

    @property
    def device(self) -> torch.device:
        """Where the trainer's buffers and the received weights are."""
        return resolved_device(self.config.device) if self.config.device is not None else _default_device()

    def init_transfer_engine(self, init_info: IPCWeightTransferInitInfo | Mapping[str, Any]) -> None:
        """Join the trainer's colocated group. Every worker and the trainer's ``trainer_init`` call this
        together; blocks at most about twice ``timeout_s``.

        Raises:
            ValueError: bad init info, or a rank that cannot exist in the world.
            RuntimeError: the engine is already initialized.
            TransferError: the group could not be formed, or the trainer is not on this
                worker's host (CPU) or GPU (CUDA), on every rank.
        """
        super().init_transfer_engine(init_info)

    def _join(self, info: IPCWeightTransferInitInfo, rank: int, cancel: Cancel) -> dist.ProcessGroup:
        return _form(info, rank, self.device, self.config.timeout_s, cancel)

    def receive_weights(
        self,
        update_info: NCCLWeightTransferUpdateInfo | Mapping[str, Any] | None,
        load_weights: LoadWeights,
        *,
        atomic: bool = False,
    ) -> TransferStats:
        """Receive one update and hand it to ``load_weights``.

        Every worker calls this while the trainer runs ``trainer_send_weights``;
        blocks until the update is complete on every rank, each wait bounded by
        ``config.timeout_s``. ``load_weights`` gets views of the trainer's shared
        buffer (zero-copy), valid only during the call: copy what you keep. On
        CUDA the views are ready on the current stream, and copies enqueued
        there during the call are ordered before the trainer reuses the buffer.
        ``update_info`` and ``atomic`` as in the NCCL engine (colocated transfers
        are always packed: ``update_info.packed=False`` skips the buffer checks).

        Raises:
            RuntimeError: before ``init_transfer_engine``.
            ValueError: bad ``update_info``, ``load_weights`` or ``atomic``.
            TransferError: on every rank, for any disagreement, a failing
                ``load_weights``, an aborted update, or a dead or silent peer.
        """
        return super().receive_weights(update_info, load_weights, atomic=atomic)

    # -- trainer side ----------------------------------------------------------------

    @staticmethod
    def trainer_init(
        init_info: IPCWeightTransferInitInfo | Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        device: str | torch.device | None = None,
    ) -> dist.ProcessGroup:
        """Create the colocated group as its rank 0. Called by the trainer process whose GPU (or
        host) the workers share, together with every worker's ``init_transfer_engine``; blocks at
        most about twice ``timeout_s``.

        Args:
            init_info: ``master_address``, ``master_port``, ``world_size`` and optionally
                ``token`` (``rank_offset`` is accepted and ignored: the trainer is rank 0).
            timeout_s: bound on every wait on the group (default 300).
            device: where the shared buffers live (default: the current CUDA device, else
                the CPU); the workers' device must be the same GPU, or the CPU.

        Returns:
            The side group; release it with ``torchxfer.destroy_side_group(group)``.
        """
        if isinstance(init_info, Mapping):  # rank_offset is the workers': ignored here, whatever it is
            init_info = {**init_info, "rank_offset": 1}
        info = _ipc_info(init_info)
        timeout = check_timeout("trainer_init", DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        dev = _default_device() if device is None else parse_device("trainer_init", device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"trainer_init device must be a CUDA device or the CPU, got {dev}")
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        return _form(info, 0, check_visible("trainer_init", dev), timeout)

    @staticmethod
    def trainer_send_weights(
        iterator: Iterable[tuple[str, torch.Tensor]],
        group: dist.ProcessGroup,
        post_iter_func: Callable[[tuple[str, torch.Tensor]], torch.Tensor] | None = None,
        packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
        version: int | None = None,
    ) -> TransferStats:
        """Send one update of ``(name, tensor)`` pairs to every worker of a colocated group.

        Called on rank 0 of ``group`` while every worker runs ``receive_weights``;
        returns once every worker has loaded the update. Each wait is bounded by
        the group's ``timeout_s``. The iterator is pulled lazily: each tensor is
        packed into a shared buffer before the next is pulled.

        Args:
            iterator: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
            group: the side group from :meth:`trainer_init`.
            post_iter_func: maps each pair to the tensor to send.
            packed_buffer_size_bytes, packed_num_buffers: the shared buffers
                (made once per group and size; on the CPU, pages are used as touched).
            version: the id this update carries (``weights_version`` on workers);
                default: one more than the previous update on this group, from 0.

        Raises:
            ValueError: bad arguments, or a tensor that cannot be sent (the
                workers then get TransferError naming it).
            TransferError: a worker rejected the update or failed, or a peer died.
        """
        side = side_group(group)
        colocated_device(side)  # ValueError unless the group is colocated
        if group.rank() != 0:
            raise ValueError(f"the trainer sends as rank 0 of the side group; this is rank {group.rank()}")
        check_send("trainer_send_weights", True, packed_buffer_size_bytes, packed_num_buffers, version)
        check_source("trainer_send_weights", iterator, post_iter_func)
        num_tensors = source_length("IPCWeightTransferEngine.trainer_send_weights", iterator)
        with side.one_update():  # (raises the TransferError of a closed or broken group)
            sender = ColocatedSender(side, buffer_size=packed_buffer_size_bytes, num_buffers=packed_num_buffers,
                                     version=version, num_tensors=num_tensors)  # fmt: skip
            return sender.run(iterator, post_iter_func)
