"""The paged decode attention kernel's launch configurations timed at Llama-2-7B's heads for a few batch
sizes, each row's keys scattered over the pool and read from memory: µs per call and the bandwidth of its
key and value reads; and each configuration's largest error against the torch reference.

    python -m benchmarks.experiments.paged_attention_sweep [--context 768] [--batches 4 16 64]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from kernels.paged_attention import LaunchConfig, paged_decode_attention, paged_decode_attention_reference
from kernels.timing import cold_copies, graph_us, in_turn

BLOCK = 16
HEADS, HEAD_DIM = 32, 128


def configs() -> list[LaunchConfig]:
    out = [LaunchConfig()]
    for tile, chunk, warps, stages in itertools.product((32, 64, 128), (128, 256, 512), (4, 8), (2, 3, 4)):
        if chunk >= tile:
            out.append(LaunchConfig(True, tile, chunk, warps, stages))
    for tile, chunk, warps, stages in itertools.product((16, 32, 64), (128, 256), (2, 4), (1, 3)):
        out.append(LaunchConfig(False, tile, chunk, warps, stages))
    return list(dict.fromkeys(out))


def case(batch: int, context: int, width: int):
    g = torch.Generator().manual_seed(batch)
    blocks = batch * width
    order = torch.randperm(blocks, generator=g).view(batch, width).to(torch.int32)
    k = torch.randn(HEADS, blocks * BLOCK, HEAD_DIM, generator=g).half().cuda()
    v = torch.randn(HEADS, blocks * BLOCK, HEAD_DIM, generator=g).half().cuda()
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g).half().cuda()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q, k, v, order.cuda(), lens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=768, help="keys per row")
    parser.add_argument("--width", type=int, default=52, help="the block table's width (the engine's context)")
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 16, 64])
    opts = parser.parse_args()
    rows: dict[LaunchConfig, list] = {c: [] for c in configs()}
    for batch in opts.batches:
        q, k, v, table, lens = case(batch, opts.context, opts.width)
        expected = paged_decode_attention_reference(q, k, v, table, lens, BLOCK).float()
        copies = cold_copies([k, v])
        moved = 2 * batch * opts.context * HEADS * HEAD_DIM * 2
        for config in rows:
            try:
                out = paged_decode_attention(q, k, v, table, lens, BLOCK, None, config)
            except Exception as exc:  # noqa: BLE001 - e.g. more shared memory than the device has
                print(f"{config}: {type(exc).__name__}: {str(exc)[:120]}")
                rows[config].append((float("inf"), 0.0, float("nan")))
                continue
            error = (out.float() - expected).abs().max()
            us = graph_us(in_turn(copies, lambda kv, c=config: paged_decode_attention(q, kv[0], kv[1], table, lens,
                                                                                    BLOCK, None, c)), replays=5)
            rows[config].append((us, moved / us / 1e3, float(error)))
        del copies
    key = opts.batches.index(16) if 16 in opts.batches else 0
    print(f"{torch.cuda.get_device_name()}; {opts.context} keys per row, table width {opts.width} blocks of {BLOCK}; "
          f"{HEADS} heads of {HEAD_DIM}; sorted by batch {opts.batches[key]}\n")
    print("| dot | tile | chunk | warps | stages | " + " | ".join(f"B={b} µs (GB/s)" for b in opts.batches)
          + " | max error |")
    print("|---|---|---|---|---|" + "---|" * len(opts.batches) + "---|")
    for config, times in sorted(rows.items(), key=lambda kv: kv[1][key][0]):
        cells = " | ".join(f"{us:.1f} ({gbs:.0f})" for us, gbs, _ in times)
        tag = " (default)" if config == LaunchConfig() else ""
        print(f"| {config.dot}{tag} | {config.tile} | {config.chunk} | {config.warps} | {config.stages} | {cells} | "
              f"{max(e for *_, e in times):.1e} |")


if __name__ == "__main__":
    main()
