"""The exllama backend's CUDA 4-bit GEMV on the GPU: build, correctness, speed.

    python -m benchmarks.q4_gemv

Correctness: every epilogue (store, + residual, SiLU(gate) * up), M = 1..4,
4-bit g128 sym, g32 asym and no groups, at Llama-2 7B/13B shapes, against the
fp32 dequantized reference. Speed: 4-bit g128 at those shapes, M = 1 and 4,
next to the Triton GEMV and fp16 cuBLAS, timed by kernels.timing (CUDA-graph
replay, weights rotated past L2); bandwidth = qweight + scales + qzeros bytes / time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from benchmarks.llama2 import SHAPES as LLAMA_SHAPES
from benchmarks.llama2 import g128_bytes, layer
from kernels import cuda_lib
from kernels import q4_gemv as cuda_gemv
from kernels import triton_gptq
from kernels.gptq_format import dequantize
from kernels.timing import cold_copies, copy_bandwidth, graph_us, in_turn
from tests.gptq_testing import relative_error

# The layers the exllama backend runs: q+k+v fused, o (qkvo), gate+up fused, down.
SHAPES = {name: kn for name, kn in LLAMA_SHAPES.items() if name.split(" ", 1)[1] in ("qkv fused", "qkvo",
                                                                                      "gate+up fused", "down")}


def check(k: int, n: int, gs: int, sym: bool) -> float:
    t = layer(k, n, 4, gs, False, sym=sym, seed=n)
    group = k if gs == -1 else gs
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    ws = cuda_gemv.Workspace(n, torch.device("cuda"))
    glu = None
    if n % (2 * cuda_gemv.TILE_N) == 0:
        glu = (cuda_gemv.interleave_glu(t["qweight"]), cuda_gemv.interleave_glu(t["scales"]),
               cuda_gemv.interleave_glu(t["qzeros"], 8))
    worst = 0.0
    for m in range(1, 5):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ w
        res = torch.randn(m, n, device="cuda", dtype=torch.float16)
        for config in [c for c in cuda_gemv.CONFIGS if c[1] <= 256 and cuda_gemv.fits(c, m)]:
            y = cuda_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, group, ws, config=config)
            worst = max(worst, relative_error(y, ref))
            y = cuda_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, group, ws, residual=res, config=config)
            ref_add = ref + res.float()
            worst = max(worst, relative_error(y, ref_add))
            if glu is not None:
                y = cuda_gemv.q4_gemv(x, *glu, 1, group, ws, silu_mul=True, config=config)
                gate, up = ref.chunk(2, dim=1)
                ref_glu = torch.nn.functional.silu(gate) * up
                worst = max(worst, relative_error(y, ref_glu))
    assert not ws.sums.any() and not ws.counters.any(), "the kernel must leave its workspace zeroed"
    return worst


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    t0 = time.time()
    cuda_lib.library(cuda_lib.arch_of(torch.device("cuda")))
    print(f"built/loaded the CUDA library in {time.time() - t0:.1f} s", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth (read+write) {bw / 1e9:.0f} GB/s", flush=True)

    print("\ncorrectness (relative error vs fp32 dequantized reference; M = 1..4; store, +residual, silu*up):")
    failures = 0
    for name, (k, n) in SHAPES.items():
        formats = ((128, True), (32, False), (-1, False)) if name in ("7B qkvo", "13B down") else ((128, True),)
        for gs, sym in formats:
            err = check(k, n, gs, sym)
            failures += err >= 1e-2
            print(f"  {name:18} g{gs:<4} {'sym ' if sym else 'asym'} rel.err {err:.2e} {'ok' if err < 1e-2 else 'FAIL'}",
                  flush=True)

    rows = []
    for name, (k, n) in SHAPES.items():
        t = layer(k, n)
        copies = cold_copies((t["qweight"], t["scales"], t["qzeros"]))
        ws = cuda_gemv.Workspace(n, torch.device("cuda"))
        dense = torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row = {"shape": name, "k": k, "n": n, "m": m, "configs": {}}
            for config in [c for c in cuda_gemv.CONFIGS if cuda_gemv.fits(c, m)]:
                row["configs"][str(config)] = graph_us(in_turn(copies, lambda t, config=config: cuda_gemv.q4_gemv(
                    x, *t, 1, 128, ws, config=config)))
            best = min(row["configs"], key=row["configs"].get)
            row["cuda_us"], row["best_config"] = row["configs"][best], best
            cuda_gemv.q4_gemv(x, *copies[0], 1, 128, ws)  # the tuner's pick
            # The tuner's key begins (m, n, k, with a folded norm) and goes on with the call's other modes.
            row["tuned_config"] = str(next(cfg for key, cfg in cuda_gemv.TUNER.best.items() if key[:4] == (m, n, k, False)))
            if m == 1:
                w = triton_gptq.PackedWeight(*copies[0], 4, 1, 128)
                row["triton_us"] = graph_us(in_turn(copies, lambda t: triton_gptq.gptq_gemv(x, w.on(t))))
            row["cublas_fp16_us"] = graph_us(lambda: x @ dense)
            row["of_copy_bw"] = g128_bytes(k, n) / (row["cuda_us"] * 1e-6) / bw
            rows.append(row)
            print(f"  timed {name} M={m}", flush=True)
    print(f"\n4-bit g128, {time.strftime('%Y-%m-%d')}, {props.name}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| shape (K x N) | M | CUDA µs | best (warps, rows/warp, depth) | tuner's pick | of copy BW | Triton GEMV µs | fp16 cuBLAS µs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tri = f"{r['triton_us']:.1f}" if "triton_us" in r else "-"
        print(f"| {r['shape']} ({r['k']}x{r['n']}) | {r['m']} | {r['cuda_us']:.1f} | {r['best_config']} | "
              f"{r['tuned_config']} | {r['of_copy_bw']:.0%} | {tri} | {r['cublas_fp16_us']:.1f} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "q4_gemv.json").write_text(json.dumps({"device": props.name, "copy_bw": bw, "rows": rows}, indent=1))
    if failures:
        raise SystemExit(f"{failures} correctness checks failed")


if __name__ == "__main__":
    main()
