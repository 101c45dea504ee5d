"""The trainer ranks' agreement in one send_model call: the plan check, the status steps, the outcome.

Every trainer rank makes the same calls on the same group (see
:mod:`torchxfer.trainer` for when): :meth:`Lockstep.begin` (one all_gather:
every rank's plan digest, whether it sends, its peer-read row digest; posted
by :meth:`Lockstep.post_begin` and waited for by :meth:`Lockstep.finish_begin`,
so the sender can prepare local work while it travels), then
either the peer-read exchange and wait (:meth:`Lockstep.exchange`,
:meth:`Lockstep.await_sender`) or a status step before each group of
collective gathers (:meth:`Lockstep.step`), then :meth:`Lockstep.finish`.
A failing rank posts a nonzero status in the same all_reduce the others use
for a step or the finish, then every rank's message is exchanged. Every wait
is bounded by ``timeout_s`` (default: the group's own).

The status group: the trainer group the caller named, or, for an NCCL
default group, a Gloo twin of it made once by every rank together
(:func:`status_group`): on NCCL a status wait is a kernel on the rank's GPU.
"""

from __future__ import annotations

import logging
import struct
import weakref
from typing import Any

import torch
import torch.distributed as dist

from .config import wait_timeout
from .errors import TransferError
from .peer_reads import digest_words, raw_bytes
from .sources import Entry

__all__ = ["DONE", "FAILED", "FALLBACK", "Lockstep", "mapped", "status_group"]

log = logging.getLogger("torchxfer")

MESSAGE_BYTES = 2048
"""Most bytes of one trainer rank's error message in a failed lockstep."""
DONE, FAILED, FALLBACK = 0, 1, 2
"""Status codes of the lockstep all_reduce (MAX): under peer reads only the sender posts
anything but 0, so the others read its code; ``FALLBACK`` is never met by a step."""


mapped: "weakref.WeakKeyDictionary[Any, tuple[list[int], Any]]" = weakref.WeakKeyDictionary()
"""The sender, by status group: the digest of the peer-read rows it last agreed on and
mapped (:meth:`Lockstep.table_digest`), and those rows decoded. Weak, as the two below: a
status group the caller drops is forgotten with what it mapped."""


_told: "weakref.WeakKeyDictionary[Any, tuple[Any, torch.Tensor]]" = weakref.WeakKeyDictionary()
"""Status group -> (the sender's last ``tell`` all_reduce, its tensor)."""

_failed: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
"""Status group -> why: a wait on it failed or ran out on this rank. Its collectives cannot be
taken back, so another rank's next ones would pair with those this rank left behind: send_model
refuses the group from then on (:meth:`Lockstep.check_usable`). Weak: a group dropped is forgotten."""

_twins: dict[int, tuple[Any, Any]] = {}
"""id(default group) -> (the default group, its Gloo twin), made once per default group."""


def status_group(trainer_group: Any, timeout_s: float | None = None) -> Any:
    """The group that carries send_model's lockstep (see ``trainer_group``): every rank of the
    default group calls this together, so a Gloo twin of the default group is made together,
    within ``timeout_s`` (None: torch's default for the group) and with it as the group's timeout."""
    if trainer_group is not dist.group.WORLD or "gloo" in str(dist.get_backend(trainer_group)).lower():
        return trainer_group
    known = _twins.get(id(trainer_group))
    if known is None or known[0] is not trainer_group:
        _twins.clear()
        kwargs = {} if timeout_s is None else {"timeout": wait_timeout(timeout_s)}
        twin = dist.new_group(backend="gloo", **kwargs)
        log.info("send_model: status traffic on a Gloo group of the default group's %d ranks", twin.size())
        known = _twins[id(trainer_group)] = (trainer_group, twin)
    return known[1]


def plan_digest(entries: list[Entry], bucketing: str) -> list[int]:
    """The digest of a plan that every trainer rank compares; kept with a module's cached plan."""
    planned = getattr(entries, "planned", None)
    known = None if planned is None else planned.digests.get(bucketing)
    if known is None:
        # Any name a state dict may hold, lone surrogates included, digests (the same way on every rank).
        known = digest_words("\n".join([bucketing] + [e.describe() for e in entries]).encode("utf-8", "surrogatepass"))
        if planned is not None:
            planned.digests[bucketing] = known
    return known


class Lockstep:
    """Plan check and status agreement among the trainer ranks of one send_model call.

    Every rank makes the same sequence of calls: ``begin``, then ``step`` before
    each gather, then ``finish``, except that a rank stops at the first
    failure. A failure is a nonzero status in the same all_reduce the others
    use for ``step`` or ``finish``, so whichever call of theirs it meets, they
    learn it there. Then each rank's message is exchanged, and ``done`` is set.
    """

    def __init__(self, pg: dist.ProcessGroup, timeout_s: float | None, steps: dist.ProcessGroup | None = None) -> None:
        self.timeout = None if timeout_s is None else wait_timeout(timeout_s)
        self.steps = steps  # the group of the per-bucket steps of collective gathers, if not pg
        self._use(pg)
        self.rank = pg.rank()
        self.size = pg.size()
        self.ranks = dist.get_process_group_ranks(pg)  # global ranks, in group order
        self.done = False  # a failure was agreed, or the group failed: no more collectives

    def _use(self, pg: dist.ProcessGroup) -> None:
        self.pg = pg
        backend = str(dist.get_backend(pg)).lower()
        on_cpu = "gloo" in backend or not torch.cuda.is_available()
        self.device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
        self.flag = torch.zeros(1, dtype=torch.int64, device=self.device)

    def collective_gathers(self) -> None:
        """Every rank, at the same point (after the plan check, and after the peer-read exchange
        when there is one): the update gathers with collectives, so its status traffic moves to
        the trainer group the caller named. Its per-bucket status reads on a CUDA group also
        pace rank 0's gathers, which the memory bound of collective gathers relies on."""
        if self.steps is not None:
            self._use(self.steps)
            self.steps = None
            self.check_usable()

    def exchange(self, row: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``row`` (one all_gather; every rank passes a row of one length), on the CPU."""
        row = row.to(self.device)
        rows = [torch.empty_like(row) for _ in range(self.size)]
        self._wait(dist.all_gather(rows, row, group=self.pg, async_op=True), "send_model peer-read exchange")
        return [r.cpu() for r in rows]

    def await_sender(self) -> int:
        """A rank that does not send, under peer reads: wait for the sender's outcome, met by its
        ``finish`` (``DONE``), ``fallback`` (``FALLBACK``) or ``fail`` (TransferError here)."""
        try:
            code = self._all_reduce_flag(0, "send_model status")
        except TransferError as e:
            raise TransferError(f"{e} Or the sender's update is still running: under peer reads this rank waits "
                                "once for the whole update, so timeout_s must cover it (the workers' loads "
                                "included); the sender stops reading this rank's shards before then") from e
        if code not in (DONE, FALLBACK):
            raise TransferError(f"send_model failed on another trainer rank: {self._messages(None)}")
        return code

    def fallback(self) -> None:
        """The sender, under agreed peer reads that it cannot serve: every rank gathers as usual."""
        self._all_reduce_flag(FALLBACK, "send_model status")

    def check_usable(self) -> None:
        """TransferError if a wait on this status group failed on this rank before (see ``_failed``)."""
        known = _failed.get(self.pg)
        if known is not None:
            self.done = True
            raise TransferError(f"send_model cannot use this trainer group: {known} earlier on trainer rank "
                                f"{self.rank}, and a collective left behind cannot be taken back (the other ranks' "
                                "next ones would pair with it). Make a new trainer group on every rank")  # fmt: skip

    def _wait(self, work: Any, what: str) -> None:
        try:
            ok = work.wait() if self.timeout is None else work.wait(self.timeout)
            if ok is False:
                raise TimeoutError(f"no completion after {self.timeout}")
        except Exception as e:
            self.done = True
            _failed[self.pg] = f"{what} failed ({type(e).__name__})"
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
        rows = torch.zeros(self.size, MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        if error:
            raw = error.encode("utf-8", "backslashreplace")[:MESSAGE_BYTES]
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

    def begin(self, entries: list[Entry], bucketing: str, is_sender: int, error: Exception | None,
              peer_row: torch.Tensor | None = None) -> int:  # fmt: skip
        """Check that every rank planned the same tensors and that one rank sends (``is_sender`` 1),
        or every rank through its own colocated group (2; 0 on a rank that does not send);
        returns the sender's global rank (-1: every rank sends). Blocking: :meth:`post_begin`,
        then :meth:`finish_begin`.

        The same all_gather carries a digest of each rank's peer-read row (``peer_row``) and,
        from the sender, the digest of the rows it last agreed on and mapped (``mapped``):
        when they match (:meth:`same_rows`), nobody exchanges rows again."""
        self.post_begin(entries, bucketing, is_sender, error, peer_row)
        return self.finish_begin()

    def post_begin(self, entries: list[Entry], bucketing: str, is_sender: int, error: Exception | None,
                   peer_row: torch.Tensor | None = None) -> None:  # fmt: skip
        """:meth:`begin`'s all_gather, posted, not waited for (every rank, together). The caller
        may do local work before :meth:`finish_begin`, but nothing another rank could observe."""
        self.check_usable()
        self.settle_last()
        digest = plan_digest(entries, bucketing)
        mine = digest_words(raw_bytes(peer_row)) if peer_row is not None else [0] * 4
        cached = mapped.get(self.pg, ([0] * 4, None))[0] if is_sender == 1 else [0] * 4
        row = torch.tensor(
            [1 if error else 0, int(is_sender), len(entries), sum(e.collective for e in entries)]
            + digest + mine + list(cached),
            dtype=torch.int64, device=self.device,
        )  # fmt: skip
        rows = [torch.empty_like(row) for _ in range(self.size)]
        self._begun = (dist.all_gather(rows, row, group=self.pg, async_op=True), rows, error)

    def finish_begin(self) -> int:
        """Wait for :meth:`post_begin`'s all_gather (bounded) and check the table: as :meth:`begin`."""
        work, rows, error = self._begun
        del self._begun
        self._wait(work, "send_model plan check")
        table = [r.cpu().tolist() for r in rows]
        self.row_digests = [r[8:12] for r in table]
        self.sender_cached = next((r[12:16] for r in table if r[1] == 1), [0] * 4)
        if any(r[0] for r in table):
            text = self._messages(None if error is None else f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            raise ValueError(f"send_model failed on another trainer rank before anything moved: {text}")
        problems = []
        plans = {tuple(r[2:8]) for r in table}
        if len(plans) > 1:
            ranks = "; ".join(f"rank {i}: {r[2]} tensors ({r[3]} sharded), plan {r[4]:014x}"
                              for i, r in enumerate(table))  # fmt: skip
            problems.append(
                f"trainer ranks planned different updates ({ranks}). Every trainer rank must call send_model "
                "with the same model or state dict, in the same order, with the same dtype, name_map, "
                "include_buffers, packed and packed_buffer_size_bytes; otherwise their gathers would pair with the wrong tensors"
            )
        senders = [i for i, r in enumerate(table) if r[1]]
        every_rank_colocated = all(r[1] == 2 for r in table)
        if len(senders) != 1 and not every_rank_colocated:
            problems.append(f"exactly one trainer rank must pass a side group, or every rank its own colocated "
                            f"group; ranks {senders} passed one")  # fmt: skip
        elif any(r[1] == 2 for r in table) and not every_rank_colocated:
            problems.append("a colocated group on one trainer rank needs a colocated group on every rank")
        if problems:
            self.done = True
            raise ValueError("send_model: " + "; ".join(problems))
        if every_rank_colocated:
            return -1
        return senders[0] if self.pg is dist.group.WORLD else dist.get_global_rank(self.pg, senders[0])

    def same_rows(self) -> list[int] | None:
        """After ``begin``: the digest of every rank's peer-read row, in rank order, when it is
        the one the sender last agreed on and mapped (the rows need not travel again); else None.
        Every rank computes the same answer from the same table."""
        if any(not any(d) for d in self.row_digests):
            return None
        now = self.table_digest()
        return now if now == list(self.sender_cached) else None

    def table_digest(self) -> list[int]:
        """The digest of every rank's peer-read row, in rank order (what ``mapped`` keeps)."""
        return digest_words(b"".join(struct.pack("<4q", *d) for d in self.row_digests))

    def step(self) -> None:
        """Before posting gathers: continue together, or raise TransferError if another rank failed."""
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

    def tell(self) -> None:
        """The sender under peer reads, after a successful update: post ``DONE`` for the others'
        :meth:`await_sender` without waiting for the exchange to complete (they post nothing
        the sender needs). The next Lockstep on this group waits for it first (:meth:`settle_last`)."""
        self.flag.fill_(DONE)
        work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.pg, async_op=True)
        _told[self.pg] = (work, self.flag)

    def settle_last(self) -> None:
        """Every rank, at the start of a send_model call: the sender's last :meth:`tell` on this
        group, complete (bounded by ``timeout_s``); TransferError if it failed."""
        told = _told.pop(self.pg, None)
        if told is not None:
            self._wait(told[0], "send_model status of the last update")
