"""SideGroup.wait: the outcome of a collective is the work's own, never a slice's timeout."""

from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from torchxfer import TransferError
from torchxfer.group import SideGroup


class FakeWork:
    """A work that completes (or fails) at the moment a wait slice expires.

    ``Work.wait(timeout)`` raises "Operation timed out!" when the slice
    expires; the work may complete right after, before the caller asks
    ``is_completed()``. That race was seen on real Gloo works in about 1 of
    150 slice timeouts under load.
    """

    def __init__(self, error: Exception | None, completes: bool = True) -> None:
        self.error, self.completes = error, completes
        self.completed = False

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if timeout is not None and not self.completed:
            self.completed = self.completes
            raise RuntimeError("Operation timed out!")
        if self.error is not None:
            raise self.error
        return True

    def is_completed(self) -> bool:
        return self.completed


def group(timeout_s: float) -> SideGroup:
    pg = dist.ProcessGroup(dist.HashStore(), 0, 1)
    return SideGroup(pg, pg, backend_name="gloo", data_device=None, timeout_s=timeout_s, address="127.0.0.1", port=0)


def test_a_work_that_completes_as_its_slice_expires_is_a_success():
    g = group(5.0)
    g.wait(FakeWork(None), "step")
    g.wait(FakeWork(None), "payload", data=True)
    g.check_usable()  # not marked broken


def test_a_work_that_fails_raises_its_own_error():
    g = group(5.0)
    with pytest.raises(TransferError, match="step failed on rank 0: RuntimeError: Connection closed by peer"):
        g.wait(FakeWork(RuntimeError("Connection closed by peer")), "step")
    with pytest.raises(TransferError, match="broken"):
        g.check_usable()


def test_a_work_that_never_completes_times_out_within_the_timeout():
    g = group(0.3)
    start = time.monotonic()
    with pytest.raises(TransferError, match="no completion after 0.3 s"):
        g.wait(FakeWork(None, completes=False), "step")
    assert 0.3 <= time.monotonic() - start < 0.6  # the bound is timeout_s itself, not a multiple of it


def test_a_sub_millisecond_timeout_still_bounds_a_wait():
    """A timedelta under 1 ms truncates to 0 ms, which torch's Work.wait reads as
    "no timeout": every bound handed to Work.wait is at least 1 ms."""
    from torchxfer.config import wait_timeout

    assert wait_timeout(1e-4) == datetime.timedelta(milliseconds=1)
    assert wait_timeout(2.5) == datetime.timedelta(seconds=2.5)


class NcclLikeWork:
    """A payload work as NCCL's looks from the CPU: completion is polled; ``wait()`` only orders
    streams and lets go of the tensors it holds (recorded here)."""

    def __init__(self, done: bool = True, error: Exception | None = None) -> None:
        self.done, self.error, self.waited = done, error, 0

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self.waited += 1
        if self.error is not None:
            raise self.error
        return True


def nccl_group(timeout_s: float) -> SideGroup:
    pg = dist.ProcessGroup(dist.HashStore(), 0, 1)
    return SideGroup(pg, pg, backend_name="nccl", data_device=None, timeout_s=timeout_s, address="127.0.0.1", port=0)


def test_wait_all_on_nccl_polls_the_last_work_and_waits_every_other_once():
    """One NCCL stream: the last payload work completes after every earlier one, so only it is
    polled; each of the others is then waited once, which lets NCCL drop the tensors it holds."""
    g = nccl_group(5.0)
    works = [NcclLikeWork() for _ in range(5)]
    g.wait_all(works, "payload", data=True)
    assert [w.waited for w in works] == [1] * 5
    g.check_usable()
    g.wait_all([], "payload", data=True)  # nothing to wait for


def test_wait_all_on_nccl_bounds_the_poll_and_breaks_the_group_on_an_error():
    g = nccl_group(0.2)
    start = time.monotonic()
    with pytest.raises(TransferError, match="no completion after 0.2 s"):
        g.wait_all([NcclLikeWork(), NcclLikeWork(done=False)], "payload", data=True)
    assert time.monotonic() - start < 1.0
    g = nccl_group(5.0)
    with pytest.raises(TransferError, match=r"payload failed on rank 0: RuntimeError: aborted\. A peer may have died") as info:
        g.wait_all([NcclLikeWork(error=RuntimeError("aborted")), NcclLikeWork()], "payload", data=True)
    assert info.value.broken
    with pytest.raises(TransferError, match="broken"):
        g.check_usable()


class CompletesAfterPolls:
    """A control row's work that completes after ``polls`` calls of is_completed()."""

    def __init__(self, polls: int) -> None:
        self.polls, self.waited, self.sliced, self.checks = polls, 0, 0, 0

    def is_completed(self) -> bool:
        self.checks += 1
        self.polls -= 1
        return self.polls < 0

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if timeout is not None and self.polls >= 0:
            self.sliced += 1
            raise RuntimeError("Operation timed out!")
        self.waited += 1
        return True


def test_a_control_wait_on_a_nccl_group_polls_first_then_blocks_within_the_timeout(monkeypatch):
    """On NCCL side groups a control row is polled for up to ``CONTROL_POLL_US`` before the
    wait blocks in slices: a row that completes while polled is taken at once (one wait, for
    its outcome), and one that never completes still times out within the group's timeout."""
    from torchxfer import group as group_module

    monkeypatch.setattr(group_module, "CONTROL_POLL_US", 200_000)
    g = nccl_group(5.0)
    work = CompletesAfterPolls(50)
    g.wait(work, "step")
    assert work.waited == 1 and work.sliced == 0 and work.checks == 51
    g.check_usable()
    g = nccl_group(0.3)
    start = time.monotonic()
    with pytest.raises(TransferError, match="no completion after 0.3 s"):
        g.wait(FakeWork(None, completes=False), "step")
    assert 0.3 <= time.monotonic() - start < 0.6  # the bound is timeout_s itself, not a multiple of it
    # Gloo side groups never poll: one blocking slice, then the work's own outcome.
    g = group(5.0)
    work = CompletesAfterPolls(0)
    g.wait(work, "step")
    assert work.waited == 1 and work.sliced == 1 and work.checks == 1

