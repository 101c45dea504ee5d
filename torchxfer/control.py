"""The control channel of a side group: rows, table frames and agreed errors.

Control messages travel on the side group's own Gloo group (CPU tensors), so
they never queue behind a payload. Every rank of the group calls these
methods together, in the same order; every wait is bounded by the group's
``timeout_s``. Every size a rank posts comes from a row that every rank has
seen (so all post the same collectives), and is checked against a fixed cap
first.
"""

from __future__ import annotations

import ctypes
import struct

import torch

from .errors import TransferError
from .group import SideGroup
from .wire import MAX_FRAME_BYTES, ROW_WORDS, Kind, Row, parse_row

__all__ = ["ControlChannel", "Step", "checksum", "MESSAGE_BYTES", "encode_message", "owned", "printable"]

MESSAGE_BYTES = 64 << 10
"""Most bytes of one rank's error message (enough for two descriptions with the longest names)."""


def _bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a uint8 CPU tensor."""
    return ctypes.string_at(tensor.data_ptr(), tensor.numel())


def owned(data: bytes) -> torch.Tensor:
    """``data`` in a uint8 tensor whose memory torch owns.

    Never hand a collective a tensor over Python-owned memory (``torch.frombuffer``):
    a backend thread that drops the last reference to it must take the GIL to free
    the Python buffer, which deadlocks against a thread that holds the GIL while it
    enqueues the next collective.
    """
    tensor = torch.empty(len(data), dtype=torch.uint8)
    if data:
        ctypes.memmove(tensor.data_ptr(), data, len(data))
    return tensor


def encode_message(text: str) -> bytes:
    """A message as it travels: UTF-8 (unencodable characters escaped), at most MESSAGE_BYTES."""
    return text.encode("utf-8", "backslashreplace")[:MESSAGE_BYTES]


_CPU = torch.device("cpu")
_ROW = struct.Struct(f"={ROW_WORDS}q")


class Step:
    """One posted control step: an all_gather of one row per rank.

    On the control group (Gloo, CPU tensors), or with ``payload`` on the payload
    group, queued behind the update's payload (on NCCL, device tensors: a row
    costs tens of microseconds there, against a few hundred on Gloo). Every rank
    posts a step on the same group: the rows that came before say which.
    """

    def __init__(self, channel: ControlChannel, words: list[int], what: str, payload: bool = False) -> None:
        self.channel, self.what, self.payload = channel, what, payload
        group = channel.group
        device = (group.data_device or _CPU) if payload else _CPU
        if device.type == "cuda":
            row, self._out = channel.device_row(device, words)
        else:
            row = torch.tensor(words, dtype=torch.int64)
            self._out = torch.empty(group.size() * ROW_WORDS, dtype=torch.int64)
        try:
            self._work = group.gather_row(group.pg if payload else group.control, self._out, row)
        except Exception as e:
            group.mark_broken(f"{what}: {e}")
            raise TransferError(f"{what} failed on rank {group.rank()}: {e}", broken=True) from e
        self._rows: list[Row] | None = None

    def done(self) -> bool:
        """True once the step completed (never blocks)."""
        return self._rows is not None or self._work.is_completed()

    def rows(self, timeout_s: float | None = None) -> list[Row]:
        """Every rank's row, checked; blocks at most ``timeout_s`` (default: the group's).

        A row that is not a row of this protocol breaks the group: its sender
        does not follow the same sequence of collectives.
        """
        if self._rows is None:
            group = self.channel.group
            group.wait(self._work, self.what, data=self.payload, timeout_s=timeout_s)
            words = self._out.tolist()  # on CUDA: ordered after the gather by the wait
            try:
                self._rows = [parse_row(words[r * ROW_WORDS : (r + 1) * ROW_WORDS], r) for r in range(group.size())]
            except TransferError as e:
                group.mark_broken(str(e))
                raise TransferError(f"{self.what}: {e}", broken=True) from None
        return self._rows


class ControlChannel:
    """Rows, frames and messages over ``group.control``."""

    def __init__(self, group: SideGroup) -> None:
        self.group = group
        self._device_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def device_row(self, device: torch.device, words: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``words`` copied to ``device`` for a step on the payload group, and that step's output:
        tensors made once per channel (a payload step is read before the next is posted).
        The copy goes through pinned memory, so it is queued on the stream: from pageable
        memory it would block this thread until everything queued before it has run. The
        words are written into the pinned row in place (its last copy to the device was
        ordered before the last step's collective, which this rank waited for)."""
        if self._device_rows is None or self._device_rows[1].device != device:
            self._device_rows = (torch.empty(ROW_WORDS, dtype=torch.int64, pin_memory=True),
                                 torch.empty(ROW_WORDS, dtype=torch.int64, device=device),
                                 torch.empty(self.group.size() * ROW_WORDS, dtype=torch.int64, device=device))  # fmt: skip
        pinned, on_device, out = self._device_rows
        ctypes.memmove(pinned.data_ptr(), _ROW.pack(*words), _ROW.size)
        on_device.copy_(pinned, non_blocking=True)
        return on_device, out

    def post(self, words: list[int], what: str, payload: bool = False) -> Step:
        """Post this rank's row of the next step (on the payload group with ``payload``);
        every rank posts one. Never blocks."""
        return Step(self, words, what, payload)

    def _broadcast(self, tensor: torch.Tensor, what: str, src: int = 0) -> None:
        group = self.group
        try:
            work = group.control_broadcast(tensor, src)
        except Exception as e:
            group.mark_broken(f"{what}: {e}")
            raise TransferError(f"{what} failed on rank {group.rank()}: {e}", broken=True) from e
        group.wait(work, what)

    def send_frame(self, frame: bytes, what: str) -> None:
        """Rank 0: broadcast a frame whose length every rank already has (from a row)."""
        self._broadcast(owned(frame), what)

    def recv_frame(self, length: int, what: str) -> bytes:
        """Other ranks: receive a frame of ``length`` bytes, a value from the trainer's
        row that every rank checked against MAX_FRAME_BYTES."""
        assert 0 < length <= MAX_FRAME_BYTES
        frame = torch.empty(length, dtype=torch.uint8)
        self._broadcast(frame, what)
        return _bytes(frame)

    def settle(self, rows: list[Row], mine: bytes, what: str) -> None:
        """After a step: raise the same TransferError on every rank if any rank reported a failure.

        Each failing rank's row declares its message length; every rank sees
        the same rows, so every rank posts the same broadcasts: one per
        failing rank whose length is within ``[1, MESSAGE_BYTES]``. A length
        outside it is reported as such, with no broadcast. ``mine`` is this
        rank's message (as declared in its row). Blocks at most ``timeout_s``
        per broadcast; returns when no rank failed.
        """
        lengths = {r: _status(row) for r, row in enumerate(rows)}
        failing = {r: n for r, n in lengths.items() if n}
        if not failing:
            return
        parts = []
        for rank, length in failing.items():
            if not 0 < length <= MESSAGE_BYTES:
                parts.append(f"[rank {rank}] (declared an invalid error length {length})")
                continue
            if rank == self.group.rank():
                assert len(mine) == length
                text = owned(mine)
            else:
                text = torch.zeros(length, dtype=torch.uint8)  # a peer that sends fewer bytes leaks nothing
            self._broadcast(text, f"error broadcast ({what})", src=rank)
            parts.append(f"[rank {rank}] {printable(_bytes(text).decode('utf-8', 'replace'))}")
        raise TransferError(f"{what} failed: " + "; ".join(parts))


def printable(text: str) -> str:
    """``text`` (a peer's, say) with every character that is not printable escaped (``\\n``,
    ``\\x1b`` ...): on one line, and no terminal control sequence reaches a log or a console."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _status(row: Row) -> int:
    """The error length a row declares: a worker's status, or the trainer's abort reason."""
    if row.kind == Kind.WORKER:
        return row.args[0]
    if row.kind == Kind.ABORT:
        return row.args[2]
    return 0


def checksum(data: torch.Tensor) -> int:
    """Position-sensitive checksum of a flat uint8 tensor, computed on its own device.

    Every 16-bit half-word, read as an unsigned number below the prime modulus, is
    weighted by its position (a weight in [1, p - 1], never 0), so a changed half-word
    changes the sum, and so does a dropped one or two different ones swapped (within
    p - 1 positions of each other). Whole 32-bit words would not do: a signed word can
    change by exactly the modulus. Computed in chunks of 2**20 half-words (scratch memory
    stays small whatever the bucket size), reduced after each chunk so that no run is
    too long for int64.
    """
    prime = 2_147_483_647
    n = data.numel()
    if data.storage_offset() % 2:  # a part of a split tensor may start at any byte: view halves of a copy
        data = data.clone()
    halves = data[: n - n % 2].view(torch.int16)
    acc = torch.zeros((), dtype=torch.int64, device=data.device)
    for i in range(0, halves.numel(), 1 << 20):
        chunk = halves[i : i + (1 << 20)].to(torch.int64) & 0xFFFF
        weights = torch.arange(i, i + chunk.numel(), dtype=torch.int64, device=data.device) % (prime - 1) + 1
        acc = (acc + (chunk * weights % prime).sum()) % prime
    total = int(acc.item())
    if n % 2:
        total = (total + int(data[n - 1].item()) * ((n // 2) % (prime - 1) + 1)) % prime
    return total * 8 + n % 8
