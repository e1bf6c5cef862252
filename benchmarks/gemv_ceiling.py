"""How close to the copy bandwidth can one kernel per call read a 4-bit g128 layer at all?

    python benchmarks/gemv_ceiling.py

At every Llama-2 shape of triton_matmul.py, timed as it times the GEMV (a CUDA graph of 20 calls, each on
the next of enough layers to read past L2), with the bytes the GEMV must read (qweight + scales + qzeros):
- "stream": a kernel that loads exactly the GEMV tile kernel's bytes in its tiles, through the same _load_tile
  and all at once, and folds them into a value it (practically) never stores: no dot, no split-K sums,
  nothing after the loads.
  "Held": every word waits for a value loaded after the wait, as the GEMV's words wait for x, so the
  words stay in registers until it arrives; "not held": the words are folded as they arrive (ptxas then
  interleaves loads and folds, and frees registers early), which no GEMV can do, since it needs x.
  Launch modes: no PDL; PDL waiting after the loads for the previous kernel, as the GEMV does; PDL
  without waiting at all (no dependency between calls: the most overlap a chain of calls can get).
  Best of several tile shapes each. "Held, PDL, wait after loads" bounds the GEMV.
- "copy": torch's copy of a buffer of the layer's size (read + write, so twice the bytes).
- "GEMV": gptq_gemv as the triton backend runs it (autotuned).
The stream kernel without a wait bounds what any kernel that reads the weights once per call can reach here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.triton_matmul import SHAPES, copies_past_l2, copy_bandwidth, g128_bytes, graph_us, in_turn  # noqa: E402
from kernels import triton_gptq  # noqa: E402

# (BLOCK_N, CHUNK_K, CHUNKS, warps) as in triton_gptq.TILE_SHAPES
STREAM_TILES = [(128, 128, 2, 4), (128, 128, 1, 4), (128, 128, 4, 4), (256, 128, 2, 8), (64, 128, 2, 2),
                (256, 128, 1, 4), (512, 128, 1, 8), (512, 64, 1, 4), (256, 64, 1, 2)]
# column -> (launch mode, whether the words are held): 0 no PDL, 1 PDL waiting after the loads, 2 PDL, no wait
COLUMNS = {"held, no PDL": (0, (True,)), "held, PDL, wait after loads": (1, (True,)),
           "not held, PDL, wait after loads": (1, (False,)), "PDL, no wait": (2, (False, True))}


@triton.jit
def _stream(q_ptr, s_ptr, z_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, CHUNK_K: tl.constexpr,
            CHUNKS: tl.constexpr, MODE: tl.constexpr, HOLD: tl.constexpr):
    if MODE > 0:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n, _, _, _, _, words, scale, zero = triton_gptq._load_tile(q_ptr, s_ptr, z_ptr, N, K, 128, 4, 0, BLOCK_N,
                                                                    CHUNK_K, CHUNKS)
    if MODE == 1:
        tl.extra.cuda.gdc_wait()
    if HOLD:  # every word waits for a value loaded afterwards, as the GEMV's words wait for x: all in flight
        words *= tl.load(out_ptr + N, volatile=True)
    folded = tl.xor_sum(tl.xor_sum(words, axis=1), axis=0)
    folded ^= tl.xor_sum(zero + scale.to(tl.int16, bitcast=True).to(tl.int32), axis=0)
    tl.store(out_ptr + offs_n, folded, mask=folded == 0x7FFFFFFF)  # practically never: the loads stay


def random_layers(k: int, n: int, l2_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Random bits in the 4-bit g128 layout (what the stream kernel and the copy read; not a valid GEMV layer)."""
    def layer() -> dict[str, torch.Tensor]:
        return {"qweight": torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
                "scales": torch.rand(k // 128, n, device="cuda").half(),
                "qzeros": torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device="cuda")}
    return [layer() for _ in range(copies_past_l2(g128_bytes(k, n), l2_bytes))]


def stream_us(layers: list[dict], k: int, n: int, tile: tuple[int, int, int, int], mode: int, hold: bool) -> float:
    bn, ck, chunks, warps = tile
    out = torch.ones(n + 1, dtype=torch.int32, device="cuda")  # out[n]: the value held words wait for
    grid = (triton.cdiv(n, bn), triton.cdiv(k, ck * chunks))
    pdl = {"launch_pdl": True} if mode else {}
    return graph_us(in_turn(layers, lambda t: _stream[grid](t["qweight"], t["scales"], t["qzeros"], out, n, k, BLOCK_N=bn,
                                                            CHUNK_K=ck, CHUNKS=chunks, MODE=mode, HOLD=hold,
                                                            num_warps=warps, **pdl)))


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{props.name}, triton {triton.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s (2 GiB, read + write)")
    print("µs per call (of copy bandwidth), the stream kernel's best tile in brackets\n")
    print("| shape | " + " | ".join(f"stream, {c}" for c in COLUMNS) + " | copy of the layer's bytes | GEMV |")
    print("|---|" + "---|" * (len(COLUMNS) + 2))
    for name, (k, n) in SHAPES.items():
        nbytes = g128_bytes(k, n)

        def cell(us: float, moved: int = nbytes) -> str:
            return f"{us:.1f} ({moved / (us * 1e-6) / bw:.0%})"

        layers = random_layers(k, n, props.L2_cache_size)
        cells = []
        for mode, holds in COLUMNS.values():
            us, tile, hold = min((stream_us(layers, k, n, tile, mode, hold), tile, hold)
                                 for tile in STREAM_TILES for hold in holds)
            cells.append(f"{cell(us)} {tile}{' held' if hold else ''}")
        copies = [(torch.cat([t["qweight"].view(torch.uint8).view(-1), t["scales"].view(torch.uint8).view(-1),
                              t["qzeros"].view(torch.uint8).view(-1)]), torch.empty(nbytes, dtype=torch.uint8,
                                                                                    device="cuda")) for t in layers]
        cells.append(cell(graph_us(in_turn(copies, lambda c: c[1].copy_(c[0]))), 2 * nbytes))
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        gemv = in_turn(layers, lambda t: triton_gptq.gptq_gemv(x, t["qweight"], t["scales"], t["qzeros"], 4, 1, 128))
        gemv()  # autotune outside the timing
        cells.append(cell(graph_us(gemv)))
        print(f"| {name} ({k}x{n}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
