"""One inference worker of the demo server: a model replica and a transfer engine.

Started by the server's front (``demo_server.py``), never by hand::

    python scripts/demo_worker.py --index I --fd FD --replicas N --model small ...

It talks to the front over the socketpair ``FD``: JSON messages, one command
and one reply at a time. It runs one command at a time, so a ``generate`` can
never run while the weights are being received:

``init``      ``engine.init_transfer_engine(info)``; blocks until the trainer's
              ``trainer_init`` and every other worker have joined (at most
              ``timeout_s``).
``receive``   ``engine.receive_weights(None, load_weights)``; blocks until the
              trainer's ``trainer_send_weights`` has finished on every rank
              (each wait at most ``timeout_s``).
``generate``  greedy tokens and the logits checksum for a prompt; refused
              while the weights are torn (a failed update had started loading).
``close``     ``engine.shutdown()``: local, never blocks.
``exit``      leave the loop (also on EOF: the front is gone).

Its side-group rank is ``index + rank_offset``: ``ParallelConfig(
data_parallel_rank=index, data_parallel_size=N)`` with TP = PP = 1, since each
worker holds a whole replica (see ``demo_server.py`` for why not TP).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_util import die_with_parent

# The front may be killed without warning; go with it.
die_with_parent()

import torch
from demo_model import build_model, greedy_generate, set_deterministic, weights_sha256

from torchxfer import (
    NCCLWeightTransferEngine,
    ParallelConfig,
    TransferError,
    WeightTransferConfig,
)


class Worker:
    """The replica's state and one method per command. Every method returns the reply."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        set_deterministic(self.device)
        self.model = build_model(args.model, self.device, seed=args.seed).eval().requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.engine = NCCLWeightTransferEngine(
            WeightTransferConfig(backend=args.backend, timeout_s=args.timeout_s, device=self.device),
            ParallelConfig(data_parallel_rank=args.index, rank=0, tensor_parallel_size=1,
                           pipeline_parallel_size=1, data_parallel_size=args.replicas),
        )  # fmt: skip
        self.loaded: set[str] = set()
        self.complete = True
        """Every parameter came from the same update (or from the initial weights)."""

    def load_weights(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        """Called by ``receive_weights`` once per bucket. The views live in the
        engine's reused receive buffer, so they are copied now."""
        for name, view in batch:
            param = self.params.get(name)
            if param is None:
                raise KeyError(f"the model has no parameter {name!r}")
            if param.shape != view.shape or param.dtype != view.dtype:
                raise ValueError(f"{name}: got {view.dtype} {list(view.shape)}, "
                                 f"the model has {param.dtype} {list(param.shape)}")  # fmt: skip
            param.copy_(view)
            self.loaded.add(name)

    def init(self, msg: dict) -> dict:
        self.engine.init_transfer_engine(msg["info"])
        return {"ok": True}

    def receive(self, msg: dict) -> dict:
        self.loaded.clear()
        try:
            stats = self.engine.receive_weights(None, self.load_weights)
        except TransferError as e:
            if e.broken:  # the group is gone: leave it so that a new init can follow
                self.engine.shutdown()
            return {"ok": False, "error": str(e), "torn": self.engine.torn or not self.complete,
                    "broken": bool(e.broken), "version": self.engine.weights_version}  # fmt: skip
        missing = sorted(set(self.params) - self.loaded)
        self.complete = not missing
        if self.args.corrupt:
            # Test hook: flip the lowest bit of one weight, as a transfer bug would.
            word = self.params["norm.weight"].data.view(torch.int32)
            word[0] ^= 1
        return {
            "ok": self.complete, "version": self.engine.weights_version, "torn": not self.complete,
            "num_tensors": stats.num_tensors, "num_bytes": stats.num_bytes, "seconds": stats.seconds,
            "error": f"the update left {len(missing)} parameters unchanged: {missing[:5]}" if missing else None,
        }  # fmt: skip

    def generate(self, msg: dict) -> dict:
        if self.engine.torn or not self.complete:
            return {"ok": False, "status": 503, "error": "torn weights: waiting for the next update"}
        try:
            tokens, logits_sha = greedy_generate(self.model, msg["prompt"], msg["max_new_tokens"])
        except ValueError as e:
            return {"ok": False, "status": 400, "error": str(e)}
        out = {"ok": True, "tokens": tokens, "logits_sha256": logits_sha, "weights_version": self.engine.weights_version}
        if msg.get("weights_digest"):
            out["weights_sha256"] = weights_sha256(self.model)
        return out

    def close(self, msg: dict) -> dict:
        self.engine.shutdown()
        return {"ok": True}


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: print every thread's stack
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front tears workers down
    args = parse_args()
    conn = Connection(args.fd)

    def send(msg: dict) -> None:
        conn.send_bytes(json.dumps(msg).encode())

    try:
        worker = Worker(args)
    except Exception as e:  # noqa: BLE001 - reported to the front
        send({"ready": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
        return 1
    send({"ready": True, "device": str(worker.device), "num_params": sum(p.numel() for p in worker.params.values())})
    commands = {"init": worker.init, "receive": worker.receive, "generate": worker.generate, "close": worker.close}
    try:
        while True:
            try:
                msg = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break  # the front is gone
            if msg.get("cmd") == "exit":
                break
            command = commands.get(msg.get("cmd"))
            try:
                reply = command(msg) if command else {"ok": False, "error": f"unknown command {msg.get('cmd')!r}"}
            except Exception as e:  # noqa: BLE001 - reported to the front
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            send(reply)
    finally:
        worker.engine.shutdown()
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="torchxfer demo inference worker (started by demo_server.py)")
    p.add_argument("--index", type=int, required=True, help="replica index = data_parallel_rank")
    p.add_argument("--fd", type=int, required=True, help="socketpair end connected to the front")
    p.add_argument("--replicas", type=int, required=True, help="data_parallel_size")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--corrupt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-tag", default="")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
