"""The engine API: the trainer's two static calls and the inference worker's engine.

Trainer (rank 0 of the side group)::

    group = NCCLWeightTransferEngine.trainer_init(dict(master_address=..., master_port=..., world_size=...))
    NCCLWeightTransferEngine.trainer_send_weights(model.named_parameters(), group, packed=True)

Inference worker (every rank of every server, all together)::

    engine = NCCLWeightTransferEngine(WeightTransferConfig(...), ParallelConfig(...))
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(...))
    engine.receive_weights(None, load_weights)   # once per update, while the trainer sends
"""

from __future__ import annotations

import abc
import contextlib
import logging
import itertools
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import torch

from .config import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
    DEFAULT_TIMEOUT_S,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
    ParallelConfig,
    TransferStats,
    WeightTransferConfig,
    check_backend,
    check_send,
    check_source,
    check_timeout,
    check_visible,
    parse_info,
    source_length,
    resolved_device,
    worker_rank,
)
from .errors import TransferError
import torch.distributed as dist

from .colocated import is_colocated
from .group import create_side_group, destroy_side_group, form_side_group, side_group
from .rendezvous import Cancel
from .receiver import LoadWeights, ReceiveProgress, Receiver
from .pulling import gc_paused
from .sender import Sender

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None

__all__ = ["WeightTransferEngine", "NCCLWeightTransferEngine", "IPCWeightTransferEngine", "create_engine"]

log = logging.getLogger("torchxfer")

InitInfoT = TypeVar("InitInfoT")
UpdateInfoT = TypeVar("UpdateInfoT")


class WeightTransferEngine(abc.ABC, Generic[InitInfoT, UpdateInfoT]):
    """Base of transfer engines, typed over their init and update infos.

    Subclasses set ``init_info_cls`` and ``update_info_cls``; dicts (as they
    arrive over an HTTP control plane) are parsed by :meth:`parse_init_info`
    and :meth:`parse_update_info` in one place, raising ValueError.
    """

    init_info_cls: ClassVar[type]
    update_info_cls: ClassVar[type]

    def __init__(self, config: WeightTransferConfig, parallel_config: ParallelConfig) -> None:
        if not isinstance(config, WeightTransferConfig):
            raise ValueError(f"config must be a WeightTransferConfig, got {type(config).__name__}")
        if not isinstance(parallel_config, ParallelConfig):
            raise ValueError(f"parallel_config must be a ParallelConfig, got {type(parallel_config).__name__}")
        self.config = config
        self.parallel_config = parallel_config

    @classmethod
    def parse_init_info(cls, init_dict: Mapping[str, Any]) -> InitInfoT:
        """Build the init info from a dict; ValueError on unknown, missing or bad values."""
        return parse_info(cls.init_info_cls, init_dict, "init info")

    @classmethod
    def parse_update_info(cls, update_dict: Mapping[str, Any]) -> UpdateInfoT:
        """Build the update info from a dict; ValueError on unknown, missing or bad values."""
        return parse_info(cls.update_info_cls, update_dict, "update info")

    @abc.abstractmethod
    def init_transfer_engine(self, init_info: InitInfoT) -> None: ...

    @abc.abstractmethod
    def receive_weights(self, update_info: UpdateInfoT | None, load_weights: LoadWeights) -> TransferStats: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...


class _WorkerEngine(WeightTransferEngine[InitInfoT, UpdateInfoT]):
    """What every worker engine of a side group shares: the group, the lock that
    keeps one call at a time, ``weights_version`` and ``torn``, the rank formula
    check, and the frame of ``receive_weights``. Subclasses say how to join the
    group (:meth:`_join`) and which receiver runs an update (``_receiver``)."""

    _receiver: ClassVar[Callable[..., Any]]

    def __init__(self, config: WeightTransferConfig, parallel_config: ParallelConfig) -> None:
        super().__init__(config, parallel_config)
        self.model_update_group: dist.ProcessGroup | None = None
        self._lock = threading.Lock()
        self._joining = threading.Lock()  # held for moments: an init installing its group, shutdown taking it
        self._cancel = Cancel()  # the inits begun since the last shutdown(): it sets and replaces it
        self._weights_version: int | None = None
        self._torn = False

    @property
    def weights_version(self) -> int | None:
        """Update id of the last update fully loaded into this worker, or None."""
        return self._weights_version

    @property
    def torn(self) -> bool:
        """True when an update failed after ``load_weights`` had started.

        The model then holds a mix of two versions: a server must not answer
        from it until the next update succeeds (or it reloads a checkpoint).
        ``receive_weights(..., atomic=True)`` never leaves weights torn by a
        transfer failure.
        """
        return self._torn

    @abc.abstractmethod
    def _join(self, info: Any, rank: int, cancel: Cancel) -> dist.ProcessGroup:
        """Form the group as ``rank`` (called under the lock); bounded by ``config.timeout_s``,
        and stopped with TransferError once ``cancel`` is set."""

    def init_transfer_engine(self, init_info: Any) -> None:
        with self._joining:  # first: a shutdown() from now on stops this call, wherever it is
            cancel = self._cancel
        info = self.parse_init_info(init_info)
        with self._lock:
            if cancel.is_set():  # shutdown() came while this call waited for another one
                raise Cancel.error()
            if self.model_update_group is not None:
                raise RuntimeError("the transfer engine is already initialized; call shutdown() first")
            check_visible("init_transfer_engine", self.device)
            pc = self.parallel_config
            rank = worker_rank(pc, info.rank_offset)
            if rank >= info.world_size:
                raise ValueError(
                    f"worker rank {rank} (data_parallel_rank {pc.data_parallel_rank} x {pc.world_size} + rank "
                    f"{pc.rank} + rank_offset {info.rank_offset}) is outside the side group's world_size "
                    f"{info.world_size}"
                )
            try:
                group = self._join(info, rank, cancel)
            except BaseException:
                cancel.release()  # the group it held is closed: nothing keeps it for the next shutdown()
                raise
            with self._joining:
                if not cancel.is_set():
                    cancel.release()  # the group is the engine's now: shutdown() destroys it
                    self.model_update_group = group
                    return
            destroy_side_group(group)  # shutdown() came as the group formed: it must not outlive that call
            raise Cancel.error()

    def receive_weights(self, update_info: Any, load_weights: LoadWeights, *, atomic: bool = False) -> TransferStats:
        group = self.model_update_group
        if group is None:
            raise RuntimeError("weight transfer is not initialized; call init_transfer_engine() first")
        info = None if update_info is None else self.parse_update_info(update_info)
        if not callable(load_weights):
            raise ValueError(f"load_weights must be callable, got {load_weights!r}")
        if not isinstance(atomic, bool):  # it travels in this rank's rows: checked before any is posted
            raise ValueError(f"atomic must be a bool, got {atomic!r:.80}")
        progress = ReceiveProgress()
        with self._lock:
            if self.model_update_group is not group:  # shut down (or re-initialized) while this call waited
                raise TransferError("the engine was shut down while this receive_weights waited for another one; "
                                    "call init_transfer_engine() again", broken=True)  # fmt: skip
            side = side_group(group)
            side.check_usable()
            try:
                # gc: thousands of views handed to load_weights, no collection meanwhile
                with side.breaks_on_interrupt(), gc_paused():
                    return type(self)._receiver(side, info, load_weights, self.device, atomic=atomic,
                                                progress=progress).run()  # fmt: skip
            except TransferError as e:
                if not e.broken:  # a broken group was logged when it broke
                    log.warning("update %s failed on rank %d: %s", progress.update_id, side.rank(), e)
                raise
            finally:
                if progress.applied:
                    self._weights_version, self._torn = progress.update_id, False
                elif progress.loads_started:
                    self._torn = True

    def shutdown(self) -> None:
        """Leave the group and free what it holds. Local, idempotent, never blocks on peers.

        Called from another thread while :meth:`init_transfer_engine` runs, it stops that
        call and any other begun before it (each raises TransferError within about 50 ms,
        wherever it is: waiting for the engine, forming the group, or proving its
        connections) and leaves the engine uninitialized; an init called after it returns
        joins as usual."""
        with self._joining:
            self._cancel.set()  # closes a group an init formed and has not handed over yet
            self._cancel = Cancel()  # for the inits called from now on
            group, self.model_update_group = self.model_update_group, None
        if group is not None:
            destroy_side_group(group)


class NCCLWeightTransferEngine(_WorkerEngine[NCCLWeightTransferInitInfo, NCCLWeightTransferUpdateInfo]):
    """Receives weights from a trainer over a torch.distributed side group.

    One engine per inference worker process. Its side-group rank is
    ``data_parallel_rank x (TP x PP) + rank + rank_offset``. The backend is
    NCCL on GPUs or Gloo (CPU tensors, or CUDA tensors through host memory).

    Attributes:
        model_update_group: the side group (a ``torch.distributed
            .ProcessGroup``), or None before :meth:`init_transfer_engine` and
            after :meth:`shutdown`.
    """

    init_info_cls = NCCLWeightTransferInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo
    _receiver = Receiver

    def __init__(self, config: WeightTransferConfig, parallel_config: ParallelConfig) -> None:
        super().__init__(config, parallel_config)
        if config.backend not in ("nccl", "gloo"):
            raise ValueError(f"NCCLWeightTransferEngine needs backend 'nccl' or 'gloo', got {config.backend!r} "
                             "(use create_engine(config, parallel_config) to pick the engine from the config)")

    # -- worker side ---------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where received weights land."""
        if self.config.device is not None:
            return resolved_device(self.config.device)
        if self.config.backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo | Mapping[str, Any]) -> None:
        """Join the trainer's side group. Every worker and the trainer's
        ``trainer_init`` call this together; blocks at most ``timeout_s``.

        Raises:
            ValueError: bad init info, or a rank that cannot exist in the world.
            RuntimeError: the engine is already initialized.
            TransferError: the group could not be formed (see ``create_side_group``).
        """
        super().init_transfer_engine(init_info)

    def _join(self, info: NCCLWeightTransferInitInfo, rank: int, cancel: Cancel) -> dist.ProcessGroup:
        return form_side_group(
            info.master_address, info.master_port, rank, info.world_size, backend=self.config.backend,
            device=self.device, timeout_s=self.config.timeout_s, token=info.token, cancel=cancel,
        )  # fmt: skip

    def receive_weights(
        self,
        update_info: NCCLWeightTransferUpdateInfo | Mapping[str, Any] | None,
        load_weights: LoadWeights,
        *,
        atomic: bool = False,
    ) -> TransferStats:
        """Receive one update and hand it to ``load_weights``.

        Every worker calls this while the trainer runs ``trainer_send_weights``;
        it blocks until the update is complete on every rank. The wait for the
        update to begin, and every collective after, is bounded by
        ``config.timeout_s``.

        Args:
            update_info: the expected names, dtypes and shapes (checked against
                the trainer's in-band header before payload moves), or None to
                take them from the header.
            load_weights: called with ``[(name, tensor), ...]``. The tensors are
                views into a reused receive buffer, valid only during the call:
                copy what you keep. Called once per bucket, in send order, or
                once per update with ``atomic=True``.
            atomic: stage the whole update (one extra copy of the model in
                memory) and call ``load_weights`` only after every rank has
                received all of it, so a failed transfer never tears weights.

        Raises:
            RuntimeError: before ``init_transfer_engine``.
            ValueError: bad ``update_info``, ``load_weights`` or ``atomic``.
            TransferError: on every rank, for any disagreement between the
                sides, a failing ``load_weights`` on any rank, an aborted
                update, or a dead or silent peer. Check ``err.broken``: if
                True, ``shutdown()`` and ``init_transfer_engine()`` again.
        """
        return super().receive_weights(update_info, load_weights, atomic=atomic)

    @staticmethod
    def trainer_init(
        init_info: NCCLWeightTransferInitInfo | Mapping[str, Any],
        *,
        backend: str | None = None,
        timeout_s: float | None = None,
    ) -> dist.ProcessGroup:
        """Create the side group as its rank 0. Called by the one trainer process
        that sends (global rank 0 under torchrun), together with every worker's
        ``init_transfer_engine``; blocks at most ``timeout_s``.

        Args:
            init_info: ``master_address``, ``master_port``, ``world_size`` and
                optionally ``token`` (``rank_offset`` is accepted and ignored:
                the trainer is rank 0).
            backend: "nccl" or "gloo"; default "nccl" when CUDA is available.
            timeout_s: bound on every wait on the group (default 300).

        Returns:
            The side group, a ``torch.distributed.ProcessGroup``. Release it with
            ``torchxfer.destroy_side_group(group)``; the port is free once the
            group is dropped.
        """
        if isinstance(init_info, Mapping):  # rank_offset is the workers': ignored here, whatever it is
            init_info = {**init_info, "rank_offset": 1}
        info = parse_info(NCCLWeightTransferInitInfo, init_info, "init info")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        backend = check_backend("trainer_init", backend)
        timeout = check_timeout("trainer_init", DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" and torch.cuda.is_available() else None
        return create_side_group(
            info.master_address, info.master_port, 0, info.world_size,
            backend=backend, device=device, timeout_s=timeout, token=info.token,
        )  # fmt: skip

    @staticmethod
    def trainer_send_weights(
        iterator: Iterable[tuple[str, torch.Tensor]],
        group: dist.ProcessGroup,
        src: int = 0,
        post_iter_func: Callable[[tuple[str, torch.Tensor]], torch.Tensor] | None = None,
        packed: bool = False,
        stream: torch.cuda.Stream | None = None,
        packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
        *,
        checksum: bool = False,
        zero_copy: bool = True,
        version: int | None = None,
    ) -> TransferStats:
        """Send one update of ``(name, tensor)`` pairs to every worker.

        Called on rank 0 of ``group`` while every worker runs
        ``receive_weights``; returns once every worker has loaded the update.
        Each collective is bounded by the group's ``timeout_s``. The iterator is
        pulled lazily, one tensor ahead of the bucket being packed.

        Args:
            iterator: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
            group: the side group from :meth:`trainer_init`.
            src: the sending rank; must be 0 (the trainer).
            post_iter_func: maps each ``(name, tensor)`` pair to the tensor to
                send (default: the tensor).
            packed: pack tensors into ``packed_num_buffers`` buffers of
                ``packed_buffer_size_bytes`` (fast); otherwise one broadcast per
                tensor.
            stream: CUDA stream for the unpacked broadcasts (packed mode uses
                one stream per buffer).
            checksum: send a checksum per bucket; receivers verify it (a position-weighted
                sum of 16-bit half-words modulo a prime: any changed, dropped or swapped
                half-word is caught; it guards against corruption, not against a peer).
            zero_copy: broadcast large contiguous tensors straight from their
                memory instead of packing them. Such a tensor stays referenced
                until its broadcast completes; pass False when the iterator
                makes fresh tensors (gathers, casts) and peak memory must stay
                at the buffers plus one tensor.
            version: the id this update carries (e.g. the training step), which
                workers report as ``weights_version``; default: one more than
                the previous update on this group, from 0.

        Raises:
            ValueError: bad arguments, or a tensor the wire cannot carry (the
                workers then get TransferError naming it).
            TransferError: a worker rejected the update or failed, or a peer died.

        A DTensor (FSDP2 parameters, ``distribute_tensor``) is refused with a
        ValueError naming ``send_model``, which every trainer rank calls
        together: gathering it here would wait in a collective that the other
        trainer ranks never join. The first pair is checked before anything
        moves; a DTensor further on aborts the update for the workers.
        """
        return send_pairs(iterator, group, src, post_iter_func, packed, stream, packed_buffer_size_bytes,
                          packed_num_buffers, checksum=checksum, zero_copy=zero_copy, version=version)  # fmt: skip


def send_pairs(iterator: Iterable[tuple[str, torch.Tensor]], group: dist.ProcessGroup, src: int = 0,
               post_iter_func: Callable | None = None, packed: bool = False, stream: Any = None,
               packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
               packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS, *, checksum: bool = False,
               zero_copy: bool = True, version: int | None = None, owned: bool = False,
               started: Callable[[Sender], None] | None = None) -> TransferStats:  # fmt: skip
    """``trainer_send_weights``; with ``owned``, the pairs are tensors the package made for this
    update (send_model's gathers and casts) that nothing else writes: they may be pulled a
    bucket ahead and packed in fused batches, whatever their identity. ``started`` is handed
    the Sender before the update begins."""
    side = side_group(group)  # ValueError unless it is a side group
    if is_colocated(group):  # its workers read shared buffers and post no broadcast: nothing would arrive
        raise ValueError("the group is a colocated one (IPCWeightTransferEngine.trainer_init): send with "
                         "IPCWeightTransferEngine.trainer_send_weights, or torchxfer.send_model")  # fmt: skip
    if isinstance(src, bool) or not isinstance(src, numbers.Integral) or src != 0 or group.rank() != 0:
        raise ValueError(f"the trainer sends as rank 0 of the side group; got src={src!r} on rank {group.rank()}")
    check_send("trainer_send_weights", packed, packed_buffer_size_bytes, packed_num_buffers, version,
               checksum=checksum, zero_copy=zero_copy)  # fmt: skip
    check_source("trainer_send_weights", iterator, post_iter_func)
    if stream is not None and not isinstance(stream, (torch.cuda.Stream, getattr(torch, "Stream", torch.cuda.Stream))):
        raise ValueError(f"trainer_send_weights: stream must be None or a CUDA stream, got {stream!r:.80}")
    num_tensors = source_length("trainer_send_weights", iterator)
    # one_update raises a closed or broken group's TransferError; gc: paused from the first pull on
    with side.one_update(), gc_paused():
        check, rest = None, None
        if not owned:  # the package's own pairs (send_model) are never DTensors, and are pulled only once the update began
            iterator, check, rest = _refuse_dtensors(iterator, post_iter_func)
        sender = Sender(side, packed=packed, buffer_size=packed_buffer_size_bytes, num_buffers=packed_num_buffers,
                        checksum=checksum, zero_copy=zero_copy, version=version, num_tensors=num_tensors,
                        owned=owned)  # fmt: skip
        if started is not None:
            started(sender)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return sender.run(iterator, post_iter_func, check, rest=rest)


_DTENSOR_HINT = (
    "is a DTensor (sharded over trainer ranks, e.g. by fully_shard): gathering it needs every trainer "
    "rank, so use torchxfer.send_model(model, group) on every trainer rank (group None on all but the "
    "sender) instead of trainer_send_weights"
)


def _check_plain(name: Any, tensor: Any) -> None:
    """ValueError naming ``send_model`` if ``tensor`` is a DTensor."""
    if isinstance(tensor, _DTensor):
        raise ValueError(f"tensor {name!r} {_DTENSOR_HINT}")


def _refuse_dtensors(iterator: Iterable[Any], post_iter_func: Callable | None
                     ) -> tuple[Iterable[Any], Callable[[Any, Any], None] | None, Iterator[Any] | None]:  # fmt: skip
    """Check the first pair now (before any collective); returns the pairs (that
    one included), the check for every later one, run as each is pulled, and the
    caller's own iterator the pairs go on with after the first (None: the pairs
    are the caller's iterable itself)."""
    if _DTensor is None:
        return iterator, None, None
    it = iter(iterator)
    try:
        head = [next(it)]
    except StopIteration:
        return (), None, None
    except Exception as e:  # the source's own failure: raised when pulled, so the workers hear of it

        def failing(error: Exception = e) -> Iterator[Any]:
            raise error
            yield  # noqa: unreachable - makes this a generator

        return failing(), None, None
    first = head[0]
    if isinstance(first, tuple) and len(first) == 2:
        _check_plain(first[0], first[1])
    return itertools.chain(head, it), _check_plain, it


def create_engine(config: WeightTransferConfig, parallel_config: ParallelConfig) -> WeightTransferEngine:
    """The worker engine that ``config.backend`` names: NCCLWeightTransferEngine for "nccl" and "gloo",
    IPCWeightTransferEngine for "ipc" (colocated). Local; ValueError for a bad config.

    A server that reads its config from a file switches from a broadcast to colocated
    transfers by changing ``backend`` alone.
    """
    if not isinstance(config, WeightTransferConfig):
        raise ValueError(f"config must be a WeightTransferConfig, got {type(config).__name__}")
    if config.backend == "ipc":
        return IPCWeightTransferEngine(config, parallel_config)
    return NCCLWeightTransferEngine(config, parallel_config)


# The colocated engine lives in its own module, which builds on this one.
from .ipc_engine import IPCWeightTransferEngine  # noqa: E402

# TransferError is re-exported here for callers that import the engine module alone.
__all__ += ["TransferError"]
