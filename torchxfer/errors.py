"""Errors raised by torchxfer.

``ValueError`` is raised for bad input (a config field, a tensor the wire cannot
carry) on the rank that was handed it. ``TransferError`` is raised for anything
that goes wrong between ranks: a peer that disagrees on what is being sent, a
peer that died or timed out, a header that does not decode, a failed
authentication. A protocol-level ``TransferError`` is raised on *every* rank of
the side group for the same update.
"""

from __future__ import annotations

__all__ = ["TransferError"]


class TransferError(RuntimeError):
    """A weight transfer failed between ranks of the side group.

    Attributes:
        broken: True when the side group itself can no longer be used (a peer
            died, a collective timed out, the communicator was aborted); the
            caller must ``shutdown()`` and build a new group. False when the
            failure was agreed on by every rank (a metadata mismatch, a
            rejected update, a failing ``load_weights``) and the group stays
            usable for the next update.
    """

    def __init__(self, message: str, *, broken: bool = False) -> None:
        super().__init__(message)
        self.broken = broken
