"""What the sender takes from the caller's source: its (name, tensor) pairs, checked and
transformed one at a time (:func:`pairs`), or, for a bucket of the cached layout, pulled at once
when they are the very tensors of the last update (:func:`pull_same`, :func:`pull_bucket`).

Called by rank 0's senders (broadcast and colocated) alone; local, never blocks on a peer.
Anything the caller's code raises comes out as :class:`SourceFailed`.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .group import metadata_guard
from .plan import BucketPlan

__all__ = ["PLAIN_ITERATORS", "Item", "SourceFailed", "all_on", "gc_paused", "pairs", "pull_bucket", "pull_same", "then_raise"]

Item = tuple[str, torch.Tensor]


class SourceFailed(Exception):
    """The caller's source (iterator, post_iter_func, or a tensor it gave) raised ``original``."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def pairs(items: Iterable[Any], post_iter_func: Callable | None,
          check: Callable[[Any, Any], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """The caller's pairs, transformed; anything raised by the caller's code, by
    ``check(name, tensor)`` or for a malformed pair is wrapped in SourceFailed.

    ``check`` runs on the pair as given and on the transformed one, unless its
    tensor is exactly a ``torch.Tensor`` or ``Parameter`` (the check is for
    tensor subclasses: a function call per tensor costs milliseconds per update
    with thousands of tensors). One generator, whatever is checked, for the
    same reason.
    """
    plain = _PLAIN_TYPES
    try:
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ValueError(f"expected (name, tensor) pairs, got {type(item).__name__}: {item!r:.100}")
            if check is not None and type(item[1]) not in plain:
                check(*item)  # the caller's tensor, before any transform touches it
            if post_iter_func is not None:
                item = (item[0], post_iter_func(item))
                if check is not None and type(item[1]) not in plain:
                    check(*item)
            # The pair itself when untransformed: no new tuple per tensor per update (fewer
            # objects for the cyclic GC to promote, and so fewer full collections).
            yield item
    except Exception as e:
        raise SourceFailed(e) from e


_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_IS_CPU = operator.attrgetter("is_cpu")
_IS_CUDA = operator.attrgetter("is_cuda")


def all_on(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every tensor is on ``device``; without making a ``torch.device`` per tensor
    (a few hundred nanoseconds each) for the CPU and indexed CUDA devices."""
    if device.type == "cpu":
        return all(map(_IS_CPU, tensors))
    if device.type == "cuda" and device.index is not None:
        return all(map(_IS_CUDA, tensors)) and list(map(torch.Tensor.get_device, tensors)) == [device.index] * len(tensors)
    return all(t.device == device for t in tensors)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused for an update (restored after it, if it was on).

    Pulling thousands of tensors allocates as many short-lived containers (the
    source's pairs, each tensor's ``torch.Size``); with the collector on, they
    trigger collections in the middle of the update, now and then a full one of
    the whole process (tens of milliseconds in a trainer's heap). What the update
    leaves for the collector is collected at its next run after the update.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _bucket_keys(plan: BucketPlan, memo: dict) -> tuple[list[str], list[torch.dtype], list[torch.Size]]:
    """The bucket's names, dtypes and shapes, slot by slot, made once and kept in ``memo``."""
    keys = memo.get("keys")
    if keys is None:
        keys = memo["keys"] = ([s.spec.name for s in plan.slots], [s.spec.dtype for s in plan.slots],
                               [s.spec.shape for s in plan.slots])  # fmt: skip
    return keys


def pull_same(plan: BucketPlan, memo: dict, refs: list, item: Item, source: Iterator[Item],
              device: torch.device) -> tuple[list[Item], list[torch.Tensor] | None]:  # fmt: skip
    """Pull a bucket of the cached layout at once, for one fused copy: returns the pairs
    pulled (``item`` first) and, if they are exactly the bucket's tensors of the last
    update on ``device`` (``refs`` holding weak references to those), their tensors (else None).

    Pulled ahead only while each pair holds the very object of the last update: a source
    that refills a staging tensor yields new objects and is never pulled past one, so each
    of its values is packed before the next overwrites it (the names are compared once the
    bucket is in hand). The same object may still
    carry new metadata (``param.data = other``), so dtypes, shapes and devices are compared
    too. ``memo`` keeps the bucket's names, dtypes and shapes. ``refs`` None: a source of
    tensors made for this update that nothing else writes (``Sender.owned``), pulled while
    the names match, whatever the objects.
    """
    names, dtypes, shapes = _bucket_keys(plan, memo)
    batch = [item]
    append = batch.append
    if refs is None:
        same = item[0] == names[0]
        if same:
            for name, pulled in zip(itertools.islice(names, 1, None), source):
                append(pulled)
                if pulled[0] != name:
                    return batch, None
    else:
        same = refs[0]() is item[1]
        if same:  # the identity per pair, before the next is pulled; the names after, in one comparison
            for ref, pulled in zip(itertools.islice(refs, 1, None), source):
                append(pulled)
                if ref() is not pulled[1]:
                    return batch, None
            same = list(map(_FIRST, batch)) == names
    if not same or len(batch) != len(plan.slots):
        return batch, None
    tensors = list(map(_SECOND, batch))
    return batch, tensors if _same_metadata(memo, tensors, dtypes, shapes, device) else None


_NOT_SAME, _SAME, _GUARDED = 0, 1, 2


def _same_metadata(memo: dict, tensors: list[torch.Tensor], dtypes: list[torch.dtype], shapes: list[torch.Size],
                   device: torch.device) -> int:  # fmt: skip
    """Whether ``tensors`` have the bucket's dtypes and shapes and lie on ``device``: _GUARDED
    when the bucket's C++ guard (``memo["guard"]``, made from the first tensors that passed the
    plain comparisons) says so, strides included, or was just made from these very tensors;
    _SAME when they pass the plain comparisons only (reading ``shape`` costs about 250 ns a
    tensor from Python; alike tensors that fail the guard drop it for good); else _NOT_SAME."""
    guard = memo.get("guard")
    if guard is not None and guard(*tensors):
        return _GUARDED
    if list(map(_DTYPE, tensors)) != dtypes or list(map(_SHAPE, tensors)) != shapes or not all_on(tensors, device):
        return _NOT_SAME
    if "guard" in memo:  # alike tensors failed it once: the plain comparisons from now on
        memo["guard"] = None
        return _SAME
    memo["guard"] = metadata_guard(tensors)
    return _SAME if memo["guard"] is None else _GUARDED


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
PLAIN_ITERATORS = frozenset(type(iter(x)) for x in ([], (), {}.items(), {}.values()))
"""Iterators whose next item exists before it is pulled (no generator step runs to make it)."""
_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")


def pull_bucket(plan: BucketPlan, memo: dict, refs: list, item: Item, raw: Iterator[Any],
                device: torch.device) -> tuple[list[Any], list[torch.Tensor] | None, Exception | None]:  # fmt: skip
    """:func:`pull_same` for untransformed pairs, pulled straight from the caller's iterator ``raw``
    (the one :func:`pairs` wraps, without its generator step and checks per pair): the pairs
    pulled (``item``, which came through ``pairs``, first), their tensors if they are exactly the
    bucket's tensors of the last update (else None), and what the iterator raised, if it did.
    Pairs not taken go back through ``pairs`` (:func:`then_raise`), which checks each as it would
    have, then raises that error.

    The same rules as :func:`pull_same`: the next pair is pulled only while each holds the very
    object of the last update (so a source that refills a staging tensor is never pulled past
    one, and every tensor taken passed ``pairs``'s checks when it was first sent; a list, tuple
    or dict iterator, whose items exist before they are pulled, is pulled a bucket at a time and
    then compared); then the pairs
    are checked (2-tuples, names), and the tensors' dtypes, shapes and device, by one C++ call
    where torch allows (``group.metadata_guard``, made from the first tensors that passed the
    plain comparisons, and dropped if alike tensors ever fail it).
    """
    names, dtypes, shapes = _bucket_keys(plan, memo)
    batch = [item]
    if len(refs) != len(names) or None in refs:
        return batch, None, None
    expected = [ref() for ref in refs]  # held for this pull only (faster than a map of ref.__call__)
    if item[1] is not expected[0]:
        return batch, None, None
    plain = type(raw) in PLAIN_ITERATORS
    try:
        if plain:
            # Pulling ahead from a list, tuple or dict has no effect on the values pulled (no
            # generator step runs): the bucket is taken at once, then compared object by object.
            batch.extend(itertools.islice(raw, len(expected) - 1))
        else:
            append = batch.append
            for want, pulled in zip(itertools.islice(expected, 1, None), raw):
                append(pulled)
                if pulled[1] is not want:
                    return batch, None, None
    except Exception as e:  # the iterator's (a dict changed while iterated, say), or a pair that is not one
        return batch, None, e
    if (len(batch) != len(expected) or {*map(type, batch)} != {tuple} or {*map(len, batch)} != {2}
            or list(map(_FIRST, batch)) != names):  # fmt: skip
        return batch, None, None
    tensors = list(map(_SECOND, batch))
    if plain and not all(map(operator.is_, tensors, expected)):
        return batch, None, None
    same = _same_metadata(memo, tensors, dtypes, shapes, device)
    memo["guarded"] = same == _GUARDED  # every tensor as the guard's first ones were, strides included
    return batch, tensors if same else None, None


def then_raise(items: list[Any], error: Exception | None) -> Iterator[Any]:
    """``items``, then ``error`` raised (if any): pairs handed back to ``pairs`` in the order
    the caller's iterator gave them, its failure where it happened."""
    yield from items
    if error is not None:
        raise error

