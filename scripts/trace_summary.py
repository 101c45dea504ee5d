"""Summarize torch.profiler Chrome traces (``scripts/bench.py --profile DIR``).

For each trace: every GPU kernel and memcpy in time order (start and duration in ms from the
first GPU event, the stream, a short name), the gap before each NCCL kernel since the last one
ended, and the span and busy time of the NCCL kernels. A development tool:
``python3 scripts/trace_summary.py DIR/*.json``.
"""

from __future__ import annotations

import json
import sys

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def summarize(path: str) -> None:
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    calls = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op" and "broadcast" in e.get("name", "")]
    if not gpu:
        print(path, "no gpu events")
        return
    t0 = min(gpu[0]["ts"], min((e["ts"] for e in calls), default=gpu[0]["ts"]))
    print(f"== {path}: {len(gpu)} gpu events")
    nccl_end, busy, nccl = None, 0.0, []
    for e in gpu:
        name, start, took = e["name"], (e["ts"] - t0) / 1e3, e["dur"] / 1e3
        is_nccl = "nccl" in name.lower()
        gap = ""
        if is_nccl:
            if nccl_end is not None:
                gap = f" gap {start - nccl_end:.3f}"
            nccl_end = start + took
            busy += took
            nccl.append(e)
        label = "NCCL " + name.split("(")[0][-40:] if is_nccl else name[:60]
        print(f"  {start:8.3f} {took:7.3f} s{e.get('args', {}).get('stream', '?')} {label}{gap}")
    if nccl:
        first = (nccl[0]["ts"] - t0) / 1e3
        last = (nccl[-1]["ts"] + nccl[-1]["dur"] - t0) / 1e3
        print(f"  NCCL span {first:.3f}-{last:.3f} = {last - first:.3f} ms, busy {busy:.3f} ms, {len(nccl)} kernels")
    for e in calls[:3]:
        print(f"  cpu broadcast call at {(e['ts'] - t0) / 1e3:.3f}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        summarize(arg)
