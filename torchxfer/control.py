"""The control channel of a side group: headers and agreed status.

Control messages travel on the side group's own Gloo group (CPU tensors), so
they never queue behind a payload. Every rank of the group calls these
functions together, in the same order; each collective is bounded by the
group's ``timeout_s``.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
import torch.distributed as dist

from .errors import TransferError
from .group import SideGroup
from .wire import PREFIX_BYTES, decode, frame_length

__all__ = ["ControlChannel", "checksum", "INLINE_FRAME_BYTES", "MESSAGE_BYTES"]

INLINE_FRAME_BYTES = 4096
"""Bytes of every header broadcast in one go; longer headers take a second broadcast."""
MESSAGE_BYTES = 64 << 10
"""Most bytes of one rank's error message in a failed ``agree`` (enough for
two descriptions with the longest names)."""


def _bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a uint8 tensor, copied to host (numpy is not required)."""
    host = tensor.contiguous().cpu()
    return ctypes.string_at(host.data_ptr(), host.numel())


class ControlChannel:
    """Header frames and status agreement over ``group.control``; its tensors are made once."""

    def __init__(self, group: SideGroup) -> None:
        self.group = group
        self.frame = torch.empty(INLINE_FRAME_BYTES, dtype=torch.uint8)
        self.flag = torch.zeros(group.size(), dtype=torch.int64)

    def _broadcast(self, tensor: torch.Tensor, what: str, src: int = 0) -> None:
        group = self.group
        try:
            work = dist.broadcast(tensor, group=group.control, group_src=src, async_op=True)
        except Exception as e:
            group.mark_broken(f"{what}: {e}")
            raise TransferError(f"{what} failed on rank {group.rank()}: {e}", broken=True) from e
        group.wait(work, what)

    def send_frame(self, frame: bytes) -> None:
        """Rank 0: broadcast one header frame."""
        head = frame[:INLINE_FRAME_BYTES]
        self.frame[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        self._broadcast(self.frame, "header broadcast")
        if len(frame) > INLINE_FRAME_BYTES:
            rest = torch.frombuffer(bytearray(frame[INLINE_FRAME_BYTES:]), dtype=torch.uint8).clone()
            self._broadcast(rest, "header broadcast")

    def recv_frame(self) -> Any:
        """Other ranks: receive and decode one header. A frame that does not
        decode is returned as its TransferError (the rank reports it at the next
        agree); one that cannot even be sized breaks the group."""
        group = self.group
        self._broadcast(self.frame, "header broadcast")
        head = _bytes(self.frame)
        try:
            total = frame_length(head[:PREFIX_BYTES])
        except TransferError as e:
            group.mark_broken(str(e))
            raise TransferError(f"rank {group.rank()} received a bad header: {e}", broken=True) from None
        if total > INLINE_FRAME_BYTES:
            rest = torch.empty(total - INLINE_FRAME_BYTES, dtype=torch.uint8)
            self._broadcast(rest, "header broadcast")
            head += _bytes(rest)
        try:
            return decode(head[:total])
        except TransferError as e:
            return e

    def agree(self, error: str | None, what: str) -> None:
        """Every rank learns whether any rank failed; on failure all raise the same TransferError.

        One all_reduce of an int64 per rank (the byte length of its message, 0
        when fine); only on failure, each failing rank then broadcasts its
        message whole. The group stays usable after an agreed failure.
        """
        group = self.group
        raw = error.encode()[:MESSAGE_BYTES] if error else b""
        self.flag.zero_()
        self.flag[group.rank()] = len(raw) or (1 if error else 0)
        group.wait(dist.all_reduce(self.flag, group=group.control, async_op=True), f"status all_reduce ({what})")
        lengths = self.flag.tolist()
        if not any(lengths):
            return
        parts = []
        for rank, length in enumerate(lengths):
            if not length:
                continue
            if rank == group.rank():
                text = torch.frombuffer(bytearray(raw.ljust(length, b"?")), dtype=torch.uint8)
            else:
                text = torch.empty(min(length, MESSAGE_BYTES), dtype=torch.uint8)
            self._broadcast(text, f"error broadcast ({what})", src=rank)
            parts.append(f"[rank {rank}] {_bytes(text).decode(errors='replace')}")
        raise TransferError(f"{what} failed: " + "; ".join(parts))


def checksum(data: torch.Tensor) -> int:
    """Position-sensitive checksum of a uint8 tensor, computed on its own device."""
    n = data.numel()
    words = data[: n - n % 4].view(torch.int32)
    tail = data[n - n % 4 :].to(torch.int64)
    prime = 2_147_483_647
    # Sums of 1024-word blocks, widened to int64 one 4 MiB chunk at a time so
    # the scratch memory stays small whatever the bucket size.
    full = words.numel() // 1024 * 1024
    parts = [words[i : min(i + (1 << 20), full)].view(-1, 1024).to(torch.int64).sum(dim=1) for i in range(0, full, 1 << 20)]
    if full < words.numel():
        parts.append(words[full:].to(torch.int64).sum().reshape(1))
    blocks = (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=data.device)) % prime
    weights = torch.arange(1, blocks.numel() + 1, dtype=torch.int64, device=data.device) % prime
    total = (blocks * weights % prime).sum() + (tail * torch.arange(1, tail.numel() + 1, device=data.device)).sum()
    return int(total.item()) * 8 + n % 8
