"""A ready ``load_weights`` for a plain ``nn.Module`` on the server side."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .config import NCCLWeightTransferUpdateInfo, parse_info
from .group import metadata_guard
from .packing import dtype_name, parse_dtype

__all__ = ["ModuleLoader"]

_MAX_PLANS = 4096


class _BatchPlan:
    """A batch seen before: the positions in it that load (None: all), their targets, the shapes
    and dtypes they had, the names they fill, the positions among the targets copied one by one,
    and a C++ check of the shapes and dtypes (:func:`metadata_guard`; None: compare the lists)."""

    __slots__ = ("positions", "dst", "shapes", "dtypes", "names", "alone", "guard", "device", "dst_guard", "checked",
                 "targets")

    def __init__(self, positions: list[int] | None, dst: list[torch.Tensor], src: list[torch.Tensor],
                 names: frozenset[str], alone: list[int]) -> None:  # fmt: skip
        self.positions, self.dst, self.names, self.alone = positions, dst, names, alone
        self.shapes, self.dtypes = [t.shape for t in src], [t.dtype for t in src]
        self.guard = metadata_guard(src)
        # The targets as they were (a module cast or given new storage since is checked in full again).
        self.targets = metadata_guard(dst)
        # The targets' one device, if they share one (a SlicedBatch's runs are copied only onto it).
        devices = {t.device for t in dst}
        self.device = devices.pop() if len(devices) == 1 else None
        self.dst_guard: Any = None  # made at the first SlicedBatch (False: that path is closed)
        self.checked: Any = None  # the pairs of the last SlicedBatch whose tensors passed the checks

_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_PAIR = {2}
_LAYOUT, _IS_META = operator.attrgetter("layout"), operator.attrgetter("is_meta")
_STRIDED = {torch.strided}
_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")


ALONE_BYTES = 16 << 20
"""Targets of at least this many bytes are copied one by one (a plain copy, on CUDA a device-to-device
memcpy: about 1.9 TB/s on an H200, where the fused multi-tensor copy moves large tensors at about
1.35 TB/s); smaller ones in one fused copy (one launch for thousands of tensors)."""


_DATA_PTR = torch.Tensor.data_ptr


class KeptViews:
    """Tensors made once per layout (views of a buffer, or of the trainer's memory) and handed to
    ``load_weights`` as the same objects every update, kept as they were made.

    A ``load_weights`` may change a tensor it is handed in place, metadata and all (``t.t_()``,
    ``t.resize_(...)``, ``t.requires_grad_()``, ``t.set_(...)``, ``t.data = ...``). The next update
    must still hand out what the trainer described, so :meth:`pairs` first checks that none of
    them changed: one C++ metadata guard over them all (:func:`metadata_guard`) and their data
    pointers, about 0.1 us a tensor. Where any changed, it hands out fresh views of originals
    that are never handed out (``detach()``: about 1 us a tensor, once). Where the last consumer
    was one of this package's that never changes what it reads (:class:`ModuleLoader`, an atomic
    worker's staging copy), the check is skipped. Local, never blocks.

    ``pairs``: ``(key, tensor)`` pairs (the key a name or a slot position), the objects handed out
    first (the caller hands them to a consumer it does not vouch for)."""

    __slots__ = ("_own", "_given", "_tensors", "_guard", "_ptrs", "_suspect")

    def __init__(self, pairs: tuple[tuple[Any, torch.Tensor], ...]) -> None:
        self._own = tuple((key, t.detach()) for key, t in pairs)
        self._take(tuple(pairs))
        self._suspect = True

    def _take(self, given: tuple[tuple[Any, torch.Tensor], ...]) -> None:
        self._given = given
        self._tensors = tuple(map(_SECOND, given))
        self._guard = metadata_guard(self._tensors)  # None where this torch has none: renewed every time
        self._ptrs = list(map(_DATA_PTR, self._tensors))

    def pairs(self, trusted: bool = False) -> tuple[tuple[Any, torch.Tensor], ...]:
        """The pairs to hand out now: the same objects as last time unless one was changed.
        ``trusted``: they go to a consumer that never changes them, so the next call need not check."""
        if self._suspect:
            guard, tensors = self._guard, self._tensors
            if guard is None or not guard(*tensors) or list(map(_DATA_PTR, tensors)) != self._ptrs:
                self._take(tuple((key, t.detach()) for key, t in self._own))
        self._suspect = not trusted
        return self._given


class SlicedBatch(list):
    """A batch whose tensors are, run by run, consecutive slices of one tensor, as this package's
    colocated receiver hands it to ``load_weights``. ``runs``: ``(first, end, base, sizes)``, the
    tensors at positions ``first..end-1`` being ``base.split(sizes)``; ``rest``: the positions in no
    run; ``pairs``: the pairs the batch was made of (a batch changed since holds other objects, and
    is loaded as any other)."""

    __slots__ = ("runs", "rest", "pairs")

    def __init__(self, pairs: tuple[tuple[str, torch.Tensor], ...], runs: tuple[tuple[int, int, torch.Tensor, list[int]], ...],
                 rest: tuple[int, ...]) -> None:  # fmt: skip
        super().__init__(pairs)
        self.pairs, self.runs, self.rest = pairs, runs, rest


SLICED_COPIES_ON_CPU = False
"""Copy a :class:`SlicedBatch`'s runs into CPU targets by ``torch.split_with_sizes_copy`` too (on the
CPU it is slower than the fused copy; tests set it to run that path without a GPU)."""


def _sliced(batch: list[tuple[str, torch.Tensor]], plan: _BatchPlan) -> bool:
    """Copy a :class:`SlicedBatch` run by run, one ``torch.split_with_sizes_copy`` each (on CUDA one
    kernel, about 0.14 us of CPU a tensor on an H200 host where the fused multi-tensor copy costs 0.35);
    False (nothing copied) unless the batch is one, unchanged, that every position of ``plan`` loads."""
    if type(batch) is not SlicedBatch or plan.positions is not None or plan.alone or not batch.runs:
        return False
    base = batch.runs[0][2]  # every run's base is a view of the one buffer
    if not (base.is_cuda or SLICED_COPIES_ON_CPU) or base.device != plan.device:
        return False
    pairs = batch.pairs
    if pairs is not plan.checked:  # _fast sets it to these pairs once it found the batch unchanged
        return False
    dst = plan.dst
    # split_with_sizes_copy resizes a target of another shape (with a warning) where a copy would
    # not: the targets must still have the shapes checked when the plan was made.
    guard = plan.dst_guard
    if guard is None:
        same = list(map(_SHAPE, dst)) == plan.shapes and list(map(_DTYPE, dst)) == plan.dtypes
        guard = plan.dst_guard = (metadata_guard(dst) if same else None) or False
    if not guard or not guard(*dst):
        plan.dst_guard = False
        return False
    with torch.no_grad():
        for first, end, base, sizes in batch.runs:
            torch.split_with_sizes_copy(base, sizes, out=dst[first:end])
        if batch.rest:
            torch._foreach_copy_([dst[p] for p in batch.rest], [pairs[p][1] for p in batch.rest])
    return True


def _unchanged(batch: list) -> bool:
    """Whether ``batch`` is a :class:`SlicedBatch` holding exactly the pairs it was made of."""
    return type(batch) is SlicedBatch and len(batch) == len(batch.pairs) and all(map(operator.is_, batch, batch.pairs))


def _alone(dst: list[torch.Tensor]) -> list[int]:
    """Positions of the CUDA targets copied one by one (see ALONE_BYTES); made once per batch layout."""
    return [i for i, d in enumerate(dst) if d.is_cuda and d.nbytes >= ALONE_BYTES]


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor], alone: list[int]) -> None:
    """``dst[i].copy_(src[i])`` for every i: the targets at positions ``alone`` one by one, the rest fused."""
    if not dst:
        return
    with torch.no_grad():
        if alone:
            for i in alone:
                dst[i].copy_(src[i])
            skip = set(alone)
            dst = [d for i, d in enumerate(dst) if i not in skip]
            src = [t for i, t in enumerate(src) if i not in skip]
        if dst:
            torch._foreach_copy_(dst, src)


class ModuleLoader:
    """Copy received tensors into a module's parameters and buffers, by name, in place.

    Pass it as ``load_weights``; it is called once per bucket (or once per
    update with ``atomic=True``), and remembers what arrived until the update
    ends::

        loader = ModuleLoader(model)
        with loader.update():                      # strict: raises naming every tensor that did not arrive
            engine.receive_weights(None, loader)

    or, without the context manager, ``engine.receive_weights(None, loader)``
    followed by ``loader.finish()``, with ``loader.reset()`` after a failed
    update.

    Rules:

    * Names are those of ``module.state_dict()``: parameters and persistent
      buffers. A tied tensor can be filled through any of its names, and
      counts as arrived once any of them has arrived.
    * Copies go into the existing storage (``copy_`` under no_grad). Nothing
      is reallocated (``data_ptr`` is unchanged), so CUDA graphs, optimizer
      state and other references stay valid. Copies across devices are fine.
    * A shape must match exactly (no reshape, even when the sizes agree). A
      dtype must match exactly: no cast, not even between same-sized dtypes
      (bf16 into fp16 would change values silently). Cast on the trainer with
      ``send_model(..., dtype=...)``.
    * Each call checks its whole batch first. A batch with any problem loads
      nothing and raises one ValueError naming every problem: an unknown name
      (strict), a wrong shape or dtype, or a name that arrived twice in one
      update. Raised inside ``load_weights``, it reaches every rank of the
      transfer as a TransferError carrying this message.
    * Missing names are known only at the end of an update: :meth:`finish`.

    Args:
        module: the model to fill.
        strict: reject unknown names and require every tensor at
            :meth:`finish`. With False, unknown names are skipped and missing
            ones allowed. Wrong shapes and dtypes are errors either way.
        include_buffers: also fill (and, strict, require) persistent buffers.
            Use False when the trainer sends with ``include_buffers=False``.
    """

    def __init__(self, module: nn.Module, *, strict: bool = True, include_buffers: bool = True) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
        for name, flag in (("strict", strict), ("include_buffers", include_buffers)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r:.80}")
        self.strict = strict
        params = {id(p) for p in module.parameters()}
        self.targets: dict[str, torch.Tensor] = {
            name: t for name, t in module.state_dict(keep_vars=True).items() if include_buffers or id(t) in params
        }
        # Aliases of one tensor (tied weights), in state-dict order; the first name represents them.
        groups: dict[int, list[str]] = {}
        for name, t in self.targets.items():
            groups.setdefault(id(t), []).append(name)
        self._aliases: dict[str, list[str]] = {names[0]: names for names in groups.values()}
        self._first: dict[str, str] = {name: names[0] for names in groups.values() for name in names}
        self.loaded: set[str] = set()
        """Names loaded in the current update."""
        # Batches seen before, by their names in order: which of their positions
        # load into which targets, and the shapes and dtypes they had. A steady
        # layout then costs one comparison of those lists per batch, not the
        # per-tensor checks. Bounded: cleared once it holds _MAX_PLANS batches.
        self._plans: dict[tuple[str, ...], _BatchPlan] = {}
        self._by_pairs: dict[int, _BatchPlan] = {}  # the same plans, by the SlicedBatch pairs they checked

    def _problem(self, name: str, dtype: torch.dtype, shape: list[int]) -> str | None:
        target = self.targets.get(name)
        if target is None:
            return f"unexpected {name!r}" if self.strict else None
        if list(target.shape) != list(shape):
            return f"{name!r}: shape {list(shape)}, the module has {list(target.shape)}"
        if target.dtype != dtype:
            return f"{name!r}: dtype {dtype_name(dtype)}, the module has {dtype_name(target.dtype)}"
        return None

    def __call__(self, batch: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one batch of ``(name, tensor)`` pairs, all or nothing (see the class docstring).

        The batch is checked first, then copied with one fused multi-tensor copy (a
        :class:`SlicedBatch` on CUDA: one ``split_with_sizes_copy`` per run of slices).
        A batch with the same names in the same order as one loaded before is
        checked by comparing its shapes and dtypes with that batch's (the same
        rules, without redoing the per-name lookups).
        """
        if not isinstance(batch, list):
            if not (hasattr(type(batch), "__iter__") or hasattr(type(batch), "__getitem__")):
                raise ValueError(f"a batch must be a list of (name, tensor) pairs, got {type(batch).__name__}")
            batch = list(batch)
        if type(batch) is SlicedBatch and _unchanged(batch):
            # The colocated receiver's batch of a layout seen before, as it made it: no key to make
            # (a batch changed in place may hold other names: found by its names below).
            plan = self._by_pairs.get(id(batch.pairs))
            if plan is not None and plan.checked is batch.pairs and self._fast(batch, plan, True):
                return
        try:
            key = tuple(map(_FIRST, batch))
            plan = self._plans.get(key)
        except (TypeError, IndexError, KeyError):  # not pairs of a hashable name and a value: the full check says why
            key, plan = None, None
        if plan is not None and self._fast(batch, plan):
            return
        self._load_checked(batch, key)

    def _fast(self, batch: list[tuple[str, torch.Tensor]], plan: _BatchPlan, same: bool | None = None) -> bool:
        """Load a batch laid out like ``plan``'s (``same``: whether it is known to be a SlicedBatch
        holding exactly its pairs); False (nothing loaded) if anything differs."""
        positions, names = plan.positions, plan.names
        # C-level maps, not a Python loop per tensor: a batch may hold thousands.
        try:
            # A SlicedBatch of the very pair objects checked last time (the colocated receiver hands
            # out the same views every update of a layout) is not checked again.
            if same is None:
                same = _unchanged(batch)
            src = None
            if not (same and batch.pairs is plan.checked):
                if set(map(len, batch)) != _PAIR:  # a triple, say, with the names of a batch seen before
                    return False
                src = list(map(_SECOND, batch)) if positions is None else [batch[i][1] for i in positions]
                if plan.guard is None or not plan.guard(*src):
                    if list(map(_SHAPE, src)) != plan.shapes or list(map(_DTYPE, src)) != plan.dtypes \
                            or set(map(_LAYOUT, src)) != _STRIDED or any(map(_IS_META, src)):  # fmt: skip
                        return False
                    plan.guard = None  # alike but not to the guard (other strides, say): the lists from now on
            if plan.targets is None or not plan.targets(*plan.dst):
                if list(map(_SHAPE, plan.dst)) != plan.shapes or list(map(_DTYPE, plan.dst)) != plan.dtypes:
                    return False  # the full check then names what changed
                plan.targets = metadata_guard(plan.dst)  # alike (other strides, say): guarded as they are now
        except (AttributeError, IndexError, TypeError, RuntimeError):  # (a nested tensor has no shape)
            return False
        self._check(plan, batch.pairs if same else None)
        if not self.loaded.isdisjoint(names):
            return False
        if not _sliced(batch, plan):
            if src is None:
                src = list(map(_SECOND, batch)) if positions is None else [batch[i][1] for i in positions]
            _copy(plan.dst, src, plan.alone)
        if self.loaded:
            self.loaded |= names
        else:
            self.loaded = set(names)
        return True

    def _load_checked(self, batch: list[tuple[str, torch.Tensor]], key: tuple[str, ...] | None) -> None:
        targets, loaded = self.targets, self.loaded
        problems: list[str] = []
        seen: set[str] = set()
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        positions: list[int] = []
        for position, pair in enumerate(batch):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str) \
                    or not isinstance(pair[1], torch.Tensor):  # fmt: skip
                raise ValueError(f"a batch holds (name, tensor) pairs; item {position} is {type(pair).__name__}: "
                                 f"{pair!r:.80}")  # fmt: skip
            name, tensor = pair
            target = targets.get(name)
            if tensor.is_nested or tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
                kind = "nested" if tensor.is_nested else "meta" if tensor.is_meta else str(tensor.layout)
                problems.append(f"{name!r}: only dense tensors with data can be loaded, got a {kind} tensor"
                                + (" (quantized)" if tensor.is_quantized else ""))  # fmt: skip
            elif target is None:
                if self.strict:
                    problems.append(f"unexpected {name!r}")
            elif target.shape != tensor.shape:
                problems.append(f"{name!r}: shape {list(tensor.shape)}, the module has {list(target.shape)}")
            elif target.dtype != tensor.dtype:
                problems.append(f"{name!r}: dtype {dtype_name(tensor.dtype)}, the module has {dtype_name(target.dtype)}")
            elif name in loaded or name in seen:
                problems.append(f"{name!r} arrived twice in one update")
            else:
                dst.append(target)
                src.append(tensor)
                positions.append(position)
            seen.add(name)
        if problems:
            hint = ""
            if any(name in loaded for name, _ in batch):
                hint = (" (names count per update: end each update with loader.finish(), or receive "
                        "inside `with loader.update():`)")  # fmt: skip
            raise ValueError(f"cannot load {len(problems)} tensor(s) into the module: " + "; ".join(problems) + hint)
        alone = _alone(dst)
        _copy(dst, src, alone)
        names = {name for name in seen if name in targets}
        loaded |= names
        if key is not None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
                self._by_pairs.clear()
            every = positions if len(positions) < len(batch) else None  # None: every position loads
            replaced = self._plans.get(key)
            if replaced is not None:  # its pairs (views of a buffer the receiver let go, maybe) go with it
                self._check(replaced, None)
            made = self._plans[key] = _BatchPlan(every, dst, src, frozenset(names), alone)
            self._check(made, batch.pairs if _unchanged(batch) else None)

    def _check(self, plan: _BatchPlan, pairs: tuple | None) -> None:
        """``plan.checked = pairs``, and the plan found by them (``_by_pairs``: by their id, theirs
        while the plan holds them; a stale entry fails the identity test) and no longer by the
        pairs it held before."""
        if plan.checked is not None and plan.checked is not pairs and self._by_pairs.get(id(plan.checked)) is plan:
            del self._by_pairs[id(plan.checked)]
        plan.checked = pairs
        if pairs is not None:
            if len(self._by_pairs) >= _MAX_PLANS:
                self._by_pairs.clear()
            self._by_pairs[id(pairs)] = plan

    def missing(self) -> list[str]:
        """Tensors of the module not loaded in the current update (the first name of tied ones)."""
        if len(self.loaded) == len(self._first) == len(self._aliases):  # no ties, every name: none missing
            return []
        arrived = {self._first[name] for name in self.loaded}
        return [first for first in self._aliases if first not in arrived]

    def reset(self) -> None:
        """Forget what arrived: the next call starts a new update."""
        self.loaded = set()

    def finish(self) -> None:
        """End of an update. Strict: raise ValueError naming every tensor that did not arrive.
        Resets for the next update either way."""
        missing = self.missing()
        self.reset()
        if self.strict and missing:
            raise ValueError(f"{len(missing)} tensor(s) of the module did not arrive: "
                             + ", ".join(self._describe_missing(m) for m in missing))  # fmt: skip

    def _describe_missing(self, first: str) -> str:
        aliases = self._aliases[first]
        return repr(first) if len(aliases) == 1 else f"{first!r} (or its tied names {aliases[1:]})"

    @contextlib.contextmanager
    def update(self) -> Iterator[ModuleLoader]:
        """One update: reset on entry; :meth:`finish` on success; :meth:`reset` if the body raised."""
        self.reset()
        try:
            yield self
        except BaseException:
            self.reset()
            raise
        self.finish()

    def check(self, update_info: NCCLWeightTransferUpdateInfo | Mapping[str, Any]) -> None:
        """Before a transfer: one ValueError naming every name, shape or dtype of
        ``update_info`` (the dataclass or a dict of its fields, as ``receive_weights``
        takes) that this module cannot take (and, strict, every tensor of the module
        it leaves out)."""
        update_info = parse_info(NCCLWeightTransferUpdateInfo, update_info, "update_info")
        problems, names = [], set()
        for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            problem = self._problem(name, parse_dtype(dtype), list(shape))
            if problem is None and name in names:
                problem = f"{name!r} is listed twice"
            if problem is not None:
                problems.append(problem)
            names.add(name)
        if self.strict:
            covered = {self._first[n] for n in names if n in self._first}
            problems += [f"missing {self._describe_missing(m)}" for m in self._aliases if m not in covered]
        if problems:
            raise ValueError(f"update does not fit the module ({len(problems)} problem(s)): " + "; ".join(problems))
