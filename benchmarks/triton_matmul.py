"""The Triton GPTQ kernels on the GPU: correctness at Llama-2 7B/13B shapes, then time and effective
bandwidth for M = 1, 4, 16, 128, 2048 next to fp16 cuBLAS.

    python -m benchmarks.triton_matmul [--quick] [--gemv-configs]

Effective bandwidth counts the bytes the kernel must read: qweight + scales + qzeros. Times come from
kernels.timing (CUDA-graph replay, weights rotated past L2), as the autotuner times them; "eager" is the
same call from Python. For M >= 128 the fused kernel's time is shown next to the dequantize + cuBLAS path
that gptq_matmul takes there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import triton

from backends.packed_linear import contiguous_layout
from benchmarks.llama2 import SHAPES, g128_bytes, layer
from kernels import triton_gptq
from kernels.gptq_format import reference_matmul
from kernels.timing import cold_copies, copy_bandwidth, graph_us, in_turn
from kernels.triton_gptq import PackedWeight
from tests.gptq_testing import relative_error

MS = (1, 4, 16, 128, 2048)


def check(k: int, n: int, bits: int, group_size: int, act_order: bool) -> float:
    """The largest relative error of gptq_matmul against the fp32 reference at M = 1, 16 and 300 (GEMV or
    fused, fused split-K, dequantize + cuBLAS), regrouped as the backends load it and through g_idx."""
    t = layer(k, n, bits, group_size, act_order, sym=True, seed=k + n)
    gs = k if group_size == -1 else group_size
    qweight, perm, kernel_gs = contiguous_layout(t["qweight"], t["g_idx"], bits, gs)
    worst = 0.0
    for m in (1, 16, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1)
        xp = x[:, perm] if perm is not None else x
        for grouping in (kernel_gs, 0):  # the regrouped fast path and the g_idx path
            q, xi = (qweight, xp) if grouping else (t["qweight"], x)
            w = PackedWeight(q, t["scales"], t["qzeros"], bits, 1, grouping, t["g_idx"])
            worst = max(worst, relative_error(triton_gptq.gptq_matmul(xi.contiguous(), w), ref))
    return worst


def g128_weight(k: int, n: int) -> PackedWeight:
    t = layer(k, n)
    return PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 128)


def bench_shape(k: int, n: int, bw: float) -> list[dict]:
    w = g128_weight(k, n)
    copies = cold_copies(w.tensors)
    dense = cold_copies([torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02])
    rows = []
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        run_gptq = in_turn(copies, lambda t: triton_gptq.gptq_matmul(x, w.on(t)))
        run_dense = in_turn(dense, lambda d: x @ d[0])
        run_gptq()  # autotune outside the timing
        us_q = graph_us(run_gptq)
        us_eager = triton.testing.do_bench(run_gptq, warmup=25, rep=200, return_mode="median") * 1e3
        us_d = graph_us(run_dense)
        us_fused = None
        if m >= triton_gptq.DEQUANT_MIN_M:
            cfg = triton_gptq.tuned_config(x, w, gemv=False)
            us_fused = graph_us(in_turn(copies, lambda t: triton_gptq.launch(cfg, x, w.on(t))))
        gbs = g128_bytes(k, n) / (us_q * 1e-6) / 1e9
        rows.append({"k": k, "n": n, "m": m, "gptq_us": us_q, "eager_us": us_eager, "cublas_fp16_us": us_d,
                     "fused_us": us_fused, "gptq_GBps": gbs, "of_copy_bw": gbs * 1e9 / bw, "vs_cublas": us_q / us_d})
    return rows


SMALL_MS = (1, 2, 4, 8, 16, 32, 64)


def small_batches(shapes: dict[str, tuple[int, int]], only: str | None = None) -> None:
    """The batch sizes of many decoding sequences: each kernel next to fp16 cuBLAS at M = 1..64, 4-bit g128
    (and 8-bit g128 at M = 16), weights past L2. Targets: M=16 at most 0.45x cuBLAS's time, M=64 0.6x,
    8-bit M=16 0.7x. "cuda": as the exllama backend runs them, the GEMV (kernels/q4_gemv.cu) up to M = 4, above
    it the tensor-core matmul (kernels/q4_mma.cu), "triton": the fused tl.dot kernel (M = 1 the Triton GEMV)."""
    from kernels import q4_gemv, q4_mma

    print("| shape | bits | kernel | " + " | ".join(f"M={m}" for m in SMALL_MS) + " |")
    print("|---|---|---|" + "---|" * len(SMALL_MS))
    for name, (k, n) in shapes.items():
        dense = cold_copies([torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02])
        for bits in (4,) if only == "cuda" else (4, 8):
            t = layer(k, n, bits)
            w = PackedWeight(t["qweight"], t["scales"], t["qzeros"], bits, 1, 128)
            copies = cold_copies(w.tensors)
            kernels = {"triton": lambda x, t_: triton_gptq.gptq_matmul(x, w.on(t_))}
            if bits == 4:
                ws = q4_gemv.Workspace(n, torch.device("cuda"))

                def cuda(x, t_):
                    if x.shape[0] <= q4_gemv.MAX_ROWS:
                        return q4_gemv.q4_gemv(x, t_[0], t_[1], t_[2], 1, 128, ws)
                    return q4_mma.q4_mma(x, t_[0], t_[1], t_[2], 1, 128)

                kernels = {"cuda": cuda, **kernels}
            kernels = {name_: call for name_, call in kernels.items() if only in (None, name_)}
            for kernel, call in kernels.items():
                cells = []
                for m in SMALL_MS if bits == 4 else (16,):
                    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                    run = in_turn(copies, lambda t_: call(x, t_))
                    run()
                    us_q, us_d = graph_us(run), graph_us(in_turn(dense, lambda d: x @ d[0]))
                    cells.append(f"{us_q:.1f} µs / {us_d:.1f} = {us_q / us_d:.2f}x")
                if bits == 8:
                    cells = ["-"] * SMALL_MS.index(16) + cells + ["-"] * (len(SMALL_MS) - SMALL_MS.index(16) - 1)
                print(f"| {name} ({k}x{n}) | {bits} | {kernel} | " + " | ".join(cells) + " |", flush=True)


def check_mma(shapes: dict[str, tuple[int, int]]) -> None:
    """The tensor-core matmul against the fp32 dequantized reference at M = 16 and 64: g128, g32 act-order
    (regrouped as the exllama backend loads it), no groups."""
    from kernels import q4_mma

    for name, (k, n) in shapes.items():
        for gs, act in ((128, False), (32, True), (-1, False)):
            t = layer(k, n, 4, gs, act, sym=True, seed=k + n)
            kernel_gs = k if gs == -1 else gs
            qweight, perm, _ = contiguous_layout(t["qweight"], t["g_idx"], 4, kernel_gs)
            perm32 = perm.to(torch.int32).contiguous() if perm is not None else None
            worst = 0.0
            for m in (16, 64):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
                y = q4_mma.q4_mma(x, qweight, t["scales"], t["qzeros"], 1, kernel_gs, perm=perm32)
                worst = max(worst, relative_error(y, ref))
            print(f"  mma {name:18} g{gs:<4} act={act!s:5} rel.err {worst:.2e} {'ok' if worst < 3e-3 else 'FAIL'}",
                  flush=True)


def gemv_configs(k: int, n: int) -> tuple[list[tuple[float, triton_gptq.LaunchConfig]], float]:
    """M = 1: every GEMV candidate of the shape (4-bit g128), timed alike, fastest first; and the largest
    relative error of any of them against the fp32 dequantized reference."""
    w = g128_weight(k, n)
    copies = cold_copies(w.tensors)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    g_idx = torch.arange(k, device="cuda", dtype=torch.int32) // 128
    ref = reference_matmul(x.float(), w.qweight, w.qzeros, w.scales, g_idx, 4, 1)
    timings, worst = [], 0.0
    for cfg in triton_gptq.gemv_candidates(n, k, 128, 4):
        try:
            timings.append((graph_us(in_turn(copies, lambda t, cfg=cfg: triton_gptq.launch(cfg, x, w.on(t)))), cfg))
        except triton.runtime.errors.OutOfResources:
            continue
        worst = max(worst, relative_error(triton_gptq.launch(cfg, x, w), ref))
    return sorted(timings, key=lambda t: t[0]), worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="7B shapes only")
    parser.add_argument("--small-m", action="store_true", help="only M = 1..64 next to fp16 cuBLAS")
    parser.add_argument("--kernel", choices=["cuda", "triton"], help="with --small-m: only this kernel's rows")
    parser.add_argument("--gemv-configs", action="store_true",
                        help="only M = 1: the three fastest GEMV configurations at every shape, and the largest "
                             "error of any configuration")
    opts = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MB, "
          f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    t0 = time.time()
    bw = copy_bandwidth()
    print(f"device copy bandwidth (read+write): {bw / 1e9:.0f} GB/s", flush=True)
    shapes = {name: kn for name, kn in SHAPES.items() if not (opts.quick and name.startswith("13B"))}
    if opts.small_m:
        if opts.kernel != "triton":
            check_mma(shapes)
        small_batches(shapes, opts.kernel)
        return
    if opts.gemv_configs:
        print("| shape | µs | of copy BW | configuration |\n|---|---|---|---|")
        for name, (k, n) in shapes.items():
            timings, worst = gemv_configs(k, n)
            for us, cfg in timings[:3]:
                print(f"| {name} ({k}x{n}) | {us:.1f} | {g128_bytes(k, n) / (us * 1e-6) / bw:.0%} | {cfg} |", flush=True)
            print(f"|  | all {len(timings)} configurations: largest relative error {worst:.1e} "
                  f"{'ok' if worst < 1e-2 else 'FAIL'} | | |", flush=True)
        return

    print("\ncorrectness (relative error vs fp32 dequantized reference, M = 1, 16, 300):")
    triton_gptq.TUNER.timed = False  # checking every format: no need to time configurations
    for name, (k, n) in shapes.items():
        for bits, gs, act in ((4, 128, True), (4, 32, True), (8, 128, False), (4, -1, False)):
            err = check(k, n, bits, gs, act)
            flag = "ok" if err < 1e-2 else "FAIL"
            print(f"  {name:12} {bits}-bit g{gs:<4} act={act!s:5} rel.err {err:.2e} {flag}  ({time.time() - t0:.0f} s)", flush=True)

    triton_gptq.TUNER.timed = True
    triton_gptq.TUNER.best.clear()
    rows = []
    for name, (k, n) in shapes.items():
        rows += [dict(r, shape=name) for r in bench_shape(k, n, bw)]
        print(f"  timed {name} ({time.time() - t0:.0f} s)", flush=True)
    print(f"\n4-bit g128, {time.strftime('%Y-%m-%d')}, {props.name}")
    print("| shape | M | GPTQ µs (graph) | eager µs | fused-kernel µs | fp16 cuBLAS µs | GPTQ/cuBLAS | GPTQ GB/s | of copy BW |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fused = f"{r['fused_us']:.1f}" if r["fused_us"] is not None else "-"
        print(f"| {r['shape']} ({r['k']}x{r['n']}) | {r['m']} | {r['gptq_us']:.1f} | {r['eager_us']:.1f} | {fused} | "
              f"{r['cublas_fp16_us']:.1f} | {r['vs_cublas']:.2f}x | {r['gptq_GBps']:.0f} | {r['of_copy_bw']:.0%} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "triton_matmul.json").write_text(json.dumps(
            {"device": props.name, "copy_bw": bw, "rows": rows,
             "tuned": {str(k): str(v) for k, v in triton_gptq.TUNER.best.items()}}, indent=1))


if __name__ == "__main__":
    main()
