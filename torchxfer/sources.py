"""Trainer-side sources: send a (possibly sharded) model with bounded memory.

Every trainer rank calls :func:`send_model` over the same model, together,
in the same order; only the sending rank (global rank 0, holding the side
group) passes a group, the others pass None. A DTensor parameter is
materialized with ``full_tensor()`` (a collective on the trainer's own mesh)
only when the sender's pipeline pulls it, one tensor at a time, so peak extra
memory on the sender is the transfer buffers plus the tensor in hand; the
other ranks run the same iteration so their gathers pair with the sender's.

Gathers happen on the trainer's group, transfers on the side group; a sender
blocked on the side group never waits for another trainer rank, and the other
trainer ranks only wait for the sender's next gather, so the two never form a
cycle. If the sender fails part-way, it keeps iterating (gathering, sending
nothing) so the others are not left inside a gather, and every trainer rank
then learns the outcome from one all_reduce on the trainer's group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .config import DEFAULT_PACKED_BUFFER_SIZE_BYTES, DEFAULT_PACKED_NUM_BUFFERS, NCCLWeightTransferUpdateInfo
from .config import TransferStats
from .errors import TransferError
from .packing import dtype_name

__all__ = ["iter_named_tensors", "send_model", "update_info_for"]

NameMap = Mapping[str, str | None] | Callable[[str], str | None] | None
Source = nn.Module | Mapping[str, torch.Tensor]

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]


def _entries(source: Source) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) in state-dict order; tied tensors once, under their first name."""
    if isinstance(source, nn.Module):
        items = source.state_dict(keep_vars=True).items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        raise ValueError(f"source must be an nn.Module or a state dict, got {type(source).__name__}")
    seen: set[int] = set()
    out = []
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name!r}: expected a tensor, got {type(tensor).__name__}")
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((name, tensor))
    return out


def _rename(name: str, name_map: NameMap) -> str | None:
    if name_map is None:
        return name
    new = name_map(name) if callable(name_map) else name_map.get(name, name)
    if new is not None and not isinstance(new, str):
        raise ValueError(f"name_map maps {name!r} to {new!r}; expected a string or None (drop)")
    return new


def _cast(dtype: torch.dtype | None, tensor_dtype: torch.dtype) -> torch.dtype:
    """Only floating-point tensors are cast; integer and bool tensors keep their dtype."""
    if dtype is None or not tensor_dtype.is_floating_point:
        return tensor_dtype
    return dtype


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def iter_named_tensors(source: Source, *, dtype: torch.dtype | None = None, name_map: NameMap = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` lazily, as the wire will carry them.

    A DTensor is gathered (``full_tensor()``, a collective on its mesh: every
    rank of the mesh must iterate in the same order) only when pulled.
    ``dtype`` casts floating-point tensors (``torch.bfloat16`` for a server
    in bf16); ``name_map`` renames (a dict: missing names are kept; a
    callable: ``name -> new name``; None drops the tensor). CPU-offloaded
    tensors are yielded where they are; the sender copies them into its
    buffers.
    """
    if dtype is not None:
        dtype_name(dtype)  # ValueError for a dtype the wire cannot carry
    for name, tensor in _entries(source):
        new = _rename(name, name_map)
        if new is None:
            if _is_dtensor(tensor):
                tensor.full_tensor()  # keep the mesh's collectives paired on every rank
            continue
        with torch.no_grad():
            full = tensor.full_tensor() if _is_dtensor(tensor) else tensor.detach()
            full = full.to(_cast(dtype, full.dtype))
        yield new, full
        del full


def update_info_for(
    source: Source,
    *,
    dtype: torch.dtype | None = None,
    name_map: NameMap = None,
    packed: bool = True,
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
) -> NCCLWeightTransferUpdateInfo:
    """What :func:`send_model` will send, without gathering anything (a
    DTensor's ``shape`` is its global shape). Hand it to servers that want
    to check each update out of band."""
    names, dtypes, shapes = [], [], []
    for name, tensor in _entries(source):
        new = _rename(name, name_map)
        if new is None:
            continue
        names.append(new)
        dtypes.append(dtype_name(_cast(dtype, tensor.dtype)))
        shapes.append(list(tensor.shape))
    return NCCLWeightTransferUpdateInfo(names, dtypes, shapes, packed, packed_buffer_size_bytes, packed_num_buffers)


def send_model(
    source: Source,
    group: dist.ProcessGroup | None,
    *,
    dtype: torch.dtype | None = None,
    name_map: NameMap = None,
    trainer_group: dist.ProcessGroup | None = None,
    packed: bool = True,
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS,
    checksum: bool = False,
) -> TransferStats | None:
    """Send one update of ``source``; every trainer rank calls this together.

    Args:
        source: the model or state dict (plain, DTensor-sharded, or
            ``fully_shard``-ed), identical in structure on every trainer rank.
        group: the side group on the sending rank, None on every other rank.
        dtype, name_map: as in :func:`iter_named_tensors`; reflected in the
            in-band metadata, so receivers see exactly what arrives.
        trainer_group: the trainer's own group for the final status
            all_reduce (default: the default group, when one exists).
        packed, packed_buffer_size_bytes, packed_num_buffers, checksum: as in
            ``trainer_send_weights``.

    Returns:
        The TransferStats on the sender, None elsewhere. Blocks until every
        worker has loaded the update (sender) and the trainer group agreed.

    Raises:
        On the sender, whatever ``trainer_send_weights`` raises; on the other
        trainer ranks, TransferError once the sender failed. Both after the
        iteration finished everywhere, so no rank is left in a gather.
    """
    from .engine import NCCLWeightTransferEngine

    items = iter_named_tensors(source, dtype=dtype, name_map=name_map)
    stats, error = None, None
    if group is not None:
        try:
            stats = NCCLWeightTransferEngine.trainer_send_weights(
                items, group, packed=packed, packed_buffer_size_bytes=packed_buffer_size_bytes,
                packed_num_buffers=packed_num_buffers, checksum=checksum,
                # The iterator makes fresh tensors (gathers, casts): pack them so
                # each is freed at once and memory stays at buffers + one tensor.
                zero_copy=dtype is None and not any(_is_dtensor(t) for _, t in _entries(source)),
            )  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are released
            error = e
    for _ in items:  # the rest of the gathers (all of them on non-senders)
        pass
    failed = _trainer_status(error is not None, trainer_group)
    if error is not None:
        raise error
    if failed:
        raise TransferError("the sending trainer rank failed this update (its error is raised there)")
    return stats


def _trainer_status(failed: bool, trainer_group: dist.ProcessGroup | None) -> bool:
    """All trainer ranks learn whether the sender failed (no-op without a trainer group)."""
    if trainer_group is None:
        if not dist.is_initialized():
            return failed
        trainer_group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(trainer_group) == "nccl" else "cpu"
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=trainer_group)
    return bool(flag.item())
