"""One decoded token per sequence attending over its paged KV cache, in one Triton kernel.

A sequence's keys are cut in chunks ("flash decoding"): one program per (sequence, kv head, chunk) walks
its chunk in tiles, each key's slot looked up in the block table, with an online softmax in fp32; the q
heads that share the kv head (GQA) are done together, so each key is read once. In fp16 and bf16 the
scores and the weighted values are tensor-core dots, the group's q heads padded to 16 rows: at 64 rows of
Llama-2-7B it reads the keys and values at 4.3 TB/s, against 1.9 for fp32 products in 64-key tiles and
256-key chunks and 3.4 for their best configuration (benchmarks/experiments/paged_attention_sweep.py). A
second kernel combines the chunks. Lengths come from device memory, so one launch (and one CUDA graph)
serves any lengths. A sequence's chunks depend only on its own length: its result does not change
with what else is in the batch.

:func:`paged_decode_attention_reference` is the torch form it is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DOT_TYPES = (torch.float16, torch.bfloat16)  # what the tensor-core dots take


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, scale, window,
                         stride_table, stride_kh, stride_ks, SPLITS,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr, HQ: tl.constexpr,
                         DOT: tl.constexpr):
    """Program (sequence b, kv head, chunk c): the online softmax over the chunk's keys, left unnormalised in
    the workspace (running max m, sum l, weighted values acc) for the combine kernel. ``DOT``: scores and
    values by tensor-core dots (q's heads padded to GROUP_PAD >= 16 rows, the probabilities rounded to fp16
    for the second), else by fp32 products and sums."""
    b = tl.program_id(0)
    kh = tl.program_id(1)
    c = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kh * GROUP + g
    q_mask = g < GROUP
    kv_len = tl.load(lens_ptr + b)
    start = 0
    if window > 0:
        start = tl.maximum(kv_len - window, 0)
    lo = tl.maximum(c * CHUNK, (start // TILE) * TILE)
    hi = tl.minimum((c + 1) * CHUNK, kv_len)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, D), tl.float32)
    if lo < hi:
        q = tl.load(q_ptr + (b * HQ + heads)[:, None] * D + d[None, :], mask=q_mask[:, None], other=0.0)
        if not DOT:
            q = q.to(tl.float32) * scale
        t = tl.arange(0, TILE)
        for t0 in range(lo, hi, TILE):
            pos = t0 + t
            valid = (pos < hi) & (pos >= start)
            block = tl.load(table_ptr + b * stride_table + pos // BLOCK_SIZE, mask=valid, other=0)
            slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
            offs = kh * stride_kh + slot[:, None] * stride_ks + d[None, :]
            # [TILE, D]; an 8-bit cache's values widened to q's type (exactly: every fp8 value is an fp16 one)
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(q_ptr.dtype.element_ty)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(q_ptr.dtype.element_ty)
            if DOT:
                s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, TILE]
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            else:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            m = m_new
    row = (b * HQ + heads) * SPLITS + c
    tl.store(m_ptr + row, m, mask=q_mask)
    tl.store(l_ptr + row, l, mask=q_mask)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=q_mask[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
    """Program (sequence, q head): the chunks' partial softmaxes rescaled to their common max and summed."""
    row = tl.program_id(0)
    c = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    inside = c < SPLITS
    m = tl.load(m_ptr + row * SPLITS + c, mask=inside, other=float("-inf"))
    l = tl.load(l_ptr + row * SPLITS + c, mask=inside, other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
    acc = tl.load(acc_ptr + (row * SPLITS + c)[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def supported(head_dim: int, n_heads: int, n_kv_heads: int) -> bool:
    return head_dim in (64, 128, 256) and n_heads % n_kv_heads == 0


@dataclass(frozen=True)
class LaunchConfig:
    dot: bool  # tensor-core dots (fp16 and bf16 only), else fp32 products
    tile: int  # keys per loop step
    chunk: int  # keys per program
    warps: int
    stages: int


# The fastest at Llama-2-7B's heads, 768 keys per row, 4 / 16 / 64 rows (benchmarks/experiments/
# paged_attention_sweep.py, H200, 2026-12-02): 20 / 53 / 189 µs a call, 4264 GB/s at 64 rows, against
# 32 / 113 / 427 µs for fp32 products in 64-key tiles and 256-key chunks.
HALF = LaunchConfig(dot=True, tile=128, chunk=512, warps=4, stages=2)
FLOAT = LaunchConfig(dot=False, tile=16, chunk=128, warps=2, stages=3)  # the fastest without dots


def default_config(dtype: torch.dtype) -> LaunchConfig:
    return HALF if dtype in DOT_TYPES else FLOAT


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           kv_lens: torch.Tensor, block_size: int, window: int | None = None,
                           config: LaunchConfig | None = None) -> torch.Tensor:
    """``q`` ``[B, Hq, D]`` (rotated), caches ``[Hkv, slots, D]``, ``block_table`` ``[B, max_blocks]`` int32,
    ``kv_lens`` ``[B]`` int32 (keys at positions ``0 .. kv_len - 1``, the last ``window`` of them if
    given) -> ``[B, Hq, D]``. The number of chunks follows from the table's width (the longest sequence it
    can hold), so a launch does not depend on the lengths in it and a CUDA graph can replay it."""
    b, hq, d = q.shape
    hkv = k_cache.shape[0]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1:
        raise ValueError("the k and v caches must share one layout, head dim contiguous")
    group = hq // hkv
    config = config or default_config(q.dtype)
    if config.chunk % config.tile:
        raise ValueError(f"a chunk of {config.chunk} keys is not a whole number of {config.tile}-key tiles")
    dot = config.dot and q.dtype in DOT_TYPES
    splits = triton.cdiv(block_table.shape[1] * block_size, config.chunk)
    q = q.contiguous()
    m = torch.empty(b * hq * splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(b * hq * splits, d, device=q.device, dtype=torch.float32)
    group_pad = max(triton.next_power_of_2(group), 16 if dot else 1)
    _paged_decode_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, block_table, kv_lens, m, l, acc, 1.0 / math.sqrt(d), window or 0,
        block_table.stride(0), k_cache.stride(0), k_cache.stride(1), splits,
        GROUP=group, GROUP_PAD=group_pad, D=d, BLOCK_SIZE=block_size, TILE=config.tile,
        CHUNK=config.chunk, HQ=hq, DOT=dot, num_warps=config.warps, num_stages=config.stages,
    )
    out = torch.empty_like(q)
    _combine_kernel[(b * hq,)](m, l, acc, out, splits, SPLITS_PAD=triton.next_power_of_2(splits), D=d, num_warps=4)
    return out


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_table: torch.Tensor, kv_lens: torch.Tensor, block_size: int,
                                     window: int | None = None) -> torch.Tensor:
    outs = []
    hq, hkv = q.shape[1], k_cache.shape[0]
    for i in range(q.shape[0]):
        n = int(kv_lens[i])
        pos = torch.arange(n, device=q.device)
        slots = block_table[i, pos // block_size].long() * block_size + pos % block_size
        if window:
            slots = slots[max(0, n - window):]
        k = k_cache[:, slots].float().repeat_interleave(hq // hkv, 0)  # [Hq, L, D]
        v = v_cache[:, slots].float().repeat_interleave(hq // hkv, 0)
        weights = torch.softmax((q[i].float().unsqueeze(1) @ k.transpose(1, 2)) / math.sqrt(q.shape[-1]), -1)
        outs.append((weights @ v).squeeze(1))
    return torch.stack(outs).to(q.dtype)
