"""What a trainer sends: the plan of a (possibly sharded) model, known without gathering.

:func:`torchxfer.trainer.send_model` sends it; this module only says what goes
on the wire. The plan is made from names, global shapes, dtypes and
placements alone: names as sent (``name_map``), casts (``dtype``), drops, the
order, and how each tensor is materialized (:class:`Entry`):

* ``local``: a plain tensor, or a DTensor whose local tensor is the whole
  tensor (replicated, or sharded over mesh dimensions of size 1);
* ``shard``: a DTensor sharded (``Shard(d)``, any ``d``, even or uneven) along
  exactly one mesh dimension and replicated along the others (FSDP2, TP,
  HSDP replicate x shard): gathered per bucket, to the sending rank only
  (:mod:`torchxfer.gather`);
* ``full``: any other DTensor (``Partial``, several sharded mesh dimensions,
  strided shards): ``full_tensor()`` on every rank of its mesh.

:func:`gather_groups` cuts the plan where the sender's buckets start (the
sender's own ``packing.Planner`` over the same specs and buffer size), so
every trainer rank derives the same groups without talking.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import DEFAULT_PACKED_BUFFER_SIZE_BYTES, DEFAULT_PACKED_NUM_BUFFERS, NCCLWeightTransferUpdateInfo
from .group import dtensor_local_shape, local_shard, metadata_guard
from .packing import Planner, TensorSpec, dtype_name, parse_dtype

__all__ = ["NameMap", "Source", "Entry", "ShardInfo", "plan", "gather_groups", "iter_named_tensors",
           "update_info_for"]  # fmt: skip

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
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Partial = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """How a ``shard`` entry is split: along tensor dim ``dim``, over mesh dim ``mesh_dim``.

    ``sizes[q]`` is the extent of dim ``dim`` on the q-th rank of that mesh
    dimension (DTensor's rule: chunks of ceil(n / world), the last ones
    smaller or empty), so every rank knows every rank's local shape.
    """

    mesh_dim: int
    dim: int
    sizes: tuple[int, ...]

    def local_shape(self, shape: tuple[int, ...], q: int) -> tuple[int, ...]:
        return shape[: self.dim] + (self.sizes[q],) + shape[self.dim + 1 :]

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1


@dataclasses.dataclass(slots=True)
class Entry:
    """One tensor to send; not changed once planned. (Not frozen: a cached plan makes one per
    tensor per update, and a frozen dataclass's init costs four times as much.)"""

    source_name: str
    name: str  # as sent
    tensor: torch.Tensor  # the source's own tensor (a DTensor, a parameter, a buffer)
    dtype: torch.dtype  # as sent
    shape: tuple[int, ...]  # global shape
    how: str  # "local", "shard" or "full" (see the module docstring)
    shard: ShardInfo | None = None
    placement: str = ""  # a DTensor's placements and mesh, for the plan digest

    @property
    def collective(self) -> bool:
        """Whether materializing it takes a collective on the trainer's mesh."""
        return self.how != "local"

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)

    def describe(self) -> str:
        """One line per entry for the plan digest that every trainer rank compares."""
        return f"{self.name}|{self.source_name}|{dtype_name(self.dtype)}|{list(self.shape)}|{self.how}{self.placement}"


def _chunk_sizes(n: int, world: int) -> tuple[int, ...]:
    chunk = -(-n // world)
    return tuple(max(0, min(n, (q + 1) * chunk) - q * chunk) for q in range(world))


def _how(name: str, tensor: torch.Tensor) -> tuple[str, ShardInfo | None]:
    """How a tensor is materialized; ValueError when its local shape breaks DTensor's rule."""
    if not is_dtensor(tensor):
        return "local", None
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    if mesh.get_coordinate() is None:
        raise ValueError(f"{name!r}: a DTensor on a mesh of ranks {mesh.mesh.flatten().tolist()[:16]}, which does "
                         f"not hold this rank ({dist.get_rank()}): every trainer rank sends the tensors it holds")
    split = [i for i, p in enumerate(placements) if not p.is_replicate() and mesh.size(i) > 1]
    if not split:
        return "local", None
    if len(split) > 1 or type(placements[split[0]]) is not Shard:
        # Gathered by full_tensor(), which takes every rank's local shape from DTensor's rules:
        # a shard of another shape would make a backend abort the process mid-gather.
        want, have = dtensor_local_shape(tensor), tuple(local_shard(tensor).shape)
        if want is not None and have != want:
            raise ValueError(f"{name!r}: local shard of shape {list(have)} on a DTensor of shape {list(tensor.shape)} "
                             f"placed {list(placements)}; DTensor's rules give this rank {list(want)}")  # fmt: skip
        return "full", None
    i = split[0]
    dim = placements[i].dim % max(1, tensor.dim())
    info = ShardInfo(i, dim, _chunk_sizes(tensor.shape[dim], mesh.size(i)))
    want = info.local_shape(tuple(tensor.shape), mesh.get_local_rank(i))
    if tuple(tensor.to_local().shape) != want:
        # (Also seen on a mesh listing its ranks out of order with uneven shards, where torch 2.13's own
        # distribute_tensor and full_tensor() disagree about which rank holds which rows.)
        raise ValueError(f"{name!r}: local shard of shape {list(tensor.to_local().shape)} on a DTensor of shape "
                         f"{list(tensor.shape)} sharded {placements[i]} over {mesh.size(i)} ranks; expected "
                         f"{list(want)} (DTensor's chunks in the order of the mesh dimension's process group)")  # fmt: skip
    return "shard", info


_classified: dict[int, tuple[Any, tuple, tuple[str, ShardInfo | None, str]]] = {}
"""By ``id(tensor)``: (a weak reference to it, its metadata, how it is materialized). An RL
trainer plans the same tensors every step; a tensor whose metadata (DTensor placements,
mesh, local shape ...) is unchanged is not checked again."""


def _classify(name: str, tensor: torch.Tensor) -> tuple[str, ShardInfo | None, str]:
    """:func:`_how` of a tensor the wire can carry, and its placement text (``Entry.placement``);
    ValueError naming what it cannot. Local (no collective)."""
    local = local_shard(tensor) if is_dtensor(tensor) else tensor
    meta = _meta(tensor)
    key = id(tensor)
    known = _classified.get(key)
    if known is not None and known[0]() is tensor and known[1] == meta:
        return known[2]
    TensorSpec.of(name, local)  # dense, not meta, a wire dtype
    how = _how(name, tensor)
    if local is not tensor:
        mesh = tensor.device_mesh
        how += (f"|{list(tensor.placements)}|{mesh.device_type}{tuple(mesh.shape)}",)
    else:
        how += ("",)
    try:
        ref = weakref.ref(tensor, lambda _, key=key: _classified.pop(key, None))
    except TypeError:  # pragma: no cover - a tensor type without weak references
        return how
    _classified[key] = (ref, meta, how)
    return how


def _named(source: Source, include_buffers: bool) -> list[tuple[str, Any]]:
    if isinstance(source, nn.Module):
        params = set() if include_buffers else {id(p) for p in source.parameters()}
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
    if not castable(torch.float32, dtype):
        raise ValueError(f"dtype {dtype}: torch cannot cast to it (no conversion kernel)")
    return dtype


_castable: dict[tuple[torch.dtype, torch.dtype], bool] = {}


def castable(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether torch converts ``src`` to ``dst`` (a one-element probe, once per pair): sub-byte
    and some exotic dtypes have no conversion kernel, which would fail mid-update."""
    known = _castable.get((src, dst))
    if known is None:
        try:
            torch.zeros(1, dtype=src).to(dst)
            known = True
        except Exception:  # noqa: BLE001 - NotImplementedError, RuntimeError: no kernel
            known = False
        _castable[(src, dst)] = known
    return known


@dataclasses.dataclass
class _Planned:
    """A module's last plan, holding no tensor: the arguments, weak references to its (name,
    tensor) pairs and their classifications, and each entry's fields but its tensor."""

    key: tuple
    names: list[str]
    refs: list[Any]
    classes: list[tuple | None]
    fields: list[tuple[int, tuple]]  # per entry: its pair's index, the Entry's other fields
    groups: dict[int | None, list[list[int]]] = dataclasses.field(default_factory=dict)
    peer_reads: Any = None  # the sender's last peer-read mapping of this plan (torchxfer.gather)
    digests: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # by bucketing (torchxfer.lockstep)
    quick: Any = None  # (:func:`_quick_check` of the pairs as planned) or None: the per-tensor checks only


def _quick_check(named: list[tuple[str, Any]]) -> Any:
    """A cheap test that ``named``'s tensors kept the metadata they have now, or None.

    (guard, DTensor positions, their placements and mesh ids): ``guard`` is one C++ call over
    every tensor and every DTensor's local shard (:func:`torchxfer.group.metadata_guard`:
    type, dtype, device, shape, strides), which together with the placements and the mesh
    covers all that :func:`_meta` reads. Holds no tensor."""
    tensors = [t for _, t in named]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    dts = [k for k, t in enumerate(tensors) if is_dtensor(t)]
    guard = metadata_guard(tensors + [local_shard(tensors[k]) for k in dts])
    if guard is None:
        return None
    return guard, dts, [tensors[k].placements for k in dts], [id(tensors[k].device_mesh) for k in dts]


class _Entries(list):
    """A plan's entries; ``planned`` keeps their gather groups (see :func:`groups_of`)."""

    planned: _Planned | None = None


_plans: weakref.WeakKeyDictionary[nn.Module, _Planned] = weakref.WeakKeyDictionary()
"""An RL trainer plans the same module every step: the plan is made again only when the
module's tensors (the very objects, in order, and their metadata) or the arguments change.
Weak throughout: a replaced parameter is freed as usual."""


def plan(source: Source, dtype: Any, name_map: NameMap, include_buffers: bool) -> list[Entry]:
    """The entries to send, in order; ValueError naming every bad tensor or name. Local: no collective."""
    with torch.no_grad():  # to_local() outside autograd: no graph node per tensor
        if not isinstance(source, nn.Module) or (name_map is not None and not isinstance(name_map, Mapping)):
            return _plan(source, dtype, name_map, include_buffers)
        key = (_check_dtype(dtype), include_buffers, None if name_map is None else dict(name_map))
        named = _named(source, include_buffers)
        last = _plans.get(source)
        if last is not None and last.key == key and _same(named, last):
            entries = _Entries(Entry(fields[0], fields[1], named[k][1], *fields[2:]) for k, fields in last.fields)
            entries.planned = last
            return entries
        entries = _Entries(_plan(source, dtype, name_map, include_buffers, named))
        where = {n: k for k, (n, _) in enumerate(named)}
        refs = [_weak(t) for _, t in named]
        if None not in refs:
            classes = [_classified_as(n, t) for n, t in named]  # memo hits: the objects _same compares
            entries.planned = _plans[source] = _Planned(
                key, [n for n, _ in named], refs, classes,
                [(where[e.source_name], (e.source_name, e.name, e.dtype, e.shape, e.how, e.shard, e.placement))
                 for e in entries],
                quick=None if None in classes else _quick_check(named),
            )  # fmt: skip
        return entries


def _weak(tensor: Any) -> Any:
    try:
        return weakref.ref(tensor)
    except TypeError:
        return None


def _classified_as(name: str, tensor: Any) -> tuple | None:
    """The memo's tuple for ``tensor``; None for one the wire cannot carry (dropped by the name map)."""
    try:
        return _classify(name, tensor) if isinstance(tensor, torch.Tensor) else None
    except ValueError:
        return None


def _same(named: list[tuple[str, Any]], last: _Planned) -> bool:
    """Whether ``named`` are the very (name, tensor) pairs of ``last``, each tensor's metadata
    unchanged. The steady state of an RL trainer: an identity pass over the pairs, then the
    plan's :func:`_quick_check` (one C++ call); where that says no or the plan has none, each
    tensor's metadata against the memo's very tuple (:func:`_memo_hit`)."""
    if len(named) != len(last.names):
        return False
    if last.quick is not None:
        if all(name == was and ref() is tensor for (name, tensor), was, ref in zip(named, last.names, last.refs)):
            guard, dts, placements, meshes = last.quick
            tensors = [t for _, t in named]
            if all(tensors[k].placements == p and id(tensors[k].device_mesh) == m
                   for k, p, m in zip(dts, placements, meshes)) and guard(
                       *tensors, *[local_shard(tensors[k]) for k in dts]):  # fmt: skip
                return True
        # Not known to match: the per-tensor checks decide.
    for (name, tensor), was, ref, classified in zip(named, last.names, last.refs, last.classes):
        if name != was or ref() is not tensor or classified is None or _memo_hit(tensor) is not classified:
            return False
    return True


def _memo_hit(tensor: torch.Tensor) -> tuple | None:
    """The memo's tuple for ``tensor`` if its metadata is unchanged since it was classified, else
    None (see :func:`_classify`, which makes the same key)."""
    known = _classified.get(id(tensor))
    if known is None or known[0]() is not tensor:
        return None
    return known[2] if known[1] == _meta(tensor) else None


def _meta(tensor: torch.Tensor) -> tuple:
    """What a tensor's classification depends on (torch.Size and the placements tuple as they are:
    both compare as tuples)."""
    if not is_dtensor(tensor):
        if tensor.is_nested:  # no shape to read: _classify's TensorSpec.of refuses it
            return (type(tensor), "nested")
        return (type(tensor), tensor.dtype, tensor.shape, tensor.layout, tensor.device, tensor.is_quantized)
    local = local_shard(tensor)
    return (type(tensor), tensor.dtype, tensor.shape, type(local), local.dtype, local.shape, local.layout,
            local.device, local.is_quantized, tensor.placements, id(tensor.device_mesh))  # fmt: skip


def groups_of(entries: list[Entry], buffer_size: int | None) -> list[list[int]]:
    """:func:`gather_groups`, kept with a cached plan."""
    planned = getattr(entries, "planned", None)
    if planned is None:
        return gather_groups(entries, buffer_size)
    if buffer_size not in planned.groups:
        planned.groups[buffer_size] = gather_groups(entries, buffer_size)
    return planned.groups[buffer_size]


def _plan(source: Source, dtype: Any, name_map: NameMap, include_buffers: bool,
          named: list[tuple[str, Any]] | None = None) -> list[Entry]:  # fmt: skip
    dtype = _check_dtype(dtype)
    if name_map is not None and not isinstance(name_map, Mapping) and not callable(name_map):
        raise ValueError(f"name_map must be a dict, a callable or None, got {type(name_map).__name__}")
    if named is None:
        named = _named(source, include_buffers)
    if isinstance(name_map, Mapping):
        known = {name for name, _ in named}
        if isinstance(source, nn.Module):  # a tied alias and an excluded buffer are the module's names too
            known.update(source.state_dict(keep_vars=True))
        unknown = sorted(set(name_map) - known, key=str)
        if unknown:
            raise ValueError(f"name_map names {len(unknown)} tensor(s) the source does not have: {unknown}")
    entries: list[Entry] = []
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
        if out_dtype != tensor.dtype and not castable(tensor.dtype, out_dtype):
            problems.append(f"{name!r}: torch cannot cast {tensor.dtype} to {out_dtype}")
            continue
        try:
            how, shard, placement = _classify(name, tensor)
            spec = TensorSpec(new, out_dtype, tuple(tensor.shape))
        except ValueError as e:
            problems.append(str(e))
            continue
        sources_of.setdefault(new, []).append(name)
        entries.append(Entry(name, new, tensor, out_dtype, spec.shape, how, shard, placement))
    problems += [f"{sources} would all be sent as {new!r}" for new, sources in sources_of.items() if len(sources) > 1]
    if problems:
        raise ValueError(f"cannot send {len(problems)} tensor(s): " + "; ".join(problems))
    return entries


def gather_groups(entries: list[Entry], buffer_size: int | None) -> list[list[int]]:
    """Entry indices grouped by the sender's bucket that holds each entry's first byte.

    ``buffer_size`` None: unpacked mode. Every rank computes the same groups
    from the plan alone. A tensor larger than a buffer is the only tensor whose
    first byte is in its first bucket, so it forms a group of its own.
    """
    planner = Planner(buffer_size)
    groups: list[list[int]] = []
    last = -1
    for i, entry in enumerate(entries):
        bucket = planner.add(i, entry.spec)[0].bucket
        if bucket != last:
            groups.append([])
            last = bucket
        groups[-1].append(i)
    return groups


def materialize(entry: Entry) -> torch.Tensor:
    """The full tensor of one entry, cast, on its own device; ``full_tensor()`` (a collective
    on the entry's mesh, every rank of it) unless the entry is ``local``.

    A CPU-offloaded shard is moved to its mesh's device first; a sharded
    tensor is cast before the gather (bit-identical, fewer bytes), a
    ``Partial`` one after its reduction.
    """
    tensor = entry.tensor
    with torch.no_grad():
        if not is_dtensor(tensor):
            return tensor.detach().to(entry.dtype)
        if not entry.collective:
            return tensor.to_local().detach().to(entry.dtype)
    return finish_full(entry, gather_full(stage_full(entry)))


def gather_full(staged: Any) -> torch.Tensor:
    """``full_tensor()`` of a :func:`stage_full` DTensor: the collective, every rank of its mesh."""
    with torch.no_grad():
        return staged.full_tensor()


def stage_full(entry: Entry) -> Any:
    """The local half of a collective entry's :func:`materialize` (no collective): this rank's
    shard cast (unless ``Partial``), moved to the mesh's device and wrapped as a DTensor whose
    ``full_tensor()`` is the gather. Split off so that a trainer rank does this local work, which
    can fail (out of memory), before it tells the others it is ready to gather."""
    tensor = entry.tensor
    with torch.no_grad():
        local = local_shard(tensor).detach().resolve_conj().resolve_neg()
        if not any(p.is_partial() for p in tensor.placements):
            # Moved, not reduced: as bits of a dtype every backend gathers (Gloo has no fp8 or int16, NCCL
            # no int16 or uint32), the same item size, so shapes and DTensor's chunking stay as they are.
            local = local.to(entry.dtype)
            local = local.view(_CARRIERS.get(local.element_size(), local.dtype))
        mesh = tensor.device_mesh
        return DTensor.from_local(local.to(mesh_device(mesh)), mesh, tensor.placements, run_check=False,
                                  shape=tensor.shape, stride=tensor.stride())  # fmt: skip


_CARRIERS = {1: torch.uint8, 2: torch.float16, 4: torch.int32, 8: torch.int64}
"""By item size: the dtype whose bits carry a gathered tensor that is only moved (no ``Partial``)."""


def finish_full(entry: Entry, full: torch.Tensor) -> torch.Tensor:
    """A gathered collective entry in the sent dtype: its bits viewed back, or (``Partial``, reduced
    in its own dtype) cast after the reduction."""
    with torch.no_grad():
        if full.dtype == entry.dtype:
            return full
        if any(p.is_partial() for p in entry.tensor.placements):
            return full.to(entry.dtype)
        return full.view(entry.dtype)


def mesh_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


class _Materialized:
    """``(name, full tensor)`` pairs of a plan, materialized one at a time when pulled; has a length."""

    def __init__(self, entries: list[Entry]) -> None:
        self._entries = entries
        self._gen = ((e.name, materialize(e)) for e in entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> _Materialized:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._gen)


def iter_named_tensors(
    source: Source,
    *,
    dtype: torch.dtype | str | None = None,
    name_map: NameMap = None,
    include_buffers: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` pairs as the wire will carry them, lazily, on every rank.

    Planning (names, casts, drops, checks) happens now and raises ValueError
    naming every problem. Tensors are materialized only when pulled: a sharded
    DTensor is gathered (``full_tensor()``, a collective on its own mesh) at
    that moment. So **every rank of the mesh must pull the same tensors in the
    same order**, and no rank may run a different collective in between.
    :func:`torchxfer.send_model` does this for you, faster (per bucket, to the
    sender only, overlapped with the send), with a check and a lockstep.

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
        CPU. A DTensor whose shard lives off its mesh's device (FSDP2
        ``CPUOffloadPolicy``) is gathered on the mesh's device. Untouched
        tensors are the source's own memory (detached), not copies.
    """
    if not isinstance(include_buffers, bool):
        raise ValueError(f"iter_named_tensors: include_buffers must be a bool, got {include_buffers!r:.80}")
    return _Materialized(plan(source, dtype, name_map, include_buffers))


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
    """What :func:`torchxfer.send_model` with the same arguments sends, computed locally
    from names, global shapes (a DTensor's ``shape``) and dtypes: nothing is
    gathered. Hand it to servers (``receive_weights(info, ...)``,
    ``ModuleLoader.check(info)``) to check each update out of band."""
    if not isinstance(include_buffers, bool):
        raise ValueError(f"update_info_for: include_buffers must be a bool, got {include_buffers!r:.80}")
    entries = plan(source, dtype, name_map, include_buffers)
    return NCCLWeightTransferUpdateInfo(
        [e.name for e in entries], [dtype_name(e.dtype) for e in entries], [list(e.shape) for e in entries],
        packed, packed_buffer_size_bytes, packed_num_buffers,
    )  # fmt: skip


def __getattr__(name: str) -> Any:  # send_model lived here before it moved to torchxfer.trainer
    if name == "send_model":
        from .trainer import send_model

        return send_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
