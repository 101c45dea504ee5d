"""Where an update's time goes: ``scripts/bench.py`` with a CPU timeline of every protocol step.

Runs ``bench.py`` with the same arguments, with timers around the sender's and
receiver's steps, control steps (post and wait), payload broadcast posts,
group waits and Python garbage collections. Each rank then writes the
timeline of its last update to ``DIR/timeline_rank{r}.txt``: start, end and
duration in milliseconds from the start of that update, on the monotonic
clock, which every process of one host shares, so the ranks' files line up.
Unlike ``--profile`` (torch.profiler), it adds about a microsecond per timed
call, so the timeline is close to an unprofiled update. Example, 2x H200::

    python3 scripts/bench_timeline.py --out-dir tl --backend nccl --device cuda --workers 1 \\
        --layouts huge --modes packed --buffer-mib 1024 --num-buffers 2 --repeats 3

Time a single layout and mode per run: the files hold the last update only.
A development tool: it wraps the package's internals, so it follows their names.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

import bench  # noqa: E402
from torchxfer import colocated_receiver, colocated_sender, control, group, loading, receiver, sender  # noqa: E402

EVENTS: list[tuple[float, float, str]] = []
SENDER_STEPS = ("run", "begin", "post_begin", "posting", "cached_bucket", "bulk_bucket", "table_buckets", "tick",
                "post", "post_runs", "pack_bulk", "end", "drain", "free_buffer", "catch_up", "release_sent")  # fmt: skip
RECEIVER_STEPS = ("run", "speculate", "begin", "follow", "receive", "post_bucket", "post_runs", "load", "load_all",
                  "wait", "tensors", "call_load", "after_load", "end", "finish")  # fmt: skip


def _timed(fn: Any, label: str) -> Any:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((start, time.perf_counter(), label))

    return timed


COLOCATED_SENDER_STEPS = ("_run", "begin", "send", "bulk", "close", "acquire", "end", "read", "check_failures")
COLOCATED_RECEIVER_STEPS = ("run", "begin", "follow", "load", "tensors", "call_load", "end", "finish")


def _instrument() -> None:
    for cls, names in ((sender.Sender, SENDER_STEPS), (receiver.Receiver, RECEIVER_STEPS),
                       (colocated_sender.ColocatedSender, COLOCATED_SENDER_STEPS),
                       (colocated_receiver.ColocatedReceiver, COLOCATED_RECEIVER_STEPS)):  # fmt: skip
        for name in names:
            if hasattr(cls, name):
                setattr(cls, name, _timed(getattr(cls, name), f"{cls.__name__}.{name}"))
    colocated_sender.pull_bucket = _timed(colocated_sender.pull_bucket, "  pull_bucket")
    colocated_sender.pack_replayed = _timed(colocated_sender.pack_replayed, "  pack_replayed")
    loading.ModuleLoader.__call__ = _timed(loading.ModuleLoader.__call__, "  ModuleLoader call")
    loading._sliced = _timed(loading._sliced, "  ModuleLoader sliced copy")
    control.Step.__init__ = _timed(control.Step.__init__, "control step posted")
    control.Step.rows = _timed(control.Step.rows, "control step waited")
    group.SideGroup.gather_row = _timed(group.SideGroup.gather_row, "  all_gather call")
    group.SideGroup.wait = _timed(group.SideGroup.wait, "  SideGroup.wait")
    group.SideGroup.broadcast_group = _timed(group.SideGroup.broadcast_group, "  broadcast_group call")
    bench._sync = _timed(bench._sync, "bench sync (all_reduce + device sync)")
    started: list[float] = []

    def collections(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            EVENTS.append((started[0], time.perf_counter(), f"GC generation {info['generation']}"))

    gc.callbacks.append(collections)


def _write(rank: int, folder: str) -> None:
    starts = [s for s, _, label in EVENTS
              if label in ("Sender.run", "Receiver.run", "ColocatedSender._run", "ColocatedReceiver.run")]
    if not starts:
        return
    t0 = starts[-1]
    lines = [f"rank {rank}: last update, ms from its start (monotonic clock {t0:.6f} s)",
             f"{'start':>9} {'end':>9} {'took':>8}  step"]  # fmt: skip
    lines += [f"{(s - t0) * 1e3:9.3f} {(e - t0) * 1e3:9.3f} {(e - s) * 1e3:8.3f}  {label}"
              for s, e, label in sorted(EVENTS) if s >= t0 - 2e-3]  # fmt: skip
    with open(os.path.join(folder, f"timeline_rank{rank}.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


_rank_main = bench.rank_main


def rank_main(rank: int, args: Any, *rest: Any) -> None:
    _instrument()
    try:
        _rank_main(rank, args, *rest)
    finally:
        _write(rank, os.environ["TORCHXFER_TIMELINE_DIR"])


bench.rank_main = rank_main


def main() -> None:
    argv = sys.argv[1:]
    if "--out-dir" not in argv or argv.index("--out-dir") + 1 >= len(argv):
        sys.exit("usage: bench_timeline.py --out-dir DIR [bench.py arguments]")
    i = argv.index("--out-dir")
    folder = argv[i + 1]
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHXFER_TIMELINE_DIR"] = os.path.abspath(folder)  # read by the spawned ranks
    sys.argv = [sys.argv[0], *argv[:i], *argv[i + 2 :]]
    bench.main()


if __name__ == "__main__":
    main()
