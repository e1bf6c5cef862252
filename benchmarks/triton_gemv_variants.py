"""Where the Triton tile GEMV's time goes (4-bit g128, M = 1): the kernel next to itself without the dot
(loads and the split-K reduction only), without the split-K tail (the workspace adds without waiting for
their old values, no output), without any atomics (each program stores its sums to its own row), combinations,
and without programmatic dependent launch (the kernel's DOT / TAIL / PDL switches; results wrong, timings
bounds); then the integer GEMV at its tuned tile; with the registers each compiles to.

    python benchmarks/triton_gemv_variants.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.triton_matmul import SHAPES, copy_bandwidth, g128_bytes, graph_us, in_turn, rotated_layers  # noqa: E402
from kernels.triton_gptq import _gemv_workspace, _gptq_gemv_int_kernel, _gptq_gemv_tile_kernel  # noqa: E402

CONFIGS = [(128, 128, 2, 4)]  # (BLOCK_N, CHUNK_K, CHUNKS, warps): the tuner's pick at every shape
VARIANTS = {"as is": {}, "no dot": {"DOT": False}, "no tail": {"TAIL": 0}, "no atomics": {"TAIL": 2},
            "no dot, no tail": {"DOT": False, "TAIL": 0}, "no dot, no atomics": {"DOT": False, "TAIL": 2},
            "no PDL": {"PDL": False}}
INT_CONFIG = (256, 128, 2, 8)  # the integer GEMV's pick where the tuner takes it


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{props.name}, triton {triton.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| shape | config | " + " | ".join(VARIANTS) + f" | integer GEMV {INT_CONFIG} |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 1))
    regs: dict[tuple, tuple[int, int]] = {}
    for name, (k, n) in SHAPES.items():
        layers = rotated_layers(k, n, props.L2_cache_size)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ws = _gemv_workspace(n, x.device)
        out = torch.empty(1, n, device="cuda", dtype=torch.float16)
        for bn, ck, chunks, warps in CONFIGS:
            cells = []
            split = triton.cdiv(k, ck * chunks)
            rows = torch.empty(split, n, device="cuda", dtype=torch.float32)  # "no atomics": one row a program
            for variant, switches in VARIANTS.items():

                def launch(t, switches=switches):
                    pdl = switches.get("PDL", True)
                    kw = {"PDL": pdl, **switches, **({"launch_pdl": True} if pdl else {})}
                    return _gptq_gemv_tile_kernel[(triton.cdiv(n, bn), split)](
                        x, t["qweight"], t["scales"], t["qzeros"], out, rows if switches.get("TAIL") == 2 else ws,
                        n, k, 128, BITS=4,
                        ZERO_OFFSET=1, BLOCK_N=bn, CHUNK_K=ck, CHUNKS=chunks, SPLIT_K=split, ASM=True,
                        num_warps=warps, **kw)

                run = in_turn(layers, launch)
                compiled = run()
                regs[(bn, ck, chunks, warps, variant)] = (compiled.n_regs, compiled.n_spills)
                us = graph_us(run)
                cells.append(f"{us:.1f} ({g128_bytes(k, n) / (us * 1e-6) / bw:.0%})")
                ws.zero_()
            ibn, ick, ichunks, iwarps = INT_CONFIG
            isplit = triton.cdiv(k, ick * ichunks)

            def integer(t):
                return _gptq_gemv_int_kernel[(triton.cdiv(n, ibn), isplit)](
                    x, t["qweight"], t["scales"], t["qzeros"], out, ws, n, k, 128, ZERO_OFFSET=1, BLOCK_N=ibn,
                    CHUNK_K=ick, CHUNKS=ichunks, SPLIT_K=isplit, ASM=True, PDL=True, num_warps=iwarps, launch_pdl=True)

            run = in_turn(layers, integer)
            compiled = run()
            regs[INT_CONFIG + ("integer",)] = (compiled.n_regs, compiled.n_spills)
            us = graph_us(run)
            cells.append(f"{us:.1f} ({g128_bytes(k, n) / (us * 1e-6) / bw:.0%})")
            print(f"| {name} ({k}x{n}) | {(bn, ck, chunks, warps)} | " + " | ".join(cells) + " |", flush=True)
    print("\nregisters (spills) per thread:")
    for key, (r, s) in regs.items():
        print(f"  {key}: {r} ({s})")


if __name__ == "__main__":
    main()
