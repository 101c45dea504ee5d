"""The main job, end to end: a torchrun trainer pushes its weights after every
step to a custom inference server, and the server's answers must match the
trainer's own forward pass bit for bit.

    python scripts/demo.py                     # CPU, gloo, 5 steps: about 10 s on 2 cores
    python scripts/demo.py --tiny              # much smaller model, 2 steps (CI): about 7 s
    python scripts/demo.py --device cuda       # GPUs, NCCL: trainer on cuda:0,1, workers on cuda:2,3;
                                               # with fewer GPUs the trainer gets the ones the workers leave
    python scripts/demo.py --device cuda --replicas 1     # 2 GPUs, NCCL: trainer on cuda:0, worker on cuda:1
    python scripts/demo.py --device cuda --backend gloo   # any number of GPUs, shared

This launcher starts, each in its own process group (session):

* the server, ``scripts/demo_server.py``: an HTTP front and ``--replicas``
  worker processes (default 2), one model replica each (DP=replicas), each a
  receiver on the side group;
* the trainer, ``python -m torch.distributed.run --standalone --nproc-per-node 2
  scripts/demo_trainer.py``: DDP over 2 ranks (fewer under NCCL when GPUs are
  short, see :func:`gpu_layout`); rank 0 drives the server over HTTP and sends
  the weights, and prints one line per step.

It waits (bounded by ``--deadline-s``) for the trainer, then stops the server.
Its exit code is the trainer's (non-zero on any mismatch). On exit, error,
SIGINT or SIGTERM it stops both process trees: SIGTERM to each group, then
SIGKILL after a grace period. Every child also asks Linux for SIGTERM should
its parent die (``PR_SET_PDEATHSIG``), so even a SIGKILLed launcher leaves no
orphans.

Each line the trainer prints per step: the step, the mean loss over ranks,
the update id the server now reports as ``weights_version``, the bytes sent,
the sync time (announcing the update over HTTP plus ``trainer_send_weights``,
which returns once every worker has loaded it) and bytes / sync time, then the
verdict: the server's greedy tokens, logits checksum and weights checksum for a
fixed prompt, from every replica, against the trainer's own forward pass.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from demo_util import ADDR, exec_command, http_json

NPROC = 2
"""Trainer ranks (torchrun --nproc-per-node), unless NCCL leaves fewer GPUs."""
REPLICAS = 2
"""Server workers, one model replica each (default of --replicas)."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: 2 trainer ranks and 2 workers share the cores,
    # and single-threaded matmuls are what makes results reproducible.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CUBLAS_WORKSPACE_CONFIG=":4096:8")  # fmt: skip
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
    return env


def gpu_layout(args: argparse.Namespace) -> tuple[str, str, int]:
    """(trainer note, comma-separated worker devices, trainer ranks).

    Trainer rank r uses cuda:r. The side group holds trainer rank 0 and the
    workers; NCCL needs each of those on its own GPU. Under NCCL the workers
    take the last ``replicas`` GPUs and the trainer as many of the others as it
    has ranks (up to NPROC; 2 GPUs and 1 replica: trainer on cuda:0 alone,
    worker on cuda:1). Under Gloo GPUs are shared: the trainer keeps NPROC
    ranks, and workers go to the GPUs after the trainer's when there are
    enough, else to cuda:1, cuda:2...
    """
    replicas = args.replicas
    if args.device != "cuda":
        return "", "", NPROC
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise SystemExit("demo: --device cuda but no CUDA device is visible")
    if args.backend == "nccl":
        if n < replicas + 1:
            fewer = f"--replicas {n - 1}, or " if n >= 2 else ""
            raise SystemExit(f"demo: --backend nccl needs {replicas + 1} GPUs (trainer rank 0 and each of {replicas} "
                             f"worker(s) on its own GPU); {n} visible. Use {fewer}--backend gloo to share GPUs.")  # fmt: skip
        nproc = min(NPROC, n - replicas)
        return f"{n} GPUs", ",".join(f"cuda:{nproc + i}" for i in range(replicas)), nproc
    first = NPROC if n >= NPROC + replicas else 1
    return f"{n} GPUs", ",".join(f"cuda:{(first + i) % n}" for i in range(replicas)), NPROC


class Launcher:
    """Owns the two process trees; :meth:`stop_all` is idempotent and bounded.

    Children write stdout straight to ours. Their stderr passes through a
    thread that goes quiet once we start stopping them, so an interrupted
    run ends with our one line rather than torchrun's SIGTERM tracebacks.
    """

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.forwarders: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(exec_command(cmd), env=env, stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append((name, proc))
        forwarder = threading.Thread(target=self._forward, args=(proc.stderr,), daemon=True, name=f"{name}-stderr")
        forwarder.start()
        self.forwarders[name] = forwarder
        return proc

    def drain(self, name: str, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until everything ``name``'s tree wrote to stderr is out."""
        self.forwarders[name].join(timeout_s)

    def _forward(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            if not self.stopping.is_set():
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        stream.close()

    def stop(self, name: str, proc: subprocess.Popen, grace_s: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(grace_s)
                return
            except subprocess.TimeoutExpired:
                print(f"demo: {name} (pid {proc.pid}) ignored {sig.name} for {grace_s:g} s", file=sys.stderr, flush=True)

    def stop_all(self) -> None:
        self.stopping.set()
        # The trainer first: its rank 0 hosts the side group's store.
        for name, proc in reversed(self.procs):
            self.stop(name, proc, grace_s=15.0)
        self.procs.clear()


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: print every thread's stack
    args = parse_args()
    started = time.monotonic()
    launcher = Launcher()
    atexit.register(launcher.stop_all)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    gpus, worker_devices, nproc = gpu_layout(args)
    env = child_env()
    tag = ["--run-tag", args.run_tag]
    common = ["--model", args.model, "--device", args.device, "--backend", args.backend, "--timeout-s", str(args.timeout_s)]
    deadline = started + args.deadline_s
    try:
        with tempfile.TemporaryDirectory(prefix="torchxfer-demo-") as tmp:
            port_file = os.path.join(tmp, "port")
            server_cmd = [sys.executable, os.path.join(HERE, "demo_server.py"), "--host", ADDR, "--port", str(args.port),
                          "--port-file", port_file, "--replicas", str(args.replicas), *common, *tag]  # fmt: skip
            if worker_devices:
                server_cmd += ["--worker-devices", worker_devices]
            if args.corrupt_replica >= 0:
                server_cmd += ["--corrupt-replica", str(args.corrupt_replica)]
            server = launcher.start("server", server_cmd, env)
            while not os.path.exists(port_file):
                if server.poll() is not None:
                    print(f"demo: the server exited with code {server.returncode} before listening", file=sys.stderr)
                    return 1
                if time.monotonic() > started + 30:
                    print("demo: the server did not listen within 30 s", file=sys.stderr)
                    return 1
                time.sleep(0.05)  # polling interval
            with open(port_file) as f:
                url = f"http://{ADDR}:{int(f.read())}"
        print(f"demo: model {args.model}, {args.steps} steps, {args.device}/{args.backend}{' (' + gpus + ')' if gpus else ''}; "
              f"server {url} with {args.replicas} workers (DP={args.replicas}); trainer torchrun --nproc-per-node {nproc}"
              f"{' (workers on ' + worker_devices + ')' if worker_devices else ''}",
              flush=True)  # fmt: skip
        trainer_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                       os.path.join(HERE, "demo_trainer.py"), "--server", url, "--steps", str(args.steps),
                       "--buffer-mb", str(args.buffer_mb), "--probe" if args.probe else "--no-probe", *common, *tag]  # fmt: skip
        trainer = launcher.start("trainer", trainer_cmd, env)
        while trainer.poll() is None:
            if server.poll() is not None:
                print(f"demo: the server died (code {server.returncode}) while the trainer ran", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"demo: deadline of {args.deadline_s:g} s passed; stopping everything", file=sys.stderr)
                return 1
            try:
                trainer.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        rc = trainer.returncode
        launcher.drain("trainer")
        try:
            http_json("POST", url + "/shutdown", {}, timeout=5)
            server.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            pass
        elapsed = time.monotonic() - started
        print(f"demo: {'OK' if rc == 0 else f'FAILED (trainer exit code {rc})'} in {elapsed:.1f} s", flush=True)
        return 0 if rc == 0 else 1
    except KeyboardInterrupt:
        print("demo: interrupted; stopping every process", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop_all()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps, one weight update each (default 5; 2 with --tiny)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="trainer and side-group backend (default: gloo on cpu, nccl on cuda)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="a much smaller model and 2 steps (CI)")
    p.add_argument("--replicas", type=int, default=REPLICAS,
                   help=f"server workers, one model replica each (default {REPLICAS}; under NCCL each needs its own GPU)")  # fmt: skip
    p.add_argument("--port", type=int, default=0, help="the server's HTTP port (default: a free one)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="bound on every side-group wait")
    p.add_argument("--deadline-s", type=float, default=600.0, help="bound on the whole run")
    p.add_argument("--buffer-mb", type=float, default=4.0, help="packed buffer size (two buffers)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="a client thread sends /generate during updates; every answer is checked")  # fmt: skip
    p.add_argument("--run-tag", default=f"demo-{uuid.uuid4().hex[:12]}", help=argparse.SUPPRESS)
    # Test hook: this replica flips one bit of its weights after every update.
    p.add_argument("--corrupt-replica", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = "tiny" if args.tiny else "small"
    if args.steps is None:
        args.steps = 2 if args.tiny else 5
    if args.backend is None:
        args.backend = "nccl" if args.device == "cuda" else "gloo"
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
