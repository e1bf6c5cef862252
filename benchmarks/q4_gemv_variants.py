"""Where the CUDA GEMV's time goes: the kernel next to itself without arithmetic (loads, the split-K
reduction and the epilogue only) and without programmatic dependent launch, per launch configuration;
then Nsight Compute on one call if `ncu` is installed.

    python benchmarks/q4_gemv_variants.py [--ncu]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.triton_matmul import copy_bandwidth, g128_bytes, graph_us, in_turn, make_layer, rotated_layers  # noqa: E402
from kernels import cuda_lib  # noqa: E402
from kernels import q4_gemv as cuda_gemv  # noqa: E402

SHAPES = {"7B o": (4096, 4096), "7B qkv fused": (4096, 12288), "7B gate+up fused": (4096, 22016),
          "7B down": (11008, 4096)}


def one_call(k: int, n: int) -> None:
    t = make_layer(k, n, 4, 128, False, seed=0)
    ws = cuda_gemv.Workspace(n, torch.device("cuda"))
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    for _ in range(3):
        cuda_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 128, ws, config=(4, 256, 4))
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncu", action="store_true")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        return one_call(*opts.one)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    arch = cuda_lib.arch_of(torch.device("cuda"))
    libs = {"full": (cuda_lib.library(arch), True), "no PDL": (cuda_lib.library(arch), False),
            "load-only": (cuda_lib.library(arch, ("Q4_GEMV_LOAD_ONLY",)), True)}
    print(f"{props.name}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| shape | config (warps, rows/warp) | " + " | ".join(f"{v} µs" for v in libs) + " | full of copy BW | load-only of copy BW |")
    print("|---|---|" + "---|" * (len(libs) + 2))
    for name, (k, n) in SHAPES.items():
        layer_bytes = g128_bytes(k, n)
        layers = rotated_layers(k, n, props.L2_cache_size)
        ws = cuda_gemv.Workspace(n, torch.device("cuda"))
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        for config in cuda_gemv.CONFIGS:
            us = {}
            for variant, (lib, pdl) in libs.items():
                us[variant] = graph_us(in_turn(layers, lambda t, config=config, lib=lib, pdl=pdl: cuda_gemv.q4_gemv(
                    x, t["qweight"], t["scales"], t["qzeros"], 1, 128, ws, config=config, lib=lib, pdl=pdl)))
            t = layers[0]
            outs = {v: cuda_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 128, ws, config=config,
                                         lib=lib, pdl=pdl).float() for v, (lib, pdl) in libs.items()}
            for v in ("no PDL",):  # the same arithmetic: must agree with the full kernel
                err = float((outs[v] - outs["full"]).norm() / outs["full"].norm())
                assert err < 1e-3, (name, config, v, err)
            print(f"| {name} ({k}x{n}) | {config} | " + " | ".join(f"{v:.1f}" for v in us.values()) + " | "
                  f"{layer_bytes / (us['full'] * 1e-6) / bw:.0%} | {layer_bytes / (us['load-only'] * 1e-6) / bw:.0%} |",
                  flush=True)
    if opts.ncu:
        cmd = ["ncu", "--kernel-name", "regex:q4_gemv", "--launch-skip", "2", "--launch-count", "1",
               "--section", "SpeedOfLight", "--section", "Occupancy", "--section", "WarpStateStats",
               "--section", "LaunchStats", "--section", "MemoryWorkloadAnalysis",
               sys.executable, __file__, "--one", "4096", "22016"]
        print(subprocess.run(cmd, capture_output=True, text=True).stdout[-9000:])


if __name__ == "__main__":
    main()
