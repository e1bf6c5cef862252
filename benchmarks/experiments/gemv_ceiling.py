"""How close to the copy bandwidth can one kernel per call read a 4-bit g128 layer at all?

    python -m benchmarks.experiments.gemv_ceiling

At every Llama-2 shape of triton_matmul.py, timed as it times the GEMV (a CUDA graph of 20 calls, each on
the next of enough layers to read past L2), with the bytes the GEMV must read (qweight + scales + qzeros):
- "stream": a kernel that loads exactly the GEMV tile kernel's bytes in its tiles, through the same load_tile
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
Before timing, :func:`check` compares the stream kernel's per-tile folds with the same fold in torch, and
the GEMV with the fp32 reference, on a small layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from benchmarks.llama2 import SHAPES, g128_bytes
from kernels import triton_gptq
from kernels.gptq_format import reference_matmul
from kernels.timing import copies_past_l2, copy_bandwidth, graph_us, in_turn
from kernels.triton_gptq.gemv import load_tile
from tests.gptq_testing import relative_error

# (BLOCK_N, CHUNK_K, CHUNKS, warps) as in kernels/triton_gptq/tuning.py's TILE_SHAPES
STREAM_TILES = [(128, 128, 2, 4), (128, 128, 1, 4), (128, 128, 4, 4), (256, 128, 2, 8), (64, 128, 2, 2),
                (256, 128, 1, 4), (512, 128, 1, 8), (512, 64, 1, 4), (256, 64, 1, 2)]
# column -> (launch mode, whether the words are held): 0 no PDL, 1 PDL waiting after the loads, 2 PDL, no wait
COLUMNS = {"held, no PDL": (0, (True,)), "held, PDL, wait after loads": (1, (True,)),
           "not held, PDL, wait after loads": (1, (False,)), "PDL, no wait": (2, (False, True))}


@triton.jit
def _stream(q_ptr, s_ptr, z_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, CHUNK_K: tl.constexpr,
            CHUNKS: tl.constexpr, MODE: tl.constexpr, HOLD: tl.constexpr, CHECK: tl.constexpr = False):
    if MODE > 0:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n, _, _, _, _, words, scale, zero = load_tile(q_ptr, s_ptr, z_ptr, N, K, 128, 4, 0, BLOCK_N, CHUNK_K, CHUNKS)
    if MODE == 1:
        tl.extra.cuda.gdc_wait()
    if HOLD:  # every word waits for a value loaded afterwards, as the GEMV's words wait for x: all in flight
        words *= tl.load(out_ptr + N, volatile=True)
    folded = tl.xor_sum(tl.xor_sum(words, axis=1), axis=0)
    folded ^= tl.xor_sum(zero + scale.to(tl.int16, bitcast=True).to(tl.int32), axis=0)
    if CHECK:  # each program's fold to its own row, for check()
        tl.store(out_ptr + tl.program_id(1) * N + offs_n, folded, mask=offs_n < N)
    else:
        tl.store(out_ptr + offs_n, folded, mask=folded == 0x7FFFFFFF)  # practically never: the loads stay


def reference_folds(t: dict[str, torch.Tensor], k: int, n: int, chunk_k: int, chunks: int) -> torch.Tensor:
    """What each program of _stream folds, per column: the XOR of its word rows, then of zero + the scale's
    bits (sign-extended) of each of its chunks. ``[splits, N]``."""
    def xor(rows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(rows.shape[1:], dtype=torch.int32, device=rows.device)
        for row in rows:
            out ^= row
        return out

    zero = (t["qzeros"].repeat_interleave(8, dim=1) >> (4 * (torch.arange(n, device="cuda") % 8))) & 15
    scale_bits = t["scales"].view(torch.int16).to(torch.int32)
    folds = []
    for first in range(0, k, chunk_k * chunks):
        rows = slice(first // 8, min(k, first + chunk_k * chunks) // 8)
        groups = [c // 128 for c in range(first, min(k, first + chunk_k * chunks), chunk_k)]
        folds.append(xor(t["qweight"][rows]) ^ xor(torch.stack([zero[g] + scale_bits[g] for g in groups])))
    return torch.stack(folds)


def check() -> None:
    k, n = 1024, 384
    t = random_layers(k, n, count=1)[0]
    for bn, ck, chunks, warps in STREAM_TILES:
        splits = triton.cdiv(k, ck * chunks)
        out = torch.zeros(splits * n + 1, dtype=torch.int32, device="cuda")
        _stream[(triton.cdiv(n, bn), splits)](t["qweight"], t["scales"], t["qzeros"], out, n, k, BLOCK_N=bn,
                                              CHUNK_K=ck, CHUNKS=chunks, MODE=0, HOLD=False, CHECK=True,
                                              num_warps=warps)
        expected = reference_folds(t, k, n, ck, chunks)
        assert torch.equal(out[:-1].view(splits, n), expected), f"the stream kernel's tile {bn, ck, chunks} reads other bytes"
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    w = triton_gptq.PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 128)
    g_idx = torch.arange(k, device="cuda", dtype=torch.int32) // 128
    ref = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], g_idx, 4, 1)
    assert relative_error(triton_gptq.gptq_gemv(x, w), ref) < 1e-2, "the GEMV disagrees with the fp32 reference"
    print("check: the stream kernel folds exactly the layer's bytes at every tile; the GEMV matches fp32")


def random_layers(k: int, n: int, count: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Random bits in the 4-bit g128 layout (the scales finite), ``count`` of them or enough to read past L2."""
    def layer() -> dict[str, torch.Tensor]:
        return {"qweight": torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
                "scales": torch.rand(k // 128, n, device="cuda").half(),
                "qzeros": torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device="cuda")}
    return [layer() for _ in range(count or copies_past_l2(g128_bytes(k, n), torch.device("cuda")))]


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
    check()
    bw = copy_bandwidth()
    print(f"{props.name}, triton {triton.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s (2 GiB, read + write)")
    print("µs per call (of copy bandwidth), the stream kernel's best tile in brackets\n")
    print("| shape | " + " | ".join(f"stream, {c}" for c in COLUMNS) + " | copy of the layer's bytes | GEMV |")
    print("|---|" + "---|" * (len(COLUMNS) + 2))
    for name, (k, n) in SHAPES.items():
        nbytes = g128_bytes(k, n)

        def cell(us: float, moved: int = nbytes) -> str:
            return f"{us:.1f} ({moved / (us * 1e-6) / bw:.0%})"

        layers = random_layers(k, n)
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
        gemv = in_turn(layers, lambda t: triton_gptq.gptq_gemv(x, triton_gptq.PackedWeight(
            t["qweight"], t["scales"], t["qzeros"], 4, 1, 128)))
        gemv()  # autotune outside the timing
        cells.append(cell(graph_us(gemv)))
        print(f"| {name} ({k}x{n}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
