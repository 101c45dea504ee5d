"""Stress many updates between 3 real processes (the CPU Gloo race fixed in SideGroup.wait).

One trainer and two workers, Gloo over loopback, ``--updates`` updates per
run that alternate packed and unpacked sends of a model yielded through one
reused staging tensor (``tests/test_transfer.py``'s ``staging_model``). The
script repeats this for ``--runs`` runs and prints each failing run: every
rank's error and its last control steps (posted, and the rows it got).
Each wait is bounded by the library's 10 s timeout, and each run is killed
after 120 s. Example::

    python scripts/stress_updates.py --runs 16 --updates 40

What it found (2-core CPU, torch 2.13): one rank declared a collective failed
("Operation timed out!") although the collective had succeeded, and the
others then waited for it until their timeout. ``SideGroup.wait`` waits in
50 ms slices; ``Work.wait(timeout)`` raises when a slice expires, and when
the work completed in the moment between that raise and the check of
``is_completed()``, the slice's timeout was taken for the work's failure.
3 of 11 runs failed before the fix (with step logging on), 0 of 16 after.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank(rank: int, port: int, updates: int, out: mp.Queue) -> None:
    sys.path.insert(0, ROOT)
    import torchxfer.control as control

    steps: list[str] = []
    post, rows = control.Step.__init__, control.Step.rows

    def logged_post(self, channel, words, what):  # noqa: ANN001
        steps.append(f"posted {what} (row kind {words[1]})")
        return post(self, channel, words, what)

    def logged_rows(self):  # noqa: ANN001
        got = rows(self)
        steps.append(f"  got {self.what}: " + ", ".join(f"{r.kind.name}{list(r.args[:4])}" for r in got))
        return got

    control.Step.__init__, control.Step.rows = logged_post, logged_rows
    try:
        from tests import test_transfer as tt
        from torchxfer import NCCLWeightTransferEngine, destroy_side_group

        if rank == 0:
            group = tt.trainer(port, 3)
            for step in range(updates):
                NCCLWeightTransferEngine.trainer_send_weights(
                    tt.staged(tt.staging_model(step)), group, packed=step % 2 == 0, packed_buffer_size_bytes=4 << 20
                )
            destroy_side_group(group)
        else:
            engine = tt.worker(rank, port, 3)
            for _ in range(updates):
                _, load = tt.collector()
                engine.receive_weights(None, load)
            engine.shutdown()
        out.put((rank, None))
    except Exception:  # noqa: BLE001 - reported to the parent
        out.put((rank, traceback.format_exc()[-400:] + "\nlast control steps:\n" + "\n".join(steps[-14:])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--updates", type=int, default=40)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    failed = 0
    for run in range(args.runs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, port, args.updates, out)) for r in range(3)]
        for proc in procs:
            proc.start()
        results: dict[int, str | None] = {}
        deadline = time.monotonic() + 120
        while len(results) < 3 and time.monotonic() < deadline:
            with __import__("contextlib").suppress(queue.Empty):
                rank, error = out.get(timeout=1)
                results[rank] = error
        for proc in procs:
            proc.kill()
            proc.join()
        if len(results) < 3 or any(results.values()):
            failed += 1
            for rank in range(3):
                print(f"==== run {run}, rank {rank}: {results.get(rank, 'no answer within 120 s') or 'ok'}", flush=True)
    print(f"{failed} of {args.runs} runs failed ({args.updates} updates each)", flush=True)


if __name__ == "__main__":
    main()
