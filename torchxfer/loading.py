"""A ready ``load_weights`` for a plain ``nn.Module`` on the server side."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .config import NCCLWeightTransferUpdateInfo
from .packing import dtype_name, parse_dtype

__all__ = ["ModuleLoader"]


class ModuleLoader:
    """Copy received tensors into a module's parameters and buffers, by name, in place.

    Use one per worker; pass it as ``load_weights`` and call :meth:`finish`
    after ``receive_weights`` returns::

        loader = ModuleLoader(model)
        engine.receive_weights(None, loader)
        loader.finish()   # strict: every parameter and buffer arrived

    Tensors are copied into the existing storage (``copy_`` under no_grad):
    nothing is reallocated, so CUDA graphs and optimizer references stay
    valid. A tensor whose name is unknown (strict), whose shape differs, or
    whose dtype differs (no silent casts) fails the whole batch with one
    ValueError naming every such tensor; raised inside ``load_weights``, it
    reaches every rank of the transfer as a TransferError. Tied parameters
    are filled through any of their names.

    Args:
        module: the model to fill.
        strict: require every parameter and buffer (``finish``) and reject
            unknown names; with False, unknown names are skipped and missing
            ones allowed.
    """

    def __init__(self, module: nn.Module, *, strict: bool = True) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
        self.strict = strict
        self.targets: dict[str, torch.Tensor] = dict(module.state_dict(keep_vars=True))
        self.loaded: set[str] = set()

    def __call__(self, batch: Iterable[tuple[str, torch.Tensor]]) -> None:
        batch = list(batch)
        problems = []
        for name, tensor in batch:
            target = self.targets.get(name)
            if target is None:
                if self.strict:
                    problems.append(f"unexpected {name!r}")
            elif tuple(target.shape) != tuple(tensor.shape):
                problems.append(f"{name!r}: shape {list(tensor.shape)}, the module has {list(target.shape)}")
            elif target.dtype != tensor.dtype:
                problems.append(f"{name!r}: dtype {dtype_name(tensor.dtype)}, the module has {dtype_name(target.dtype)}")
        if problems:
            raise ValueError(f"cannot load {len(problems)} tensor(s): " + "; ".join(problems))
        with torch.no_grad():
            for name, tensor in batch:
                target = self.targets.get(name)
                if target is not None:
                    target.copy_(tensor)
                    self.loaded.add(name)

    def missing(self) -> list[str]:
        """Names of the module not loaded since the last :meth:`finish`."""
        return [name for name in self.targets if name not in self.loaded]

    def finish(self) -> None:
        """End of an update: in strict mode raise ValueError naming every
        missing parameter or buffer. Resets for the next update either way."""
        missing = self.missing()
        self.loaded = set()
        if self.strict and missing:
            raise ValueError(f"{len(missing)} tensor(s) of the module did not arrive: {missing}")

    def check(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        """Before a transfer: raise one ValueError naming every name, shape or
        dtype of ``update_info`` that this module cannot take (and, strict,
        every tensor of the module it leaves out)."""
        problems = []
        for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            target = self.targets.get(name)
            if target is None:
                if self.strict:
                    problems.append(f"unexpected {name!r}")
            elif list(target.shape) != list(shape):
                problems.append(f"{name!r}: shape {list(shape)}, the module has {list(target.shape)}")
            elif dtype_name(target.dtype) != dtype_name(parse_dtype(dtype)):
                problems.append(f"{name!r}: dtype {dtype}, the module has {dtype_name(target.dtype)}")
        if self.strict:
            sent = set(update_info.names)
            problems += [f"missing {name!r}" for name in self.targets if name not in sent]
        if problems:
            raise ValueError(f"update does not fit the module ({len(problems)} problem(s)): " + "; ".join(problems))

