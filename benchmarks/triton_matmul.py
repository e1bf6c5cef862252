"""GPTQ Triton kernel on the GPU: correctness at Llama-2 7B/13B shapes, then time
and effective bandwidth for M = 1, 4, 16, 128, 2048 next to fp16 cuBLAS.

    python benchmarks/triton_matmul.py [--quick]

Effective bandwidth counts the bytes the kernel must read: qweight + scales +
qzeros (+ g_idx). Weights rotate through enough copies to exceed the L2 cache.
Times are per call, replayed from a CUDA graph of 20 calls (how the decode
loop runs them, without Python launch overhead); "eager" is the same call
from Python. For M >= 128 the fused kernel's time is shown next to the
dequantize + cuBLAS path that gptq_matmul takes there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.triton_backend import contiguous_layout  # noqa: E402
from kernels.gptq_format import reference_matmul  # noqa: E402
import kernels.triton_gptq as triton_gptq  # noqa: E402
from kernels.triton_gptq import _TUNED, gptq_matmul  # noqa: E402
from tests.gptq_testing import random_gptq_layer, relative_error  # noqa: E402

# Llama-2's layers, and the fused q+k+v and gate+up layers that the triton backend runs instead of the single ones.
SHAPES = {
    "7B qkvo": (4096, 4096), "7B qkv fused": (4096, 12288), "7B gate/up": (4096, 11008),
    "7B gate+up fused": (4096, 22016), "7B down": (11008, 4096),
    "13B qkvo": (5120, 5120), "13B qkv fused": (5120, 15360), "13B gate/up": (5120, 13824),
    "13B gate+up fused": (5120, 27648), "13B down": (13824, 5120),
}
MS = (1, 4, 16, 128, 2048)


def copy_bandwidth() -> float:
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3)


def g128_bytes(k: int, n: int) -> int:
    """What a 4-bit g128 GEMV must read: qweight + scales + qzeros."""
    return k * n // 2 + (k // 128) * n * 2 + (k // 128) * n // 2


def make_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    t = random_gptq_layer(k, n, bits, group_size, act_order, sym=True, rng=rng)
    return {key: v.cuda() for key, v in t.items()}


def check(k: int, n: int, bits: int, group_size: int, act_order: bool) -> float:
    t = make_layer(k, n, bits, group_size, act_order, seed=k + n)
    gs = k if group_size == -1 else group_size
    qweight, perm, kernel_gs = contiguous_layout(t["qweight"], t["g_idx"], bits, gs)
    worst = 0.0
    for m in (1, 16, 300):  # GEMV (contiguous) or fused, fused split-K, dequantize + cuBLAS
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1)
        xp = x[:, perm] if perm is not None else x
        for grouping in (kernel_gs, 0):  # the regrouped fast path and the g_idx path
            w, xi = (qweight, xp) if grouping else (t["qweight"], x)
            out = gptq_matmul(xi.contiguous(), w, t["scales"], t["qzeros"], t["g_idx"], bits, 1, grouping)
            worst = max(worst, relative_error(out, ref))
    return worst


def graph_us(fn, calls: int = 20) -> float:
    """Microseconds per call of `fn`, `calls` of them captured in one CUDA graph and replayed."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=100, return_mode="median")
    return ms * 1e3 / calls


def copies_past_l2(item_bytes: int, l2_bytes: int) -> int:
    """How many copies of an item to call in turn so that each is read from memory, not from the L2 cache."""
    return max(2, int(4 * l2_bytes // item_bytes) + 1)


def rotated_layers(k: int, n: int, l2_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Enough random 4-bit g128 [k, n] layers that calling them in turn reads each past the L2 cache."""
    return [make_layer(k, n, 4, 128, False, seed=i) for i in range(copies_past_l2(g128_bytes(k, n), l2_bytes))]


def in_turn(items: list, call):
    """A function of no arguments that calls `call` on the next of `items` each time, round and round."""
    state = {"i": 0}

    def run():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return call(item)

    return run


def bench_shape(k: int, n: int, bw: float, l2_bytes: int) -> list[dict]:
    layer_bytes = g128_bytes(k, n)
    layers = rotated_layers(k, n, l2_bytes)
    dense = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies_past_l2(k * n * 2, l2_bytes))]
    rows = []
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)

        def fused(t):
            cfg = triton_gptq._tuned_config(x, t["qweight"], t["scales"], t["qzeros"], t["qweight"], 4, 1, 128)
            return triton_gptq._run(cfg, x, t["qweight"], t["scales"], t["qzeros"], t["qweight"], 4, 1, 128)

        run_gptq = in_turn(layers, lambda t: gptq_matmul(x, t["qweight"], t["scales"], t["qzeros"], t["g_idx"], 4, 1, 128))
        run_fused = in_turn(layers, fused)
        run_dense = in_turn(dense, lambda w: x @ w)

        run_gptq()  # autotune outside the timing
        us_q = graph_us(run_gptq)
        us_eager = triton.testing.do_bench(run_gptq, warmup=25, rep=200, return_mode="median") * 1e3
        us_d = graph_us(run_dense)
        us_fused = graph_us(run_fused) if m >= triton_gptq.DEQUANT_MIN_M else None
        gbs = layer_bytes / (us_q * 1e-6) / 1e9
        rows.append({"k": k, "n": n, "m": m, "gptq_us": us_q, "eager_us": us_eager, "cublas_fp16_us": us_d,
                     "fused_us": us_fused, "gptq_GBps": gbs, "of_copy_bw": gbs * 1e9 / bw, "vs_cublas": us_q / us_d})
    return rows


def gemv_configs(k: int, n: int) -> tuple[list[tuple[float, dict]], float]:
    """M = 1: every GEMV candidate configuration of the shape (4-bit g128), timed alike, fastest first; and the
    largest relative error of any of them against the fp32 dequantized reference."""
    layers = rotated_layers(k, n, torch.cuda.get_device_properties(0).L2_cache_size)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    first = layers[0]
    ref = reference_matmul(x.float(), first["qweight"], first["qzeros"], first["scales"], first["g_idx"], 4, 1)
    timings, worst = [], 0.0
    for cfg in triton_gptq._gemv_configs(n, k, 128, 4):
        run = in_turn(layers, lambda t, cfg=cfg: triton_gptq._run_gemv(cfg, x, t["qweight"], t["scales"], t["qzeros"],
                                                                       4, 1, 128))
        try:
            timings.append((graph_us(run), cfg))
        except triton.runtime.errors.OutOfResources:
            continue
        out = triton_gptq._run_gemv(cfg, x, first["qweight"], first["scales"], first["qzeros"], 4, 1, 128)
        worst = max(worst, relative_error(out, ref))
    return sorted(timings, key=lambda t: t[0]), worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="7B shapes only")
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
    if opts.gemv_configs:
        print("| shape | µs | of copy BW | configuration |\n|---|---|---|---|")
        for name, (k, n) in SHAPES.items():
            layer_bytes = g128_bytes(k, n)
            timings, worst = gemv_configs(k, n)
            for us, cfg in timings[:3]:
                print(f"| {name} ({k}x{n}) | {us:.1f} | {layer_bytes / (us * 1e-6) / bw:.0%} | {cfg} |", flush=True)
            print(f"|  | all {len(timings)} configurations: largest relative error {worst:.1e} "
                  f"{'ok' if worst < 1e-2 else 'FAIL'} | | |", flush=True)
        return

    print("\ncorrectness (relative error vs fp32 dequantized reference, M = 1, 16, 300):")
    triton_gptq.AUTOTUNE = False  # checking every format: no need to time configurations
    for name, (k, n) in SHAPES.items():
        if opts.quick and name.startswith("13B"):
            continue
        for bits, gs, act in ((4, 128, True), (4, 32, True), (8, 128, False), (4, -1, False)):
            err = check(k, n, bits, gs, act)
            flag = "ok" if err < 1e-2 else "FAIL"
            print(f"  {name:12} {bits}-bit g{gs:<4} act={act!s:5} rel.err {err:.2e} {flag}  ({time.time() - t0:.0f} s)", flush=True)

    triton_gptq.AUTOTUNE = True
    _TUNED.clear()
    rows = []
    for name, (k, n) in SHAPES.items():
        if opts.quick and name.startswith("13B"):
            continue
        rows += [dict(r, shape=name) for r in bench_shape(k, n, bw, props.L2_cache_size)]
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
             "tuned": {str(k): str(v) for k, v in _TUNED.items()}}, indent=1))


if __name__ == "__main__":
    main()
