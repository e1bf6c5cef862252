"""Where a decode step's GPU time goes: kernels of one eager 7B decode step, by total time.

    python -m benchmarks.profile_decode [--size 7B] [--backend exllama] [--overlap]

Kernels run one at a time (CUDA_LAUNCH_BLOCKING=1) unless --overlap: with programmatic dependent launch a
kernel launched early counts the time it waits on its predecessor as its own, so the per-kernel times
overlap and add up to more than the step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from backends.loader import LoadOptions, build_model
from benchmarks.llama2 import CONTEXT, SIZES, write_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7B", choices=list(SIZES))
    parser.add_argument("--backend", default="exllama")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--overlap", action="store_true", help="let kernels overlap, as in a decode step")
    opts = parser.parse_args()
    if not opts.overlap:
        os.environ["CUDA_LAUNCH_BLOCKING"] = "1"  # read when CUDA initializes, which has not happened yet
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "m", opts.size, opts.act_order)
        model, *_ = build_model(path, LoadOptions(backend=opts.backend, context_length=CONTEXT))
    model.setup_cache(batch=1, max_seq_len=CONTEXT)
    token = torch.tensor([[1]], device="cuda")
    with torch.inference_mode():
        for p in range(20):  # compile and autotune
            model(token, torch.tensor([p], device="cuda"), kv_len=128)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for p in range(20, 25):
                model(token, torch.tensor([p], device="cuda"), kv_len=128)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 5
    count = sum(e.count for e in events) / 5
    print(f"{opts.size} {opts.backend}: {total / 1e3:.2f} ms of kernels per step, {count:.0f} kernels per step")
    print("| kernel | per step µs | calls per step | share |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"| {e.key[:90]} | {e.self_device_time_total / 5:.0f} | {e.count / 5:.0f} | "
              f"{e.self_device_time_total / 5 / total:.0%} |")


if __name__ == "__main__":
    main()
