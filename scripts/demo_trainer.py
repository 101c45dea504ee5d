"""The demo's trainer, one process per rank under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/demo_trainer.py --server http://HOST:PORT

Every rank trains the model with DDP on synthetic tokens. Global rank 0 alone
also talks to the inference server:

1. before training: ``GET /health`` (bounded poll), ``POST /init_weight_transfer``
   (the server's workers start ``init_transfer_engine`` in the background),
   then ``trainer_init``, which blocks until every worker has joined;
2. after each optimizer step: ``POST /update_weights`` (the server holds new
   requests and puts its workers into ``receive_weights``), then
   ``trainer_send_weights``, which blocks until every worker has loaded the
   update; then its own greedy forward on the fixed prompt and
   ``POST /generate`` to each replica: tokens, logits checksum and weights
   checksum must match bit for bit, and the version must be this update's;
3. from the first update on, a probe thread sends ``/generate`` back to back;
   at the end every answer must match the trainer's reference for the version
   it reports, which shows that no answer came from half-updated weights.

After each step all ranks agree (one all_reduce) whether to go on, so a
mismatch stops every rank cleanly. Rank 0 exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import signal
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_util import die_with_parent, free_port, http_json, wait_healthy

# The launcher (torchrun's agent) may be killed without warning; go with it.
die_with_parent()

import torch
import torch.distributed as dist
import torch.nn.functional as F
from demo_model import (
    PRESETS,
    PROMPT,
    build_model,
    greedy_generate,
    set_deterministic,
    synthetic_batch,
    weights_sha256,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from torchxfer import NCCLWeightTransferEngine, destroy_side_group


class Probe(threading.Thread):
    """Sends ``/generate`` for the fixed prompt back to back until stopped and
    records ``(version, tokens, logits_sha256, held_s)`` or the error."""

    def __init__(self, url: str, max_new_tokens: int, timeout_s: float) -> None:
        super().__init__(daemon=True, name="probe")
        self.url, self.max_new, self.timeout_s = url, max_new_tokens, timeout_s
        self.stop = threading.Event()
        self.answers: list[dict] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, out = http_json("POST", self.url + "/generate",
                                        {"prompt": PROMPT, "max_new_tokens": self.max_new}, timeout=self.timeout_s)  # fmt: skip
            except OSError as e:
                status, out = 0, {"error": str(e)}
            if status == 200:
                self.answers.append(out)
            elif not self.stop.is_set():
                self.errors.append(f"HTTP {status}: {out.get('error') if isinstance(out, dict) else out}")


class ServerLink:
    """Rank 0's side of the demo: the HTTP control plane and the side group."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module) -> None:
        self.args = args
        self.url = args.server.rstrip("/")
        self.model = model
        self.group: Any = None
        self.replicas = 0
        self.refs: dict[int, tuple[list[int], str]] = {}
        self.probe: Probe | None = None
        self.new_tokens = PRESETS[args.model].new_tokens

    def post(self, path: str, body: dict, expect: int) -> dict:
        status, out = http_json("POST", self.url + path, body, timeout=2 * self.args.timeout_s + 60)
        if status != expect:
            raise RuntimeError(f"POST {path} answered {status}: {out}")
        return out

    def connect(self) -> None:
        """Wait for the server, tell it to join, and create the side group (blocks until all joined)."""
        health = wait_healthy(self.url, self.args.timeout_s + 120)
        self.replicas = health["replicas"]
        world = 1 + self.replicas
        address = self.args.side_address
        # trainer_init needs the port before it binds (master_port=0 is refused)
        # and the workers need it first, so a free port is picked here; a
        # collision in between raises "already in use".
        port = self.args.side_port or free_port(address)
        self.post("/init_weight_transfer", {"master_address": address, "master_port": port,
                                            "world_size": world, "rank_offset": 1}, 202)  # fmt: skip
        self.group = NCCLWeightTransferEngine.trainer_init(
            dict(master_address=address, master_port=port, world_size=world),
            backend=self.args.backend, timeout_s=self.args.timeout_s,
        )  # fmt: skip

    def push_and_check(self, step: int, loss: float) -> bool:
        """Send the weights, then compare the server's answers with our own forward. True if bit-exact."""
        start = time.perf_counter()
        self.post("/update_weights", {}, 202)
        stats = NCCLWeightTransferEngine.trainer_send_weights(
            self.model.named_parameters(), self.group, packed=True,
            packed_buffer_size_bytes=int(self.args.buffer_mb * (1 << 20)), packed_num_buffers=2,
        )  # fmt: skip
        sync_s = time.perf_counter() - start
        ref_tokens, ref_logits = greedy_generate(self.model, PROMPT, self.new_tokens)
        ref_weights = weights_sha256(self.model)
        self.refs[stats.update_id] = (ref_tokens, ref_logits)
        problems = []
        for replica in range(self.replicas):
            out = self.post("/generate", {"prompt": PROMPT, "max_new_tokens": self.new_tokens,
                                          "replica": replica, "weights_digest": True}, 200)  # fmt: skip
            if out["weights_version"] != stats.update_id:
                problems.append(f"replica {replica} reports version {out['weights_version']}, sent {stats.update_id}")
            if out["weights_sha256"] != ref_weights:
                problems.append(f"replica {replica} weights sha256 {out['weights_sha256'][:12]} != {ref_weights[:12]}")
            if out["tokens"] != ref_tokens:
                problems.append(f"replica {replica} tokens {out['tokens']} != trainer's {ref_tokens}")
            if out["logits_sha256"] != ref_logits:
                problems.append(f"replica {replica} logits sha256 {out['logits_sha256'][:12]} != {ref_logits[:12]}")
        verdict = (f"bit-exact ({self.replicas} replica{'s' if self.replicas != 1 else ''}; {len(ref_tokens)} tokens; logits sha256 {ref_logits[:12]})"
                   if not problems else "MISMATCH")  # fmt: skip
        mb = stats.num_bytes / 1e6
        print(f"step {step}/{self.args.steps}  loss {loss:.4f}  version {stats.update_id}  sent {mb:.2f} MB  "
              f"sync {sync_s:.3f} s  {stats.num_bytes / sync_s / 1e9:.2f} GB/s  server == trainer: {verdict}",
              flush=True)  # fmt: skip
        for p in problems:
            print(f"  mismatch: {p}", flush=True)
        if not problems and self.probe is None and self.args.probe:
            self.probe = Probe(self.url, self.new_tokens, 2 * self.args.timeout_s + 60)
            self.probe.start()
        return not problems

    def finish_probe(self) -> bool:
        """Stop the probe; True if every answer matched its version's reference."""
        if self.probe is None:
            return True
        self.probe.stop.set()
        self.probe.join(2 * self.args.timeout_s + 60)
        answers = self.probe.answers
        bad = [a for a in answers if self.refs.get(a["weights_version"]) != (a["tokens"], a["logits_sha256"])]
        held = [a["held_s"] for a in answers if a["held_by_update"]]
        versions = sorted({a["weights_version"] for a in answers})
        ok = not bad and not self.probe.errors and bool(answers)
        print(f"probe: {len(answers)} concurrent /generate answers over versions {versions}, {len(held)} held "
              f"by an update (max {max(held, default=0):.3f} s): "
              + ("every one bit-exact with the trainer's weights of its version" if ok else
                 f"{len(bad)} matched no version, {len(self.probe.errors)} failed"), flush=True)  # fmt: skip
        for a in bad[:3]:
            print(f"  probe mismatch: {a}", flush=True)
        for e in self.probe.errors[:3]:
            print(f"  probe error: {e}", flush=True)
        return ok

    def close(self) -> None:
        if self.probe is not None:
            self.probe.stop.set()
        if self.group is not None:
            destroy_side_group(self.group)
            self.group = None
            try:
                http_json("POST", self.url + "/close_weight_transfer", {}, timeout=10)
            except OSError:
                pass


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: print every thread's stack
    args = parse_args()
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    set_deterministic(device)
    dist.init_process_group(args.backend, device_id=device if device.type == "cuda" else None)
    cfg = PRESETS[args.model]
    model = build_model(args.model, device, seed=args.seed)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    link = ServerLink(args, model) if rank == 0 else None
    ok = True
    try:
        if link is not None:
            link.connect()
            n = sum(p.numel() for p in model.parameters())
            print(f"trainer: {world} ranks ({args.backend}, {device.type}), model {args.model} {n / 1e6:.2f} M params; "
                  f"side group ready with {link.replicas} server workers", flush=True)  # fmt: skip
        for step in range(1, args.steps + 1):
            batch = synthetic_batch(cfg, step, rank, device)
            logits = ddp(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            step_ok = link.push_and_check(step, mean_loss.item() / world) if link is not None else True
            # Every rank learns whether rank 0 found a mismatch, so all stop together.
            flag = torch.tensor([1 if step_ok else 0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not flag.item():
                ok = False
                break
        if link is not None:
            ok = link.finish_probe() and ok
            print(f"trainer: {'all steps bit-exact' if ok else 'MISMATCH'}", flush=True)
    finally:
        if link is not None:
            link.close()
    # Free DDP (and its Reducer) before the process group. Otherwise the
    # Reducer holds the last reference to the Gloo group and destroys it when
    # main() returns, with the GIL held: ~ProcessGroupGloo joins its threads
    # while one of them waits for the GIL to free a tensor, and the process
    # hangs at exit (seen on torch 2.13, about 1 run in 10; pytorch#56297).
    # The ProcessGroup's own binding releases the GIL in its destructor.
    del ddp, opt
    gc.collect()
    dist.destroy_process_group()
    return 0 if ok else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="torchxfer demo trainer (run under torchrun)")
    p.add_argument("--server", required=True, help="base URL of the inference server")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--model", default="small", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="trainer and side-group backend")
    p.add_argument("--timeout-s", type=float, default=60.0, help="bound on every side-group wait")
    p.add_argument("--buffer-mb", type=float, default=4.0, help="packed buffer size (two buffers)")
    p.add_argument("--side-address", default="127.0.0.1", help="where the side group's store listens")
    p.add_argument("--side-port", type=int, default=0, help="side-group port (0: pick a free one)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="send /generate concurrently with the updates and check every answer")  # fmt: skip
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-tag", default="", help="opaque tag carried in every process's command line")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
