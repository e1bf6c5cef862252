"""Where the Triton tile GEMV's time goes (4-bit g128, M = 1): the kernel next to copies of itself without
the dot (loads and the split-K reduction only), without the split-K tail (no arrival counter, no last
program's write; results wrong, timing a bound), both, and without programmatic dependent launch; with
the registers each compiles to.

    python benchmarks/triton_gemv_variants.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.triton_matmul import SHAPES, copy_bandwidth, g128_bytes, graph_us, make_layer  # noqa: E402
from kernels.triton_gptq import _dot8, _gemv_workspace, _store_columns, _x_pairs  # noqa: E402

CONFIGS = [(128, 128, 2, 4), (256, 64, 2, 4)]  # (BLOCK_N, CHUNK_K, CHUNKS, warps), the tuner's usual picks
VARIANTS = {"as is": (True, True, True), "acq_rel adds": (True, "acq_rel", True), "no dot": (False, True, True), "no tail": (True, False, True),
            "no dot, no tail": (False, False, True), "no PDL": (True, True, False)}


@triton.jit
def _variant_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr, ws_ptr, counter_ptr, N, K, group_size,
                    BLOCK_N: tl.constexpr, CHUNK_K: tl.constexpr, CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
                    DOT: tl.constexpr, TAIL: tl.constexpr, PDL: tl.constexpr):
    # kernels/triton_gptq.py's _gptq_gemv_tile_kernel for 4-bit, v1 zeros, with the parts switchable.
    ROWS: tl.constexpr = CHUNK_K // 8
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    chunk_k = pid_k * (CHUNKS * CHUNK_K) + tl.arange(0, CHUNKS) * CHUNK_K
    mask_c = chunk_k < K
    word_row = chunk_k[:, None] // 8 + tl.arange(0, ROWS)[None, :]
    words = tl.load(qweight_ptr + word_row[:, :, None] * N + offs_n[None, None, :],
                    mask=mask_c[:, None, None] & mask_n[None, None, :], other=0, eviction_policy="evict_first")
    g = chunk_k // group_size
    cmask = mask_c[:, None] & mask_n[None, :]
    scale = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=cmask, other=0.0)
    zword = tl.load(qzeros_ptr + g[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=cmask, other=0)
    zero = ((zword >> ((offs_n % 8) * 4)[None, :]) & 15) + 1
    if PDL:
        tl.extra.cuda.gdc_wait()
    if DOT:
        xw = x_ptr.to(tl.pointer_type(tl.int32)) + word_row * 4
        x04, x15, x26, x37 = _x_pairs(tl.load(xw, mask=mask_c[:, None], other=0),
                                      tl.load(xw + 1, mask=mask_c[:, None], other=0),
                                      tl.load(xw + 2, mask=mask_c[:, None], other=0),
                                      tl.load(xw + 3, mask=mask_c[:, None], other=0))
        z1 = (0x6400 | zero) * 0x10001
        z16 = (0x6400 | (zero << 4)) * 0x10001
        dots = _dot8(words, z1[:, None, :], z16[:, None, :], x04[:, :, None], x15[:, :, None], x26[:, :, None],
                     x37[:, :, None])
        acc = tl.sum(tl.sum(dots, axis=1) * scale.to(tl.float32), axis=0)
    else:  # every word still reaches the result, so no load is optimised away
        acc = tl.sum(tl.sum(words & 0xFF, axis=1) + zero, axis=0).to(tl.float32) * tl.sum(scale, axis=0).to(tl.float32)
    if TAIL == "acq_rel":  # the tail before its workspace adds were relaxed
        tl.atomic_add(ws_ptr + offs_n, acc, mask=mask_n)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:
            total = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)
            tl.store(ws_ptr + offs_n, tl.zeros_like(total), mask=mask_n)
            tl.atomic_xchg(counter_ptr + pid_n, 0)
    elif TAIL:
        _store_columns(out_ptr, ws_ptr, counter_ptr, acc, offs_n, mask_n, pid_n, SPLIT_K)
    else:
        tl.atomic_add(ws_ptr + offs_n, acc, mask=mask_n, sem="relaxed")


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{props.name}, triton {triton.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| shape | config | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    regs: dict[tuple, int] = {}
    for name, (k, n) in SHAPES.items():
        copies = max(2, int(4 * props.L2_cache_size // g128_bytes(k, n)) + 1)
        layers = [make_layer(k, n, 4, 128, False, seed=i) for i in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ws, counters = _gemv_workspace(n, x.device)
        for bn, ck, chunks, warps in CONFIGS:
            cells = []
            for variant, (dot, tail, pdl) in VARIANTS.items():
                state = {"i": 0}
                out = torch.empty(1, n, device="cuda", dtype=torch.float16)
                split = triton.cdiv(k, ck * chunks)

                def run():
                    t = layers[state["i"] % copies]
                    state["i"] += 1
                    return _variant_kernel[(triton.cdiv(n, bn), split)](
                        x, t["qweight"], t["scales"], t["qzeros"], out, ws, counters, n, k, 128, BLOCK_N=bn,
                        CHUNK_K=ck, CHUNKS=chunks, SPLIT_K=split, DOT=dot, TAIL=tail, PDL=pdl, num_warps=warps,
                        **({"launch_pdl": True} if pdl else {}))

                compiled = run()
                regs[(bn, ck, chunks, warps, variant)] = (compiled.n_regs, compiled.n_spills)
                us = graph_us(run)
                cells.append(f"{us:.1f} ({g128_bytes(k, n) / (us * 1e-6) / bw:.0%})")
                ws.zero_()
                counters.zero_()
            print(f"| {name} ({k}x{n}) | {(bn, ck, chunks, warps)} | " + " | ".join(cells) + " |", flush=True)
    print("\nregisters (spills) per thread:")
    for key, (r, s) in regs.items():
        print(f"  {key}: {r} ({s})")


if __name__ == "__main__":
    main()
