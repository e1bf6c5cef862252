"""Where the tensor-core 4-bit matmul (kernels/q4_mma.cu) spends its time at a few rows.

    python -m benchmarks.experiments.mma_profile            # tuned configurations, times, bytes per µs
    python -m benchmarks.experiments.mma_profile --ncu OUT  # the same calls under Nsight Compute

For each shape and row count: the tuned launch configuration, the call's time as the benchmarks time it
(kernels.timing: graph replay, weights past L2), fp16 cuBLAS's, and the rate at which it reads the bytes it
must (4-bit weights + fp16 scales + zeros). With --ncu, each configuration's kernel is run under ncu (caches
flushed before each profiled launch, clocks left alone) and the sections that say what limits it are kept:
memory throughput against peak, achieved occupancy, and the warps' stall reasons.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.llama2 import g128_bytes, layer as llama_layer
from kernels.timing import cold_copies, graph_us, in_turn

SHAPES = {"7B qkvo": (4096, 4096), "7B gate+up fused": (4096, 22016)}
ROWS = (8, 16, 64)
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats",
            "SchedulerStats", "InstructionStats")
# Cycles a warp spent stalled for each reason, per instruction issued: what the warps wait on.
STALLS = ("long_scoreboard", "short_scoreboard", "barrier", "wait", "math_pipe_throttle", "mio_throttle",
          "lg_throttle", "not_selected", "selected", "dispatch_stall", "no_instruction", "branch_resolving",
          "membar", "drain", "imc_miss", "tex_throttle", "sleeping")
METRICS = [f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio" for reason in STALLS] + [
    "smsp__inst_executed.sum", "sm__cycles_active.avg", "dram__bytes_read.sum", "lts__t_bytes.sum"]


def layer(k: int, n: int) -> dict[str, torch.Tensor]:
    return llama_layer(k, n, seed=k + n)


def tuned(rows: tuple[int, ...]) -> list[dict]:
    from kernels import q4_mma

    out = []
    for name, (k, n) in SHAPES.items():
        t = layer(k, n)
        copies = cold_copies([t["qweight"], t["scales"], t["qzeros"]])
        dense = cold_copies([torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02])
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            call = in_turn(copies, lambda w: q4_mma.q4_mma(x, w[0], w[1], w[2], 1, 128))
            call()
            us = graph_us(call)
            config = q4_mma.TUNER.best[q4_mma.tuner_key(m, n, k, 128, False)]
            dense_us = graph_us(in_turn(dense, lambda d: x @ d[0]))
            row = {"shape": name, "k": k, "n": n, "m": m, "config": list(config), "us": us, "cublas_us": dense_us,
                   "gb_s": g128_bytes(k, n) / us / 1e3}
            print(f"| {name} ({k}x{n}) | {m} | {tuple(config)} | {us:.1f} | {dense_us:.1f} | {us / dense_us:.2f}x | "
                  f"{row['gb_s']:.0f} |", flush=True)
            out.append(row)
    return out


def launches(rows_json: str) -> None:
    """The calls ncu profiles: each row's configuration, three launches on fresh weights."""
    from kernels import q4_mma

    for row in json.loads(rows_json):
        t = layer(row["k"], row["n"])
        x = torch.randn(row["m"], row["k"], device="cuda", dtype=torch.float16)
        torch.cuda.nvtx.range_push(f"{row['shape']} M={row['m']}")
        for _ in range(3):
            q4_mma.q4_mma(x, t["qweight"], t["scales"], t["qzeros"], 1, 128, config=tuple(row["config"]))
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncu", type=Path, help="also profile under ncu, reports in this folder")
    parser.add_argument("--launches", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.launches:
        launches(opts.launches)
        return
    print("| shape | M | config (cols, depth, steps/block, warps_n, prefetch) | µs | cuBLAS µs | ratio | GB/s |")
    print("|---|---|---|---|---|---|---|")
    rows = tuned(ROWS)
    if opts.ncu is None:
        return
    opts.ncu.mkdir(parents=True, exist_ok=True)
    sections = [arg for s in SECTIONS for arg in ("--section", s)]
    cmd = ["ncu", "--clock-control", "none", "--cache-control", "all", "-k", "regex:q4_mma_kernel",
           "--launch-skip", "0", *sections, "--metrics", ",".join(METRICS),
           sys.executable, "-m", "benchmarks.experiments.mma_profile", "--launches", json.dumps(rows)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (opts.ncu / "ncu.txt").write_text(done.stdout + done.stderr)
    print(f"ncu exit {done.returncode}; report {opts.ncu / 'ncu.txt'} ({len(done.stdout)} chars)")


if __name__ == "__main__":
    main()
