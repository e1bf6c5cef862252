"""Launch configurations for the Triton GPTQ kernels, and the tuner that picks one per shape.

One config type for every kernel; the candidates of a shape come best guess first. On a GPU the tuner
(kernels.timing.Tuner) times them once per (M bucket, N, K, format) and keeps the fastest;
``GPTQ_TRITON_AUTOTUNE=0`` takes the first that launches instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from kernels.timing import Tuner
from kernels.triton_gptq.gemv import MAX_SPLIT_K, run_gemv
from kernels.triton_gptq.matmul import run_matmul
from kernels.triton_gptq.weight import INTERPRET, PackedWeight


@dataclass(frozen=True)
class LaunchConfig:
    """``kernel``: "matmul" (the fused tl.dot kernel), or a GEMV: "tile", "int" or "loop" (gemv.py).
    ``block_k``: the K block (the tiles' chunk of rows); ``chunks``: chunks per tile program; ``split_k``: how
    many programs share K in the matmul and the loop GEMV (the tiles' split follows from K)."""

    kernel: str
    block_n: int
    block_k: int
    num_warps: int
    block_m: int = 1
    split_k: int = 1
    chunks: int = 1
    group_m: int = 1
    num_stages: int = 1
    asm: bool = False  # the tiles' inline PTX / dp4a dot (4-bit on a GPU)
    magic: bool = False  # the loop GEMV's fp16 dequantization through the exponent trick


# (BLOCK_N, BLOCK_K, SPLIT_K, stages) for M <= 64 (BLOCK_M: M rounded up to 16, 32 or 64), 4 warps, K split
# across programs: a batch of decoding sequences streams the weight once, as a GEMV does.
SMALL_M_SHAPES = [(128, 128, 4, 3), (128, 64, 8, 2), (128, 128, 8, 4), (64, 128, 8, 2), (256, 64, 4, 4),
                  (128, 64, 16, 4), (64, 64, 16, 2), (256, 128, 2, 3), (64, 128, 4, 3), (128, 32, 16, 4),
                  (64, 32, 16, 2), (256, 32, 8, 4)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for larger M.
LARGE_M_SHAPES = [(128, 128, 32, 4, 4), (128, 256, 32, 8, 3), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3),
                  (256, 128, 32, 8, 3), (64, 64, 32, 2, 4)]
# (BLOCK_N, BLOCK_K, SPLIT_K, warps) for the looping GEMV.
LOOP_SHAPES = [(128, 64, 16, 4), (64, 64, 16, 2), (256, 64, 16, 8), (64, 128, 8, 4), (128, 64, 8, 4), (32, 64, 8, 2),
               (64, 128, 4, 4), (128, 128, 2, 4), (64, 128, 1, 4), (32, 128, 1, 4), (64, 32, 16, 4), (128, 32, 8, 4),
               (128, 128, 8, 4), (256, 128, 4, 8), (128, 128, 4, 4)]
# (BLOCK_N, CHUNK_K, CHUNKS, warps) for the tile GEMV.
TILE_SHAPES = [(128, 128, 2, 4), (512, 64, 1, 4), (256, 64, 2, 4), (512, 128, 1, 4), (256, 128, 2, 8),
               (128, 64, 4, 4), (64, 128, 2, 2), (64, 64, 2, 2), (128, 32, 8, 4), (256, 32, 4, 8)]
# (BLOCK_N, CHUNK_K, CHUNKS, warps) for the integer GEMV (4-bit only).
INT_SHAPES = [(256, 128, 2, 8), (64, 128, 2, 2), (128, 64, 4, 4), (256, 64, 2, 4), (128, 32, 8, 4)]

TUNER: Tuner[LaunchConfig] = Tuner(timed=os.environ.get("GPTQ_TRITON_AUTOTUNE", "1") != "0")


def matmul_candidates(m: int, group_size: int) -> list[LaunchConfig]:
    """The fused kernel's configurations whose K block divides the group size."""
    def ok(block_k: int) -> bool:
        return group_size <= 0 or group_size % block_k == 0

    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        return [LaunchConfig("matmul", bn, bk, 4, block_m=bm, split_k=sk, num_stages=s)
                for bn, bk, sk, s in SMALL_M_SHAPES if ok(bk) and not (bm == 64 and bn == 256)]
    return [LaunchConfig("matmul", bn, bk, w, block_m=bm, group_m=8, num_stages=s)
            for bm, bn, bk, w, s in LARGE_M_SHAPES if ok(bk)]


def gemv_candidates(n: int, k: int, group_size: int, bits: int, interpreted: bool = INTERPRET) -> list[LaunchConfig]:
    """GEMV configurations whose K block divides the group size. 4-bit on a GPU: the tile kernel with the
    inline PTX dot and the integer kernel with dp4a (inline asm the CPU interpreter cannot run), faster at
    every Llama shape than the loop. Else the loop with and without the fp16 dequantization, then the tile in
    fp32, then (4-bit) the integer kernel in plain Triton integers. ``interpreted``: by the CPU interpreter."""
    asm = bits == 4 and not interpreted

    def tiled(shapes, kernel: str) -> list[LaunchConfig]:
        return [LaunchConfig(kernel, bn, ck, w, chunks=c, asm=asm) for bn, ck, c, w in shapes
                if group_size % ck == 0 and k % ck == 0 and triton.cdiv(k, ck * c) <= MAX_SPLIT_K]

    tiles = tiled(TILE_SHAPES, "tile")
    ints = tiled(INT_SHAPES, "int") if bits == 4 else []
    if asm:
        return tiles + ints
    loops = [LaunchConfig("loop", bn, bk, w, split_k=sk, magic=magic)
             for magic in (True, False) for bn, bk, sk, w in LOOP_SHAPES if group_size % bk == 0 and k % bk == 0]
    return loops + tiles + ints


def launch(cfg: LaunchConfig, x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``x @ W`` by one launch of ``cfg``'s kernel."""
    if cfg.kernel == "matmul":
        return run_matmul(x, w, block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k, split_k=cfg.split_k,
                          group_m=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return run_gemv(cfg.kernel, x, w, block_n=cfg.block_n, block_k=cfg.block_k, chunks=cfg.chunks,
                    split_k=cfg.split_k, num_warps=cfg.num_warps, asm=cfg.asm, magic=cfg.magic)


def m_bucket(m: int) -> int:
    if m <= 64:
        return 1 if m == 1 else max(16, triton.next_power_of_2(m))
    return 128 if m <= 128 else 1024 if m <= 1024 else 4096


def tuned_config(x: torch.Tensor, w: PackedWeight, gemv: bool) -> LaunchConfig | None:
    """The tuned configuration for ``x @ W`` (the GEMV's if ``gemv``), or None where no candidate tiles the
    shape."""
    k = x.shape[1]
    if gemv:
        key = ("gemv", w.n, k, w.bits, w.group_size)
    else:
        key = ("matmul", m_bucket(x.shape[0]), w.n, k, w.bits, w.group_size, x.dtype)
    if key in TUNER.best:  # the common case, on every call: no candidate lists built
        return TUNER.best[key]
    candidates = (gemv_candidates(w.n, k, w.group_size, w.bits) if gemv
                  else matmul_candidates(x.shape[0], w.group_size))
    if not candidates:
        return None

    def launches(cfg: LaunchConfig, tensors: tuple[torch.Tensor, ...]) -> bool:
        try:
            launch(cfg, x, w.on(tensors))
        except triton.runtime.errors.OutOfResources:
            return False
        return True

    return TUNER.pick(key, candidates, launches, w.tensors)
