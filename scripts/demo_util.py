"""Small helpers shared by the demo's processes: a JSON-over-HTTP client,
bounded polling, free ports, and dying with one's parent.

Standard library only (no torch), so the server's HTTP front stays light.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["ADDR", "die_with_parent", "exec_command", "free_port", "http_json", "wait_healthy"]

ADDR = "127.0.0.1"


def http_json(method: str, url: str, body: Any = None, *, timeout: float = 30.0) -> tuple[int, Any]:
    """One JSON request; returns ``(status, decoded body)`` for any HTTP status.

    Raises OSError (URLError, timeouts) only when no HTTP answer came back.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def wait_healthy(base_url: str, deadline_s: float, *, alive: Any = None) -> dict:
    """Poll ``GET /health`` until it answers 200; TimeoutError after ``deadline_s``.

    ``alive``, if given, is called between polls and should raise when the
    server process is gone, so a crashed server fails fast instead of at the
    deadline.
    """
    end = time.monotonic() + deadline_s
    last: Any = None
    while True:
        try:
            status, body = http_json("GET", base_url + "/health", timeout=5.0)
            if status == 200:
                return body
            last = body
        except OSError as e:
            last = e
        if alive is not None:
            alive()
        if time.monotonic() > end:
            raise TimeoutError(f"{base_url} not healthy after {deadline_s:g} s; last answer: {last!r}")
        time.sleep(0.1)  # polling interval, not synchronization


def free_port(address: str = ADDR) -> int:
    """A port that was free a moment ago (the caller must handle 'already in use').

    Chosen below the kernel's ephemeral range, so that no outgoing connection
    (the store's, Gloo's) can be given it as a source port in the meantime.
    """
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # fall back to any free port
        s.bind((address, 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits, so a
    killed launcher never leaves orphans. The setting survives ``exec``, which
    :func:`exec_command` relies on. A no-op where prctl is missing."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def exec_command(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that it dies with the process that starts it.

    ``subprocess.Popen(exec_command(cmd))`` runs this file, which calls
    :func:`die_with_parent` and then execs ``cmd`` in place (same pid). This
    replaces a ``preexec_fn``, which is unsafe in a parent that has threads.
    """
    return [sys.executable, os.path.abspath(__file__), "--exec", *cmd]


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--exec":
        sys.exit("usage: demo_util.py --exec COMMAND [ARG...]")
    die_with_parent()
    os.execvp(sys.argv[2], sys.argv[2:])
