"""How fast can a Triton kernel stream a 4-bit GPTQ weight matrix at all? Load-only kernels with the
GEMV's access pattern, next to the GEMV itself (CUDA-graph timing, weights rotated past L2).

    python benchmarks/gemv_ceiling.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.triton_matmul import copy_bandwidth, graph_us, make_layer  # noqa: E402
from kernels import triton_gptq  # noqa: E402


@triton.jit
def _load_only(q_ptr, out_ptr, N, K_WORDS, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.int32)
    per = tl.cdiv(tl.cdiv(K_WORDS, ROWS), SPLIT_K) * ROWS
    start = pid_k * per
    for r0 in range(start, tl.minimum(start + per, K_WORDS), ROWS):
        acc ^= tl.load(q_ptr + (r0 + rows)[:, None] * N + offs_n[None, :])
    tl.atomic_xor(out_ptr + offs_n, tl.xor_sum(acc, axis=0))


def main() -> None:
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for k, n in ((4096, 4096), (4096, 12288), (11008, 4096), (4096, 22016)):
        layers = [make_layer(k, n, 4, 128, False, seed=i) for i in range(6)]
        nbytes = k * n // 2
        out = torch.zeros(n, dtype=torch.int32, device="cuda")
        state = {"i": 0}
        results = []
        for bn, rows, split, warps in ((128, 8, 16, 4), (256, 16, 8, 4), (128, 32, 8, 4), (512, 8, 8, 8),
                                       (256, 32, 4, 8), (64, 8, 32, 2), (128, 16, 16, 4)):
            def run(bn=bn, rows=rows, split=split, warps=warps):
                t = layers[state["i"] % len(layers)]
                state["i"] += 1
                _load_only[(triton.cdiv(n, bn), split)](t["qweight"], out, n, k // 8, BLOCK_N=bn, ROWS=rows,
                                                        SPLIT_K=split, num_warps=warps)
            us = graph_us(run)
            results.append((us, f"load-only BN={bn} rows={rows} split={split} warps={warps}"))
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)

        def gemv():
            t = layers[state["i"] % len(layers)]
            state["i"] += 1
            return triton_gptq.gptq_gemv(x, t["qweight"], t["scales"], t["qzeros"], 4, 1, 128)

        gemv()
        results.append((graph_us(gemv), f"GEMV {triton_gptq._TUNED[('gemv', n, k, 4, 128)]}"))
        print(f"{k}x{n} ({nbytes / 1e6:.1f} MB of qweight; 75% of copy BW = {nbytes / (0.75 * bw) * 1e6:.1f} us)")
        for us, name in sorted(results)[:5] + [r for r in results if r[1].startswith("GEMV")]:
            print(f"  {us:7.1f} us  {nbytes / (us * 1e-6) / bw:5.0%} of copy BW  {name}")


if __name__ == "__main__":
    main()
