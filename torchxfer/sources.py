"""Trainer-side sources: send a (possibly sharded) model with bounded memory.

Every trainer rank calls :func:`send_model` over the same model, together, in
the same order; only the sending rank (the one holding the side group, global
rank 0 under torchrun) passes a group, the others pass None::

    group = NCCLWeightTransferEngine.trainer_init(...) if dist.get_rank() == 0 else None
    send_model(model, group, dtype=torch.bfloat16, name_map={"embed.weight": "tok.weight"})

What is sent is planned up front from names, global shapes and dtypes alone
(nothing gathered): the plan fixes names, casts, drops and the order, and
:func:`update_info_for` describes it for servers. A DTensor is then
materialized with a gather on the trainer's own mesh only when the sender's
pipeline pulls it, one tensor ahead of the bucket being packed. So rank 0's
extra memory is the transfer buffers plus about one full tensor, never the
whole model.

Why this cannot deadlock, and what happens on failure (``send_model``):

* **Same plan everywhere.** Before anything moves, one all_gather on the
  trainer group compares a digest of every rank's plan (names, shapes,
  dtypes, placements, order) and checks that exactly one rank sends. A rank
  that iterates another model, order, ``dtype`` or ``name_map`` gets a
  ValueError on every rank at once. Unchecked, its gathers would pair with the
  wrong tensors: Gloo then kills the process ("Received data size doesn't
  match expected size") or, when the shapes agree, silently swaps data.
* **Lockstep before each gather.** Each gather is preceded by a one-int
  all_reduce of a status code on the trainer group. The sender runs it when the
  pipeline pulls the tensor. The others run it as they reach it, so they wait
  there, never inside a gather, while rank 0 works on the side group. Rank 0
  never waits for another trainer rank while it holds the side group's
  collectives, and the others wait only for rank 0, so there is no cycle.
* **Failure.** If rank 0's send fails (a worker rejects the update, a peer
  dies, a side-group timeout), rank 0 posts a failure status. The rank
  waiting at its next lockstep point learns it at once, with rank 0's message,
  and raises TransferError: it does not gather the rest of the model. A
  non-sender that fails on its own (not inside a collective) posts its failure
  the same way. Rank 0 then raises TransferError inside the pipeline's
  source, which aborts the update for every worker. If rank 0 had already
  pulled every tensor, the workers keep the update and rank 0 raises
  TransferError after it. One final status all_reduce tells every trainer
  rank the outcome of a successful update too. Every wait on the trainer
  group is bounded by ``timeout_s`` (default: the trainer group's own
  timeout). A gather that fails as a collective leaves
  the trainer group unusable, as any failed collective does. ``send_model``
  then raises without further trainer-group traffic.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
    NCCLWeightTransferUpdateInfo,
    TransferStats,
    check_buffers,
)
from .colocated import is_colocated
from .engine import IPCWeightTransferEngine, NCCLWeightTransferEngine
from .errors import TransferError
from .group import side_group
from .packing import TensorSpec, dtype_name, parse_dtype

__all__ = ["NameMap", "Source", "iter_named_tensors", "send_model", "update_info_for"]

NameMap = Mapping[str, "str | None"] | Callable[[str], "str | None"] | None
"""How names change on the wire. A dict renames the names it lists; a name it
does not list keeps its own; a value of None drops that tensor; a key that
names no tensor of the source is a ValueError (a typo would otherwise pass
silently). A callable maps every name to its new name, or to None to drop it."""

Source = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
"""A module (its ``state_dict(keep_vars=True)`` tensors: parameters and
persistent buffers; tied tensors once, under their first name), a state dict
(every key, as given), or ``(name, tensor)`` pairs (listed once, by reference:
pass pairs of existing tensors, not a generator that materializes them)."""

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]

_MESSAGE_BYTES = 2048
"""Most bytes of one trainer rank's error message in a failed lockstep."""


# -- the plan: what will be sent, known without gathering --------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    source_name: str
    name: str  # as sent
    tensor: torch.Tensor  # the source's own tensor (a DTensor, a parameter, a buffer)
    dtype: torch.dtype  # as sent
    shape: tuple[int, ...]  # global shape
    gather: bool  # materializing it is a collective on the trainer's mesh

    def describe(self) -> str:
        if not _is_dtensor(self.tensor):
            return f"{self.name}|{self.source_name}|{dtype_name(self.dtype)}|{list(self.shape)}"
        mesh = self.tensor.device_mesh
        return (f"{self.name}|{self.source_name}|{dtype_name(self.dtype)}|{list(self.shape)}|"
                f"{list(self.tensor.placements)}|{mesh.device_type}{tuple(mesh.shape)}")  # fmt: skip


def _is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _named(source: Source, include_buffers: bool) -> list[tuple[str, Any]]:
    if isinstance(source, nn.Module):
        params = {id(p) for p in source.parameters()}
        seen: set[int] = set()
        out = []
        for name, tensor in source.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # tied: sent once, under its first name
                continue
            seen.add(id(tensor))
            if include_buffers or id(tensor) in params:
                out.append((name, tensor))
        return out
    if isinstance(source, Mapping):
        return list(source.items())
    if isinstance(source, (str, bytes, torch.Tensor)) or not isinstance(source, Iterable):
        raise ValueError(f"source must be an nn.Module, a state dict or (name, tensor) pairs, "
                         f"got {type(source).__name__}")  # fmt: skip
    out = []
    for item in source:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError(f"expected (name, tensor) pairs, got {type(item).__name__}: {item!r:.100}")
        out.append(item)
    return out


def _check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, a dtype name or None, got {dtype!r}")
    dtype_name(dtype)  # ValueError for a dtype the wire cannot carry
    if not dtype.is_floating_point:
        raise ValueError(f"dtype casts floating-point tensors and must be a floating-point dtype, got {dtype}")
    return dtype


def _plan(source: Source, dtype: Any, name_map: NameMap, include_buffers: bool) -> list[_Entry]:
    """The entries to send, in order; ValueError naming every bad tensor or name."""
    dtype = _check_dtype(dtype)
    if name_map is not None and not isinstance(name_map, Mapping) and not callable(name_map):
        raise ValueError(f"name_map must be a dict, a callable or None, got {type(name_map).__name__}")
    named = _named(source, include_buffers)
    if isinstance(name_map, Mapping):
        unknown = sorted(set(name_map) - {name for name, _ in named}, key=str)
        if unknown:
            raise ValueError(f"name_map names {len(unknown)} tensor(s) the source does not have: {unknown}")
    entries: list[_Entry] = []
    problems: list[str] = []
    sources_of: dict[str, list[str]] = {}
    for name, tensor in named:
        if not isinstance(name, str):
            problems.append(f"name {name!r} is not a string")
            continue
        new = name if name_map is None else (name_map.get(name, name) if isinstance(name_map, Mapping)
                                             else name_map(name))  # fmt: skip
        if new is None:
            continue
        if not isinstance(new, str):
            problems.append(f"name_map maps {name!r} to {new!r}; expected a string or None (drop)")
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{name!r}: expected a tensor, got {type(tensor).__name__}")
            continue
        out_dtype = dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
        gather = _is_dtensor(tensor) and any(not p.is_replicate() for p in tensor.placements)
        local = tensor.to_local() if _is_dtensor(tensor) else tensor
        try:
            TensorSpec.of(name, local)  # dense, not meta, a wire dtype
            spec = TensorSpec(new, out_dtype, tuple(tensor.shape))
        except ValueError as e:
            problems.append(str(e))
            continue
        sources_of.setdefault(new, []).append(name)
        entries.append(_Entry(name, new, tensor, out_dtype, spec.shape, gather))
    problems += [f"{sources} would all be sent as {new!r}" for new, sources in sources_of.items() if len(sources) > 1]
    if problems:
        raise ValueError(f"cannot send {len(problems)} tensor(s): " + "; ".join(problems))
    return entries


def _mesh_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def _materialize(entry: _Entry, before_gather: Callable[[], None] | None = None) -> torch.Tensor:
    """The full tensor of one entry, cast; a gather on the trainer's mesh for a sharded DTensor.

    Everything local (cast, the move of a CPU-offloaded shard to its mesh's
    device) happens before ``before_gather``, so that a rank that passed the
    lockstep point goes straight into the gather.
    """
    tensor = entry.tensor
    with torch.no_grad():
        if not _is_dtensor(tensor):
            return tensor.detach().to(entry.dtype)
        local = tensor.to_local().detach()
        if not entry.gather:  # replicated on every mesh dim: the local tensor is the full one
            return local.to(entry.dtype)
        # Casting each shard before the gather moves (and holds) fewer bytes and is
        # bit-identical for Shard/Replicate; a Partial sum must be cast after it.
        cast_first = not any(p.is_partial() for p in tensor.placements)
        if cast_first:
            local = local.to(entry.dtype)
        mesh = tensor.device_mesh
        device = _mesh_device(mesh)
        if local.device != device:  # a CPU-offloaded shard (FSDP2 CPUOffloadPolicy): gather on the mesh's device
            local = local.to(device)
        staged = DTensor.from_local(local, mesh, tensor.placements, run_check=False,
                                    shape=tensor.shape, stride=tensor.stride())  # fmt: skip
        del local
        if before_gather is not None:
            before_gather()
        try:
            full = staged.full_tensor()
        except Exception as e:
            e._torchxfer_collective = True  # type: ignore[attr-defined]  # the trainer group is suspect now
            raise
        del staged
        return full if cast_first else full.to(entry.dtype)


class _LazyTensors:
    """``(name, full tensor)`` pairs of a plan, materialized one at a time when pulled.

    Has a length (the number of tensors) so the sender announces the count in
    its header and a receiver with an update_info can check it before payload moves.
    """

    def __init__(self, entries: list[_Entry], before_gather: Callable[[], None] | None = None) -> None:
        self._entries = entries
        self._gen = self._run(before_gather)

    def _run(self, before_gather: Callable[[], None] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for entry in self._entries:
            full = _materialize(entry, before_gather if entry.gather else None)
            yield entry.name, full
            del full  # do not hold the previous tensor while the next one is gathered

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> _LazyTensors:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


def iter_named_tensors(
    source: Source,
    *,
    dtype: torch.dtype | str | None = None,
    name_map: NameMap = None,
    include_buffers: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` pairs as the wire will carry them, lazily.

    Planning (names, casts, drops, checks) happens now and raises ValueError
    naming every problem. Tensors are materialized only when pulled: a sharded
    DTensor is gathered (``full_tensor()``, a collective on its own mesh) at
    that moment. So **every rank of the mesh must pull the same tensors in the
    same order**, and no rank may run a different collective in between.
    :func:`send_model` does this for you, with a check and a lockstep;
    use this iterator directly only when you keep the ranks paired yourself.

    Args:
        source: see :data:`Source`.
        dtype: cast floating-point tensors (bf16, fp16, fp8 ...) to this dtype;
            integer, bool and complex tensors keep theirs. A sharded DTensor is
            cast shard by shard before the gather (bit-identical, half the bytes
            for bf16), except a ``Partial`` one, which is cast after its reduction.
        name_map: see :data:`NameMap`. Two tensors may not end up with one name.
        include_buffers: with a module source, also send its persistent
            buffers (what ``state_dict`` holds); ignored for other sources.

    Yields:
        Tensors on their own device. A plain CPU-offloaded tensor stays on the
        CPU (the sender copies it into its buffers). A DTensor whose shard lives
        off its mesh's device (FSDP2 ``CPUOffloadPolicy``) is gathered on the
        mesh's device, one shard copy at a time. Untouched tensors are the
        source's own memory (detached), not copies.
    """
    return _LazyTensors(_plan(source, dtype, name_map, include_buffers))


def update_info_for(
    source: Source,
    *,
    dtype: torch.dtype | str | None = None,
    name_map: NameMap = None,
    include_buffers: bool = True,
    packed: bool = True,
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
) -> NCCLWeightTransferUpdateInfo:
    """What :func:`send_model` with the same arguments sends, computed locally
    from names, global shapes (a DTensor's ``shape``) and dtypes: nothing is
    gathered. Hand it to servers (``receive_weights(info, ...)``,
    ``ModuleLoader.check(info)``) to check each update out of band."""
    entries = _plan(source, dtype, name_map, include_buffers)
    return NCCLWeightTransferUpdateInfo(
        [e.name for e in entries], [dtype_name(e.dtype) for e in entries], [list(e.shape) for e in entries],
        packed, packed_buffer_size_bytes, packed_num_buffers,
    )  # fmt: skip


# -- send_model: every trainer rank, one sender -------------------------------------------


def send_model(
    source: Source,
    group: dist.ProcessGroup | None,
    *,
    dtype: torch.dtype | str | None = None,
    name_map: NameMap = None,
    include_buffers: bool = True,
    trainer_group: dist.ProcessGroup | None = None,
    timeout_s: float | None = None,
    packed: bool = True,
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
    checksum: bool = False,
    version: int | None = None,
) -> TransferStats | None:
    """Send one update of ``source``; every trainer rank calls this together.

    Blocks until every worker has loaded the update and every trainer rank
    knows the outcome. See the module docstring for why it cannot deadlock.

    Args:
        source: the model or state dict (plain, DTensor-sharded, ``fully_shard``-ed,
            CPU-offloaded). It must be the same on every trainer rank, in the
            same order (checked); see :data:`Source`.
        group: the side group (from ``trainer_init``) on the one sending rank,
            None on every other trainer rank; or, colocated, every trainer rank's
            own group (``IPCWeightTransferEngine.trainer_init``), serving the
            workers on that rank's GPU: then every rank sends, after the same gathers.
        dtype, name_map, include_buffers: as in :func:`iter_named_tensors`.
            They change what the in-band header describes, so receivers see
            exactly what arrives. :func:`update_info_for` describes it too.
        trainer_group: the group of all trainer ranks that call this (default:
            the default group, when torch.distributed is initialized). It
            carries the plan check and the status lockstep (one small tensor
            per sharded tensor, on the CPU for Gloo, on the current CUDA device
            otherwise). Pass a Gloo group of the same ranks to keep status
            traffic off NCCL. With no trainer group (a single-process trainer),
            the caller must be the sender.
        timeout_s: bound on each wait on the trainer group; None: the group's
            own timeout. Rank 0 may spend several of the side group's
            ``timeout_s`` between two pulls, so make this larger.
        packed, packed_buffer_size_bytes, packed_num_buffers, checksum: as in
            ``trainer_send_weights``. Tensors made by a gather or a cast are
            always packed, never sent zero-copy, so each is freed as soon as
            it is packed.
        version: the update id workers report as ``weights_version`` (e.g.
            the training step), as in ``trainer_send_weights``; read on the
            sender only.

    Returns:
        The TransferStats on each sender, None on the other ranks.

    Raises:
        ValueError: on every trainer rank, before anything moves, for bad
            arguments or a bad tensor on any rank, plans that differ between
            ranks, or not exactly one sender. The rank whose input was bad
            raises its own exception.
        TransferError: on the other trainer ranks when the sender failed
            (with its message), and on the sender when another trainer rank
            failed. The sender raises whatever ``trainer_send_weights`` raised.
    """
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not 0 < timeout_s < float("inf")):  # fmt: skip
        raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    if trainer_group is None and dist.is_initialized():
        trainer_group = dist.group.WORLD
    lock = _Lockstep(trainer_group, timeout_s) if trainer_group is not None and trainer_group.size() > 1 else None
    entries: list[_Entry] = []
    local_error: Exception | None = None
    try:
        if not isinstance(packed, bool):
            raise ValueError(f"packed must be a bool, got {packed!r}")
        check_buffers("send_model", packed_buffer_size_bytes, packed_num_buffers)
        if group is None and lock is None:
            raise ValueError("group is None, but there is no trainer group of several ranks to send for: "
                             "the one trainer process must pass its side group")  # fmt: skip
        if group is not None:
            side_group(group)  # ValueError unless it is a side group
        entries = _plan(source, dtype, name_map, include_buffers)
    except Exception as e:  # bad input here: every other rank must hear of it before it could wait in a gather
        local_error = e
    if lock is None:
        if local_error is not None:
            raise local_error
    else:
        # A colocated trainer rank (2) serves the workers on its own GPU: every rank may send.
        lock.begin(entries, 0 if group is None else 2 if is_colocated(group) else 1, local_error)

    if group is None:
        assert lock is not None
        try:
            for entry in entries:
                if entry.gather:
                    _materialize(entry, lock.step)  # the sender gathers the same, when its pipeline pulls
        except Exception as e:
            if not lock.done and not getattr(e, "_torchxfer_collective", False):
                lock.fail(e)
            raise
        lock.finish()
        return None

    items = _LazyTensors(entries, lock.step if lock is not None else None)
    fresh = any(e.gather or e.dtype != e.tensor.dtype or _is_dtensor(e.tensor) for e in entries)
    try:
        if is_colocated(group):  # packed, into this rank's shared buffers (checksum does not apply)
            stats = IPCWeightTransferEngine.trainer_send_weights(
                items, group, packed_buffer_size_bytes=packed_buffer_size_bytes,
                packed_num_buffers=packed_num_buffers, version=version,
            )  # fmt: skip
        else:
            stats = NCCLWeightTransferEngine.trainer_send_weights(
                items, group, packed=packed, packed_buffer_size_bytes=packed_buffer_size_bytes,
                packed_num_buffers=packed_num_buffers, checksum=checksum, version=version,
                # A zero-copy send keeps its tensor until the broadcast completes:
                # fine for the model's own memory, not for fresh gathers and casts.
                zero_copy=not fresh,
            )  # fmt: skip
    except Exception as e:
        if lock is not None and not lock.done and not getattr(e, "_torchxfer_collective", False):
            lock.fail(e)
        raise
    finally:
        items.close()
    if lock is not None:
        lock.finish()
    return stats


class _Lockstep:
    """Plan check and status agreement among the trainer ranks of one send_model call.

    Every rank makes the same sequence of calls: ``begin``, then ``step`` before
    each gather, then ``finish``, except that a rank stops at the first
    failure. A failure is a nonzero status in the same all_reduce the others
    use for ``step`` or ``finish``, so whichever call of theirs it meets, they
    learn it there. Then each rank's message is exchanged, and ``done`` is set.
    """

    def __init__(self, pg: dist.ProcessGroup, timeout_s: float | None) -> None:
        self.pg = pg
        self.rank = pg.rank()
        self.size = pg.size()
        backend = str(dist.get_backend(pg)).lower()
        on_cpu = "gloo" in backend or not torch.cuda.is_available()
        self.device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))
        self.flag = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.done = False  # a failure was agreed, or the group failed: no more collectives

    def _wait(self, work: Any, what: str) -> None:
        try:
            ok = work.wait() if self.timeout is None else work.wait(self.timeout)
            if ok is False:
                raise TimeoutError(f"no completion after {self.timeout}")
        except Exception as e:
            self.done = True
            raise TransferError(
                f"{what} on the trainer group failed on trainer rank {self.rank}: {type(e).__name__}: {e}. "
                "Another trainer rank died, stopped calling send_model, or is stuck; the trainer group "
                "is no longer usable."
            ) from e

    def _all_reduce_flag(self, code: int, what: str) -> int:
        self.flag.fill_(code)
        self._wait(dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.pg, async_op=True), what)
        return int(self.flag.item())

    def _messages(self, error: str | None) -> str:
        """Every rank's message (after a nonzero status), as one string."""
        rows = torch.zeros(self.size, _MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        if error:
            raw = error.encode()[:_MESSAGE_BYTES]
            rows[self.rank, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8).to(self.device)
        self._wait(dist.all_reduce(rows, group=self.pg, async_op=True), "send_model error exchange")
        self.done = True
        host = rows.cpu()
        parts = []
        for r in range(self.size):
            text = bytes(host[r].tolist()).rstrip(b"\0").decode(errors="replace")
            if text:
                parts.append(f"[trainer rank {r}] {text}")
        return "; ".join(parts)

    def begin(self, entries: list[_Entry], is_sender: int, error: Exception | None) -> None:
        """Check that every rank planned the same tensors and that one rank sends (``is_sender``
        1), or every rank through its own colocated group (2); 0 on a rank that does not send."""
        digest = hashlib.sha256("\n".join(e.describe() for e in entries).encode()).digest()
        row = torch.tensor(
            [1 if error else 0, int(is_sender), len(entries), sum(e.gather for e in entries)]
            + [int.from_bytes(digest[i : i + 7], "little") for i in range(0, 28, 7)],
            dtype=torch.int64, device=self.device,
        )  # fmt: skip
        rows = [torch.empty_like(row) for _ in range(self.size)]
        self._wait(dist.all_gather(rows, row, group=self.pg, async_op=True), "send_model plan check")
        table = [r.cpu().tolist() for r in rows]
        if any(r[0] for r in table):
            text = self._messages(None if error is None else f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            raise ValueError(f"send_model failed on another trainer rank before anything moved: {text}")
        problems = []
        plans = {tuple(r[2:]) for r in table}
        if len(plans) > 1:
            ranks = "; ".join(f"rank {i}: {r[2]} tensors ({r[3]} sharded), plan {r[4]:014x}"
                              for i, r in enumerate(table))  # fmt: skip
            problems.append(
                f"trainer ranks planned different updates ({ranks}). Every trainer rank must call send_model "
                "with the same model or state dict, in the same order, with the same dtype, name_map and "
                "include_buffers; otherwise their gathers would pair with the wrong tensors"
            )
        senders = [i for i, r in enumerate(table) if r[1]]
        every_rank_colocated = all(r[1] == 2 for r in table)
        if len(senders) != 1 and not every_rank_colocated:
            problems.append(f"exactly one trainer rank must pass a side group, or every rank its own colocated "
                            f"group; ranks {senders} passed one")  # fmt: skip
        if problems:
            self.done = True
            raise ValueError("send_model: " + "; ".join(problems))

    def step(self) -> None:
        """Before a gather: continue together, or raise TransferError if another rank failed."""
        if self._all_reduce_flag(0, "send_model status") != 0:
            raise TransferError(f"send_model failed on another trainer rank: {self._messages(None)}")

    def fail(self, error: BaseException) -> None:
        """Tell the other ranks this rank failed (they are at a step or at finish). Best effort."""
        try:
            self._all_reduce_flag(1, "send_model status")
            self._messages(f"{type(error).__name__}: {error}")
        except TransferError:
            pass
        self.done = True

    def finish(self) -> None:
        """After the update: every rank learns whether any rank failed."""
        if self._all_reduce_flag(0, "send_model status") != 0:
            raise TransferError(f"send_model failed on another trainer rank: {self._messages(None)}")
