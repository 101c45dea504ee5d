"""The demo's inference server: one HTTP front and N worker processes (DP=N).

    python scripts/demo_server.py --port 8000 --replicas 2 --model small

Processes and who calls what:

* **Front** (this script's main process, standard library only, no torch):
  a ``ThreadingHTTPServer`` with one thread per request. It starts the
  workers, talks to each over a socketpair (JSON messages; one request and
  one reply at a time, under that replica's lock), and never blocks its HTTP
  threads for longer than a bounded wait.
* **Workers** (``demo_worker.py``, started by the front): each holds a full
  replica of the model on its device and an ``NCCLWeightTransferEngine``
  with ``ParallelConfig(data_parallel_rank=i, data_parallel_size=N)``, so its
  side-group rank is ``i + rank_offset``. A worker runs one command at a
  time: ``init`` (``init_transfer_engine``, blocks until the trainer's
  ``trainer_init`` and every other worker join), ``receive``
  (``receive_weights(None, load_weights)``, blocks until the trainer's
  ``trainer_send_weights`` completes on every rank), ``generate``, ``close``.

Why DP and not TP: a tensor-parallel split changes the shapes of the matrix
products (and, with row-parallel layers, the order of the sums), and float
results then differ from the trainer's unsplit forward in the last bits. On
this CPU build (torch 2.13, one thread) ``x @ W[:128].T`` is not bitwise the
first half of ``x @ W.T`` for ``x`` of shape [T, 1024], ``W`` of [256, 1024]
and T >= 16, even though every output element is the same dot product. The
demo promises a bit-exact match with the trainer, so each worker holds a
whole replica and requests are spread over replicas.

HTTP API (JSON in and out):

``GET /health``
    200 once every worker is up (503 before, or if one died): replicas, the
    side group's state, versions, whether an update is in progress.
``GET /weights_version``
    ``{"weights_version": v, "versions": [v per replica], "updating": bool}``;
    ``v`` is the update id of the last update loaded (None before any).
``POST /init_weight_transfer`` ``{master_address, master_port, world_size, rank_offset=1, token?}``
    202 at once; every worker starts ``init_transfer_engine`` in the
    background. The trainer then calls ``trainer_init``, which returns once
    all workers have joined.
``POST /update_weights`` ``{}``
    Waits (bounded) for in-flight ``/generate`` requests to finish, holds new
    ones, puts every worker into ``receive_weights``, and answers 202. The
    trainer then calls ``trainer_send_weights``. Held requests are released
    once every worker has loaded the whole update (or failed).
``POST /generate`` ``{prompt: [ids], max_new_tokens, replica?, weights_digest?}``
    Greedy tokens, the sha256 of the logits' float bytes, the weights version
    that produced them, the replica, how long the request waited and whether
    an update finished while it waited (``held_by_update``).
    Never answered from a half-updated model: during an update it waits, and
    a replica left torn by a failed update answers 503 until the next
    update succeeds.
``POST /close_weight_transfer``, ``POST /shutdown``
    Leave the side group; stop the server.
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_util import die_with_parent

GENERATE_DEADLINE_S = 120.0
"""Bound on one generate command in a worker (the model is small)."""


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- front: one handle per worker ---------------------------------------------------------


class Replica:
    """The front's handle on one worker process.

    ``lock`` is held for a whole request/reply exchange, so messages on the
    socketpair never interleave; a reply that misses its deadline marks the
    replica dead (the channel is then out of step).
    """

    def __init__(self, index: int, args: argparse.Namespace) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.version: int | None = None
        self.torn = False
        self.dead: str | None = None
        self.info: dict = {}
        ours, theirs = socket.socketpair()
        devices = args.worker_devices.split(",") if args.worker_devices else [args.device]
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_worker.py"),
               "--index", str(index), "--fd", str(theirs.fileno()), "--replicas", str(args.replicas),
               "--model", args.model, "--device", devices[index % len(devices)], "--backend", args.backend,
               "--timeout-s", str(args.timeout_s), "--seed", str(args.seed), "--run-tag", args.run_tag]  # fmt: skip
        if index == args.corrupt_replica:
            cmd.append("--corrupt")
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
        theirs.close()
        self.conn = Connection(ours.detach())

    def send(self, msg: dict) -> None:
        self.conn.send_bytes(json.dumps(msg).encode())

    def reply(self, deadline_s: float) -> dict:
        """The next message from the worker; marks the replica dead on timeout or EOF."""
        end = time.monotonic() + deadline_s
        while not self.conn.poll(0.2):
            if self.proc.poll() is not None:
                self.dead = f"worker {self.index} exited with code {self.proc.returncode}"
                raise HTTPError(503, self.dead)
            if time.monotonic() > end:
                self.dead = f"worker {self.index} did not answer within {deadline_s:g} s"
                raise HTTPError(503, self.dead)
        try:
            return json.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as e:
            self.dead = f"worker {self.index} closed its channel: {e}"
            raise HTTPError(503, self.dead) from None

    def ask_exit(self) -> None:
        """Ask an idle worker to exit; a busy one (inside receive_weights, say) is terminated instead."""
        if self.proc.poll() is not None:
            return
        if self.lock.acquire(timeout=0.2):
            try:
                self.send({"cmd": "exit"})
                return
            except OSError:
                pass
            finally:
                self.lock.release()
        self.proc.terminate()

    def reap(self, grace_s: float = 2.0) -> None:
        """Wait for the worker to exit: terminate, then kill, each after ``grace_s``."""
        for action in (None, self.proc.terminate, self.proc.kill):
            if self.proc.poll() is not None:
                break
            if action is not None:
                action()
            try:
                self.proc.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.conn.close()


# -- front: the server state ------------------------------------------------------------------


class Front:
    """Routes HTTP requests to workers and holds ``/generate`` during updates.

    ``busy`` names the control operation in progress (init, update, close) or
    is None. Control operations run one at a time; ``/generate`` waits on
    ``cond`` until ``busy`` is None, then takes a replica's lock. A control
    operation first sets ``busy`` (so no new request starts), then takes every
    replica's lock (so in-flight requests finish first), sends its command to
    every worker and answers; a background thread collects the replies,
    updates versions, releases the locks and wakes the held requests.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.hold_s = 2 * args.timeout_s + 30
        self.cond = threading.Condition()
        self.busy: str | None = None
        self.side_state = "none"
        self.last_op: dict | None = None
        self.ops_done = 0
        """Control operations finished; a request that sees it change while it waits was held by one."""
        self.rr = itertools.count()
        self.replicas = [Replica(i, args) for i in range(args.replicas)]
        self.ready = False
        threading.Thread(target=self._wait_ready, daemon=True, name="wait-ready").start()

    def _wait_ready(self) -> None:
        for r in self.replicas:
            with r.lock:
                try:
                    r.info = r.reply(self.args.timeout_s + 120)
                except HTTPError:
                    return
                if not r.info.get("ready"):
                    r.dead = f"worker {r.index} failed to start: {r.info.get('error')}"
                    return
        self.ready = True

    # -- read-only views --

    def common_version(self) -> int | None:
        versions = {r.version for r in self.replicas}
        return versions.pop() if len(versions) == 1 else None

    def health(self) -> tuple[int, dict]:
        dead = [r.dead for r in self.replicas if r.dead]
        body = {
            "status": "ok" if self.ready and not dead else ("dead" if dead else "starting"),
            "replicas": len(self.replicas),
            "layout": f"DP={len(self.replicas)} x TP=1 x PP=1",
            "model": self.args.model,
            "devices": [r.info.get("device") for r in self.replicas],
            "side_group": self.side_state,
            "weights_version": self.common_version(),
            "versions": [r.version for r in self.replicas],
            "torn": [r.torn for r in self.replicas],
            "updating": self.busy,
            "last_op": self.last_op,
            "errors": dead,
        }
        return (200 if body["status"] == "ok" else 503), body

    # -- /generate --

    def generate(self, body: dict) -> dict:
        if not self.ready:
            raise HTTPError(503, "workers are starting")
        prompt, max_new = body.get("prompt"), body.get("max_new_tokens", 16)
        if not isinstance(prompt, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise HTTPError(400, "prompt must be a list of token ids")
        if not isinstance(max_new, int) or isinstance(max_new, bool) or not 0 <= max_new <= 4096:
            raise HTTPError(400, "max_new_tokens must be an int in [0, 4096]")
        want = body.get("replica")
        if want is not None and (not isinstance(want, int) or not 0 <= want < len(self.replicas)):
            raise HTTPError(400, f"replica must be an int in [0, {len(self.replicas)})")
        start = time.monotonic()
        with self.cond:
            ops_at_arrival = self.ops_done
            if not self.cond.wait_for(lambda: self.busy is None, timeout=self.hold_s):
                raise HTTPError(503, f"held for {self.hold_s:g} s by {self.busy!r}; giving up")
            if want is None:
                serving = [r for r in self.replicas if not r.dead and not r.torn]
                if not serving:
                    raise HTTPError(503, "no replica can serve: every one is dead or holds torn weights")
                replica = serving[next(self.rr) % len(serving)]
            else:
                replica = self.replicas[want]
        # A control operation that starts now takes this lock first; the
        # request then runs after it, on the complete new weights.
        if not replica.lock.acquire(timeout=self.hold_s):
            raise HTTPError(503, f"replica {replica.index} stayed busy for {self.hold_s:g} s")
        try:
            held = time.monotonic() - start
            held_by = self.ops_done - ops_at_arrival
            if replica.dead:
                raise HTTPError(503, replica.dead)
            if replica.torn:
                raise HTTPError(503, f"replica {replica.index} holds torn weights from a failed update")
            replica.send({"cmd": "generate", "prompt": prompt, "max_new_tokens": max_new,
                          "weights_digest": bool(body.get("weights_digest"))})  # fmt: skip
            out = replica.reply(GENERATE_DEADLINE_S)
        finally:
            replica.lock.release()
        if not out.get("ok"):
            raise HTTPError(out.get("status", 500), out.get("error", "generate failed"))
        out.pop("ok")
        # held_s: time waited before running; held_by_update: an update (or
        # another control operation) finished while this request waited.
        out.update(replica=replica.index, held_s=round(held, 6), held_by_update=held_by > 0)
        return out

    # -- control operations --

    def control(self, op: str, msg: dict, state_during: str | None = None) -> dict:
        """Start ``op`` on every worker with every replica held; answer at once.

        Blocks (bounded) until the previous control operation and every
        in-flight request have finished.
        """
        if not self.ready:
            raise HTTPError(503, "workers are starting")
        with self.cond:
            if not self.cond.wait_for(lambda: self.busy is None, timeout=self.hold_s):
                raise HTTPError(503, f"{self.busy!r} still in progress after {self.hold_s:g} s")
            if op == "update" and self.side_state != "ready":
                raise HTTPError(409, f"the side group is not ready ({self.side_state}); POST /init_weight_transfer first")
            self.busy = op
            if state_during is not None:
                self.side_state = state_during
        held = []
        try:
            for r in self.replicas:
                if not r.lock.acquire(timeout=self.hold_s):
                    raise HTTPError(503, f"replica {r.index} stayed busy for {self.hold_s:g} s")
                held.append(r)
                if r.dead:
                    raise HTTPError(503, r.dead)
        except BaseException:
            for r in held:
                r.lock.release()
            with self.cond:
                self.busy = None
                self.cond.notify_all()
            raise
        # From here on the replies are collected whatever happens, so that no
        # reply is left in a channel for the next request to read.
        sent = {}
        for r in self.replicas:
            try:
                r.send(msg)
                sent[r.index] = True
            except OSError as e:
                r.dead = f"worker {r.index}: cannot send {op!r}: {e}"
        threading.Thread(target=self._finish, args=(op, sent), daemon=True, name=f"finish-{op}").start()
        if len(sent) < len(self.replicas):
            raise HTTPError(503, "; ".join(r.dead for r in self.replicas if r.index not in sent and r.dead))
        return {"status": "started", "op": op}

    def _finish(self, op: str, sent: dict[int, bool]) -> None:
        deadline = 2 * self.args.timeout_s + 30
        results = []
        for r in self.replicas:
            try:
                res = r.reply(deadline) if r.index in sent else {"ok": False, "error": r.dead}
            except HTTPError as e:
                res = {"ok": False, "error": str(e)}
            results.append(res)
            if op == "update":
                r.version = res.get("version", r.version)
                r.torn = bool(res.get("torn", r.torn))
        errors = [f"replica {i}: {res.get('error')}" for i, res in enumerate(results) if not res.get("ok")]
        broken = any(res.get("broken") for res in results)
        with self.cond:
            if op == "init":
                self.side_state = "ready" if not errors else "error: " + "; ".join(errors)
            elif op == "close" or broken:
                self.side_state = "none" if not errors else "error: " + "; ".join(errors)
            self.last_op = {"op": op, "ok": not errors, "errors": errors,
                            "versions": [r.version for r in self.replicas]}  # fmt: skip
            self.ops_done += 1
            for r in self.replicas:
                r.lock.release()
            self.busy = None
            self.cond.notify_all()
        if errors:
            print(f"[server] {op} failed: {'; '.join(errors)}", file=sys.stderr, flush=True)

    def init_weight_transfer(self, body: dict) -> dict:
        info = {"rank_offset": 1, **body}
        for key in ("master_address", "master_port", "world_size", "rank_offset"):
            if key not in info:
                raise HTTPError(400, f"missing {key!r}")
        return self.control("init", {"cmd": "init", "info": info}, state_during="initializing")

    def stop(self) -> None:
        for r in self.replicas:
            r.ask_exit()
        for r in self.replicas:
            r.reap()


class Handler(BaseHTTPRequestHandler):
    front: Front
    shutdown_server: Any

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.front.args.verbose:
            super().log_message(fmt, *args)

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:
            pass  # the client gave up (e.g. it was stopped); nothing to tell it

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            raise HTTPError(413, "body too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as e:
            raise HTTPError(400, f"invalid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "expected a JSON object")
        return body

    def _dispatch(self, routes: dict) -> None:
        route = routes.get(self.path.split("?")[0])
        try:
            if route is None:
                raise HTTPError(404, f"no route {self.command} {self.path}")
            status, body = route()
        except HTTPError as e:
            status, body = e.status, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the client, the traceback to our log
            traceback.print_exc()
            status, body = 500, {"error": f"{type(e).__name__}: {e}"}
        self._answer(status, body)

    def do_GET(self) -> None:
        front = self.front
        self._dispatch({
            "/health": front.health,
            "/weights_version": lambda: (200, {"weights_version": front.common_version(),
                                               "versions": [r.version for r in front.replicas],
                                               "updating": front.busy is not None}),
        })  # fmt: skip

    def do_POST(self) -> None:
        front = self.front
        self._dispatch({
            "/generate": lambda: (200, front.generate(self._body())),
            "/init_weight_transfer": lambda: (202, front.init_weight_transfer(self._body())),
            "/update_weights": lambda: (202, front.control("update", {"cmd": "receive"})),
            "/close_weight_transfer": lambda: (202, front.control("close", {"cmd": "close"})),
            "/shutdown": self._shutdown,
        })  # fmt: skip

    def _shutdown(self) -> tuple[int, dict]:
        threading.Thread(target=self.shutdown_server, daemon=True).start()
        return 200, {"status": "shutting down"}


def run_front(args: argparse.Namespace) -> int:
    """Main process: start the workers, serve HTTP until /shutdown or a signal, stop the workers."""
    die_with_parent()

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    front = None
    try:
        httpd = ThreadingHTTPServer((args.host, args.port), Handler)
        httpd.daemon_threads = True
        front = Front(args)
        Handler.front = front
        Handler.shutdown_server = httpd.shutdown
        port = httpd.server_address[1]
        if args.port_file:
            tmp = args.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(port))
            os.replace(tmp, args.port_file)
        else:
            print(f"[server] http://{args.host}:{port} replicas={args.replicas} model={args.model}", flush=True)
        httpd.serve_forever(poll_interval=0.2)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if front is not None:
            front.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="HTTP port (0: pick a free one)")
    p.add_argument("--port-file", default=None, help="write the bound HTTP port here once listening")
    p.add_argument("--replicas", type=int, default=2, help="worker processes, one model replica each (DP)")
    p.add_argument("--model", default="small", help="model preset (demo_model.PRESETS)")
    p.add_argument("--device", default="cpu", help="device of every worker, unless --worker-devices")
    p.add_argument("--worker-devices", default=None, help="comma-separated device per worker, e.g. cuda:2,cuda:3")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="side-group backend")
    p.add_argument("--timeout-s", type=float, default=60.0, help="bound on every side-group wait")
    p.add_argument("--seed", type=int, default=1, help="seed of the initial (pre-update) weights")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.add_argument("--run-tag", default="", help="opaque tag carried in every process's command line")
    p.add_argument("--corrupt-replica", type=int, default=-1, help=argparse.SUPPRESS)  # test hook
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: print every thread's stack
    return run_front(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
