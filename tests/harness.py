"""Run several ranks of a test under one deadline, and report every rank.

Two tiers share one contract: each rank runs ``fn(rank, *args)``; the harness
returns the list of results in rank order, or fails the test with every rank's
traceback (and, for a straggler, where it was stuck) once the deadline passes.

* :func:`run_threads`: ranks as threads of this process (fast: no torch import).
* :func:`run_processes`: ranks as spawned processes (for default groups,
  torchrun-like worlds and killing a peer). Stragglers are killed.

Deadlines come in layers: the library's ``timeout_s`` (a few seconds in tests)
< the harness deadline < pytest-timeout.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["free_port", "run_threads", "run_processes", "RankFailure", "Outcome", "bytes_equal", "digest", "ADDR",
           "gloo_trainer", "gloo_worker", "run_world"]

ADDR = "127.0.0.1"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from demo_util import free_port as _pick_port  # noqa: E402


def free_port() -> int:
    """A port that was free a moment ago, chosen below the kernel's ephemeral
    range (see ``scripts/demo_util.free_port``, shared with the demo).
    Callers retry on 'already in use'."""
    return _pick_port(ADDR)


class RankFailure(AssertionError):
    pass


class Outcome:
    """What one rank did: ``value`` if it returned, ``error`` (with traceback) if it raised."""

    def __init__(self, rank: int, value: Any = None, error: BaseException | None = None, tb: str = "") -> None:
        self.rank, self.value, self.error, self.tb = rank, value, error, tb

    @property
    def ok(self) -> bool:
        return self.error is None and not self.tb

    def __repr__(self) -> str:
        return f"Outcome(rank={self.rank}, ok={self.ok}, value={self.value!r:.80}, error={self.error!r:.300})"


def _report(outcomes: Sequence[Outcome | None], stuck: dict[int, str], what: str) -> str:
    lines = [what]
    for rank, out in enumerate(outcomes):
        if out is None:
            lines.append(f"--- rank {rank}: did not finish ---\n{stuck.get(rank, '(no stack)')}")
        elif not out.ok:
            lines.append(f"--- rank {rank}: raised ---\n{out.tb}")
        else:
            lines.append(f"--- rank {rank}: returned {out.value!r:.200}")
    return "\n".join(lines)


def _finish(outcomes: list[Outcome | None], stuck: dict[int, str], expect_ok: bool) -> list[Outcome]:
    if any(o is None for o in outcomes):
        raise RankFailure(_report(outcomes, stuck, "deadline passed with ranks still running"))
    if expect_ok and not all(o.ok for o in outcomes):  # type: ignore[union-attr]
        raise RankFailure(_report(outcomes, stuck, "a rank failed"))
    return outcomes  # type: ignore[return-value]


def run_threads(
    fn: Callable[..., Any], world: int, *args: Any, deadline_s: float = 60.0, expect_ok: bool = True
) -> list[Outcome]:
    """Run ``fn(rank, *args)`` for each rank in threads; bounded by ``deadline_s``."""
    outcomes: list[Outcome | None] = [None] * world

    def body(rank: int) -> None:
        try:
            outcomes[rank] = Outcome(rank, value=fn(rank, *args))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcomes[rank] = Outcome(rank, error=e, tb=traceback.format_exc())

    threads = [threading.Thread(target=body, args=(r,), daemon=True, name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    stuck = {}
    frames = sys._current_frames()
    for rank, t in enumerate(threads):
        if t.is_alive() and t.ident in frames:
            stuck[rank] = "".join(traceback.format_stack(frames[t.ident]))
    return _finish(outcomes, stuck, expect_ok)


def _child(fn: Callable[..., Any], rank: int, args: tuple, conn: Any, deadline_s: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The child prints its own stack shortly before the parent gives up on it.
    faulthandler.dump_traceback_later(max(1.0, deadline_s - 2.0), exit=False)
    try:
        import torch

        torch.set_num_threads(1)
        value = fn(rank, *args)
        conn.send(("ok", value, ""))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        try:
            conn.send(("err", f"{type(e).__name__}: {e}", traceback.format_exc()))
        except Exception:
            pass
    finally:
        conn.close()


def run_processes(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    deadline_s: float = 90.0,
    expect_ok: bool = True,
    per_rank_args: Sequence[tuple] | None = None,
) -> list[Outcome]:
    """Run ``fn(rank, *args)`` in ``world`` spawned processes; kill any left at the deadline.

    ``fn`` must be importable (module level). A rank that raises comes back as
    an Outcome whose ``error`` is the message string and ``tb`` the traceback.
    A rank that dies without reporting (killed, crashed) comes back with
    ``error`` naming its exit code.
    """
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        extra = per_rank_args[rank] if per_rank_args is not None else ()
        p = ctx.Process(target=_child, args=(fn, rank, tuple(args) + tuple(extra), child, deadline_s), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    outcomes: list[Outcome | None] = [None] * world
    end = time.monotonic() + deadline_s
    pending = set(range(world))
    while pending and time.monotonic() < end:
        for rank in list(pending):
            conn = conns[rank]
            if conn.poll(0.02):
                try:
                    kind, value, tb = conn.recv()
                except EOFError:
                    procs[rank].join(5)
                    outcomes[rank] = Outcome(rank, error=RuntimeError(f"exited with code {procs[rank].exitcode}"),
                                             tb=f"rank {rank} exited with code {procs[rank].exitcode} without reporting")
                else:
                    outcomes[rank] = Outcome(rank, value=value) if kind == "ok" else Outcome(rank, error=value, tb=tb)
                pending.discard(rank)
    stuck = {}
    for rank in pending:
        stuck[rank] = "(killed at the deadline; its stack was printed to stderr by faulthandler)"
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    return _finish(outcomes, stuck, expect_ok)


def bytes_equal(a: Any, b: Any) -> bool:
    """Bit-exact equality of two tensors: dtype, shape and every byte."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    ab = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    bb = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(ab, bb)


def digest(t: Any) -> str:
    """sha256 of a tensor's row-major bytes (no numpy needed: CI's venv has none)."""
    import ctypes
    import hashlib

    import torch

    host = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(ctypes.string_at(host.data_ptr(), host.numel())).hexdigest()


# -- Gloo side groups of thread-ranks ---------------------------------------------------------


def gloo_trainer(port: int, world: int, *, timeout: float, token: str | None = None) -> Any:
    """Rank 0 of a Gloo side group on the loopback (blocks until every worker joins)."""
    from torchxfer import NCCLWeightTransferEngine

    return NCCLWeightTransferEngine.trainer_init(
        dict(master_address=ADDR, master_port=port, world_size=world, token=token), backend="gloo", timeout_s=timeout
    )


def gloo_worker(rank: int, port: int, world: int, *, timeout: float, token: str | None = None,
                device: str | None = None, dp: bool = False) -> Any:  # fmt: skip
    """The worker at side rank ``rank``: one replica of TP=world-1, or (``dp``)
    world-1 replicas of TP=1. Blocks until the group forms."""
    from torchxfer import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo, ParallelConfig, WeightTransferConfig

    if dp:
        pc = ParallelConfig(data_parallel_rank=rank - 1, data_parallel_size=world - 1)
    else:
        pc = ParallelConfig(rank=rank - 1, tensor_parallel_size=world - 1)
    engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="gloo", timeout_s=timeout, device=device), pc)
    engine.init_transfer_engine(NCCLWeightTransferInitInfo(ADDR, port, 1, world, token=token))
    return engine


def run_world(body: Callable[[int, int], Any], world: int, *, deadline_s: float) -> list[Any]:
    """``body(rank, port)`` on ``world`` thread-ranks; the values in rank order.

    Retried on a fresh port (twice) if the trainer's port was taken meanwhile;
    any other failure fails the test with every failing rank's traceback.
    """
    from torchxfer import TransferError

    for attempt in range(3):
        outcomes = run_threads(body, world, free_port(), deadline_s=deadline_s, expect_ok=False)
        first = outcomes[0].error
        if attempt < 2 and isinstance(first, TransferError) and "already in use" in str(first):
            continue
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise AssertionError("\n".join(f"--- rank {o.rank} raised ---\n{o.tb}" for o in failed))
        return [o.value for o in outcomes]
    raise AssertionError("unreachable")
