"""Attention of one engine step over the paged KV cache.

A step holds several sequences' new tokens side by side (``[T]``): one token of each decoding sequence and
a chunk of each prefilling prompt. The projections run on all of them at once; attention runs per
sequence, on its own keys:
- on a GPU, decoding sequences (one token each) attend in one launch of kernels/paged_attention.py;
- on the CPU, with a bf16 cache, every row (a decoding token, or a prompt token) attends through
  kernels/cpu_q4.cpp, which reads the keys in place from their blocks, each (row, head) alone;
- a prompt chunk, and any other sequence, attends alone in torch's SDPA, masked causally from its
  first position, over its keys (a slice of the pool where its blocks are consecutive, else a gather).
Either way a sequence's result does not depend on its neighbours in the step (a padded batch would change
the kernels' reduction order, and in bf16 flip tokens).

:class:`DecodeStep` is the all-decoding step with its tensors allocated once per batch size, so it can be
captured in a CUDA graph (backends/batch_graphs.py).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from backends.model import apply_rotary
from backends.paged_cache import KVPool
from kernels import cpu_q4

# The kernels that may attend a prompt chunk on a GPU (None: any that torch picks). Not cuDNN's: it builds an
# execution plan for each new shape and alignment of its inputs, and a step's chunks keep coming in new ones
# (benchmarks/experiments/step_timeline.py).
PROMPT_SDPA_BACKENDS: list[SDPBackend] | None = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH]


@functools.cache
def _kernel():
    """kernels/paged_attention.py, imported on first use on a GPU (Triton decides at import whether it
    interprets), or None without Triton: every sequence then attends alone."""
    try:
        from kernels import paged_attention
    except ImportError:
        return None
    return paged_attention


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in a step: rows ``start .. start + length`` at positions from ``first_position``;
    ``blocks`` covers every position up to the last."""

    start: int
    length: int
    first_position: int
    blocks: tuple[int, ...]

    @property
    def kv_len(self) -> int:
        return self.first_position + self.length


def _slots(blocks: tuple[int, ...], begin: int, end: int, block_size: int) -> list[int]:
    return [blocks[p // block_size] * block_size + p % block_size for p in range(begin, end)]


def _consecutive(blocks: tuple[int, ...], count: int) -> bool:
    return all(blocks[i + 1] == blocks[i] + 1 for i in range(count - 1))


def kernel_takes(pool: KVPool, n_heads: int) -> bool:
    shape = pool.shape
    return (pool.k.is_cuda and _kernel() is not None
            and _kernel().supported(shape.head_dim, n_heads, shape.n_kv_heads))


@functools.cache
def _rotary():
    try:
        from kernels import rotary
    except ImportError:
        return None
    return rotary


def store(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """``cache[:, slots] = values`` (``[Hkv, slots, D]``), narrowed to the cache's type; an fp8 cache through
    its bytes, which index_copy_ takes where it does not take fp8."""
    values = values.to(cache.dtype)
    if cache.element_size() == 1:
        cache, values = cache.view(torch.uint8), values.view(torch.uint8)
    cache.index_copy_(1, slots, values)


def rotate_and_store(pool: KVPool, layer: int, n_heads: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, write_slots: torch.Tensor) -> torch.Tensor:
    """q rotated ``[Hq, T, D]``; k rotated and v written to their slots of ``layer``'s cache (on a GPU in one
    kernel, kernels/rotary.py: the torch form launches about twenty)."""
    t = q.shape[0]
    kv_heads, d = pool.shape.n_kv_heads, pool.shape.head_dim
    if pool.k.is_cuda and _rotary() is not None and _rotary().supported(d):
        rotated = _rotary().rotary_qkv(q.view(1, t, n_heads, d), k.view(1, t, kv_heads, d), v.view(1, t, kv_heads, d),
                                       cos, sin, pool.k[layer].unsqueeze(0), pool.v[layer].unsqueeze(0), write_slots)
        return rotated[0].transpose(0, 1)
    q = apply_rotary(q.view(t, n_heads, d).transpose(0, 1), cos, sin)
    k = apply_rotary(k.view(t, kv_heads, d).transpose(0, 1), cos, sin)
    store(pool.k[layer], write_slots, k)
    store(pool.v[layer], write_slots, v.view(t, kv_heads, d).transpose(0, 1))
    return q


class PagedStep:
    """What the layers need to attend one step's tokens (backends/model.py ``PagedAttention``)."""

    def __init__(self, pool: KVPool, segments: list[Segment], sliding_window: int | None, dtype: torch.dtype,
                 n_heads: int):
        device = pool.k.device
        bs = pool.shape.block_size
        self.pool, self.window, self.n_heads = pool, sliding_window, n_heads
        self.segment_bounds = [(s.start, s.start + s.length) for s in segments]
        slots = [slot for s in segments for slot in _slots(s.blocks, s.first_position, s.kv_len, bs)]
        self.write_slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.positions = torch.tensor([p for s in segments for p in range(s.first_position, s.kv_len)],
                                      dtype=torch.long, device=device)
        self.on_cpu = cpu_q4.attention_takes(pool.k)
        if self.on_cpu:  # every row alone through the CPU kernel, prompt rows too: no result depends on how a
            # prompt was cut into chunks or on what shared its step (SDPA over a chunk did, in the last bits)
            self.batched = [Segment(s.start + i, 1, s.first_position + i, s.blocks)
                            for s in segments for i in range(s.length)]
            self.alone = []
        else:
            batch = kernel_takes(pool, n_heads)
            self.batched = [s for s in segments if batch and s.length == 1]
            self.alone = [s for s in segments if not (batch and s.length == 1)]
        self.keys = [self._key_slots(s) for s in self.alone]
        self.masks = [self._mask(s, dtype) for s in self.alone]
        if self.batched:
            width = max(len(s.blocks) for s in self.batched)
            table = [list(s.blocks) + [0] * (width - len(s.blocks)) for s in self.batched]
            self.table = torch.tensor(table, dtype=torch.int32, device=device)
            self.lens = torch.tensor([s.kv_len for s in self.batched], dtype=torch.int32, device=device)
            self.batch_rows = torch.tensor([s.start for s in self.batched], dtype=torch.long, device=device)

    def _key_slots(self, s: Segment) -> slice | torch.Tensor:
        bs = self.pool.shape.block_size
        if _consecutive(s.blocks, -(-s.kv_len // bs)):
            start = s.blocks[0] * bs
            return slice(start, start + s.kv_len)
        return torch.tensor(_slots(s.blocks, 0, s.kv_len, bs), dtype=torch.long, device=self.pool.k.device)

    def _mask(self, s: Segment, dtype: torch.dtype) -> torch.Tensor:
        device = self.pool.k.device
        keys = torch.arange(s.kv_len, device=device).view(1, -1)
        positions = torch.arange(s.first_position, s.kv_len, device=device).view(-1, 1)
        allowed = keys <= positions
        if self.window is not None:
            allowed &= keys > positions - self.window
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq * D]``, k and v ``[T, Hkv * D]`` -> attention output ``[T, Hq * D]``; k (rotated) and v are
        written to the cache first."""
        if self.on_cpu:  # rotary, the cache writes and every row's attention in one call
            return cpu_q4.rope_store_attend(q, k, v, cos, sin, self.pool.k[layer], self.pool.v[layer],
                                            self.write_slots, self.table, self.lens, self.pool.shape.block_size,
                                            self.window)
        t = q.shape[0]
        q = rotate_and_store(self.pool, layer, self.n_heads, q, k, v, cos, sin, self.write_slots)
        cache_k, cache_v = self.pool.k[layer], self.pool.v[layer]  # [Hkv, slots, D]
        out = torch.empty_like(q)
        gqa = self.n_heads != self.pool.shape.n_kv_heads
        chosen = PROMPT_SDPA_BACKENDS if q.is_cuda else None
        with sdpa_kernel(chosen) if chosen and self.alone else nullcontext():
            for s, key_slots, mask in zip(self.alone, self.keys, self.masks):
                rows = slice(s.start, s.start + s.length)
                keys, values = cache_k[:, key_slots].to(q.dtype), cache_v[:, key_slots].to(q.dtype)  # fp8: widened
                out[:, rows] = F.scaled_dot_product_attention(
                    q[:, rows].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, enable_gqa=gqa)[0]
        if self.batched:
            queries = q[:, self.batch_rows].transpose(0, 1)  # [B, Hq, D]
            attended = _kernel().paged_decode_attention(queries, cache_k, cache_v, self.table, self.lens,
                                                        self.pool.shape.block_size, self.window)
            out[:, self.batch_rows] = attended.transpose(0, 1)
        return out.transpose(0, 1).reshape(t, -1)


class DecodeStep:
    """A step in which every row is one decoding sequence's token, attended by the kernel, with every tensor
    allocated once for ``batch`` rows: :meth:`fill` copies a step's values in, so the forward can be
    captured in a CUDA graph and replayed. Rows past the real sequences read and write a scratch block."""

    def __init__(self, pool: KVPool, batch: int, max_blocks: int, scratch_block: int, sliding_window: int | None,
                 n_heads: int):
        device = pool.k.device
        self.pool, self.batch, self.window, self.n_heads = pool, batch, sliding_window, n_heads
        self.scratch = scratch_block
        self.segment_bounds = [(i, i + 1) for i in range(batch)]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.write_slots = torch.zeros(batch, dtype=torch.long, device=device)
        self.table = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device)
        self.lens = torch.ones(batch, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, device=device)
        pinned = device.type == "cuda"
        # Two host buffers in turn: a step is filled while the previous one's copy may still be queued. Each
        # keeps the blocks its rows hold, since a row's blocks change once a block of tokens.
        self._hosts = [torch.zeros(batch, 4 + max_blocks, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._views = [host.numpy() for host in self._hosts]
        self._held: list[list[tuple[int, ...] | None]] = [[None] * batch for _ in range(2)]  # None: padding
        for view in self._views:
            self._pad(view, 0)
        self._copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self._turn = 0

    def _pad(self, view, first: int) -> None:
        """Rows ``first..`` of a host buffer as padding: token 0 at position 0 of the scratch block."""
        view[first:] = 0
        view[first:, 2] = 1
        view[first:, 3] = self.scratch * self.pool.shape.block_size
        view[first:, 4] = self.scratch

    def fill(self, rows: list[tuple[int, int, tuple[int, ...]]], tokens: torch.Tensor | None = None) -> None:
        """``rows``: each real sequence's (token, position, blocks); ``tokens``: their tokens on the device
        instead (a step queued before the host knows them)."""
        bs = self.pool.shape.block_size
        turn, self._turn = self._turn, 1 - self._turn
        host, copied, view, held = self._hosts[turn], self._copied[turn], self._views[turn], self._held[turn]
        if copied is not None:
            copied.synchronize()  # its copy two fills ago, long done
        n = len(rows)
        if n:
            view[:n, :4] = [(token, position, position + 1, blocks[position // bs] * bs + position % bs)
                            for token, position, blocks in rows]
        for i, (_, _, blocks) in enumerate(rows):
            if held[i] != blocks:
                view[i, 4 : 4 + len(blocks)] = blocks
                view[i, 4 + len(blocks) :] = 0
                held[i] = blocks
        if n < self.batch and held[n] is not None:  # rows past a real one's last fill of this buffer
            self._pad(view, n)
            held[n:] = [None] * (self.batch - n)
        device_copy = host.to(self.tokens.device, non_blocking=True)
        if copied is not None:
            copied.record()
        self.tokens.copy_(device_copy[:, 0])
        if tokens is not None:
            self.tokens[: tokens.numel()].copy_(tokens)
        self.positions.copy_(device_copy[:, 1])
        self.lens.copy_(device_copy[:, 2])
        self.write_slots.copy_(device_copy[:, 3])
        self.table.copy_(device_copy[:, 4:])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        q = rotate_and_store(self.pool, layer, self.n_heads, q, k, v, cos, sin, self.write_slots)
        out = _kernel().paged_decode_attention(q.transpose(0, 1), self.pool.k[layer], self.pool.v[layer], self.table,
                                            self.lens, self.pool.shape.block_size, self.window)
        return out.reshape(self.batch, -1)
