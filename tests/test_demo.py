"""The main-job demo end to end: ``python scripts/demo.py --tiny`` as a subprocess.

Each run starts a torchrun trainer (2 ranks) and a server (front + 2 workers),
about 10 to 20 s on 2 cores. Every child carries a unique ``--run-tag`` in its
command line, so the tests can check that no process outlives the demo.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "scripts", "demo.py")
DEADLINE_S = 120.0
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  loss \S+  version (\d+)  sent \S+ MB  sync \S+ s  \S+ GB/s  "
                       r"server == trainer: (\S+)", re.MULTILINE)  # fmt: skip


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose command line holds ``tag``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def assert_no_leftovers(tag: str, within_s: float = 10.0) -> None:
    end = time.monotonic() + within_s
    while tagged_pids(tag):
        if time.monotonic() > end:
            left = tagged_pids(tag)
            for pid in left:  # do not leak them into the next test
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail(f"processes of the demo outlived it: {left}")
        time.sleep(0.1)  # polling interval


class Demo:
    """The demo as a subprocess whose output is read line by line, with deadlines."""

    def __init__(self, *args: str) -> None:
        self.tag = f"test-{uuid.uuid4().hex[:12]}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, DEMO, *args, "--run-tag", self.tag], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.end = time.monotonic() + DEADLINE_S

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: re.Pattern) -> str | None:
        """The first line matching ``pattern``, or None if the output ended; fails at the deadline."""
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, self.end - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"demo still running after {DEADLINE_S:g} s; output so far:\n{self.output()}")
            if line is None:
                return None
            self.lines.append(line)
            if pattern.search(line):
                return line

    def wait(self) -> int:
        self.wait_for_line(re.compile(r"(?!)"))  # drain to EOF under the deadline
        try:
            return self.proc.wait(max(1.0, self.end - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"demo did not exit after closing its output; output:\n{self.output()}")

    def kill(self) -> None:
        """Stop it the way a user would (SIGINT), then for sure (SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.mark.process
@pytest.mark.timeout(DEADLINE_S + 60)
def test_demo_tiny_server_matches_trainer_bit_for_bit() -> None:
    demo = Demo("--tiny")
    try:
        rc = demo.wait()
    finally:
        demo.kill()
    out = demo.output()
    assert rc == 0, out
    steps = STEP_LINE.findall(out)
    assert [(int(s), int(n)) for s, n, _, _ in steps] == [(1, 2), (2, 2)], out
    assert all(verdict == "bit-exact" for *_, verdict in steps), out
    # weights_version is the update id: 0 for the first update on the group.
    assert [int(v) for _, _, v, _ in steps] == [0, 1], out
    assert re.search(r"^probe: \d+ concurrent /generate answers .*: every one bit-exact", out, re.MULTILINE), out
    assert "MISMATCH" not in out, out
    assert re.search(r"^demo: OK in ", out, re.MULTILINE), out
    assert_no_leftovers(demo.tag)


@pytest.mark.process
@pytest.mark.timeout(DEADLINE_S + 60)
def test_demo_interrupted_mid_run_leaves_no_process() -> None:
    demo = Demo("--tiny", "--steps", "100")
    try:
        first = demo.wait_for_line(STEP_LINE)
        assert first is not None, demo.output()
        demo.proc.send_signal(signal.SIGINT)
        rc = demo.wait()
    finally:
        demo.kill()
    assert rc == 130, demo.output()
    assert "demo: interrupted" in demo.output()
    assert_no_leftovers(demo.tag)


@pytest.mark.process
@pytest.mark.timeout(DEADLINE_S + 60)
def test_demo_fails_when_a_replica_differs_by_one_bit() -> None:
    # A test hook makes replica 1 flip the lowest bit of one weight after each update.
    demo = Demo("--tiny", "--corrupt-replica", "1")
    try:
        rc = demo.wait()
    finally:
        demo.kill()
    out = demo.output()
    assert rc == 1, out
    steps = STEP_LINE.findall(out)
    assert [verdict for *_, verdict in steps] == ["MISMATCH"], out
    assert re.search(r"^  mismatch: replica 1 weights sha256 ", out, re.MULTILINE), out
    assert "replica 0" not in out, out
    assert re.search(r"^demo: FAILED ", out, re.MULTILINE), out
    assert_no_leftovers(demo.tag)
