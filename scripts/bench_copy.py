"""Packing many tensors into one buffer, three ways, on one GPU: CPU time to launch and GPU time.

``torch._foreach_copy_`` into per-tensor views, ``torch.cat(out=)`` and ``torch.stack(out=)``
into the buffer viewed as one tensor, for 8192 vectors of 4 KiB, 384 MoE-expert matrices
and a transformer-like mix (``packing.concat_plan`` chooses cat where the tensors allow)::

    python3 scripts/bench_copy.py
"""

import time

import torch

dev = torch.device("cuda", 0)


def layouts():
    yield "tiny 8192x[1024] f32", [torch.randn(1024, device=dev) for _ in range(8192)]
    yield "moe 384x[768,2048] bf16", [torch.randn(768, 2048, device=dev, dtype=torch.bfloat16) for _ in range(384)]
    big = []
    for _ in range(6):
        big += [torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        big += [torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        big += [torch.randn(11008, 4096, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    yield "transformer-ish 36 mats bf16", big
def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    for name, ts in layouts():
        n = sum(t.numel() for t in ts)
        dt = ts[0].dtype
        buf = torch.empty(n, dtype=dt, device=dev)
        views, off = [], 0
        for t in ts:
            views.append(buf[off:off + t.numel()].view(t.shape)); off += t.numel()
        rest = ts[0].shape[1:]
        out_cat = buf.view(-1, *rest) if len(rest) else buf
        same = all(t.shape == ts[0].shape for t in ts)
        fns = {"foreach_copy_": lambda: torch._foreach_copy_(views, ts),
               "cat(out=)": lambda: torch.cat(ts, out=out_cat)}
        if same:
            out_stack = buf.view(len(ts), *ts[0].shape)
            fns["stack(out=)"] = lambda: torch.stack(ts, out=out_stack)
        ref = None
        for fname, fn in fns.items():
            buf.zero_(); fn(); torch.cuda.synchronize()
            if ref is None: ref = buf.clone()
            else: assert torch.equal(ref, buf), fname
            cpu, gpu = [], []
            for _ in range(10):
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); t0 = time.perf_counter(); fn(); cpu.append(time.perf_counter() - t0); e.record()
                torch.cuda.synchronize(); gpu.append(s.elapsed_time(e))
            cpu.sort(); gpu.sort()
            print(f"{name:32s} {fname:14s} cpu {cpu[5]*1e3:7.3f} ms  gpu {gpu[5]:7.3f} ms  ({n*ts[0].element_size()/gpu[5]/1e6:.0f} GB/s)")


if __name__ == "__main__":
    main()
