"""What the GPU runs in one batched decode step: each kernel's time per step (the step run eagerly under the
torch profiler), their sum, and the step's CUDA graph replay, for a few batch sizes. The gap between the
kernels' sum and the replay is the time between kernels.

    python -m benchmarks.experiments.step_kernels [--size 7B] [--rows 4 16 64] [--context 768] [--gemv-rows N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from backends import exllama_linear
from backends.loader import LoadOptions, load_model
from benchmarks.batched_decode import replay_ms
from benchmarks.llama2 import write_checkpoint

REPEATS = 5


def kernel_times(batched, rows) -> dict[str, tuple[float, int]]:
    """Each kernel name's µs and calls per step."""
    batched.use_graphs = False
    batched.step(rows)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            batched.step(rows)
        torch.cuda.synchronize()
    batched.use_graphs = True
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name[:90]]
            entry[0] += event.time_range.elapsed_us() / REPEATS
            entry[1] += 1 / REPEATS
    return {name: (us, round(calls)) for name, (us, calls) in totals.items()}


def step_replay_ms(batched, rows) -> float:
    batched.step(rows)  # captured here if it was not
    graph, _ = batched.graphs[batched.bucket(len(rows))]
    return replay_ms(graph)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7B")
    parser.add_argument("--rows", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--context", type=int, default=768, help="each row's position (tokens before it)")
    parser.add_argument("--gemv-rows", type=int, default=exllama_linear.GEMV_MAX_ROWS,
                        help="up to this many rows the GEMV, above the tensor-core matmul")
    opts = parser.parse_args()
    exllama_linear.GEMV_MAX_ROWS = opts.gemv_rows
    blocks_per_row = opts.context // 16 + 1
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = write_checkpoint(Path(tmp) / "m", opts.size, act_order=False)
        loaded = load_model(path, LoadOptions(device="cuda", backend="exllama", context_length=opts.context + 64,
                                              cache_tokens=max(opts.rows) * blocks_per_row * 16 + 1024))
        batched = loaded.engine.batched
        with torch.inference_mode():
            for n in opts.rows:
                rows = [(5, opts.context, tuple(range(i * blocks_per_row, (i + 1) * blocks_per_row)))
                        for i in range(n)]
                times = kernel_times(batched, rows)
                replay = step_replay_ms(batched, rows)
                total = sum(us for us, _ in times.values())
                calls = sum(c for _, c in times.values())
                print(f"\n## {opts.size}, {n} rows at position {opts.context}, the GEMV up to {opts.gemv_rows} rows: "
                      f"graph replay {replay:.2f} ms; kernels {total / 1e3:.2f} ms in {calls} launches\n")
                print("| kernel | calls | µs per step | share |")
                print("|---|---|---|---|")
                for name, (us, c) in sorted(times.items(), key=lambda kv: -kv[1][0])[:25]:
                    print(f"| {name} | {c} | {us:.0f} | {us / total:.1%} |")
        loaded.engine.close()


if __name__ == "__main__":
    main()
